"""Forward (MATH.md §4) vs adjoint (§12) accumulation: time and peak memory, kept per sample and per tensor.

    python benchmarks/bench_adjoint.py --quick      # seconds: M doubling at fixed N·B, both modes
    python benchmarks/bench_adjoint.py --mnist      # 60,000 MNIST-shaped samples, ~940 AdamW steps, adjoint only

Peak memory is the process's VmHWM from /proc (as bench_memory.py), so each measurement runs in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em


def peak_mib() -> float:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def record(samples: int, batch: int, steps: int, hidden: int, inputs: int, classes: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, inputs, generator=g, dtype=torch.float64)
    Y = torch.randint(0, classes, (samples,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    recorder = em.TrajectoryRecorder(model, optimizer)
    order = torch.randperm(samples, generator=g)
    t0 = time.perf_counter()
    for t in range(steps):
        ids = order[(t * batch) % samples:][:batch]
        optimizer.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        recorder.record_batch(ids)
        optimizer.step()
    train_step = (time.perf_counter() - t0) / steps
    recorder.close()
    return model, recorder.trajectory(), (X, Y), torch.randn(10, inputs, generator=g, dtype=torch.float64), train_step


def measure(mode: str, samples: int, batch: int, steps: int, hidden: int, inputs: int, classes: int,
            budget: str | None) -> dict:
    model, traj, data, xs, train_step = record(samples, batch, steps, hidden, inputs, classes)
    t0 = time.perf_counter()
    try:
        result = em.decompose_adamw_training(model, traj, lambda o, y: F.cross_entropy(o, y), data, xs,
                                             keep=("param", "unit"), quadrature=em.gauss_legendre(4),
                                             accumulation=mode, memory_budget=budget)
    except em.engine.plan.MemoryBudgetError as error:
        return {"mode": mode, "refused": str(error)[:300]}
    seconds = time.perf_counter() - t0
    return {"mode": mode, "seconds": seconds, "per_step": seconds / steps, "train_step": train_step,
            "peak_mib": peak_mib(), "relative_residual": result.relative_residual, "ran": result.accumulation}


def in_subprocess(*args) -> dict:
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(args)], capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-500:]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mnist", action="store_true")
    parser.add_argument("--one")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return
    if args.mnist:
        for mode in ("forward", "adjoint"):
            print(in_subprocess(mode, 60000, 64, 938, 128, 784, 10, "4GiB"))
        return
    rows = []
    base = 32 if args.quick else 128
    for M in (base, 2 * base, 4 * base):  # M doubles with N · B fixed (every sample seen once at M = N · B)
        for mode in ("forward", "adjoint"):
            rows.append({"M": M, **in_subprocess(mode, M, 8, 8 if args.quick else 32, 16, 8, 3, None)})
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()
