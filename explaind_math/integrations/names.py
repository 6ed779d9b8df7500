"""Parameter names across wrappers: ``torch.compile`` (``_orig_mod.``), ``DistributedDataParallel`` and
``DataParallel`` (``module.``), and the user's own wrapper modules (any common prefix).

Recording names parameters as the unwrapped model does (:func:`unwrap_model`); the decomposition maps the
trajectory's names onto the model it is given (:func:`align_model`), whichever side carries a prefix.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import TrajectoryMismatchError

__all__ = ["unwrap_model", "align_model"]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``torch.compile``/DDP/DataParallel wrappers (the same parameters, their own names)."""
    while True:
        inner = getattr(model, "_orig_mod", None)
        if isinstance(inner, nn.Module) and type(model).__name__ == "OptimizedModule":
            model = inner
            continue
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
            continue
        return model


def _prefix_map(trained: list[str], available: list[str]) -> tuple[dict[str, str], str, str] | None:
    """A map trained name → available name that adds or strips one common prefix (with the prefixes)."""
    have = set(available)
    first = trained[0]
    for name in available:
        if name.endswith(first) and (len(name) == len(first) or name[-len(first) - 1] == "."):
            prefix = name[: len(name) - len(first)]
            if all(prefix + n in have for n in trained):
                return {n: prefix + n for n in trained}, "", prefix
        if first.endswith(name) and first[-len(name) - 1 : -len(name)] == ".":
            prefix = first[: len(first) - len(name)]
            if all(n.startswith(prefix) and n[len(prefix):] in have for n in trained):
                return {n: n[len(prefix):] for n in trained}, prefix, ""
    return None


def _describe_mismatch(trained: list[str], available: list[str]) -> str:
    missing = [n for n in trained if n not in set(available)]
    hint = ""
    for n in missing[:1]:
        tail = n.rsplit(".", 2)[-2:]
        near = [a for a in available if a.endswith(".".join(tail))]
        if near:
            t_pre, a_pre = n[: len(n) - len(".".join(tail))], near[0][: len(near[0]) - len(".".join(tail))]
            hint = (f"; the names differ in their prefix: the trajectory's {n!r} starts with {t_pre!r}, "
                    f"the model's {near[0]!r} with {a_pre!r}")
    return (f"the trajectory has parameters {missing[:6]}{' …' if len(missing) > 6 else ''} that the model does "
            f"not have (model parameters: {available[:6]}{' …' if len(available) > 6 else ''}){hint}")


def align_model(model: nn.Module, trajectory) -> tuple[nn.Module, dict[str, str]]:
    """The module to evaluate and a map trajectory name → that module's parameter name.

    Known wrappers are unwrapped; a wrapper of the user's (or a trajectory recorded through one) is
    recognised by a prefix common to every name. The shapes and recorded buffers are checked under the
    map; otherwise :class:`TrajectoryMismatchError` says which prefix differs."""
    module = unwrap_model(model)
    trained = list(trajectory.parameter_names)
    params = dict(module.named_parameters())
    if all(n in params for n in trained):
        trajectory.check_model(module)
        return module, {n: n for n in trained}
    found = _prefix_map(trained, list(params))
    if found is None:
        raise TrajectoryMismatchError(_describe_mismatch(trained, list(params)))
    name_map, stripped, added = found
    trajectory.validate()
    shapes = trajectory.shapes()
    for n in trained:
        if tuple(params[name_map[n]].shape) != tuple(shapes[n]):
            raise TrajectoryMismatchError(f"parameter {n!r}: trajectory shape {shapes[n]}, model shape "
                                          f"{tuple(params[name_map[n]].shape)}")
    buffers = dict(module.named_buffers())  # with the frozen parameters, which the recorder stores alike
    buffers.update({n: p for n, p in params.items() if n not in set(name_map.values())})
    for n, value in trajectory.buffers.items():
        b = buffers.get(added + n[len(stripped):] if n.startswith(stripped) else n)
        if b is None or tuple(b.shape) != tuple(value.shape) or not torch.equal(b.detach().cpu().to(value.dtype), value):
            raise TrajectoryMismatchError(f"buffer {n!r} of the model differs from the one recorded during training")
    return module, name_map
