"""Corollary 3.3 (i) — decompose a function of the output, h(f(x; θ_N)) (MATH.md §6)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..engine import DecompositionOptions
from ..influence import Influence
from ..trajectory import Trajectory
from .engine_call import decompose_with_rule
from .reference import ReferenceDecomposition, decompose_with_features, model_output
from .reference_features import train_features

__all__ = ["decompose_function_of_output", "reference_function_of_output"]


def decompose_function_of_output(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    train_data: Any,
    test_inputs: torch.Tensor,
    h: Callable[[torch.Tensor, Any], torch.Tensor],
    *,
    test_labels: torch.Tensor | None = None,
    options: DecompositionOptions | None = None,
    **option_keywords: Any,
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
        statement="Corollary 3.3 (i), h∘f", h=h, test_labels=test_labels, options=options, **option_keywords,
    )


def reference_function_of_output(model: nn.Module, trajectory: Trajectory, loss_fn, train_data,
                                 test_inputs: torch.Tensor, h: Callable[[torch.Tensor, Any], torch.Tensor], *,
                                 test_labels: torch.Tensor | None = None, nodes: int = 8) -> ReferenceDecomposition:
    """The specification implementation of Corollary 3.3 (i): the T_t(i), R_t of the run's optimizer
    (Theorem 3.1, Corollary 3.2 or the §4 template:
    :func:`~explaind_math.theorems.reference_features.train_features`) with

        Φ^h_t(x) = Σ_k w_k ∂_θ [h ∘ f](x; θ_t + α_k Δθ_t)   (``jacrev`` of the composition: the chain rule
                                                            ∂h(f) ∂_θ f inside the integral, at every node)
        I^h[t, j, x, i, o] = −η_t Φ^h_t(x)[o, j] T_t(i)[j],   Ψ^h[t, j, x, o] = −η_t Φ^h_t(x)[o, j] R_t[j]

    so that h(f(x; θ_N)) = h(f(x; θ_0)) + Σ I^h + Σ Ψ^h. ``h(value, label)`` as for
    :func:`decompose_function_of_output` (label 0 when ``test_labels`` is None). Refuses what
    :func:`~explaind_math.theorems.linear_optimizers.reference_template` refuses.
    """
    eta, T, R = train_features(model, trajectory, loss_fn, train_data, "reference_function_of_output")
    f = model_output(model)
    return decompose_with_features(lambda params, x, label: h(f(params, x), label), trajectory, test_inputs,
                                   eta, T, R, units=trajectory.sample_ids(), test_labels=test_labels, nodes=nodes)
