"""Theorem 3.1 (ExPLAIND, arXiv 2505.20076) — a model trained with AdamW is an exact sum of influences."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..engine import DecompositionOptions, decompose_trajectory
from ..errors import TrajectoryMismatchError
from ..influence import Influence
from ..trajectory import Trajectory
from .reference import (ReferenceDecomposition, check_replay, decompose_with_features, flat, hyperparameter,
                         model_output, per_coordinate, refuse_unsupported, sample_gradients, theta, updated)

__all__ = ["decompose_adamw_training", "reference_adamw", "adamw_train_features"]


def decompose_adamw_training(
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
    """Theorem 3.1: decompose f(x; θ_N) for a run of ``torch.optim.AdamW`` (or ``Adam``) exactly.

    With P_t = 1 / ((1 − β1^k)(sqrt(v_t / (1 − β2^k)) + ε)) from the recorded second moments,

        T_t(i) = (1 − β1) P_t ⊙ Σ_{s≤t, i∈B_s} β1^{t−s} g_{s,i},        R_t = λ_t θ_t
        f(x; θ_N) = f(x; θ_0) − Σ_t η_t Σ_i Φ_t(x) T_t(i) − Σ_t η_t Φ_t(x) R_t

    where Φ_t(x) = ∫_0^1 ∂_θ f(x; θ_t + α(θ_{t+1} − θ_t)) dα (MATH.md §1-§2). The kernel influence is
    I[t, j, x, i, o] = −η_t Φ_t(x)[o, j] T_t(i)[j], the regularization influence Ψ[t, j, x, o] =
    −η_t Φ_t(x)[o, j] R_t[j]. (With coupled ``Adam`` weight decay, R flows through the first moment.)

    Args:
        model: the trained module (its current parameter values are not used; θ_t come from the trajectory).
        trajectory: recorded by :class:`TrajectoryRecorder` or built by :meth:`Trajectory.from_records`.
        loss_fn: the per-sample loss ℓ_i = loss_fn(f(x_i; θ), y_i), on one sample's output (no batch axis).
        train_data: ``(X, Y)`` tensors indexed by sample id, or an object with ``[id] -> (x, y)``.
        test_inputs: tensor (X, ...) of test inputs x.
        penalty: R(θ) if the training loss was Σ_i w_i ℓ_i + R(θ) (an L1/L2 term): a function of the
            dict of trained parameters; its influence is reported separately as ``result.penalty``.
        options: how the exact answer is computed (quadrature, kept axes, parameter groups, dtype, device,
            memory budget, chunks, contraction, progress, distributed): a
            :class:`~explaind_math.DecompositionOptions`, or its fields as keywords (which override it).

    Returns:
        :class:`Influence` with I, Ψ, f(x; θ_0), f(x; θ_N), the reconstruction and its residual.
    """
    if trajectory.optimizer != "adamw":
        raise TrajectoryMismatchError(
            f"decompose_adamw_training needs an AdamW/Adam trajectory, this one was recorded with "
            f"{trajectory.optimizer!r}; use decompose_sgd_momentum_training"
        )
    return decompose_trajectory(
        model, trajectory, loss_fn, train_data, test_inputs, theorem="Theorem 3.1 (AdamW)", penalty=penalty,
        options=options, **option_keywords,
    )


# ==================================================================================== the specification
def reference_adamw(model: nn.Module, trajectory: Trajectory, loss_fn, train_data, test_inputs: torch.Tensor, *,
                    nodes: int = 8) -> ReferenceDecomposition:
    """The specification implementation of Theorem 3.1 (MATH.md §2, §5), a literal torch.func transcription:

        f(x; θ_N) = f(x; θ_0) − Σ_t η_t Σ_i Φ_t(x) T_t(i) − Σ_t η_t Φ_t(x) R_t                     (1)
        I[t, j, x, i, o] = −η_t Φ_t(x)[o, j] T_t(i)[j],   Ψ[t, j, x, o] = −η_t Φ_t(x)[o, j] R_t[j]

    with T_t(i), R_t from :func:`adamw_train_features` and Φ_t(x) by ``jacrev`` at ``nodes`` Gauss–Legendre
    nodes on θ_t + α Δθ_t. Returns the full atomic tensors (every coordinate j, every unit i): small models
    only. Covers ``torch.optim.AdamW`` and ``Adam`` (amsgrad, maximize, coupled or decoupled decay, per-group
    and per-step hyper-parameters, skipped parameters); refuses optimizer state carried in from before the
    recording and gradient rescaling; takes no loss penalty. ``train_data`` is ``(X, Y)`` indexed by id.
    """
    refuse_unsupported(trajectory, ("adamw",), "reference_adamw")
    eta, T, R = adamw_train_features(model, trajectory, loss_fn, train_data)
    f = model_output(model)
    return decompose_with_features(lambda params, x, label: f(params, x), trajectory, test_inputs, eta, T, R,
                                   units=trajectory.sample_ids(), nodes=nodes)


def adamw_preconditioner_at(trajectory: Trajectory, t: int) -> torch.Tensor:
    """P_t = 1 / ((1 − β1^k)(sqrt(v_t / (1 − β2^k)) + ε)) per coordinate, v_t (``exp_avg_sq``, or
    ``max_exp_avg_sq`` with amsgrad) and k (the tensor's own step count) recorded after step t.
    Coordinates of tensors skipped at step t get P_t = 1 (it multiplies nothing there)."""
    step = trajectory.steps[t]

    def recorded(name: str, hyper: dict, key: str):
        if name not in step.updated:
            return 1.0
        state = step.state[name]
        if key == "v":
            return state["max_exp_avg_sq"] if hyper["amsgrad"] else state["exp_avg_sq"]
        return float(state["step"])

    v = per_coordinate(trajectory, t, lambda n, hyper: recorded(n, hyper, "v"))
    k = per_coordinate(trajectory, t, lambda n, hyper: recorded(n, hyper, "k"))
    beta1, beta2 = hyperparameter(trajectory, t, "beta1"), hyperparameter(trajectory, t, "beta2")
    eps = hyperparameter(trajectory, t, "eps")
    return 1 / ((1 - beta1**k) * (torch.sqrt(v / (1 - beta2**k)) + eps))


def adamw_train_features(model: nn.Module, trajectory: Trajectory, loss_fn, train_data):
    """η_t, T_t(i), R_t of Theorem 3.1 as vectors over coordinates j: (N, D), (N, U, D), (N, D).

        T_t(i) = P_t ⊙ Σ_{s≤t, i∈B_s} (1 − β1_s) Π_{s<r≤t} β1_r ⊙ σ_s g_{s,i}          (σ_s = −1 under maximize)
        R_t = λ_t θ_t                                                           (AdamW: decoupled decay)
        R_t = P_t ⊙ Σ_{s≤t} (1 − β1_s) Π_{s<r≤t} β1_r ⊙ λ_s θ_s                  (Adam: coupled, λθ enters m)

    i.e. m_t = (1 − β1) Σ_{s≤t} β1^{t−s} g_s unrolled (β1 may change from step to step), P_t from the
    recorded v_t (:func:`adamw_preconditioner_at`). The products and sums run over the steps at which the
    coordinate's tensor received a gradient; PyTorch skips it at the others (no decay, no moment update,
    no step count), and there T_t(i) = R_t = 0. Each step is replay-checked: Δθ_t = −η_t (Σ_i T_t(i) + R_t).
    """
    N, names = trajectory.num_steps, trajectory.parameter_names
    moved = [updated(trajectory, t) for t in range(N)]
    eta = [hyperparameter(trajectory, t, "lr") for t in range(N)]
    beta1 = [hyperparameter(trajectory, t, "beta1") for t in range(N)]
    decay = [hyperparameter(trajectory, t, "weight_decay") for t in range(N)]
    decoupled = [hyperparameter(trajectory, t, "decoupled_weight_decay").bool() for t in range(N)]
    sign = [1 - 2 * hyperparameter(trajectory, t, "maximize") for t in range(N)]
    g = [sign[s] * sample_gradients(model, trajectory, loss_fn, train_data, s) for s in range(N)]
    theta_flat = [flat(theta(trajectory, t), names) for t in range(N)]
    coupled_decay = [torch.where(decoupled[s], 0.0, decay[s] * theta_flat[s]) for s in range(N)]

    def first_moment_weight(t: int, s: int) -> torch.Tensor:
        """(1 − β1_s) Π_{s<r≤t} β1_r, over the steps that moved the coordinate."""
        weight = torch.where(moved[s], 1 - beta1[s], 0.0)
        for r in range(s + 1, t + 1):
            weight = weight * torch.where(moved[r], beta1[r], 1.0)
        return weight

    T, R = [], []
    for t in range(N):
        P = adamw_preconditioner_at(trajectory, t)
        m_samples = sum(first_moment_weight(t, s) * g[s] for s in range(t + 1))
        m_decay = sum(first_moment_weight(t, s) * coupled_decay[s] for s in range(t + 1))
        T.append(torch.where(moved[t], P * m_samples, 0.0))
        R.append(torch.where(moved[t], torch.where(decoupled[t], decay[t] * theta_flat[t], P * m_decay), 0.0))
        check_replay(trajectory, t, eta[t], T[t], R[t], "reference_adamw")
    return torch.stack(eta), torch.stack(T), torch.stack(R)
