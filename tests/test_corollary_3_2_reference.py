"""Corollary 3.2 (SGD with momentum): the engine equals the reference implementation entrywise (MATH.md §3).

``reference_sgd_momentum`` transcribes c_{t,s} = Π μ_r (1 − τ_s)^{[s ≥ 1]}, T_t(i) = Σ_s c_{t,s} g_{s,i},
R_t = Σ_s c_{t,s} λ_s θ_s (Nesterov: g_{t,i} + μ Σ_s …) literally with torch.func. On random tanh/GELU MLPs
trained by the unmodified torch.optim.SGD (momentum 0 or not, dampening, Nesterov, weight decay, maximize,
1–3 groups, a scheduler, random batches and weights, sometimes a parameter without gradient), the engine
with every axis kept and params="coordinate" must equal it to 1e-12 of the L1 mass, with the same 8
Gauss–Legendre nodes, and both must reconstruct f(x; θ_N) to SMOOTH_RTOL · (1 + |Δf|).
"""

from hypothesis import given

import explaind_math as em
from explaind_math.testing import strategies as es
from explaind_math.testing.references import assert_engine_equals_reference, reference_relative_residual
from explaind_math.testing.residuals import REPLAY_RTOL, SMOOTH_RTOL, check_certificate, report_residual
from explaind_math.theorems.sgd_momentum import reference_sgd_momentum

NODES = 8
MLPS = ("mlp-tanh", "mlp-gelu")


@es.property_settings()
@given(spec=es.training_runs(families=MLPS, optimizer_kinds=("sgd",),
                             schedule_strategy=es.training_schedules(max_steps=4, max_samples=12)))
def test_corollary_3_2_engine_equals_reference(spec):
    run = es.train_and_record(spec)
    engine = es.decompose(run, params="coordinate", quadrature=em.gauss_legendre(NODES), replay_rtol=REPLAY_RTOL)
    reference = reference_sgd_momentum(run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs,
                                       nodes=NODES)
    assert_engine_equals_reference(engine, reference, "Corollary 3.2 (SGD with momentum)", run.family)
    check_certificate(run, engine, SMOOTH_RTOL)
    residual = reference_relative_residual(reference)
    report_residual("Corollary 3.2 (SGD with momentum)", run.family, residual,
                    f"relative residual, reference gauss_legendre({NODES})")
    assert residual <= SMOOTH_RTOL, f"the reference reconstructs f(x; θ_N) only to {residual:.2e}"
