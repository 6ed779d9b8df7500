"""Theorem 3.1 (AdamW), property-tested on random tiny models trained in float64 (MATH.md §1, §2, §5).

    f(x; θ_N) = f(x; θ_0) + Σ_{t,j,i} I[t, j, x, i, o] + Σ_{t,j} Ψ[t, j, x, o]

Each example trains a random model (tanh / GELU MLP, CNN, self-attention) with the UNMODIFIED
``torch.optim.AdamW`` or ``torch.optim.Adam`` (coupled or decoupled weight decay, amsgrad, maximize,
1–3 parameter groups, an LR scheduler incl. OneCycleLR which cycles β1), unequal batches with random
positive weights, and sometimes a parameter without gradient; the recorder watches; the decomposition
must then (a) rebuild every step from per-sample gradients (replay check ≤ 1e-10), (b) recompute
f(x; θ_0), f(x; θ_N) equal to the live model's outputs (1e-12), and (c) reconstruct f(x; θ_N) with
8 Gauss–Legendre nodes to 1e-9 · (1 + |f(x; θ_N) − f(x; θ_0)|) elementwise.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given
from hypothesis import strategies as st

import explaind_math as em
from explaind_math import ReplayMismatchError
from explaind_math.testing import strategies as es
from explaind_math.testing.residuals import (
    REPLAY_RTOL,
    SMOOTH_RTOL,
    check_certificate,
    check_skipped_parameters,
)

THEOREM = "Theorem 3.1 (AdamW)"


def _group_weight_decays(run) -> list[float]:
    return [float(g["weight_decay"]) for g in run.optimizer.param_groups]


# The first smooth example pins an Adam run whose last step is tiny next to θ (StepLR, γ = 0.1): its
# relative replay error is the rounding of the recorded θ_{t+1}, which check_certificate allows for.
_TINY_LAST_STEP = es.RunSpec(
    model=es.ModelSpec(family="mlp-tanh", input_shape=(2,), num_outputs=2, hidden=(7,), loss="mse",
                       activation="tanh", bias=True, init_scale=2.0),
    optimizer=es.OptimizerSpec(
        kind="adam",
        options=(("lr", 0.0479), ("betas", (0.0, 0.917)), ("eps", 1e-06), ("weight_decay", 0.275),
                 ("amsgrad", True), ("maximize", True), ("decoupled_weight_decay", True)),
        groups=((0.5, 0.0), (0.5, 0.0), (1.0, 0.2155)), assignment=(0, 2),
        schedule=es.ScheduleSpec(kind="step", gamma=0.1, step_size=1)),
    schedule=es.TrainingSchedule(num_samples=10, batch_sizes=(1, 1, 2, 2, 2, 1), weighting="mean", frozen_param=4),
    seed=889147, num_test=3)


@es.property_settings()
@given(spec=es.training_runs(families=es.SMOOTH_FAMILIES, optimizer_kinds=("adamw", "adam")))
@example(spec=_TINY_LAST_STEP)
def test_adamw_reconstruction_is_exact_on_smooth_models(spec, device):
    """Theorem 3.1 on tanh/GELU MLPs, CNNs and attention, every AdamW/Adam flag: residual ≤ 1e-9 relative."""
    run = es.train_and_record(spec, device=device)
    result = es.decompose(run, replay_rtol=REPLAY_RTOL)
    assert result.quadrature == em.default_quadrature().describe()
    assert result.theorem == THEOREM
    assert result.kernel_axes == ("step", "param", "test", "unit", "output")
    assert result.units == run.trajectory.sample_ids()
    check_certificate(run, result, SMOOTH_RTOL)
    # a parameter whose .grad was None at a step was skipped by PyTorch and carries no influence there
    check_skipped_parameters(run, result)
    # with no weight decay anywhere there is nothing for Ψ to hold
    if all(wd == 0 for wd in _group_weight_decays(run)):
        assert float(result.regularization.abs().max()) == 0.0


@es.property_settings()
@given(spec=es.training_runs(
    families=es.SMOOTH_FAMILIES,
    optimizers_=es.adamw_optimizers(kinds=("adam",), coupled=True, weight_decay=st.floats(1e-3, 0.3))))
def test_adam_with_coupled_l2_weight_decay_is_exact(spec, device):
    """torch.optim.Adam(decoupled_weight_decay=False): λθ_t enters both moments; v_t is recorded, so the
    decay pseudo-unit flows linearly through the first moment and the reconstruction stays exact."""
    run = es.train_and_record(spec, device=device)
    assert all(not g["decoupled_weight_decay"] for g in run.optimizer.param_groups)
    result = es.decompose(run, replay_rtol=REPLAY_RTOL)
    check_certificate(run, result, SMOOTH_RTOL)
    if any(wd > 0 for wd in _group_weight_decays(run)):
        assert float(result.regularization.abs().max()) > 0.0, "coupled weight decay left no trace in Ψ"


@es.property_settings()
@given(spec=es.training_runs(families=es.SMOOTH_FAMILIES, losses=("cross_entropy",),
                             optimizer_kinds=("adamw", "adam", "sgd")))
def test_cross_entropy_on_raw_logits_is_exact(spec, device):
    """``F.cross_entropy`` on unnormalized logits (the model has no softmax head) is decomposed exactly,
    with AdamW/Adam and SGD alike; and handing the decomposition a loss that assumes log-probabilities
    (``F.nll_loss`` on the same raw logits, the first implementation's mistake) is refused, not
    silently mis-attributed."""
    run = es.train_and_record(spec, device=device)
    outputs = run.f_after
    assert float(torch.logsumexp(outputs, dim=-1).abs().max()) > 1e-6, "outputs are normalized: not raw logits"
    result = es.decompose(run, replay_rtol=REPLAY_RTOL)
    check_certificate(run, result, SMOOTH_RTOL, family=f"{run.family} (raw-logit CE)")
    assert all(step.gradient is not None for step in run.trajectory.steps)
    with pytest.raises(ReplayMismatchError):
        es.decompose(run, replay_rtol=REPLAY_RTOL, loss_fn=lambda out, y: F.nll_loss(out, y))


@pytest.mark.slow
@es.property_settings(max_examples=150)
@given(spec=es.training_runs(
    families=es.SMOOTH_FAMILIES, optimizer_kinds=("adamw", "adam"),
    schedule_strategy=es.training_schedules(min_steps=4, max_steps=10, max_samples=32)))
def test_adamw_long_search(spec, device):
    """A longer search (``pytest -m slow``): up to 10 steps and 32 samples."""
    run = es.train_and_record(spec, device=device)
    result = es.decompose(run, replay_rtol=REPLAY_RTOL)
    check_certificate(run, result, SMOOTH_RTOL)
    check_skipped_parameters(run, result)
