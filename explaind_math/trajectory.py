"""What training did: θ_0 … θ_N, the units and weights of every step, the hyper-parameters actually
used per parameter group, and the optimizer state the preconditioner needs (MATH.md §0), with the
checks that every trajectory (in memory or on disk) passes.

A :class:`Trajectory` is built by :class:`~explaind_math.TrajectoryRecorder` from a live training loop,
or by :meth:`Trajectory.from_records` from data recorded by other code. Its file forms (one
safetensors file, or a directory of shards) are :mod:`explaind_math.storage`, which imports this
module and registers the functions behind :meth:`Trajectory.save`, :meth:`Trajectory.save_directory`
and :meth:`Trajectory.load` (:func:`register_files`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch

from .errors import ExplaindError, NonFiniteError, TrajectoryMismatchError
from .optimizers import rule_by_name

__all__ = ["StepRecord", "Trajectory", "all_finite", "first_non_finite", "check_model_matches", "register_files"]


@dataclass
class StepRecord:
    """Step t: the sample ids of its batch B_t with weights w_{t,i}, group hyper-parameters, and per-parameter state.

    ``updated`` names the parameters that received a gradient (PyTorch skips the others: no decay, no
    moment update, no step count). ``state[name]`` holds the optimizer state after the step that the
    rule reads (``step`` as an int, tensors such as ``exp_avg_sq``). ``gradient[name]`` is the
    ``.grad`` seen by ``optimizer.step()``, when recorded, used to diagnose replay mismatches.
    ``batch_calls``: when the step's batch was declared by several ``record_batch`` calls (gradient
    accumulation), the distinct ids of each call in order (None for one call); used to diagnose a step
    that optimizer.step() never ran for (a GradScaler skip) merged into the next one.
    """

    sample_ids: list[int]
    weights: torch.Tensor
    hyperparameters: list[dict]
    updated: list[str]
    state: dict[str, dict[str, Any]] = field(default_factory=dict)
    gradient: dict[str, torch.Tensor] | None = None
    batch_calls: list[list[int]] | None = None


class Trajectory:
    """A recorded training run: parameters θ_0 … θ_N and N step records (see the module docstring)."""

    def __init__(
        self,
        *,
        optimizer: str,
        parameter_names: Sequence[str],
        group_of: Mapping[str, int],
        parameters: Sequence[Mapping[str, torch.Tensor]],
        steps: Sequence[StepRecord],
        initial_state: Mapping[str, Mapping[str, Any]] | None = None,
        buffers: Mapping[str, torch.Tensor] | None = None,
        metadata: Mapping[str, Any] | None = None,
    ):
        self.optimizer = optimizer
        self.parameter_names = list(parameter_names)
        self.group_of = {k: int(v) for k, v in group_of.items()}
        self.parameters = [dict(p) for p in parameters]
        self.steps = list(steps)
        self.initial_state = {k: dict(v) for k, v in (initial_state or {}).items()}
        self.buffers = dict(buffers or {})
        self.metadata = dict(metadata or {})
        self.validate()

    # ------------------------------------------------------------------ basic facts
    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def rule(self):
        return rule_by_name(self.optimizer)

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(self.parameters[0][n].shape) for n in self.parameter_names}

    @property
    def dtype(self) -> torch.dtype:
        return self.parameters[0][self.parameter_names[0]].dtype

    def sample_ids(self) -> list[int]:
        """Every training-sample id used by any step, sorted."""
        return sorted({i for s in self.steps for i in s.sample_ids})

    def largest_batch(self) -> int:
        """The most samples any step used (sizes the per-sample-gradient chunks under a memory budget)."""
        return max((len(s.sample_ids) for s in self.steps), default=1)

    def __repr__(self) -> str:
        return (
            f"Trajectory(optimizer={self.optimizer!r}, steps={self.num_steps}, "
            f"parameters={len(self.parameter_names)} tensors, units={len(self.sample_ids())})"
        )

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check internal consistency; raise :class:`TrajectoryMismatchError` naming what is wrong."""
        rule = rule_by_name(self.optimizer)
        names = self.parameter_names
        if not names:
            raise TrajectoryMismatchError("a trajectory needs at least one parameter")
        if len(set(names)) != len(names):
            raise TrajectoryMismatchError("parameter names are not unique")
        if len(self.parameters) != len(self.steps) + 1:
            raise TrajectoryMismatchError(
                f"{len(self.steps)} steps need {len(self.steps) + 1} parameter snapshots θ_0..θ_N, "
                f"got {len(self.parameters)}"
            )
        missing_group = [n for n in names if n not in self.group_of]
        if missing_group:
            raise TrajectoryMismatchError(f"parameters without a param group: {missing_group}")
        shapes = {n: tuple(self.parameters[0][n].shape) for n in names if n in self.parameters[0]}
        dtypes = {n: self.parameters[0][n].dtype for n in names if n in self.parameters[0]}
        for t, snapshot in enumerate(self.parameters):
            check_snapshot(t, snapshot, names, shapes)
            changed = [n for n in names if snapshot[n].dtype != dtypes[n]]
            if changed:
                raise TrajectoryMismatchError(
                    f"θ_{t}[{changed[0]!r}] is {snapshot[changed[0]].dtype}, θ_0 has {dtypes[changed[0]]}"
                )
        num_groups = max(self.group_of.values()) + 1
        for t, step in enumerate(self.steps):
            check_step(t, step, rule, names, shapes, self.group_of, num_groups)

    def check_model(self, model: torch.nn.Module) -> None:
        """Raise :class:`TrajectoryMismatchError` if the model's parameters do not match by name and shape
        (after re-validating the trajectory itself, which may have been edited since it was built)."""
        self.validate()
        check_model_matches(self, model)

    # ------------------------------------------------------------------ construction from elsewhere
    @classmethod
    def from_records(
        cls,
        *,
        optimizer: str,
        parameters: Sequence[Mapping[str, torch.Tensor]],
        batches: Sequence[Sequence[int] | tuple[Sequence[int], Any]],
        hyperparameters: Sequence[Mapping[str, Any] | Sequence[Mapping[str, Any]]],
        param_groups: Mapping[str, int] | None = None,
        states: Sequence[Mapping[str, Mapping[str, Any]]] | None = None,
        updated: Sequence[Iterable[str]] | None = None,
        initial_state: Mapping[str, Mapping[str, Any]] | None = None,
        buffers: Mapping[str, torch.Tensor] | None = None,
        reduction: str = "mean",
        metadata: Mapping[str, Any] | None = None,
    ) -> "Trajectory":
        """Build a trajectory from data recorded by other training code.

        Args:
            optimizer: ``"adamw"`` (AdamW or Adam) or ``"sgd"``.
            parameters: θ_0 … θ_N, each a dict parameter name → tensor (N + 1 entries).
            batches: per step, the sample ids of B_t, or ``(ids, weights)`` with w_{t,i} explicit.
            hyperparameters: per step, one dict for all parameters or one per param group, with the
                keys of the optimizer's group (``lr``, ``betas``, ``eps``, ``weight_decay``, … as in
                ``optimizer.param_groups``), the values actually used at that step.
            param_groups: parameter name → group index (default: all in group 0).
            states: per step, parameter name → optimizer state after the step; AdamW needs ``step``
                and ``exp_avg_sq`` (``max_exp_avg_sq`` with amsgrad). SGD needs none.
            updated: per step, the names that received a gradient (default: all).
            initial_state: optimizer state before step 0 (``exp_avg``/``step`` or ``momentum_buffer``).
            buffers: model buffers during training (must stay constant).
            reduction: weights used when a batch gives only ids: ``"mean"`` (1/|B_t|) or ``"sum"`` (1).
        """
        rule = rule_by_name(optimizer)
        if len(parameters) == 0:
            raise TrajectoryMismatchError("parameters must hold the snapshots θ_0 … θ_N; got none")
        for label, per_step in (("hyperparameters", hyperparameters), ("states", states), ("updated", updated)):
            if per_step is not None and len(per_step) != len(batches):
                raise TrajectoryMismatchError(
                    f"{len(batches)} batches (steps) but {len(per_step)} entries in {label}; give one per step"
                )
        names = list(parameters[0])
        groups = dict(param_groups) if param_groups is not None else {n: 0 for n in names}
        steps = []
        for t, batch in enumerate(batches):
            ids, weights = _ids_and_weights(batch, reduction)
            hyper_t = hyperparameters[t]
            hyper_list = [hyper_t] if isinstance(hyper_t, Mapping) else list(hyper_t)
            normalized = []
            for gi, h in enumerate(hyper_list):
                normalized.append(normalized_hyperparameters(rule, h, t, gi))
            state_t = {}
            if states is not None:
                for n, st in states[t].items():
                    state_t[n] = {k: (int(_scalar(v)) if k == "step" else _tensor(v)) for k, v in st.items()}
            upd = list(updated[t]) if updated is not None else list(names)
            steps.append(StepRecord(ids, weights, normalized, upd, state_t, None))
        initial = {}
        for n, st in (initial_state or {}).items():
            initial[n] = {k: (int(_scalar(v)) if k == "step" else _tensor(v)) for k, v in st.items()}
        return cls(
            optimizer=optimizer,
            parameter_names=names,
            group_of=groups,
            parameters=[{n: _tensor(v) for n, v in p.items()} for p in parameters],
            steps=steps,
            initial_state=initial,
            buffers={k: _tensor(v) for k, v in (buffers or {}).items()},
            metadata=metadata,
        )

    # ------------------------------------------------------------------ files (explaind_math.storage)
    def save(self, path: str | os.PathLike) -> Path:
        """Write the trajectory to ``path`` (one .safetensors file) atomically; returns the path."""
        return _files_function("save")(self, path)

    def save_directory(self, directory: str | os.PathLike, *, steps_per_shard: int = 1) -> "Trajectory":
        """Write the trajectory as a directory of shards (see :mod:`explaind_math.storage`), one shard
        per ``steps_per_shard`` steps, and return it opened as a
        :class:`~explaind_math.storage.ShardedTrajectory`. Steps are written one shard at a time, so a
        ``ShardedTrajectory`` can be re-sharded without loading it. ``directory`` must not hold a
        trajectory already."""
        return _files_function("save_directory")(self, directory, steps_per_shard=steps_per_shard)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "Trajectory":
        """Read a file written by :meth:`save`; a truncated, foreign or corrupted file raises
        :class:`TrajectoryFileError` saying which.

        A directory (written by a recorder given ``directory=``, or by :meth:`save_directory`) is opened
        as a :class:`~explaind_math.storage.ShardedTrajectory`: nothing but its manifest and θ_0 is read
        until a step is asked for."""
        return _files_function("load")(path, cls)


