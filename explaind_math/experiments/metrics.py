"""Validation measures of MATH.md §10 (the paper's Table 1 and Figure 2).

For test inputs x with model outputs f(x; θ_N) (logits) and a reconstruction
f̂(x) = f(x; θ_0) + Σ I + Σ Ψ (or a pruned model's logits):

- EPK accuracy: the fraction of x with argmax_o f̂_o(x) = argmax_o f_o(x; θ_N);
- KL divergence KL(p ‖ p̂) = (1/|X|) Σ_x Σ_o p_o(x) (log p_o(x) − log p̂_o(x)) with p = softmax f(x; θ_N)
  (the model's distribution, the reference) and p̂ = softmax f̂(x); nats, averaged over test inputs;
- accuracy against labels: the fraction of x with argmax_o f_o(x) = y(x).

The paper does not state the direction of its KL divergence; here the model's distribution is the
reference (first argument), the usual choice when asking how well p̂ stands in for p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..errors import ExplaindError
from ..influence import Influence

__all__ = ["epk_accuracy", "kl_divergence", "accuracy", "reconstruction_metrics"]


def _check_logits(name: str, logits: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ExplaindError(f"{name} must have shape (test inputs, outputs), got {tuple(logits.shape)}")
    if logits.shape[0] == 0:
        raise ExplaindError(f"{name} holds no test inputs")
    if not torch.isfinite(logits).all():
        raise ExplaindError(f"{name} contains NaN or Inf")


def _check_pair(reference: torch.Tensor, other: torch.Tensor, names: tuple[str, str]) -> None:
    _check_logits(names[0], reference)
    _check_logits(names[1], other)
    if reference.shape != other.shape:
        raise ExplaindError(f"{names[0]} has shape {tuple(reference.shape)} but {names[1]} has {tuple(other.shape)}")


def epk_accuracy(reconstruction: torch.Tensor, model_output: torch.Tensor) -> float:
    """Fraction of test inputs whose argmax of ``reconstruction`` equals the argmax of ``model_output``
    (both (test, output) logits). Ties in argmax are broken by torch's first-maximum rule on both."""
    _check_pair(model_output, reconstruction, ("model_output", "reconstruction"))
    return float((reconstruction.argmax(dim=1) == model_output.argmax(dim=1)).double().mean())


def kl_divergence(model_output: torch.Tensor, reconstruction: torch.Tensor) -> float:
    """KL(softmax(model_output) ‖ softmax(reconstruction)) in nats, averaged over test inputs (module
    docstring). Computed from log-softmax in float64, so it is ≥ 0 up to rounding and 0 iff the two
    distributions agree."""
    _check_pair(model_output, reconstruction, ("model_output", "reconstruction"))
    log_p = F.log_softmax(model_output.double(), dim=1)
    log_q = F.log_softmax(reconstruction.double(), dim=1)
    return float((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of test inputs with argmax_o logits[x, o] = labels[x]."""
    _check_logits("logits", logits)
    if labels.shape != logits.shape[:1]:
        raise ExplaindError(f"labels must have shape ({logits.shape[0]},), got {tuple(labels.shape)}")
    return float((logits.argmax(dim=1) == labels).double().mean())


def reconstruction_metrics(result: Influence) -> dict[str, float]:
    """EPK accuracy, KL(model ‖ reconstruction) and the certified residual of one decomposition:
    ``{"epk_accuracy", "kl", "max_residual", "relative_residual"}`` with max_residual =
    max |f(θ_N) − reconstruction| and relative_residual = max |residual| / (1 + |f(θ_N) − f(θ_0)|)."""
    reconstruction = result.reconstruction
    return {
        "epk_accuracy": epk_accuracy(reconstruction, result.f_final),
        "kl": kl_divergence(result.f_final, reconstruction),
        "max_residual": result.max_residual,
        "relative_residual": result.relative_residual,
    }
