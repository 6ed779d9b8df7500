"""Optimizer specifications for the property tests, drawn from the rule registry
(:data:`explaind_math.optimizers.RULES`): every registered rule, built-in or added later with
:func:`~explaind_math.optimizers.register_rule`, gets random parameter groups and LR schedulers.

An optimizer's *kind* is its torch class's name in lower case (``"adamw"``, ``"adam"``, ``"sgd"``,
``"rmsprop"``, …); :func:`optimizer_kinds` lists those of the registered rules. AdamW/Adam and SGD
have hand-written strategies that draw every hyperparameter (:func:`adamw_optimizers`,
:func:`sgd_optimizers`); any other rule is drawn from its ``example_settings``, the constructor settings
that cover each branch of its coefficients (:func:`rule_optimizers`).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from hypothesis import strategies as st
from torch import nn

from ...optimizers import RULES, LinearOptimizerRule, rule_by_name

__all__ = [
    "THEOREM_OF_OPTIMIZER",
    "TEMPLATE_THEOREM",
    "ScheduleSpec",
    "OptimizerSpec",
    "optimizer_kinds",
    "optimizer_class",
    "rule_of_kind",
    "theorem_of",
    "accepts_option",
    "lr_schedules",
    "adamw_optimizers",
    "sgd_optimizers",
    "rule_optimizers",
    "optimizers",
]

#: the label the decomposition must store for a run of each optimizer kind of a built-in rule
THEOREM_OF_OPTIMIZER = {
    "adamw": "Theorem 3.1 (AdamW)",
    "adam": "Theorem 3.1 (AdamW)",
    "sgd": "Corollary 3.2 (SGD with momentum)",
    "rmsprop": "MATH.md §4 linear-optimizer template (RMSprop)",
    "adagrad": "MATH.md §4 linear-optimizer template (Adagrad)",
    "adamax": "MATH.md §4 linear-optimizer template (Adamax)",
    "nadam": "MATH.md §4 linear-optimizer template (NAdam)",
    "radam": "MATH.md §4 linear-optimizer template (RAdam)",
}
#: the label for a rule registered later (not in :data:`THEOREM_OF_OPTIMIZER`), with the rule's name
TEMPLATE_THEOREM = "MATH.md §4 linear-optimizer template ({})"


def optimizer_kinds(rules: Sequence[str] | None = None) -> tuple[str, ...]:
    """The kinds (lower-case torch class names) of the named rules' optimizer classes, in registry order;
    every rule registered now by default."""
    chosen = list(RULES.values()) if rules is None else [rule_by_name(name) for name in rules]
    return tuple(cls.__name__.lower() for rule in chosen for cls in rule.optimizer_classes)


def _class_and_rule(kind: str) -> tuple[type, LinearOptimizerRule]:
    for rule in RULES.values():
        for cls in rule.optimizer_classes:
            if cls.__name__.lower() == kind:
                return cls, rule
    raise ValueError(f"no registered rule has an optimizer class of kind {kind!r}; kinds: {optimizer_kinds()}")


def optimizer_class(kind: str) -> type:
    """The torch optimizer class of a kind (``"rmsprop"`` → ``torch.optim.RMSprop``)."""
    return _class_and_rule(kind)[0]


def rule_of_kind(kind: str) -> LinearOptimizerRule:
    """The registered rule that decomposes runs of this kind (``"adam"`` → the AdamW rule)."""
    return _class_and_rule(kind)[1]


def theorem_of(kind: str) -> str:
    """The theorem label a decomposition of a run of this kind must carry."""
    if kind in THEOREM_OF_OPTIMIZER:
        return THEOREM_OF_OPTIMIZER[kind]
    return TEMPLATE_THEOREM.format(rule_of_kind(kind).name)


def accepts_option(cls: type, option: str) -> bool:
    """Whether the optimizer class's constructor takes ``option`` (``weight_decay``, ``momentum``, …)."""
    return option in inspect.signature(cls).parameters


def _constructor_default(cls: type, option: str) -> Any:
    return inspect.signature(cls).parameters[option].default


