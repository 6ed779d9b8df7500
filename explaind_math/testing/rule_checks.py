"""The shared checks every optimizer rule must pass (MATH.md §4), for built-in and user rules alike.

    python -m explaind_math verify-rule my_package.my_module:MyRule [--examples 20]

runs, in float64, against the rule's real torch optimizer (``rule.optimizer_classes``) trained with
each of ``rule.example_settings``:

1. ``replay``: every step replayed from per-sample gradients matches the optimizer's real step
   (max relative replay error ≤ 1e-10);
2. ``decomposition``: on random small smooth models and random training schedules (Hypothesis),
   |f(x; θ_0) + Σ I + Σ Ψ − f(x; θ_N)| ≤ 1e-9 · (1 + |f(x; θ_N) − f(x; θ_0)|) with 8 Gauss–Legendre nodes;
3. ``flags``: an unknown param-group option is refused with an error naming it, and the rule's
   ``hyperparameters`` accepts the optimizer's own defaults.

``tests/test_optimizer_rules.py`` runs the same checks for every registered rule.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
from dataclasses import dataclass

import torch
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from .. import optimizers as _optimizers
from ..engine import decompose_trajectory
from ..errors import UnsupportedOptimizerError
from ..optimizers.template import LinearOptimizerRule
from . import strategies as es

__all__ = ["PropertyResult", "check_rule", "load_rule", "main", "REPLAY_TOL", "RESIDUAL_TOL"]

REPLAY_TOL = 1e-10
RESIDUAL_TOL = 1e-9


@dataclass
class PropertyResult:
    name: str
    passed: bool
    cases: int
    worst: float
    message: str = ""

    def row(self) -> str:
        status = "PASS" if self.passed else "FAIL"
        return f"  {self.name:14s} {status}  cases {self.cases:4d}  worst {self.worst:.2e}  {self.message}"


def _optimizer_factory(rule: LinearOptimizerRule, setting: dict):
    setting = dict(setting)
    cls = setting.pop("optimizer_class", rule.optimizer_classes[0])
    return lambda model: cls(model.parameters(), **setting)


def _train_and_decompose(rule, setting, model_spec, schedule, seed, device):
    model = model_spec.build(seed=seed, device=device)
    X, Y, X_test = es.make_data(model_spec, schedule.num_samples, 3, seed)
    run = es.train_and_record(
        model, _optimizer_factory(rule, setting), schedule, device=device, seed=seed,
        data=(X, Y, X_test), loss=model_spec.loss_spec,
    )
    result = decompose_trajectory(
        run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs, theorem=rule.name,
    )
    return run, result


def check_rule(rule: LinearOptimizerRule, *, examples: int = 10, device: str | torch.device = "cpu") -> list[PropertyResult]:
    """Run the three shared properties on one rule; returns one :class:`PropertyResult` each."""
    results = []
    if not rule.example_settings:
        return [PropertyResult("settings", False, 0, 0.0, "the rule declares no example_settings to train with")]
    registered = _optimizers.RULES.get(rule.name) is rule
    if not registered:
        _optimizers.register_rule(rule)
    try:
        # 1. replay against the real optimizer, every example setting, on a fixed small MLP run
        spec = es.ModelSpec(family="mlp-tanh", input_shape=(5,), num_outputs=3, hidden=(6,),
                            loss="cross_entropy", activation="tanh")
        schedule = es.TrainingSchedule(16, (5, 5, 3, 5, 5, 2), "mean", 0, ())
        worst, message, ok = 0.0, "", True
        for setting in rule.example_settings:
            try:
                _, result = _train_and_decompose(rule, setting, spec, schedule, 0, device)
                worst = max(worst, result.max_replay_error)
                if result.max_replay_error > REPLAY_TOL:
                    ok, message = False, f"setting {setting}: replay error {result.max_replay_error:.2e}"
            except Exception as exc:  # report, do not crash the other properties
                ok, message = False, f"setting {setting}: {type(exc).__name__}: {exc}"
        results.append(PropertyResult("replay", ok, len(rule.example_settings), worst, message))

        # 2. the decomposition identity on random models and schedules
        seen = {"cases": 0, "worst": 0.0, "replay": 0.0}

        # steps of the size the example settings intend: "sum" weighting would multiply the step by the
        # batch size and test the quadrature's reach rather than the rule; no shrinking (a failing
        # case is printed as found, a slow shrink of a training run helps nobody)
        @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                  phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
        @given(
            model_spec=es.models(es.SMOOTH_FAMILIES),
            schedule=es.training_schedules(max_steps=5, max_samples=16).filter(lambda s: s.weighting != "sum"),
            setting=st.sampled_from(rule.example_settings),
            seed=es.seeds(),
        )
        def decomposition_identity(model_spec, schedule, setting, seed):
            _, result = _train_and_decompose(rule, setting, model_spec, schedule, seed, device)
            seen["cases"] += 1
            seen["worst"] = max(seen["worst"], result.relative_residual)
            seen["replay"] = max(seen["replay"], result.max_replay_error)  # each case also replays every step
            assert result.relative_residual <= RESIDUAL_TOL, (
                f"relative residual {result.relative_residual:.3e} > {RESIDUAL_TOL:g}"
            )

        try:
            decomposition_identity()
            results.append(PropertyResult("decomposition", True, seen["cases"], seen["worst"],
                                          f"(replay in these cases: worst {seen['replay']:.2e})"))
        except Exception as exc:
            results.append(PropertyResult("decomposition", False, seen["cases"], seen["worst"],
                                          f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"))

        # 3. flags: defaults accepted, an unknown option refused by name
        cls = rule.optimizer_classes[0]
        probe = cls([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], **dict(
            {k: v for k, v in rule.example_settings[0].items() if k != "optimizer_class"}))
        group = {k: v for k, v in probe.param_groups[0].items() if k != "params"}
        ok, message = True, ""
        try:
            rule.hyperparameters(group)
        except Exception as exc:
            ok, message = False, f"the optimizer's own group is refused: {exc}"
        try:
            rule.hyperparameters({**group, "surely_unknown_flag": 1})
            ok, message = False, "an unknown option 'surely_unknown_flag' was accepted silently"
        except UnsupportedOptimizerError as exc:
            if "surely_unknown_flag" not in str(exc):
                ok, message = False, f"the refusal does not name the option: {exc}"
        results.append(PropertyResult("flags", ok, 2, 0.0, message))
    finally:
        if not registered:
            _optimizers.RULES.pop(rule.name, None)
    return results


def load_rule(spec: str) -> LinearOptimizerRule:
    """``module:Name`` → a rule instance (Name may be a rule class or an instance)."""
    module_name, _, attr = spec.partition(":")
    if not attr:
        raise SystemExit(f"expected module:Name, got {spec!r}")
    obj = getattr(importlib.import_module(module_name), attr)
    rule = obj() if inspect.isclass(obj) else obj
    if not isinstance(rule, LinearOptimizerRule):
        raise SystemExit(f"{spec} is not a LinearOptimizerRule (subclass explaind_math.optimizers.template.LinearOptimizerRule)")
    return rule


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="explaind_math verify-rule", description=__doc__.splitlines()[0])
    parser.add_argument("rules", nargs="*", help="module:Name of rules to check (default: every registered rule)")
    parser.add_argument("--examples", type=int, default=10, help="random cases of the decomposition property")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args(argv)
    rules = [load_rule(s) for s in args.rules] or list(_optimizers.RULES.values())
    failed = False
    for rule in rules:
        print(f"{rule.name} ({', '.join(c.__name__ for c in rule.optimizer_classes)})")
        for r in check_rule(rule, examples=args.examples, device=args.device):
            print(r.row())
            failed |= not r.passed
    return 1 if failed else 0
