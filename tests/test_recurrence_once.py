"""The §4 recurrence exists once: the engine and the proof checks run the same template functions.

Each kernel of ``explaind_math.optimizers.template`` is wrapped with a counter; a decomposition must go
through every one of them (with tensors), and the proof checks must too (with sympy symbols). A copy of
the recurrence anywhere in the engine or the proofs leaves its counter at zero and fails this test. The
same holds for the adjoint's transposed kernels (MATH.md §12): the engine's backward pass, by either batch
contraction, and ``proofs_checks/check_adjoint.py`` call them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import sympy as sp
import torch
from torch import nn

import explaind_math as em
from explaind_math.optimizers import template
from explaind_math.testing.scripts import load_script

KERNELS = ("scale_buffer", "feed_buffer", "subtract_direct", "subtract_buffered")
#: the transposed kernels of the adjoint (MATH.md §12): the engine's backward pass and its proof check
ADJOINT_KERNELS = ("feed_adjoint", "unit_covector", "propagate_adjoint", "transpose_linear")
PROOFS = Path(__file__).resolve().parent.parent / "proofs_checks"


@pytest.fixture
def calls(monkeypatch):
    """Counts per kernel and per kind of argument ("tensor" or "symbolic")."""
    counts: Counter = Counter()
    for name in KERNELS + ADJOINT_KERNELS:
        original = getattr(template, name)

        def counted(*args, _original=original, _name=name, **kwargs):
            kind = "tensor" if isinstance(args[0], torch.Tensor) or isinstance(args[-1], torch.Tensor) else "symbolic"
            counts[_name, kind] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(template, name, counted)
    return counts


def _nesterov_run(batched: bool = False):
    """SGD with Nesterov momentum and weight decay (E ≠ 0 exercises the direct part), float64 (``batched``: the
    batch's loss from one forward pass over the batch instead of one per sample; the same sum)."""
    torch.manual_seed(0)
    X, Y = torch.randn(12, 3, dtype=torch.float64), torch.randn(12, 2, dtype=torch.float64)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01)
    rec = em.TrajectoryRecorder(model, opt)
    loss_fn = lambda out, y: ((out - y) ** 2).sum()  # noqa: E731
    for t in range(3):
        ids = torch.arange(4 * t, 4 * t + 4)
        opt.zero_grad()
        if batched:
            (0.25 * loss_fn(model(X[ids]), Y[ids])).backward()
        else:
            (0.25 * sum(loss_fn(model(X[i]), Y[i]) for i in ids)).backward()
        rec.record_batch(ids)
        opt.step()
    rec.close()
    return model, rec.trajectory(), loss_fn, (X, Y)


def test_the_engine_runs_the_template_kernels(calls):
    model, traj, loss_fn, data = _nesterov_run()
    result = em.decompose_sgd_momentum_training(model, traj, loss_fn, data, data[0][:2],
                                                quadrature=em.gauss_legendre(8))
    assert result.max_residual < 1e-10
    for name in KERNELS:
        assert calls[name, "tensor"] > 0, f"the engine did not call template.{name}"


def test_the_proof_checks_run_the_template_kernels(calls):
    sgd = load_script(PROOFS / "check_corollary_3_2_sgd.py", "check_sgd_for_recurrence_test")
    sgd.test_nesterov_units_and_replay()
    kernels = load_script(PROOFS / "check_recurrence_kernels.py", "check_kernels_for_recurrence_test")
    kernels.test_stacked_chunked_recurrence_equals_unit_by_unit()
    for name in KERNELS:
        assert calls[name, "symbolic"] > 0, f"the proof checks did not call template.{name} with symbols"


def test_buffer_step_and_unit_update_are_compositions_of_the_kernels(calls):
    a, c, d, e, b, g = sp.symbols("A C D E b g")
    coefficients = template.StepCoefficients(A=a, C=c, D=d, E=e)
    new = template.buffer_step(b, g, coefficients)
    assert sp.expand(new - (a * b + c * g)) == 0
    assert sp.expand(template.unit_update(new, g, coefficients) + d * new + e * g) == 0
    assert calls["scale_buffer", "symbolic"] == 1 and calls["feed_buffer", "symbolic"] == 1
    assert calls["subtract_buffered", "symbolic"] == 1 and calls["subtract_direct", "symbolic"] == 1


def _adjoint_calls(calls) -> dict:
    return {name: (calls[name, "tensor"], calls[name, "symbolic"]) for name in ADJOINT_KERNELS}


@pytest.mark.parametrize("batch_contraction", ["gradients", "jvp"])
def test_the_engine_adjoint_runs_the_template_kernels(calls, batch_contraction):
    model, traj, loss_fn, data = _nesterov_run(batched=True)
    result = em.decompose_sgd_momentum_training(model, traj, loss_fn, data, data[0][:2], keep=("param", "unit"),
                                                quadrature=em.gauss_legendre(8), accumulation="adjoint",
                                                batch_contraction=batch_contraction)
    assert result.accumulation == "adjoint" and result.max_residual < 1e-10
    for name in ADJOINT_KERNELS:
        assert calls[name, "tensor"] > 0, f"the adjoint did not call template.{name}: {_adjoint_calls(calls)}"
    for name in ("scale_buffer", "feed_buffer"):  # the replay pass of the summed buffer (the checks)
        assert calls[name, "tensor"] > 0, f"the adjoint's replay pass did not call template.{name}"


def test_the_adjoint_proof_check_runs_the_template_kernels(calls):
    proof = load_script(PROOFS / "check_adjoint.py", "check_adjoint_for_recurrence_test")
    proof.test_adjoint_equals_forward_coordinatewise_with_skipped_steps()
    proof.test_adjoint_equals_forward_for_matrix_coefficients()
    for name in ADJOINT_KERNELS + ("scale_buffer", "feed_buffer", "subtract_buffered", "subtract_direct"):
        assert calls[name, "symbolic"] > 0, f"the adjoint proof check did not call template.{name} with symbols"