@dataclass(frozen=True)
class ScheduleSpec:
    """An LR scheduler stepped once after every ``optimizer.step()``.

    kind: ``"none"``; ``"lambda"`` (``LambdaLR``, lr · gamma^t); ``"step"`` (``StepLR(step_size, gamma)``);
    ``"onecycle"`` (``OneCycleLR``, which also cycles β1, or the momentum, between 0.85 and 0.95).
    """

    kind: str = "none"
    gamma: float = 1.0
    step_size: int = 1

    def build(self, optimizer: torch.optim.Optimizer, num_steps: int):
        if self.kind == "none":
            return None
        if self.kind == "lambda":
            gamma = self.gamma
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: gamma**t)
        if self.kind == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.step_size, gamma=self.gamma)
        if self.kind == "onecycle":
            max_lr = [g["lr"] for g in optimizer.param_groups]
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=num_steps + 1)
        raise ValueError(f"unknown schedule kind {self.kind!r}")


@dataclass(frozen=True)
class OptimizerSpec:
    """A torch.optim optimizer with parameter groups and a scheduler, built for a given model.

    kind: the lower-case name of an optimizer class of a registered rule (:func:`optimizer_kinds`):
    ``"adamw"``, ``"adam"`` (with ``decoupled_weight_decay`` as given in ``options``), ``"sgd"``,
    ``"rmsprop"``, …. ``options`` are the constructor's keyword arguments (``lr``, ``betas``,
    ``momentum``, …); ``groups`` holds per-group overrides as ``(lr factor, weight decay or None)``;
    parameter k (in ``model.named_parameters()`` order) goes to group
    ``assignment[k % len(assignment)] % len(groups)``, and empty groups are dropped.
    """

    kind: str
    options: tuple[tuple[str, Any], ...]
    groups: tuple[tuple[float, float | None], ...] = ((1.0, None),)
    assignment: tuple[int, ...] = (0,)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)

    @property
    def optimizer_class(self) -> type:
        return optimizer_class(self.kind)

    @property
    def rule(self) -> LinearOptimizerRule:
        return rule_of_kind(self.kind)

    @property
    def theorem(self) -> str:
        return theorem_of(self.kind)

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    def param_groups(self, model: nn.Module) -> list[dict]:
        params = list(model.parameters())
        members: list[list[torch.Tensor]] = [[] for _ in self.groups]
        for k, p in enumerate(params):
            members[self.assignment[k % len(self.assignment)] % len(self.groups)].append(p)
        base_lr = self.opts["lr"]
        out = []
        for (factor, wd), ps in zip(self.groups, members):
            if not ps:
                continue
            group: dict[str, Any] = {"params": ps, "lr": base_lr * factor}
            if wd is not None:
                group["weight_decay"] = wd
            out.append(group)
        return out

    def build(self, model: nn.Module, num_steps: int):
        """(optimizer, scheduler or None) for ``model``: the unmodified torch classes."""
        optimizer = self.optimizer_class(self.param_groups(model), **self.opts)
        return optimizer, self.schedule.build(optimizer, num_steps)


def lr_schedules(kinds: Sequence[str] = ("none", "lambda", "step", "onecycle")) -> st.SearchStrategy[ScheduleSpec]:
    """LambdaLR (lr · γ^t, γ ∈ {0.5, 0.8, 1.1}), StepLR (γ ∈ {0.1, 0.5}, step size 1–3), OneCycleLR
    (its defaults: warm-up from max_lr/25, annealing to max_lr/2.5e5), or no scheduler."""
    options = []
    if "none" in kinds:
        options.append(st.just(ScheduleSpec("none")))
    if "lambda" in kinds:
        options.append(st.builds(ScheduleSpec, st.just("lambda"), st.sampled_from((0.5, 0.8, 1.1))))
    if "step" in kinds:
        options.append(st.builds(ScheduleSpec, st.just("step"), st.sampled_from((0.1, 0.5)), st.integers(1, 3)))
    if "onecycle" in kinds:
        options.append(st.just(ScheduleSpec("onecycle")))
    return st.one_of(*options)


def _param_group_layout(draw, weight_decay: bool = True) -> tuple[tuple[tuple[float, float | None], ...], tuple[int, ...]]:
    """1–3 groups of (lr factor, weight decay override or None) and an assignment of parameters to them;
    ``weight_decay=False`` (an optimizer without that option) draws no override."""
    n_groups = draw(st.integers(1, 3))
    decays = st.one_of(st.none(), st.just(0.0), st.floats(1e-3, 0.3)) if weight_decay else st.none()
    groups = tuple((draw(st.sampled_from((1.0, 0.5, 2.0))), draw(decays)) for _ in range(n_groups))
    assignment = tuple(draw(st.lists(st.integers(0, n_groups - 1), min_size=1, max_size=6)))
    return groups, assignment


