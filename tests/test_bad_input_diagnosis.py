"""Errors that name the actual cause (issue 17, category 4): when the gradient-sum or the replay check
fails, the most likely cause is named with its fix; wrong inputs to the decomposition are errors naming
the argument, never torch shape errors, IndexError, TypeError or KeyError from inside the engine."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em
from explaind_math.errors import ExplaindError, ReplayMismatchError

DT = torch.float64
N = 24
OLD_HINT = "weighted sum of per-sample losses"  # the phrase the existing tests match stays


def _data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, 4, generator=g, dtype=DT), torch.randint(0, 3, (N,), generator=g)


class _Net(nn.Module):
    def __init__(self, how=None, activation=nn.Tanh):
        super().__init__()
        torch.manual_seed(1)
        self.how, self.temperature = how, 1.0
        self.a, self.act, self.b = nn.Linear(4, 5).to(DT), activation(), nn.Linear(5, 3).to(DT)

    def forward(self, x):
        if self.how == "noise":
            x = x + 0.1 * torch.randn_like(x)
        elif self.how == "augmentation":
            x = torch.where(torch.rand(x.shape[0], 1, dtype=x.dtype) < 0.5, -x, x)
        return self.b(self.act(self.a(x))) / self.temperature


def _train(model, *, optimizer="sgd", steps=3, loss=None, recorded=None, before_step=None, **recorder):
    X, Y = _data()
    opt = (torch.optim.SGD(model.parameters(), lr=0.1) if optimizer == "sgd" else
           torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.0))
    rec = em.TrajectoryRecorder(model, opt, **recorder)
    for t in range(steps):
        ids = torch.arange(5 * t, 5 * t + 5) % N
        opt.zero_grad()
        out = model(X[ids])
        (loss(out, Y[ids]) if loss is not None else F.cross_entropy(out, Y[ids])).backward()
        if before_step is not None:
            before_step(model)
        rec.record_batch(recorded(t, ids) if recorded is not None else ids)
        opt.step()
    return rec.trajectory(), X, Y


def _decompose(model, traj, X, Y, loss=F.cross_entropy, **kw):
    fn = em.decompose_adamw_training if traj.optimizer == "adamw" else em.decompose_sgd_momentum_training
    return fn(model, traj, loss, (X, Y), X[:3], keep=("step",), **kw)


# ---------------------------------------------------------------------------------------------
# the gradient-sum check names the cause


@pytest.mark.parametrize("how", ["noise", "augmentation"])
@pytest.mark.parametrize("vectorize", [True, False])
def test_torch_randomness_in_the_forward_is_named(how, vectorize):
    model = _Net(how)
    traj, X, Y = _train(model, check_modules=False)  # past the record-time probe
    with pytest.raises(em.errors.StochasticTrainingError, match=r"forward draws random numbers"):
        _decompose(model, traj, X, Y, vectorize=vectorize)  # vmap refuses the random operation: named


def test_python_randomness_in_the_forward_is_named_by_recomputing():
    import random

    class Jitter(_Net):
        def forward(self, x):
            return super().forward(x) * (1 + 0.1 * random.random())

    model = Jitter()
    traj, X, Y = _train(model, check_modules=False)  # past the record-time probe
    with pytest.raises(ReplayMismatchError, match=rf"{OLD_HINT}.*Most likely cause: randomness in the forward"):
        _decompose(model, traj, X, Y)


def test_clipping_without_gradient_rescaling_is_named_with_its_fix():
    model = _Net()
    traj, X, Y = _train(model, before_step=lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), 0.01))
    with pytest.raises(ReplayMismatchError, match=r"Most likely cause: one global factor: .* gradient clipping by norm"
                                                  r".*gradient_rescaling=True"):
        _decompose(model, traj, X, Y)


def test_an_unscaled_loss_scale_is_named():
    model = _Net()
    traj, X, Y = _train(model, loss=lambda out, y: 1024.0 * F.cross_entropy(out, y))
    with pytest.raises(ReplayMismatchError, match=r"one global factor: the gradient is 1024 .* a loss scale"):
        _decompose(model, traj, X, Y)


@pytest.mark.parametrize("trained, recorded_as, match", [
    ("sum", "mean", r"c = 5 = the batch size: the loss was summed but recorded as a mean.*reduction='sum'"),
    ("mean", "sum", r"c = 0.2 = 1/batch size: the loss was a mean but recorded as a sum"),
])
def test_reduction_recorded_wrongly_is_named(trained, recorded_as, match):
    X, Y = _data()
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(2):
        ids = torch.arange(5 * t, 5 * t + 5)
        opt.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids], reduction=trained).backward()
        rec.record_batch(ids, reduction=recorded_as)
        opt.step()
    with pytest.raises(ReplayMismatchError, match=match):
        _decompose(model, rec.trajectory(), X, Y)


def test_positions_instead_of_ids_are_named():
    model = _Net()
    traj, X, Y = _train(model, recorded=lambda t, ids: list(range(len(ids))))
    with pytest.raises(ReplayMismatchError, match=r"Most likely cause: the ids are positions within the batch"):
        _decompose(model, traj, X, Y)


def test_another_architecture_at_decomposition_is_named():
    traj, X, Y = _train(_Net())
    other = _Net(activation=nn.Sigmoid)  # same parameter names and shapes
    with pytest.raises(ReplayMismatchError, match=r"it fails from the first step: the model, loss_fn or train_data"):
        _decompose(other, traj, X, Y)


def test_a_temperature_changed_after_training_is_named():
    model = _Net()
    traj, X, Y = _train(model)
    model.temperature = 2.0
    with pytest.raises(ReplayMismatchError, match=r"first step: .*a module attribute such as a temperature"):
        _decompose(model, traj, X, Y)


def test_another_loss_at_decomposition_is_named():
    model = _Net()
    traj, X, Y = _train(model)
    with pytest.raises(ReplayMismatchError, match=r"it fails from the first step"):
        _decompose(model, traj, X, Y, loss=lambda out, y: F.cross_entropy(out, y, label_smoothing=0.2))


def test_data_changed_at_a_later_step_is_named():
    model = _Net()
    traj, X, Y = _train(model)
    X2 = X.clone()
    X2[10:15] += 1.0  # the samples of step 2 only
    with pytest.raises(ReplayMismatchError, match=r"step 2.*steps 0..1 passed, so something changed at step 2"):
        _decompose(model, traj, X2, Y)


# ---------------------------------------------------------------------------------------------
# the replay check names the cause


def test_learning_rate_other_than_recorded_is_a_global_factor_of_the_update():
    model = _Net()
    traj, X, Y = _train(model, record_gradients=False)
    traj.steps[1].hyperparameters[0]["lr"] = 0.05  # the recorded lr is half the one used
    with pytest.raises(ReplayMismatchError, match=r"step 1.*the update is 2 × the one rebuilt"):
        _decompose(model, traj, X, Y)


def test_replaced_optimizer_state_is_named_by_the_step_count():
    model = _Net()
    traj, X, Y = _train(model, optimizer="adamw")
    for n in traj.parameter_names:
        traj.steps[2].state[n]["step"] = 1  # as after optimizer.load_state_dict of a fresh state
    with pytest.raises(ReplayMismatchError, match=r"changed optimizer state: the step count of '.+' goes from 2 at "
                                                  r"step 1 to 1 at step 2"):
        _decompose(model, traj, X, Y)


def test_without_recorded_gradients_the_replay_points_to_record_gradients():
    model = _Net()
    traj, X, Y = _train(model, record_gradients=False)
    with pytest.raises(ReplayMismatchError, match=r"Is the training loss a weighted sum.*record_gradients=True"):
        _decompose(model, traj, X, Y, loss=lambda out, y: F.cross_entropy(out, y, label_smoothing=0.2))


def test_edited_second_moment_is_named_as_optimizer_state():
    model = _Net()
    traj, X, Y = _train(model, optimizer="adamw")
    for n in traj.parameter_names:
        traj.steps[1].state[n]["exp_avg_sq"] = traj.steps[1].state[n]["exp_avg_sq"] * 3.0
    with pytest.raises(ReplayMismatchError, match=r"step 1.*(optimizer state or hyper-parameters used differ|global "
                                                  r"factor)"):
        _decompose(model, traj, X, Y)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_mismatch_of_a_few_rounding_units_is_named_as_precision(dtype):
    from types import SimpleNamespace

    from explaind_math.engine.diagnosis import diagnose_gradient_mismatch

    model = _Net()
    traj, _, _ = _train(model)
    traj = SimpleNamespace(steps=traj.steps, num_steps=traj.num_steps, dtype=dtype)
    eps = torch.finfo(dtype).eps
    recorded = {"w": torch.ones(3, dtype=DT)}
    ours = {"w": torch.ones(3, dtype=DT) + torch.tensor([0.0, 20 * eps, 0.0], dtype=DT)}
    ctx = SimpleNamespace(trajectory=traj, eps_train=eps)
    text = diagnose_gradient_mismatch(ctx, 1, ours, recorded, recompute=None)
    assert text.startswith("Most likely cause: precision") and f"{dtype}" in text and "replay_rtol" in text, text


# ---------------------------------------------------------------------------------------------
# wrong inputs: errors naming the argument


@pytest.fixture(scope="module")
def trained():
    model = _Net()
    traj, X, Y = _train(model)
    return model, traj, X, Y


@pytest.mark.parametrize("call, match", [
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, (X, Y), X[:3, :2]),
     r"test_inputs: the model fails on one test input \(shape \(2,\)"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, (X, Y), X[0]), r"test_inputs: the model fails on one test input \(shape \(\)"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, (X, Y), X[:0]), r"test_inputs is empty \(shape \(0, 4\)\)"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, (X, Y), [X[0], X[1]]), r"test_inputs must be a tensor .* got list; torch.stack"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, (X, Y), None), r"test_inputs must be a tensor .* got NoneType"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, (X, Y), torch.tensor(1.0)), r"got a 0-dim tensor"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, (X, Y), torch.ones(3, 4, dtype=torch.long)),
     r"test_inputs: the model fails .*dtype torch.int64"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, (X[:, :2], Y), X[:3]), r"train_data: the model fails on training sample 0"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, (X, Y[:, None]), X[:3]),
     r"loss_fn fails on one sample: .*target \(shape \(1,\).*not shape \(B, 1\)"),
    (lambda m, tr, X, Y: _fn(m, tr, lambda o, y: F.nll_loss(o.log_softmax(1), y), (X, Y), X[:3]),
     r"loss_fn fails on one sample: it is called per sample with the model's unbatched output \(shape \(3,\)"),
    (lambda m, tr, X, Y: _fn(m, tr, "cross_entropy", (X, Y), X[:3]), r"loss_fn must be a callable .* got str"),
    (lambda m, tr, X, Y: _fn(m, tr, lambda o, y: 1.0, (X, Y), X[:3]), r"must return the loss of ONE sample as a scalar tensor; got float"),
    (lambda m, tr, X, Y: _fn(m, tr, lambda o, y: F.cross_entropy(o, y, reduction="none") * torch.ones(2, dtype=DT), (X, Y), X[:3]),
     r"(loss_fn fails on one sample|ONE sample as a scalar)"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, (X, Y), X[:3], test_labels=Y[:2]), r"3 test inputs but 2 test labels"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, (X[:5], Y[:5]), X[:3]), r"sample ids \[5, 6, 7, 8, 9\] are not in the training data"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, (X, Y[:5]), X[:3]), r"training data: 24 inputs but 5 targets"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, [(X[i], Y[i]) for i in range(5)], X[:3]), r"sample id 5 is not in the training data"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, {i: (X[i], Y[i]) for i in range(3)}, X[:3]), r"sample id 3 is not in the training data"),
    (lambda m, tr, X, Y: _fn(nn.Linear(4, 3).to(DT), tr, F.cross_entropy, (X, Y), X[:3]), r"the trajectory has parameters"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, (X, Y), X[:3], decompose_steps=[7]), r"decompose_steps selects none"),
    (lambda m, tr, X, Y: _fn(m, tr, F.cross_entropy, (X, Y), X[:3], keep="step"), r"keep must be a sequence of axis names"),
])
def test_wrong_input_is_an_error_naming_the_argument(trained, call, match):
    model, traj, X, Y = trained
    with pytest.raises(ExplaindError, match=match):
        call(model, traj, X, Y)


def _fn(model, traj, loss, data, test_inputs, **kw):
    return em.decompose_sgd_momentum_training(model, traj, loss, data, test_inputs, **kw)


def test_float32_test_inputs_are_cast_and_exact(trained):
    model, traj, X, Y = trained
    result = _fn(model, traj, F.cross_entropy, (X, Y), X[:3].float())
    assert result.relative_residual <= 1e-6


def test_zeroed_first_moment_on_resume_is_named_as_optimizer_state(tmp_path):
    """The resume check compares the recorded state (step counts, exp_avg_sq); exp_avg is not recorded per step,
    so a zeroed one surfaces at the replay, which names the optimizer state and the resume."""
    from explaind_math.testing.sharded_runs import make_data, make_training, train_step

    X, Y = make_data()
    model, opt, sched = make_training("adamw")
    with em.TrajectoryRecorder(model, opt, directory=tmp_path) as rec:
        for t in range(3):
            train_step(model, opt, sched, X, Y, t, rec)
    for state in opt.state.values():
        state["exp_avg"].zero_()
    with em.TrajectoryRecorder(model, opt, directory=tmp_path) as rec:
        for t in range(3, 5):
            train_step(model, opt, sched, X, Y, t, rec)
    with pytest.raises(ReplayMismatchError, match=r"step 3.*Most likely cause: the optimizer state .* not restored "
                                                  r"when recording resumed"):
        em.decompose_adamw_training(model, em.Trajectory.load(tmp_path), F.cross_entropy, (X, Y), X[:3])


# ---------------------------------------------------------------------------------------------
# a GradScaler skip without grad_scaler=: the skipped batch is merged into the next step


def _grad_scaler_loop_without_telling_the_recorder(**recorder):
    X, Y = _data()
    X32 = X.float()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3))
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    rec = em.TrajectoryRecorder(model, opt, **recorder)
    for t in range(4):
        ids = torch.arange(5 * t, 5 * t + 5)
        opt.zero_grad()
        loss = F.cross_entropy(model(X32[ids]), Y[ids])
        if t == 1:
            loss = loss * float("inf")  # the scaler skips optimizer.step() for this batch
        scaler.scale(loss).backward()
        rec.record_batch(ids)
        scaler.step(opt)
        scaler.update()
    return model, rec.trajectory(), X32, Y


def test_a_grad_scaler_skip_without_grad_scaler_is_named(tmp_path):
    model, traj, X, Y = _grad_scaler_loop_without_telling_the_recorder()
    assert traj.num_steps == 3 and traj.steps[1].batch_calls == [list(range(5, 10)), list(range(10, 15))]
    assert traj.steps[0].batch_calls is None and traj.steps[2].batch_calls is None
    # the record_batch calls survive both file forms
    for loaded in (em.Trajectory.load(traj.save(tmp_path / "run.safetensors")),
                   traj.save_directory(tmp_path / "run", steps_per_shard=2)):
        assert [s.batch_calls for s in loaded.steps] == [s.batch_calls for s in traj.steps]
    with pytest.raises(ExplaindError, match=r"(?s)2 record_batch calls.*last call's 5 samples alone.*GradScaler "
                                            r"skips.*grad_scaler=scaler"):
        em.decompose_adamw_training(model, traj, F.cross_entropy, (X, Y), X[:3], keep=("step",), dtype=DT)


def test_a_grad_scaler_skip_without_recorded_gradients_is_named_as_likely():
    model, traj, X, Y = _grad_scaler_loop_without_telling_the_recorder(record_gradients=False)
    with pytest.raises(ReplayMismatchError, match=r"(?s)step 1.*2 record_batch calls.*GradScaler.*grad_scaler=scaler"):
        em.decompose_adamw_training(model, traj, F.cross_entropy, (X, Y), X[:3], keep=("step",), dtype=DT)


def test_gradient_accumulation_over_two_calls_stays_exact():
    """Two record_batch calls that one optimizer.step() follows are accumulation, not a skip: exact."""
    X, Y = _data()
    model = _Net()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(3):
        opt.zero_grad()
        for half in range(2):
            ids = torch.arange(6 * t + 3 * half, 6 * t + 3 * half + 3)
            (F.cross_entropy(model(X[ids]), Y[ids]) / 2).backward()
            rec.record_batch(ids, torch.full((3,), 1 / 6, dtype=DT))
        opt.step()
    traj = rec.trajectory()
    assert all(len(s.batch_calls) == 2 for s in traj.steps)
    result = _decompose(model, traj, X, Y)
    assert result.relative_residual <= 1e-9  # the default rule's certified tolerance
