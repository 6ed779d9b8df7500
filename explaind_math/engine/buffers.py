"""The rule's buffers, advanced step by step by the §4 recurrence (MATH.md §4, §7, §8).

    buffer_t(u) = A_t ⊙ buffer_{t−1}(u) + C_t ⊙ grad_t(u),   update_t(u) = −(D_t ⊙ buffer_t(u) + E_t ⊙ grad_t(u))

with one buffer per unit (sample, or partition group S_k) and one per pseudo-unit (weight decay, a loss
penalty, optimizer state carried in from before the recording). The arithmetic is the template's own
(:mod:`explaind_math.optimizers.template`, called through the module so that the proof checks and the
engine run the same functions). The state is a set of tensors that the recursion maps linearly, so the
buffers can start from any state (:meth:`RuleBuffers.load_state`): that is how blocks of steps run on
different ranks (:mod:`~explaind_math.engine.distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..optimizers import template as recurrence
from .checks import BACKWARD_ROUNDING, abs_linear, global_gradient_scale, replay_check
from .context import DecompositionContext
from .diagnosis import diagnose_replay_mismatch
from .gradients import StepGradients, check_recorded_gradient, gradient_rounding

__all__ = ["RuleBuffers", "UnitUpdates", "rule_coefficients"]

Params = dict[str, torch.Tensor]


@dataclass
class UnitUpdates:
    """What the rule gives for one step: every unit's update (units, *shape) per moving parameter, their sum
    over units, every pseudo-unit's update, the unit rows that can be non-zero, the replay error of the step
    (Σ_u update_t(u) against Δθ_t), the clip factor c_t."""

    per_unit: Params | None
    unit_totals: Params | None
    pseudo: dict[str, Params]
    active: torch.Tensor | None
    replay_error: float
    gradient_scale: float


def rule_coefficients(ctx: DecompositionContext, step, n: str, had_buffer: bool) -> recurrence.StepCoefficients:
    """The table (A, C, D, E, s, κ, ρ) of tensor n at a step, given whether its optimizer buffer existed before
    the step (the rule's ``first_update``); the recorded state is moved to the computation's device and dtype."""
    hyper = step.hyperparameters[ctx.trajectory.group_of[n]]
    state = {k: (v.to(device=ctx.device, dtype=ctx.dtype) if isinstance(v, torch.Tensor) else v)
             for k, v in step.state.get(n, {}).items()}
    return ctx.trajectory.rule.coefficients(hyper, state, first_update=not had_buffer)


class RuleBuffers:
    """The buffers of the §4 template for every unit and pseudo-unit, and the rounding bound's buffer."""

    def __init__(self, ctx: DecompositionContext, *, zero_state: bool = False):
        self.ctx = ctx
        traj, names, shapes = ctx.trajectory, ctx.names, ctx.shapes
        self.rule = traj.rule
        self.sample_buffer = {n: ctx.zeros((len(ctx.unit_labels), *shapes[n])) for n in names}
        self.decay_buffer = {n: ctx.zeros(shapes[n]) for n in names}
        self.penalty_buffer = {n: ctx.zeros(shapes[n]) for n in names}
        self.gradient_rounding_buffer = {n: ctx.zeros(shapes[n]) for n in names}
        key = self.rule.buffer_state_key
        carried = {n: st[key] for n, st in traj.initial_state.items() if key is not None and key in st}
        self.carried_buffer = {
            n: (ctx.zeros(shapes[n]) if zero_state else v.to(device=ctx.device, dtype=ctx.dtype))
            for n, v in carried.items()
        }
        self.pseudo_names = ctx.pseudo_names
        # the optimizer's buffer exists (rule.creates_buffer); carried state means it existed at the start
        self.has_buffer = {n: (n in carried) for n in names}
        # first-order bound on how far the gradients' rounding moves each update (the replay check's floor):
        # a buffer of |perturbations| advanced by the same table, fed 64 ε · max|g_t| per coordinate per step
        self.rounding_bound_buffer = {n: ctx.zeros(shapes[n]) for n in names}
        # units whose buffer has been fed (C ≠ 0) at some step: only their rows can hold non-zero updates
        self.touched = torch.zeros(len(ctx.unit_labels), dtype=torch.bool, device=ctx.device)

    # ---------------------------------------------------------------- state, for blocks of steps
    def state(self) -> list[torch.Tensor]:
        """The linear state, in a fixed order (the same on every rank)."""
        out = []
        for n in self.ctx.names:
            out += [self.sample_buffer[n], self.decay_buffer[n], self.penalty_buffer[n], self.rounding_bound_buffer[n],
                    self.gradient_rounding_buffer[n]]
            if n in self.carried_buffer:
                out.append(self.carried_buffer[n])
        return out

    def load_state(self, tensors: Sequence[torch.Tensor]) -> None:
        it = iter(tensors)
        for n in self.ctx.names:
            (self.sample_buffer[n], self.decay_buffer[n], self.penalty_buffer[n], self.rounding_bound_buffer[n],
             self.gradient_rounding_buffer[n]) = (next(it), next(it), next(it), next(it), next(it))
            if n in self.carried_buffer:
                self.carried_buffer[n] = next(it)
        for n in self.ctx.names:  # rows fed in earlier blocks
            b = self.sample_buffer[n]
            self.touched |= b.reshape(b.shape[0], -1).ne(0).any(1)

    def add_state(self, other: Sequence[torch.Tensor]) -> None:
        self.load_state([a + b for a, b in zip(self.state(), other)])

    def coefficients(self, step, n: str) -> recurrence.StepCoefficients:
        """The table (A, C, D, E, s, κ, ρ) of tensor n at this step (and whether its buffer now exists)."""
        c = rule_coefficients(self.ctx, step, n, self.has_buffer[n])
        hyper = step.hyperparameters[self.ctx.trajectory.group_of[n]]
        self.has_buffer[n] = self.has_buffer[n] or self.rule.creates_buffer(hyper)
        return c

    def creates_buffers(self, step) -> set[str]:
        """The parameters whose optimizer buffer this step creates (a cheap pass: hyper-parameters only)."""
        return {n for n in step.updated
                if self.rule.creates_buffer(step.hyperparameters[self.ctx.trajectory.group_of[n]])}

    def propagate(self, t: int) -> None:
        """Advance the state through step t with no new input: buffer ← A_t buffer (|A_t| for the rounding
        bound). The scan of :mod:`~explaind_math.engine.distributed` carries a block's incoming state this way."""
        step = self.ctx.trajectory.steps[t]
        for n in self.ctx.names:
            if n not in set(step.updated):
                continue
            c = self.coefficients(step, n)
            self.sample_buffer[n] = recurrence.scale_buffer(self.sample_buffer[n], c.A)
            self.decay_buffer[n] = recurrence.apply_linear(c.A, self.decay_buffer[n])
            self.penalty_buffer[n] = recurrence.apply_linear(c.A, self.penalty_buffer[n])
            self.gradient_rounding_buffer[n] = recurrence.apply_linear(c.A, self.gradient_rounding_buffer[n])
            self.rounding_bound_buffer[n] = abs_linear(c.A, self.rounding_bound_buffer[n])
            if n in self.carried_buffer:
                self.carried_buffer[n] = recurrence.apply_linear(c.A, self.carried_buffer[n])

    # ---------------------------------------------------------------- one step
    def advance(self, t: int, gradients: StepGradients, theta_t: Params, theta_next: Params, *,
                checks: bool = True) -> UnitUpdates:
        """Step t: the buffers advanced by the step's gradients, and every unit's update (:class:`UnitUpdates`),
        certified by the gradient-sum and replay checks.

        With ``checks=False`` (a block's own part on a rank, which does not start from the true state) the
        checks are skipped and no update is formed: only the state moves.
        """
        step = self.ctx.trajectory.steps[t]
        updated = set(step.updated)
        coefficients = {n: self.coefficients(step, n) for n in self.ctx.names if n in updated}
        unit_updates = self._feed_units(coefficients, gradients, checks)
        if checks:
            check_recorded_gradient(self.ctx, t, gradients)
        rounding = BACKWARD_ROUNDING * self.ctx.eps_train * global_gradient_scale(gradients.summed, gradients.penalty, step.gradient)
        update_rounding = self._advance_rounding(coefficients, rounding)
        pseudo = self._pseudo_updates(t, coefficients, gradients, theta_t)
        if not checks:
            return UnitUpdates(None, None, pseudo, None, 0.0, gradients.scale)
        for n, c in coefficients.items():  # update_t(u) = −(D ⊙ buffer_t(u) + E ⊙ g_{t,u})
            unit_updates[n] = recurrence.subtract_buffered(unit_updates.get(n), c.D, self.sample_buffer[n])
        unit_totals = {n: unit_updates[n].sum(0) if n in unit_updates else self.ctx.zeros(self.ctx.shapes[n])
                       for n in self.ctx.names}
        delta = {n: theta_next[n] - theta_t[n] for n in self.ctx.names}
        total = {n: unit_totals[n] + sum(pseudo[p][n] for p in self.pseudo_names) for n in self.ctx.names}
        replay_error = replay_check(t, total, delta, theta_t, theta_next, self.ctx.rtol, self.ctx.eps_train,
                                    updated, update_rounding,
                                    diagnose=lambda: diagnose_replay_mismatch(self.ctx, t, total, delta))
        # rows that can hold a non-zero update: every unit whose buffer was ever fed, and this step's batch
        active = torch.nonzero(self.touched.clone().index_fill_(0, gradients.rows, True)).flatten()
        return UnitUpdates(unit_updates, unit_totals, pseudo, active, replay_error, gradients.scale)

    def _feed_units(self, coefficients, gradients: StepGradients, checks: bool) -> Params:
        """buffer ← A ⊙ buffer for every unit, then C ⊙ s g_{t,u} into each unit's row, chunk by chunk; the
        direct part −E ⊙ s g_{t,u} of the updates where E ≠ 0. Returns those partial updates."""
        direct = {n: checks and not recurrence.is_zero(c.E) for n, c in coefficients.items()}
        unit_updates = {n: torch.zeros_like(self.sample_buffer[n]) for n in coefficients if direct[n]}
        for n, c in coefficients.items():
            self.sample_buffer[n] = recurrence.scale_buffer(self.sample_buffer[n], c.A)
        if any(not recurrence.is_zero(c.C) for c in coefficients.values()):
            self.touched[gradients.rows] = True
        for rows, g in gradients.chunks():
            for n, c in coefficients.items():
                grads = g[n] if c.gradient_sign == 1 else -g[n]
                self.sample_buffer[n] = recurrence.feed_buffer(self.sample_buffer[n], c.C, grads, rows)
                if direct[n]:
                    unit_updates[n] = recurrence.subtract_direct(unit_updates[n], c.E, grads, rows)
            del g
        if not gradients.summed:  # an empty batch cannot be recorded; kept for a clear state
            gradients.summed.update({n: self.ctx.zeros(self.ctx.shapes[n]) for n in self.ctx.names})
        return unit_updates

    def _advance_rounding(self, coefficients, rounding: float) -> dict[str, float]:
        """The rounding bound's buffer advanced with |A|, |C|; returns max(|D| ⊙ it + |E| ρ) per tensor."""
        update_rounding = {n: 0.0 for n in self.ctx.names}
        for n, c in coefficients.items():
            fed = torch.full(self.ctx.shapes[n], rounding, dtype=self.ctx.dtype, device=self.ctx.device)
            self.rounding_bound_buffer[n] = abs_linear(c.A, self.rounding_bound_buffer[n]) + abs_linear(c.C, fed)
            update_rounding[n] = float((abs_linear(c.D, self.rounding_bound_buffer[n]) + abs_linear(c.E, fed)).max())
        return update_rounding

    def _pseudo_updates(self, step_index: int, coefficients, gradients: StepGradients,
                        theta_t: Params) -> dict[str, Params]:
        """The pseudo-units' updates: weight decay (κ θ_t through the buffer, −ρ θ_t directly), the carried
        optimizer state (A's applied, never fed), the penalty's s c_t ∇R(θ_t), the recorded gradient's rounding
        s δ_t (:func:`~explaind_math.engine.gradients.gradient_rounding`). A skipped parameter: zeros."""
        pseudo: dict[str, Params] = {p: {} for p in self.pseudo_names}
        delta = (gradient_rounding(self.ctx, step_index, gradients.summed, gradients.penalty)
                 if "gradient_rounding" in pseudo else None)
        for n in self.ctx.names:
            c = coefficients.get(n)
            if c is None:  # PyTorch skipped it: every update is 0
                for p in self.pseudo_names:
                    pseudo[p][n] = self.ctx.zeros(self.ctx.shapes[n])
                continue
            g_decay = recurrence.decay_gradient(theta_t[n], c)
            self.decay_buffer[n] = recurrence.buffer_step(self.decay_buffer[n], g_decay, c)
            pseudo["regularization"][n] = (recurrence.unit_update(self.decay_buffer[n], g_decay, c)
                                           + recurrence.decay_direct_update(theta_t[n], c))
            if "carried_state" in pseudo:
                if n in self.carried_buffer:
                    self.carried_buffer[n] = recurrence.apply_linear(c.A, self.carried_buffer[n])
                    pseudo["carried_state"][n] = recurrence.subtract_buffered(None, c.D, self.carried_buffer[n])
                else:
                    pseudo["carried_state"][n] = self.ctx.zeros(self.ctx.shapes[n])
            if "penalty" in pseudo:
                g_penalty = c.gradient_sign * gradients.penalty[n]
                self.penalty_buffer[n] = recurrence.buffer_step(self.penalty_buffer[n], g_penalty, c)
                pseudo["penalty"][n] = recurrence.unit_update(self.penalty_buffer[n], g_penalty, c)
            if "gradient_rounding" in pseudo:  # a step without δ_t still carries the earlier steps' in the buffer
                g_rounding = c.gradient_sign * (delta[n] if delta is not None else self.ctx.zeros(self.ctx.shapes[n]))
                self.gradient_rounding_buffer[n] = recurrence.buffer_step(self.gradient_rounding_buffer[n], g_rounding, c)
                pseudo["gradient_rounding"][n] = recurrence.unit_update(self.gradient_rounding_buffer[n], g_rounding, c)
        return pseudo
