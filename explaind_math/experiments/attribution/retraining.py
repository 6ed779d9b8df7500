"""Ground truth for the LDS: training schedules of models "trained on a subset S" of the training data
(three protocols), the subsets themselves, and the retraining runs that give f_o(x; θ_S)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from ...errors import ExplaindError
from ...trajectory import Trajectory

__all__ = [
    "ScheduledStep",
    "Schedule",
    "PROTOCOLS",
    "recorded_schedule",
    "counterfactual_schedule",
    "random_subsets",
    "leave_one_out_subsets",
    "train_on_schedule",
    "retrain_outputs",
]


# ----------------------------------------------------------------------------- schedules and subsets
@dataclass(frozen=True)
class ScheduledStep:
    """One optimizer step of a (re)training run: the batch ``ids`` and the factor ``scale`` of its
    loss, scale · mean_{j∈ids} ℓ_j (scale = 1: the usual mean-reduced batch loss)."""

    ids: torch.Tensor
    scale: float = 1.0


#: a training schedule: the steps in order
Schedule = list[ScheduledStep]

#: how a model "trained on S" is obtained from the recorded run (see :func:`counterfactual_schedule`)
PROTOCOLS = ("restricted", "zero-weight", "reshuffled")


def recorded_schedule(trajectory: Trajectory) -> Schedule:
    """The recorded run's batches B_t (all mean-reduced, checked), as a schedule to replay."""
    steps = []
    for t, record in enumerate(trajectory.steps):
        w = torch.as_tensor(record.weights, dtype=torch.float64)
        if not torch.allclose(w, torch.full_like(w, 1.0 / w.numel()), rtol=1e-12, atol=0.0):
            raise ExplaindError(
                f"step {t} of the recorded run is not a mean-reduced batch loss (weights {w.tolist()[:4]}…)"
            )
        steps.append(ScheduledStep(torch.as_tensor(record.sample_ids, dtype=torch.long)))
    return steps


def counterfactual_schedule(
    recorded: Schedule,
    keep: torch.Tensor,
    protocol: str,
    *,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Schedule:
    """The schedule of a model trained on the subset S (boolean mask ``keep`` over sample ids), from
    the same θ_0 as the recorded run (the caller's job), under one of three protocols:

    * ``"restricted"``: step t uses B_t ∩ S with the mean over the kept samples (a step whose batch
      becomes empty is dropped). Same order, same number of steps; only S is trained on.
    * ``"zero-weight"``: step t keeps the recorded loss with w_{t,i} = 0 for i ∉ S, i.e.
      Σ_{j∈B_t∩S} ℓ_j / |B_t| (an empty step still steps, with a zero gradient). The counterfactual that
      data-attribution scores linearize: delete sample i's loss terms and change nothing else.
    * ``"reshuffled"``: the usual datamodels retraining: fresh random passes over S in batches of
      ``batch_size`` (default: the recorded first batch's size), for as many epochs as the recorded run
      (round(N · |S| / M) steps), order drawn from ``generator``.

    The first two are deterministic given S, so their ground truth carries no seed noise.
    """
    keep = torch.as_tensor(keep, dtype=torch.bool)
    if protocol == "restricted":
        out = []
        for step in recorded:
            kept = step.ids[keep[step.ids]]
            if kept.numel():
                out.append(ScheduledStep(kept, step.scale))
        return out
    if protocol == "zero-weight":
        out = []
        for step in recorded:
            kept = step.ids[keep[step.ids]]
            if kept.numel():
                out.append(ScheduledStep(kept, step.scale * kept.numel() / step.ids.numel()))
            else:  # a zero gradient: AdamW still decays and moves with its moments, as in the recorded run
                out.append(ScheduledStep(step.ids, 0.0))
        return out
    if protocol == "reshuffled":
        if generator is None:
            raise ExplaindError("the reshuffled protocol needs a torch.Generator for the batch order")
        members = torch.nonzero(keep).flatten()
        size = batch_size or int(recorded[0].ids.numel())
        steps = max(1, round(len(recorded) * members.numel() / keep.numel()))
        out, order = [], torch.empty(0, dtype=torch.long)
        while len(out) < steps:
            if order.numel() == 0:
                order = members[torch.randperm(members.numel(), generator=generator)]
            out.append(ScheduledStep(order[:size]))
            order = order[size:]
        return out
    raise ExplaindError(f"unknown retraining protocol {protocol!r}; choose one of {PROTOCOLS}")


def random_subsets(num_samples: int, fraction: float, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` boolean masks (count, num_samples), each selecting round(fraction · num_samples) samples
    uniformly at random without replacement (the datamodels' S ~ D_α; Ilyas et al., 2022)."""
    if not 0.0 < fraction < 1.0:
        raise ExplaindError(f"subset fraction must lie in (0, 1), got {fraction}")
    size = max(1, round(fraction * num_samples))
    masks = torch.zeros(count, num_samples, dtype=torch.bool)
    for k in range(count):
        masks[k, torch.randperm(num_samples, generator=generator)[:size]] = True
    return masks


def leave_one_out_subsets(num_samples: int, removed: Sequence[int]) -> torch.Tensor:
    """Masks D \\ {i} for each removed sample i (the LDS at α = 1 − 1/M, the paper's leave-one-out)."""
    masks = torch.ones(len(removed), num_samples, dtype=torch.bool)
    for k, i in enumerate(removed):
        if not 0 <= int(i) < num_samples:
            raise ExplaindError(f"leave-one-out: sample {i} is not among the {num_samples} training samples")
        masks[k, int(i)] = False
    return masks


# ----------------------------------------------------------------------------- (re)training
def train_on_schedule(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train_data: tuple[torch.Tensor, torch.Tensor],
    schedule: Schedule,
) -> nn.Module:
    """Train ``model`` in place: per step, zero the gradients, backpropagate
    scale · ``loss_fn``(f(X[ids]), Y[ids]) (``loss_fn`` batched, mean-reduced), ``optimizer.step()``."""
    X, Y = train_data
    optimizer = make_optimizer(model)
    for step in schedule:
        optimizer.zero_grad()
        loss = loss_fn(model(X[step.ids]), Y[step.ids])
        (loss if step.scale == 1.0 else loss * step.scale).backward()
        optimizer.step()
    return model


def retrain_outputs(
    initial_state: Mapping[str, torch.Tensor],
    make_model: Callable[[], nn.Module],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train_data: tuple[torch.Tensor, torch.Tensor],
    schedules: Sequence[Schedule],
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Ground truth for the LDS: for each schedule (one per subset S_k), a fresh ``make_model()`` loaded
    with ``initial_state`` (the recorded run's θ_0) and trained on it; returns f_o(x; θ_{S_k}) for the
    true class o of every test input, shape (subsets, test), float64."""
    outputs = torch.empty(len(schedules), test_inputs.shape[0], dtype=torch.float64)
    rows = torch.arange(test_inputs.shape[0])
    for k, schedule in enumerate(schedules):
        model = make_model()
        model.load_state_dict(initial_state)
        train_on_schedule(model, make_optimizer, loss_fn, train_data, schedule)
        with torch.no_grad():
            outputs[k] = model(test_inputs)[rows, test_labels].double()
        if progress is not None:
            progress(k + 1, len(schedules))
    return outputs

