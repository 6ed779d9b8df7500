"""MATH.md §4 — any optimizer that is linear in the gradients given its recorded state."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..engine import DecompositionOptions
from ..influence import Influence
from ..trajectory import Trajectory
from .engine_call import decompose_with_rule

__all__ = ["decompose_training"]


def decompose_training(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    train_data: Any,
    test_inputs: torch.Tensor,
    options: DecompositionOptions | None = None,
    **option_keywords: Any,
) -> Influence:
    """Decompose f(x; θ_N) for a run of any registered optimizer rule (MATH.md §4):

        buffer_t(u) = A_t ⊙ buffer_{t−1}(u) + C_t ⊙ grad_t(u),   update_t(u) = −(D_t ⊙ buffer_t(u) + E_t ⊙ grad_t(u))
        f(x; θ_N) = f(x; θ_0) + Σ_t Σ_u Φ_t(x) update_t(u)

    with units u the training samples and the pseudo-units (weight decay, carried state, a loss
    penalty). Theorem 3.1 and Corollary 3.2 are the AdamW and SGD instances; RMSprop, Adagrad,
    Adamax, NAdam, RAdam and user rules (:func:`~explaind_math.optimizers.register_rule`) use this.
    Options are those of :func:`~explaind_math.decompose_adamw_training`.
    """
    return decompose_with_rule(model, trajectory, loss_fn, train_data, test_inputs,
                               statement="MATH.md §4 linear-optimizer template", options=options,
                               **option_keywords)
