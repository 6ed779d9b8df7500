"""The adjoint's batch contraction without per-sample gradients (MATH.md §12, issue 15 item 4).

⟨grad_s(u), κ⟩ for the units u of step s's batch and the O · X covector rows κ of λ_s C_s + Φ_s E_s is either
the per-sample gradients (vmap∘grad) and a matrix product, or one forward-mode JVP of the vector of the batch's
per-sample losses along every row κ (vmapped over the rows): ``batch_contraction="gradients"`` / ``"jvp"`` force
one, ``"auto"`` picks by counted cost or memory. Both are exact: on random runs of every registered rule, random
parameter groupings and kept axes, partitions, h∘f targets, clipping, loss penalties and carried-in state, the
two give the same influences to 1e-12 of the L1 mass, and each forced path is the one that ran.
"""

from contextlib import contextmanager
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import explaind_math as em
from explaind_math.engine import adjoint as adjoint_module
from explaind_math.engine.plan import PathCosts, batch_contraction_costs, plan_adjoint
from explaind_math.errors import ExplaindError
from explaind_math.features import FunctionalModel
from explaind_math.testing import strategies as es
from explaind_math.testing.residuals import REPLAY_RTOL
from explaind_math.testing.small_runs import blob_loss, recorded_blob_run

VERIFIES = "adjoint"

AGREEMENT = 1e-12  # of 1 + the L1 mass of the compared tensor: only the order of the sums differs
QUADRATURE = em.gauss_legendre(8)
PARTS = ("regularization_sum", "penalty_sum", "carried_state_sum")


@contextmanager
def spied():
    """Counts the per-unit gradient evaluations of the backward pass (the summed buffer's replay pass is not
    one) and the JVPs of the per-sample losses."""
    counts = {"gradients": 0, "jvp": 0}
    step_gradients, jvp = adjoint_module.step_gradients, FunctionalModel.per_sample_loss_jvp

    def gradients(ctx, *args, **kwargs):
        counts["gradients"] += ctx.unit_labels != ["all"]
        return step_gradients(ctx, *args, **kwargs)

    def losses_jvp(self, *args, **kwargs):
        counts["jvp"] += 1
        return jvp(self, *args, **kwargs)

    with mock.patch.object(adjoint_module, "step_gradients", gradients), \
            mock.patch.object(FunctionalModel, "per_sample_loss_jvp", losses_jvp):
        yield counts


def _close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(expected.shape)}"
    scale = 1 + float(expected.abs().sum())
    err = float((got - expected).abs().max()) if expected.numel() else 0.0
    assert err <= AGREEMENT * scale, f"{what}: the JVP path differs from the gradient path by {err:.3e} (scale {scale:.3e})"


def both_paths(call, what: str) -> tuple[em.Influence, em.Influence]:
    """The decomposition by each forced path; asserts that each ran as asked and that they agree."""
    results = {}
    for way in ("gradients", "jvp"):
        with spied() as counts:
            results[way] = call(way)
        other = "jvp" if way == "gradients" else "gradients"
        assert results[way].accumulation == "adjoint"
        assert counts[way] > 0 and counts[other] == 0, f"{what}: batch_contraction={way!r} ran {counts}"
        assert any(n.startswith("batch contraction") for n in results[way].notes), results[way].notes
    by_gradients, by_jvp = results["gradients"], results["jvp"]
    _close(by_jvp.kernel, by_gradients.kernel, f"kernel, {what}")
    for part in PARTS:
        _close(getattr(by_jvp, part)(by_gradients.regularization_axes),
               getattr(by_gradients, part)(by_gradients.regularization_axes), f"{part}, {what}")
    _close(by_jvp.step_residuals, by_gradients.step_residuals, f"step residuals, {what}")
    assert by_jvp.relative_residual <= 1e-9 or by_jvp.relative_residual <= 2 * by_gradients.relative_residual + 1e-15
    return by_gradients, by_jvp


KEPT = [("unit",), ("param", "unit"), ("origin_step", "param", "unit")]


@es.property_settings(max_examples=10)
@given(data=st.data())
def test_jvp_and_gradient_paths_agree_on_random_runs(data, device):
    """Random models and every registered rule (groups, schedulers, frozen parameters), random kept axes and
    parameter groupings (a group of several tensors takes one JVP per row over all of them)."""
    spec = data.draw(es.training_runs(families=("mlp-tanh", "mlp-gelu", "cnn")), label="spec")
    kept = data.draw(st.sampled_from(KEPT), label="kept")
    params = data.draw(st.sampled_from(["tensor", "module", "all"]), label="params")
    run = es.train_and_record(spec, device=device)
    both_paths(lambda way: es.decompose(run, replay_rtol=REPLAY_RTOL, quadrature=QUADRATURE, params=params, keep=kept,
                                        accumulation="adjoint", batch_contraction=way), f"keep={kept}, params={params}")


@es.property_settings(max_examples=6)
@given(data=st.data())
def test_jvp_path_with_partitions_and_targets(data, device):
    """Partitions (Corollary F.2: the JVP values summed into each sample's group), h∘f (Corollary 3.3 i)."""
    spec = data.draw(es.training_runs(families=("mlp-tanh", "mlp-gelu")), label="spec")
    which = data.draw(st.sampled_from(["partition", "h"]), label="which")
    run = es.train_and_record(spec, device=device)
    args = (run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs)
    common = dict(keep=("param", "unit"), quadrature=QUADRATURE, replay_rtol=REPLAY_RTOL, dtype=torch.float64,
                  accumulation="adjoint")
    if which == "partition":
        labels = [u % 3 for u in range(max(run.trajectory.sample_ids()) + 1)]
        call = lambda way: em.decompose_by_partition(*args, labels, batch_contraction=way, **common)  # noqa: E731
    else:
        call = lambda way: em.decompose_function_of_output(  # noqa: E731
            *args, lambda v, y: torch.logsumexp(v, 0).reshape(1), batch_contraction=way, **common)
    both_paths(call, which)


