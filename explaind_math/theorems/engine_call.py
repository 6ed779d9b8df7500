"""Dispatch shared by the corollaries: they hold for every optimizer rule (MATH.md §4)."""

from __future__ import annotations

from ..engine import decompose_trajectory
from .registry import rule_label


def decompose_with_rule(model, trajectory, loss_fn, train_data, test_inputs, *, statement: str, **arguments):
    """Run the engine for ``statement``, labelled with the trajectory's optimizer rule (e.g. "(RMSprop)");
    ``arguments`` are the engine's: the target (h, activation, partition, …), ``options`` and option keywords."""
    label = rule_label(trajectory.optimizer)
    return decompose_trajectory(
        model, trajectory, loss_fn, train_data, test_inputs, theorem=f"{statement} ({label})", **arguments
    )
