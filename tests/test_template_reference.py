"""MATH.md §4 (the linear-optimizer template): the engine equals the reference implementation entrywise.

``reference_template`` takes each step's table (A, C, D, E, s, κ, ρ) from the run's rule and writes the
unrolled closed form literally: buffer_t(u) = Σ_{s≤t} (A_t ⋯ A_{s+1}) C_s grad_s(u), update_t(u) =
−(D_t buffer_t(u) + E_t grad_t(u)), the decay pseudo-unit κ θ_s through the buffer and −ρ θ_t directly, and
I[t, j, x, i, o] = Φ_t(x)[o, j] update_t(i)[j]. The engine runs the recursion instead, in place, by chunks.
On random tanh/GELU MLPs trained by the unmodified optimizer of every registered rule (RMSprop, Adagrad,
Adamax, NAdam, RAdam from their example settings, AdamW/Adam and SGD too: their tables are the template's),
``decompose_training`` with every axis kept and params="coordinate" must equal it to 1e-12 of the L1 mass,
with the same 8 Gauss–Legendre nodes, and both must reconstruct f(x; θ_N) to SMOOTH_RTOL · (1 + |Δf|).
"""

import pytest
import torch
from hypothesis import given, settings

import explaind_math as em
from explaind_math.optimizers import RULES, StepCoefficients
from explaind_math.testing import strategies as es
from explaind_math.testing.references import assert_engine_equals_reference, reference_relative_residual
from explaind_math.testing.residuals import REPLAY_RTOL, SMOOTH_RTOL, check_certificate, report_residual
from explaind_math.theorems.linear_optimizers import reference_template

THEOREM = "template"  # the row of `python -m explaind_math verify`
NODES = 8
MLPS = ("mlp-tanh", "mlp-gelu")
#: every registered rule but the two with their own literal references (AdamW/Adam and SGD are tested too)
OTHER_RULES = tuple(r for r in RULES if r not in ("adamw", "sgd"))
SCHEDULES = es.training_schedules(max_steps=4, max_samples=12)


def _check(spec) -> None:
    """decompose_training (for AdamW/SGD runs: the theorem's own function, which runs the same engine on the
    same table and carries its theorem's label) against reference_template, and both reconstructions."""
    run = es.train_and_record(spec)
    options = dict(params="coordinate", quadrature=em.gauss_legendre(NODES), replay_rtol=REPLAY_RTOL)
    if run.trajectory.optimizer in ("adamw", "sgd"):
        engine = es.decompose(run, **options)
    else:
        engine = em.decompose_training(run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs,
                                       **options)
    reference = reference_template(run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs,
                                   nodes=NODES)
    family = f"{run.family}, {run.trajectory.optimizer}"
    assert_engine_equals_reference(engine, reference, THEOREM, family)
    check_certificate(run, engine, SMOOTH_RTOL)
    residual = reference_relative_residual(reference)
    report_residual(THEOREM, family, residual, f"relative residual, reference gauss_legendre({NODES})")
    assert residual <= SMOOTH_RTOL, f"{family}: the reference reconstructs f(x; θ_N) only to {residual:.2e}"


def _examples(share: float) -> int:
    """This share of the profile's examples (ci: 40), at least 2: each rule is drawn as often."""
    return max(2, round(settings.default.max_examples * share))


@pytest.mark.parametrize("rule", OTHER_RULES)
def test_template_engine_equals_reference(rule):
    @es.property_settings(max_examples=_examples(1 / len(OTHER_RULES)))
    @given(spec=es.training_runs(families=MLPS, rules=(rule,), schedule_strategy=SCHEDULES))
    def check(spec):
        _check(spec)

    check()


@pytest.mark.parametrize("rule", ("adamw", "sgd"))
def test_template_reference_covers_adamw_and_sgd(rule):
    @es.property_settings(max_examples=_examples(0.1))
    @given(spec=es.training_runs(families=MLPS, rules=(rule,), schedule_strategy=SCHEDULES))
    def check(spec):
        _check(spec)

    check()


def _rmsprop_run():
    """A short RMSprop run with momentum (a buffer, so A, C, D all matter)."""
    model = es.ModelSpec("mlp-tanh", (3,), 2, (4,), activation="tanh")
    optimizer = es.OptimizerSpec("rmsprop", (("lr", 0.003), ("momentum", 0.9)))
    return es.train_and_record(es.RunSpec(model, optimizer, es.TrainingSchedule(6, (3, 2)), seed=0))


def test_reference_template_refuses_a_general_linear_map():
    run = _rmsprop_run()

    class MapRule(type(run.trajectory.rule)):  # E as a callable: a general linear map, not coordinate-wise
        def coefficients(self, hyper, state, *, first_update):
            c = super().coefficients(hyper, state, first_update=first_update)
            return StepCoefficients(A=c.A, C=c.C, D=c.D, E=lambda g: 0 * g, gradient_sign=c.gradient_sign,
                                    decay_coupled=c.decay_coupled)

    RULES["rmsprop-as-a-map"] = MapRule()
    try:
        run.trajectory.optimizer = "rmsprop-as-a-map"
        with pytest.raises(em.ExplaindError, match="general linear map"):
            reference_template(run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs)
    finally:
        del RULES["rmsprop-as-a-map"]


def test_reference_template_refuses_carried_state():
    run = _rmsprop_run()
    run.trajectory.initial_state = {n: {"step": 1, "momentum_buffer": torch.zeros_like(v)}
                                    for n, v in run.trajectory.parameters[0].items()}
    with pytest.raises(em.ExplaindError, match="carried in"):
        reference_template(run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs)