# ---------------------------------------------------------------------- the model a trajectory belongs to
def check_model_matches(trajectory: "Trajectory", model: torch.nn.Module) -> None:
    """Raise :class:`TrajectoryMismatchError` unless the model has the trajectory's parameters (by name
    and shape) and the buffers recorded during training (equal values)."""
    shapes = trajectory.shapes()
    model_params = dict(model.named_parameters())
    missing = [n for n in trajectory.parameter_names if n not in model_params]
    if missing:
        raise TrajectoryMismatchError(
            f"the trajectory has parameters {missing} that the model does not have "
            f"(model parameters: {sorted(model_params)})"
        )
    for n in trajectory.parameter_names:
        shape = shapes[n]
        if tuple(model_params[n].shape) != shape:
            raise TrajectoryMismatchError(
                f"parameter {n!r}: trajectory shape {shape}, model shape {tuple(model_params[n].shape)}"
            )
    # the recorder stores buffers and frozen parameters (not in the optimizer) alike: the state the forward
    # reads besides θ, which must be what it was during training
    model_buffers = dict(model.named_buffers())
    model_buffers.update({n: p for n, p in model_params.items() if n not in shapes})
    for n, value in trajectory.buffers.items():
        if n not in model_buffers:
            raise TrajectoryMismatchError(f"the trajectory recorded buffer {n!r} that the model does not have")
        b = model_buffers[n]
        if tuple(b.shape) != tuple(value.shape) or not torch.equal(b.detach().cpu().to(value.dtype), value):
            kind = "frozen parameter" if n in model_params else "buffer"
            raise TrajectoryMismatchError(
                f"{kind} {n!r} of the model differs from the one recorded during training"
            )


