"""Corollary 3.2 (ExPLAIND, arXiv 2505.20076) — SGD with momentum, dampening, Nesterov, weight decay."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..decomposition import DEFAULT_KEEP, decompose_trajectory
from ..errors import TrajectoryMismatchError
from ..influence import Influence
from ..quadrature import AdaptiveQuadrature, Quadrature
from ..trajectory import Trajectory

__all__ = ["decompose_sgd_momentum_training"]


def decompose_sgd_momentum_training(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    train_data: Any,
    test_inputs: torch.Tensor,
    *,
    quadrature: Quadrature | AdaptiveQuadrature | None = None,
    penalty: Callable[[dict], torch.Tensor] | None = None,
    keep: Iterable[str] = DEFAULT_KEEP,
    params: str | Mapping[str, str] = "tensor",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    replay_rtol: float | None = None,
    test_chunk_size: int | None = None,
    train_chunk_size: int | None = None,
    vectorize: bool = True,
    contraction: str = "auto",
    memory_budget: int | str | None = None,
    progress: bool | None = None,
    distributed: Any = None,
    node_chunk_size: int | None = None,
) -> Influence:
    """Corollary 3.2: decompose f(x; θ_N) for a run of ``torch.optim.SGD`` exactly.

    With momentum μ, dampening τ, coupled weight decay λ and c_{t,s} = μ^{t−s} (1 − τ)^{[s≥1]}
    (the first step undamped, as PyTorch initializes the buffer with d_0),

        T_t(i) = Σ_{s≤t, i∈B_s} c_{t,s} g_{s,i},        R_t = Σ_{s≤t} c_{t,s} λ_s θ_s
        f(x; θ_N) = f(x; θ_0) − Σ_t η_t Σ_i Φ_t(x) T_t(i) − Σ_t η_t Φ_t(x) R_t

    Nesterov: T_t(i) = g_{t,i} + μ Σ_s c_{t,s} g_{s,i} and R_t = λ_t θ_t + μ Σ_s c_{t,s} λ_s θ_s.
    μ = 0 is plain gradient descent, the exact path kernel of Bell et al. (2023). (MATH.md §3.)

    The arguments and the result are those of :func:`decompose_adamw_training`.
    """
    if trajectory.optimizer != "sgd":
        raise TrajectoryMismatchError(
            f"decompose_sgd_momentum_training needs an SGD trajectory, this one was recorded with "
            f"{trajectory.optimizer!r}; use decompose_adamw_training"
        )
    return decompose_trajectory(
        model, trajectory, loss_fn, train_data, test_inputs,
        theorem="Corollary 3.2 (SGD with momentum)", quadrature=quadrature, penalty=penalty, keep=keep, params=params,
        dtype=dtype, device=device, replay_rtol=replay_rtol, test_chunk_size=test_chunk_size,
        train_chunk_size=train_chunk_size, vectorize=vectorize, contraction=contraction,
        memory_budget=memory_budget, progress=progress, distributed=distributed, node_chunk_size=node_chunk_size,
    )
