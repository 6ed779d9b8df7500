"""TrajectoryRecorder: records an unmodified torch.optim optimizer through its step hooks.

    recorder = TrajectoryRecorder(model, optimizer)
    for ids, x, y in loader:                      # your loop, your scheduler, your optimizer
        optimizer.zero_grad()
        loss_fn(model(x), y).mean().backward()
        recorder.record_batch(ids)                # which samples B_t this step used (weights 1/|B_t|)
        optimizer.step()                          # hooks record θ_t, θ_{t+1}, group values, state
        scheduler.step()
    trajectory = recorder.trajectory()

Before each step the recorder refuses (and the step does not happen, so nothing is lost): a missing
batch, a closure, BatchNorm in training mode or active dropout, changed buffers, parameters changed
outside ``optimizer.step()``, NaN/Inf gradients, and optimizer flags with no exact rule. A refused
step discards the batch recorded for it: call ``record_batch`` again before stepping again.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from .errors import NonFiniteError, RecordingError, StochasticTrainingError
from .optimizers import rule_for_optimizer
from .trajectory import StepRecord, Trajectory, weights_for

__all__ = ["TrajectoryRecorder", "check_deterministic_modules"]


def check_deterministic_modules(model: nn.Module, where: str) -> None:
    """Refuse BatchNorm in training mode and active dropout: both break "loss = Σ_i w_i ℓ_i"."""
    for name, module in model.named_modules():
        label = name or type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise StochasticTrainingError(
                f"{where}: BatchNorm module {label!r} is in training mode, so each sample's output depends "
                "on the whole batch and no per-sample decomposition exists; put it in eval mode "
                "(module.eval()) or use LayerNorm/GroupNorm"
            )
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
            raise StochasticTrainingError(
                f"{where}: dropout module {label!r} is active (p={module.p}), so the recorded gradients "
                "cannot be reproduced; call module.eval() or set p=0"
            )
        if isinstance(module, nn.MultiheadAttention) and module.training and module.dropout > 0:
            raise StochasticTrainingError(
                f"{where}: attention module {label!r} has active dropout={module.dropout}; set it to 0 or eval()"
            )


class TrajectoryRecorder:
    """Records θ_t, the per-group hyper-parameters used and the optimizer state at every
    ``optimizer.step()`` of an unmodified ``torch.optim.AdamW``/``Adam``/``SGD`` (MATH.md §0).

    Args:
        model: the module being trained; parameters are named by ``model.named_parameters()``.
        optimizer: the user's optimizer, with any number of param groups and any LR scheduler.
        record_gradients: also store each step's ``.grad`` (lets the replay check tell a loss that is
            not a weighted sum of per-sample losses from other mismatches; costs one copy of θ per step).
        check_modules: refuse BatchNorm in training mode and active dropout at every step.
        gradient_rescaling: the ``.grad`` seen by ``optimizer.step()`` may be c_t · Σ_i w_{t,i} ∇ℓ_i
            with one scalar c_t per step — ``torch.nn.utils.clip_grad_norm_`` over all trained
            parameters, or a constant loss scale. The decomposition recovers c_t from the recorded
            gradients, verifies that the gradient is exactly that multiple (clipping by value is not,
            and is refused) and folds c_t into the weights. Needs ``record_gradients=True``.
        grad_scaler: the ``torch.amp.GradScaler`` of a mixed-precision loop; a step it skips (inf/NaN
            gradients) is then detected and its batch dropped instead of merged into the next step.
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
    ):
        if gradient_rescaling and not record_gradients:
            raise RecordingError("gradient_rescaling=True needs record_gradients=True (c_t is read off the gradients)")
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
        self._buffers = {n: b.detach().cpu().clone() for n, b in model.named_buffers()}
        self._snapshots: list[dict[str, torch.Tensor]] = []
        self._steps: list[StepRecord] = []
        self._initial_state: dict[str, dict] = {}
        self._pending: dict[int, float] = {}
        self._current: dict | None = None
        self._handles = [
            optimizer.register_step_pre_hook(self._before_step),
            optimizer.register_step_post_hook(self._after_step),
        ]

    # ------------------------------------------------------------------ user calls
    def record_batch(self, ids: Sequence[int] | torch.Tensor, weights=None, *, reduction: str = "mean") -> None:
        """Declare the samples whose (weighted) losses were summed into this step's gradient.

        ``weights`` gives w_{t,i} explicitly; otherwise ``reduction="mean"`` means w = 1/len(ids) and
        ``"sum"`` means w = 1. Call it once per micro-batch under gradient accumulation: the step's
        units are the union, and weights of a repeated id add up.
        """
        if self._current is not None:
            # the last optimizer.step() passed our checks but raised inside torch: drop its batch
            self._current, self._pending = None, {}
        if self.grad_scaler is not None:
            scale = float(self.grad_scaler.get_scale())
            if self._pending and self._scale_at_batch is not None and scale < self._scale_at_batch:
                # GradScaler.update() lowered the scale: the step of the pending batch was skipped
                self._pending = {}
            self._scale_at_batch = scale
        ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
        if not ids:
            raise RecordingError("record_batch needs at least one sample id")
        if len(set(ids)) != len(ids):
            raise RecordingError("record_batch: a sample id appears twice; give each sample once with its weight")
        w = weights_for(ids, weights, reduction)
        for i, wi in zip(ids, w.tolist()):
            self._pending[i] = self._pending.get(i, 0.0) + wi

    def trajectory(self, metadata: dict | None = None) -> Trajectory:
        """The steps recorded so far (θ_0 … θ_N and N step records)."""
        if not self._steps:
            raise RecordingError("no optimizer step was recorded yet")
        return Trajectory(
            optimizer=self.rule.name,
            parameter_names=[n for n, _, _ in self._params],
            group_of={n: gi for n, _, gi in self._params},
            parameters=list(self._snapshots),
            steps=list(self._steps),
            initial_state=self._initial_state,
            buffers=self._buffers,
            metadata={**(metadata or {}), "gradient_rescaling": self.gradient_rescaling},
        )

    @property
    def num_steps(self) -> int:
        return len(self._steps)

    def close(self) -> None:
        """Remove the hooks; the optimizer is left exactly as the user made it."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self) -> "TrajectoryRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ hooks
    def _snapshot(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().cpu().clone() for n, p, _ in self._params}

    def _before_step(self, optimizer, args, kwargs) -> None:
        try:
            self._check_and_prepare(optimizer, args, kwargs)
        except Exception:
            # a refused step consumes the batch declared for it: the user records it again (or the next
            # batch) before stepping, instead of having stale ids merged into the next step's units
            self._pending = {}
            raise

    def _check_and_prepare(self, optimizer, args, kwargs) -> None:
        t = len(self._steps)
        where = f"step {t}"
        closure = args[1] if len(args) > 1 else kwargs.get("closure")  # args[0] is the optimizer
        if closure is not None:
            raise RecordingError(f"{where}: optimizer.step(closure) re-evaluates the loss inside the step; "
                                 "call loss.backward() before optimizer.step() instead")
        if not self._pending:
            raise RecordingError(f"{where}: no batch recorded; call recorder.record_batch(ids) before optimizer.step()")
        if self.check_modules:
            check_deterministic_modules(self.model, where)
        for n, b in self.model.named_buffers():
            if n not in self._buffers or not torch.equal(b.detach().cpu(), self._buffers[n]):
                raise StochasticTrainingError(
                    f"{where}: buffer {n!r} changed during training (a BatchNorm running statistic?); "
                    "the decomposition needs a model whose buffers stay fixed"
                )
        theta = self._snapshot()
        if t == 0:
            self._snapshots = [theta]  # (re)set: a refused first step must not leave a second θ_0 behind
            self._initial_state = self._carried_state()
        else:
            previous = self._snapshots[-1]
            for n in theta:
                if not torch.equal(theta[n], previous[n]):
                    raise RecordingError(
                        f"{where}: parameter {n!r} changed between optimizer steps {t - 1} and {t} "
                        "outside optimizer.step(); such changes cannot be attributed"
                    )
        hyper = [self.rule.hyperparameters(g) for g in optimizer.param_groups]
        updated, gradient = [], {}
        for n, p, _ in self._params:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RecordingError(f"{where}: parameter {n!r} has a sparse gradient, which is not supported")
            if not torch.isfinite(p.grad).all():
                raise NonFiniteError(f"{where}: the gradient of parameter {n!r} contains NaN or Inf")
            updated.append(n)
            if self.record_gradients:
                gradient[n] = p.grad.detach().cpu().clone()
        ids = sorted(self._pending)
        weights = torch.tensor([self._pending[i] for i in ids], dtype=torch.float64)
        self._current = {"ids": ids, "weights": weights, "hyper": hyper, "updated": updated,
                         "gradient": gradient if self.record_gradients else None}

    def _after_step(self, optimizer, args, kwargs) -> None:
        t = len(self._steps)
        current, self._current = self._current, None
        self._pending = {}
        theta = self._snapshot()
        for n, v in theta.items():
            if not torch.isfinite(v).all():
                raise NonFiniteError(
                    f"step {t}: parameter {n!r} became NaN or Inf; the {t} steps before it are kept "
                    "(recorder.trajectory())"
                )
        state = {}
        for n, p, gi in self._params:
            if n not in current["updated"]:
                continue
            st = optimizer.state.get(p, {})
            entry = {}
            if "step" in st:
                entry["step"] = int(st["step"].item() if hasattr(st["step"], "item") else st["step"])
            for key in self.rule.state_keys(current["hyper"][gi]):
                entry[key] = st[key].detach().cpu().clone()
            state[n] = entry
        self._steps.append(
            StepRecord(current["ids"], current["weights"], current["hyper"], current["updated"], state, current["gradient"])
        )
        self._snapshots.append(theta)

    def _carried_state(self) -> dict[str, dict]:
        """Optimizer state that existed before the first recorded step (a checkpoint resumed)."""
        key = self.rule.buffer_state_key
        carried = {}
        for n, p, _ in self._params:
            st = self.optimizer.state.get(p, {})
            entry = {}
            if key is not None and st.get(key) is not None:
                entry[key] = st[key].detach().cpu().clone()
            if "step" in st:
                entry["step"] = int(st["step"].item() if hasattr(st["step"], "item") else st["step"])
            if entry:
                carried[n] = entry
        return carried
