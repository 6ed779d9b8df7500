"""The gradients of one step: g_{t,i} = c_t w_{t,i} ∇ℓ_i(θ_t) per unit, and a penalty's ∇R(θ_t) (MATH.md §0, §4).

Per-sample gradients come from ``vmap(grad)`` in chunks of training samples; a partition with at most two
groups in the batch takes one weighted-loss gradient per group instead (Corollary F.2 needs only their
sums). With gradient clipping the factor c_t is recovered from the recorded ``.grad`` (exact for clipping
by norm: every g_{t,i} of the step is scaled by one number).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from ..errors import ExplaindError
from .checks import (BACKWARD_ROUNDING, check_gradient_sum, global_gradient_scale, recover_gradient_scale,
                     with_penalty)
from .context import DecompositionContext, summed_unit_context
from .diagnosis import diagnose_gradient_mismatch
from .plan import chunks, scaled_in_place

__all__ = ["StepGradients", "step_gradients", "check_recorded_gradient", "penalty_gradient", "step_batch",
           "gradient_rounding", "batch_gradient", "GradientMismatchWarning"]

Params = dict[str, torch.Tensor]


def penalty_gradient(penalty: Callable[[Params], torch.Tensor], theta_t: Params) -> Params:
    """∇R(θ_t) of a loss penalty R(θ) (an L1/L2 term inside the training loss), its own pseudo-unit."""

    def value(p: Params) -> torch.Tensor:
        out = penalty(p)
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise ExplaindError("penalty(params) must return a scalar tensor R(θ)")
        return out.reshape(())

    return {n: v.detach() for n, v in torch.func.grad(value)(theta_t).items()}


@dataclass
class StepGradients:
    """The gradients of step t, chunk by chunk: each chunk is (rows, {name: (B_c, *shape)}), the rows of the
    unit axis its gradients belong to. ``summed`` holds Σ_i g_{t,i} once every chunk has been read;
    ``penalty`` is c_t ∇R(θ_t) (or None), ``scale`` the clip factor c_t (1 without rescaling)."""

    rows: torch.Tensor  # the unit-axis row of every sample of the batch
    penalty: Params | None
    scale: float
    _chunk: Callable[[slice], tuple[torch.Tensor, Params]]
    _slices: list[slice]
    _cached: list | None = None
    summed: Params = field(default_factory=dict)

    def chunks(self) -> Iterator[tuple[torch.Tensor, Params]]:
        """Yield every chunk once (computed on demand, unless the step has a single chunk), summing as it goes."""
        for k, sl in enumerate(self._slices):
            rows, g = self._cached[k] if self._cached else self._chunk(sl)
            if self.scale != 1.0:
                g = {n: v * self.scale for n, v in g.items()}
            for n, v in g.items():
                self.summed[n] = v.sum(0) if n not in self.summed else self.summed[n] + v.sum(0)
            yield rows, g
        self._cached = None


def step_batch(ctx: DecompositionContext, step, step_index: int):
    """The batch of a step as the engine evaluates it: inputs (with their dropout keys), targets, the unit-axis
    row of every sample, and the weights w_{t,i}."""
    xb, yb = ctx.data.fetch(step.sample_ids)
    xb = ctx.fm.with_dropout_keys(xb, step_index, step.sample_ids)  # a dropout run: the masks each sample saw
    rows = torch.as_tensor([ctx.row_of_sample[u] for u in step.sample_ids], dtype=torch.long, device=ctx.device)
    return xb, yb, rows, step.weights.to(device=ctx.device, dtype=ctx.dtype)


def _chunk_function(ctx: DecompositionContext, theta_t: Params, step, step_index: int) -> tuple[Callable, torch.Tensor]:
    """The gradients of a slice of the batch: per sample (w_i ∇ℓ_i), or per partition group present."""
    xb, yb, rows, weights = step_batch(ctx, step, step_index)
    group_rows = torch.unique(rows) if ctx.grouped_units and ctx.vectorize else None
    if group_rows is not None and group_rows.numel() <= 2:
        # a partition with few groups in this batch (Corollary F.2): one weighted-loss gradient per group
        # costs less than every sample's (measured: one batch gradient ≈ half of vmap over the samples)
        def by_group(sl: slice) -> tuple[torch.Tensor, Params]:
            mask = (rows[sl].unsqueeze(0) == group_rows.unsqueeze(1)).to(ctx.dtype)  # (K_b, B)
            return group_rows, ctx.fm.group_gradients(theta_t, ctx.loss_fn, xb[sl], yb[sl], mask * weights[sl])

        return by_group, rows

    def per_sample(sl: slice) -> tuple[torch.Tensor, Params]:
        raw = ctx.fm.per_sample_gradients(theta_t, ctx.loss_fn, xb[sl], yb[sl], vectorize=ctx.vectorize)
        w = weights[sl]
        # w_i ∇ℓ_i written into the per-sample gradients (B · D, the step's largest temporary)
        return rows[sl], {n: scaled_in_place(raw[n], w.reshape(-1, *([1] * (raw[n].dim() - 1)))) for n in ctx.names}

    return per_sample, rows


def step_gradients(ctx: DecompositionContext, t: int, theta_t: Params) -> StepGradients:
    """The gradients of step t, with the clip factor c_t recovered when the run rescaled its gradients."""
    step = ctx.trajectory.steps[t]
    chunk, rows = _chunk_function(ctx, theta_t, step, t)
    slices = chunks(len(step.sample_ids), ctx.plan.train_chunk)
    cached = [chunk(slices[0])] if len(slices) == 1 else None
    penalty = penalty_gradient(ctx.penalty, theta_t) if ctx.penalty else None
    scale = 1.0
    if ctx.rescaling:
        if step.gradient is None:
            raise ExplaindError(f"step {t}: gradient rescaling needs the recorded gradient of the step")
        parts = cached if cached else (chunk(sl) for sl in slices)
        total: Params = {}
        for _, g in parts:
            for n in ctx.names:
                total[n] = g[n].sum(0) if n not in total else total[n] + g[n].sum(0)
        scale = recover_gradient_scale(t, total, penalty, step.gradient, ctx.rtol, ctx.eps_train)
        penalty = None if penalty is None else {n: v * scale for n, v in penalty.items()}
    return StepGradients(rows=rows, penalty=penalty, scale=scale, _chunk=chunk, _slices=slices, _cached=cached)


def gradient_rounding(ctx: DecompositionContext, t: int, summed: Params, penalty: Params | None) -> Params | None:
    """δ_t = recorded ``.grad`` − (Σ_i g_{t,i} + c_t ∇R): rounding, of the gradient the optimizer used (a float32
    run's backward pass is a float32 reduction, which Adam's 1/√v amplifies where a true gradient is near zero) or
    of this decomposition's Σ_i g_{t,i} when it computes in a coarser dtype than training did. Its own pseudo-unit,
    fed through the rule like the penalty, so the update rebuilt from the units is the recorded one.

    Only rounding is taken: when max|δ_t| exceeds 64 ε max|g_t| (ε of the coarser dtype; the gradient-sum check's
    own floor, without its relative tolerance) the step is warned about and δ_t left out (None), so a real mismatch
    within that tolerance (a weight off by 3e-5) stays visible in the residual instead of being absorbed.
    Measured: float32 runs' δ_t are 0.01-0.05 of that scale, a 3e-5 weight error 3.9×. None also for a step
    without a recorded gradient."""
    recorded = ctx.trajectory.steps[t].gradient
    if recorded is None:
        return None
    out = {}
    for n in ctx.names:
        if n not in recorded:
            out[n] = ctx.zeros(ctx.shapes[n])
        else:
            out[n] = recorded[n].to(device=ctx.device, dtype=ctx.dtype) - with_penalty(summed, penalty, n)
    # the rounding of the coarser of the two computations: training's backward, or this one's Σ_i g_{t,i}
    eps = max(ctx.eps_train, torch.finfo(ctx.dtype).eps)
    bound = BACKWARD_ROUNDING * eps * global_gradient_scale(None, None, recorded)
    worst = max((float(v.abs().max()) for v in out.values() if v.numel()), default=0.0)
    if worst > bound:
        warnings.warn(
            f"step {t}: the recorded gradient differs from Σ_i w_i ∇ℓ_i by up to {worst:.3e}, more than the rounding "
            f"of its backward pass ({bound:.3e} = {BACKWARD_ROUNDING} ε max|g|) though within the gradient-sum check's "
            "tolerance: it is not kept as gradient rounding and shows in the residual (a weight or loss slightly "
            "off?)", GradientMismatchWarning, stacklevel=2)
        return None
    return out


class GradientMismatchWarning(UserWarning):
    """A step's recorded gradient differs from the per-sample sum by more than rounding but within tolerance."""


