"""Real training details stay exact (MATH.md §4): clipping by norm, gradient accumulation, frozen
parameters, a GradScaler loop in float32, and a penalty inside the loss as its own pseudo-unit."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em

DT = torch.float64
loss_fn = lambda out, y: F.cross_entropy(out, y)


def data(dtype=DT):
    g = torch.Generator().manual_seed(0)
    return torch.randn(40, 5, generator=g, dtype=torch.float64).to(dtype), torch.randint(0, 3, (40,), generator=g)


def model_for(device, dtype=DT, seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(device=device, dtype=dtype)


def train(model, opt, X, Y, *, steps=6, clip=None, penalty=None, recorder_kw=None, micro=1):
    recorder = em.TrajectoryRecorder(model, opt, **(recorder_kw or {}))
    g = torch.Generator().manual_seed(3)
    coefs = []
    for t in range(steps):
        opt.zero_grad()
        for _ in range(micro):  # gradient accumulation: mean over micro-batches of means
            ids = torch.randperm(40, generator=g)[:6]
            loss = F.cross_entropy(model(X[ids]), Y[ids]) / micro
            if penalty is not None:
                loss = loss + penalty(dict(model.named_parameters())) / micro
            loss.backward()
            recorder.record_batch(ids, weights=torch.full((6,), 1.0 / (6 * micro), dtype=torch.float64))
        if clip == "norm":
            total = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.2)
            coefs.append(min(1.0, 0.2 / (float(total) + 1e-6)))
        elif clip == "value":
            torch.nn.utils.clip_grad_value_(model.parameters(), 0.02)
        opt.step()
    return recorder.trajectory(), coefs


def test_clip_grad_norm_is_exact_with_the_recovered_factor(device):
    X, Y = (t.to(device) for t in data())
    model = model_for(device)
    traj, coefs = train(model, torch.optim.AdamW(model.parameters(), lr=0.05), X, Y, clip="norm",
                        recorder_kw={"gradient_rescaling": True})
    result = em.decompose_adamw_training(model, traj, loss_fn, (X, Y), X[:4])
    assert result.relative_residual <= 1e-9
    assert min(coefs) < 1.0  # clipping was active
    # the factor actually applied to .grad is recovered (the residual above proves it); torch's own
    # coefficient min(1, max_norm / (‖g‖ + 1e-6)) agrees up to the rounding of its norm computation
    assert result.gradient_scales == pytest.approx(coefs, rel=1e-6)


def test_clip_grad_value_is_refused_as_nonlinear(device):
    X, Y = (t.to(device) for t in data())
    model = model_for(device)
    traj, _ = train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), X, Y, clip="value",
                    recorder_kw={"gradient_rescaling": True})
    with pytest.raises(em.ReplayMismatchError, match="clip_grad_value_"):
        em.decompose_sgd_momentum_training(model, traj, loss_fn, (X, Y), X[:4])


def test_undeclared_clipping_is_caught_with_a_hint(device):
    X, Y = (t.to(device) for t in data())
    model = model_for(device)
    traj, _ = train(model, torch.optim.SGD(model.parameters(), lr=0.1), X, Y, clip="norm")
    with pytest.raises(em.ReplayMismatchError, match="gradient_rescaling=True"):
        em.decompose_sgd_momentum_training(model, traj, loss_fn, (X, Y), X[:4])


def test_rescaling_needs_recorded_gradients():
    model = model_for("cpu")
    with pytest.raises(em.RecordingError, match="record_gradients"):
        em.TrajectoryRecorder(model, torch.optim.SGD(model.parameters(), lr=0.1), gradient_rescaling=True,
                              record_gradients=False)


def test_gradient_accumulation_over_micro_batches_is_exact(device):
    X, Y = (t.to(device) for t in data())
    model = model_for(device)
    traj, _ = train(model, torch.optim.AdamW(model.parameters(), lr=0.05, weight_decay=0.1), X, Y, micro=3)
    assert max(len(s.sample_ids) for s in traj.steps) > 6  # units are the union of the micro-batches
    result = em.decompose_adamw_training(model, traj, loss_fn, (X, Y), X[:4])
    assert result.relative_residual <= 1e-9


def test_penalty_inside_the_loss_is_its_own_exact_pseudo_unit(device):
    X, Y = (t.to(device) for t in data())
    model = model_for(device)
    penalty = lambda p: 1e-2 * sum((v**2).sum() for v in p.values()) + 1e-3 * p["0.weight"].abs().sum()
    traj, _ = train(model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True), X, Y,
                    penalty=penalty)
    result = em.decompose_sgd_momentum_training(model, traj, loss_fn, (X, Y), X[:4], penalty=penalty)
    assert result.relative_residual <= 1e-9
    assert result.penalty is not None and float(result.penalty_sum().abs().max()) > 1e-6
    # without declaring the penalty, the gradient check names the mismatch
    with pytest.raises(em.ReplayMismatchError, match="penalty"):
        em.decompose_sgd_momentum_training(model, traj, loss_fn, (X, Y), X[:4])


def test_frozen_parameters_are_constants(device):
    X, Y = (t.to(device) for t in data())
    model = model_for(device)
    model[0].bias.requires_grad_(False)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    traj, _ = train(model, opt, X, Y)
    assert "0.bias" not in traj.parameter_names
    result = em.decompose_adamw_training(model, traj, loss_fn, (X, Y), X[:4])
    assert result.relative_residual <= 1e-9
    assert "0.bias" not in result.param_labels


def test_grad_scaler_float32_loop_with_a_skipped_step(device):
    """The scale is divided out by GradScaler before optimizer.step(); a step it skips (inf) is dropped.
    Float32 training: the certificate is at float32 precision (relative residual ≤ 1e-5)."""
    X, Y = data(torch.float32)
    X, Y = X.to(device), Y.to(device)
    model = model_for(device, torch.float32)
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    scaler = torch.amp.GradScaler(device.type, init_scale=2.0**10)
    recorder = em.TrajectoryRecorder(model, opt, grad_scaler=scaler)
    g = torch.Generator().manual_seed(3)
    for t in range(6):
        ids = torch.randperm(40, generator=g)[:6]
        opt.zero_grad()
        loss = F.cross_entropy(model(X[ids]), Y[ids])
        if t == 2:
            loss = loss * float("inf")  # GradScaler skips this step
        scaler.scale(loss).backward()
        recorder.record_batch(ids)
        scaler.step(opt)
        scaler.update()
    traj = recorder.trajectory()
    assert traj.num_steps == 5 and all(len(s.sample_ids) == 6 for s in traj.steps)
    result = em.decompose_adamw_training(model, traj, loss_fn, (X, Y), X[:4], dtype=torch.float64)
    assert result.relative_residual <= 1e-5


class _MomentumOnAt:
    """A hand-written schedule: momentum 0 for the first steps, then μ with dampening τ (as a warm-up of
    momentum would set it). PyTorch creates SGD's momentum buffer at the first step with μ ≠ 0, undamped."""

    def __init__(self, opt, start, momentum, dampening):
        self.opt, self.start, self.momentum, self.dampening, self.t = opt, start, momentum, dampening, 0

    def step(self):
        self.t += 1
        if self.t == self.start:
            for group in self.opt.param_groups:
                group["momentum"], group["dampening"] = self.momentum, self.dampening


