"""Trajectories on disk (issue 7, capability 4): what recording into a directory costs per step, and what
reading the trajectory from disk saves in resident memory during a decomposition.

One AdamW run of a tanh MLP (float64; by default 128-512-512-10, D ≈ 333k parameters, so each step
records θ_{t+1}, the second moment and the gradient: 8 MB a step, hundreds of MB in memory for the
whole run), each configuration in a FRESH subprocess so that peak resident memory is its own:

  recording, per optimizer step (the same training loop, timed after two warm-up steps):
    * no recorder;
    * TrajectoryRecorder in memory;
    * TrajectoryRecorder(directory=…, steps_per_shard=1) and (…, steps_per_shard=K): shards written,
      fsynced and renamed, then the manifest, as training runs (4 fsyncs per shard);
    * the same with write_in_background=True (a writer thread; training goes on during the fsyncs);

  decomposing the recorded run (keep=("step",): the influences themselves are small):
    * from memory: the trajectory materialized in memory (what an in-memory recorder holds);
    * from disk: ShardedTrajectory, shards opened memory-mapped, two kept open.

Printed: ms per step and the ratios to the bare loop; peak RSS (``ru_maxrss``), RSS before the
decomposition and the growth during it, and the disk/memory ratios; and that both decompositions are
identical (they must be bit for bit). Nothing about time is asserted: a shared machine's timings are
preliminary. The directory lives under --workdir (default: the system's temporary directory); the
cost of fsync depends on that file system.

    python benchmarks/bench_trajectory_shards.py [--steps 60] [--width 512] [--shard 10]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_partition_memory import _current_rss_mib, _maxrss_mib  # noqa: E402  (RSS helpers of the same suite)

INPUTS, CLASSES, SAMPLES, BATCH, TESTS = 128, 10, 32, 8, 4


def _setup(args):
    import torch
    from torch import nn

    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    X = torch.randn(SAMPLES, INPUTS, generator=g, dtype=torch.float64)
    Y = torch.randint(0, CLASSES, (SAMPLES,), generator=g)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(INPUTS, args.width), nn.Tanh(), nn.Linear(args.width, args.width), nn.Tanh(),
                          nn.Linear(args.width, CLASSES)).double()
    return model, X, Y


def child_record(args) -> None:
    import torch
    import torch.nn.functional as F

    import explaind_math as em

    model, X, Y = _setup(args)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    mode = args.child
    recorder = None
    if mode == "memory":
        recorder = em.TrajectoryRecorder(model, opt)
    elif mode.startswith("directory"):
        recorder = em.TrajectoryRecorder(model, opt, directory=args.directory, steps_per_shard=int(mode.split("-")[1]),
                                         write_in_background=mode.endswith("background"))
    g = torch.Generator().manual_seed(1)
    warmup, t0 = 2, None
    for t in range(args.steps):
        if t == warmup:
            t0 = time.perf_counter()
        ids = torch.randperm(SAMPLES, generator=g)[:BATCH]
        opt.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        if recorder is not None:
            recorder.record_batch(ids)
        opt.step()
    if recorder is not None:
        recorder.close()  # with a directory: writes the last, partial shard (inside the timed loop's cost)
    per_step = (time.perf_counter() - t0) / (args.steps - warmup)
    disk = 0
    if mode.startswith("directory"):
        disk = sum(os.path.getsize(os.path.join(args.directory, f)) for f in os.listdir(args.directory))
    in_memory = 0
    if mode == "memory":
        traj = recorder.trajectory()
        in_memory = sum(v.numel() * v.element_size() for p in traj.parameters for v in p.values())
        for s in traj.steps:
            in_memory += sum(v.numel() * v.element_size() for v in (s.gradient or {}).values())
            in_memory += sum(v.numel() * v.element_size() for st in s.state.values() for v in st.values()
                             if isinstance(v, torch.Tensor))
    print(json.dumps({"mode": mode, "ms_per_step": 1e3 * per_step, "peak_mib": _maxrss_mib(), "disk_bytes": disk,
                      "trajectory_bytes": in_memory,
                      "parameters": sum(p.numel() for p in model.parameters())}))


def child_decompose(args) -> None:
    import torch.nn.functional as F
    from safetensors.torch import save_file

    import explaind_math as em

    model, X, Y = _setup(args)
    trajectory = em.ShardedTrajectory(args.directory)
    if args.child == "from-memory":
        trajectory = trajectory.to_memory()  # every tensor copied into memory, as an in-memory recorder holds it
    before = _current_rss_mib()
    t0 = time.perf_counter()
    result = em.decompose_adamw_training(model, trajectory, F.cross_entropy, (X, Y), X[:TESTS], keep=("step",),
                                         quadrature=em.gauss_legendre(4))
    seconds = time.perf_counter() - t0
    save_file({"kernel": result.kernel.contiguous(), "residuals": result.step_residuals.contiguous()}, args.out)
    print(json.dumps({"mode": args.child, "rss_before_mib": before, "peak_mib": _maxrss_mib(), "seconds": seconds,
                      "relative_residual": result.relative_residual,
                      "shards_read": getattr(trajectory, "shards_read", None)}))


def _run(args, child: str, **extra) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", child, "--steps", str(args.steps),
           "--width", str(args.width), "--threads", str(args.threads)]
    for k, v in extra.items():
        cmd += [f"--{k}", str(v)]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stdout + done.stderr)
        raise SystemExit(f"the {child} child failed (exit {done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


def parent(args) -> None:
    from safetensors.torch import load_file

    shard_k = f"directory-{args.shard}"
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        rec = {}
        for mode in ("none", "memory", "directory-1", shard_k, "directory-1-background", f"{shard_k}-background"):
            directory = os.path.join(tmp, mode)
            rec[mode] = _run(args, mode, directory=directory)
        dec = {}
        outs = {}
        for mode in ("from-memory", "from-disk"):
            outs[mode] = os.path.join(tmp, f"{mode}.safetensors")
            dec[mode] = _run(args, mode, directory=os.path.join(tmp, "directory-1"), out=outs[mode])
        a, b = load_file(outs["from-memory"]), load_file(outs["from-disk"])
        identical = all(bool((a[k] == b[k]).all()) for k in a)

    D = rec["none"]["parameters"]
    base = rec["none"]["ms_per_step"]
    print(f"tanh MLP {INPUTS}-{args.width}-{args.width}-{CLASSES}, float64, D = {D:,} parameters; AdamW, "
          f"{args.steps} steps of {BATCH} samples; {args.threads} thread(s)")
    print(f"in-memory trajectory: {rec['memory']['trajectory_bytes'] / 2**20:.0f} MiB "
          f"(θ_0..θ_N, second moments, gradients); on disk: {rec['directory-1']['disk_bytes'] / 2**20:.0f} MiB")
    print()
    print(f"{'recording':34s} {'ms/step':>9s} {'× bare loop':>12s} {'× in memory':>12s} {'peak RSS':>10s}")
    for mode, label in (("none", "no recorder"), ("memory", "in memory"),
                        ("directory-1", "directory, 1 step per shard"),
                        (shard_k, f"directory, {args.shard} steps per shard"),
                        ("directory-1-background", "  same, written in background"),
                        (f"{shard_k}-background", f"  {args.shard} per shard, in background")):
        r = rec[mode]
        print(f"{label:34s} {r['ms_per_step']:9.2f} {r['ms_per_step'] / base:12.2f} "
              f"{r['ms_per_step'] / rec['memory']['ms_per_step']:12.2f} {r['peak_mib']:8.0f} M")
    print()
    print(f"{'decomposition (keep=step)':34s} {'RSS before':>11s} {'peak RSS':>10s} {'growth':>9s} {'seconds':>9s} "
          f"{'residual':>9s}")
    for mode, label in (("from-memory", "trajectory in memory"), ("from-disk", "trajectory on disk (mmap)")):
        r = dec[mode]
        print(f"{label:34s} {r['rss_before_mib']:9.0f} M {r['peak_mib']:8.0f} M "
              f"{r['peak_mib'] - r['rss_before_mib']:7.0f} M {r['seconds']:9.2f} {r['relative_residual']:9.1e}")
    m, d = dec["from-memory"], dec["from-disk"]
    print(f"peak RSS disk / memory: {d['peak_mib'] / m['peak_mib']:.2f}  "
          f"({d['peak_mib']:.0f} MiB vs {m['peak_mib']:.0f} MiB); time disk / memory: {d['seconds'] / m['seconds']:.2f}; "
          f"shards opened from disk: {d['shards_read']}")
    print(f"the two decompositions are identical (bit for bit): {identical}")
    if not identical:
        raise SystemExit("the decomposition from disk differs from the one from memory")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--shard", type=int, default=10, help="steps per shard of the second directory run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None, help="where the trajectory directories are written")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--directory", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child in ("from-memory", "from-disk"):
        child_decompose(args)
    elif args.child:
        child_record(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
