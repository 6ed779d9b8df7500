"""The adjoint accumulation (MATH.md §12) equals the forward recursion of §4.

On random runs of every registered rule (parameter groups, LR schedulers, weightings, frozen parameters),
with random kept axes (units always; parameters per tensor, module, coordinate or summed; the origin step or
not), with gradient clipping, loss penalties, partitions (Corollary F.2), h∘f and activation targets
(Corollary 3.3): kernel, regularization, penalty and carried-state influences agree with the forward run to
1e-12 of their L1 mass, the residual is certified the same, and the origin-step totals per unit equal the
update-step totals per unit.
"""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import explaind_math as em
from explaind_math.engine.plan import MemoryBudgetError
from explaind_math.errors import ExplaindError
from explaind_math.optimizers import RULES
from explaind_math.testing import strategies as es
from explaind_math.testing.residuals import REPLAY_RTOL, replay_rounding_floor
from explaind_math.testing.small_runs import blob_loss, recorded_blob_run

VERIFIES = "adjoint"

AGREEMENT = 1e-12  # of 1 + the L1 mass of the compared tensor: only the order of the sums differs
QUADRATURE = em.gauss_legendre(8)  # the same nodes in both accumulations (an adaptive rule may pick others)


def _close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.shape == expected.shape, f"{what}: shape {tuple(got.shape)} vs {tuple(expected.shape)}"
    scale = 1 + float(expected.abs().sum())
    err = float((got - expected).abs().max()) if expected.numel() else 0.0
    assert err <= AGREEMENT * scale, f"{what}: adjoint differs from forward by {err:.3e} (scale {scale:.3e})"


def _agree(adjoint: em.Influence, forward: em.Influence, what: str, trajectory) -> None:
    """The two accumulations agree; every step's replay error is ≤ 1e-8 of max |Δθ_t| beyond the rounding floor of
    the recorded Δθ_t (16 ε max|θ| / max|Δθ_t|: an lr decayed by 10× per step makes late steps tiny next to θ)."""
    assert adjoint.accumulation == "adjoint" and forward.accumulation == "forward"
    _close(adjoint.kernel_sum(forward.kernel_axes), forward.kernel, f"kernel, {what}")
    for part in ("regularization_sum", "penalty_sum", "carried_state_sum"):
        _close(getattr(adjoint, part)(forward.regularization_axes), getattr(forward, part)(forward.regularization_axes),
               f"{part}, {what}")
    _close(adjoint.step_residuals, forward.step_residuals, f"step residuals, {what}")
    assert adjoint.relative_residual <= 1e-9 or adjoint.relative_residual <= 2 * forward.relative_residual + 1e-15
    floors = replay_rounding_floor(trajectory)
    assert len(adjoint.replay_errors) == len(floors)
    for t, (err, floor) in enumerate(zip(adjoint.replay_errors, floors)):
        assert err <= 1e-8 + floor, f"{what}: step {t}: replay error {err:.3e} > 1e-8 + rounding floor {floor:.1e}"


KEPT = [("unit",), ("param", "unit"), ("origin_step", "unit"), ("origin_step", "param", "unit")]


@pytest.mark.parametrize("rule", sorted(RULES))
@es.property_settings(max_examples=8)
@given(data=st.data())
def test_adjoint_equals_forward_for_every_rule(rule, data, device):
    """Every registered rule, random models, groups, schedulers, frozen parameters and kept axes."""
    spec = data.draw(es.training_runs(families=es.SMOOTH_FAMILIES, rules=(rule,)), label="spec")
    kept = data.draw(st.sampled_from(KEPT), label="kept")
    params = data.draw(st.sampled_from(["tensor", "module", "coordinate"]), label="params")
    run = es.train_and_record(spec, device=device)
    decompose = lambda **kw: es.decompose(run, replay_rtol=REPLAY_RTOL, quadrature=QUADRATURE, params=params, **kw)  # noqa: E731
    adjoint = decompose(keep=kept, accumulation="adjoint")
    forward = decompose(keep=tuple("step" if a == "origin_step" else a for a in kept), accumulation="forward")
    if "origin_step" in kept:
        assert adjoint.kernel_axes[0] == "origin_step" and forward.kernel_axes[0] == "step"
        # origin-step totals per unit = update-step totals per unit; per step they differ in general
        _close(adjoint.kernel_sum(("test", "unit", "output")), forward.kernel_sum(("test", "unit", "output")),
               "origin-step totals per unit")
        forward = decompose(keep=tuple(a for a in kept if a != "origin_step"), accumulation="forward")
    _agree(adjoint, forward, f"{rule}, keep={kept}, params={params}", run.trajectory)