@pytest.mark.parametrize("start", [1, 3])
def test_sgd_momentum_switched_on_mid_run_starts_its_buffer_undamped(device, start):
    X, Y = (t.to(device) for t in data())
    model = model_for(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.0, dampening=0.0)
    schedule = _MomentumOnAt(opt, start, momentum=0.9, dampening=0.4)
    recorder = em.TrajectoryRecorder(model, opt)
    g = torch.Generator().manual_seed(3)
    for t in range(6):
        opt.zero_grad()
        ids = torch.randperm(40, generator=g)[:6]
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        recorder.record_batch(ids)
        opt.step()
        schedule.step()
    traj = recorder.trajectory()
    assert [h["momentum"] for h in (s.hyperparameters[0] for s in traj.steps)][start - 1:start + 1] == [0.0, 0.9]
    result = em.decompose_sgd_momentum_training(model, traj, loss_fn, (X, Y), X[:4])
    assert max(result.replay_errors) <= 1e-10
    assert result.relative_residual <= 1e-9


class _SeparateKeyBias(nn.Module):
    """Self-attention with its own key projection bias (as BERT-style code writes it): softmax is
    invariant to it, so its true gradient is 0 and its .grad holds only the backward pass's rounding."""

    def __init__(self, d=6, classes=3):
        super().__init__()
        self.embed, self.out = nn.Linear(4, d), nn.Linear(d, classes)
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x):  # x: (batch, tokens, 4)
        h = self.embed(x)
        scores = self.query(h) @ self.key(h).transpose(-1, -2) / h.shape[-1] ** 0.5
        return self.out((torch.softmax(scores, -1) @ self.value(h)).mean(-2))


@pytest.mark.parametrize("make_optimizer", [
    lambda p: torch.optim.AdamW(p, lr=0.01), lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
], ids=["adamw", "sgd"])
def test_a_parameter_with_zero_true_gradient_does_not_stop_the_decomposition(device, make_optimizer):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(32, 3, 4, generator=g, dtype=DT).to(device)
    Y = torch.randint(0, 3, (32,), generator=g).to(device)
    torch.manual_seed(0)
    model = _SeparateKeyBias().to(device=device, dtype=DT)
    opt = make_optimizer(model.parameters())
    recorder = em.TrajectoryRecorder(model, opt)
    for t in range(6):
        ids = torch.randperm(32, generator=g)[:8]
        opt.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        assert float(model.key.bias.grad.abs().max()) < 1e-15  # zero up to rounding
        recorder.record_batch(ids)
        opt.step()
    result = em.decompose_training(model, recorder.trajectory(), loss_fn, (X, Y), X[:3])
    assert result.relative_residual <= 1e-9
    # the key bias gets no influence beyond rounding, whatever Adam made of its noise
    assert abs(result.per_parameter()["key.bias"]) <= 1e-9