# ---------------------------------------------------------------------- the file forms
_files: dict[str, Callable] = {}


def register_files(*, save: Callable, save_directory: Callable, load: Callable) -> None:
    """Set the functions behind :meth:`Trajectory.save` ``(trajectory, path)``,
    :meth:`Trajectory.save_directory` ``(trajectory, directory, steps_per_shard=)`` and
    :meth:`Trajectory.load` ``(path, cls)``; :mod:`explaind_math.storage` calls it when imported (the
    package ``explaind_math`` imports it), so that it depends on this module and not the reverse."""
    _files.update(save=save, save_directory=save_directory, load=load)


def _files_function(name: str) -> Callable:
    if name not in _files:
        raise ExplaindError("no file forms are registered: import explaind_math.storage to save or load trajectories")
    return _files[name]


# ---------------------------------------------------------------------- sequences made on demand
class OnDemandSequence(Sequence):
    """``length`` items, item t made by ``item(t)`` when asked for (θ_t or step t of a trajectory read lazily or
    rebuilt); negative indices count from the end, slices give lists, an index out of range is an IndexError
    naming ``what``."""

    def __init__(self, length: int, item: Callable[[int], Any], what: str):
        self._length, self._item, self._what = length, item, what

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, t):
        if isinstance(t, slice):
            return [self[i] for i in range(*t.indices(self._length))]
        t = int(t)
        position = t + self._length if t < 0 else t
        if not 0 <= position < self._length:
            raise IndexError(f"{self._what} index {position} out of range (length {self._length})")
        return self._item(position)