@es.property_settings(max_examples=12)
@given(data=st.data())
def test_adjoint_with_partitions_targets_and_penalty(data, device):
    """Partitions (Corollary F.2), h∘f and activation targets (Corollary 3.3), a loss penalty, step subsampling."""
    spec = data.draw(es.training_runs(families=("mlp-tanh", "mlp-gelu")), label="spec")
    which = data.draw(st.sampled_from(["partition", "h", "activation", "subsampled"]), label="which")
    run = es.train_and_record(spec, device=device)
    args = (run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs)
    common = dict(keep=("param", "unit"), quadrature=QUADRATURE, replay_rtol=REPLAY_RTOL, dtype=torch.float64)
    if which == "partition":
        labels = [u % 3 for u in range(max(run.trajectory.sample_ids()) + 1)]
        call = lambda acc: em.decompose_by_partition(*args, labels, accumulation=acc, **common)  # noqa: E731
    elif which == "h":
        call = lambda acc: em.decompose_function_of_output(  # noqa: E731
            *args, lambda v, y: torch.logsumexp(v, 0).reshape(1), accumulation=acc, **common)
    elif which == "activation":
        first = next(n for n, m in run.model.named_modules() if isinstance(m, nn.Linear))
        call = lambda acc: em.decompose_activation(*args, first, accumulation=acc, **common)  # noqa: E731
    else:
        call = lambda acc: em.decompose_training(*args, decompose_steps=[0], accumulation=acc, **common)  # noqa: E731
    _agree(call("adjoint"), call("forward"), which, run.trajectory)


def _clipped_penalized_run(seed: int):
    """AdamW with clip_grad_norm_ (recorded with gradient_rescaling) and an L2 penalty inside the loss,
    state carried in from two warm-up steps, a frozen bias at one step."""
    g = torch.Generator().manual_seed(seed)
    X, Y = torch.randn(20, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (20,), generator=g)
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    penalty = lambda p: 1e-3 * sum((v ** 2).sum() for v in p.values())  # noqa: E731

    def step(ids, record=None):
        optimizer.zero_grad()
        params = dict(model.named_parameters())
        (F.cross_entropy(model(X[ids]), Y[ids]) + penalty(params)).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
        if record is not None:
            record.record_batch(ids)
        optimizer.step()

    for _ in range(2):
        step(torch.randperm(20, generator=g)[:5])
    recorder = em.TrajectoryRecorder(model, optimizer, gradient_rescaling=True, record_gradients=True)
    for _ in range(4):
        step(torch.randperm(20, generator=g)[:5], recorder)
    recorder.close()
    return model, recorder.trajectory(), (X, Y), torch.randn(3, 4, generator=g, dtype=torch.float64), penalty


