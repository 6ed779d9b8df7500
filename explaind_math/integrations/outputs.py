"""Which tensor of a model's output is f: :class:`SelectOutput` wraps a model with a selection function.

The decomposition recognises the wrapper's prefix (``model.``) on the parameter names, so a trajectory
recorded on the bare model decomposes through the wrapper (:mod:`explaind_math.integrations.names`).
Without a wrapper, f is the model's tensor or the ``.logits`` of its ``ModelOutput``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["SelectOutput"]


class SelectOutput(nn.Module):
    """``select(model(*args, **kwargs))``: e.g. ``SelectOutput(model, lambda out: out.logits[:, -1])``."""

    def __init__(self, model: nn.Module, select: Callable[[Any], torch.Tensor]):
        super().__init__()
        self.model = model
        self.select = select

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return self.select(self.model(*args, **kwargs))
