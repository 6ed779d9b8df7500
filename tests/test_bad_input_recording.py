"""Bad input at record time (issue 17, categories 1, 2 and 5): every check the loader or the
decomposition would make runs at the step, a refused step does not happen, the steps before it stay
readable and exact, and what can be exact (repeated ids, Nesterov with momentum 0) is."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em
from explaind_math.recording_checks import ModuleTree
from explaind_math.errors import NonFiniteError, RecordingError, StochasticTrainingError, TrajectoryMismatchError, \
    UnsupportedOptimizerError

DT = torch.float64
N = 24


def _data(d=4, classes=3):
    g = torch.Generator().manual_seed(0)
    return torch.randn(N, d, generator=g, dtype=DT), torch.randint(0, classes, (N,), generator=g)


def _mlp(*middle):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), *middle, nn.Tanh(), nn.Linear(5, 3)).to(DT)


def _batch(t, size=5):
    return torch.arange(size * t, size * t + size) % N


def _step(model, opt, rec, X, Y, t, ids=None, recorded=None):
    ids = _batch(t) if ids is None else torch.as_tensor(ids)
    opt.zero_grad()
    F.cross_entropy(model(X[ids]), Y[ids]).backward()
    rec.record_batch(ids if recorded is None else recorded)
    opt.step()


def _decompose(model, traj, X, Y):
    fn = em.decompose_adamw_training if traj.optimizer == "adamw" else em.decompose_sgd_momentum_training
    return fn(model, traj, lambda out, y: F.cross_entropy(out, y), (X, Y), X[:3], keep=("step",))


def _assert_exact(result):
    assert result.relative_residual <= 1e-9, result.summary()
    assert result.max_replay_error <= 1e-10, result.summary()


def _snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    state = {id(p): {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()}
             for p, st in opt.state.items()}
    return params, state


def _assert_unchanged(model, opt, before):
    params, state = before
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]), f"{n} changed by a refused step"
    assert {id(p) for p in opt.state} == set(state)
    for p, st in opt.state.items():
        for k, v in state[id(p)].items():
            assert torch.equal(torch.as_tensor(st[k]), torch.as_tensor(v))


def _refused(model, opt, rec, X, Y, t, error, match, prepare=None):
    """Step t with `prepare()` before opt.step(): raises `error` matching `match`, changes nothing."""
    ids = _batch(t)
    opt.zero_grad()
    F.cross_entropy(model(X[ids]), Y[ids]).backward()
    rec.record_batch(ids)
    if prepare is not None:
        prepare()
    before = _snapshot(model, opt)
    with pytest.raises(error, match=match):
        opt.step()
    _assert_unchanged(model, opt, before)


# ---------------------------------------------------------------------------------------------
# 1. steps that would make the recording unreadable are refused before they happen


@pytest.mark.parametrize("directory", [False, True])
def test_add_param_group_mid_run_is_refused_and_earlier_steps_stay_readable(directory, tmp_path):
    X, Y = _data()
    model = _mlp()
    opt = torch.optim.AdamW(list(model[0].parameters()), lr=0.05)
    rec = em.TrajectoryRecorder(model, opt, directory=tmp_path if directory else None)
    for t in range(2):
        _step(model, opt, rec, X, Y, t)
    opt.add_param_group({"params": list(model[2].parameters()), "lr": 0.01})
    _refused(model, opt, rec, X, Y, 2, RecordingError, r"step 2: the optimizer now has 2 param groups.*add_param_group")
    traj = rec.trajectory()
    assert traj.num_steps == 2
    if directory:
        rec.close()
        traj = em.Trajectory.load(tmp_path)
    _assert_exact(_decompose(model, traj, X, Y))


def test_parameter_moved_to_another_group_is_refused():
    X, Y = _data()
    model = _mlp()
    opt = torch.optim.SGD([{"params": list(model[0].parameters())}, {"params": list(model[2].parameters())}], lr=0.1)
    rec = em.TrajectoryRecorder(model, opt)
    _step(model, opt, rec, X, Y, 0)
    bias = opt.param_groups[1]["params"].pop()
    opt.param_groups[0]["params"].append(bias)
    _refused(model, opt, rec, X, Y, 1, RecordingError, r"left their group")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused_at_record_batch(bad):
    X, Y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = em.TrajectoryRecorder(model, opt)
    _step(model, opt, rec, X, Y, 0)
    with pytest.raises(NonFiniteError, match=r"record_batch: weights at positions \[1\] are NaN or Inf"):
        rec.record_batch([0, 1, 2], weights=[0.2, bad, 0.3])
    _step(model, opt, rec, X, Y, 1)  # nothing of the refused call was kept
    traj = rec.trajectory()
    assert traj.steps[1].sample_ids == _batch(1).tolist()
    _assert_exact(_decompose(model, traj, X, Y))


@pytest.mark.parametrize("ids, weights, match", [
    ([0, 1, 2], [0.5, 0.5], r"3 sample ids but 2 weights"),
    ([0, 1], [[0.5, 0.2], [0.5, 0.1]], r"weights must be 1-D .* shape \(2, 2\)"),
    (torch.tensor([[0], [1], [2]]), None, r"ids must be a 1-D .* shape \(3, 1\); pass ids.reshape\(-1\)"),
    (np.array([[0], [1]]), None, r"shape \(2, 1\); pass ids.reshape"),
    (torch.tensor([[0, 1], [2, 3]]), None, r"shape \(2, 2\)"),
    (torch.tensor([0.0, 1.0]), None, r"ids must be integers, got a tensor of dtype torch.float32"),
    (torch.tensor([True, False]), None, r"ids must be integers, got a tensor of dtype torch.bool"),
    ([0, 1.5], None, r"ids\[1\] is 1.5 \(float\)"),
    ([0, True], None, r"ids\[1\] is True \(bool\)"),
    ([0, None], None, r"ids\[1\] is None"),
    ([0, "3"], None, r"ids\[1\] is '3' \(str\)"),
    ("012", None, r"got str"),
    ({0: 1.0}, None, r"got dict"),
    (7, None, r"got int"),
    ([], None, r"at least one sample id"),
    (torch.tensor([], dtype=torch.long), None, r"at least one sample id"),
])
def test_malformed_record_batch_arguments_name_the_argument(ids, weights, match):
    model = _mlp()
    rec = em.TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(em.ExplaindError, match=match):
        rec.record_batch(ids, weights=weights)


@pytest.mark.parametrize("kind", ["numpy", "numpy-int32", "zero-dim-tensors", "int32-tensor", "range"])
def test_integer_id_containers_are_accepted(kind):
    X, Y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    rec = em.TrajectoryRecorder(model, opt)
    ids = list(range(3, 8))
    recorded = {"numpy": np.array(ids), "numpy-int32": np.array(ids, dtype=np.int32),
                "zero-dim-tensors": [torch.tensor(i) for i in ids], "int32-tensor": torch.tensor(ids, dtype=torch.int32),
                "range": range(3, 8)}[kind]
    _step(model, opt, rec, X, Y, 0, ids=ids, recorded=recorded)
    traj = rec.trajectory()
    assert traj.steps[0].sample_ids == ids
    _assert_exact(_decompose(model, traj, X, Y))


def test_negative_id_with_list_training_data_is_an_error_not_the_last_sample():
    X, Y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = em.TrajectoryRecorder(model, opt)
    opt.zero_grad()
    F.cross_entropy(model(X[[N - 1]]), Y[[N - 1]]).backward()
    rec.record_batch([-1])
    opt.step()
    data = [(X[i], Y[i]) for i in range(N)]
    with pytest.raises(TrajectoryMismatchError, match=r"sample id -1 is negative"):
        em.decompose_sgd_momentum_training(model, rec.trajectory(), F.cross_entropy, data, X[:2])


# ---------------------------------------------------------------------------------------------
# 2. state outside the optimizer: recorded once, checked at every step


def test_frozen_parameter_edited_between_steps_is_refused():
    X, Y = _data()
    model = _mlp()
    model[2].bias.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    rec = em.TrajectoryRecorder(model, opt)
    _step(model, opt, rec, X, Y, 0)

    def edit():
        with torch.no_grad():
            model[2].bias.add_(0.5)

    _refused(model, opt, rec, X, Y, 1, RecordingError, r"step 1: frozen parameter '2.bias' .* changed", edit)


def _frozen_bias_run():
    """Two recorded AdamW steps of the MLP with its last bias frozen (outside the optimizer)."""
    X, Y = _data()
    model = _mlp()
    model[2].bias.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(2):
        _step(model, opt, rec, X, Y, t)
    return model, rec.trajectory(), X, Y


def test_frozen_parameter_edited_after_training_is_refused_by_the_decomposition():
    model, traj, X, Y = _frozen_bias_run()
    _assert_exact(_decompose(model, traj, X, Y))  # untouched: exact, f(θ_0) with the recorded value
    with torch.no_grad():
        model[2].bias.add_(0.5)
    with pytest.raises(TrajectoryMismatchError, match=r"frozen parameter '2.bias' of the model differs"):
        _decompose(model, traj, X, Y)


def test_frozen_parameter_survives_the_file_forms(tmp_path):
    X, Y = _data()
    model = _mlp()
    model[0].weight.requires_grad_(False)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    rec = em.TrajectoryRecorder(model, opt, directory=tmp_path / "d")
    for t in range(2):
        _step(model, opt, rec, X, Y, t)
    rec.close()
    for traj in (em.Trajectory.load(tmp_path / "d"), em.Trajectory.load(em.Trajectory.load(tmp_path / "d").save(tmp_path / "f.safetensors"))):
        assert torch.equal(traj.buffers["0.weight"], model[0].weight.detach())
        _assert_exact(_decompose(model, traj, X, Y))


class _WithBuffer(nn.Module):
    def __init__(self, persistent):
        super().__init__()
        torch.manual_seed(1)
        self.inner = nn.Linear(4, 3).to(DT)
        self.register_buffer("shift", torch.zeros(3, dtype=DT), persistent=persistent)
        self.temperature = 1.0

    def forward(self, x):
        return self.inner(x) / self.temperature + self.shift


@pytest.mark.parametrize("change, match", [
    ("non-persistent", r"buffer 'shift' changed"),
    ("persistent", r"buffer 'shift' changed"),
    ("new-buffer", r"'extra' appeared or disappeared"),
    ("temperature", r"module attribute 'temperature' changed from 1.0 to 2.0"),
    ("nested-attribute", r"module attribute 'inner.in_features' changed from 4 to 5"),
    ("new-attribute", r"module attribute 'offset' changed from '<absent>' to 0.5"),
])
def test_state_the_forward_reads_changed_between_steps_is_refused(change, match):
    X, Y = _data()
    model = _WithBuffer(persistent=change != "non-persistent")
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = em.TrajectoryRecorder(model, opt)
    _step(model, opt, rec, X, Y, 0)

    def edit():
        if change == "temperature":
            model.temperature = 2.0
        elif change == "nested-attribute":
            model.inner.in_features = 5
        elif change == "new-attribute":
            model.offset = 0.5
        elif change == "new-buffer":
            model.register_buffer("extra", torch.zeros(1))
        else:
            model.shift.add_(1.0)

    _refused(model, opt, rec, X, Y, 1, em.ExplaindError, rf"step 1: .*{match}", edit)
    assert rec.trajectory().num_steps == 1


class _Random(nn.Module):
    def __init__(self, how):
        super().__init__()
        torch.manual_seed(1)
        self.how, self.inner = how, nn.Linear(4, 3).to(DT)

    def forward(self, x):
        if self.how == "functional-dropout":
            x = F.dropout(x, 0.3, training=True)
        elif self.how == "noise":
            x = x + 0.1 * torch.randn_like(x)
        elif self.how == "augmentation":
            x = torch.where(torch.rand(x.shape[0], 1, dtype=x.dtype) < 0.5, x.flip(-1), x)
        elif self.how == "python-random":
            x = x * (1 + random.random())
        elif self.how == "batch-centering":
            x = x - x.mean(0, keepdim=True)
        elif self.how == "batch-softmax":
            x = x * torch.softmax(x.sum(1), 0).unsqueeze(1)
        return self.inner(x)


@pytest.mark.parametrize("how, match", [
    ("functional-dropout", r"two forwards of the same batch .* differ.*'_Random' calls [^)]*dropout"),
    ("noise", r"two forwards .* differ.*'_Random' calls [^)]*randn"),
    ("augmentation", r"two forwards .* differ.*'_Random' calls [^)]*rand"),
    ("python-random", r"two forwards .* differ.*'_Random' calls [^)]*random"),
    ("batch-centering", r"the output of the batch.s first sample changes.*samples interact"),
    ("batch-softmax", r"the output of the batch.s first sample changes.*samples interact"),
])
def test_random_or_batch_coupled_forward_is_refused_at_the_first_step(how, match):
    X, Y = _data()
    model = _Random(how)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = em.TrajectoryRecorder(model, opt)
    _refused(model, opt, rec, X, Y, 0, StochasticTrainingError, rf"step 0: {match}")
    with pytest.raises(RecordingError, match="no optimizer step was recorded"):
        rec.trajectory()


@pytest.mark.parametrize("mode", ["eval", "train"])
def test_batchnorm_without_running_statistics_is_refused_in_either_mode(mode):
    X, Y = _data()
    model = _mlp(nn.BatchNorm1d(5, track_running_stats=False, dtype=DT))
    model.train(mode == "train")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = em.TrajectoryRecorder(model, opt)
    _refused(model, opt, rec, X, Y, 0, StochasticTrainingError, r"BatchNorm module '1' .*(track_running_stats=False|training mode)")


def test_the_probe_does_not_perturb_training_randomness():
    def run(record):
        X, Y = _data()
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        rec = em.TrajectoryRecorder(model, opt) if record else None
        torch.manual_seed(5)
        random.seed(5)
        draws = []
        for t in range(3):
            ids = torch.randperm(N)[:5]
            opt.zero_grad()
            F.cross_entropy(model(X[ids]), Y[ids]).backward()
            if rec is not None:
                rec.record_batch(ids)
            opt.step()
            draws.append((ids.tolist(), random.random()))
        return draws, {n: p.detach().clone() for n, p in model.named_parameters()}

    (a, pa), (b, pb) = run(True), run(False)
    assert a == b and all(torch.equal(pa[n], pb[n]) for n in pa)


@pytest.mark.parametrize("model_kind", ["dropout-p0", "dropout-eval", "layernorm", "dict-output", "conv"])
def test_deterministic_per_sample_forwards_pass_the_probe_exactly(model_kind):
    X, Y = _data()
    if model_kind == "dropout-p0":
        model = _mlp(nn.Dropout(0.0))
    elif model_kind == "dropout-eval":
        model = _mlp(nn.Dropout(0.5)).eval()
    elif model_kind == "layernorm":
        model = _mlp(nn.LayerNorm(5, dtype=DT))
    elif model_kind == "conv":
        torch.manual_seed(1)
        model = nn.Sequential(nn.Unflatten(1, (1, 4)), nn.Conv1d(1, 2, 3), nn.Flatten(), nn.Linear(4, 3)).to(DT)
    else:
        model = _DictOut()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = em.TrajectoryRecorder(model, opt)
    head = (lambda m, x: m(x)["logits"]) if model_kind == "dict-output" else (lambda m, x: m(x))
    for t in range(2):
        ids = _batch(t)
        opt.zero_grad()
        F.cross_entropy(head(model, X[ids]), Y[ids]).backward()
        rec.record_batch(ids)
        opt.step()
    traj = rec.trajectory()
    assert traj.num_steps == 2
    if model_kind != "dict-output":
        _assert_exact(_decompose(model, traj, X, Y))


class _DictOut(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.inner = nn.Linear(4, 3).to(DT)

    def forward(self, x):
        return {"logits": self.inner(x), "count": 3}


def test_check_modules_false_skips_the_probe():
    X, Y = _data()
    model = _Random("noise")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = em.TrajectoryRecorder(model, opt, check_modules=False)
    _step(model, opt, rec, X, Y, 0)
    assert rec.trajectory().num_steps == 1


@pytest.mark.parametrize("edit, match", [
    ("load-state-dict", r"optimizer state '(exp_avg|exp_avg_sq|step)' of parameter '0.weight' changed"),
    ("zero-exp-avg", r"optimizer state 'exp_avg' of parameter '0.weight' changed"),
    ("scale-exp-avg-sq", r"optimizer state 'exp_avg_sq' of parameter '0.weight' changed"),
    ("step-count", r"optimizer state 'step' of parameter '0.weight' changed"),
    ("nudge-one-entry-through-data", r"optimizer state 'exp_avg' of parameter '0.weight' changed"),
])
def test_optimizer_state_changed_between_steps_is_refused(edit, match):
    X, Y = _data()
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = em.TrajectoryRecorder(model, opt)
    _step(model, opt, rec, X, Y, 0)
    checkpoint = {k: v for k, v in opt.state_dict().items()}
    import copy
    checkpoint = copy.deepcopy(opt.state_dict())
    _step(model, opt, rec, X, Y, 1)
    state = opt.state[model[0].weight]

    def change():
        if edit == "load-state-dict":
            opt.load_state_dict(checkpoint)
        elif edit == "zero-exp-avg":
            state["exp_avg"].zero_()
        elif edit == "scale-exp-avg-sq":
            state["exp_avg_sq"].mul_(2)
        elif edit == "nudge-one-entry-through-data":  # compared exactly with a copy, not by a fingerprint
            state["exp_avg"].data[0, 0] = torch.nextafter(state["exp_avg"][0, 0], torch.tensor(1.0, dtype=DT))
        else:
            state["step"] += 1

    _refused(model, opt, rec, X, Y, 2, RecordingError, match, change)
    assert rec.trajectory().num_steps == 2


@pytest.mark.parametrize("edit", ["load-state-dict", "zero-exp-avg", "scale-exp-avg-sq"])
def test_optimizer_state_on_an_accelerator_is_compared_by_fingerprint(edit, monkeypatch):
    """State on an accelerator is compared by (Σv, Σv²) read back in one transfer, not copied: the path is
    exercised here on the CPU by declaring no tensor comparable by copy."""
    from explaind_math import recording_checks

    monkeypatch.setattr(recording_checks, "compared_by_copy", lambda v: False)
    test_optimizer_state_changed_between_steps_is_refused(edit, rf"optimizer state '[a-z_]+' of parameter '0.weight' changed")


def test_learning_rate_changed_through_param_groups_is_recorded_not_refused():
    X, Y = _data()
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(3):
        opt.param_groups[0]["lr"] = 0.05 / (t + 1)
        _step(model, opt, rec, X, Y, t)
    traj = rec.trajectory()
    assert [s.hyperparameters[0]["lr"] for s in traj.steps] == [0.05, 0.025, 0.05 / 3]
    _assert_exact(_decompose(model, traj, X, Y))


# ---------------------------------------------------------------------------------------------
# 5. what can be exact is not refused


def test_nesterov_with_momentum_zero_for_a_warm_up_is_exact():
    X, Y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(4):
        opt.param_groups[0]["momentum"] = 0.0 if t < 2 else 0.9
        _step(model, opt, rec, X, Y, t)
    traj = rec.trajectory()
    assert [s.hyperparameters[0]["momentum"] for s in traj.steps] == [0.0, 0.0, 0.9, 0.9]
    _assert_exact(_decompose(model, traj, X, Y))


def test_nesterov_with_momentum_and_dampening_is_refused_at_the_step():
    X, Y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    rec = em.TrajectoryRecorder(model, opt)
    _step(model, opt, rec, X, Y, 0)
    opt.param_groups[0]["dampening"] = 0.1
    _refused(model, opt, rec, X, Y, 1, UnsupportedOptimizerError, r"nesterov.*dampening")


@pytest.mark.parametrize("reduction", ["mean", "sum", "weights", "micro-batches"])
def test_repeated_ids_from_sampling_with_replacement_are_merged_exactly(reduction):
    X, Y = _data()
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = em.TrajectoryRecorder(model, opt)
    batches = [[2, 7, 2, 2, 9], [4, 4, 1]]
    for ids in batches:
        index = torch.tensor(ids)
        opt.zero_grad()
        losses = F.cross_entropy(model(X[index]), Y[index], reduction="none")
        if reduction == "mean":
            losses.mean().backward()
            rec.record_batch(ids)
        elif reduction == "sum":
            losses.sum().backward()
            rec.record_batch(ids, reduction="sum")
        elif reduction == "weights":
            w = torch.linspace(0.1, 0.5, len(ids), dtype=DT)
            (losses * w).sum().backward()
            rec.record_batch(ids, weights=w)
        else:
            half = len(ids) // 2
            (losses[:half].sum() / len(ids)).backward(retain_graph=True)
            (losses[half:].sum() / len(ids)).backward()
            rec.record_batch(ids[:half], weights=[1 / len(ids)] * half)
            rec.record_batch(ids[half:], weights=[1 / len(ids)] * (len(ids) - half))
        opt.step()
    traj = rec.trajectory()
    assert traj.steps[0].sample_ids == [2, 7, 9] and traj.steps[1].sample_ids == [1, 4]
    if reduction in ("mean", "micro-batches"):
        assert torch.allclose(traj.steps[0].weights, torch.tensor([0.6, 0.2, 0.2], dtype=DT))
    _assert_exact(_decompose(model, traj, X, Y))


def test_weighted_random_sampler_loop_is_exact():
    X, Y = _data()
    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = em.TrajectoryRecorder(model, opt)
    sampler = torch.utils.data.WeightedRandomSampler(torch.ones(N), num_samples=24, replacement=True,
                                                     generator=torch.Generator().manual_seed(3))
    loader = torch.utils.data.DataLoader(list(range(N)), batch_size=8, sampler=sampler)
    repeated = False
    for ids in loader:
        repeated |= len(set(ids.tolist())) < len(ids)
        opt.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        rec.record_batch(ids)
        opt.step()
    assert repeated, "the sampler drew no repeated id: the test tests nothing"
    _assert_exact(_decompose(model, rec.trajectory(), X, Y))


def test_optimizer_state_overflowing_to_inf_is_refused_and_earlier_steps_stay_readable():
    """A finite gradient of 1e160 passes the gradient check but AdamW's exp_avg_sq overflows to Inf while θ stays
    finite (m / √v = 0): the loader would refuse the whole run, so the recorder refuses that step."""
    X, Y = _data()
    model = _mlp()
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = em.TrajectoryRecorder(model, opt)
    _step(model, opt, rec, X, Y, 0)
    ids = _batch(1)
    opt.zero_grad()
    F.cross_entropy(model(X[ids]), Y[ids]).backward()
    model[0].weight.grad.mul_(1e160)
    rec.record_batch(ids)
    with pytest.raises(NonFiniteError, match=r"step 1: the optimizer state 'exp_avg_sq' of parameter '0.weight' "
                                             r"became NaN or Inf; the 1 steps before it are kept"):
        opt.step()
    traj = rec.trajectory()
    assert traj.num_steps == 1
    _assert_exact(_decompose(model, traj, X, Y))


def test_an_attribute_the_forward_does_not_read_may_change_with_check_modules_false():
    X, Y = _data()
    model = _WithBuffer(persistent=True)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    rec = em.TrajectoryRecorder(model, opt, check_modules=False)
    for t in range(2):
        model.calls = t  # a counter, not read by forward
        _step(model, opt, rec, X, Y, t)
    _assert_exact(_decompose(model, rec.trajectory(), X, Y))


class _SequenceFirst(nn.Module):
    """Inputs (T, B, F): dim 0 is time, not samples; every output row depends on the whole sequence."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(1)
        self.inner = nn.Linear(4, 3).to(DT)

    def forward(self, x):
        return self.inner(x - x.mean(0, keepdim=True))


