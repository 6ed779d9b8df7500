"""The training loop of the property tests: a real ``torch.optim`` optimizer and LR scheduler, the
trajectory recorder on its step hooks, and the decomposition that matches the optimizer's rule."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from hypothesis import HealthCheck, settings
from torch import nn

import explaind_math as em

from .models import LossSpec, ModelSpec
from .optimizers import OptimizerSpec, theorem_of
from .runs import RunSpec, TrainingSchedule

__all__ = ["property_settings", "TrainedRun", "make_data", "model_outputs", "train_and_record", "decompose"]


def property_settings(**overrides) -> settings:
    """Hypothesis settings for a property that takes pytest's function-scoped ``device`` fixture.

    Inherits the loaded profile (``max_examples``, ``derandomize``, ``deadline`` …) and adds
    ``HealthCheck.function_scoped_fixture`` to the suppressed checks: the fixture is a plain
    ``torch.device``, identical for every example, so sharing it across examples is safe.
    """
    suppressed = tuple(dict.fromkeys((*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture,
                                      *overrides.pop("suppress_health_check", ()))))
    return settings(suppress_health_check=suppressed, **overrides)


@dataclass
class TrainedRun:
    """A finished, recorded training run.

    ``f_before`` / ``f_after`` are the LIVE model's outputs on ``test_inputs`` (one batched forward
    pass) before the first and after the last ``optimizer.step()``: the decomposition's f(x; θ_0) and
    f(x; θ_N), recomputed from the trajectory, must equal them.
    """

    model: nn.Module
    trajectory: em.Trajectory
    train_data: tuple[torch.Tensor, torch.Tensor]
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]
    test_inputs: torch.Tensor
    f_before: torch.Tensor
    f_after: torch.Tensor
    optimizer: torch.optim.Optimizer
    scheduler: Any
    theorem: str
    spec: RunSpec | None = None

    @property
    def family(self) -> str:
        """The model family, as used to report residuals (attention: with its implementation)."""
        if self.spec is None:
            return type(self.model).__name__
        model = self.spec.model
        return f"attention-{model.attention}" if model.family == "attention" else model.family


def make_data(spec: ModelSpec, num_samples: int, num_test: int, seed: int, dtype: torch.dtype = torch.float64):
    """(X, Y, X_test) from ``torch.Generator().manual_seed(seed)``: standard normal inputs, class labels
    (classification) or standard normal targets (regression)."""
    g = torch.Generator().manual_seed(int(seed) ^ 0x5EED)
    X = torch.randn((num_samples, *spec.input_shape), generator=g, dtype=torch.float64)
    if spec.loss_spec.classification:
        Y = torch.randint(0, spec.num_outputs, (num_samples,), generator=g)
    else:
        Y = torch.randn((num_samples, spec.num_outputs), generator=g, dtype=torch.float64).to(dtype)
    X_test = torch.randn((num_test, *spec.input_shape), generator=g, dtype=torch.float64)
    return X.to(dtype), Y, X_test.to(dtype)


def model_outputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The live model's outputs on a batch, flattened per input to (X, O), without autograd."""
    with torch.no_grad():
        return model(inputs).reshape(inputs.shape[0], -1).detach().clone()


def _batches(schedule: TrainingSchedule, generator: torch.Generator) -> list[list[int]]:
    """Consecutive chunks of random permutations of the ids, each batch without repeats."""
    queue: list[int] = []
    out = []
    for size in schedule.batch_sizes:
        if not 1 <= size <= schedule.num_samples:
            raise ValueError(f"batch size {size} is not in 1..{schedule.num_samples}")
        batch: list[int] = []
        deferred: list[int] = []
        while len(batch) < size:
            if not queue:
                queue = torch.randperm(schedule.num_samples, generator=generator).tolist()
            i = queue.pop(0)
            (deferred if i in batch else batch).append(i)
        queue = deferred + queue
        out.append(batch)
    return out


