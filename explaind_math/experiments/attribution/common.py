"""What several attribution methods share: per-sample gradients ∇_θ fn(f(x_n; θ), y_n) flattened over
the parameters, and the model outputs they differentiate (f_o for the true class o)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ...features import FunctionalModel

__all__ = ["Params", "ScalarOfOutput", "per_sample_gradients", "cast_floating", "class_mask", "true_class_output"]

Params = dict[str, torch.Tensor]
#: one example's loss or output function of the model output: fn(output without batch axis, label) -> scalar
ScalarOfOutput = Callable[[torch.Tensor, Any], torch.Tensor]


def per_sample_gradients(
    model: nn.Module,
    params: Params,
    fn: ScalarOfOutput,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """∇_θ fn(f(x_n; θ), y_n) for every example n, flattened over ``params`` (in its key order):
    shape (n, D). The decomposition's own per-sample gradients (:meth:`FunctionalModel.per_sample_gradients`,
    one vmap of grad over the examples; the model's buffers are held constant)."""
    names = list(params)
    first = next(iter(params.values()))
    fm = FunctionalModel(model, names, dtype=first.dtype, device=first.device)
    g = fm.per_sample_gradients(params, fn, inputs, labels, chunk_size=chunk_size)
    return torch.cat([g[n].reshape(inputs.shape[0], -1) for n in names], dim=1)


def cast_floating(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype`` if it is floating point; integer labels and indices unchanged."""
    return x.to(dtype) if x.is_floating_point() else x


def class_mask(out: torch.Tensor, label: Any) -> torch.Tensor:
    """Boolean mask of the output coordinate o = label (a comparison, so it works under vmap)."""
    return torch.arange(out.numel(), device=out.device) == label


def true_class_output(out: torch.Tensor, label: Any) -> torch.Tensor:
    """f_o(x) for the true class o = label: the quantity the LDS predicts."""
    out = out.reshape(-1)
    return torch.where(class_mask(out, label), out, torch.zeros_like(out)).sum()

