"""Ready-made functions h of the model output for Corollary 3.3 (i).

Each returns h(value, label) -> tensor, applied to one test input's output (no batch axis) at every
quadrature node, so the chain rule sits inside the integral:
Φ^h_t(x) = ∫_0^1 ∂h(f(x; θ_t(α))) ∂_θ f(x; θ_t(α)) dα.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

__all__ = ["output_coordinate", "margin", "linear_projection", "predictive_entropy", "per_sample_loss"]

H = Callable[[torch.Tensor, Any], torch.Tensor]


def output_coordinate(o: int) -> H:
    """h(f) = f_o: one output coordinate."""
    return lambda out, label: out.reshape(-1)[o]


def margin(a: int, b: int) -> H:
    """h(f) = f_a − f_b: the margin between two classes."""
    return lambda out, label: out.reshape(-1)[a] - out.reshape(-1)[b]


def linear_projection(W: torch.Tensor) -> H:
    """h(f) = W f for a fixed matrix W (Q × O)."""
    return lambda out, label: W.to(dtype=out.dtype, device=out.device) @ out.reshape(-1)


def predictive_entropy() -> H:
    """h(f) = −Σ_o softmax(f)_o log softmax(f)_o: the entropy of the predicted distribution."""

    def entropy(out: torch.Tensor, label: Any) -> torch.Tensor:
        logp = torch.log_softmax(out.reshape(-1), dim=0)
        return -(logp.exp() * logp).sum()

    return entropy


def per_sample_loss(loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]) -> H:
    """h(f) = L(f, y) with the test input's label y (pass ``test_labels``)."""
    return lambda out, label: loss_fn(out, label)
