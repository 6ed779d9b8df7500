"""Theorem 3.1 (AdamW): the engine equals the reference implementation entrywise (MATH.md §2, §5).

``reference_adamw`` transcribes T_t(i) = P_t ⊙ Σ_s (1 − β1_s) Π β1_r σ_s g_{s,i}, R_t and
I[t, j, x, i, o] = −η_t Φ_t(x)[o, j] T_t(i)[j] literally with torch.func. On random tanh/GELU MLPs trained
by the unmodified torch.optim.AdamW / Adam (coupled or decoupled decay, amsgrad, maximize, 1–3 groups, a
scheduler, random batches and weights, sometimes a parameter without gradient), the engine with every axis
kept and params="coordinate" must equal it to 1e-12 of the L1 mass, with the same 8 Gauss–Legendre nodes,
and both must reconstruct f(x; θ_N) to SMOOTH_RTOL · (1 + |Δf|).
"""

import torch
from hypothesis import given

import explaind_math as em
from explaind_math.testing import strategies as es
from explaind_math.testing.references import assert_engine_equals_reference, reference_relative_residual
from explaind_math.testing.residuals import REPLAY_RTOL, SMOOTH_RTOL, check_certificate, report_residual
from explaind_math.theorems.adamw import reference_adamw

NODES = 8
MLPS = ("mlp-tanh", "mlp-gelu")


@es.property_settings()
@given(spec=es.training_runs(families=MLPS, optimizer_kinds=("adamw", "adam"),
                             schedule_strategy=es.training_schedules(max_steps=4, max_samples=12)))
def test_theorem_3_1_engine_equals_reference(spec):
    run = es.train_and_record(spec)
    engine = es.decompose(run, params="coordinate", quadrature=em.gauss_legendre(NODES), replay_rtol=REPLAY_RTOL)
    reference = reference_adamw(run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs, nodes=NODES)
    assert_engine_equals_reference(engine, reference, "Theorem 3.1 (AdamW)", run.family)
    check_certificate(run, engine, SMOOTH_RTOL)
    residual = reference_relative_residual(reference)
    report_residual("Theorem 3.1 (AdamW)", run.family, residual, f"relative residual, reference gauss_legendre({NODES})")
    assert residual <= SMOOTH_RTOL, f"the reference reconstructs f(x; θ_N) only to {residual:.2e}"


def test_reference_adamw_refuses_carried_state():
    _, trajectory, data, X_test = _blob_run()
    trajectory.initial_state = {n: {"step": 1, "exp_avg": torch.zeros_like(v)}
                                for n, v in trajectory.parameters[0].items()}
    try:
        reference_adamw(torch.nn.Identity(), trajectory, None, data, X_test)
    except em.ExplaindError as error:
        assert "carried in" in str(error)
    else:
        raise AssertionError("reference_adamw accepted optimizer state carried in from before the recording")


def _blob_run():
    from explaind_math.testing.small_runs import recorded_blob_run

    return recorded_blob_run(0, 2, steps=2)