def _clipped_penalized_run(seed: int):
    """AdamW with clip_grad_norm_ (recorded with gradient_rescaling), an L2 penalty inside the loss, state
    carried in from two warm-up steps."""
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(16, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (16,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    penalty = lambda p: 1e-3 * sum((v ** 2).sum() for v in p.values())  # noqa: E731

    def step(ids, recorder=None):
        optimizer.zero_grad()
        (F.cross_entropy(model(X[ids]), Y[ids]) + penalty(dict(model.named_parameters()))).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        if recorder is not None:
            recorder.record_batch(ids)
        optimizer.step()

    for _ in range(2):
        step(torch.randperm(16, generator=g)[:4])
    recorder = em.TrajectoryRecorder(model, optimizer, gradient_rescaling=True, record_gradients=True)
    for _ in range(3):
        step(torch.randperm(16, generator=g)[:4], recorder)
    recorder.close()
    return model, recorder.trajectory(), (X, Y), torch.randn(2, 4, generator=g, dtype=torch.float64), penalty


@pytest.mark.parametrize("vectorize", [True, False])
def test_jvp_path_with_clipping_penalty_and_carried_state(vectorize):
    """The clip factor c_t (from the replay pass) and the penalty's pseudo-unit on the JVP path; and the loops of
    ``vectorize=False`` (models vmap cannot batch)."""
    model, trajectory, data, xs, penalty = _clipped_penalized_run(3)
    by_gradients, by_jvp = both_paths(lambda way: em.decompose_training(
        model, trajectory, lambda out, y: F.cross_entropy(out, y), data, xs, penalty=penalty, keep=("param", "unit"),
        quadrature=QUADRATURE, accumulation="adjoint", batch_contraction=way, vectorize=vectorize), "clipping")
    assert max(abs(c - 1) for c in by_jvp.gradient_scales) > 1e-3  # clipping was active
    assert float(by_jvp.penalty.abs().sum()) > 0 and float(by_jvp.carried_state.abs().sum()) > 0


def test_auto_chooses_by_counted_cost_and_memory():
    model, traj, data, xs = recorded_blob_run(0, 3)
    run = lambda xs=xs, **kw: em.decompose_adamw_training(  # noqa: E731
        model, traj, blob_loss, data, xs, quadrature=QUADRATURE, accumulation="adjoint", **kw)

    def ran(result) -> str:
        note = next(n for n in result.notes if n.startswith("batch contraction"))
        return "jvp" if "JVP" in note else "gradients"

    # K = 3 test inputs × 3 outputs rows per group: the gradients and one matrix product are cheaper
    assert ran(run(keep=("param", "unit"))) == "gradients"
    # one test input, a scalar target, one group (K · G = 1): one JVP per step costs less than B gradients
    scalar = run(xs=xs[:1], keep=("unit",), params="all")
    assert ran(em.decompose_function_of_output(model, traj, blob_loss, data, xs[:1], lambda v, y: v[:1],
                                               keep=("unit",), params="all", quadrature=QUADRATURE,
                                               accumulation="adjoint")) == "jvp"
    assert ran(scalar) == "gradients"  # 3 outputs
    # a budget that splits every batch's per-sample gradients: the JVP path, which never holds them
    assert ran(run(keep=("param", "unit"), memory_budget="1GiB", train_chunk_size=2)) == "jvp"
    assert ran(run(keep=("param", "unit"), train_chunk_size=2)) == "gradients"  # no budget: cost decides
    # per coordinate only the gradients are sensible; a forced JVP is refused there
    assert ran(run(keep=("param", "unit"), params="coordinate")) == "gradients"
    with pytest.raises(ExplaindError, match="batch_contraction='jvp' with params='coordinate'"):
        run(keep=("param", "unit"), params="coordinate", batch_contraction="jvp")
    with pytest.raises(ExplaindError, match="batch_contraction must be one of"):
        run(keep=("param", "unit"), batch_contraction="vjp")


def test_counted_costs_of_the_two_batch_contractions():
    counted = PathCosts.counted(1000)
    jvp, gradients = batch_contraction_costs(rows=1, groups=1, batch=64, num_params=1000, costs=counted)
    assert jvp < gradients  # 64 directional passes vs 64 reverse passes + 64 · 1000 MACs
    jvp, gradients = batch_contraction_costs(rows=100, groups=4, batch=64, num_params=1000, costs=counted)
    assert jvp == 4 * 100 * 64 and gradients == pytest.approx(64 + 100 * 64 / 3)
    plan = plan_adjoint(contraction="auto", memory_budget=None, itemsize=8, num_params=1000, largest_group=1000,
                        num_test=10, num_outputs=10, largest_batch=64, kept_bytes=0, per_coordinate=False,
                        costs=None)
    assert plan.batch_mode_for_step(100, 4, 64) == "gradients" and plan.batch_mode_for_step(1, 1, 64) == "jvp"
    no_ad = plan_adjoint(contraction="auto", memory_budget=None, itemsize=8, num_params=1000, largest_group=1000,
                         num_test=10, num_outputs=10, largest_batch=64, kept_bytes=0, per_coordinate=False,
                         costs=None, forward_ad=False)
    assert no_ad.batch_mode_for_step(1, 1, 64) == "gradients"  # no forward-mode AD through the model
