"""Two recordings of one run compared number by number: :func:`assert_same_trajectory` (a trajectory kept by
its gradients, :mod:`explaind_math.rerun`, against one kept in full; a trajectory read back from a file)."""

from __future__ import annotations

from typing import Callable, Iterable

import torch

from ..trajectory import Trajectory

__all__ = ["assert_same_trajectory", "forward", "backward"]


def forward(n: int) -> Iterable[int]:
    return range(n)


def backward(n: int) -> Iterable[int]:
    return reversed(range(n))


def assert_same_trajectory(expected: Trajectory, actual: Trajectory,
                           order: Callable[[int], Iterable[int]] = forward) -> None:
    """Every θ_t, and every step's ids, weights, hyper-parameters, state and gradient, equal bit for bit; θ and the
    steps read in ``order`` (a function of their count giving the indices)."""
    assert len(actual.parameters) == len(expected.parameters) and len(actual.steps) == len(expected.steps)
    for t in order(len(expected.parameters)):
        for n in expected.parameter_names:
            assert torch.equal(expected.parameters[t][n], actual.parameters[t][n]), (t, n)
    for t in order(len(expected.steps)):
        a, b = expected.steps[t], actual.steps[t]
        assert (a.sample_ids, a.updated, a.hyperparameters) == (b.sample_ids, b.updated, b.hyperparameters), t
        assert torch.equal(a.weights, b.weights), t
        assert a.state.keys() == b.state.keys(), t
        for n, entries in a.state.items():
            assert entries.keys() == b.state[n].keys(), (t, n)
            for k, v in entries.items():
                w = b.state[n][k]
                assert torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w, (t, n, k)
        assert (a.gradient is None) == (b.gradient is None), t
        for n, g in (a.gradient or {}).items():
            assert torch.equal(g, b.gradient[n]), (t, n)
