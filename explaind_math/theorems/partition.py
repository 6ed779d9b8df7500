"""Corollary F.2 — influences accumulated over a partition of the training samples."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from ..influence import Influence
from ..trajectory import Trajectory
from ._common import decompose_with_rule

__all__ = ["decompose_by_partition"]


def decompose_by_partition(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    train_data: Any,
    test_inputs: torch.Tensor,
    partition: Any,
    **options,
) -> Influence:
    """Corollary F.2: for a partition {S_1 … S_K} of the training samples,

        T_t(S_k) = Σ_{i∈S_k} T_t(i),    Σ_{i∈S_k} I[t, j, x, i, o] = −η_t Φ_t(x)[o, j] T_t(S_k)[j]

    and, the momentum recursion being linear, buffers are kept per group: memory K·D instead of M·D
    (MATH.md §7). ``partition``: ``"all"`` (one group: step- and parameter-level attribution for the
    cost of one buffer), a sequence or tensor indexed by sample id (e.g. the training labels, to group
    by class), a mapping id → group, or a callable id → group. Every recorded id must be covered.
    The unit axis of the result is labelled by group.
    """
    return decompose_with_rule(
        model, trajectory, loss_fn, train_data, test_inputs,
        statement="Corollary F.2, partition", partition=partition, **options,
    )
