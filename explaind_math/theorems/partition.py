"""Corollary F.2 — influences accumulated over a partition of the training samples."""

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

__all__ = ["decompose_by_partition", "reference_partition"]


def decompose_by_partition(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    train_data: Any,
    test_inputs: torch.Tensor,
    partition: Any,
    options: DecompositionOptions | None = None,
    **option_keywords: Any,
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
        statement="Corollary F.2, partition", partition=partition, options=options, **option_keywords,
    )


def reference_partition(model: nn.Module, trajectory: Trajectory, loss_fn, train_data, test_inputs: torch.Tensor,
                        partition: Any, *, nodes: int = 8) -> ReferenceDecomposition:
    """The specification implementation of Corollary F.2: the per-sample T_t(i), R_t of the run's optimizer
    (Theorem 3.1, Corollary 3.2 or the §4 template:
    :func:`~explaind_math.theorems.reference_features.train_features`) summed per group,

        T_t(S_k) = Σ_{i∈S_k} T_t(i),     I[t, j, x, k, o] = −η_t Φ_t(x)[o, j] T_t(S_k)[j]     (MATH.md §7)

    Ψ unchanged, Φ_t(x) by ``jacrev`` at ``nodes`` Gauss–Legendre nodes. ``partition`` as for
    :func:`decompose_by_partition` (``"all"``, a sequence or tensor indexed by id, a mapping, a callable);
    the unit axis lists the groups sorted (by type name, then value). Refuses what
    :func:`~explaind_math.theorems.linear_optimizers.reference_template` refuses.
    """
    eta, T, R = train_features(model, trajectory, loss_fn, train_data, "reference_partition")

    def group_of(i: int):
        if isinstance(partition, str):
            return partition  # "all": one group
        g = partition(i) if callable(partition) else partition[i]
        return g.item() if isinstance(g, torch.Tensor) else g

    units = trajectory.sample_ids()
    groups = sorted({group_of(i) for i in units}, key=lambda g: (str(type(g)), g))
    T_groups = torch.stack([sum(T[:, u] for u, i in enumerate(units) if group_of(i) == S_k) for S_k in groups], dim=1)
    f = model_output(model)
    return decompose_with_features(lambda params, x, label: f(params, x), trajectory, test_inputs, eta, T_groups, R,
                                   units=groups, nodes=nodes)
