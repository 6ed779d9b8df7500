"""Corollary F.2 (partition accumulation): the engine equals the reference implementation (MATH.md §7).

``reference_partition`` forms T_t(S_k) = Σ_{i∈S_k} T_t(i) from the per-sample T_t(i) of the run's optimizer
(Theorem 3.1, Corollary 3.2, or the unrolled §4 template for every other rule) and I[t, j, x, k, o] =
−η_t Φ_t(x)[o, j] T_t(S_k)[j] literally with torch.func. The engine keeps one buffer per group (K·D memory)
and, for batches touching at most two groups, differentiates one weighted loss per group instead of every
sample: a different computation. On random tanh/GELU MLPs trained by AdamW, Adam, SGD or any other
registered rule, with random partitions (by label, random groups, one group "all"), every axis kept and
params="coordinate", the two must agree to 1e-12 of the L1 mass (same 8 Gauss–Legendre nodes), and both
must reconstruct f(x; θ_N) to SMOOTH_RTOL · (1 + |Δf|).
"""

import torch
from hypothesis import given
from hypothesis import strategies as st

import explaind_math as em
from explaind_math.optimizers import RULES
from explaind_math.testing import strategies as es
from explaind_math.testing.references import assert_engine_equals_reference, reference_relative_residual
from explaind_math.testing.residuals import REPLAY_RTOL, SMOOTH_RTOL, assert_exact, report_residual
from explaind_math.theorems.partition import reference_partition

THEOREM = "corollary_f_2"  # the row of `python -m explaind_math verify`
NODES = 8
MLPS = ("mlp-tanh", "mlp-gelu")
SCHEDULES = es.training_schedules(max_steps=4, max_samples=12)
#: half the runs by AdamW, Adam or SGD (the theorems' own literal T_t(i)), half by every other registered rule
#: (the unrolled §4 template)
OTHER_RULES = tuple(r for r in RULES if r not in ("adamw", "sgd"))
RUNS = st.one_of(
    es.training_runs(families=MLPS, optimizer_kinds=("adamw", "adam", "sgd"), schedule_strategy=SCHEDULES),
    es.training_runs(families=MLPS, rules=OTHER_RULES, schedule_strategy=SCHEDULES))


@es.property_settings()
@given(spec=RUNS, kind=st.sampled_from(("all", "random", "labels")), groups=st.integers(1, 4))
def test_corollary_F_2_engine_equals_reference(spec, kind, groups):
    run = es.train_and_record(spec)
    num_samples = run.train_data[0].shape[0]
    if kind == "all":
        partition = "all"
    elif kind == "random":
        partition = torch.randint(0, groups, (num_samples,), generator=torch.Generator().manual_seed(spec.seed))
    else:  # the labels of a classification run, the sign of the first target of a regression
        Y = run.train_data[1]
        partition = Y if Y.dim() == 1 else (Y[:, 0] > 0).long()
    engine = em.decompose_by_partition(run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs,
                                       partition, params="coordinate", quadrature=em.gauss_legendre(NODES),
                                       replay_rtol=REPLAY_RTOL)
    reference = reference_partition(run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs,
                                    partition, nodes=NODES)
    assert_engine_equals_reference(engine, reference, THEOREM, run.family)
    report_residual(THEOREM, run.family, assert_exact(engine, SMOOTH_RTOL), f"relative residual, gauss_legendre({NODES})")
    residual = reference_relative_residual(reference)
    report_residual(THEOREM, run.family, residual, f"relative residual, reference gauss_legendre({NODES})")
    assert residual <= SMOOTH_RTOL, f"the reference reconstructs f(x; θ_N) only to {residual:.2e}"