# ---------------------------------------------------------------------- validation of one θ_t / one step
def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry of ``x`` is finite. A NaN or ±Inf entry makes the sum NaN or ±Inf, so a finite
    sum settles it in one reduction (about 14× faster than ``isfinite(x).all()`` on a CPU); only a
    non-finite sum, which overflow can also produce, is checked entry by entry. Exact either way."""
    if not (x.is_floating_point() or x.is_complex()) or x.numel() == 0:
        return True
    if bool(torch.isfinite(x.sum())):
        return True
    return bool(torch.isfinite(x).all())


#: above this many elements a CPU tensor's finiteness is read off its own sum (see first_non_finite)
_OWN_SUM_ABOVE = 1 << 14


def first_non_finite(tensors: Sequence[torch.Tensor]) -> int | None:
    """The position of the first tensor with a NaN or ±Inf entry (None: all finite). The 2-norms of all tensors
    (one ``_foreach_norm``; a NaN or ±Inf entry makes a norm NaN or Inf; a large CPU tensor's sum instead) are
    compared in one reduction, one synchronisation for a whole step's tensors; only when one is not finite
    (overflow can also make it so) are the tensors checked one by one, exactly, with :func:`all_finite`."""
    floating = [x for x in tensors if (x.is_floating_point() or x.is_complex()) and x.numel()]
    if not floating:
        return None
    if all(x.dtype in (torch.float32, torch.float64) for x in floating):
        # a large CPU tensor by its own sum (torch parallelises a sum, not _foreach_norm: 148 against 228 us for a
        # 4-layer GPT-2's 0.8M parameters on 2 cores), the rest in one _foreach_norm
        large, rest = [], []
        for x in floating:
            (large if x.is_cpu and x.numel() > _OWN_SUM_ABOVE else rest).append(x)
        summaries = [x.sum() for x in large] + (list(torch._foreach_norm(rest)) if rest else [])
    else:
        summaries = [x.sum() for x in floating]
    if len({(v.dtype, v.device) for v in summaries}) > 1:  # stack needs one dtype and device
        summaries = [v.to(device="cpu", dtype=torch.complex128 if v.is_complex() else torch.float64)
                     for v in summaries]
    if bool(torch.isfinite(torch.stack(summaries)).all()):
        return None
    return next((k for k, x in enumerate(tensors) if not all_finite(x)), None)


def check_snapshot(t: int, snapshot: Mapping[str, torch.Tensor], names: Sequence[str],
                   shapes: Mapping[str, tuple[int, ...]]) -> None:
    """θ_t has exactly the trajectory's parameter names, θ_0's shapes, and finite values."""
    if set(snapshot) != set(names):
        raise TrajectoryMismatchError(
            f"θ_{t} has parameters {sorted(set(snapshot) ^ set(names))} that differ from the "
            "trajectory's parameter names"
        )
    for n in names:
        if tuple(snapshot[n].shape) != shapes[n]:
            raise TrajectoryMismatchError(
                f"θ_{t}[{n!r}] has shape {tuple(snapshot[n].shape)}, θ_0 has {shapes[n]}"
            )
        if not all_finite(snapshot[n]):
            raise NonFiniteError(f"θ_{t}[{n!r}] contains NaN or Inf")


def check_step(t: int, step: StepRecord, rule, names: Sequence[str], shapes: Mapping[str, tuple[int, ...]],
               group_of: Mapping[str, int], num_groups: int) -> None:
    """Step t: distinct units with one finite weight each, one hyper-parameter dict per param group,
    and, for every updated parameter, the optimizer state the rule reads, shaped and finite."""
    if len(step.sample_ids) != len(set(step.sample_ids)):
        raise TrajectoryMismatchError(f"step {t}: a sample id appears twice in the batch")
    if tuple(step.weights.shape) != (len(step.sample_ids),):
        raise TrajectoryMismatchError(
            f"step {t}: {len(step.sample_ids)} sample ids but weights of shape {tuple(step.weights.shape)}"
        )
    if not all_finite(step.weights):
        raise NonFiniteError(f"step {t}: sample weights contain NaN or Inf")
    if len(step.hyperparameters) != num_groups:
        raise TrajectoryMismatchError(
            f"step {t}: hyper-parameters for {len(step.hyperparameters)} param groups, "
            f"the parameters use {num_groups}"
        )
    for gi, hyper in enumerate(step.hyperparameters):
        normalized = normalized_hyperparameters(rule, hyper, t, gi)
        if normalized != hyper:
            missing = sorted(set(normalized) - set(hyper))
            what = (f"lack {missing} (the {rule.name} rule would assume its defaults)" if missing else
                    f"are not in the form the {rule.name} rule records: {hyper}, read as {normalized}")
            raise TrajectoryMismatchError(f"step {t}: the hyper-parameters of param group {gi} {what}")
    unknown = sorted(set(step.updated) - set(names))
    if unknown:
        raise TrajectoryMismatchError(f"step {t}: updated parameters {unknown} are not in the trajectory")
    for n in step.updated:
        hyper = step.hyperparameters[group_of[n]]
        st = step.state.get(n, {})
        if rule.needs_step_count() and "step" not in st:
            raise TrajectoryMismatchError(f"step {t}: parameter {n!r} has no recorded 'step' count")
        for key in rule.state_keys(hyper):
            if key not in st:
                raise TrajectoryMismatchError(
                    f"step {t}: parameter {n!r} lacks optimizer state {key!r}, which the "
                    f"{rule.name} rule needs"
                )
            value = st[key]
            expected = () if key in rule.scalar_state_keys else shapes[n]
            if tuple(value.shape) != expected:
                raise TrajectoryMismatchError(
                    f"step {t}: state {key!r} of {n!r} has shape {tuple(value.shape)}, expected {expected}"
                )
            if not all_finite(value):
                raise NonFiniteError(f"step {t}: optimizer state {key!r} of {n!r} contains NaN or Inf")
    if step.gradient is not None:
        for n, g in step.gradient.items():
            if n not in shapes:
                raise TrajectoryMismatchError(f"step {t}: recorded gradient of {n!r}, not a trajectory parameter")
            if tuple(g.shape) != shapes[n]:
                raise TrajectoryMismatchError(
                    f"step {t}: recorded gradient of {n!r} has shape {tuple(g.shape)}, expected {shapes[n]}"
                )


# ---------------------------------------------------------------------- helpers
def _scalar(v) -> float:
    return float(v.item()) if hasattr(v, "item") else float(v)


def _tensor(v) -> torch.Tensor:
    if isinstance(v, torch.Tensor):
        return v.detach().cpu().clone()
    t = torch.as_tensor(v)
    if t.is_floating_point() and not hasattr(v, "dtype"):
        # Python floats are doubles; torch.as_tensor would round them to the default dtype (float32)
        t = torch.as_tensor(v, dtype=torch.float64)
    return t


def normalized_hyperparameters(rule, hyper: Any, t: int, group: int) -> dict:
    """The rule's form of one param group's hyper-parameters at step t; a missing or mistyped value is a
    :class:`TrajectoryMismatchError` naming the step, the group and the key."""
    if not isinstance(hyper, Mapping):
        raise TrajectoryMismatchError(f"step {t}: the hyper-parameters of param group {group} are not a dict: {hyper!r}")
    try:
        return rule.hyperparameters(_as_group(hyper, rule))
    except KeyError as exc:
        raise TrajectoryMismatchError(
            f"step {t}: the hyper-parameters of param group {group} lack {exc.args[0]!r}, which the "
            f"{rule.name} rule needs (give the values actually used at that step)"
        ) from None
    except ExplaindError as exc:
        raise type(exc)(f"step {t}, param group {group}: {exc}") from None
    except (TypeError, ValueError) as exc:
        raise TrajectoryMismatchError(
            f"step {t}: the hyper-parameters of param group {group} are malformed ({type(exc).__name__}: {exc})"
        ) from None


def _as_group(h: Mapping[str, Any], rule) -> dict:
    """Accept optimizer.param_groups-style dicts, also with ``beta1``/``beta2`` spelled out (the form
    stored in a trajectory); options left out take the rule's ``group_defaults`` (torch's defaults)."""
    g = dict(h)
    g.pop("params", None)
    if "betas" not in g and "beta1" in g:
        g["betas"] = (g.pop("beta1"), g.pop("beta2"))
    for k, v in getattr(rule, "group_defaults", {}).items():
        g.setdefault(k, v)
    return g


def weights_for(ids: Sequence[int], weights, reduction: str) -> torch.Tensor:
    """w_{t,i}: given weights, else 1/|B| (``reduction="mean"``) or 1 (``"sum"``), as float64."""
    n = len(ids)
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float64).detach().cpu().reshape(-1)
        if w.numel() != n:
            raise TrajectoryMismatchError(f"{n} sample ids but {w.numel()} weights")
        return w.clone()
    if reduction == "mean":
        return torch.full((n,), 1.0 / n, dtype=torch.float64)
    if reduction == "sum":
        return torch.ones(n, dtype=torch.float64)
    raise ExplaindError(f"reduction must be 'mean' or 'sum', got {reduction!r}")


def _ids_and_weights(batch, reduction: str) -> tuple[list[int], torch.Tensor]:
    first = batch[0] if isinstance(batch, tuple) and len(batch) == 2 else None
    if first is not None and not isinstance(first, int) and getattr(first, "ndim", 1) != 0:
        ids, weights = batch
    else:
        ids, weights = batch, None
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    if not ids:
        raise TrajectoryMismatchError("a step needs at least one sample id")
    return ids, weights_for(ids, weights, reduction)


def is_finite_number(x: float) -> bool:
    return math.isfinite(x)
