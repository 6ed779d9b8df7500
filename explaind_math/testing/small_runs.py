"""A small recorded AdamW run on Gaussian blobs, shared by the analysis and plot tests."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..demo import make_blobs
from ..recording import TrajectoryRecorder


def blob_loss(out: torch.Tensor, y) -> torch.Tensor:
    """The per-sample loss of :func:`recorded_blob_run`: cross-entropy on raw logits."""
    return F.cross_entropy(out, y)


def recorded_blob_run(seed: int, num_test: int, steps: int = 6):
    """A tanh MLP (4 → 6 → 3, float64) trained by AdamW (lr 3e-2, weight decay 0.1) for ``steps`` steps
    on 24 blob samples in batches of 8, recorded. Returns (model, trajectory, (X, Y), X_test)."""
    g = torch.Generator().manual_seed(seed)
    X, Y = make_blobs(24, 3, 4, g)
    X_test, _ = make_blobs(num_test, 3, 4, g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-2, weight_decay=0.1)
    recorder = TrajectoryRecorder(model, optimizer)
    for _ in range(steps):
        ids = torch.randperm(24, generator=g)[:8]
        optimizer.zero_grad()
        blob_loss(model(X[ids]), Y[ids]).backward()
        recorder.record_batch(ids)
        optimizer.step()
    recorder.close()
    return model, recorder.trajectory(), (X, Y), X_test