@pytest.mark.parametrize("seed", [0, 1])
def test_adjoint_with_clipping_penalty_and_carried_state(seed):
    model, trajectory, data, xs, penalty = _clipped_penalized_run(seed)
    loss = lambda out, y: F.cross_entropy(out, y)  # noqa: E731
    run = lambda acc, keep: em.decompose_training(model, trajectory, loss, data, xs, penalty=penalty,  # noqa: E731
                                                  keep=keep, quadrature=QUADRATURE, accumulation=acc)
    adjoint, forward = run("adjoint", ("param", "unit")), run("forward", ("param", "unit"))
    assert adjoint.carried_state is not None and float(adjoint.carried_state.abs().sum()) > 0
    assert adjoint.penalty is not None and float(adjoint.penalty.abs().sum()) > 0
    assert max(abs(c - 1) for c in adjoint.gradient_scales) > 1e-3  # clipping was active
    _agree(adjoint, forward, f"clipping, penalty, carried state (seed {seed})", trajectory)
    origin = run("auto", ("origin_step", "param", "unit"))
    assert origin.accumulation == "adjoint" and origin.kernel_axes == ("origin_step", "param", "test", "unit", "output")
    _close(origin.carried_state_sum(("param", "test", "output")), forward.carried_state_sum(("param", "test", "output")),
           "carried state at origin step 0")
    assert float(origin.carried_state[1:].abs().max()) == 0.0


def test_choice_of_accumulation_and_refusals():
    model, traj, data, xs = recorded_blob_run(0, 3)
    run = lambda **kw: em.decompose_adamw_training(model, traj, blob_loss, data, xs, quadrature=QUADRATURE, **kw)  # noqa: E731
    every_axis = run()
    assert every_axis.accumulation == "forward" and "forward recursion" in every_axis.accumulation_reason
    auto = run(keep=("param", "unit"))
    assert auto.accumulation in ("forward", "adjoint") and "counted cost" in auto.accumulation_reason
    assert run(keep=("test",)).accumulation == "forward"
    with pytest.raises(ExplaindError, match="origin_step"):
        run(keep=("step", "unit"), accumulation="adjoint")
    with pytest.raises(ExplaindError, match="keep one of them"):
        run(keep=("step", "origin_step", "unit"))
    with pytest.raises(ExplaindError, match="accumulation='adjoint' or 'auto'"):
        run(keep=("origin_step", "unit"), accumulation="forward")
    with pytest.raises(ExplaindError, match="keep 'unit'"):
        run(keep=("param",), accumulation="adjoint")
    with pytest.raises(ExplaindError, match="accumulation must be one of"):
        run(accumulation="backward")


def test_memory_budget_refuses_forward_and_chunks_the_adjoints_test_inputs():
    """A budget that cannot hold U · D buffers: forward refused naming the sizes, auto runs the adjoint; a budget
    that holds λ of one test input only: the backward pass runs per test input, with the same result."""
    model, traj, data, xs = recorded_blob_run(1, 4)
    run = lambda **kw: em.decompose_adamw_training(model, traj, blob_loss, data, xs, quadrature=QUADRATURE,  # noqa: E731
                                                   keep=("param", "unit"), **kw)
    free = run(accumulation="adjoint")
    D = sum(p.numel() for p in model.parameters())
    per_test = 7 * 3 * D * 8
    kept = (4 * 4 * 3 * len(traj.sample_ids()) + 3 * 4 * 4 * 3) * 8  # tensors × test × output (× units), as planned
    budget = 8 * D * 8 + kept + 3 * per_test  # half the rest holds λ, κ, Φ of one test input, not two
    with pytest.raises(MemoryBudgetError, match="per-unit buffers"):
        run(accumulation="forward", memory_budget=1500)
    chunked = run(memory_budget=budget)
    assert chunked.accumulation == "adjoint"
    assert "test_chunk=1" in chunked.plan, chunked.plan
    _close(chunked.kernel, free.kernel, "test-chunked adjoint")


def test_adjoint_reads_a_sharded_trajectory_in_reverse(tmp_path):
    """A trajectory on disk (memory-mapped shards) gives the in-memory result."""
    model, traj, data, xs = recorded_blob_run(2, 3, steps=7)
    lazy = traj.save_directory(tmp_path / "run", steps_per_shard=2)
    assert isinstance(lazy, em.ShardedTrajectory)
    run = lambda t: em.decompose_adamw_training(model, t, blob_loss, data, xs, quadrature=QUADRATURE,  # noqa: E731
                                                keep=("param", "unit"), accumulation="adjoint")
    _close(run(lazy).kernel, run(traj).kernel, "sharded trajectory")
