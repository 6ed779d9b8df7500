"""Speed of the exact core, as ratios measured in one run (no timed assertions anywhere).

For each model: train with the user's optimizer while recording, then decompose the same run
(per training sample and parameter tensor, all steps) with
  * Gauss–Legendre with 8 nodes (the library's default),
  * the paper's midpoint rule with 100 nodes (its Table 1 setting),
and print: wall times, time ratio midpoint(100) / GL(8), decomposition time / training time, and the
certified max residual of each — equal or better residual at a fraction of the cost is the claim.

    python benchmarks/bench_core.py [--repeats 3] [--dtype float64|float32]
"""

from __future__ import annotations

import argparse
import copy
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em


class TinyTransformer(nn.Module):
    """One attention layer + MLP on two tokens (a + b mod p), the paper's grokking architecture scaled down."""

    def __init__(self, p: int = 11, d: int = 16, heads: int = 2, width: int = 32):
        super().__init__()
        self.embed = nn.Embedding(p, d)
        self.pos = nn.Parameter(0.1 * torch.randn(2, d))
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(d, width), nn.GELU(), nn.Linear(width, d))
        self.unembed = nn.Linear(d, p)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos
        h = h + self.attn(h, h, h, need_weights=False)[0]
        h = h + self.mlp(h)
        return self.unembed(h[:, -1])


def mlp_case(dtype):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(64, 8, generator=g, dtype=dtype)
    Y = (X[:, 0] > 0).long() + (X[:, 1] > 0).long()
    model = nn.Sequential(nn.Linear(8, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).to(dtype)
    return "tanh MLP (1,443 params)", model, X, Y, X[:8]


def transformer_case(dtype, p: int = 11):
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    X = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
    Y = (X[:, 0] + X[:, 1]) % p
    torch.manual_seed(0)
    model = TinyTransformer(p).to(dtype)
    n = sum(q.numel() for q in model.parameters())
    return f"1-layer Transformer, mod {p} ({n:,} params)", model, X[:64], Y[:64], X[64:72]


def _train(model, X, Y, steps, batch, recorder_on: bool):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    recorder = em.TrajectoryRecorder(model, optimizer) if recorder_on else None
    g = torch.Generator().manual_seed(1)
    t0 = time.perf_counter()
    for _ in range(steps):
        ids = torch.randperm(X.shape[0], generator=g)[:batch]
        optimizer.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        if recorder is not None:
            recorder.record_batch(ids)
        optimizer.step()
    return time.perf_counter() - t0, recorder


def run(case, dtype, steps: int, batch: int, repeats: int):
    name, model, X, Y, X_test = case
    _train(copy.deepcopy(model), X, Y, 2, batch, False)  # warm-up: first-call costs are not training
    bare_time, _ = _train(copy.deepcopy(model), X, Y, steps, batch, False)
    train_time, recorder = _train(model, X, Y, steps, batch, True)
    trajectory = recorder.trajectory()
    loss_fn = lambda out, y: F.cross_entropy(out, y)
    rows = {}
    for label, quad in (("gauss_legendre(8)", em.gauss_legendre(8)), ("midpoint(100)", em.midpoint(100))):
        em.decompose_adamw_training(model, trajectory, loss_fn, (X, Y), X_test[:1], quadrature=em.gauss_legendre(1))
        best, result = float("inf"), None
        for _ in range(repeats if label.startswith("gauss") else 1):
            t0 = time.perf_counter()
            result = em.decompose_adamw_training(model, trajectory, loss_fn, (X, Y), X_test, quadrature=quad)
            best = min(best, time.perf_counter() - t0)
        rows[label] = (best, result.max_residual)
    gl, mp = rows["gauss_legendre(8)"], rows["midpoint(100)"]
    print(f"\n{name}: {steps} AdamW steps, batches of {batch}, {X_test.shape[0]} test inputs, {dtype}")
    print(f"  training {bare_time:.3f} s bare, {train_time:.3f} s recorded "
          f"(recording overhead {train_time / bare_time:.2f}×)")
    print(f"  {'rule':20s} {'time (s)':>10s} {'max residual':>14s} {'÷ training':>11s}")
    for label, (t, r) in rows.items():
        print(f"  {label:20s} {t:10.3f} {r:14.3e} {t / bare_time:11.1f}")
    print(f"  speed-up of GL(8) over midpoint(100): {mp[0] / gl[0]:.1f}×, residual ratio "
          f"midpoint/GL = {mp[1] / max(gl[1], 1e-300):.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    args = parser.parse_args()
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    # nn.MultiheadAttention's fused CPU kernel has no vmap rule yet; torch falls back (correct, slower)
    warnings.filterwarnings("ignore", message="There is a performance drop")
    run(mlp_case(dtype), dtype, steps=20, batch=16, repeats=args.repeats)
    run(transformer_case(dtype), dtype, steps=20, batch=16, repeats=args.repeats)


if __name__ == "__main__":
    main()
