"""Queries of a result outside its range (issue 17, category 2): an error naming the argument and the
valid range, never zeros or NaN; queries inside the range give the exact sums."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em
from explaind_math import analysis
from explaind_math.errors import ExplaindError, QueryRangeError

DT = torch.float64
ALL = ("step", "param", "test", "unit", "output")


@pytest.fixture(scope="module")
def result():
    torch.manual_seed(0)
    X, Y = torch.randn(20, 4, dtype=DT), torch.randint(0, 3, (20,))
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(DT)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5)
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(4):
        ids = torch.arange(5 * t, 5 * t + 5) % 20
        opt.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        rec.record_batch(ids)
        opt.step()
    return em.decompose_sgd_momentum_training(model, rec.trajectory(), F.cross_entropy, (X, Y), X[:3], keep=ALL)


@pytest.mark.parametrize("query, error, match", [
    (lambda r: r.per_parameter(test=3), QueryRangeError, r"test 3 is out of range: this result has 3 \(positions 0..2"),
    (lambda r: r.per_parameter(test=-4), QueryRangeError, r"test -4 is out of range"),
    (lambda r: r.per_parameter(output=3), QueryRangeError, r"output 3 is out of range"),
    (lambda r: r.per_parameter(test=1.0), ExplaindError, r"test must be an integer position, got 1.0"),
    (lambda r: r.top_units(5, 0), QueryRangeError, r"test 5 is out of range"),
    (lambda r: r.top_units(0, 9), QueryRangeError, r"output 9 is out of range"),
    (lambda r: r.top_units(0, 0, k=0), ExplaindError, r"k must be a positive integer"),
    (lambda r: r.top_units(0, 0, k=-2), ExplaindError, r"k must be a positive integer"),
    (lambda r: r.top_units(0.5, 0), ExplaindError, r"test must be an integer position, got 0.5"),
    (lambda r: r.top_units(True, 0), ExplaindError, r"test must be an integer position, got True"),
    (lambda r: analysis.accumulated_influence(r, ("step",), steps=slice(30, 40)), QueryRangeError, r"selects none of this result's 4"),
    (lambda r: analysis.accumulated_influence(r, ("step",), steps=slice(2, 2)), QueryRangeError, r"selects none"),
    (lambda r: analysis.accumulated_influence(r, ("step",), steps=[7]), QueryRangeError, r"step index 7 is out of range"),
    (lambda r: analysis.accumulated_influence(r, ("step",), steps=[]), QueryRangeError, r"empty selection"),
    (lambda r: analysis.accumulated_influence(r, ("step",), steps=range(3, 9)), QueryRangeError, r"steps \[4, 5, 6"),
    (lambda r: analysis.accumulated_influence(r, ("step",), steps=[(30, 40)]), ExplaindError, r"step window \(30, 40\) holds none"),
    (lambda r: analysis.accumulated_influence(r, ("step",), steps=[slice(0, 2)]), ExplaindError, r"not slices"),
    (lambda r: analysis.accumulated_influence(r, ("test",), tests=[3]), QueryRangeError, r"test index 3 is out of range"),
    (lambda r: analysis.accumulated_influence(r, ("test",), tests=torch.tensor([[0], [1]])), ExplaindError, r"shape \(2, 1\)"),
    (lambda r: analysis.accumulated_influence(r, ("test",), tests=[0.5]), ExplaindError, r"integer position"),
    (lambda r: analysis.accumulated_influence(r, ("output",), outputs=[3]), QueryRangeError, r"output index 3"),
    (lambda r: analysis.accumulated_influence(r, ("unit",), units=[-1]), ValueError, r"unit ids \[-1\] are not among"),
    (lambda r: analysis.accumulated_influence(r, ("unit",), units=[99]), ValueError, r"unit ids \[99\]"),
    (lambda r: analysis.accumulated_influence(r, ("test",), test=[0]), ExplaindError, r"unknown selection 'test' \(did you mean 'tests'\?\)"),
    (lambda r: analysis.accumulated_influence(r, ("test",), step=[0]), ExplaindError, r"did you mean 'steps'"),
    (lambda r: analysis.accumulated_influence(r, ("foo",)), ValueError, r"unknown axes \['foo'\]"),
    (lambda r: analysis.accumulated_influence(r, ("param",), params=["nope"]), ValueError, r"parameter groups \['nope'\]"),
    (lambda r: analysis.similarity_matrix(r, steps=slice(30, 40)), QueryRangeError, r"selects none"),
    (lambda r: analysis.similarity_matrix(r, sum_over=("test",)), ValueError, r"'test' cannot be summed"),
    (lambda r: analysis.test_train_kernel(r, tests=[9]), QueryRangeError, r"test index 9"),
    (lambda r: r.kernel_sum(("foo",)), ValueError, r"cannot keep axes \['foo'\]"),
])
def test_query_outside_the_result_is_an_error(result, query, error, match):
    with pytest.raises(error, match=match):
        query(result)


def test_out_of_range_is_also_an_index_error(result):
    with pytest.raises(IndexError):
        result.per_parameter(test=3)


def test_similarity_of_zero_influence_everywhere_is_an_error(result):
    zero = analysis.accumulated_influence(result, ALL)
    zero_result = type(result)(**{**result.__dict__, "kernel": torch.zeros_like(result.kernel)})
    with pytest.raises(ExplaindError, match="zero influence"):
        analysis.similarity_matrix(zero_result)
    assert zero.values.abs().sum() > 0


@pytest.mark.parametrize("selection", [dict(tests=[-1]), dict(tests=np.array([2])), dict(tests=torch.tensor([2])),
                                       dict(tests=2), dict(steps=slice(1, 3)), dict(outputs=[0, 2])])
def test_queries_inside_the_range_are_exact_sums(result, selection):
    acc = analysis.accumulated_influence(result, ALL, **selection)
    full = result.kernel
    if "tests" in selection:
        full = full[:, :, [2]]
    if "steps" in selection:
        full = full[1:3]
    if "outputs" in selection:
        full = full[..., [0, 2]]
    assert torch.equal(acc.values, full)


def test_per_parameter_of_the_last_test_input_by_negative_position(result):
    assert result.per_parameter(test=-1) == result.per_parameter(test=2)
