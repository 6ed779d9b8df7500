"""The train feature maps of the reference implementations, by optimizer rule (MATH.md §2, §3).

The corollaries (3.3, F.2) hold for every rule: their references take (η, T, R) from here.
"""

from __future__ import annotations

from ..trajectory import Trajectory
from .adamw import adamw_train_features
from .reference import refuse_unsupported
from .sgd_momentum import sgd_train_features

__all__ = ["train_features"]


def train_features(model, trajectory: Trajectory, loss_fn, train_data, who: str):
    """(η, T, R) of the run's optimizer rule: Theorem 3.1 for AdamW/Adam, Corollary 3.2 for SGD."""
    refuse_unsupported(trajectory, ("adamw", "sgd"), who)
    features = adamw_train_features if trajectory.optimizer == "adamw" else sgd_train_features
    return features(model, trajectory, loss_fn, train_data)
