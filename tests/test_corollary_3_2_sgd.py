"""Corollary 3.2 (SGD with momentum), property-tested on random tiny models in float64 (MATH.md §3).

With momentum μ, dampening τ, coupled weight decay λ and c_{t,s} = μ^{t−s} (1 − τ)^{[s≥1]}:

    T_t(i) = Σ_{s≤t, i∈B_s} c_{t,s} g_{s,i},   R_t = Σ_{s≤t} c_{t,s} λ_s θ_s,
    f(x; θ_N) = f(x; θ_0) − Σ_t η_t Σ_i Φ_t(x) T_t(i) − Σ_t η_t Φ_t(x) R_t

(Nesterov: T_t(i) = g_{t,i} + μ Σ_s c_{t,s} g_{s,i}). Each example trains with the unmodified
``torch.optim.SGD`` (momentum 0 included, dampening, Nesterov, weight decay, maximize, parameter groups,
LambdaLR / StepLR / OneCycleLR which also cycles μ), records, and checks the certificate as in
``test_theorem_3_1_adamw.py``: replay ≤ 1e-10, live outputs to 1e-12, residual ≤ 1e-9 relative.
"""

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

import explaind_math as em
from explaind_math.testing import strategies as es
from explaind_math.testing.residuals import (
    REPLAY_RTOL,
    SMOOTH_RTOL,
    check_certificate,
    check_skipped_parameters,
)

THEOREM = "Corollary 3.2 (SGD with momentum)"


# Pinned: lr 1e-3 × 0.5 decayed by StepLR(γ = 0.1) every step, so the last step moves θ by ~1e-8 while
# |θ| ~ 1: its relative replay error (2.5e-9) is the rounding of the recorded θ_{t+1}, not of the replay.
# It failed a plain `max_replay_error ≤ 1e-10` and is why check_certificate adds the rounding floor.
_TINY_STEPS = es.RunSpec(
    model=es.ModelSpec(family="mlp-gelu", input_shape=(2,), num_outputs=2, hidden=(6, 2), loss="cross_entropy",
                       activation="gelu", bias=True, init_scale=2.0),
    optimizer=es.OptimizerSpec(
        kind="sgd",
        options=(("lr", 0.001), ("momentum", 0.2597), ("dampening", 0.0), ("nesterov", False),
                 ("weight_decay", 0.0), ("maximize", True)),
        groups=((0.5, 0.0),), assignment=(0, 0), schedule=es.ScheduleSpec(kind="step", gamma=0.1, step_size=1)),
    schedule=es.TrainingSchedule(num_samples=21, batch_sizes=(4, 4, 4, 4), weighting="sum", frozen_param=1),
    seed=4049, num_test=4)


@es.property_settings()
@given(spec=es.training_runs(families=es.SMOOTH_FAMILIES, optimizer_kinds=("sgd",)))
@example(spec=_TINY_STEPS)
def test_sgd_reconstruction_is_exact_on_smooth_models(spec, device):
    """Corollary 3.2 on tanh/GELU MLPs, CNNs and attention with every SGD flag: residual ≤ 1e-9 relative."""
    run = es.train_and_record(spec, device=device)
    result = es.decompose(run, replay_rtol=REPLAY_RTOL)
    assert result.theorem == THEOREM and result.quadrature == em.default_quadrature().describe()
    assert result.units == run.trajectory.sample_ids()
    check_certificate(run, result, SMOOTH_RTOL)
    check_skipped_parameters(run, result)
    if all(float(g["weight_decay"]) == 0 for g in run.optimizer.param_groups):
        assert float(result.regularization.abs().max()) == 0.0


@es.property_settings()
@given(spec=es.training_runs(
    families=es.SMOOTH_FAMILIES,
    optimizers_=es.sgd_optimizers(momentum=st.just(0.0), nesterov=False),
    schedule_strategy=es.training_schedules(freeze=False)))
def test_plain_gradient_descent_attributes_each_step_to_its_own_batch(spec, device):
    """μ = 0 (Bell et al.'s exact path kernel): c_{t,s} = [s = t], so a sample influences step t only
    if it is in B_t — I[t, :, :, i, :] is exactly 0 for i ∉ B_t — and the reconstruction is exact."""
    run = es.train_and_record(spec, device=device)
    result = es.decompose(run, replay_rtol=REPLAY_RTOL)
    check_certificate(run, result, SMOOTH_RTOL, family=f"{run.family} (μ = 0)")
    unit_axis = result.kernel_axes.index("unit")
    for t, step in enumerate(run.trajectory.steps):
        outside = [r for r, u in enumerate(result.units) if u not in set(step.sample_ids)]
        if outside:
            block = result.kernel[t].index_select(unit_axis - 1, _index(outside, result.kernel.device))
            assert float(block.abs().max()) == 0.0, f"step {t}: samples outside B_t have influence without momentum"


@es.property_settings()
@given(spec=es.training_runs(
    families=es.SMOOTH_FAMILIES,
    optimizers_=es.sgd_optimizers(momentum=st.floats(0.1, 0.95), nesterov=True)))
def test_nesterov_momentum_is_exact(spec, device):
    """Nesterov: θ_{t+1} = θ_t − η_t (d_t + μ b_t), i.e. D = ημ and E = η in the template of §4."""
    run = es.train_and_record(spec, device=device)
    assert all(g["nesterov"] and g["dampening"] == 0 for g in run.optimizer.param_groups)
    result = es.decompose(run, replay_rtol=REPLAY_RTOL)
    check_certificate(run, result, SMOOTH_RTOL, family=f"{run.family} (Nesterov)")


@es.property_settings()
@given(spec=es.training_runs(
    families=es.SMOOTH_FAMILIES,
    optimizers_=es.sgd_optimizers(momentum=st.floats(0.1, 0.95), nesterov=False),
    schedule_strategy=es.training_schedules(freeze=False)))
def test_momentum_carries_a_sample_into_later_steps(spec, device):
    """With μ > 0 and no dampening of the first step, a sample of B_s still moves θ at t > s: the unit
    axis of I at step t covers samples of earlier batches (and the reconstruction stays exact)."""
    run = es.train_and_record(spec, device=device)
    result = es.decompose(run, replay_rtol=REPLAY_RTOL)
    check_certificate(run, result, SMOOTH_RTOL, family=f"{run.family} (μ > 0)")
    steps = run.trajectory.steps
    row = {u: r for r, u in enumerate(result.units)}
    only_first = [u for u in steps[0].sample_ids if u not in set(steps[1].sample_ids)]
    if only_first:  # b_1 = μ b_0 + (1 − τ) d_1 holds μ g_{0,i} ≠ 0 for i ∈ B_0 \ B_1
        block = result.kernel[1][:, :, [row[u] for u in only_first]]
        assert float(block.abs().max()) > 0.0, "momentum did not carry step 0's samples into step 1"


@pytest.mark.slow
@es.property_settings(max_examples=150)
@given(spec=es.training_runs(
    families=es.SMOOTH_FAMILIES, optimizer_kinds=("sgd",),
    schedule_strategy=es.training_schedules(min_steps=4, max_steps=10, max_samples=32)))
def test_sgd_long_search(spec, device):
    """A longer search (``pytest -m slow``): up to 10 steps and 32 samples."""
    run = es.train_and_record(spec, device=device)
    result = es.decompose(run, replay_rtol=REPLAY_RTOL)
    check_certificate(run, result, SMOOTH_RTOL)
    check_skipped_parameters(run, result)


def _index(rows, device):
    return torch.as_tensor(rows, dtype=torch.long, device=device)