def batch_gradient(ctx: DecompositionContext, t: int, theta_t: Params) -> StepGradients:
    """The step's gradients as one weighted-loss gradient of the whole batch (``summed`` and ``penalty`` read)."""
    gradients = step_gradients(summed_unit_context(ctx), t, theta_t)
    for _ in gradients.chunks():
        pass
    return gradients


def check_recorded_gradient(ctx: DecompositionContext, t: int, gradients: StepGradients) -> None:
    """The recorded ``.grad`` must equal Σ_i g_{t,i} (+ ∇R) (after every chunk was read; skipped when the
    clip factor was recovered, which already compared them)."""
    step = ctx.trajectory.steps[t]
    if step.gradient is not None and not ctx.rescaling:
        check_gradient_sum(t, gradients.summed, gradients.penalty, step.gradient, ctx.rtol, ctx.eps_train,
                           diagnose=lambda: _diagnose(ctx, t, gradients))


def _diagnose(ctx: DecompositionContext, t: int, gradients: StepGradients) -> str:
    """The most likely cause of a failed gradient-sum check. The step's gradients are recomputed at most once:
    the pass that tests for randomness also sums the last record_batch call's samples (several calls only)."""
    step = ctx.trajectory.steps[t]
    per_sample = not (ctx.grouped_units and ctx.vectorize)  # a partition's rows are groups, not samples
    last = set(step.batch_calls[-1]) if step.batch_calls and per_sample else None
    recomputed: dict[str, Params] = {}

    def with_penalties(summed: Params, penalty: Params | None) -> Params:
        return {n: with_penalty(summed, penalty, n) for n in summed}

    def recompute_once() -> dict[str, Params]:
        if not recomputed:
            again = step_gradients(ctx, t, ctx.theta(t))
            keep = None if last is None else torch.tensor([u in last for u in step.sample_ids], device=ctx.device)
            partial: Params = {}
            for sl, (_, g) in zip(again._slices, again.chunks()):
                if keep is not None:
                    for n, v in g.items():
                        part = v[keep[sl]].sum(0)
                        partial[n] = part if n not in partial else partial[n] + part
            recomputed["all"] = with_penalties(again.summed, again.penalty)
            recomputed["last call"] = with_penalties(partial, again.penalty)
        return recomputed

    return diagnose_gradient_mismatch(
        ctx, t, with_penalties(gradients.summed, gradients.penalty), step.gradient,
        lambda: recompute_once()["all"], None if last is None else lambda: recompute_once()["last call"])
