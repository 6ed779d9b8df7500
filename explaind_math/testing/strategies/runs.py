"""Training schedules and run specifications: what one property-test example trains (model, optimizer,
schedule, seed), and :func:`stabilize`, which keeps a drawn run in the regime of ordinary training."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Sequence

import torch
from hypothesis import strategies as st

from .models import LOSSES, SMOOTH_FAMILIES, ModelSpec, models
from .optimizers import OptimizerSpec, optimizers

if TYPE_CHECKING:
    from .training import TrainedRun

__all__ = ["GRADIENT_SCALE_FREE_KINDS", "TrainingSchedule", "RunSpec", "seeds", "training_schedules", "training_runs", "stabilize"]


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``torch.Generator``: data, initialization and batch order of one example."""
    return st.integers(min_value=0, max_value=2**31 - 1)



@dataclass(frozen=True)
class TrainingSchedule:
    """What the loop does: one batch size per step, the weighting, and which steps freeze a parameter.

    Batches are consecutive chunks of random permutations of the ``num_samples`` ids (a new permutation
    whenever one is used up, so ids repeat across steps and momentum carries them). ``weighting``:
    ``"mean"`` (w = 1/|B_t|, the recorder's default), ``"sum"`` (w = 1) or ``"random"`` (w_i ~ U(0.1, 2) / |B_t|,
    passed to ``record_batch(ids, weights=w)``). At steps where ``frozen[t]`` is true, parameter
    ``frozen_param % num_parameter_tensors`` has ``requires_grad=False``, so its ``.grad`` stays None
    after ``zero_grad(set_to_none=True)`` and PyTorch skips it entirely at that step.
    """

    num_samples: int
    batch_sizes: tuple[int, ...]
    weighting: str = "mean"
    frozen_param: int = 0
    frozen: tuple[bool, ...] = ()

    @property
    def num_steps(self) -> int:
        return len(self.batch_sizes)


@st.composite
def training_schedules(draw, min_steps: int = 2, max_steps: int = 6, max_samples: int = 24, freeze: bool | None = None):
    """N = min_steps..max_steps steps over M ≤ ``max_samples`` samples, unequal batch sizes ending with a
    short batch, a weighting, and (unless ``freeze=False``) sometimes a parameter without gradient."""
    m = draw(st.integers(4, max_samples))
    n = draw(st.integers(min_steps, max_steps))
    full = draw(st.integers(2, min(m, 8)))
    sizes = [draw(st.one_of(st.just(full), st.integers(1, full))) for _ in range(n - 1)]
    sizes.append(draw(st.integers(1, max(1, full - 1))))  # a last, short batch
    weighting = draw(st.sampled_from(("mean", "sum", "random")))
    do_freeze = draw(st.booleans()) if freeze is None else freeze
    frozen = tuple(draw(st.lists(st.booleans(), min_size=n, max_size=n))) if do_freeze else ()
    if do_freeze and not any(frozen):
        frozen = (True,) + frozen[1:]
    return TrainingSchedule(m, tuple(sizes), weighting, draw(st.integers(0, 7)), frozen)


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one example: model, optimizer, schedule, seed, number of test inputs."""

    model: ModelSpec
    optimizer: OptimizerSpec
    schedule: TrainingSchedule
    seed: int
    num_test: int = 3

    @property
    def theorem(self) -> str:
        return self.optimizer.theorem

    def train(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> "TrainedRun":
        from .training import train_and_record

        return train_and_record(self, device=device, dtype=dtype)


@st.composite
def training_runs(
    draw,
    families: Sequence[str] = SMOOTH_FAMILIES,
    optimizers_: st.SearchStrategy[OptimizerSpec] | None = None,
    optimizer_kinds: Sequence[str] | None = None,
    losses: Sequence[str] = LOSSES,
    model_strategy: st.SearchStrategy[ModelSpec] | None = None,
    schedule_strategy: st.SearchStrategy[TrainingSchedule] | None = None,
    num_test: st.SearchStrategy[int] | None = None,
    rules: Sequence[str] | None = None,
):
    """A :class:`RunSpec`: a model from ``families`` (or ``model_strategy``), an optimizer of
    ``optimizer_kinds`` or of the named ``rules`` (default: of every registered rule; or drawn from
    ``optimizers_``), a training schedule (``schedule_strategy``), a seed and 2–4 test inputs
    (``num_test``). The optimizer is passed through :func:`stabilize`."""
    model = draw(model_strategy if model_strategy is not None else models(families, losses))
    optimizer = draw(optimizers_ if optimizers_ is not None else optimizers(optimizer_kinds, rules))
    schedule = draw(schedule_strategy if schedule_strategy is not None else training_schedules())
    tests = draw(num_test if num_test is not None else st.integers(2, 4))
    return RunSpec(model, stabilize(model, optimizer, schedule), schedule, draw(seeds()), tests)


#: optimizer kinds whose step divides by a running scale of the gradients, so that it is ~lr per
#: coordinate whatever the gradients' size. Not SGD; not RAdam, whose step is lr · m̂_t (SGD with
#: momentum) until its variance rectification starts at ρ_t > 5, i.e. over the first ~6 steps: all of
#: a drawn run. A rule registered later is not listed, so it is stabilized like SGD (smaller steps).
GRADIENT_SCALE_FREE_KINDS = ("adamw", "adam", "rmsprop", "adagrad", "adamax", "nadam")


def stabilize(model: ModelSpec, optimizer: OptimizerSpec, schedule: TrainingSchedule) -> OptimizerSpec:
    """Keep a drawn run in the regime where training is well behaved, which the exactness tests assume.

    * ``maximize=True`` on the MSE loss is gradient ASCENT on a quadratic: it diverges geometrically, so
      it is turned off there (it stays on for cross-entropy, whose gradient is bounded in the logits).
    * SGD's step is lr · Σ_i w_i ∇ℓ_i: with ``weighting="sum"`` (w = 1) the lr is divided by the largest
      batch, and for a deep linear network of L layers (gradients grow like |W|^(L−1)) by 2^(L−2). The
      same holds for every kind not in :data:`GRADIENT_SCALE_FREE_KINDS` (RAdam's first steps: at lr
      0.02, a summed batch of 6 MSE samples moved an attention block by 0.84 per coordinate, and 8
      Gauss–Legendre nodes left 1.2e-9 relative; 16 nodes: 2e-16). The kinds listed there take steps of
      ~lr per coordinate whatever the gradient scale: only the first rule applies to them.
    """
    options = dict(optimizer.options)
    if model.loss == "mse" and options.get("maximize"):
        options["maximize"] = False
    if optimizer.kind not in GRADIENT_SCALE_FREE_KINDS:
        if schedule.weighting == "sum":
            options["lr"] = options["lr"] / max(schedule.batch_sizes)
        if model.family == "deep-linear" and model.num_layers > 2:
            options["lr"] = options["lr"] / 2 ** (model.num_layers - 2)
    return dataclasses.replace(optimizer, options=tuple(options.items()))
