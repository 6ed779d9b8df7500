"""Optimizer rules: one file per optimizer family, enrolled in :data:`RULES`.

An optimizer not listed here is refused by :func:`rule_for_optimizer` with a message that says what
is supported and why sign-based or orthogonalizing optimizers can never be decomposed exactly.
"""

from __future__ import annotations

import torch

from ..errors import UnsupportedOptimizerError
from .adagrad import AdagradRule
from .adamax import AdamaxRule
from .adamw import AdamWRule, adamw_preconditioner
from .nadam import NAdamRule
from .radam import RAdamRule
from .rmsprop import RMSpropRule
from .sgd import SGDRule, sgd_coefficients
from .template import LinearOptimizerRule, StepCoefficients, buffer_step, unit_update

__all__ = [
    "RULES",
    "rule_by_name",
    "rule_for_optimizer",
    "register_rule",
    "LinearOptimizerRule",
    "StepCoefficients",
    "AdamWRule",
    "SGDRule",
    "RMSpropRule",
    "AdagradRule",
    "AdamaxRule",
    "NAdamRule",
    "RAdamRule",
    "adamw_preconditioner",
    "sgd_coefficients",
    "buffer_step",
    "unit_update",
]

#: name → rule instance; adding an optimizer is one file plus one line here
RULES: dict[str, LinearOptimizerRule] = {
    rule.name: rule
    for rule in (AdamWRule(), SGDRule(), RMSpropRule(), AdagradRule(), AdamaxRule(), NAdamRule(), RAdamRule())
}

_NOT_LINEAR = {
    "Lion": "its update is the sign of a momentum, not linear in the gradients",
    "SignSGD": "its update is the sign of the gradient, not linear in the gradients",
    "Muon": "it orthogonalizes the update matrix, which is not linear in the gradients",
    "LBFGS": "its line search and curvature pairs make the update non-linear in the gradients",
    "Rprop": "its update uses only the sign of the gradient, which is not linear in the gradients",
}


def register_rule(rule: LinearOptimizerRule) -> LinearOptimizerRule:
    """Enrol a rule (an instance of a :class:`LinearOptimizerRule` subclass): the recorder accepts its
    optimizer classes, trajectories name it, and the shared checks (``python -m explaind_math
    verify-rule module:Name``, ``tests/test_optimizer_rules.py``) run on it. Returns the rule."""
    if not isinstance(rule, LinearOptimizerRule):
        raise TypeError(f"register_rule needs a LinearOptimizerRule instance, got {type(rule).__name__}")
    if not rule.name or not rule.optimizer_classes:
        raise ValueError("a rule needs a non-empty `name` and `optimizer_classes`")
    for other in RULES.values():
        if other.name != rule.name and set(other.optimizer_classes) & set(rule.optimizer_classes):
            raise ValueError(f"rule {other.name!r} already handles {sorted(c.__name__ for c in rule.optimizer_classes)}")
    RULES[rule.name] = rule
    return rule


def rule_by_name(name: str) -> LinearOptimizerRule:
    try:
        return RULES[name]
    except KeyError:
        why = {k.lower(): v for k, v in _NOT_LINEAR.items()}.get(name.lower())
        reason = f" ({name} cannot be decomposed exactly: {why})" if why else ""
        raise UnsupportedOptimizerError(
            f"no optimizer rule named {name!r}{reason}; known rules: {sorted(RULES)}"
        ) from None


def rule_for_optimizer(optimizer: torch.optim.Optimizer) -> LinearOptimizerRule:
    """The rule for an optimizer instance, matched by exact class (a subclass may change the maths)."""
    cls = type(optimizer)
    for rule in RULES.values():
        if cls in rule.optimizer_classes:
            return rule
    why = _NOT_LINEAR.get(cls.__name__)
    if why is not None:
        raise UnsupportedOptimizerError(
            f"{cls.__name__} cannot be decomposed exactly: {why}, so no per-sample decomposition exists"
        )
    supported = sorted(c.__name__ for rule in RULES.values() for c in rule.optimizer_classes)
    raise UnsupportedOptimizerError(
        f"{cls.__module__}.{cls.__name__} is not supported; supported optimizers: {supported}. "
        "An optimizer whose update is linear in the gradients can be added as a rule "
        "(explaind_math.optimizers.template)."
    )