def train_and_record(
    run: RunSpec | nn.Module,
    optimizer: OptimizerSpec | Callable[[nn.Module], Any] | None = None,
    schedule: TrainingSchedule | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    loss: LossSpec | None = None,
    record_gradients: bool = True,
    rerun_optimizer: bool = False,
) -> TrainedRun:
    """Train with the unmodified torch optimizer while :class:`~explaind_math.TrajectoryRecorder` records.

    Either pass a :class:`RunSpec` (everything is built from it), or your own ``nn.Module`` together with
    ``optimizer`` (an :class:`OptimizerSpec`, or a callable ``model -> optimizer`` or
    ``model -> (optimizer, scheduler)``), a :class:`TrainingSchedule`, ``data=(X, Y, X_test)`` and a
    :class:`LossSpec`. The loop, per step t::

        optimizer.zero_grad(set_to_none=True)
        (parameter frozen at t: requires_grad=False, so its .grad stays None)
        loss = Σ_{i∈B_t} w_{t,i} ℓ_i  (LossSpec.batched, reduction "none", then weighted)
        loss.backward(); recorder.record_batch(ids, weights=w); optimizer.step(); scheduler.step()

    ``rerun_optimizer``: steps kept by their ``.grad`` (:mod:`explaind_math.rerun`).
    Returns a :class:`TrainedRun` (the model is left on ``device`` with every parameter trainable).
    """
    spec: RunSpec | None = None
    if isinstance(run, RunSpec):
        spec = run
        model = spec.model.build(seed=spec.seed, device=device, dtype=dtype)
        optimizer, schedule, seed = spec.optimizer, spec.schedule, spec.seed
        X, Y, X_test = make_data(spec.model, spec.schedule.num_samples, spec.num_test, spec.seed, dtype)
        loss = spec.model.loss_spec
    else:
        model = run.to(device)
        if optimizer is None or schedule is None or data is None or loss is None:
            raise ValueError("train_and_record(model, ...) needs optimizer, schedule, data and loss")
        X, Y, X_test = data
    device = torch.device(device)
    X, Y, X_test = X.to(device), Y.to(device), X_test.to(device)
    generator = torch.Generator().manual_seed(int(seed) ^ 0xBA7C4)

    if isinstance(optimizer, OptimizerSpec):
        opt, scheduler = optimizer.build(model, schedule.num_steps)
    else:
        built = optimizer(model)
        opt, scheduler = built if isinstance(built, tuple) else (built, None)

    params = list(model.parameters())
    # freezing the only parameter tensor would leave nothing to train: then nothing is frozen
    frozen_tensor = params[schedule.frozen_param % len(params)] if schedule.frozen and len(params) > 1 else None
    f_before = model_outputs(model, X_test)
    recorder = em.TrajectoryRecorder(model, opt, record_gradients=record_gradients, rerun_optimizer=rerun_optimizer)
    try:
        for t, ids in enumerate(_batches(schedule, generator)):
            if schedule.weighting == "random":
                w = torch.empty(len(ids), dtype=torch.float64).uniform_(0.1, 2.0, generator=generator) / len(ids)
            elif schedule.weighting == "sum":
                w = torch.ones(len(ids), dtype=torch.float64)
            else:
                w = torch.full((len(ids),), 1.0 / len(ids), dtype=torch.float64)
            opt.zero_grad(set_to_none=True)
            if frozen_tensor is not None:
                frozen_tensor.requires_grad_(not schedule.frozen[t])
            index = torch.as_tensor(ids, device=device)
            losses = loss.batched(model(X[index]), Y[index])
            (losses * w.to(device=device, dtype=losses.dtype)).sum().backward()
            recorder.record_batch(ids, weights=w)
            opt.step()
            if scheduler is not None:
                scheduler.step()
    finally:
        recorder.close()
        for p in params:
            p.requires_grad_(True)
    return TrainedRun(
        model=model,
        trajectory=recorder.trajectory(),
        train_data=(X, Y),
        loss_fn=loss.per_sample,
        test_inputs=X_test,
        f_before=f_before,
        f_after=model_outputs(model, X_test),
        optimizer=opt,
        scheduler=scheduler,
        theorem=theorem_of(type(opt).__name__.lower()),  # the recorder accepted opt: its rule is registered
        spec=spec,
    )


def decompose(run: TrainedRun, *, loss_fn: Callable | None = None, **kwargs) -> em.Influence:
    """Decompose the run with the theorem of its optimizer's rule: Theorem 3.1 (AdamW, Adam), Corollary
    3.2 (SGD) or, for every other registered rule, the linear-optimizer template (MATH.md §4).

    ``loss_fn`` replaces the run's per-sample loss (to check that a wrong one is refused); other keyword
    arguments (``quadrature``, ``keep``, ``params``, ``replay_rtol`` …) are passed on; ``device``
    defaults to the device the run trained on.
    """
    fn = {"adamw": em.decompose_adamw_training, "sgd": em.decompose_sgd_momentum_training}.get(
        run.trajectory.optimizer, em.decompose_training)
    kwargs.setdefault("device", run.test_inputs.device)
    return fn(run.model, run.trajectory, loss_fn or run.loss_fn, run.train_data, run.test_inputs, **kwargs)
