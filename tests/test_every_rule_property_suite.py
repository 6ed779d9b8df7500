"""Every registered optimizer rule under the full property suite (MATH.md §4).

The strategies draw their optimizers from :data:`explaind_math.optimizers.RULES`, so each rule, built in
or enrolled later with ``register_rule``, is trained with 1–3 parameter groups (own lr and weight
decay), an LR scheduler (LambdaLR, StepLR, OneCycleLR where the optimizer has a momentum or β1 to
cycle), unequal batches with mean, sum or random weights, and sometimes a parameter without gradient;
the decomposition must then replay every step (≤ 1e-10), recompute the live model's outputs (1e-12)
and reconstruct f(x; θ_N) with 8 Gauss–Legendre nodes to 1e-9 · (1 + |f(x; θ_N) − f(x; θ_0)|).
"""

import pathlib

import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

import explaind_math as em
from explaind_math.optimizers import RULES, register_rule
from explaind_math.testing import strategies as es
from explaind_math.testing.residuals import REPLAY_RTOL, SMOOTH_RTOL, check_certificate, check_skipped_parameters
from explaind_math.testing.scripts import load_script

VERIFIES = "template"

#: drawing specifications only (no training), no shrinking: cheap enough for many examples
_DRAW_ONLY = settings(max_examples=300, derandomize=True, database=None, deadline=None,
                      phases=(Phase.generate,), suppress_health_check=list(HealthCheck))


def test_the_run_strategy_draws_every_registered_rule():
    """training_runs() with no optimizer named draws from every rule in RULES, and only from them."""
    drawn = set()

    @_DRAW_ONLY
    @given(spec=es.training_runs())
    def collect(spec):
        drawn.add(spec.optimizer.rule.name)

    collect()
    assert drawn == set(RULES)


@pytest.mark.parametrize("rule", sorted(RULES))
def test_each_rule_is_drawn_with_groups_and_every_scheduler_it_can_take(rule):
    """Every optimizer class of the rule, with several parameter groups, under each LR scheduler the
    class can take (OneCycleLR cycles a momentum or β1: not for Adagrad, which has neither)."""
    drawn = set()

    @_DRAW_ONLY
    @given(spec=es.optimizers(rules=(rule,)))
    def collect(spec):
        assert spec.rule is RULES[rule]
        drawn.add((spec.kind, spec.schedule.kind, len(spec.groups) > 1))

    collect()
    kinds = es.optimizer_kinds((rule,))
    assert {kind for kind, _, _ in drawn} == set(kinds)
    for kind in kinds:
        schedulers = es.schedule_kinds_for(es.optimizer_class(kind))
        assert set(schedulers) >= {"none", "lambda", "step"}
        assert ("onecycle" in schedulers) == (kind != "adagrad")
        assert {scheduler for k, scheduler, _ in drawn if k == kind} == set(schedulers), kind
        assert {several for k, _, several in drawn if k == kind} == {False, True}, kind


def test_a_rule_registered_later_gets_groups_and_schedulers():
    """A user rule enrolled with register_rule (examples/custom_optimizer.py's AdaBelief) is drawn by the
    strategies from then on, with parameter groups and OneCycleLR, and such a run decomposes exactly."""
    module = load_script(pathlib.Path(__file__).resolve().parents[1] / "examples" / "custom_optimizer.py",
                         "custom_optimizer_strategies")
    strategy = es.optimizers()  # made before the rule is enrolled
    register_rule(module.AdaBeliefRule())
    try:
        drawn: dict[tuple[str, bool], es.OptimizerSpec] = {}

        @_DRAW_ONLY
        @given(spec=strategy)
        def collect(spec):
            drawn.setdefault((spec.rule.name, spec.schedule.kind, len(spec.groups) > 1), spec)

        collect()
        assert {rule for rule, _, _ in drawn} == set(RULES)
        assert {scheduler for rule, scheduler, _ in drawn if rule == "adabelief"} == {"none", "lambda", "step", "onecycle"}
        optimizer = drawn[("adabelief", "onecycle", True)]
        assert optimizer.theorem == "MATH.md §4 linear-optimizer template (adabelief)"
        spec = es.RunSpec(
            model=es.ModelSpec(family="mlp-tanh", input_shape=(3,), num_outputs=2, hidden=(4,), activation="tanh"),
            optimizer=optimizer, schedule=es.TrainingSchedule(12, (4, 4, 3), "random", 1, (False, True, False)),
            seed=7)
        run = es.train_and_record(spec)
        result = es.decompose(run, replay_rtol=REPLAY_RTOL)
        check_certificate(run, result, SMOOTH_RTOL)
        assert check_skipped_parameters(run, result) >= 1
    finally:
        RULES.pop("adabelief", None)


@pytest.mark.parametrize("rule", sorted(RULES))
@es.property_settings()
@given(data=st.data())
def test_every_rule_is_exact_with_groups_schedulers_and_frozen_parameters(rule, data, device):
    """The theorem of each rule on smooth models (tanh/GELU MLPs, CNNs, attention): replay, live outputs,
    residual ≤ 1e-9 relative; a parameter skipped at a step carries no influence there; without weight
    decay anywhere Ψ is exactly 0."""
    spec = data.draw(es.training_runs(families=es.SMOOTH_FAMILIES, rules=(rule,)), label="spec")
    run = es.train_and_record(spec, device=device)
    result = es.decompose(run, replay_rtol=REPLAY_RTOL)
    assert result.quadrature == em.default_quadrature().describe()
    assert result.kernel_axes == ("step", "param", "test", "unit", "output")
    assert result.units == run.trajectory.sample_ids()
    assert run.trajectory.optimizer == rule
    check_certificate(run, result, SMOOTH_RTOL)
    check_skipped_parameters(run, result)
    if all(float(g.get("weight_decay", 0.0)) == 0 for g in run.optimizer.param_groups):
        assert float(result.regularization.abs().max()) == 0.0
