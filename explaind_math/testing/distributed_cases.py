"""Recorded runs that exercise the block scan of :mod:`explaind_math.engine.distributed`, and their decompositions.

Each case is deterministic (seeded, float64), so a torchrun worker and the single-process test rebuild the
same trajectory independently. The cases cover what crosses a block boundary: SGD momentum switched on
mid-run (the buffer is created inside a block, undamped), dampening and two parameter groups, Nesterov, an
AdamW first moment, optimizer state carried in from before the recording, an adaptive quadrature, every
contraction path (Jacobian with units kept, JVP with steps kept, steps summed by all_reduce), and a run with
fewer steps than ranks.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em

from ..demo import make_blobs

__all__ = ["CASES", "record_case", "decompose_case"]

#: name → (optimizer, steps, keep, quadrature, warm-up steps before recording)
CASES: dict[str, dict[str, Any]] = {
    "sgd_momentum_switched_on": dict(optimizer="sgd", steps=5, keep=("step", "param", "unit"), warmup=0),
    "sgd_nesterov_steps_summed": dict(optimizer="nesterov", steps=4, keep=("param", "unit"), warmup=0),
    "adamw_carried_state_jvp": dict(optimizer="adamw", steps=5, keep=("step",), warmup=2),
    "adamw_adaptive_per_tensor": dict(optimizer="adamw", steps=3, keep=("step", "param"), warmup=0, adaptive=True),
    "adamw_one_step": dict(optimizer="adamw", steps=1, keep=("step", "param", "unit"), warmup=0),
    # the adjoint (MATH.md §12): λ carried across the block boundary by the reverse scan
    "adjoint_adamw_carried_state": dict(optimizer="adamw", steps=5, keep=("param", "unit"), warmup=2,
                                        accumulation="adjoint"),
    "adjoint_sgd_switched_on_origin_step": dict(optimizer="sgd", steps=5, keep=("origin_step", "param", "unit"),
                                                warmup=0, accumulation="adjoint"),
    "adjoint_nesterov_one_step": dict(optimizer="nesterov", steps=1, keep=("unit",), warmup=0,
                                      accumulation="adjoint"),
}


def _loss(out: torch.Tensor, y) -> torch.Tensor:
    return F.cross_entropy(out, y)


def record_case(name: str):
    """(model, trajectory, (X, Y), X_test) of one case: a tanh MLP 4 → 5 → 3 on blob data, batches of 6."""
    spec = CASES[name]
    g = torch.Generator().manual_seed(11)
    X, Y = make_blobs(18, 3, 4, g)
    X_test, _ = make_blobs(3, 3, 4, g)
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    first, second = list(model[0].parameters()), list(model[2].parameters())
    if spec["optimizer"] == "sgd":  # momentum 0 at first (a warm-up), switched on at step 2
        optimizer = torch.optim.SGD([{"params": first, "lr": 0.1}, {"params": second, "lr": 0.05}],
                                    momentum=0.0, dampening=0.3, weight_decay=0.01)
    elif spec["optimizer"] == "nesterov":
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.02)
    else:
        optimizer = torch.optim.AdamW([{"params": first, "lr": 0.03}, {"params": second, "lr": 0.02}],
                                      weight_decay=0.1)

    def train_step(ids):
        optimizer.zero_grad()
        _loss(model(X[ids]), Y[ids]).backward()
        return ids

    for _ in range(spec["warmup"]):
        train_step(torch.randperm(18, generator=g)[:6])
        optimizer.step()
    recorder = em.TrajectoryRecorder(model, optimizer)
    for t in range(spec["steps"]):
        if spec["optimizer"] == "sgd" and t == 2:
            for group in optimizer.param_groups:
                group["momentum"] = 0.9
        ids = train_step(torch.randperm(18, generator=g)[:6])
        recorder.record_batch(ids)
        optimizer.step()
    recorder.close()
    return model, recorder.trajectory(), (X, Y), X_test


def decompose_case(name: str, *, distributed: Any = None) -> em.Influence:
    """The case's decomposition, in one process or split across ranks (``distributed=True``)."""
    spec = CASES[name]
    model, trajectory, data, X_test = record_case(name)
    quadrature = em.adaptive_gauss_legendre(tol=1e-13) if spec.get("adaptive") else em.gauss_legendre(6)
    return em.decompose_training(model, trajectory, _loss, data, X_test, quadrature=quadrature,
                                 keep=spec["keep"], params="tensor", dtype=torch.float64, distributed=distributed,
                                 accumulation=spec.get("accumulation", "auto"))