def test_the_coupling_probe_slices_only_a_leading_dimension_of_the_recorded_batch_size():
    X = torch.randn(6, 5, 4, dtype=DT)  # (T, B, F)
    model = _SequenceFirst()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = em.TrajectoryRecorder(model, opt)
    opt.zero_grad()
    model(X).pow(2).mean().backward()
    rec.record_batch(range(5))  # 5 samples along dim 1: dim 0 (6) is not theirs, so it is not sliced
    opt.step()
    assert rec.trajectory().num_steps == 1


class _Wrapper(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model  # every name gains the prefix "model."

    def forward(self, x):
        return self.model(x)


def test_frozen_parameter_is_checked_through_a_wrapper_prefix_too():
    model, traj, X, Y = _frozen_bias_run()
    _assert_exact(_decompose(_Wrapper(model), traj, X, Y))
    with torch.no_grad():
        model[2].bias.add_(0.5)
    with pytest.raises(TrajectoryMismatchError, match=r"buffer '2.bias' of the model differs"):
        _decompose(_Wrapper(model), traj, X, Y)


@pytest.mark.parametrize("directory", [False, True])
def test_a_dtype_changed_mid_run_is_refused_before_the_shards_become_unreadable(directory, tmp_path):
    """float32 → float64 keeps the values (torch.equal holds) but would write θ of another dtype than the manifest's."""
    X, Y = _data()
    model = _mlp().float()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = em.TrajectoryRecorder(model, opt, directory=tmp_path if directory else None)
    ids = _batch(0)
    opt.zero_grad()
    F.cross_entropy(model(X[ids].float()), Y[ids]).backward()
    rec.record_batch(ids)
    opt.step()
    model.double()
    _refused(model, opt, rec, X, Y, 1, RecordingError, r"step 1: parameter '0.weight' changed .*dtype torch.float32 -> "
                                                         r"torch.float64")
    rec.close()
    traj = em.Trajectory.load(tmp_path) if directory else rec.trajectory()
    assert traj.num_steps == 1 and traj.dtype == torch.float32


def test_snapshots_of_mixed_dtypes_are_refused_by_validation():
    theta = {"w": torch.ones(2)}
    with pytest.raises(TrajectoryMismatchError, match=r"θ_1\['w'\] is torch.float64, θ_0 has torch.float32"):
        em.Trajectory.from_records(optimizer="sgd", parameters=[theta, {"w": torch.ones(2, dtype=DT)}],
                                   batches=[[0]], hyperparameters=[{"lr": 0.1}])


def test_the_coupling_probe_ignores_batch_level_outputs_such_as_a_mean_loss():
    """A model that returns its batch's mean loss beside per-sample logits (as an HF model called with
    labels does) is not coupled: only outputs with one row per sample are compared."""
    from explaind_math.recording_probe import probe_forward

    model = nn.Linear(4, 3).to(DT)

    class WithLoss(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, x):
            logits = self.inner(x)
            return {"logits": logits, "loss": logits.pow(2).mean()}

    X = torch.randn(5, 4, dtype=DT)
    probe_forward(WithLoss(), (X,), {}, "step 0", batch_rows=5)  # no error

    class Coupled(WithLoss):
        def forward(self, x):
            return super().forward(x - x.mean(0, keepdim=True))

    with pytest.raises(em.StochasticTrainingError, match="samples interact"):
        probe_forward(Coupled(), (X,), {}, "step 0", batch_rows=5)


def test_a_module_put_deep_in_the_tree_between_steps_is_checked_at_the_next_step():
    """The recorder keeps the module list of the last walk while no module's children changed (ModuleTree): a
    BatchNorm swapped in two levels down between steps, or a Dropout appended to a nested Sequential, is in the
    next step's checks, named by its path."""
    X, Y = _data()
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Sequential(nn.Tanh(), nn.Sequential(nn.Identity())),
                          nn.Linear(5, 3)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = em.TrajectoryRecorder(model, opt)
    _step(model, opt, rec, X, Y, 0)
    model[1][1][0] = nn.BatchNorm1d(5, dtype=DT)  # in training mode; its running statistics change with every batch
    _refused(model, opt, rec, X, Y, 1, StochasticTrainingError, r"step 1: BatchNorm module '1\.1\.0' is in training")
    model[1][1][0] = nn.Identity()
    _step(model, opt, rec, X, Y, 1)
    model[1].append(nn.Dropout(0.5))
    _refused(model, opt, rec, X, Y, 2, StochasticTrainingError, r"step 2: dropout module '1\.2' is active")
    assert rec.num_steps == 2


def test_module_lists_outside_the_module_dicts_and_look_alike_children_are_seen():
    """ModuleTree walks every step a tree with a module whose named_modules lists modules kept outside _modules, and
    compares children by identity (a child swapped for one that compares equal is walked anew)."""
    X, Y = _data()

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin, self.extra = nn.Linear(4, 5, dtype=DT), []

        def named_modules(self, memo=None, prefix="", remove_duplicate=True):
            yield from super().named_modules(memo, prefix, remove_duplicate)
            for i, extra in enumerate(self.extra):
                yield from extra.named_modules(memo, f"{prefix}.extra{i}", remove_duplicate)

        def forward(self, x):
            x = self.lin(x)
            for extra in self.extra:
                x = extra(x)
            return x

    class LooksAlike(nn.Identity):
        __hash__ = nn.Module.__hash__

        def __eq__(self, other):
            return isinstance(other, nn.Identity)

    torch.manual_seed(1)
    model = nn.Sequential(Holder(), nn.Tanh(), nn.Linear(5, 3, dtype=DT))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    rec = em.TrajectoryRecorder(model, opt)
    _step(model, opt, rec, X, Y, 0)
    model[0].extra.append(nn.BatchNorm1d(5, dtype=DT))
    _refused(model, opt, rec, X, Y, 1, StochasticTrainingError, r"step 1: BatchNorm module '0\.extra0' is in training")
    model[0].extra.clear()
    _step(model, opt, rec, X, Y, 1)

    plain = nn.Sequential(nn.Sequential(LooksAlike()), nn.Linear(2, 2))
    tree = ModuleTree(plain)
    plain[0][0] = LooksAlike()
    assert [name for name, _ in tree.named_modules()] == ["", "0", "0.0", "1"]
    assert tree.named_modules()[2][1] is plain[0][0]
