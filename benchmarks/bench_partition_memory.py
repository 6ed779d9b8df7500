"""Peak memory of Corollary F.2: momentum buffers per group (K·D) instead of per sample (M·D).

One AdamW run of a small tanh MLP (D = 2,762 parameters) over M = 10,000 training samples in
10 batches of 1,000 that together touch every sample, decomposed twice, each time in a FRESH subprocess:

  * ``partition=None``   — one momentum buffer per training sample: M·D floats;
  * ``partition=labels`` — one buffer per class (K = 10): K·D floats (Corollary F.2).

Both keep only ("step", "param") (plus test and output, always kept), so the influence tensor itself is
tiny and the difference is the buffers. Each child reports its peak resident set size
(``resource.getrusage(RUSAGE_SELF).ru_maxrss``), the RSS before decomposing (after imports, data and
training, identical in both), the certified residual and the influence tensor; the parent prints one
table with both peaks, their ratio, the growth during the decomposition, and the theoretical buffer
sizes M·D vs K·D. No timed assertions; it checks only that both decompositions are exact and agree.

    python benchmarks/bench_partition_memory.py [--samples 10000] [--classes 10] [--batch 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

HIDDEN = 64
INPUTS = 32


def _maxrss_mib() -> float:
    """Peak RSS of this process in MiB (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024


def _current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: fall back to the peak
        return _maxrss_mib()


def child(args) -> None:
    import torch
    import torch.nn.functional as F
    from torch import nn

    import explaind_math as em

    torch.set_num_threads(1)  # one thread: stable on a small, possibly shared machine
    dtype = torch.float64
    g = torch.Generator().manual_seed(0)
    M, K = args.samples, args.classes
    X = torch.randn(M, INPUTS, generator=g, dtype=dtype)
    centers = torch.randn(K, INPUTS, generator=g, dtype=dtype)
    Y = (X @ centers.T).argmax(-1)  # K classes
    X_test = torch.randn(args.tests, INPUTS, generator=g, dtype=dtype)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(INPUTS, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, K)).to(dtype)
    D = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.01)
    recorder = em.TrajectoryRecorder(model, opt)
    order = torch.randperm(M, generator=g)
    t0 = time.perf_counter()
    for start in range(0, M, args.batch):  # batches that together touch every training sample
        ids = order[start : start + args.batch]
        opt.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        recorder.record_batch(ids)
        opt.step()
    recorder.close()
    train_s = time.perf_counter() - t0
    trajectory = recorder.trajectory()
    assert len(trajectory.sample_ids()) == M

    loss_fn = lambda out, y: F.cross_entropy(out, y)  # noqa: E731
    partition = None if args.config == "per-sample" else Y
    before = _current_rss_mib()
    peak_before = _maxrss_mib()
    t0 = time.perf_counter()
    result = em.decompose_by_partition(model, trajectory, loss_fn, (X, Y), X_test, partition,
                                       keep=("step", "param"), train_chunk_size=args.chunk)
    decompose_s = time.perf_counter() - t0
    peak = _maxrss_mib()
    torch.save(result.kernel_sum(("step", "param", "test", "output")), args.out)
    print(json.dumps({
        "config": args.config, "D": D, "M": M, "K": K, "steps": trajectory.num_steps,
        "rss_before_mib": before, "peak_before_mib": peak_before, "peak_mib": peak,
        "relative_residual": result.relative_residual, "train_s": train_s, "decompose_s": decompose_s,
        "kernel_shape": list(result.kernel.shape),
    }))


def parent(args) -> None:
    import torch

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        outs = {}
        for config in ("per-sample", "by-class"):
            outs[config] = os.path.join(tmp, f"{config}.pt")
            cmd = [sys.executable, os.path.abspath(__file__), "--child", config, "--out", outs[config],
                   "--samples", str(args.samples), "--classes", str(args.classes), "--batch", str(args.batch),
                   "--tests", str(args.tests), "--chunk", str(args.chunk)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                sys.stderr.write(done.stdout + done.stderr)
                raise SystemExit(f"the {config} child failed (exit {done.returncode})")
            rows[config] = json.loads(done.stdout.strip().splitlines()[-1])
        agree = float((torch.load(outs["per-sample"]) - torch.load(outs["by-class"])).abs().max())

    a, b = rows["per-sample"], rows["by-class"]
    D, M, K = a["D"], a["M"], a["K"]
    float_bytes = 8  # float64
    print(f"tanh MLP {INPUTS}-{HIDDEN}-{K}: D = {D:,} parameters; M = {M:,} training samples in "
          f"{a['steps']} AdamW steps of {args.batch}; K = {K} classes; {args.tests} test inputs; "
          f"keep=('step', 'param'); float64")
    print()
    header = (f"{'configuration':34s} {'buffer floats':>14s} {'buffer MiB':>11s} {'RSS before':>11s} "
              f"{'peak RSS':>10s} {'growth':>10s} {'decompose':>10s} {'residual':>10s}")
    print(header)
    print("-" * len(header))
    for label, row, units in (("per-sample buffers (partition=None)", a, M), (f"per-class buffers (K = {K})", b, K)):
        floats = units * D
        print(f"{label:34s} {floats:14,d} {floats * float_bytes / 2**20:11.2f} {row['rss_before_mib']:9.0f} M "
              f"{row['peak_mib']:8.0f} M {row['peak_mib'] - row['rss_before_mib']:8.0f} M "
              f"{row['decompose_s']:8.1f} s {row['relative_residual']:10.1e}")
    print()
    growth_a = a["peak_mib"] - a["rss_before_mib"]
    growth_b = b["peak_mib"] - b["rss_before_mib"]
    print(f"peak RSS ratio per-sample / per-class:                 {a['peak_mib'] / b['peak_mib']:.2f}x")
    print(f"growth during the decomposition, per-sample / per-class: "
          f"{growth_a / max(growth_b, 1e-9):.1f}x  ({growth_a:.0f} MiB vs {growth_b:.0f} MiB)")
    print(f"theoretical buffer ratio M·D / K·D = M / K:            {M / K:,.0f}x  "
          f"({M * D * float_bytes / 2**20:.1f} MiB vs {K * D * float_bytes / 2**20:.3f} MiB per buffer set)")
    print(f"max |difference| of the (step, param, test, output) influences between the two: {agree:.1e}")
    print(f"common to both: each step's per-sample gradients, B·D = {args.batch * D:,} floats "
          f"({args.batch * D * float_bytes / 2**20:.1f} MiB), held in a few copies while a step is processed;")
    print("the per-sample run also holds a few M·D arrays at once (the buffers and the step's unit updates)")
    if max(a["relative_residual"], b["relative_residual"]) > 1e-9 or agree > 1e-9:
        raise SystemExit("a decomposition was not exact, or the two disagree")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=10_000)
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--tests", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=500, help="train_chunk_size of the per-sample-gradient vmap")
    parser.add_argument("--child", choices=("per-sample", "by-class"), help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.config = args.child
        child(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
