"""When the gradient-sum or the replay check fails (:mod:`~explaind_math.engine.checks`), the cheap candidate
causes are compared before raising, and the most likely one is named with its fix:

* ids that are positions within the batch, not dataset ids;
* a step declared by several ``record_batch`` calls whose gradient is the last call's alone: optimizer.step()
  did not run after the earlier calls (a GradScaler skips it on inf/NaN gradients), so their ids were merged;
* one global factor (clipping by norm, a loss scale, a sum recorded as a mean, a learning rate not the recorded one);
* precision: the mismatch against the rounding of the training dtype;
* randomness: the per-sample gradients recomputed once differ from the first evaluation;
* changed state: the optimizer's step count does not continue the previous step's; or, when the earlier
  steps passed, something that changed at this step.
"""

from __future__ import annotations

from typing import Callable, Mapping

import torch

__all__ = ["diagnose_gradient_mismatch", "diagnose_replay_mismatch"]

Params = Mapping[str, torch.Tensor]


def _global_factor(ours: Params, theirs: Params) -> tuple[float, float]:
    """The least-squares c with theirs ≈ c · ours over every tensor, and max |c·ours − theirs| / max |theirs|."""
    num = sum(float((theirs[n].to(ours[n].dtype) * ours[n]).sum()) for n in theirs)
    den = sum(float((ours[n] * ours[n]).sum()) for n in theirs)
    if den == 0.0:
        return 1.0, float("inf")
    c = num / den
    scale = max((float(theirs[n].abs().max()) for n in theirs if theirs[n].numel()), default=0.0)
    err = max((float((c * ours[n] - theirs[n].to(ours[n].dtype)).abs().max()) for n in theirs if theirs[n].numel()),
              default=0.0)
    return c, err / scale if scale > 0 else float("inf")


def _relative_mismatch(ours: Params, theirs: Params) -> float:
    scale = max((float(theirs[n].abs().max()) for n in theirs if theirs[n].numel()), default=0.0)
    err = max((float((ours[n] - theirs[n].to(ours[n].dtype)).abs().max()) for n in theirs if theirs[n].numel()),
              default=0.0)
    return err / scale if scale > 0 else float("inf")


def _looks_like_positions(trajectory) -> bool:
    steps = [trajectory.steps[t].sample_ids for t in range(min(trajectory.num_steps, 8))]
    return len(steps) > 1 and all(u == list(range(len(u))) for u in steps)


def _precision(relative: float, dtype: torch.dtype) -> str | None:
    eps = torch.finfo(dtype).eps
    if relative <= 1e3 * eps or dtype in (torch.float16, torch.bfloat16):
        return (f"precision: the mismatch ({relative:.2e} relative) is {relative / eps:.3g} rounding units of the "
                f"training dtype {dtype} (ε = {eps:.2e}). Fix: train in float32/float64, or pass a replay_rtol of "
                f"at least {2 * relative:.1e} to accept it")
    return None


def _factor(c: float, batch: int, what: str) -> str:
    if abs(c - batch) <= 1e-6 * batch:
        return (f"one global factor c = {c:.6g} = the batch size: the loss was summed but recorded as a mean. "
                "Fix: record_batch(ids, reduction='sum')")
    if batch > 1 and abs(c * batch - 1) <= 1e-6:
        return (f"one global factor c = {c:.6g} = 1/batch size: the loss was a mean but recorded as a sum. "
                "Fix: record_batch(ids) (reduction='mean')")
    if what == "update":
        return (f"one global factor: the update is {c:.6g} × the one rebuilt from the recorded hyper-parameters "
                "(a learning rate other than the recorded one, or the gradient rescaled: clipping by norm or a loss "
                "scale). Fix: record with TrajectoryRecorder(..., gradient_rescaling=True) for clipping or a loss "
                "scale; set the learning rate only through optimizer.param_groups")
    kind = "gradient clipping by norm (clip_grad_norm_)" if c < 1 else "a loss scale (GradScaler, or a loss multiplied)"
    return (f"one global factor: the gradient is {c:.6g} × Σ_i w_i ∇ℓ_i, as {kind} gives. Fix: "
            "TrajectoryRecorder(..., gradient_rescaling=True)" + ("" if c < 1 else
            ", or scaler.unscale_(optimizer) before optimizer.step() and grad_scaler=scaler"))


def _where_it_started(t: int) -> str:
    if t == 0:
        return ("it fails from the first step: the model, loss_fn or train_data given to the decomposition differ from "
                "those of training (another architecture, a module attribute such as a temperature, another "
                "reduction or weighting, other samples at these ids). Fix: decompose with the model, loss and data "
                "used in training")
    return (f"steps 0..{t - 1} passed, so something changed at step {t}: a module attribute or the model's code, "
            "the loss, or the data at these ids (augmentation in the pipeline makes the recorded sample another one). "
            "Fix: keep everything but θ fixed during training")


SKIPPED_STEP_FIX = ("Fix: TrajectoryRecorder(..., grad_scaler=scaler) drops the batch of a step the scaler skips; "
                    "without a GradScaler, call recorder.record_batch only for batches that optimizer.step() follows")


