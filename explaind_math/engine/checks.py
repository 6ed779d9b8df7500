"""The certificates of one step, checked as it is decomposed (MATH.md §1, §4).

* the gradient-sum check: the recorded ``.grad`` equals Σ_i w_{t,i} ∇ℓ_i(θ_t) (+ ∇R) over the recorded ids;
* the clip factor: recorded ``.grad`` = c_t (Σ_i w_{t,i} ∇ℓ_i + ∇R), one number c_t per step;
* the replay check: Σ_u update_t(u) = θ_{t+1} − θ_t, within a tolerance whose floor is the first-order
  effect of the gradients' rounding carried through the rule's own table (:func:`abs_linear`).

The step residual r_t(x) = f(x; θ_{t+1}) − f(x; θ_t) − Φ_t(x) Δθ_t, the certificate of the quadrature, is
formed by the block runner (:mod:`~explaind_math.engine.blocks`).
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

from ..errors import ReplayMismatchError

__all__ = ["BACKWARD_ROUNDING", "replay_check", "check_gradient_sum", "recover_gradient_scale",
           "global_gradient_scale", "abs_linear", "with_penalty"]

Params = dict[str, torch.Tensor]

#: the rounding scale of a backward pass, BACKWARD_ROUNDING · ε · max|g| (the floor of the gradient checks, the
#: per-step input of the replay check's rounding bound, and the bound on what counts as a gradient's rounding)
BACKWARD_ROUNDING = 64


def replay_check(t, total: Params, delta: Params, theta_t: Params, theta_next: Params, rtol: float,
                  eps_train: float, updated: set[str], update_rounding: Mapping[str, float],
                  diagnose: Callable[[], str] | None = None) -> float:
    """Raise :class:`ReplayMismatchError` unless |Σ_u update_t(u) − Δθ_t| ≤ rtol·max|Δθ_t| + 16 ε max|θ| + r,
    with r the first-order effect of the gradients' rounding on this update (``update_rounding``: it
    matters where a preconditioner amplifies a gradient that is zero up to rounding, e.g. Adam on an
    attention key bias, which softmax ignores). ``diagnose()`` names the most likely cause of a mismatch
    (:mod:`~explaind_math.engine.diagnosis`)."""
    worst = 0.0
    for n in total:
        err = float((total[n] - delta[n]).abs().max()) if total[n].numel() else 0.0
        scale = float(delta[n].abs().max()) if delta[n].numel() else 0.0
        size = max(float(theta_t[n].abs().max()), float(theta_next[n].abs().max())) if delta[n].numel() else 0.0
        tol = rtol * scale + 16 * eps_train * size + update_rounding.get(n, 0.0)
        if err > tol:
            what = "received a gradient" if n in updated else "received no gradient (so PyTorch skipped it)"
            raise ReplayMismatchError(
                f"step {t}, parameter {n!r} (which {what}): the update rebuilt from per-sample gradients "
                f"differs from θ_{{t+1}} − θ_t by {err:.3e} (tolerance {tol:.3e}, max |Δθ| {scale:.3e}). "
                "Is the training loss a weighted sum of the per-sample losses given as loss_fn, over exactly "
                "the ids recorded for this step? Was the gradient clipped or the parameter changed by hand?"
                + _diagnosis(diagnose)
            )
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


def global_gradient_scale(summed: Params | None, penalty_grad: Params | None,
                           recorded: Mapping[str, torch.Tensor] | None) -> float:
    """max |g| over every parameter tensor of the step: the recorded ``.grad`` when there is one, else
    Σ_i w_i ∇ℓ_i (+ ∇R). The scale of the backward pass's rounding."""
    if recorded is not None:
        tensors = list(recorded.values())
    else:
        tensors = [with_penalty(summed, penalty_grad, n) for n in summed]
    return max((float(g.abs().max()) for g in tensors if g.numel()), default=0.0)


