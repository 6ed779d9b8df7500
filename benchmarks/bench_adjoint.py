"""Forward (MATH.md §4) vs adjoint (§12) accumulation: time and peak memory, kept per sample and per tensor.

    python benchmarks/bench_adjoint.py --quick                 # a minute: both scalings, both modes, batch paths
    python benchmarks/bench_adjoint.py                         # larger sizes
    python benchmarks/bench_adjoint.py --mnist [--steps 40]    # 60,000 MNIST-shaped samples, one epoch (937 steps)
    python benchmarks/bench_adjoint.py --speedup               # the same MLP where forward still fits: N = 8 steps

Timings: every comparison runs interleaved in one process (the modes alternate, best of ``--repeats``), and the
tables report ratios; the machines this project runs on are shared (2 cores, other test runs at the same time),
so absolute seconds are noisy and only ratios within one run mean much. Peak memory: each configuration once more
in a fresh subprocess, the peak resident set during the decomposition (VmHWM, reset just before, glibc told to
map tensors above 128 KiB separately, as ``bench_memory.py``) minus the resident set before it.

Tables: (1) M doubles with N · B fixed (N steps of B samples drawn from M): forward touches every unit seen so far
at every step, the adjoint only the batch: its time per step is flat in M and its memory too; (2) N doubles with B
fixed: the adjoint's total is linear in N; (3) the adjoint's two ways to contract a batch with the covectors
(``batch_contraction``: per-sample gradients + matrix product vs JVPs of the per-sample losses). ``--mnist``: an
MLP (784 → 128 → 10, 101,770 parameters) trained one epoch with AdamW on 60,000 synthetic samples of MNIST's
shape, recorded to disk; forward refused by the memory budget, the adjoint within 4 GiB; with ``--steps k`` only
the first k steps (the total is then extrapolated, and labelled so).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import explaind_math as em  # noqa: E402
from bench_memory import _proc_status_kb, _reset_peak_rss  # noqa: E402

QUADRATURE = em.gauss_legendre(4)


def loss_fn(out, y):
    return F.cross_entropy(out, y)


def record(samples: int, batch: int, steps: int, hidden: int, inputs: int, classes: int, seed: int = 0,
           directory: str | None = None):
    """Train N AdamW steps of B samples (an epoch's permutation, then the next) and record them."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(samples, inputs, generator=g, dtype=torch.float64)
    Y = torch.randint(0, classes, (samples,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(inputs, hidden), nn.Tanh(), nn.Linear(hidden, classes)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    recorder = em.TrajectoryRecorder(model, optimizer, **({"directory": directory, "steps_per_shard": 50}
                                                          if directory else {}))
    order = torch.cat([torch.randperm(samples, generator=g) for _ in range(-(-steps * batch // samples))])
    t0 = time.perf_counter()
    for t in range(steps):
        ids = order[t * batch:(t + 1) * batch]
        optimizer.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        recorder.record_batch(ids)
        optimizer.step()
    recorded_step = (time.perf_counter() - t0) / steps
    trajectory = recorder.trajectory()
    recorder.close()
    t0 = time.perf_counter()
    for t in range(min(steps, 50)):  # the plain training step, without the recorder
        ids = order[t * batch:(t + 1) * batch]
        optimizer.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
    train_step = (time.perf_counter() - t0) / min(steps, 50)
    X_test = torch.randn(10, inputs, generator=g, dtype=torch.float64)
    return model, trajectory, (X, Y), X_test, {"train_step_s": train_step, "recorded_step_s": recorded_step}


def decompose(run, mode: str, budget: str | None = None, batch_contraction: str = "auto", **kw):
    model, trajectory, data, xs, _ = run
    return em.decompose_adamw_training(model, trajectory, loss_fn, data, xs, keep=("param", "unit"),
                                       quadrature=QUADRATURE, accumulation=mode, memory_budget=budget,
                                       batch_contraction=batch_contraction, **kw)


def interleaved(runs: dict, variants: dict, repeats: int) -> dict:
    """Best-of-``repeats`` seconds of every (run, variant), the variants alternating within each round."""
    best = {(r, v): float("inf") for r in runs for v in variants}
    residual = {}
    for k in range(repeats):
        for r, run in runs.items():
            order = list(variants) if k % 2 == 0 else list(reversed(variants))
            for v in order:
                t0 = time.perf_counter()
                result = variants[v](run)
                best[r, v] = min(best[r, v], time.perf_counter() - t0)
                residual[r, v] = result.relative_residual
    return {"seconds": best, "residual": residual}


def peak_worker(args: list) -> dict:
    """One decomposition in this fresh process: peak RSS above the RSS before it."""
    size, mode, batch_contraction, budget = args
    run = record(*size)
    gc.collect()
    exact = _reset_peak_rss()
    before = _proc_status_kb("VmRSS")
    t0 = time.perf_counter()
    try:
        result = decompose(run, mode, budget, batch_contraction)
    except em.MemoryBudgetError as error:
        return {"refused": str(error)}
    out = {"seconds": time.perf_counter() - t0, "residual": result.relative_residual, "ran": result.accumulation,
           "peak_delta_mib": (_proc_status_kb("VmHWM") - before) / 1024 if exact else float("nan"),
           "peak_mib": _proc_status_kb("VmHWM") / 1024, "notes": result.notes}
    return out


def in_subprocess(*args) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}
    out = subprocess.run([sys.executable, __file__, "--one", json.dumps(list(args))], capture_output=True, text=True,
                         env=env)
    return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-800:]}


def scaling_tables(quick: bool, repeats: int) -> None:
    hidden, inputs, classes, B = (16, 8, 3, 8) if quick else (128, 32, 4, 32)
    NB = 64 if quick else 1024
    Ms = (16, 32, 64) if quick else (256, 512, 1024)
    Ns = (2, 4, 8) if quick else (8, 16, 32)
    m_sizes = [(M, B, NB // B, hidden, inputs, classes) for M in Ms]  # M doubles, N · B fixed (M ≤ N · B)
    n_sizes = [(N * B, B, N, hidden, inputs, classes) for N in Ns]  # N doubles, B fixed, every sample once
    sizes = list(dict.fromkeys(m_sizes + n_sizes))
    D = inputs * hidden + hidden + hidden * classes + classes
    print(f"MLP {inputs}-{hidden}-{classes} (D = {D}), AdamW, float64, 10 test inputs × {classes} outputs, "
          f"keep=('param', 'unit'), gauss_legendre(4); best of {repeats}, the modes alternating")
    runs = {size: record(*size) for size in sizes}
    variants = {"forward": lambda r: decompose(r, "forward"), "adjoint": lambda r: decompose(r, "adjoint")}
    timed = interleaved(runs, variants, repeats)
    peaks = {(size, m): in_subprocess(size, m, "auto", None).get("peak_delta_mib", float("nan"))
             for size in sizes for m in ("forward", "adjoint")}
    for title, rows in (("M doubles, N · B fixed", m_sizes), ("N doubles, B fixed", n_sizes)):
        print(f"\n{title}\n\n| M | N | B | forward s | adjoint s | adjoint ms/step | forward / adjoint | "
              "forward Δpeak MiB | adjoint Δpeak MiB | adjoint residual |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for size in rows:
            f, a = timed["seconds"][size, "forward"], timed["seconds"][size, "adjoint"]
            print(f"| {size[0]} | {size[2]} | {size[1]} | {f:.2f} | {a:.2f} | {a / size[2] * 1e3:.0f} | {f / a:.2f} | "
                  f"{peaks[size, 'forward']:.1f} | {peaks[size, 'adjoint']:.1f} | {timed['residual'][size, 'adjoint']:.1e} |")
    # the batch contraction of the adjoint: per-sample gradients vs JVPs of the per-sample losses
    batch_runs = {size: runs[size] for size in (m_sizes[0], m_sizes[-1])}
    ways = {way: (lambda r, way=way: decompose(r, "adjoint", batch_contraction=way)) for way in ("gradients", "jvp")}
    timed = interleaved(batch_runs, ways, repeats)
    print("\nthe adjoint's batch contraction\n\n| M | N | B | by gradients s | by JVP s | JVP / gradients |")
    print("|---|---|---|---|---|---|")
    for size in batch_runs:
        g, j = timed["seconds"][size, "gradients"], timed["seconds"][size, "jvp"]
        print(f"| {size[0]} | {size[2]} | {size[1]} | {g:.2f} | {j:.2f} | {j / g:.2f} |")


def speedup(repeats: int, steps: int = 8) -> None:
    """The MNIST-shaped MLP (D = 101,770, 10 test inputs × 10 outputs) on a size the forward mode holds: N steps of
    64, every sample once (M = 64 N); forward and adjoint interleaved in this process."""
    size = (64 * steps, 64, steps, 128, 784, 10)
    run = {size: record(*size)}
    timed = interleaved(run, {"forward": lambda r: decompose(r, "forward"), "adjoint": lambda r: decompose(r, "adjoint")},
                        repeats)
    f, a = timed["seconds"][size, "forward"], timed["seconds"][size, "adjoint"]
    print(f"\nMNIST shape, M = {size[0]}, N = {steps}, B = 64: forward {f:.1f} s, adjoint {a:.1f} s "
          f"({a / steps:.2f} s/step), speed-up of the adjoint {f / a:.1f}x; residuals "
          f"{timed['residual'][size, 'forward']:.1e} / {timed['residual'][size, 'adjoint']:.1e}")


def mnist(steps: int | None, directory: str | None) -> None:
    N = 60000 // 64  # 937 full batches of 64: one epoch (the last 32 samples left out)
    k = steps or N
    size = (60000, 64, k, 128, 784, 10)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        t0 = time.perf_counter()
        run = record(*size, directory=str(Path(tmp) / "trajectory"))
        recording = time.perf_counter() - t0
        D = sum(p.numel() for p in run[0].parameters())
        print(f"MLP 784-128-10: D = {D} parameters; {k} of {N} AdamW steps of 64 recorded to disk in {recording:.1f} s "
              f"(training step {run[4]['train_step_s'] * 1e3:.1f} ms, with the recorder {run[4]['recorded_step_s'] * 1e3:.1f} ms)")
        print(f"forward would hold 2 × 60,000 units × {D} parameters × 8 B = {2 * 60000 * D * 8 / 2**30:.1f} GiB "
              "of per-unit buffers and updates")
        if k < N:
            print(f"forward not tried: a prefix of {k} steps touches only {k * 64} units (the full epoch is refused)")
        else:
            try:
                decompose(run, "forward", "24GiB")
                print("forward: ran (unexpected)")
            except em.MemoryBudgetError as error:
                print(f"forward with memory_budget='24GiB': refused: {str(error)[:400]}")
        gc.collect()
        exact = _reset_peak_rss()
        before = _proc_status_kb("VmRSS")
        t0 = time.perf_counter()
        result = decompose(run, "auto", "4GiB", progress=True)
        seconds = time.perf_counter() - t0
        peak = _proc_status_kb("VmHWM") / 1024
        print(json.dumps({"steps": k, "ran": result.accumulation, "reason": result.accumulation_reason[:200],
                          "seconds": seconds, "per_step_s": seconds / k, "per_step_over_train_step":
                          seconds / k / run[4]["train_step_s"], "peak_mib": peak,
                          "peak_delta_mib": (peak * 1024 - before) / 1024 if exact else None,
                          "relative_residual": result.relative_residual, "max_replay_error": max(result.replay_errors),
                          "kernel_shape": list(result.kernel.shape), "plan": result.plan, "notes": result.notes}))
        if k < N:
            print(f"EXTRAPOLATED (measured {k} of {N} steps): one epoch ≈ {seconds / k * N / 60:.1f} min")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--mnist", action="store_true")
    parser.add_argument("--speedup", action="store_true", help="forward vs adjoint on the MNIST-shaped MLP, N = 8")
    parser.add_argument("--steps", type=int, default=None, help="--mnist: only the first k steps (extrapolated)")
    parser.add_argument("--dir", default=None, help="--mnist: where the trajectory is written (a temporary folder)")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--one")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: up to 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads or max(1, min(2, os.cpu_count() or 1)))
    if args.one:
        print(json.dumps(peak_worker(json.loads(args.one))))
        return
    print("shared machine (2 cores, other test runs at the same time): compare ratios within this run")
    if args.speedup:
        speedup(args.repeats, args.steps or 8)
    elif args.mnist:
        mnist(args.steps, args.dir)
    else:
        scaling_tables(args.quick, args.repeats)


if __name__ == "__main__":
    main()
