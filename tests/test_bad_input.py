"""Bad input gets a clear error of the right class, and nothing is lost (DESIGN.md, "got wrong").

"Nothing lost": a step the recorder refuses does not happen (parameters and optimizer state are
unchanged), recorder.trajectory() still returns the steps before it, and training can go on.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em
from explaind_math.errors import (
    ExplaindError,
    NonFiniteError,
    RecordingError,
    ReplayMismatchError,
    StochasticTrainingError,
    TrajectoryMismatchError,
)

DT = torch.float64
N = 24
STEP_AND_PARAM = r"step (\d+), parameter '([^']+)'"



def _data(device, d=4, classes=3):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, d, generator=g, dtype=DT)
    Y = torch.randint(0, classes, (N,), generator=g)
    return X.to(device), Y.to(device)


def _mlp(device, outputs=3, middle=None):
    torch.manual_seed(1)
    layers = [nn.Linear(4, 5)] + ([middle] if middle is not None else []) + [nn.Tanh(), nn.Linear(5, outputs)]
    return nn.Sequential(*layers).to(device=device, dtype=DT)


def _ce(out, y):
    return F.cross_entropy(out, y)


def _batch(t, size=5):
    return torch.arange(size * t, size * t + size) % N


def _step(model, opt, rec, X, Y, t, *, loss=None, ids=None, recorded=None):
    ids = _batch(t) if ids is None else ids
    opt.zero_grad()
    out = model(X[ids])
    (loss(out, Y[ids]) if loss is not None else _ce(out, Y[ids])).backward()
    rec.record_batch(ids if recorded is None else recorded)
    opt.step()


def _train(model, opt, X, Y, steps, **kw):
    rec = em.TrajectoryRecorder(model, opt, **kw)
    for t in range(steps):
        _step(model, opt, rec, X, Y, t)
    return rec


def _decompose(model, traj, X, Y, loss=_ce, **kw):
    fn = em.decompose_adamw_training if traj.optimizer == "adamw" else em.decompose_sgd_momentum_training
    kw.setdefault("keep", ("step",))
    return fn(model, traj, loss, (X, Y), X[:3], **kw)


def _assert_exact(result):
    assert result.relative_residual <= 1e-9, result.summary()
    assert result.max_replay_error <= 1e-10, result.summary()


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _opt_state(opt):
    return {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
            for p, st in opt.state.items()}


def _assert_nothing_happened(model, opt, params_before, state_before):
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params_before[n]), f"parameter {n} changed by a refused step"
    state_now = _opt_state(opt)
    assert state_now.keys() == state_before.keys()
    for k, st in state_before.items():
        for key, v in st.items():
            assert torch.equal(torch.as_tensor(state_now[k][key]), torch.as_tensor(v))


def _refused_step(model, opt, rec, X, Y, t, error, match, *, prepare=None, loss=None):
    """Run step t with `prepare` applied before opt.step(); it must raise `error` and change nothing."""
    ids = _batch(t)
    opt.zero_grad()
    out = model(X[ids])
    (loss(out, Y[ids]) if loss is not None else _ce(out, Y[ids])).backward()
    rec.record_batch(ids)
    if prepare is not None:
        prepare()
    params_before, state_before = _params(model), _opt_state(opt)
    with pytest.raises(error, match=match) as info:
        opt.step()
    _assert_nothing_happened(model, opt, params_before, state_before)
    return info.value


# ---------------------------------------------------------------------------------------------
# modules that make a sample's loss depend on the batch or on randomness


def test_batchnorm_in_training_mode_is_refused_at_the_step(device):
    X, Y = _data(device)
    model = _mlp(device, middle=nn.BatchNorm1d(5))
    model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = _train(model, opt, X, Y, 2)
    model.train()
    err = _refused_step(model, opt, rec, X, Y, 2, StochasticTrainingError, r"step 2: BatchNorm module '1'")
    assert "eval" in str(err)
    traj = rec.trajectory()
    assert traj.num_steps == 2
    model.eval()
    # the running statistics moved during the training-mode forward pass: that is refused as well
    with pytest.raises(TrajectoryMismatchError, match="running_mean"):
        _decompose(model, traj, X, Y)


def test_batchnorm_in_eval_mode_is_accepted_and_exact(device):
    X, Y = _data(device)
    model = _mlp(device, middle=nn.BatchNorm1d(5))
    with torch.no_grad():  # non-trivial frozen statistics
        model[1].running_mean.uniform_(-1, 1)
        model[1].running_var.uniform_(0.5, 2)
    model.eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = _train(model, opt, X, Y, 4)
    traj = rec.trajectory()
    assert "1.running_mean" in traj.buffers
    _assert_exact(_decompose(model, traj, X, Y))


def test_active_dropout_is_refused_and_training_can_go_on(device):
    X, Y = _data(device)
    model = _mlp(device, middle=nn.Dropout(0.3))
    model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = _train(model, opt, X, Y, 2)
    model.train()
    _refused_step(model, opt, rec, X, Y, 2, StochasticTrainingError, r"step 2: dropout module '1'.*p=0.3")
    assert rec.trajectory().num_steps == 2
    model.eval()
    for t in range(2, 5):  # the loop runs its iteration again: batch recorded once, not twice
        _step(model, opt, rec, X, Y, t)
    traj = rec.trajectory()
    assert traj.num_steps == 5
    _assert_exact(_decompose(model, traj, X, Y))


def test_buffer_changed_during_training_is_refused(device):
    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.register_buffer("scale", torch.ones(3))

        def forward(self, x):
            return self.lin(x) * self.scale

    X, Y = _data(device)
    torch.manual_seed(1)
    model = Scaled().to(device=device, dtype=DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = _train(model, opt, X, Y, 2)

    def change():
        with torch.no_grad():
            model.scale.mul_(2)

    _refused_step(model, opt, rec, X, Y, 2, StochasticTrainingError, r"step 2: buffer 'scale' changed", prepare=change)
    assert rec.trajectory().num_steps == 2


def test_batchnorm_statistics_are_caught_by_the_buffer_check_when_module_checks_are_off(device):
    X, Y = _data(device)
    model = _mlp(device, middle=nn.BatchNorm1d(5))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = em.TrajectoryRecorder(model, opt, check_modules=False)
    model.train()
    _refused_step(model, opt, rec, X, Y, 0, StochasticTrainingError, r"step 0: buffer '1.running_mean'")


# ---------------------------------------------------------------------------------------------
# losses that are not Σ_i w_i ℓ_i over the recorded ids


def _mean_squared(out, y):
    return F.cross_entropy(out, y) ** 2


def _batch_normalized(out, y):
    return F.cross_entropy(out / out.std(), y)


@pytest.mark.parametrize("record_gradients", [True, False])
@pytest.mark.parametrize("training_loss", [_mean_squared, _batch_normalized], ids=["mean-squared", "batch-std"])
def test_non_additive_loss_is_a_replay_mismatch(training_loss, record_gradients, device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = em.TrajectoryRecorder(model, opt, record_gradients=record_gradients)
    for t in range(3):
        _step(model, opt, rec, X, Y, t, loss=training_loss)
    traj = rec.trajectory()
    assert (traj.steps[0].gradient is not None) == record_gradients
    with pytest.raises(ReplayMismatchError, match=STEP_AND_PARAM) as info:
        _decompose(model, traj, X, Y)
    message = str(info.value)
    assert "step 0, parameter '0.weight'" in message
    # with gradients recorded the gradient check pinpoints the loss; without, the replay check fires
    assert ("gradient seen by optimizer.step()" in message) == record_gradients
    assert "weighted sum" in message


@pytest.mark.parametrize("record_gradients", [True, False])
def test_ids_that_do_not_cover_the_batch(record_gradients, device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = em.TrajectoryRecorder(model, opt, record_gradients=record_gradients)
    for t in range(3):
        ids = _batch(t)
        _step(model, opt, rec, X, Y, t, ids=ids, recorded=ids[:4] if t == 1 else ids)
    with pytest.raises(ReplayMismatchError, match=r"step 1, parameter '0.weight'"):
        _decompose(model, rec.trajectory(), X, Y)


def test_sum_reduction_recorded_as_mean_is_a_replay_mismatch(device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(2):
        _step(model, opt, rec, X, Y, t, loss=lambda o, y: F.cross_entropy(o, y, reduction="sum"))
    with pytest.raises(ReplayMismatchError, match=r"step 0, parameter"):
        _decompose(model, rec.trajectory(), X, Y)


@pytest.mark.parametrize("container", ["tensors", "dict", "dataset", "list"])
def test_sample_id_missing_from_train_data(container, device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = _train(model, opt, X, Y, 3)  # uses ids 0..14
    keep = 12
    data = {
        "tensors": (X[:keep], Y[:keep]),
        "dict": {i: (X[i], Y[i]) for i in range(keep)},
        "dataset": torch.utils.data.TensorDataset(X[:keep], Y[:keep]),
        "list": [(X[i], Y[i]) for i in range(keep)],
    }[container]
    with pytest.raises(TrajectoryMismatchError, match=r"\b12\b.*not in the training data"):
        em.decompose_adamw_training(model, rec.trajectory(), _ce, data, X[:3], keep=("step",))


def test_loss_fn_returning_a_batch_vector(device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = _train(model, opt, X, Y, 2)

    def vector_loss(out, y):  # per-class losses instead of one number
        return -F.log_softmax(out, -1)

    with pytest.raises(ExplaindError, match=r"scalar.*shape \(3,\)"):
        _decompose(model, rec.trajectory(), X, Y, loss=vector_loss)


# ---------------------------------------------------------------------------------------------
# non-finite values


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_gradient_is_refused_before_the_step(bad, device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = _train(model, opt, X, Y, 2)

    def poison():
        model[2].bias.grad[1] = bad

    _refused_step(model, opt, rec, X, Y, 2, NonFiniteError, r"step 2: the gradient of parameter '2.bias'", prepare=poison)
    assert rec.trajectory().num_steps == 2
    for t in range(2, 4):  # skip the bad batch and go on
        _step(model, opt, rec, X, Y, t)
    _assert_exact(_decompose(model, rec.trajectory(), X, Y))


def test_non_finite_gradient_at_the_first_step_then_training_goes_on(device):
    """A refused first step must not leave a stale θ_0 behind (the trajectory would not validate)."""
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    rec = em.TrajectoryRecorder(model, opt)

    def poison():
        model[0].weight.grad[0, 0] = float("nan")

    _refused_step(model, opt, rec, X, Y, 0, NonFiniteError, r"step 0: .*'0.weight'", prepare=poison)
    with pytest.raises(RecordingError, match="no optimizer step was recorded"):
        rec.trajectory()
    for t in range(1, 4):
        _step(model, opt, rec, X, Y, t)
    traj = rec.trajectory()
    assert traj.num_steps == 3 and len(traj.parameters) == 4
    _assert_exact(_decompose(model, traj, X, Y))


@pytest.mark.parametrize("how", ["nan-lr", "overflow"])
def test_parameter_becoming_non_finite_after_a_step(how, device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    rec = em.TrajectoryRecorder(model, opt)
    loss = lambda o, y: 100 * F.cross_entropy(o, y, reduction="sum")  # noqa: E731  (large gradients)
    for t in range(2):
        ids = _batch(t)
        opt.zero_grad()
        loss(model(X[ids]), Y[ids]).backward()
        rec.record_batch(ids, weights=[100.0] * len(ids))
        opt.step()
    opt.param_groups[0]["lr"] = float("nan") if how == "nan-lr" else 1e308
    ids = _batch(2)
    opt.zero_grad()
    loss(model(X[ids]), Y[ids]).backward()
    rec.record_batch(ids, weights=[100.0] * len(ids))
    with pytest.raises(NonFiniteError, match=r"step 2: parameter '[^']+' became NaN or Inf; the 2 steps before it are kept"):
        opt.step()
    assert not all(torch.isfinite(p).all() for p in model.parameters())
    traj = rec.trajectory()
    assert traj.num_steps == 2
    assert all(torch.isfinite(v).all() for snap in traj.parameters for v in snap.values())
    # the kept steps still decompose exactly (θ_N is taken from the trajectory, not from the broken
    # model); the per-sample loss is plain cross-entropy, the factor 100 is in the recorded weights
    _assert_exact(_decompose(model, traj, X, Y))


# ---------------------------------------------------------------------------------------------
# training-loop misuse


@pytest.mark.parametrize("edited", ["theta", "state", "both"])
def test_an_edit_between_steps_is_named_whether_theta_the_state_or_both_changed(device, edited):
    """θ and the optimizer state are both compared between steps, the state first: the error names what changed."""
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = _train(model, opt, X, Y, 2)

    def edit():
        with torch.no_grad():
            if edited in ("theta", "both"):
                model[2].weight.mul_(0.5)
            if edited in ("state", "both"):
                opt.state[model[0].bias]["exp_avg"].mul_(0.5)

    match = (r"step 2: parameter '2.weight' changed between optimizer steps 1 and 2 outside optimizer.step\(\)"
             if edited == "theta" else r"step 2: the optimizer state 'exp_avg' of parameter '0.bias' changed since the last")
    _refused_step(model, opt, rec, X, Y, 2, RecordingError, match, prepare=edit)
    assert rec.trajectory().num_steps == 2


def test_closure_is_refused(device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = _train(model, opt, X, Y, 1)

    def closure():
        opt.zero_grad()
        loss = _ce(model(X[:5]), Y[:5])
        loss.backward()
        return loss

    before = _params(model)
    rec.record_batch(range(5))
    with pytest.raises(RecordingError, match=r"step 1: optimizer.step\(closure\)"):
        opt.step(closure)
    with pytest.raises(RecordingError, match=r"step 1: optimizer.step\(closure\)"):
        opt.step(closure=closure)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert rec.trajectory().num_steps == 1


def test_step_without_record_batch(device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = _train(model, opt, X, Y, 2)
    opt.zero_grad()
    _ce(model(X[:5]), Y[:5]).backward()
    before = _params(model)
    with pytest.raises(RecordingError, match=r"step 2: no batch recorded.*record_batch"):
        opt.step()
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())
    assert rec.trajectory().num_steps == 2


def test_refused_step_discards_its_batch(device):
    """Re-running the loop iteration after a refusal records the batch again; weights must not double."""
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = _train(model, opt, X, Y, 1)
    ids = _batch(1)
    opt.zero_grad()
    _ce(model(X[ids]), Y[ids]).backward()
    rec.record_batch(ids)
    with pytest.raises(RecordingError, match="closure"):
        opt.step(lambda: None)
    _step(model, opt, rec, X, Y, 1)  # the loop iteration, run again
    traj = rec.trajectory()
    assert traj.steps[1].weights.tolist() == [0.2] * 5
    _assert_exact(_decompose(model, traj, X, Y))


def test_trajectory_for_another_model(device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    traj = _train(model, opt, X, Y, 2).trajectory()
    wider = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).to(device=device, dtype=DT)
    with pytest.raises(TrajectoryMismatchError, match=r"parameter '0.weight': trajectory shape \(5, 4\), model shape \(6, 4\)"):
        _decompose(wider, traj, X, Y)

    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.hidden, self.out = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.out(torch.tanh(self.hidden(x)))

    renamed = Renamed().to(device=device, dtype=DT)
    with pytest.raises(TrajectoryMismatchError, match=r"'0.weight'.*the model does not have"):
        _decompose(renamed, traj, X, Y)


def test_wrong_theorem_for_the_trajectory(device):
    X, Y = _data(device)
    model = _mlp(device)
    sgd = _train(model, torch.optim.SGD(model.parameters(), lr=0.1), X, Y, 2).trajectory()
    with pytest.raises(TrajectoryMismatchError, match=r"needs an AdamW/Adam trajectory.*'sgd'"):
        em.decompose_adamw_training(model, sgd, _ce, (X, Y), X[:3])
    model = _mlp(device)
    adamw = _train(model, torch.optim.AdamW(model.parameters(), lr=0.05), X, Y, 2).trajectory()
    with pytest.raises(TrajectoryMismatchError, match=r"needs an SGD trajectory.*'adamw'"):
        em.decompose_sgd_momentum_training(model, adamw, _ce, (X, Y), X[:3])


# ---------------------------------------------------------------------------------------------
# DESIGN.md: what the first implementation got wrong


def test_raw_logits_with_nn_cross_entropy_loss_are_exact(device, capsys):
    X, Y = _data(device)
    model = _mlp(device)
    criterion = nn.CrossEntropyLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(6):
        ids = _batch(t)
        opt.zero_grad()
        criterion(model(X[ids]), Y[ids]).backward()
        rec.record_batch(ids)
        opt.step()
    result = em.decompose_adamw_training(model, rec.trajectory(), criterion, (X, Y), X[:4])
    assert (result.f_final - result.f_initial).abs().max() > 0.05  # a real change to account for
    assert result.relative_residual <= 1e-9, result.summary()
    with torch.no_grad():
        assert torch.allclose(result.reconstruction, model(X[:4]), rtol=0, atol=1e-9)
    assert capsys.readouterr().out == ""  # errors are raised, never printed


def test_two_recorders_do_not_share_history(device):
    X, Y = _data(device)
    model_a, model_b = _mlp(device), _mlp(device, outputs=2)
    opt_a = torch.optim.AdamW(model_a.parameters(), lr=0.05)
    opt_b = torch.optim.SGD(model_b.parameters(), lr=0.1)
    rec_a = em.TrajectoryRecorder(model_a, opt_a)
    rec_b = em.TrajectoryRecorder(model_b, opt_b)
    for t in range(3):
        _step(model_a, opt_a, rec_a, X, Y, t)
    Y2 = Y % 2
    _step(model_b, opt_b, rec_b, X, Y2, 4)
    traj_a, traj_b = rec_a.trajectory(), rec_b.trajectory()
    assert (traj_a.num_steps, traj_b.num_steps) == (3, 1)
    assert traj_a.sample_ids() == list(range(15)) and traj_b.sample_ids() == [0, 20, 21, 22, 23]
    assert traj_b.shapes()["2.weight"] == (2, 5)
    assert traj_a.steps[0] is not traj_b.steps[0]
    _assert_exact(_decompose(model_a, traj_a, X, Y))
    _assert_exact(_decompose(model_b, traj_b, X, Y2))


def test_parameter_names_come_from_named_parameters(device):
    X, Y = _data(device)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(device=device, dtype=DT)
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1)
    model.eval()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    traj = _train(model, opt, X, Y, 3).trajectory()
    expected = [n for n, _ in model.named_parameters()]
    assert traj.parameter_names == expected == ["0.weight", "0.bias", "1.weight", "1.bias", "3.weight", "3.bias"]
    assert set(traj.buffers) == {"1.running_mean", "1.running_var", "1.num_batches_tracked"}
    for n, p in model.named_parameters():
        assert traj.shapes()[n] == tuple(p.shape)
        assert torch.equal(traj.parameters[-1][n], p.detach().cpu())
    result = _decompose(model, traj, X, Y, keep=("param",))
    assert result.param_labels == expected
    _assert_exact(result)


def test_nesterov_is_not_ignored(device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    traj = _train(model, opt, X, Y, 3).trajectory()
    _assert_exact(_decompose(model, traj, X, Y))
    for step in traj.steps:
        step.hyperparameters[0]["nesterov"] = False
    # the first step is the same with or without Nesterov only if momentum·b_0 were zero: it is not
    with pytest.raises(ReplayMismatchError, match=r"step 0, parameter '0.weight'"):
        _decompose(model, traj, X, Y)


def test_amsgrad_is_not_ignored(device):
    X, Y = _data(device)
    model = _mlp(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.9, 0.5), amsgrad=True)
    rec = em.TrajectoryRecorder(model, opt)
    plain_v = []
    for t in range(5):
        _step(model, opt, rec, X, Y, t)
        plain_v.append({n: opt.state[p]["exp_avg_sq"].detach().cpu().clone() for n, p in model.named_parameters()})
    traj = rec.trajectory()
    _assert_exact(_decompose(model, traj, X, Y))
    # the flag switched off with no plain second moment recorded: the state the rule needs is missing
    for step in traj.steps:
        step.hyperparameters[0]["amsgrad"] = False
    with pytest.raises(TrajectoryMismatchError, match=r"lacks optimizer state 'exp_avg_sq'"):
        _decompose(model, traj, X, Y)
    # ... and with it supplied, ignoring the running maximum no longer reproduces the run
    for step, v in zip(traj.steps, plain_v):
        for n in step.state:
            step.state[n]["exp_avg_sq"] = v[n]
    with pytest.raises(ReplayMismatchError, match=STEP_AND_PARAM):
        _decompose(model, traj, X, Y)


class _ScalarHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 1))

    def forward(self, x):
        return self.body(x).squeeze(-1)


@pytest.mark.parametrize("outputs", [1, 2, 5, "scalar"])
def test_output_dimension_is_not_hard_coded(outputs, device):
    X, Y = _data(device, classes=5)
    torch.manual_seed(1)
    if outputs == "scalar":
        model = _ScalarHead().to(device=device, dtype=DT)
        targets, loss, width = Y.to(DT), (lambda o, y: (o - y) ** 2), 1
    elif outputs == 1:
        model = _mlp(device, outputs=1)
        targets, loss, width = Y.to(DT).unsqueeze(-1), (lambda o, y: F.mse_loss(o, y)), 1
    else:
        model = _mlp(device, outputs=outputs)
        targets, loss, width = Y % outputs, _ce, outputs
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(3):
        ids = _batch(t)
        opt.zero_grad()
        out = model(X[ids])
        torch.stack([loss(out[i], targets[ids][i]) for i in range(len(ids))]).mean().backward()
        rec.record_batch(ids)
        opt.step()
    result = em.decompose_adamw_training(model, rec.trajectory(), loss, (X, targets), X[:4], keep=("unit",))
    assert tuple(result.f_final.shape) == (4, width)
    assert result.kernel.shape[-1] == width
    with torch.no_grad():
        assert torch.allclose(result.f_final, model(X[:4]).reshape(4, width), rtol=0, atol=1e-12)
    _assert_exact(result)
