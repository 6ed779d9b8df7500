"""Dispatch shared by the corollaries: they hold for every optimizer rule (MATH.md §4)."""

from __future__ import annotations

from ..engine import decompose_trajectory
from .registry import rule_label


def decompose_with_rule(model, trajectory, loss_fn, train_data, test_inputs, *, statement: str, **options):
    label = rule_label(trajectory.optimizer)
    return decompose_trajectory(
        model, trajectory, loss_fn, train_data, test_inputs, theorem=f"{statement} ({label})", **options
    )