def _merged_skipped_step(step, last_call_sum: Callable[[], Params | None] | None, recorded: Params,
                         eps: float) -> str | None:
    """The recorded gradient is the last record_batch call's alone (up to rounding): the earlier calls' step
    never ran (a GradScaler skip), and their ids were merged into this step."""
    calls = step.batch_calls
    if not calls or len(calls) < 2 or last_call_sum is None:
        return None
    partial = last_call_sum()
    if partial is None or _relative_mismatch(partial, recorded) > 1e3 * eps:
        return None
    earlier = sum(len(c) for c in calls[:-1])
    return (f"the step's batch was declared by {len(calls)} record_batch calls, but the recorded gradient is the "
            f"last call's {len(calls[-1])} samples alone: optimizer.step() did not run after the earlier calls "
            f"({earlier} ids), as when a GradScaler skips a step whose gradients hold inf/NaN, so their ids were "
            f"merged into this step. " + SKIPPED_STEP_FIX)


def diagnose_gradient_mismatch(ctx, t: int, summed: Params, recorded: Params,
                               recompute: Callable[[], Params] | None,
                               last_call_sum: Callable[[], Params | None] | None = None) -> str:
    """The most likely reason why the recorded ``.grad`` is not Σ_i w_i ∇ℓ_i, with its fix. ``last_call_sum``
    gives Σ_i w_i ∇ℓ_i over the ids of the step's last record_batch call (several calls only)."""
    trajectory = ctx.trajectory
    batch = len(trajectory.steps[t].sample_ids)
    if _looks_like_positions(trajectory):
        return ("Most likely cause: the ids are positions within the batch (every step's ids are 0..B-1), not "
                "dataset ids. Fix: give record_batch the ids of the samples in train_data (e.g. a dataset that "
                "returns (id, x, y))")
    merged = _merged_skipped_step(trajectory.steps[t], last_call_sum, recorded, ctx.eps_train)
    if merged is not None:
        return "Most likely cause: " + merged
    c, off = _global_factor(summed, recorded)
    if off <= 1e3 * ctx.eps_train and abs(c - 1) > 1e3 * ctx.eps_train:
        return "Most likely cause: " + _factor(c, batch, "gradient")
    relative = _relative_mismatch(summed, recorded)
    precise = _precision(relative, trajectory.dtype)
    if precise is not None:
        return "Most likely cause: " + precise
    if recompute is not None:
        again = recompute()
        if _relative_mismatch(again, summed) > 0.0:
            return ("Most likely cause: randomness in the forward: two evaluations of the per-sample gradients at the "
                    f"same θ differ ({_relative_mismatch(again, summed):.2e} relative), as dropout without a module "
                    "or noise in forward give. Fix: make the forward deterministic")
    return "Most likely cause: " + _where_it_started(t)


def _step_count_break(trajectory, t: int) -> str | None:
    if t == 0:
        return None
    before, now = trajectory.steps[t - 1], trajectory.steps[t]
    for n in now.updated:
        a, b = before.state.get(n, {}).get("step"), now.state.get(n, {}).get("step")
        if a is not None and b is not None and n in before.updated and b != a + 1:
            return (f"changed optimizer state: the step count of {n!r} goes from {a} at step {t - 1} to {b} at step "
                    f"{t}, so the optimizer state was replaced in between (optimizer.load_state_dict, a new "
                    "optimizer, or a state edited by hand). Fix: record a new trajectory from that point")
    return None


def diagnose_replay_mismatch(ctx, t: int, total: Params, delta: Params) -> str:
    """The most likely reason why Σ_u update_t(u) is not θ_{t+1} − θ_t, with its fix."""
    trajectory = ctx.trajectory
    broken = _step_count_break(trajectory, t)
    if broken is not None:
        return "Most likely cause: " + broken
    c, off = _global_factor(total, delta)
    if off <= 1e3 * ctx.eps_train and abs(c - 1) > 1e3 * ctx.eps_train:
        return "Most likely cause: " + _factor(c, len(trajectory.steps[t].sample_ids), "update")
    precise = _precision(_relative_mismatch(total, delta), trajectory.dtype)
    if precise is not None:
        return "Most likely cause: " + precise
    calls = trajectory.steps[t].batch_calls
    if trajectory.steps[t].gradient is None and calls and len(calls) > 1:
        return (f"Likely cause: the step's batch was declared by {len(calls)} record_batch calls; if optimizer.step() "
                "did not run after the earlier ones (a GradScaler skips a step whose gradients hold inf/NaN), their "
                "ids were merged into this step. " + SKIPPED_STEP_FIX + ". Otherwise: " + _where_it_started(t)
                + ". (Recording with record_gradients=True lets the gradient-sum check tell these apart)")
    if trajectory.steps[t].gradient is None:
        return ("Most likely cause: " + _where_it_started(t) + ". (Recording with record_gradients=True lets the "
                "gradient-sum check tell a loss that is not the recorded one from a changed optimizer state)")
    return ("Most likely cause: the optimizer state or hyper-parameters used differ from the recorded ones (the "
            "gradients matched): an optimizer state edited between steps or not restored when recording resumed "
            "(a zeroed exp_avg or momentum buffer), or a flag changed outside param_groups. Fix: change the "
            "optimizer only through param_groups and optimizer.step(); on resume, optimizer.load_state_dict from "
            "the same checkpoint as the model")
