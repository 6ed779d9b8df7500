"""The record-time checks of :class:`~explaind_math.TrajectoryRecorder` for forwards that are not per-sample:
BatchNorm in training mode and active dropout not recorded (:func:`check_deterministic_modules`, every step),
BatchNorm that normalizes by the batch (:func:`check_batch_coupled_modules`, every step), and at the first step
:func:`probe_forward`: two forwards of the first recorded batch must agree (no randomness but the recorded dropout)
and its first sample alone must give its row of the batch's output (no coupling between samples)."""

from __future__ import annotations

import random
from typing import Any, Mapping, Sequence

import torch
from torch import nn

from .errors import StochasticTrainingError

__all__ = ["check_batch_coupled_modules", "check_deterministic_modules", "probe_forward"]


# ---------------------------------------------------------------------- forwards that are not per-sample
def check_deterministic_modules(model: nn.Module, where: str, allow_dropout: bool = False,
                                modules: Sequence[tuple[str, nn.Module]] | None = None) -> None:
    """Refuse BatchNorm in training mode and active dropout: both break "loss = Σ_i w_i ℓ_i" (``allow_dropout``:
    ``nn.Dropout`` modules are recorded for replay, :mod:`explaind_math.integrations.forward`; ``modules``:
    ``list(model.named_modules())``, when the caller has it)."""
    for name, module in (model.named_modules() if modules is None else modules):
        label = name or type(module).__name__
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.training:
            raise StochasticTrainingError(
                f"{where}: BatchNorm module {label!r} is in training mode, so each sample's output depends "
                "on the whole batch and no per-sample decomposition exists; put it in eval mode "
                "(module.eval()) or use LayerNorm/GroupNorm"
            )
        recorded = allow_dropout and type(module) is nn.Dropout
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0 and not recorded:
            raise StochasticTrainingError(
                f"{where}: dropout module {label!r} is active (p={module.p}), so the recorded gradients "
                "cannot be reproduced; call module.eval() or set p=0"
            )
        if isinstance(module, nn.MultiheadAttention) and module.training and module.dropout > 0:
            raise StochasticTrainingError(
                f"{where}: attention module {label!r} has active dropout={module.dropout}; set it to 0 or eval()"
            )


def check_batch_coupled_modules(model: nn.Module, where: str,
                                modules: Sequence[tuple[str, nn.Module]] | None = None) -> None:
    """BatchNorm without running statistics normalizes by the batch in eval mode too (``modules``:
    ``list(model.named_modules())``, when the caller has it)."""
    for name, module in (model.named_modules() if modules is None else modules):
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not module.track_running_stats:
            raise StochasticTrainingError(
                f"{where}: BatchNorm module {name or type(module).__name__!r} has track_running_stats=False, so it "
                "normalizes by the statistics of the batch even in eval mode and samples interact; use "
                "LayerNorm/GroupNorm, or BatchNorm with running statistics in eval mode"
            )


def _tensors_of(output: Any) -> list[torch.Tensor]:
    if isinstance(output, torch.Tensor):
        return [output] if output.is_floating_point() else []
    if isinstance(output, Mapping):
        return [t for v in output.values() for t in _tensors_of(v)]
    if isinstance(output, (tuple, list)):
        return [t for v in output for t in _tensors_of(v)]
    return []


def _rows(value: Any, size: int, sl: slice) -> Any:
    if isinstance(value, torch.Tensor):
        return value[sl] if value.dim() > 0 and value.shape[0] == size else value
    if isinstance(value, Mapping):
        return {k: _rows(v, size, sl) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return type(value)(_rows(v, size, sl) for v in value)
    return value


def _tolerance(t: torch.Tensor) -> float:
    rel = 1e-9 if t.dtype == torch.float64 else 1e-3
    return rel * (1.0 + float(t.detach().abs().max())) if t.numel() else 0.0


def _differs(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    if len(a) != len(b):
        return True
    return any(x.shape != y.shape or (x.numel() > 0 and float((x.double() - y.double()).abs().max()) > _tolerance(x))
               for x, y in zip(a, b))


def probe_forward(model: nn.Module, args: tuple, kwargs: dict, where: str, exempt: Sequence[nn.Module] = (), *,
                  batch_rows: int | None = None) -> None:
    """Two forwards of the captured batch must agree (no randomness besides the ``exempt`` modules, whose
    randomness is recorded), and the first sample's output must not depend on the rest of the batch (probed
    when the inputs' leading dimension is the ``batch_rows`` ids recorded for them: samples along dim 0).
    The RNG states, buffers and modes are restored afterwards: training is not perturbed."""
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    modes = [(m, m.training) for m in exempt]
    devices = sorted({b.device.index for b in model.parameters() if b.device.type == "cuda" and b.device.index is not None})
    python_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            for m in exempt:
                m.eval()
            first = _tensors_of(model(*args, **kwargs))
            second = _tensors_of(model(*args, **kwargs))
            if _differs(first, second):
                raise StochasticTrainingError(
                    f"{where}: two forwards of the same batch at the same θ differ, so the forward is random "
                    f"({_random_sources(model)}); the recorded gradients cannot be reproduced. Make the forward "
                    "deterministic (use nn.Dropout modules, which are recorded or refused by name; move noise and "
                    "augmentation into the data pipeline, where each sample's transformed input is its own sample)"
                )
            size = _batch_size(args, kwargs)
            if size is not None and size >= 2 and size == batch_rows:
                alone = _tensors_of(model(*_rows(args, size, slice(0, 1)), **_rows(kwargs, size, slice(0, 1))))
                # per-sample outputs only: a batch-level value (a ModelOutput's mean loss) depends on the batch
                per_sample = [k for k, t in enumerate(first) if t.dim() > 0 and t.shape[0] == size]
                together = [first[k][:1] for k in per_sample]
                alone = [alone[k] for k in per_sample if k < len(alone)]
                if _differs(together, alone):
                    raise StochasticTrainingError(
                        f"{where}: the output of the batch's first sample changes when the rest of the batch is "
                        "removed, so samples interact in the forward (batch statistics, x - x.mean(0), …) and no "
                        "per-sample decomposition exists; make each sample's output depend on that sample alone"
                    )
    finally:
        random.setstate(python_state)
        for m, mode in modes:
            m.train(mode)
        with torch.no_grad():
            for n, b in model.named_buffers():
                if n in buffers:
                    b.copy_(buffers[n])


def _batch_size(args: tuple, kwargs: dict) -> int | None:
    for v in list(args) + list(kwargs.values()):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return int(v.shape[0])
    return None


def _random_sources(model: nn.Module) -> str:
    """Modules whose source mentions a random operation (a hint; the probe is the proof)."""
    import inspect

    words = ("dropout", "randn", "rand(", "rand_like", "randint", "bernoulli", "normal_", "multinomial", "random.")
    found = []
    for name, module in model.named_modules():
        try:
            source = inspect.getsource(type(module).forward)
        except (OSError, TypeError):
            continue
        hits = [w.rstrip("(.") for w in words if w in source]
        if hits and not isinstance(module, nn.modules.dropout._DropoutNd):
            found.append(f"{name or type(module).__name__!r} calls {', '.join(hits)}")
    return "; ".join(found[:4]) if found else "no module's forward names a random operation: look for one it calls"
