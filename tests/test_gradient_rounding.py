"""The recorded gradients' rounding as a pseudo-unit (Influence.gradient_rounding).

A float32 run's ``.grad`` is a float32 reduction; the decomposition's Σ_i w_i ∇ℓ_i (in float64) differs from it
by the reduction's rounding δ_t, which Adam's 1/√v amplifies where a true gradient is near zero. Fed through the
optimizer like a unit, δ_t makes the units' updates sum to the recorded update, so the certified residual falls
to the rest: the optimizer's own float32 arithmetic and the quadrature. Only a δ_t within the backward pass's
rounding scale (64 ε max|g_t|) is taken: a real mismatch the gradient-sum check's relative tolerance lets through
(a weight off by 3e-5) is warned about and stays in the residual; a larger one is refused by the check.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em
from explaind_math.engine.gradients import GradientMismatchWarning
from explaind_math.errors import ReplayMismatchError

N, STEPS, B = 48, 12, 12


def _ce_sum(out, y):
    return F.cross_entropy(out, y, reduction="sum")


def _run(dtype: torch.dtype, weight_error: float = 0.0):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 6, generator=g, dtype=dtype)
    Y = torch.randint(0, 3, (N,), generator=g)
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(6, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 3)).to(dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(STEPS):
        ids = torch.randperm(N, generator=g)[:B].tolist()
        opt.zero_grad()
        (F.cross_entropy(model(X[ids]), Y[ids]) * (1 + weight_error)).backward()
        rec.record_batch(ids)  # mean reduction: w_i = 1/B
        opt.step()
    return model, rec.trajectory(), X, Y


def _without_gradients(trajectory):
    return em.Trajectory(
        optimizer=trajectory.optimizer, parameter_names=trajectory.parameter_names, group_of=trajectory.group_of,
        parameters=trajectory.parameters, steps=[dataclasses.replace(s, gradient=None) for s in trajectory.steps],
        initial_state=trajectory.initial_state, buffers=trajectory.buffers, metadata=trajectory.metadata)


def _decompose(model, trajectory, X, Y, **kw):
    return em.decompose_adamw_training(model, trajectory, _ce_sum, (X, Y), X[:5], keep=("test", "unit"),
                                       dtype=torch.float64, **kw)


def test_float32_run_rounding_unit_shrinks_the_residual_and_the_replay_error():
    model, trajectory, X, Y = _run(torch.float32)
    with_unit = _decompose(model, trajectory, X, Y)
    without = _decompose(model, _without_gradients(trajectory), X, Y)
    assert without.gradient_rounding is None and with_unit.gradient_rounding is not None
    assert float(with_unit.gradient_rounding_sum().abs().max()) > 0
    # measured: residual 4.3e-7 -> 3.1e-7, replay error 6.6e-5 -> 9.9e-6; what stays is the float32 storage of
    # θ_{t+1} and the optimizer's float32 arithmetic, which no per-sample quantity carries
    assert with_unit.max_residual < without.max_residual, (with_unit.summary(), without.summary())
    assert with_unit.max_replay_error < without.max_replay_error / 3
    assert with_unit.relative_residual <= 1e-6, with_unit.summary()
    assert torch.equal(with_unit.kernel, without.kernel)  # the samples' influences are untouched
    assert "rounding" in with_unit.summary()


def test_float64_run_rounding_unit_is_at_the_rounding_floor():
    model, trajectory, X, Y = _run(torch.float64)
    result = _decompose(model, trajectory, X, Y)
    assert float(result.gradient_rounding_sum().abs().max()) <= 1e-13
    assert result.relative_residual <= 1e-10


def test_adjoint_and_forward_give_the_same_rounding_influence():
    model, trajectory, X, Y = _run(torch.float32)
    forward = _decompose(model, trajectory, X, Y, accumulation="forward")
    adjoint = _decompose(model, trajectory, X, Y, accumulation="adjoint")
    a, f = adjoint.gradient_rounding_sum(), forward.gradient_rounding_sum()
    assert torch.allclose(a, f, rtol=1e-8, atol=1e-15), (a, f)
    assert adjoint.max_residual <= 2 * forward.max_residual + 1e-12


def test_a_mismatch_within_the_checks_tolerance_stays_in_the_residual():
    model, trajectory, X, Y = _run(torch.float32)
    clean = _decompose(model, trajectory, X, Y)
    model, trajectory, X, Y = _run(torch.float32, weight_error=3e-5)  # under the check's rtol (1e-4 in float32)
    with pytest.warns(GradientMismatchWarning, match="more than the rounding"):
        off = _decompose(model, trajectory, X, Y)
    # measured: residual 1.6e-5 (clean 1.5e-7); absorbed as rounding it would have read 1.5e-7
    assert off.max_residual > 20 * clean.max_residual, (off.summary(), clean.summary())
    assert float(off.gradient_rounding_sum().abs().max()) <= 10 * float(clean.gradient_rounding_sum().abs().max())


def test_a_wrong_weight_is_refused_not_absorbed():
    model, trajectory, X, Y = _run(torch.float32, weight_error=1e-3)
    with pytest.raises(ReplayMismatchError, match="differs from"):
        _decompose(model, trajectory, X, Y)
