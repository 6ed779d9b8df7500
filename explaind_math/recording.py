"""TrajectoryRecorder: records an unmodified torch.optim optimizer through its step hooks.

    recorder = TrajectoryRecorder(model, optimizer)
    for ids, x, y in loader:                      # your loop, your scheduler, your optimizer
        optimizer.zero_grad()
        loss_fn(model(x), y).mean().backward()
        recorder.record_batch(ids)                # which samples B_t this step used (weights 1/|B_t|)
        optimizer.step()                          # hooks record θ_t, θ_{t+1}, group values, state
        scheduler.step()
    trajectory = recorder.trajectory()

In memory, a step of a model above 32k trained elements is kept by its ``.grad`` alone where a rerun of the
optimizer reproduces θ_{t+1} and the state bit for bit (``rerun_optimizer``, :mod:`explaind_math.rerun`).
Given ``directory=``, the recorder writes the trajectory to disk as training runs, one safetensors
shard per ``steps_per_shard`` steps (:mod:`explaind_math.storage`), and keeps only the pending steps
and the last θ in memory; ``recorder.trajectory()`` then returns a
:class:`~explaind_math.storage.ShardedTrajectory`. Opening a recorder on a directory that already holds
a trajectory resumes it after its last finished step, once the model and optimizer are checked to
be exactly where that step left them.

Before each step the recorder refuses (and the step does not happen, so nothing is lost): a missing
batch, a closure, BatchNorm in training mode or without running statistics, active dropout, a forward
that is random or couples the samples (probed at the first step), changed buffers, frozen parameters or
module attributes, parameters or optimizer state changed outside ``optimizer.step()``, a param group
added mid-run, NaN/Inf gradients, and optimizer flags with no exact rule
(:mod:`~explaind_math.recording_checks`). A refused step discards the batch recorded for it: call
``record_batch`` again before stepping again.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import torch
from torch import nn

from .errors import NonFiniteError, RecordingError
from .integrations.names import unwrap_model
from .integrations.watch import ForwardWatch
from .optimizers import rule_for_optimizer
from .recording_checks import (
    ForwardState,
    OptimizerStateWatch,
    batch_ids,
    batch_weights,
    check_recording_options,
    cpu_copy,
    on_cpu,
)
from .recording_copies import FlatCopy, step_counts
from .recording_probe import check_batch_coupled_modules, check_deterministic_modules, probe_forward
from .rerun import RecordedRerun, RerunTrajectory, rerun_pays_off
from .trajectory import StepRecord, Trajectory, first_non_finite

__all__ = ["TrajectoryRecorder", "check_deterministic_modules"]


class TrajectoryRecorder:
    """Records θ_t, the per-group hyper-parameters used and the optimizer state at every
    ``optimizer.step()`` of an unmodified ``torch.optim.AdamW``/``Adam``/``SGD`` (MATH.md §0).

    Args:
        model: the module being trained; parameters are named by ``model.named_parameters()``.
        optimizer: the user's optimizer, with any number of param groups and any LR scheduler.
        record_gradients: also store each step's ``.grad`` (lets the replay check tell a loss that is
            not a weighted sum of per-sample losses from other mismatches; costs one copy of θ per step).
        check_modules: refuse BatchNorm in training mode and active dropout at every step, and probe the
            forward at the first step (two forwards of its batch, and its first sample alone), and refuse a
            changed scalar module attribute (a temperature).
        gradient_rescaling: the ``.grad`` seen by ``optimizer.step()`` may be c_t · Σ_i w_{t,i} ∇ℓ_i
            with one scalar c_t per step — ``torch.nn.utils.clip_grad_norm_`` over all trained
            parameters, or a constant loss scale. The decomposition recovers c_t from the recorded
            gradients, verifies that the gradient is exactly that multiple (clipping by value is not,
            and is refused) and folds c_t into the weights. Needs ``record_gradients=True``.
        grad_scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop; a step it skips (inf/NaN
            gradients) is then detected and its batch dropped instead of merged into the next step.
        directory: write the trajectory there as it is recorded (a directory of shards, see
            :mod:`explaind_math.storage`) instead of keeping it in memory. If the directory already
            holds a trajectory, recording resumes after its last finished step: the model's
            parameters must equal the last recorded θ exactly, its buffers the recorded ones, and the
            optimizer's state (step counts and the recorded state tensors) what was recorded last,
            otherwise :class:`RecordingError` names what differs. Restore model and optimizer from
            your checkpoint first (or :func:`~explaind_math.storage.truncate_trajectory_directory` to
            your checkpoint's step).
        steps_per_shard: with ``directory``, write one shard per this many steps (a crash loses at
            most the steps not yet written: ``steps_per_shard − 1``). Call :meth:`close` (or use
            ``with``) at the end so that the last, partial shard is written.
        write_in_background: with ``directory``, write shards from a background thread while training
            goes on (at most one shard queued behind the one being written); a crash then also loses
            the shards not yet committed, never the consistency of the directory.
        dropout: record active dropout for exact replay (``"auto"``: when the model has an active
            ``nn.Dropout``). Every training forward then draws its masks from a keyed hash
            (:mod:`explaind_math.integrations.forward`) and ``record_batch`` must be called once per
            forward with the ids in row order; the record is a few integers per step in
            ``trajectory.metadata["dropout"]``. ``False`` keeps refusing active dropout.
        dropout_seed: the seed of those masks (default: drawn from the OS, recorded).
        rerun_optimizer: keep a step by its ``.grad`` alone when a rerun of the optimizer on CPU copies
            reproduces θ_{t+1} and the state bit for bit, checked at the step (:mod:`explaind_math.rerun`):
            a third of the memory (AdamW); ``trajectory()`` rebuilds them on demand. In memory only; needs
            ``record_gradients=True``. ``"auto"``: where those hold and the trained parameters on the CPU
            exceed :data:`~explaind_math.rerun.RERUN_ABOVE` elements (below it copies cost less than a rerun).
    """

    def __init__(
        self,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        *,
        record_gradients: bool = True,
        check_modules: bool = True,
        gradient_rescaling: bool = False,
        grad_scaler: Any = None,
        directory: str | os.PathLike | None = None,
        steps_per_shard: int = 1,
        write_in_background: bool = False,
        dropout: bool | str = "auto",
        dropout_seed: int | None = None,
        rerun_optimizer: bool | str = "auto",
    ):
        model = unwrap_model(model)  # torch.compile / DDP: parameters named as the model itself names them
        check_recording_options(gradient_rescaling, record_gradients, rerun_optimizer, directory)
        self._rerun_wanted, self._rerun = rerun_optimizer, None  # "auto": resolved at step 0 (_wants_rerun)
        self.gradient_rescaling = gradient_rescaling
        self.grad_scaler = grad_scaler
        self._scale_at_batch: float | None = None
        self.model = model
        self.optimizer = optimizer
        self.rule = rule_for_optimizer(optimizer)
        self.record_gradients = record_gradients
        self.check_modules = check_modules
        name_of = {id(p): n for n, p in model.named_parameters()}
        self._params: list[tuple[str, torch.Tensor, int]] = []
        seen = set()
        for gi, group in enumerate(optimizer.param_groups):
            self.rule.hyperparameters(group)  # refuse unsupported flags before training starts
            for p in group["params"]:
                if id(p) not in name_of:
                    raise RecordingError(
                        f"param group {gi} holds a tensor of shape {tuple(p.shape)} that is not a parameter of the model"
                    )
                if torch.is_complex(p):
                    raise RecordingError(f"parameter {name_of[id(p)]!r} is complex; only real parameters are supported")
                if id(p) in seen:
                    raise RecordingError(f"parameter {name_of[id(p)]!r} appears in two param groups")
                seen.add(id(p))
                self._params.append((name_of[id(p)], p, gi))
        # buffers and frozen parameters: recorded once (as the trajectory's buffers), checked every step
        self._forward_state = ForwardState(model, [p for _, p, _ in self._params], attributes=check_modules)
        self._buffers = dict(self._forward_state.tensors)
        self._state_watch = OptimizerStateWatch()
        self._probe_input: tuple | None = None
        self._probe_pending = check_modules
        self._probe_rows: int | None = None  # rows of the last record_batch call: the captured forward's batch
        self._snapshots: list[FlatCopy] = []  # θ_0 … (with a directory: only θ_0, until the first shard)
        self._steps: list[_RecordedStep] = []
        self._initial_state: dict[str, dict] = {}
        self._pending: dict[int, float] = {}
        self._calls: list[list[int]] = []  # the distinct ids of each record_batch call of the pending step
        self._current: dict | None = None
        self._count = 0  # steps recorded, including those found on disk when resuming
        self._last_theta: FlatCopy | None = None  # θ_t, to catch changes between steps
        self._last_step: _RecordedStep | None = None  # the last step kept: its layout is shared by the next
        self._writer = None
        self.resumed_from: int | None = None
        self._metadata: dict = {}  # the user's (trajectory(metadata=...), flush(metadata=...)), merged
        self._watch = ForwardWatch(model, dropout, dropout_seed)  # dropout recorded for replay; autocast refused
        if directory is not None:
            self._open_directory(directory, steps_per_shard, write_in_background)
        self._watch.step = self._count
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]
        if check_modules:  # the first recorded batch's forward inputs, for probe_forward
            self._handles.append(model.register_forward_pre_hook(self._capture_input, with_kwargs=True))

    # ------------------------------------------------------------------ user calls
    def record_batch(self, ids: Sequence[int] | torch.Tensor, weights=None, *, reduction: str = "mean") -> None:
        """Declare the samples whose (weighted) losses were summed into this step's gradient.

        ``weights`` gives w_{t,i} explicitly; otherwise ``reduction="mean"`` means w = 1/len(ids) and
        ``"sum"`` means w = 1. Call it once per micro-batch under gradient accumulation: the step's
        units are the union, and weights of a repeated id add up.
        """
        if self._current is not None:
            # the last optimizer.step() passed our checks but raised inside torch: drop its batch
            self._current = None
            self._forget_pending()
        if self.grad_scaler is not None:
            scale = float(self.grad_scaler.get_scale())
            if self._pending and self._scale_at_batch is not None and scale < self._scale_at_batch:
                # GradScaler.update() lowered the scale: the step of the pending batch was skipped
                self._forget_pending()
            self._scale_at_batch = scale
        ids = batch_ids(ids)
        self._probe_rows = len(ids)
        if not ids:
            raise RecordingError("record_batch needs at least one sample id")
        self._watch.batch(ids)  # with dropout: this micro-batch's ids in row order
        w = batch_weights(ids, weights, reduction)
        for i, wi in zip(ids, w.tolist()):  # a repeated id (sampling with replacement): its weights add up
            self._pending[i] = self._pending.get(i, 0.0) + wi
        self._calls.append(sorted(set(ids)))

    def _forget_pending(self) -> None:
        """Drop the batch declared for the next step (its ids, weights and record_batch calls)."""
        self._pending, self._calls = {}, []

    def trajectory(self, metadata: dict | None = None) -> Trajectory:
        """The steps recorded so far (θ_0 … θ_N and N step records).

        With ``directory``: writes the pending steps (a shard, possibly shorter than
        ``steps_per_shard``) and returns the directory opened as a
        :class:`~explaind_math.storage.ShardedTrajectory`. ``metadata`` is added to the trajectory's metadata and
        kept for later calls and manifests (a key given again takes its new value).
        """
        if self._count == 0:
            raise RecordingError("no optimizer step was recorded yet")
        if self._writer is not None:
            from .storage import ShardedTrajectory

            self.flush(metadata)
            return ShardedTrajectory(self._writer.directory)
        self._metadata.update(metadata or {})
        common = dict(optimizer=self.rule.name, parameter_names=[n for n, _, _ in self._params],
                      group_of={n: gi for n, _, gi in self._params}, initial_state=self._initial_state,
                      buffers=self._buffers, steps=[step.record() for step in self._steps],
                      metadata=self._trajectory_metadata())
        by_gradient = sum(theta is None for theta in self._snapshots)  # steps rebuilt on demand (RerunTrajectory)
        if self._rerun is not None:
            common["metadata"]["optimizer_rerun"] = self._rerun.metadata(self._count, by_gradient)
        if by_gradient:
            thetas = [None if theta is None else self._named(theta) for theta in self._snapshots]
            return RerunTrajectory(thetas=thetas, rerun=self._rerun, rule=self.rule, **common)
        return Trajectory(parameters=[self._named(theta) for theta in self._snapshots], **common)

    @property
    def num_steps(self) -> int:
        """Steps recorded (with ``directory``: including those found there when resuming)."""
        return self._count

    @property
    def directory(self):
        """Where the trajectory is written (``None`` when it is kept in memory)."""
        return None if self._writer is None else self._writer.directory

    def flush(self, metadata: dict | None = None) -> None:
        """With ``directory``: write the steps not yet on disk now (a shorter shard) and the manifest, and wait until
        they are committed. Every manifest holds the metadata so far: ``metadata`` (when given, added to that of
        earlier calls) and the dropout record of the steps it lists."""
        if self._writer is not None and metadata:
            metadata = json.loads(json.dumps(dict(metadata)))  # refused here, not at every later shard
        self._metadata.update(metadata or {})
        if self._writer is not None:
            self._writer.flush()
            self._writer.wait()

    def _trajectory_metadata(self) -> dict:
        """The trajectory's metadata now: the user's, the dropout record (its rows in the shards with a directory),
        gradient_rescaling."""
        dropout = self._watch.metadata() if self._writer is None else self._watch.manifest_record()
        return {**self._metadata, **dropout, "gradient_rescaling": self.gradient_rescaling}

    def close(self) -> None:
        """Remove the hooks (the optimizer is left exactly as the user made it); with ``directory``,
        write the pending steps and release the directory."""
        for h in self._handles:
            h.remove()
        self._handles = []
        self._watch.close()
        if self._writer is not None and not self._writer.closed:
            self._writer.close()

    def __enter__(self) -> "TrajectoryRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ resuming a directory
    def _open_directory(self, directory, steps_per_shard: int, background: bool) -> None:
        """The writer of ``directory``; a trajectory found there is resumed (:meth:`_resume`). Every manifest it
        writes holds :meth:`_trajectory_metadata` (the dropout seed and calls), each shard its steps' dropout rows."""
        from .storage import TrajectoryShardWriter

        try:
            self._writer = TrajectoryShardWriter(directory, steps_per_shard=steps_per_shard, background=background)
            if self._writer.has_trajectory:
                self._resume()
        except BaseException:
            self._watch.close()
            if self._writer is not None:  # (opened: the lock taken)
                self._writer.abandon()
            raise
        self._writer.metadata_source = self._trajectory_metadata
        self._writer.dropout_rows_source = self._watch.rows_of if self._watch.records_dropout else None

    def _resume(self) -> None:
        """Continue the trajectory found in the directory after its last finished step N, once the model
        (parameters = θ_N, buffers) and the optimizer (state after step N − 1) are checked against it."""
        from .storage import ShardedTrajectory

        existing = ShardedTrajectory(self._writer.directory, cache_shards=1)
        n = existing.num_steps
        where = f"cannot resume recording in {self._writer.directory} ({n} finished steps)"
        names = [name for name, _, _ in self._params]
        if existing.optimizer != self.rule.name:
            raise RecordingError(
                f"{where}: it was recorded with the {existing.optimizer!r} rule, this optimizer uses {self.rule.name!r}"
            )
        if existing.parameter_names != names:
            raise RecordingError(
                f"{where}: it records parameters {existing.parameter_names}, the optimizer holds {names}"
            )
        moved = [name for name, _, gi in self._params if existing.group_of[name] != gi]
        if moved:
            raise RecordingError(f"{where}: parameters {moved} are in other param groups than when recorded")
        shapes, dtypes = existing.shapes(), existing._dtypes
        for name, p, _ in self._params:
            if tuple(p.shape) != shapes[name] or p.dtype != dtypes[name]:
                raise RecordingError(
                    f"{where}: parameter {name!r} is {p.dtype} of shape {tuple(p.shape)}, recorded as "
                    f"{dtypes[name]} of shape {shapes[name]}"
                )
        if sorted(existing.buffers) != sorted(self._buffers) or any(
            not torch.equal(self._buffers[b], existing.buffers[b]) for b in existing.buffers
        ):
            raise RecordingError(f"{where}: the model's buffers differ from those recorded")
        if bool(existing.metadata.get("gradient_rescaling", False)) != self.gradient_rescaling:
            raise RecordingError(
                f"{where}: it was recorded with gradient_rescaling={not self.gradient_rescaling}, this recorder "
                f"has gradient_rescaling={self.gradient_rescaling}"
            )
        theta = self._snapshot()
        now, last = self._named(theta), existing.parameters[n]
        differing = []
        for name in names:
            if not torch.equal(now[name], last[name]):
                gap = float((now[name].double() - last[name].double()).abs().max())
                differing.append(f"{name!r} (max |difference| {gap:.3g})")
        if differing:
            raise RecordingError(
                f"{where}: the model's parameters are not the recorded θ_{n}: {', '.join(differing)}. Restore "
                f"the model and optimizer from the checkpoint taken after step {n - 1} (θ_{n}); if your "
                "checkpoint is of an earlier step s, first call "
                "explaind_math.storage.truncate_trajectory_directory(directory, s); to record a new "
                "trajectory, give an empty or new directory"
            )
        self._check_resumed_optimizer_state(existing, where)
        self._metadata = {k: v for k, v in existing.metadata.items() if k not in ("dropout", "gradient_rescaling")}
        self._watch.continue_record(existing.metadata.get("dropout"), n, where,
                                    existing.manifest_metadata.get("dropout", {}).get("steps"))
        self._count = n
        self._last_theta = theta
        self.resumed_from = n

    def _check_resumed_optimizer_state(self, existing, where: str) -> None:
        """The optimizer's state must be what the last recorded step of each parameter left: its step
        count and the state tensors the rule reads (the first-moment / momentum buffer is not recorded
        per step; a wrong one would surface as a replay mismatch in the decomposition)."""
        expected: dict[str, dict] = {}
        remaining = {name for name, _, _ in self._params}
        for t in range(existing.num_steps - 1, -1, -1):
            if not remaining:
                break
            step = existing.steps[t]
            for name in step.updated:
                if name in remaining:
                    expected[name] = dict(step.state.get(name, {}))
                    remaining.discard(name)
        for name in remaining:  # never updated by a recorded step: the state carried into step 0
            expected[name] = dict(existing.initial_state.get(name, {}))
        problems = []
        for name, p, _ in self._params:
            st = self.optimizer.state.get(p, {})
            want = expected[name]
            have_step = None
            if "step" in st:
                have_step = int(st["step"].item() if hasattr(st["step"], "item") else st["step"])
            if want.get("step") != have_step:
                problems.append(f"{name!r}: step count {have_step}, recorded {want.get('step')}")
            for key, value in want.items():
                if key == "step":
                    continue
                if key not in st:
                    problems.append(f"{name!r}: no {key!r} in the optimizer state, one was recorded")
                elif not torch.equal(on_cpu(st[key]), value):
                    problems.append(f"{name!r}: {key!r} differs from the recorded one")
        if problems:
            raise RecordingError(
                f"{where}: the optimizer's state is not the one recorded after the last step: "
                + "; ".join(problems[:8]) + ("; …" if len(problems) > 8 else "")
                + ". Restore the optimizer (optimizer.load_state_dict) from the same checkpoint as the model"
            )

    # ------------------------------------------------------------------ hooks
    def _snapshot(self) -> FlatCopy:
        return FlatCopy([p for _, p, _ in self._params], like=self._last_theta, live_views=True)

    def _named(self, theta: FlatCopy) -> dict[str, torch.Tensor]:
        return {n: v for (n, _, _), v in zip(self._params, theta.views())}

    def _before_step(self, optimizer, args, kwargs) -> None:
        try:
            self._check_and_prepare(optimizer, args, kwargs)
        except Exception:
            # a refused step consumes the batch declared for it: the user records it again (or the next
            # batch) before stepping, instead of having stale ids merged into the next step's units
            self._forget_pending()
            raise

    def _check_and_prepare(self, optimizer, args, kwargs) -> None:
        t = self._count
        where = f"step {t}"
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
        if closure is not None:
            raise RecordingError(f"{where}: optimizer.step(closure) re-evaluates the loss inside the step; "
                                 "call loss.backward() before optimizer.step() instead")
        if not self._pending:
            raise RecordingError(f"{where}: no batch recorded; call recorder.record_batch(ids) before optimizer.step()")
        self._watch.before_step(t)  # every training forward of the step has its ids (dropout)
        self._state_watch.check_param_groups(optimizer, self._params, where)
        tree = self._forward_state.tree
        modules = tree.named_modules()  # one list of the modules for every check of the step
        if self.check_modules:
            checked = tree.named_batch_or_random()  # of those modules, the kinds these two refuse
            check_deterministic_modules(self.model, where, self._watch.records_dropout, checked)
            check_batch_coupled_modules(self.model, where, checked)
        self._forward_state.check(self.model, where, modules)
        self._state_watch.check(optimizer, self._params, where)
        if self._probe_pending and self._probe_input is not None:
            exempt = [m for m in self.model.modules()
                      if isinstance(m, (nn.modules.dropout._DropoutNd, nn.MultiheadAttention))]
            self._probe_pending = False  # the forward hook stops capturing during the probe
            try:
                probe_forward(self.model, *self._probe_input, where, exempt, batch_rows=self._probe_rows)
            except Exception:
                self._probe_pending = True
                raise
            self._probe_input = None
        if t == 0 and self.resumed_from is None:
            theta = self._snapshot()
            self._snapshots = [theta]  # (re)set: a refused first step must not leave a second θ_0 behind
            self._initial_state = self._carried_state()
            self._last_theta = theta
            self._rerun = RecordedRerun(optimizer, self._params, theta.views()) if self._wants_rerun() else None
        else:
            previous = self._last_theta  # θ_t, recorded after the last step: compare, no copy
            bad = previous.first_difference([p for _, p, _ in self._params])
            if bad is not None:
                n, p, _ = self._params[bad]
                how = f" (dtype {previous.dtypes[bad]} -> {p.dtype})" if p.dtype != previous.dtypes[bad] else ""
                raise RecordingError(
                    f"{where}: parameter {n!r} changed between optimizer steps {t - 1} and {t} "
                    f"outside optimizer.step(){how}; such changes cannot be attributed"
                )
        hyper = [self.rule.hyperparameters(g) for g in optimizer.param_groups]
        grads = {}
        for n, p, _ in self._params:
            if (grad := p.grad) is None:
                continue
            if grad.is_sparse:
                raise RecordingError(f"{where}: parameter {n!r} has a sparse gradient, which is not supported")
            grads[n] = grad
        last = self._last_step._current if self._last_step is not None else None
        updated = list(grads)
        if last is not None and last["updated"] == updated:
            updated = last["updated"]  # shared with the last step: no new objects kept per step (see FlatCopy)
        like = last["gradient"] if last is not None else None
        gradient = FlatCopy(list(grads.values()), like=like) if self.record_gradients else None
        bad = first_non_finite(list(grads.values())) if gradient is None else gradient.first_non_finite()
        if bad is not None:
            raise NonFiniteError(f"{where}: the gradient of parameter {updated[bad]!r} contains NaN or Inf")
        ids = sorted(self._pending)
        weights = torch.tensor([self._pending[i] for i in ids], dtype=torch.float64)
        self._current = {"ids": ids, "weights": weights, "hyper": hyper, "updated": updated, "gradient": gradient,
                         "calls": self._calls if len(self._calls) > 1 else None}

    def _after_step(self, optimizer, args, kwargs) -> None:
        t = self._count
        current, self._current = self._current, None
        self._forget_pending()
        rerun = self._rerun
        rerunning = rerun is not None and rerun.given_up is None  # the live tensors are checked, copies maybe not made
        theta = None if rerunning else self._snapshot()
        bad = first_non_finite([p.detach() for _, p, _ in self._params]) if rerunning else theta.first_non_finite()
        if bad is not None:
            raise NonFiniteError(
                f"step {t}: parameter {self._params[bad][0]!r} became NaN or Inf; the {t} steps before it are kept "
                "(recorder.trajectory())"
            )
        keys_of_group = [self.rule.state_keys(h) for h in current["hyper"]]
        states, counted, counts, slots, names, tensors = self._state_watch.entries_after_step(
            optimizer, self._params, current["updated"], keys_of_group)  # step counts; recorded state at slots
        last = self._last_step
        like = last._state if last is not None else None  # the last step's layout, shared (FlatCopy)
        state = None if rerunning else FlatCopy(tensors, like=like, live_views=True)
        bad = first_non_finite(tensors) if state is None else state.first_non_finite()  # refuse the step, not the run
        if bad is not None:
            index, key = slots[bad]
            raise NonFiniteError(
                f"step {t}: the optimizer state {key!r} of parameter {self._params[index][0]!r} became NaN or Inf; "
                f"the {t} steps before it are kept (recorder.trajectory())"
            )
        # the rerun only once the step can no longer be refused: a refused step leaves it, and what the next step
        # compares θ and the state with, at the last step kept
        extra = any(v is not None for v in (*args[1:], *kwargs.values()))  # args[0] is the optimizer
        by_gradient = rerun is not None and rerun.after_step(optimizer, current, extra)
        if rerunning and not by_gradient:
            theta, state = self._snapshot(), FlatCopy(tensors, like=like, live_views=True)
        elif by_gradient:
            theta = FlatCopy.over(rerun.rerun.theta)
        record = _RecordedStep(current, dict(zip(counted, step_counts(counts))), names, state)
        self._watch.after_step(t)
        self._count += 1
        self._last_theta, self._last_step = theta, record
        self._state_watch.record(optimizer, self._params, *(rerun.state_reference(optimizer) if by_gradient
                                                            else (slots, state)), states=states)
        if self._writer is None:
            self._steps.append(record)
            self._snapshots.append(None if by_gradient else theta)
            if rerun is not None and not by_gradient:
                rerun.restart(t + 1, theta.views(), optimizer)
            return
        if not self._writer.has_trajectory:
            self._writer.begin(
                optimizer=self.rule.name, parameter_names=[n for n, _, _ in self._params],
                group_of={n: gi for n, _, gi in self._params}, theta_0=self._named(self._snapshots[0]),
                initial_state=self._initial_state, buffers=self._buffers,
                metadata={"gradient_rescaling": self.gradient_rescaling},
            )
            self._snapshots = []
        self._writer.append(record.record(), self._named(theta))  # a shard (then the manifest) every steps_per_shard steps

    def _wants_rerun(self) -> bool:
        if self._rerun_wanted == "auto":
            return self._writer is None and self.record_gradients and rerun_pays_off(self._params)
        return self._rerun_wanted  # a bool (check_recording_options)

    def _capture_input(self, module, args, kwargs) -> None:
        if self._probe_pending:
            self._probe_input = (args, kwargs)

    def _carried_state(self) -> dict[str, dict]:
        """Optimizer state that existed before the first recorded step (a checkpoint resumed)."""
        key = self.rule.buffer_state_key
        carried = {}
        for n, p, _ in self._params:
            st = self.optimizer.state.get(p, {})
            entry = {}
            if key is not None and st.get(key) is not None:
                entry[key] = cpu_copy(st[key])
            if "step" in st:
                entry["step"] = int(st["step"].item() if hasattr(st["step"], "item") else st["step"])
            if entry:
                carried[n] = entry
        return carried


class _RecordedStep:
    """One step as the recorder keeps it until the trajectory is asked for: the step's ids, weights, hyper-parameters
    and step counts, and its gradient and optimizer state as :class:`~explaind_math.recording_copies.FlatCopy`
    (the per-tensor views are made by :meth:`record`)."""

    __slots__ = ("_current", "_counts", "_slots", "_state")

    def __init__(self, current: dict, counts: dict[str, int], slots: list[tuple[str, str]], state: FlatCopy | None):
        self._current, self._counts, self._slots, self._state = current, counts, slots, state

    def record(self) -> StepRecord:
        current = self._current
        state: dict[str, dict] = {n: {} for n in current["updated"]}
        for n, count in self._counts.items():
            state[n]["step"] = count
        for (n, key), copy in zip(self._slots, self._state.views() if self._state is not None else ()):
            state[n][key] = copy  # (no state kept: a step kept by its gradient, rebuilt by RerunTrajectory)
        gradient = current["gradient"]
        if gradient is not None:
            gradient = dict(zip(current["updated"], gradient.views()))
        return StepRecord(current["ids"], current["weights"], current["hyper"], current["updated"], state,
                          gradient, current["calls"])
