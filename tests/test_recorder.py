"""TrajectoryRecorder on real training loops: accumulation, frozen parameters, groups, hooks, resuming."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em
from explaind_math.errors import ExplaindError, RecordingError, ReplayMismatchError, TrajectoryMismatchError

DT = torch.float64
N = 24



def _data(device):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 4, generator=g, dtype=DT)
    Y = torch.randint(0, 3, (N,), generator=g)
    return X.to(device), Y.to(device)


def _mlp(device):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(device=device, dtype=DT)


def _ce(out, y):
    return F.cross_entropy(out, y)


def _batch(t, size=5):
    return torch.arange(size * t, size * t + size) % N


def _step(model, opt, rec, X, Y, t):
    ids = _batch(t)
    opt.zero_grad()
    _ce(model(X[ids]), Y[ids]).backward()
    rec.record_batch(ids)
    opt.step()


def _decompose(model, traj, X, Y, **kw):
    fn = em.decompose_adamw_training if traj.optimizer == "adamw" else em.decompose_sgd_momentum_training
    kw.setdefault("keep", ("step",))
    return fn(model, traj, _ce, (X, Y), X[:3], **kw)


def _assert_exact(result):
    assert result.relative_residual <= 1e-9, result.summary()
    assert result.max_replay_error <= 1e-10, result.summary()


# ---------------------------------------------------------------------------------------------
# batches


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_gradient_accumulation_over_micro_batches(opt_name, device):
    """Two micro-batches per step, each loss divided by 2; one id appears in both (its weights add)."""
    X, Y = _data(device)
    model = _mlp(device)
    opt = (torch.optim.AdamW(model.parameters(), lr=0.05) if opt_name == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.1))
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(4):
        micro = [torch.arange(6 * t, 6 * t + 3), torch.arange(6 * t + 2, 6 * t + 6)]  # id 6t+2 in both
        opt.zero_grad()
        for ids in micro:
            (F.cross_entropy(model(X[ids]), Y[ids]) / len(micro)).backward()
            rec.record_batch(ids, weights=torch.full((len(ids),), 1 / (len(micro) * len(ids)), dtype=DT))
        opt.step()
    traj = rec.trajectory()
    step = traj.steps[1]
    assert step.sample_ids == [6, 7, 8, 9, 10, 11]
    expected = torch.tensor([1 / 6, 1 / 6, 1 / 6 + 1 / 8, 1 / 8, 1 / 8, 1 / 8], dtype=DT)
    assert torch.allclose(step.weights, expected, rtol=0, atol=1e-15)
    _assert_exact(_decompose(model, traj, X, Y, keep=("step", "unit")))


def test_accumulated_means_without_division(device):
    """Summing the mean losses of micro-batches: the default weights 1/|micro-batch| per call are right."""
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(3):
        opt.zero_grad()
        for ids in (torch.arange(7 * t, 7 * t + 3), torch.arange(7 * t + 3, 7 * t + 7)):
            F.cross_entropy(model(X[ids]), Y[ids]).backward()
            rec.record_batch(ids)
        opt.step()
    traj = rec.trajectory()
    assert traj.steps[0].weights.tolist() == pytest.approx([1 / 3] * 3 + [1 / 4] * 4, abs=1e-16)
    _assert_exact(_decompose(model, traj, X, Y))


def test_sum_reduction_and_explicit_weights(device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.5)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(3):
        ids = _batch(t)
        opt.zero_grad()
        if t == 1:
            w = torch.tensor([0.1, 0.4, 0.2, 0.2, 0.1], dtype=DT, device=device)
            (F.cross_entropy(model(X[ids]), Y[ids], reduction="none") * w).sum().backward()
            rec.record_batch(ids, weights=w)
        else:
            F.cross_entropy(model(X[ids]), Y[ids], reduction="sum").backward()
            rec.record_batch(ids, reduction="sum")
        opt.step()
    traj = rec.trajectory()
    assert traj.steps[0].weights.tolist() == [1.0] * 5
    _assert_exact(_decompose(model, traj, X, Y))


def test_duplicate_id_in_one_record_batch_is_merged_into_its_weight(device):
    """Sampling with replacement (issue 17): a repeated id is one unit whose weight is the sum."""
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = em.TrajectoryRecorder(model, opt)
    for t, ids in enumerate(([3, 4, 3], [1, 1])):
        opt.zero_grad()
        index = torch.tensor(ids, device=device)
        F.cross_entropy(model(X[index]), Y[index]).backward()
        rec.record_batch(torch.tensor(ids) if t else ids)
        opt.step()
    traj = rec.trajectory()
    assert traj.steps[0].sample_ids == [3, 4] and traj.steps[0].weights.tolist() == [2 / 3, 1 / 3]
    assert traj.steps[1].sample_ids == [1] and traj.steps[1].weights.tolist() == [1.0]
    _assert_exact(_decompose(model, traj, X, Y))


def test_record_batch_argument_errors(device):
    model = _mlp(device)
    rec = em.TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RecordingError, match="at least one sample id"):
        rec.record_batch([])
    with pytest.raises(TrajectoryMismatchError, match="3 sample ids but 2 weights"):
        rec.record_batch([0, 1, 2], weights=[0.5, 0.5])
    with pytest.raises(ExplaindError, match="reduction"):
        rec.record_batch([0, 1], reduction="average")
    with pytest.raises(RecordingError, match="no optimizer step was recorded"):
        rec.trajectory()


# ---------------------------------------------------------------------------------------------
# parameters


def test_frozen_parameter_outside_the_optimizer(device):
    X, Y = _data(device)
    model = _mlp(device)
    model[0].weight.requires_grad_(False)  # frozen from the start, a constant of the model
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=0.05)
    frozen = model[0].weight.detach().clone()
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(3):
        _step(model, opt, rec, X, Y, t)
    traj = rec.trajectory()
    assert traj.parameter_names == ["0.bias", "2.weight", "2.bias"]
    assert torch.equal(model[0].weight, frozen)
    result = _decompose(model, traj, X, Y, keep=("param",))
    assert result.param_labels == ["0.bias", "2.weight", "2.bias"]
    _assert_exact(result)


def test_parameter_that_sometimes_gets_no_gradient(device):
    """PyTorch skips a parameter whose .grad is None: no decay, no moment update, no step count."""
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.2)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(5):
        model[2].bias.requires_grad_(t % 2 == 0)
        _step(model, opt, rec, X, Y, t)  # zero_grad sets .grad to None
    traj = rec.trajectory()
    assert ["2.bias" in s.updated for s in traj.steps] == [True, False, True, False, True]
    assert traj.steps[4].state["2.bias"]["step"] == 3 and traj.steps[4].state["2.weight"]["step"] == 5
    model[2].bias.requires_grad_(True)
    _assert_exact(_decompose(model, traj, X, Y))


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_several_param_groups(opt_name, device):
    X, Y = _data(device)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3))
    model = model.to(device=device, dtype=DT)
    if opt_name == "adamw":
        opt = torch.optim.AdamW(
            [{"params": model[0].parameters(), "lr": 0.05, "betas": (0.8, 0.9)},
             {"params": [model[2].weight], "lr": 0.01, "weight_decay": 0.3, "amsgrad": True},
             {"params": [model[2].bias, *model[4].parameters()], "eps": 1e-3, "maximize": False}],
            lr=0.02,
        )
    else:
        opt = torch.optim.SGD(
            [{"params": model[0].parameters(), "momentum": 0.9, "nesterov": True},
             {"params": [model[2].weight], "lr": 0.05, "weight_decay": 0.3, "momentum": 0.5, "dampening": 0.5},
             {"params": [model[2].bias, *model[4].parameters()]}],
            lr=0.1,
        )
    sched = torch.optim.lr_scheduler.LambdaLR(opt, [lambda s: 1.0, lambda s: 0.5 ** s, lambda s: 1.0 + s])
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(4):
        _step(model, opt, rec, X, Y, t)
        sched.step()
    traj = rec.trajectory()
    assert traj.group_of == {"0.weight": 0, "0.bias": 0, "2.weight": 1, "2.bias": 2, "4.weight": 2, "4.bias": 2}
    assert len(traj.steps[0].hyperparameters) == 3
    assert traj.steps[3].hyperparameters[1]["lr"] == pytest.approx(traj.steps[0].hyperparameters[1]["lr"] / 8)
    _assert_exact(_decompose(model, traj, X, Y, keep=("step", "param")))


def test_parameter_not_in_the_model_is_refused(device):
    model = _mlp(device)
    stray = nn.Parameter(torch.zeros(2, dtype=DT))
    opt = torch.optim.AdamW([*model.parameters(), stray], lr=0.05)
    with pytest.raises(RecordingError, match=r"param group 0 holds a tensor of shape \(2,\) that is not a parameter"):
        em.TrajectoryRecorder(model, opt)


def test_sparse_gradient_is_refused(device):
    model = nn.Sequential(nn.Embedding(6, 3, sparse=True), nn.Flatten(), nn.Linear(6, 2)).to(device=device, dtype=DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = em.TrajectoryRecorder(model, opt)
    x = torch.tensor([[0, 1], [2, 3]], device=device)
    F.cross_entropy(model(x), torch.tensor([0, 1], device=device)).backward()
    rec.record_batch([0, 1])
    with pytest.raises(RecordingError, match=r"step 0: parameter '0.weight' has a sparse gradient"):
        opt.step()


# ---------------------------------------------------------------------------------------------
# hooks and history


def test_close_removes_the_hooks(device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(2):
        _step(model, opt, rec, X, Y, t)
    rec.close()
    before = [p.detach().clone() for p in model.parameters()]
    for t in range(2, 4):  # no record_batch: the recorder no longer checks or records anything
        opt.zero_grad()
        _ce(model(X[_batch(t)]), Y[_batch(t)]).backward()
        opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    assert rec.num_steps == 2 and rec.trajectory().num_steps == 2
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks
    rec.close()  # closing twice is harmless


def test_context_manager_closes(device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with em.TrajectoryRecorder(model, opt) as rec:
        _step(model, opt, rec, X, Y, 0)
    opt.zero_grad()
    _ce(model(X[:5]), Y[:5]).backward()
    opt.step()
    assert rec.trajectory().num_steps == 1


def test_returned_trajectory_is_a_snapshot(device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(2):
        _step(model, opt, rec, X, Y, t)
    first = rec.trajectory()
    for t in range(2, 4):
        _step(model, opt, rec, X, Y, t)
    assert first.num_steps == 2 and len(first.parameters) == 3
    assert rec.trajectory().num_steps == 4
    _assert_exact(_decompose(model, first, X, Y))


def test_snapshots_are_copies_not_views(device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(3):
        _step(model, opt, rec, X, Y, t)
    traj = rec.trajectory()
    assert len({id(s["0.weight"]) for s in traj.parameters}) == 4
    assert not torch.equal(traj.parameters[0]["0.weight"], traj.parameters[3]["0.weight"])
    assert torch.equal(traj.parameters[3]["0.weight"], model[0].weight.detach().cpu())


# ---------------------------------------------------------------------------------------------
# resuming from an optimizer state


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_resumed_optimizer_carried_state_is_exact(opt_name, device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = (torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1) if opt_name == "adamw"
           else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, dampening=0.2, weight_decay=0.01))
    for t in range(3):  # unrecorded warm-up: the optimizer state exists before recording starts
        opt.zero_grad()
        _ce(model(X[_batch(t)]), Y[_batch(t)]).backward()
        opt.step()
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(3, 6):
        _step(model, opt, rec, X, Y, t)
    traj = rec.trajectory()
    key = "exp_avg" if opt_name == "adamw" else "momentum_buffer"
    assert set(traj.initial_state) == set(traj.parameter_names)
    assert all(key in st for st in traj.initial_state.values())
    if opt_name == "adamw":
        assert traj.initial_state["0.weight"]["step"] == 3 and traj.steps[0].state["0.weight"]["step"] == 4
    result = _decompose(model, traj, X, Y, keep=("step", "param", "unit"))
    assert result.carried_state is not None
    assert result.carried_state.abs().max() > 1e-6  # the carried momentum does move the predictions
    _assert_exact(result)
    assert result.relative_residual <= 1e-9
    # dropping the carried state leaves part of every update unexplained
    traj.initial_state = {}
    with pytest.raises(ReplayMismatchError, match=r"step 0, parameter"):
        _decompose(model, traj, X, Y)


def test_resumed_from_a_state_dict(device):
    """The usual way to resume: a fresh optimizer loads a saved state_dict, then recording starts."""
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, amsgrad=True)
    for t in range(2):
        opt.zero_grad()
        _ce(model(X[_batch(t)]), Y[_batch(t)]).backward()
        opt.step()
    saved = opt.state_dict()
    resumed = torch.optim.AdamW(model.parameters(), lr=0.05, amsgrad=True)
    resumed.load_state_dict(saved)
    rec = em.TrajectoryRecorder(model, resumed)
    for t in range(2, 5):
        _step(model, resumed, rec, X, Y, t)
    result = _decompose(model, rec.trajectory(), X, Y)
    assert result.carried_state is not None
    _assert_exact(result)


@pytest.mark.parametrize("in_directory", [False, True])
def test_metadata_given_to_trajectory_or_flush_is_kept_by_later_calls(in_directory, tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    recorder = em.TrajectoryRecorder(model, optimizer, directory=tmp_path / "run" if in_directory else None)
    x, y = torch.randn(4, 3, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    for _ in range(2):
        optimizer.zero_grad()
        ((model(x) - y) ** 2).sum(1).mean().backward()
        recorder.record_batch(range(4))
        optimizer.step()
    assert recorder.trajectory(metadata={"a": 1}).metadata["a"] == 1
    recorder.flush(metadata={"b": 2})
    metadata = recorder.trajectory().metadata
    assert (metadata["a"], metadata["b"], metadata["gradient_rescaling"]) == (1, 2, False)
    assert recorder.trajectory(metadata={"a": 3}).metadata["a"] == 3  # a key given again: its new value
    recorder.close()