def abs_linear(coefficient, x: torch.Tensor) -> torch.Tensor:
    """|A| ⊙ x for x ≥ 0 and a number or tensor A; |A(x)| for a callable linear map (a bound's estimate)."""
    if callable(coefficient):
        return coefficient(x).abs()
    if isinstance(coefficient, torch.Tensor):
        return coefficient.abs() * x
    return abs(coefficient) * x


def with_penalty(summed: Params, penalty_grad: Params | None, n: str) -> torch.Tensor:
    return summed[n] if penalty_grad is None else summed[n] + penalty_grad[n]


def recover_gradient_scale(t: int, summed: Params, penalty_grad: Params | None,
                            recorded: Mapping[str, torch.Tensor], rtol: float, eps_train: float) -> float:
    """c_t with recorded .grad = c_t (Σ_i w_i ∇ℓ_i + ∇R), by least squares over every recorded tensor,
    then verified coordinate-wise: clipping by norm passes, clipping by value or a non-additive loss fails."""
    num, den = 0.0, 0.0
    pairs = []
    for n, g in recorded.items():
        ours = with_penalty(summed, penalty_grad, n)
        g = g.to(device=ours.device, dtype=ours.dtype)
        num += float((g * ours).sum())
        den += float((ours * ours).sum())
        pairs.append((n, ours, g))
    if den == 0.0:
        return 1.0
    c = num / den
    overall = global_gradient_scale(None, None, recorded)
    for n, ours, g in pairs:
        scale = float(g.abs().max()) if g.numel() else 0.0
        err = float((c * ours - g).abs().max()) if g.numel() else 0.0
        if err > rtol * max(scale, 1e-30) + BACKWARD_ROUNDING * eps_train * overall + 1e-300:
            raise ReplayMismatchError(
                f"step {t}, parameter {n!r}: the gradient seen by optimizer.step() is not one scalar multiple "
                f"c_t = {c:.6g} of Σ_i w_i ∇ℓ_i (off by {err:.3e}, max |grad| {scale:.3e}). Clipping by norm over "
                "all trained parameters is exact; clipping by value (clip_grad_value_) or per-tensor clipping is "
                "not linear in the per-sample gradients and cannot be decomposed exactly"
            )
    return c


def _diagnosis(diagnose: Callable[[], str] | None) -> str:
    return "" if diagnose is None else " " + diagnose()


def check_gradient_sum(t: int, summed: Params, penalty_grad: Params | None,
                        recorded: Mapping[str, torch.Tensor], rtol: float, eps_train: float,
                        diagnose: Callable[[], str] | None = None) -> None:
    """The recorded ``.grad`` must equal Σ_i w_{t,i} ∇ℓ_i(θ_t) (+ ∇R): pinpoints a non-additive loss.
    Rounding is measured against the largest gradient of any tensor: a tensor whose true gradient is zero
    (an attention key bias) holds only the rounding of the others' backward pass."""
    overall = global_gradient_scale(None, None, recorded)
    for n, g in recorded.items():
        ours = with_penalty(summed, penalty_grad, n)
        g = g.to(device=ours.device, dtype=ours.dtype)
        scale = float(g.abs().max()) if g.numel() else 0.0
        err = float((ours - g).abs().max()) if g.numel() else 0.0
        if err > rtol * max(scale, 1e-30) + BACKWARD_ROUNDING * eps_train * overall + 1e-300:
            raise ReplayMismatchError(
                f"step {t}, parameter {n!r}: the gradient seen by optimizer.step() differs from "
                f"Σ_i w_i ∇ℓ_i over the recorded ids by {err:.3e} (max |grad| {scale:.3e}). The training loss "
                "must be a weighted sum of per-sample losses loss_fn(model(x_i), y_i) over exactly the ids given "
                "to record_batch (weights as recorded), plus the penalty if one is given; for clip_grad_norm_ "
                "record with TrajectoryRecorder(..., gradient_rescaling=True)."
                + _diagnosis(diagnose)
            )
