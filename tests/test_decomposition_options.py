"""DecompositionOptions: one options object, accepted by every theorem function, keywords still work."""

from __future__ import annotations

import inspect

import pytest
import torch

import explaind_math as em
from explaind_math.engine.options import DecompositionOptions, resolve_options
from explaind_math.testing.small_runs import blob_loss, recorded_blob_run

THEOREM_FUNCTIONS = [
    em.decompose_adamw_training, em.decompose_sgd_momentum_training, em.decompose_training,
    em.decompose_function_of_output, em.decompose_activation, em.decompose_by_partition,
    em.decompose_from_checkpoints, em.step_subsampling_fidelity,
]


@pytest.mark.parametrize("fn", THEOREM_FUNCTIONS, ids=lambda f: f.__name__)
def test_every_theorem_function_takes_an_options_object(fn):
    parameters = inspect.signature(fn).parameters
    assert "options" in parameters and parameters["options"].default is None
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values())


def test_an_options_object_and_keywords_give_the_same_result():
    model, traj, data, xs = recorded_blob_run(seed=3, num_test=3, steps=3)
    opts = DecompositionOptions(quadrature=em.gauss_legendre(4), keep=("param", "test", "output"), params="module")
    by_object = em.decompose_adamw_training(model, traj, blob_loss, data, xs, options=opts)
    by_keywords = em.decompose_adamw_training(model, traj, blob_loss, data, xs, quadrature=em.gauss_legendre(4),
                                              keep=("param", "test", "output"), params="module")
    assert by_object.kernel_axes == by_keywords.kernel_axes == ("param", "test", "output")
    assert torch.equal(by_object.kernel, by_keywords.kernel)
    # a keyword overrides the object's field
    per_tensor = em.decompose_adamw_training(model, traj, blob_loss, data, xs, options=opts, params="tensor")
    assert len(per_tensor.param_labels) == len(traj.parameter_names) != len(by_object.param_labels)


def test_an_unknown_option_is_named():
    with pytest.raises(TypeError, match="quadratur"):
        resolve_options(None, {"quadratur": em.gauss_legendre(2)})
    model, traj, data, xs = recorded_blob_run(seed=3, num_test=2, steps=2)
    with pytest.raises(TypeError, match="node_chunk"):
        em.decompose_by_partition(model, traj, blob_loss, data, xs, "all", node_chunk=2)


def test_keep_must_be_a_sequence_of_axes():
    with pytest.raises(em.ExplaindError, match="sequence of axis names"):
        DecompositionOptions(keep="unit")
    assert DecompositionOptions(keep=["unit"]).keep == ("unit",)
    assert DecompositionOptions().replace(dtype=torch.float64).dtype == torch.float64
