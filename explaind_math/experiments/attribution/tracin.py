"""TracIn (Pruthi et al., 2020, "Estimating training data influence by tracing gradient descent"): the
in-batch form over the recorded steps and TracInCP over checkpoints."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from ...errors import ExplaindError
from ...trajectory import Trajectory
from .common import Params, ScalarOfOutput, cast_floating, per_sample_gradients

__all__ = ["tracin_scores", "tracin_checkpoint_scores"]


def _learning_rates(trajectory: Trajectory, t: int, dtype: torch.dtype) -> torch.Tensor:
    """η_t per coordinate (parameter groups may differ), flattened in the trajectory's parameter order."""
    shapes = trajectory.shapes()
    parts = []
    for n in trajectory.parameter_names:
        lr = float(trajectory.steps[t].hyperparameters[trajectory.group_of[n]]["lr"])
        parts.append(torch.full((math.prod(shapes[n]),), lr, dtype=dtype))
    return torch.cat(parts)


def _theta(trajectory: Trajectory, t: int, dtype: torch.dtype) -> Params:
    return {n: trajectory.parameters[t][n].to(dtype) for n in trajectory.parameter_names}



def tracin_scores(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: ScalarOfOutput,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """TracIn in its in-batch form (Pruthi et al., 2020, the idealised TracIn for mini-batch SGD):

        TracIn(x, i) = Σ_{t : i ∈ B_t} η_t w_{t,i} ⟨∇_θ ℓ(x; θ_t), ∇_θ ℓ_i(θ_t)⟩

    over the recorded steps t, with w_{t,i} = 1/|B_t| for a mean-reduced batch loss (their η_t/b), the
    test loss ℓ(x) = loss_fn(f(x), y(x)) with the true label, and the inner product weighted by each
    parameter group's η_t. Positive = proponent (a plain SGD step on i lowers the test loss to first
    order). It ignores the optimizer's preconditioner and momentum (AdamW here), as TracIn does.
    Returns (test, M) in ``dtype``."""
    X, Y = train_data
    num_train = X.shape[0]
    scores = torch.zeros(test_inputs.shape[0], num_train, dtype=dtype)
    x_test = cast_floating(test_inputs, dtype)
    y_test = torch.as_tensor(test_labels)
    for t, record in enumerate(trajectory.steps):
        theta_t = _theta(trajectory, t, dtype)
        ids = torch.as_tensor(record.sample_ids, dtype=torch.long)
        weights = torch.as_tensor(record.weights, dtype=dtype)
        g_train = per_sample_gradients(model, theta_t, loss_fn, cast_floating(X[ids], dtype), Y[ids], chunk_size=chunk_size)
        g_test = per_sample_gradients(model, theta_t, loss_fn, x_test, y_test, chunk_size=chunk_size)
        eta = _learning_rates(trajectory, t, dtype)
        scores[:, ids] += ((g_test * eta) @ g_train.T) * weights
    return scores


def tracin_checkpoint_scores(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: ScalarOfOutput,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    checkpoints: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """TracInCP (Pruthi et al., 2020, their practical approximation from checkpoints):

        TracInCP(x, i) = Σ_c η_c ⟨∇_θ ℓ(x; θ_c), ∇_θ ℓ_i(θ_c)⟩

    over the checkpoints θ_c = ``trajectory.parameters[c]`` (c in 0..N) and every training sample i,
    η_c the learning rate of step c (of step N−1 for c = N), per parameter group. Returns (test, M)."""
    X, Y = train_data
    x_test = cast_floating(test_inputs, dtype)
    y_test = torch.as_tensor(test_labels)
    scores = torch.zeros(test_inputs.shape[0], X.shape[0], dtype=dtype)
    n = trajectory.num_steps
    for c in checkpoints:
        if not 0 <= int(c) <= n:
            raise ExplaindError(f"TracInCP: checkpoint {c} is not a recorded parameter state (0..{n})")
        theta_c = _theta(trajectory, int(c), dtype)
        g_train = per_sample_gradients(model, theta_c, loss_fn, cast_floating(X, dtype), Y, chunk_size=chunk_size)
        g_test = per_sample_gradients(model, theta_c, loss_fn, x_test, y_test, chunk_size=chunk_size)
        eta = _learning_rates(trajectory, min(int(c), n - 1), dtype)
        scores += (g_test * eta) @ g_train.T
    return scores