@st.composite
def adamw_optimizers(
    draw,
    kinds: Sequence[str] = ("adamw", "adam"),
    schedules: st.SearchStrategy[ScheduleSpec] | None = None,
    coupled: bool | None = None,
    weight_decay: st.SearchStrategy[float] | None = None,
    lr: st.SearchStrategy[float] | None = None,
):
    """AdamW, or Adam with ``decoupled_weight_decay`` False (coupled L2: λθ enters both moments) or True.

    lr 1e-3..0.02, β1 ∈ {0} ∪ [0.5, 0.95], β2 ∈ [0.9, 0.999], ε ∈ {1e-8, 1e-6, 1e-3, 0.1}, weight
    decay 0 or in [1e-3, 0.3], ``amsgrad`` and ``maximize`` on or off, 1–3 groups, a scheduler.
    ``coupled`` forces Adam with coupled decay (True) or decoupled decay (False); ``weight_decay`` and
    ``lr`` replace those strategies.

    Why lr ≤ 0.02: Adam moves EVERY coordinate by up to ~lr per step whatever the gradient's size; at
    lr 0.1 (with a growing LambdaLR) a step of ~0.1 in each of ~90 coordinates moved an attention
    block's log-probabilities by units, and 8 Gauss–Legendre nodes left 4e-7 on it (16 nodes: 4e-14).
    """
    kind = draw(st.sampled_from(tuple(kinds)))
    options: dict[str, Any] = {
        "lr": draw(lr if lr is not None else st.floats(1e-3, 0.02)),
        "betas": (draw(st.one_of(st.just(0.0), st.floats(0.5, 0.95))), draw(st.floats(0.9, 0.999))),
        "eps": draw(st.sampled_from((1e-8, 1e-6, 1e-3, 0.1))),
        "weight_decay": draw(weight_decay if weight_decay is not None
                             else st.one_of(st.just(0.0), st.floats(1e-3, 0.3))),
        "amsgrad": draw(st.booleans()),
        "maximize": draw(st.booleans()),
    }
    if kind == "adam":
        options["decoupled_weight_decay"] = (not coupled) if coupled is not None else draw(st.booleans())
    groups, assignment = _param_group_layout(draw)
    schedule = draw(schedules if schedules is not None else lr_schedules())
    return OptimizerSpec(kind, tuple(options.items()), groups, assignment, schedule)


@st.composite
def sgd_optimizers(
    draw,
    schedules: st.SearchStrategy[ScheduleSpec] | None = None,
    momentum: st.SearchStrategy[float] | None = None,
    nesterov: bool | None = None,
    lr: st.SearchStrategy[float] | None = None,
):
    """torch.optim.SGD: lr 1e-3..0.01, momentum 0 or 0.1..0.95, dampening 0 or 0.1..0.9, Nesterov (only
    with momentum > 0 and dampening 0, as PyTorch requires), weight decay 0 or 1e-3..0.3, ``maximize``.
    ``nesterov=True`` forces Nesterov, ``False`` forbids it; ``momentum`` and ``lr`` replace those
    strategies.

    Why lr ≤ 0.01: one MSE sample far from its target has a large gradient; at lr 0.044 a single-sample
    step moved a GELU MLP by 0.5 per coordinate and 8 nodes left 7e-8 (at lr 0.01: 5e-16).
    """
    mu = draw(momentum if momentum is not None else st.one_of(st.just(0.0), st.floats(0.1, 0.95)))
    use_nesterov = nesterov if nesterov is not None else (mu > 0 and draw(st.booleans()))
    if use_nesterov and mu <= 0:
        mu = 0.9
    dampening = 0.0 if use_nesterov else draw(st.one_of(st.just(0.0), st.floats(0.1, 0.9)))
    options: dict[str, Any] = {
        "lr": draw(lr if lr is not None else st.floats(1e-3, 0.01)),
        "momentum": mu,
        "dampening": dampening,
        "nesterov": use_nesterov,
        "weight_decay": draw(st.one_of(st.just(0.0), st.floats(1e-3, 0.3))),
        "maximize": draw(st.booleans()),
    }
    groups, assignment = _param_group_layout(draw)
    kinds = ("none", "lambda", "step", "onecycle") if mu > 0 else ("none", "lambda", "step")
    schedule = draw(schedules if schedules is not None else lr_schedules(kinds))
    if schedule.kind == "onecycle" and mu == 0:  # OneCycleLR would switch a momentum-free SGD to momentum
        schedule = ScheduleSpec("none")
    return OptimizerSpec("sgd", tuple(options.items()), groups, assignment, schedule)


