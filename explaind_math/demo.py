"""The library's main job in one run: record a real AdamW training run, save and reload the
trajectory, decompose it (Theorem 3.1) and print the certified residual.

    python -m explaind_math demo [--steps 40] [--quadrature gauss_legendre:8] [--dtype float64]
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import TrajectoryRecorder, Trajectory, decompose_adamw_training, gauss_legendre, midpoint

__all__ = ["run_demo", "make_blobs"]


def make_blobs(num_samples: int, num_classes: int, dim: int, generator: torch.Generator, dtype=torch.float64):
    """Gaussian blobs: class c centred at a random point, unit noise. Returns X (M, dim), Y (M,)."""
    centres = 3.0 * torch.randn(num_classes, dim, generator=generator, dtype=dtype)
    Y = torch.arange(num_samples) % num_classes
    X = centres[Y] + torch.randn(num_samples, dim, generator=generator, dtype=dtype)
    return X, Y


def _parse_quadrature(spec: str):
    name, _, n = spec.partition(":")
    builders = {"gauss_legendre": gauss_legendre, "midpoint": midpoint}
    if name not in builders:
        raise SystemExit(f"unknown quadrature {name!r}; use gauss_legendre:N or midpoint:N")
    return builders[name](int(n or 8))


def run_demo(steps: int = 40, quadrature: str = "gauss_legendre:8", dtype: str = "float64", seed: int = 0) -> float:
    """Run the demo and return the certified max residual."""
    torch_dtype = {"float64": torch.float64, "float32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(seed)
    X, Y = make_blobs(96, 3, 6, g, dtype=torch_dtype)
    X_test, Y_test = make_blobs(4, 3, 6, g, dtype=torch_dtype)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.GELU(), nn.Linear(16, 3)).to(torch_dtype)

    # the user's own optimizer (two param groups), scheduler and training loop
    optimizer = torch.optim.AdamW(
        [
            {"params": model[0].parameters(), "lr": 3e-2, "weight_decay": 0.05},
            {"params": [*model[2].parameters(), *model[4].parameters()], "lr": 1e-2},
        ],
        betas=(0.9, 0.99),
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / steps)))
    recorder = TrajectoryRecorder(model, optimizer)
    print(f"training: 96 samples, batches of 16, {steps} AdamW steps, {sum(p.numel() for p in model.parameters())} parameters")
    t0 = time.perf_counter()
    for t in range(steps):
        ids = torch.randperm(96, generator=g)[:16]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(X[ids]), Y[ids])  # raw logits, mean over the batch
        loss.backward()
        recorder.record_batch(ids)  # weights 1/16 (mean reduction)
        optimizer.step()
        scheduler.step()
    train_time = time.perf_counter() - t0
    recorder.close()
    print(f"  final training loss {loss.item():.4f} ({train_time:.2f} s)")

    with tempfile.TemporaryDirectory() as tmp:
        path = recorder.trajectory().save(Path(tmp) / "run.safetensors")
        print(f"trajectory saved ({path.stat().st_size / 1e6:.2f} MB) and reloaded")
        trajectory = Trajectory.load(path)

    t0 = time.perf_counter()
    result = decompose_adamw_training(
        model, trajectory, lambda out, y: F.cross_entropy(out, y), (X, Y), X_test,
        quadrature=_parse_quadrature(quadrature), dtype=torch.float64,
    )
    decompose_time = time.perf_counter() - t0
    print(f"decomposition (Theorem 3.1, {quadrature}, float64): {decompose_time:.2f} s "
          f"= {decompose_time / train_time:.1f}× the training time")
    print(result.summary())

    x, o = 0, int(result.f_final[0].argmax())
    print(f"\nprediction: test input {x}, class {o} (true class {int(Y_test[x])})")
    print(f"  f(x; θ_0) = {float(result.f_initial[x, o]):+.6f}   f(x; θ_N) = {float(result.f_final[x, o]):+.6f}")
    print(f"  Σ kernel influence   = {float(result.kernel_sum()[x, o]):+.6f}")
    print(f"  Σ weight-decay infl. = {float(result.regularization_sum()[x, o]):+.6f}")
    print(f"  reconstruction       = {float(result.reconstruction[x, o]):+.6f}   residual {float(result.residual[x, o]):+.2e}")
    print("  most influential training samples (id, class, influence):")
    for i, score in result.top_units(x, o, k=5):
        print(f"    sample {i:3d}  class {int(Y[i])}  {score:+.6f}")
    print("  influence per parameter tensor:")
    for name, value in result.per_parameter(test=x, output=o).items():
        print(f"    {name:10s} {value:+.6f}")
    return result.max_residual


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="explaind_math demo", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--quadrature", default="gauss_legendre:8", help="gauss_legendre:N or midpoint:N")
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"], help="training dtype")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    residual = run_demo(args.steps, args.quadrature, args.dtype, args.seed)
    return 0 if math.isfinite(residual) else 1
