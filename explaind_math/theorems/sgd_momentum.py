"""Corollary 3.2 (ExPLAIND, arXiv 2505.20076) — SGD with momentum, dampening, Nesterov, weight decay."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..engine import DecompositionOptions, decompose_trajectory
from ..errors import TrajectoryMismatchError
from ..influence import Influence
from ..trajectory import Trajectory
from .reference import (ReferenceDecomposition, check_replay, decompose_with_features, flat, hyperparameter,
                         model_output, refuse_unsupported, sample_gradients, theta, updated)

__all__ = ["decompose_sgd_momentum_training", "reference_sgd_momentum", "sgd_train_features"]


def decompose_sgd_momentum_training(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    train_data: Any,
    test_inputs: torch.Tensor,
    *,
    penalty: Callable[[dict], torch.Tensor] | None = None,
    options: DecompositionOptions | None = None,
    **option_keywords: Any,
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
        model, trajectory, loss_fn, train_data, test_inputs, theorem="Corollary 3.2 (SGD with momentum)",
        penalty=penalty, options=options, **option_keywords,
    )


# ==================================================================================== the specification
def reference_sgd_momentum(model: nn.Module, trajectory: Trajectory, loss_fn, train_data, test_inputs: torch.Tensor,
                           *, nodes: int = 8) -> ReferenceDecomposition:
    """The specification implementation of Corollary 3.2 (MATH.md §3, §5), a literal torch.func transcription:
    equation (1) with T_t(i), R_t from :func:`sgd_train_features` and Φ_t(x) by ``jacrev`` at ``nodes``
    Gauss–Legendre nodes on θ_t + α Δθ_t,

        I[t, j, x, i, o] = −η_t Φ_t(x)[o, j] T_t(i)[j],   Ψ[t, j, x, o] = −η_t Φ_t(x)[o, j] R_t[j].

    Covers ``torch.optim.SGD`` (momentum, dampening, Nesterov, coupled weight decay, maximize, per-group and
    per-step hyper-parameters, skipped parameters); refuses a momentum buffer carried in from before the
    recording and gradient rescaling; takes no loss penalty. Small models only (every axis is materialized).
    """
    refuse_unsupported(trajectory, ("sgd",), "reference_sgd_momentum")
    eta, T, R = sgd_train_features(model, trajectory, loss_fn, train_data)
    f = model_output(model)
    return decompose_with_features(lambda params, x, label: f(params, x), trajectory, test_inputs, eta, T, R,
                                   units=trajectory.sample_ids(), nodes=nodes)


def sgd_train_features(model: nn.Module, trajectory: Trajectory, loss_fn, train_data):
    """η_t, T_t(i), R_t of Corollary 3.2 as vectors over coordinates j: (N, D), (N, U, D), (N, D).

    With d_s = σ_s g_s + λ_s θ_s (σ_s = −1 under maximize) and c_{t,s} = Π_{s<r≤t} μ_r (1 − τ_s)^{[s ≥ 1]},

        T_t(i) = Σ_{s≤t, i∈B_s} c_{t,s} σ_s g_{s,i},               R_t = Σ_{s≤t} c_{t,s} λ_s θ_s
        Nesterov: T_t(i) = σ_t g_{t,i} + μ_t Σ_s c_{t,s} σ_s g_{s,i},   R_t = λ_t θ_t + μ_t Σ_s c_{t,s} λ_s θ_s
        μ_t = 0:  T_t(i) = σ_t g_{t,i},  R_t = λ_t θ_t   (PyTorch leaves the buffer alone; dampening unused)

    "s ≥ 1" reads "not the step that created the buffer" (PyTorch starts it undamped, b = d, at the tensor's
    first update with μ ≠ 0); the products and sums run over the steps that updated the coordinate with μ ≠ 0.
    A tensor skipped at step t (no gradient) has T_t = R_t = 0. Each step is replay-checked.
    """
    N, names = trajectory.num_steps, trajectory.parameter_names
    moved = [updated(trajectory, t) for t in range(N)]
    eta = [hyperparameter(trajectory, t, "lr") for t in range(N)]
    mu = [hyperparameter(trajectory, t, "momentum") for t in range(N)]
    tau = [hyperparameter(trajectory, t, "dampening") for t in range(N)]
    decay = [hyperparameter(trajectory, t, "weight_decay") for t in range(N)]
    nesterov = [hyperparameter(trajectory, t, "nesterov").bool() for t in range(N)]
    sign = [1 - 2 * hyperparameter(trajectory, t, "maximize") for t in range(N)]
    g = [sign[s] * sample_gradients(model, trajectory, loss_fn, train_data, s) for s in range(N)]
    decay_gradient = [decay[s] * flat(theta(trajectory, s), names) for s in range(N)]
    in_buffer = [moved[s] & (mu[s] != 0) for s in range(N)]  # steps that advance the momentum buffer
    created_before = [torch.stack([torch.zeros_like(in_buffer[0]), *in_buffer[:s]]).any(0) for s in range(N)]

    def c(t: int, s: int) -> torch.Tensor:
        """c_{t,s} = Π_{s<r≤t} μ_r · (1 − τ_s)^{[the buffer existed before s]}."""
        weight = torch.where(in_buffer[s], torch.where(created_before[s], 1 - tau[s], 1.0), 0.0)
        for r in range(s + 1, t + 1):
            weight = weight * torch.where(in_buffer[r], mu[r], 1.0)
        return weight

    T, R = [], []
    for t in range(N):
        buffer_samples = sum(c(t, s) * g[s] for s in range(t + 1))
        buffer_decay = sum(c(t, s) * decay_gradient[s] for s in range(t + 1))
        T_t = torch.where(mu[t] == 0, g[t], torch.where(nesterov[t], g[t] + mu[t] * buffer_samples, buffer_samples))
        R_t = torch.where(mu[t] == 0, decay_gradient[t],
                          torch.where(nesterov[t], decay_gradient[t] + mu[t] * buffer_decay, buffer_decay))
        T.append(torch.where(moved[t], T_t, 0.0))
        R.append(torch.where(moved[t], R_t, 0.0))
        check_replay(trajectory, t, eta[t], T[t], R[t], "reference_sgd_momentum")
    return torch.stack(eta), torch.stack(T), torch.stack(R)
