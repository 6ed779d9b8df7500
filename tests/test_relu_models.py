"""ReLU networks: f is only piecewise polynomial along a segment, so the quadrature must adapt (MATH.md §1).

Along θ_t(α) = θ_t + α Δθ_t a ReLU MLP is a polynomial in α between kinks (the α where some
pre-activation of some test input crosses 0); at a kink ∂_α f jumps. A fixed rule is exact on each
piece but not across a jump, so plain ``gauss_legendre(8)`` leaves an O(jump × step) residual.

``adaptive(gauss_legendre(8), tol)`` bisects [a, b] until the EXACT segment residual
f(θ(b)) − f(θ(a)) − Φ_[a,b] Δθ_t is ≤ tol · (b − a) (or below the rounding of f), so accepted
segments add up to ≤ tol per step. A segment containing a kink, however, has a residual of
about |jump| · κ · (b − a) with κ ≤ max GL weight ≈ 0.18, proportional to its length like the budget:
bisection does not make it pass, and it is accepted at ``max_depth`` = 30, i.e. at length 2⁻³⁰ ≈ 1e-9.
Per step the residual is therefore ≤ tol + Σ_kinks |jump_k| · 0.18 · 2⁻³⁰, and a jump is at most
|w_out| · |Δ pre-activation| ≲ 1 for these models and step sizes. With tol = 1e-10 and ≤ 6 steps:

    relative residual ≤ RELU_RTOL = 1e-9

Measured (``HYPOTHESIS_PROFILE=thorough``, ~220 examples, 110 of them with bisected steps): at most
7.5e-12; the slow test with max_depth = 20 reached 8.6e-9 ≈ 2¹⁰ × 7.5e-12, the predicted 2^-max_depth
scaling. Each kink costs ~2 · max_depth segments of 8 nodes (488 nodes for a step with one kink).
"""

import pytest
from hypothesis import given
from hypothesis import strategies as st

import explaind_math as em
from explaind_math.testing import strategies as es
from explaind_math.testing.residuals import (
    REPLAY_RTOL,
    check_certificate,
    report_residual,
)

#: the verification command's row for this module: adaptive quadrature on kinks
VERIFIES = "quadrature"

#: adaptive tolerance per step, and the relative residual it achieves on ReLU MLPs (module docstring)
ADAPTIVE_TOL = 1e-10
RELU_RTOL = 1e-9


def relu_runs():
    """Small ReLU MLPs (hidden 2–8, 1–2 layers), 2–4 steps, 2–3 test inputs. Learning rates are larger
    than for the smooth families (Adam 0.01–0.05, SGD 0.005–0.03), so that segments cross kinks: between
    kinks a ReLU MLP is a polynomial of degree ≤ 3 in α, exact for 8 nodes whatever the step length."""
    return es.training_runs(
        model_strategy=es.mlp_models(activations=("relu",)),
        optimizers_=st.one_of(es.adamw_optimizers(lr=st.floats(0.01, 0.05)),
                              es.sgd_optimizers(lr=st.floats(0.005, 0.03))),
        schedule_strategy=es.training_schedules(max_steps=4, max_samples=16),
        num_test=st.integers(2, 3),
    )


@es.property_settings()
@given(spec=relu_runs(), keep=st.sampled_from([("step",), ("step", "param", "unit")]))
def test_relu_mlp_with_adaptive_quadrature(spec, keep, device):
    """ReLU MLPs, AdamW/Adam/SGD: adaptive(gauss_legendre(8), tol=1e-10) reconstructs to ≤ 1e-9 relative,
    on both contraction paths; steps without a kink take 8 nodes, steps with one take more."""
    run = es.train_and_record(spec, device=device)
    result = es.decompose(run, quadrature=em.adaptive(em.gauss_legendre(8), tol=ADAPTIVE_TOL), keep=keep,
                          replay_rtol=REPLAY_RTOL)
    assert result.quadrature == f"adaptive(gauss_legendre(8), tol={ADAPTIVE_TOL:g})"
    assert all(n >= 8 and n % 8 == 0 for n in result.nodes_per_step)
    bisected = sum(n > 8 for n in result.nodes_per_step)
    check_certificate(run, result, RELU_RTOL, family="mlp-relu (adaptive)" + (" bisected" if bisected else ""))
    # every step is certified on its own: the per-step residual obeys the same bound
    change = float((result.f_final - result.f_initial).abs().max())
    assert float(result.step_residuals.abs().max()) <= RELU_RTOL * (1 + change)


# A fixed run whose steps cross kinks (checked below): lr 0.05 moves pre-activations enough.
_KINKED = es.RunSpec(
    model=es.ModelSpec(family="mlp-relu", input_shape=(3,), num_outputs=2, hidden=(5,), loss="cross_entropy",
                       activation="relu", bias=True, init_scale=2.0),
    optimizer=es.OptimizerSpec(kind="adamw", options=(("lr", 0.05), ("betas", (0.9, 0.99)), ("weight_decay", 0.01))),
    schedule=es.TrainingSchedule(num_samples=12, batch_sizes=(5, 5, 2)),
    seed=0, num_test=4)


def test_plain_gauss_legendre_is_not_exact_on_relu_but_adaptive_is(device):
    """On a run whose segments cross kinks, 8 fixed nodes leave a residual many orders above the
    adaptive rule's; the adaptive rule bisected exactly the steps that plain GL got wrong."""
    run = es.train_and_record(_KINKED, device=device)
    plain = es.decompose(run, quadrature=em.gauss_legendre(8), keep=("step",), replay_rtol=REPLAY_RTOL)
    adaptive = es.decompose(run, quadrature=em.adaptive(em.gauss_legendre(8), tol=ADAPTIVE_TOL), keep=("step",),
                            replay_rtol=REPLAY_RTOL)
    check_certificate(run, adaptive, RELU_RTOL, family="mlp-relu (fixed, adaptive)")
    report_residual(adaptive.theorem, "mlp-relu (fixed, plain GL)", plain.relative_residual,
                    "negative control: relative residual, gauss_legendre(8)", steer=False)
    assert plain.relative_residual > 1e-6, f"plain GL(8) is {plain.relative_residual:.1e}: no kink was crossed?"
    assert adaptive.relative_residual < 1e-3 * plain.relative_residual
    plain_steps = plain.step_residuals.abs().amax(dim=(1, 2))
    for t, nodes in enumerate(adaptive.nodes_per_step):
        if float(plain_steps[t]) > 1e-8:  # a kink on this segment: the adaptive rule must have bisected
            assert nodes > 8, f"step {t}: plain residual {float(plain_steps[t]):.1e} but no bisection"


@pytest.mark.slow
@es.property_settings(max_examples=100)
@given(spec=relu_runs(), max_depth=st.sampled_from([20, 30]))
def test_relu_residual_scales_with_max_depth(spec, max_depth, device):
    """Slow: the residual on kinks is ∝ 2^-max_depth (module docstring); at depth 20 the bound is ~1e-6."""
    run = es.train_and_record(spec, device=device)
    result = es.decompose(run, quadrature=em.adaptive(em.gauss_legendre(8), tol=ADAPTIVE_TOL, max_depth=max_depth),
                          keep=("step",), replay_rtol=REPLAY_RTOL)
    bound = RELU_RTOL * 2 ** (30 - max_depth)
    check_certificate(run, result, bound, family=f"mlp-relu (adaptive, max_depth={max_depth})")
