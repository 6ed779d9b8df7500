"""The train feature maps of the reference implementations, by optimizer rule (MATH.md §2, §3, §4).

The corollaries (3.3, F.2) hold for every rule: their references take (η, T, R) from here. AdamW/Adam and
SGD keep their theorems' own literal forms (Theorem 3.1, Corollary 3.2); every other registered rule is
served by the unrolled §4 template (:func:`~explaind_math.theorems.linear_optimizers.template_train_features`).
"""

from __future__ import annotations

from ..trajectory import Trajectory
from .adamw import adamw_train_features
from .linear_optimizers import template_train_features
from .reference import refuse_unsupported
from .sgd_momentum import sgd_train_features

__all__ = ["train_features"]


def train_features(model, trajectory: Trajectory, loss_fn, train_data, who: str):
    """(η, T, R) of the run's optimizer rule in the form of ``decompose_with_features`` (I = −η Φ T):
    Theorem 3.1 for AdamW/Adam, Corollary 3.2 for SGD, the §4 template (η = 1, T = −update) otherwise."""
    refuse_unsupported(trajectory, (trajectory.optimizer,), who)
    if trajectory.optimizer == "adamw":
        return adamw_train_features(model, trajectory, loss_fn, train_data)
    if trajectory.optimizer == "sgd":
        return sgd_train_features(model, trajectory, loss_fn, train_data)
    return template_train_features(model, trajectory, loss_fn, train_data, who)