def schedule_kinds_for(cls: type) -> tuple[str, ...]:
    """The LR schedulers an optimizer class can take. LambdaLR and StepLR set only the lr, which every
    optimizer has. OneCycleLR also cycles β1 or the momentum and raises ``ValueError`` for an optimizer
    with neither (torch.optim.Adagrad): that combination is skipped. (On an optimizer whose momentum is
    0, e.g. RMSprop's default, OneCycleLR switches the momentum on: a valid run with momentum.)"""
    cycles_momentum = accepts_option(cls, "betas") or accepts_option(cls, "momentum")
    return ("none", "lambda", "step", "onecycle") if cycles_momentum else ("none", "lambda", "step")


@st.composite
def rule_optimizers(
    draw,
    rule: str,
    kinds: Sequence[str] | None = None,
    schedules: st.SearchStrategy[ScheduleSpec] | None = None,
):
    """Any registered rule's optimizer, from its ``example_settings`` (constructor settings that cover
    each branch of its coefficients, at learning rates the rule's author chose for steps of moderate
    size): one setting, its lr scaled by U(0.25, 1), ``maximize`` on or off (where the class has it),
    1–3 parameter groups with their own lr factor and weight decay (where the class has that option),
    and an LR scheduler the class can take (:func:`schedule_kinds_for`). ``kinds`` restricts the
    optimizer classes (default: all of the rule's)."""
    chosen = rule_by_name(rule)
    kinds = tuple(kinds) if kinds is not None else optimizer_kinds((chosen.name,))
    settings_ = [s for s in chosen.example_settings
                 if s.get("optimizer_class", chosen.optimizer_classes[0]).__name__.lower() in kinds]
    if not settings_:
        raise ValueError(f"rule {chosen.name!r} has no example_settings for the optimizer kinds {kinds}")
    options = dict(draw(st.sampled_from(settings_)))
    cls = options.pop("optimizer_class", chosen.optimizer_classes[0])
    options["lr"] = options.get("lr", _constructor_default(cls, "lr")) * draw(st.floats(0.25, 1.0))
    if accepts_option(cls, "maximize"):
        options["maximize"] = draw(st.booleans())
    # a class without a weight_decay option gets no per-group override: it would be an unknown option
    groups, assignment = _param_group_layout(draw, weight_decay=accepts_option(cls, "weight_decay"))
    schedule = draw(schedules if schedules is not None else lr_schedules(schedule_kinds_for(cls)))
    return OptimizerSpec(cls.__name__.lower(), tuple(options.items()), groups, assignment, schedule)


def _strategy_of_rule(rule: str, kinds: Sequence[str]) -> st.SearchStrategy[OptimizerSpec]:
    """AdamW/Adam and SGD draw every hyperparameter (their hand-written strategies); any other
    registered rule draws from its example settings."""
    if rule == "adamw":
        return adamw_optimizers(kinds=tuple(kinds))
    if rule == "sgd":
        return sgd_optimizers()
    return rule_optimizers(rule, kinds=kinds)


def optimizers(kinds: Sequence[str] | None = None, rules: Sequence[str] | None = None) -> st.SearchStrategy[OptimizerSpec]:
    """An optimizer of any of the named kinds (:func:`optimizer_kinds`), or of any kind of the named
    rules, with random settings; by default of every rule in the registry when the strategy is first
    drawn from (so a rule enrolled with ``register_rule`` before the test runs is drawn too)."""
    if kinds is not None and rules is not None:
        raise ValueError("optimizers(): name either kinds or rules, not both")

    def build() -> st.SearchStrategy[OptimizerSpec]:
        chosen = tuple(kinds) if kinds is not None else optimizer_kinds(rules)
        by_rule: dict[str, list[str]] = {}
        for kind in chosen:
            by_rule.setdefault(rule_of_kind(kind).name, []).append(kind)
        return st.one_of(*(_strategy_of_rule(rule, ks) for rule, ks in by_rule.items()))

    return st.deferred(build)
