"""Corollary 3.3 — decompose a function of the output, or an intermediate activation."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..influence import Influence
from ..trajectory import Trajectory
from ._common import decompose_with_rule

__all__ = ["decompose_function_of_output", "decompose_activation"]


def decompose_function_of_output(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    train_data: Any,
    test_inputs: torch.Tensor,
    h: Callable[[torch.Tensor, Any], torch.Tensor],
    *,
    test_labels: torch.Tensor | None = None,
    **options,
) -> Influence:
    """Corollary 3.3 (i): decompose h(f(x; θ_N)) with the same T_t(i), R_t and

        Φ^h_t(x) = ∫_0^1 ∂h(f(x; θ_t(α))) ∂_θ f(x; θ_t(α)) dα          (MATH.md §6)

    the chain rule applied at every quadrature node (never at the endpoint), so
    h(f(x; θ_N)) = h(f(x; θ_0)) + Σ I^h + Σ Ψ^h exactly. ``h(value, label)`` gets one test input's
    output (no batch axis) and its label from ``test_labels``; ready-made h's are in
    :mod:`explaind_math.targets` (loss, output coordinate, margin, projection, entropy).
    Other options are those of :func:`~explaind_math.decompose_adamw_training`.
    """
    return decompose_with_rule(
        model, trajectory, loss_fn, train_data, test_inputs,
        statement="Corollary 3.3 (i), h∘f", h=h, test_labels=test_labels, **options,
    )


def decompose_activation(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    train_data: Any,
    test_inputs: torch.Tensor,
    module: str,
    *,
    select: Callable[[torch.Tensor], torch.Tensor] | None = None,
    **options,
) -> Influence:
    """Corollary 3.3 (ii): decompose the output a(x; θ) of the submodule named ``module``
    (e.g. ``"encoder.layers.0.attn"``), without changing the model's code:

        Φ^a_t(x) = ∫_0^1 ∂_θ a(x; θ_t(α)) dα,     a(x; θ_N) = a(x; θ_0) + Σ I^a + Σ Ψ^a

    Parameters used only after the activation have ∂_θ a = 0, so they contribute exactly zero.
    ``select`` picks part of the activation (one example, no batch axis), e.g. one position of a
    residual stream: ``select=lambda a: a[2]``. The forward pass stops at the module.
    """
    h = None if select is None else (lambda value, label: select(value))
    return decompose_with_rule(
        model, trajectory, loss_fn, train_data, test_inputs,
        statement=f"Corollary 3.3 (ii), activation {module!r}", activation=module, h=h, **options,
    )
