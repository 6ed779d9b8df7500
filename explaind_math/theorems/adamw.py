"""Theorem 3.1 (ExPLAIND, arXiv 2505.20076) — a model trained with AdamW is an exact sum of influences."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch
from torch import nn

from ..decomposition import DEFAULT_KEEP, decompose_trajectory
from ..errors import TrajectoryMismatchError
from ..influence import Influence
from ..quadrature import AdaptiveQuadrature, Quadrature
from ..trajectory import Trajectory

__all__ = ["decompose_adamw_training"]


def decompose_adamw_training(
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
        quadrature: ``gauss_legendre(8)`` by default; ``midpoint(n)``; ``adaptive(...)`` for ReLU models.
        keep: axes to keep among ``("step", "param", "test", "unit", "output")``; test and output are
            always kept. Leaving out "param" and "unit" switches to forward-mode JVPs (cheapest).
        params: granularity of the parameter axis: ``"tensor"``, ``"module"``, ``"coordinate"`` (the
            atomic j), ``"all"``, or a mapping parameter name → group label.
        penalty: R(θ) if the training loss was Σ_i w_i ℓ_i + R(θ) (an L1/L2 term): a function of the
            dict of trained parameters; its influence is reported separately as ``result.penalty``.
        dtype: computation dtype (default: the trajectory's); use ``torch.float64`` to verify.
        replay_rtol: tolerance of the replay check relative to max |Δθ| per tensor.
        contraction: ``"auto"`` (per step the cheaper exact way by counted costs: one JVP per kept direction,
            or the Jacobian and a matrix product; MATH.md §11), ``"measured"`` (by costs timed on this
            machine: faster, but the choice may differ between runs), ``"jvp"`` or ``"jacobian"``.
        memory_budget: bytes or a string like ``"4GiB"``: test inputs, samples and JVP tangents are processed
            in chunks that fit (``test_chunk_size``, ``train_chunk_size`` set them directly); an error names
            what cannot fit at all (the per-unit buffers, the kept axes). Quadrature nodes are evaluated
            ``node_chunk_size`` at a time in one vmapped call (default: as many as fit, up to 16).
        progress: a tqdm progress bar over the steps (None: when tqdm is installed and stderr is a terminal).
        distributed: ``True`` or a ``torch.distributed`` process group: one block of steps per rank, the
            optimizer buffers carried across blocks by an exact scan (launch with ``torchrun``).

    Returns:
        :class:`Influence` with I, Ψ, f(x; θ_0), f(x; θ_N), the reconstruction and its residual.
    """
    if trajectory.optimizer != "adamw":
        raise TrajectoryMismatchError(
            f"decompose_adamw_training needs an AdamW/Adam trajectory, this one was recorded with "
            f"{trajectory.optimizer!r}; use decompose_sgd_momentum_training"
        )
    return decompose_trajectory(
        model, trajectory, loss_fn, train_data, test_inputs,
        theorem="Theorem 3.1 (AdamW)", quadrature=quadrature, penalty=penalty, keep=keep, params=params, dtype=dtype,
        device=device, replay_rtol=replay_rtol, test_chunk_size=test_chunk_size,
        train_chunk_size=train_chunk_size, vectorize=vectorize, contraction=contraction,
        memory_budget=memory_budget, progress=progress, distributed=distributed, node_chunk_size=node_chunk_size,
    )
