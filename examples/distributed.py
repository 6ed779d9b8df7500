"""Decompose one training run with the steps split across processes (MATH.md §11; issue 7).

    torchrun --standalone --nproc_per_node 2 examples/distributed.py            # gloo on CPU
    torchrun --standalone --nproc_per_node 4 examples/distributed.py --backend nccl   # one GPU per process

Rank 0 trains a small tanh MLP with AdamW and records it to a trajectory directory (one safetensors shard per
step, written as training runs); every rank then opens that directory (memory-mapped: a rank reads only the
shards of its own steps) and calls the theorem function with ``distributed=True``. The buffers of AdamW's
first moment are carried across the block boundaries by an exact scan, so every rank gets the same result
as one process would; rank 0 checks that against a single-process decomposition and prints both residuals.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import explaind_math as em


def loss_fn(out, y):
    return F.cross_entropy(out, y)


def data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(96, 8, generator=g, dtype=torch.float64)
    Y = (X[:, :3].sum(1) > 0).long() + (X[:, 3] > 1).long()
    return X, Y, torch.randn(6, 8, generator=g, dtype=torch.float64)


def model_of(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)).double()


def record(directory: str, steps: int) -> None:
    X, Y, _ = data()
    model = model_of()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.02, weight_decay=0.1)
    g = torch.Generator().manual_seed(1)
    with em.TrajectoryRecorder(model, optimizer, directory=directory) as recorder:
        for _ in range(steps):
            ids = torch.randperm(X.shape[0], generator=g)[:16]
            optimizer.zero_grad()
            loss_fn(model(X[ids]), Y[ids]).backward()
            recorder.record_batch(ids)
            optimizer.step()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--backend", default="gloo", choices=["gloo", "nccl"])
    parser.add_argument("--directory", default=None, help="trajectory directory (default: a temporary one)")
    args = parser.parse_args(argv)
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if args.backend == "nccl" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    holder = [args.directory or (tempfile.mkdtemp(prefix="explaind-distributed-") if rank == 0 else None)]
    dist.broadcast_object_list(holder, src=0)
    directory = holder[0]
    try:
        if rank == 0:
            record(directory, args.steps)
        dist.barrier()
        X, Y, X_test = data()
        model = model_of().to(device)
        trajectory = em.Trajectory.load(directory)
        options = dict(keep=("step", "param", "unit"), params="tensor", quadrature=em.gauss_legendre(6),
                       device=device, dtype=torch.float64)
        split = em.decompose_adamw_training(model, trajectory, loss_fn, (X, Y), X_test, distributed=True, **options)
        if rank == 0:
            single = em.decompose_adamw_training(model, trajectory, loss_fn, (X, Y), X_test, **options)
            difference = float((split.kernel - single.kernel).abs().max())
            print(f"{world} ranks, {trajectory.num_steps} steps split {[len(range(s, e)) for s, e in _blocks(trajectory.num_steps, world)]}")
            print(split.summary())
            print(f"max |I(ranks) − I(one process)| = {difference:.2e} over {split.kernel.numel()} scores "
                  f"(single-process residual {single.max_residual:.2e})")
        dist.barrier()
    finally:
        if rank == 0 and args.directory is None:
            shutil.rmtree(directory, ignore_errors=True)
        dist.destroy_process_group()
    return 0


def _blocks(num_steps: int, world: int):
    from explaind_math.engine.distributed import block_of_rank

    return [(b.start, b.stop) for b in (block_of_rank(num_steps, world, r) for r in range(world))]


if __name__ == "__main__":
    raise SystemExit(main())
