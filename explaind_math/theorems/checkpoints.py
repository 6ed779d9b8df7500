"""Remark F.3 — decompose AdamW updates simulated from checkpoints when the full run was not recorded."""

from __future__ import annotations

import copy
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..errors import TrajectoryMismatchError
from ..features import TrainingData
from ..engine.options import DecompositionOptions, resolve_options, split_option_keywords
from ..influence import Influence
from ..recording import TrajectoryRecorder
from ..trajectory import weights_for
from .engine_call import decompose_with_rule

__all__ = ["AdamWCheckpoint", "checkpoint_from_optimizer", "decompose_from_checkpoints"]

_FIELDS = ("parameters", "exp_avg", "exp_avg_sq", "step")


class AdamWCheckpoint(dict):
    """A checkpoint: ``parameters``, ``exp_avg``, ``exp_avg_sq`` (dicts name → tensor), ``step``
    (int or dict name → int), optional ``max_exp_avg_sq``, and ``hyperparameters`` (the AdamW group
    values, one dict or a list per group with ``param_groups`` mapping name → group index)."""


def checkpoint_from_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer) -> AdamWCheckpoint:
    """Snapshot a live AdamW run into an :class:`AdamWCheckpoint`."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    ckpt = AdamWCheckpoint(parameters={}, exp_avg={}, exp_avg_sq={}, step={}, param_groups={})
    groups = []
    for gi, group in enumerate(optimizer.param_groups):
        groups.append({k: v for k, v in group.items() if k != "params"})
        for p in group["params"]:
            n = name_of[id(p)]
            st = optimizer.state.get(p, {})
            ckpt["parameters"][n] = p.detach().cpu().clone()
            ckpt["param_groups"][n] = gi
            ckpt["exp_avg"][n] = st["exp_avg"].detach().cpu().clone() if "exp_avg" in st else torch.zeros_like(ckpt["parameters"][n])
            ckpt["exp_avg_sq"][n] = st["exp_avg_sq"].detach().cpu().clone() if "exp_avg_sq" in st else torch.zeros_like(ckpt["parameters"][n])
            if "max_exp_avg_sq" in st:
                ckpt.setdefault("max_exp_avg_sq", {})[n] = st["max_exp_avg_sq"].detach().cpu().clone()
            elif group.get("amsgrad", False):  # no state yet (before its first update): the maximum is 0
                ckpt.setdefault("max_exp_avg_sq", {})[n] = torch.zeros_like(ckpt["parameters"][n])
            ckpt["step"][n] = int(st["step"]) if "step" in st else 0
    ckpt["hyperparameters"] = groups
    return ckpt


def _check_checkpoint(c: Mapping, index: int) -> None:
    for field in (*_FIELDS, "hyperparameters"):
        if field not in c:
            raise TrajectoryMismatchError(f"checkpoint {index} lacks the field {field!r} (needs {list(_FIELDS)} and 'hyperparameters')")
    hyper = c["hyperparameters"]
    groups = [hyper] if isinstance(hyper, Mapping) else list(hyper)
    if any(g.get("amsgrad", False) for g in groups) and "max_exp_avg_sq" not in c:
        raise TrajectoryMismatchError(f"checkpoint {index} uses amsgrad but lacks the field 'max_exp_avg_sq'")
    group_of = c.get("param_groups") or {}
    for n in c["parameters"]:
        for field in ("exp_avg", "exp_avg_sq"):
            if n not in c[field]:
                raise TrajectoryMismatchError(f"checkpoint {index}: {field!r} has no entry for parameter {n!r}")
        if groups[group_of.get(n, 0)].get("amsgrad", False) and n not in c["max_exp_avg_sq"]:
            raise TrajectoryMismatchError(f"checkpoint {index}: 'max_exp_avg_sq' has no entry for parameter {n!r} (amsgrad)")


def decompose_from_checkpoints(
    model: nn.Module,
    checkpoints: Sequence[Mapping],
    batches: Sequence[Sequence[int] | tuple[Sequence[int], Any]],
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    train_data: Any,
    test_inputs: torch.Tensor,
    *,
    persistence_steps: Sequence[int] | None = None,
    reduction: str = "mean",
    options: DecompositionOptions | None = None,
    **option_keywords: Any,
) -> list[Influence]:
    """Remark F.3: from each checkpoint (θ, m, v, k) simulate one real ``torch.optim.AdamW`` step on a
    batch drawn like the training batches, and decompose that update exactly into

        the batch's units  −η (1 − β1) P g_{t,i},  a first-moment unit  −η β1 P m_{t−1}
        (``carried_state``: from the stored exp_avg, not attributable to samples),  and the decay unit −ηλθ.

    Each result is exact for its simulated update (its residual is reported). With
    ``persistence_steps`` (the number of training steps until the next checkpoint, per checkpoint),
    the batch's kernel influence is multiplied by Σ_{j<H} β1^j = (1 − β1^H) / (1 − β1) to estimate its
    persistence through the first moment over the skipped steps; that result is an ESTIMATE and is
    labelled so (``estimated=True`` and a note), and its residual is then no certificate.
    """
    if len(batches) != len(checkpoints):
        raise TrajectoryMismatchError(f"{len(checkpoints)} checkpoints but {len(batches)} batches")
    if persistence_steps is not None and len(persistence_steps) != len(checkpoints):
        raise TrajectoryMismatchError("persistence_steps needs one entry per checkpoint")
    option_fields, target_arguments = split_option_keywords(option_keywords)
    opts = resolve_options(options, option_fields)
    results = []
    for index, (ckpt, batch) in enumerate(zip(checkpoints, batches)):
        _check_checkpoint(ckpt, index)
        result = _decompose_one(model, ckpt, batch, loss_fn, train_data, test_inputs, reduction, opts,
                                target_arguments)
        if persistence_steps is not None:
            hyper = ckpt["hyperparameters"]
            beta1 = float((hyper if isinstance(hyper, Mapping) else hyper[0])["betas"][0])
            H = int(persistence_steps[index])
            factor = (1 - beta1**H) / (1 - beta1)
            result.kernel = result.kernel * factor
            result.estimated = True
            result.notes.append(
                f"kernel influence scaled by Σ_(j<{H}) β1^j = {factor:.4f} for the batch's persistence "
                "through the first moment over the skipped steps (assumes P and Φ constant there); the residual "
                "now compares this estimate with the simulated step and is no certificate (decompose without "
                "persistence_steps for the exact, certified split)"
            )
        results.append(result)
    return results


def _decompose_one(model, ckpt, batch, loss_fn, train_data, test_inputs, reduction,
                   options: DecompositionOptions, target_arguments: dict) -> Influence:
    if isinstance(batch, tuple) and len(batch) == 2 and not isinstance(batch[0], int):
        ids, weights = batch
    else:
        ids, weights = batch, None
    ids = [int(i) for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids)]
    w = weights_for(ids, weights, reduction)
    work = copy.deepcopy(model)
    params = dict(work.named_parameters())
    names = list(ckpt["parameters"])
    unknown = [n for n in names if n not in params]
    if unknown:
        raise TrajectoryMismatchError(f"checkpoint parameters {unknown} are not parameters of the model")
    hyper = ckpt["hyperparameters"]
    groups_hyper = [dict(hyper)] if isinstance(hyper, Mapping) else [dict(h) for h in hyper]
    group_of = ckpt.get("param_groups") or {n: 0 for n in names}
    groups = [{**{k: v for k, v in h.items() if k != "params"}, "params": []} for h in groups_hyper]
    dtype = options.dtype or ckpt["parameters"][names[0]].dtype
    with torch.no_grad():
        for n in names:
            params[n].data = ckpt["parameters"][n].to(dtype=dtype, device=params[n].device).clone()
            groups[group_of[n]]["params"].append(params[n])
    for n, p in params.items():
        if n not in names:
            p.requires_grad_(False)
    optimizer = torch.optim.AdamW(groups)
    for n in names:
        p = params[n]
        st = {
            "step": torch.tensor(float(ckpt["step"][n] if isinstance(ckpt["step"], Mapping) else ckpt["step"])),
            "exp_avg": ckpt["exp_avg"][n].to(dtype=dtype, device=p.device).clone(),
            "exp_avg_sq": ckpt["exp_avg_sq"][n].to(dtype=dtype, device=p.device).clone(),
        }
        if n in ckpt.get("max_exp_avg_sq", {}):  # amsgrad is per group: only its parameters have one
            st["max_exp_avg_sq"] = ckpt["max_exp_avg_sq"][n].to(dtype=dtype, device=p.device).clone()
        optimizer.state[p] = st
    recorder = TrajectoryRecorder(work, optimizer)
    device = next(iter(params.values())).device
    X, Y = TrainingData(train_data, dtype=dtype, device=device).fetch(ids)
    optimizer.zero_grad()
    out = work(X)
    loss = sum(float(w[k]) * loss_fn(out[k], Y[k]) for k in range(len(ids)))
    loss.backward()
    recorder.record_batch(ids, weights=w)
    optimizer.step()
    recorder.close()
    trajectory = recorder.trajectory()
    # the trajectory holds its own copies of θ, the gradient and the state: free the live ones (3 copies of
    # θ: .grad, exp_avg, exp_avg_sq) before the decomposition, whose peak comes later
    optimizer.zero_grad(set_to_none=True)
    optimizer.state.clear()
    del out, loss, optimizer, recorder
    return decompose_with_rule(
        work, trajectory, loss_fn, train_data, test_inputs,
        statement="Remark F.3, checkpoint update", options=options, **target_arguments,
    )

