"""Corollary 3.3 (i) h∘f and (ii) activations: the engine equals the reference implementations (MATH.md §6).

``reference_function_of_output`` takes Φ^h_t(x) = Σ_k w_k ∂_θ [h ∘ f](x; θ_t + α_k Δθ_t) (the chain rule
inside the integral), ``reference_activation`` Φ^a_t(x) = Σ_k w_k ∂_θ a(x; θ_t + α_k Δθ_t) with the forward
stopped at the module by a hook; both reuse the T_t(i), R_t of the run's optimizer (Theorem 3.1, Corollary
3.2, or the unrolled §4 template for every other rule). On random tanh/GELU MLPs trained by AdamW, Adam, SGD
or any other registered rule (RMSprop, Adagrad, Adamax, NAdam, RAdam, …), the engine with every axis kept and
params="coordinate" must equal them to 1e-12 of the L1 mass (same 8 Gauss–Legendre nodes), and both must
reconstruct h(f(x; θ_N)) (or a(x; θ_N)) to SMOOTH_RTOL · (1 + |Δ|).
"""

import torch
from hypothesis import given
from hypothesis import strategies as st

import explaind_math as em
from explaind_math import targets
from explaind_math.optimizers import RULES
from explaind_math.testing import strategies as es
from explaind_math.testing.references import assert_engine_equals_reference, reference_relative_residual
from explaind_math.testing.residuals import REPLAY_RTOL, SMOOTH_RTOL, assert_exact, report_residual
from explaind_math.theorems.activations import reference_activation
from explaind_math.theorems.post_composition import reference_function_of_output

THEOREM = "corollary_3_3"  # the row of `python -m explaind_math verify`
NODES = 8
MLPS = ("mlp-tanh", "mlp-gelu")
SCHEDULES = es.training_schedules(max_steps=4, max_samples=12)
#: half the runs by AdamW, Adam or SGD (the theorems' own literal T, R), half by every other registered rule
#: (the unrolled §4 template)
OTHER_RULES = tuple(r for r in RULES if r not in ("adamw", "sgd"))
RUNS = st.one_of(
    es.training_runs(families=MLPS, optimizer_kinds=("adamw", "adam", "sgd"), schedule_strategy=SCHEDULES),
    es.training_runs(families=MLPS, rules=OTHER_RULES, schedule_strategy=SCHEDULES))
OPTIONS = dict(params="coordinate", quadrature=em.gauss_legendre(NODES), replay_rtol=REPLAY_RTOL)


def _check(engine, reference, family: str, what: str) -> None:
    assert_engine_equals_reference(engine, reference, THEOREM, family)
    report_residual(THEOREM, family, assert_exact(engine, SMOOTH_RTOL, f"{what}: engine"),
                    f"relative residual, {what}, gauss_legendre({NODES})")
    residual = reference_relative_residual(reference)
    report_residual(THEOREM, family, residual, f"relative residual, {what}, reference gauss_legendre({NODES})")
    assert residual <= SMOOTH_RTOL, f"{what}: the reference reconstructs only to {residual:.2e}"


def _h(kind: str, run):
    """(h, test labels): the per-sample loss on the test inputs' labels, the predictive entropy, a random
    linear projection W f, or a non-linear map of the outputs."""
    if kind == "loss":
        return targets.per_sample_loss(run.loss_fn), run.train_data[1][: run.test_inputs.shape[0]]
    if kind == "entropy":
        return targets.predictive_entropy(), None
    if kind == "projection":
        O = run.f_before.shape[1]
        W = torch.randn(2, O, generator=torch.Generator().manual_seed(O), dtype=torch.float64)
        return targets.linear_projection(W), None
    return (lambda value, label: torch.stack([torch.tanh(value).sum(), (value**2).prod()])), None


@es.property_settings()
@given(spec=RUNS, kind=st.sampled_from(("loss", "entropy", "projection", "nonlinear")))
def test_corollary_3_3_function_of_output_engine_equals_reference(spec, kind):
    run = es.train_and_record(spec)
    h, labels = _h(kind, run)
    engine = em.decompose_function_of_output(run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs,
                                             h, test_labels=labels, **OPTIONS)
    reference = reference_function_of_output(run.model, run.trajectory, run.loss_fn, run.train_data,
                                             run.test_inputs, h, test_labels=labels, nodes=NODES)
    _check(engine, reference, run.family, f"h∘f ({kind})")


@es.property_settings()
@given(spec=RUNS, which=st.integers(0, 10), select_one=st.booleans())
def test_corollary_3_3_activation_engine_equals_reference(spec, which, select_one):
    run = es.train_and_record(spec)
    modules = [n for n, m in run.model.named_modules() if n and not isinstance(m, torch.nn.Sequential)]
    module = modules[which % len(modules)]
    select = (lambda a: a[..., :1]) if select_one else None
    engine = em.decompose_activation(run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs, module,
                                     select=select, **OPTIONS)
    reference = reference_activation(run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs, module,
                                     select=select, nodes=NODES)
    _check(engine, reference, run.family, f"activation {module!r}")
    after = set(modules[modules.index(module) + 1:])  # an MLP's modules are listed in forward order
    later = [j for j, label in enumerate(reference.param_labels) if label.split("[")[0].rsplit(".", 1)[0] in after]
    assert float(reference.kernel[:, later].abs().sum()) == 0.0, "parameters after the module must contribute 0"
