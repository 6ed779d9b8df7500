"""The decomposition's inputs, checked before any work: a wrong shape, an empty test set, a loss written
for batched input or a model that cannot take the data is an :class:`~explaind_math.errors.ExplaindError`
naming the argument and what was expected, never a torch shape error, an ``IndexError`` or a ``TypeError``
from deep inside the engine."""

from __future__ import annotations

from typing import Any, Mapping

import torch

from ..errors import ExplaindError, StochasticTrainingError

__all__ = ["check_loss_fn", "check_test_inputs", "first_target_size", "check_training_sample"]

_INTERNAL = (RuntimeError, IndexError, TypeError, KeyError, AttributeError)


def check_loss_fn(loss_fn: Any) -> None:
    if not callable(loss_fn):
        raise ExplaindError(f"loss_fn must be a callable loss_fn(output, target) -> scalar, got {type(loss_fn).__name__}")


def check_test_inputs(test_inputs: Any) -> None:
    """A tensor with the test inputs along dim 0 (at least one), or a dict of such tensors."""
    if isinstance(test_inputs, Mapping):
        return
    if not isinstance(test_inputs, torch.Tensor):
        hint = "; torch.stack them" if isinstance(test_inputs, (list, tuple)) else ""
        raise ExplaindError(
            f"test_inputs must be a tensor with the test inputs along dim 0, shape (T, ...), got "
            f"{type(test_inputs).__name__}{hint}"
        )
    if test_inputs.dim() == 0:
        raise ExplaindError("test_inputs must have the test inputs along dim 0, shape (T, ...); got a 0-dim tensor")
    if test_inputs.shape[0] == 0:
        raise ExplaindError("test_inputs is empty (shape "
                            f"{tuple(test_inputs.shape)}): give at least one test input to decompose")


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"shape {tuple(x.shape)}, dtype {x.dtype}"
    return type(x).__name__


def first_target_size(fm, theta_0, xs_test, y_test) -> int:
    """The number of outputs of the decomposed target, from the first test input; a failure names test_inputs."""
    try:
        size = fm.target(theta_0, xs_test[0], y_test[0]).detach().numel()
        fm.target_values(theta_0, xs_test[:1], y_test[:1])  # vmapped, as the engine calls it
        return size
    except ExplaindError:
        raise
    except _INTERNAL as exc:
        if "random operation" in str(exc):
            raise StochasticTrainingError(
                "test_inputs: the model's forward draws random numbers (noise, augmentation or F.dropout in "
                "forward), so f(x; θ) is not a function of θ and the decomposition is undefined. Make the "
                "forward deterministic"
            ) from None
        raise ExplaindError(
            f"test_inputs: the model fails on one test input ({_describe(xs_test[0])}; test_inputs is a batch of "
            f"these along dim 0): {type(exc).__name__}: {exc}. Give test inputs shaped like one training input, "
            "stacked along dim 0"
        ) from None


def check_training_sample(fm, theta_0, loss_fn, data, trajectory, vectorize: bool = True) -> None:
    """The model and loss_fn on the first training sample of step 0, as the engine calls them: the model on
    one sample, loss_fn on its unbatched output and target. A failure names train_data or loss_fn."""
    if trajectory.num_steps == 0:
        return
    unit = trajectory.steps[0].sample_ids[0]
    xb, yb = data.fetch([unit])
    if not isinstance(xb, torch.Tensor):
        return  # named inputs: checked by the engine's own path
    x, y = xb[0], yb[0]
    try:
        out = fm.output(theta_0, x)
    except ExplaindError:
        raise
    except _INTERNAL as exc:
        raise ExplaindError(
            f"train_data: the model fails on training sample {unit} (input {_describe(x)}): {type(exc).__name__}: "
            f"{exc}. train_data must give the inputs the model was trained on"
        ) from None
    try:
        value = loss_fn(out, y)
        if vectorize and isinstance(value, torch.Tensor) and value.numel() == 1:
            # vmapped over the sample, as the engine evaluates it (a target of shape (1,) fails only there)
            torch.func.vmap(lambda xi, yi: loss_fn(fm.output(theta_0, xi), yi))(xb, yb)
    except ExplaindError:
        raise
    except _INTERNAL as exc:
        if "random operation" in str(exc):  # vmap refuses randomness: the forward is not a function of (θ, x)
            raise StochasticTrainingError(
                f"train_data sample {unit}: the model's forward draws random numbers (noise, augmentation or "
                "F.dropout in forward), so the per-sample gradients are not a function of θ and the sample and "
                "cannot reproduce the recorded ones. Make the forward deterministic"
            ) from None
        raise ExplaindError(
            f"loss_fn fails on one sample: it is called per sample with the model's unbatched output "
            f"({_describe(out)}) and target ({_describe(y)}), not with a batch; {type(exc).__name__}: {exc}. "
            "Write it for one sample (e.g. F.cross_entropy(output, target) with a 0-dim class target; "
            "output.log_softmax(1) fails), and give train_data targets of one sample each (not shape (B, 1))"
        ) from None
    if not isinstance(value, torch.Tensor) or value.numel() != 1:
        raise ExplaindError(
            "loss_fn(output, target) must return the loss of ONE sample as a scalar tensor; got "
            f"{'shape ' + str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__}"
        )
