"""Dispatch shared by the corollaries: they hold for every optimizer rule (MATH.md §4)."""

from __future__ import annotations

from ..decomposition import decompose_trajectory

_RULE_LABEL = {"adamw": "AdamW", "sgd": "SGD with momentum", "rmsprop": "RMSprop", "adagrad": "Adagrad",
               "adamax": "Adamax", "nadam": "NAdam", "radam": "RAdam"}


def decompose_with_rule(model, trajectory, loss_fn, train_data, test_inputs, *, statement: str, **options):
    label = _RULE_LABEL.get(trajectory.optimizer, trajectory.optimizer)
    return decompose_trajectory(
        model, trajectory, loss_fn, train_data, test_inputs, theorem=f"{statement} ({label})", **options
    )
