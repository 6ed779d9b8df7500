"""Memory: a streaming decomposition against materializing the atomic tensor (issue 7, MATH.md §5, §11).

A one-hidden-layer tanh MLP with D parameters is trained for N AdamW steps on M samples (mini-batches); it is
decomposed for X test inputs and all O outputs. The atomic tensor I[t, j, x, i, o] has N·D·X·M·O entries —
at 8 bytes each (float64) far more than the 24 GiB of the machines this project runs on; its size is printed,
not allocated. Each row decomposes the same recorded run in a fresh subprocess, keeping (parameter tensor,
test input, training sample, output) — the kept result is tiny — under a ``memory_budget``, and reports:

* peak Δ: the peak resident set size during the decomposition (VmHWM, reset just before) minus the resident
  set size before it, with glibc told to map every tensor above 128 KiB separately
  (MALLOC_MMAP_THRESHOLD_) so that the resident set follows the live tensors;
* what had to be held whatever the budget: the per-unit buffers and the step's unit updates (2 · M · D),
  and the kept result;
* the plan the library chose (chunk sizes, group-wise Jacobians);
* the certified residual (the budget changes the order of sums only).

A budget below what must be held at once is refused with an error that names it (shown as a row), and the
partition row (Corollary F.2: one buffer per class, K·D instead of M·D) shows the way out.

    python benchmarks/bench_memory.py            # full: a few minutes on 2 CPU cores
    python benchmarks/bench_memory.py --quick    # scaled down, well under a minute
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scaling import _proc_status_kb, _reset_peak_rss  # noqa: E402  (peak-RSS helpers of the same suite)

GIB = 2**30
MIB = 2**20


@dataclass(frozen=True)
class Config:
    inputs: int = 64
    width: int = 1536
    outputs: int = 10
    steps: int = 20
    n_train: int = 256
    batch: int = 64
    n_test: int = 16
    seed: int = 0

    @property
    def num_params(self) -> int:
        return self.width * (self.inputs + 1) + self.outputs * (self.width + 1)

    @property
    def atomic_bytes(self) -> int:
        return self.steps * self.num_params * self.n_test * self.n_train * self.outputs * 8


FULL = Config()
QUICK = Config(inputs=16, width=256, steps=6, n_train=64, batch=32, n_test=4)

# (label, memory_budget, partition by class?)
FULL_ROWS = [("no budget", None, False), ("budget 2 GiB", "2GiB", False), ("budget 1.25 GiB", "1.25GiB", False),
             ("budget 0.5 GiB", "512MiB", False), ("by class, 0.5 GiB", "512MiB", True)]
QUICK_ROWS = [("no budget", None, False), ("budget 64 MiB", "64MiB", False), ("budget 24 MiB", "24MiB", False),
              ("budget 4 MiB", "4MiB", False), ("by class, 4 MiB", "4MiB", True)]


def recorded_run(cfg: Config):
    g = torch.Generator().manual_seed(cfg.seed)
    X = torch.randn(cfg.n_train, cfg.inputs, generator=g, dtype=torch.float64)
    Y = torch.randint(0, cfg.outputs, (cfg.n_train,), generator=g)
    X_test = torch.randn(cfg.n_test, cfg.inputs, generator=g, dtype=torch.float64)
    torch.manual_seed(cfg.seed)
    model = nn.Sequential(nn.Linear(cfg.inputs, cfg.width), nn.Tanh(), nn.Linear(cfg.width, cfg.outputs)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    recorder = em.TrajectoryRecorder(model, optimizer)
    order: list[int] = []
    for _ in range(cfg.steps):
        if len(order) < cfg.batch:
            order = torch.randperm(cfg.n_train, generator=g).tolist()
        ids, order = order[: cfg.batch], order[cfg.batch:]
        optimizer.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        recorder.record_batch(ids)
        optimizer.step()
    recorder.close()
    return model, recorder.trajectory(), (X, Y), X_test


def loss_fn(out, y):
    return F.cross_entropy(out, y)


def worker(cfg: Config, budget: str | None, by_class: bool) -> dict:
    """One decomposition in this (fresh) process: peak RSS above the RSS before it, the plan, the residual."""
    model, trajectory, (X, Y), X_test = recorded_run(cfg)
    options = dict(keep=("param", "test", "unit", "output"), params="tensor", quadrature=em.gauss_legendre(4),
                   memory_budget=budget)
    if by_class:
        decompose = lambda: em.decompose_by_partition(model, trajectory, loss_fn, (X, Y), X_test, Y, **options)  # noqa: E731
    else:
        decompose = lambda: em.decompose_adamw_training(model, trajectory, loss_fn, (X, Y), X_test, **options)  # noqa: E731
    gc.collect()
    exact_peak = _reset_peak_rss() and _proc_status_kb("VmRSS") is not None
    before = _proc_status_kb("VmRSS") if exact_peak else 0.0
    t0 = time.perf_counter()
    try:
        result = decompose()
    except em.MemoryBudgetError as error:
        return {"refused": str(error)}
    seconds = time.perf_counter() - t0
    peak = _proc_status_kb("VmHWM") if exact_peak else float("nan")
    kept = result.kernel.numel() * result.kernel.element_size()
    return {"peak_delta_mib": (peak - before) / 1024, "seconds": seconds, "plan": result.plan,
            "residual": result.relative_residual, "kept_mib": kept / MIB, "units": len(result.units)}


def run_row(cfg: Config, budget: str | None, by_class: bool, threads: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", json.dumps(asdict(cfg)), "--budget", str(budget),
           "--threads", str(threads)] + (["--by-class"] if by_class else [])
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--budget", default="None", help=argparse.SUPPRESS)
    parser.add_argument("--by-class", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.worker is not None:
        budget = None if args.budget == "None" else args.budget
        print(json.dumps(worker(Config(**json.loads(args.worker)), budget, args.by_class)))
        return 0

    cfg, rows = (QUICK, QUICK_ROWS) if args.quick else (FULL, FULL_ROWS)
    buffers = 2 * cfg.n_train * cfg.num_params * 8
    print(f"tanh MLP {cfg.inputs} → {cfg.width} → {cfg.outputs}: D = {cfg.num_params:,} parameters; N = {cfg.steps} "
          f"AdamW steps, M = {cfg.n_train} samples (batches of {cfg.batch}), X = {cfg.n_test} test inputs, "
          f"O = {cfg.outputs} outputs, float64, GL(4), keep (tensor, test, unit, output), torch threads {args.threads}")
    print(f"atomic tensor N·D·X·M·O = {cfg.atomic_bytes / 8:.3g} entries = {cfg.atomic_bytes / GIB:,.0f} GiB "
          f"(24 GiB machine: {cfg.atomic_bytes / (24 * GIB):,.0f}× too large); per-unit buffers and updates "
          f"2·M·D·8 B = {buffers / MIB:,.0f} MiB")
    print(f"  {'row':20s} {'peak Δ (MiB)':>12s} {'atomic / peak':>13s} {'time (s)':>9s} {'kept (MiB)':>10s} "
          f"{'max rel r':>9s}  plan")
    for label, budget, by_class in rows:
        r = run_row(cfg, budget, by_class, args.threads)
        if "refused" in r:
            print(f"  {label:20s} refused: {r['refused'][:160]}…")
            continue
        ratio = cfg.atomic_bytes / (r["peak_delta_mib"] * MIB) if r["peak_delta_mib"] > 0 else float("nan")
        print(f"  {label:20s} {r['peak_delta_mib']:12.0f} {ratio:13.3g} {r['seconds']:9.1f} {r['kept_mib']:10.3f} "
              f"{r['residual']:9.1e}  {r['plan']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
