"""Deep linear networks: the quadrature is exact, so the decomposition is exact to rounding (MATH.md §1).

For f(x; θ) = W_L ⋯ W_2 W_1 x (biases optional), every coordinate of f is a polynomial of degree L
in θ. Along a segment θ_t + α Δθ_t, ∂_θ f(x; θ_t(α)) is a polynomial of degree L − 1 in α, and
Gauss–Legendre with n nodes integrates degree ≤ 2n − 1 exactly, so n = ceil(L / 2) nodes give Φ_t(x)
exactly and the residual is pure rounding: ≤ 1e-12 relative in float64. With fewer nodes the rule
is not exact for L ≥ 3 (degree L − 1 > 2n − 1), which the fixed examples below show — a test that
would fail if the quadrature or the step residual were computed differently from what §1 says.
"""

import math


import pytest
from hypothesis import given
from hypothesis import strategies as st

import explaind_math as em
from explaind_math.testing import strategies as es
from explaind_math.testing.residuals import (
    POLYNOMIAL_RTOL,
    REPLAY_RTOL,
    assert_exact,
    check_certificate,
    report_residual,
)

#: the verification command's row for this module: these tests are about the quadrature being exact
VERIFIES = "quadrature"


def exact_nodes(num_layers: int) -> int:
    """The fewest Gauss–Legendre nodes exact for degree L − 1: 2n − 1 ≥ L − 1."""
    return max(1, math.ceil(num_layers / 2))


@es.property_settings()
@given(spec=es.training_runs(model_strategy=es.deep_linear_models()),  # an optimizer of every registered rule
       keep=st.sampled_from([("step", "param", "unit"), ("step",)]))
def test_deep_linear_is_exact_with_ceil_half_L_nodes(spec, keep, device):
    """L = 1..6 layers, every registered optimizer rule, Jacobian or JVP contraction: gauss_legendre(ceil(L/2))
    ≤ 1e-12."""
    run = es.train_and_record(spec, device=device)
    L = spec.model.num_layers
    n = exact_nodes(L)
    result = es.decompose(run, quadrature=em.gauss_legendre(n), keep=keep, replay_rtol=REPLAY_RTOL)
    assert result.nodes_per_step == [n] * run.trajectory.num_steps
    check_certificate(run, result, POLYNOMIAL_RTOL, family=f"deep-linear L={L}")


# Fixed examples: lr large enough that the degree-(L−1) part of the integrand is visible.
_FIXED = {
    L: es.RunSpec(
        model=es.ModelSpec(family="deep-linear", input_shape=(3,), num_outputs=2, hidden=(3,) * (L - 1),
                           loss="mse", bias=True, init_scale=2.0),
        optimizer=es.OptimizerSpec(kind="adamw", options=(("lr", 0.1), ("weight_decay", 0.05))),
        schedule=es.TrainingSchedule(num_samples=12, batch_sizes=(4, 4, 3)),
        seed=1234 + L, num_test=3)
    for L in (3, 4, 5, 6)
}


@pytest.mark.parametrize("num_layers", sorted(_FIXED))
def test_fewer_nodes_are_not_exact_for_three_or_more_layers(num_layers, device):
    """With n = ceil(L/2) nodes the residual is rounding (≤ 1e-12); with n − 1 nodes (or 1 for L ≤ 4)
    the Gauss–Legendre rule misses the top-degree terms of ∂_α f and the residual is far larger."""
    run = es.train_and_record(_FIXED[num_layers], device=device)
    n = exact_nodes(num_layers)
    exact = es.decompose(run, quadrature=em.gauss_legendre(n), replay_rtol=REPLAY_RTOL)
    check_certificate(run, exact, POLYNOMIAL_RTOL, family=f"deep-linear L={num_layers} (fixed)")
    fewer = es.decompose(run, quadrature=em.gauss_legendre(n - 1 if n > 1 else 1), keep=("step",))
    if n == 1:  # pragma: no cover - L ≤ 2 is not in _FIXED
        pytest.skip("one node is already exact")
    report_residual("deep linear, too few nodes", f"deep-linear L={num_layers}", fewer.relative_residual,
                    f"negative control: relative residual, gauss_legendre({n - 1})", steer=False)
    assert fewer.relative_residual > 1e-9, (
        f"L = {num_layers}: gauss_legendre({n - 1}) reconstructs to {fewer.relative_residual:.2e}; "
        "it cannot be exact for an integrand of degree L − 1 > 2n − 3")
    # the residual says which steps are uncertified: every step moved, so every step misses something
    assert (fewer.step_residuals.abs().amax(dim=(1, 2)) > 1e-12).all()
    # and the certificate stays truthful: the reported residual is f(θ_N) − reconstruction
    assert_exact(exact, POLYNOMIAL_RTOL)


@es.property_settings()
@given(spec=es.training_runs(model_strategy=es.deep_linear_models(layers=st.integers(3, 6))))  # every rule
def test_more_nodes_than_needed_stay_exact(spec, device):
    """Adding nodes beyond ceil(L/2) changes nothing but rounding: 8 nodes agree with ceil(L/2) nodes
    on every atomic score to 1e-12 (Φ_t is the same polynomial integral)."""
    run = es.train_and_record(spec, device=device)
    L = spec.model.num_layers
    few = es.decompose(run, quadrature=em.gauss_legendre(exact_nodes(L)), replay_rtol=REPLAY_RTOL)
    many = es.decompose(run, quadrature=em.gauss_legendre(8), replay_rtol=REPLAY_RTOL)
    assert_exact(many, POLYNOMIAL_RTOL)
    scale = 1 + float(many.kernel.abs().max())
    assert float((few.kernel - many.kernel).abs().max()) <= 1e-12 * scale
    assert float((few.regularization - many.regularization).abs().max()) <= 1e-12 * scale
