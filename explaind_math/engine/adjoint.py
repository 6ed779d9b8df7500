"""The adjoint accumulation: per-unit influences without per-unit buffers (MATH.md §12).

With the update step summed, the order of the sums over t and s in §4 swaps. Backward in time, with the
adjoint λ_s (a covector per test input x and output o):

    λ_{N−1} = Φ_{N−1} D_{N−1},   λ_s = Φ_s D_s + λ_{s+1} A_{s+1},   κ_s = λ_s C_s + Φ_s E_s
    I(G, x, u, o) = −Σ_{s: u∈B_s} Σ_{j∈G} κ_s(x)[o, j] grad_s(u)_j                                    (3)

(a skipped parameter: A = 1, C = D = E = 0). Only step s's batch is contracted at step s, and memory is λ
(X · O × D) instead of one buffer per unit (U · D). The step index of (3) is the *origin step* s at which the
unit's gradient was computed (kept as the axis ``origin_step``), not the update step t of §5; both sum to the
same totals. The batch's share ⟨κ_s, grad_s(u)⟩ is formed from the per-sample gradients and a matrix product, or
as forward-mode JVPs of the batch's per-sample losses along the rows of κ_s, without per-sample gradients
(``batch_contraction``, chosen per step by the plan). Pseudo-units: the decay unit's gradient κ θ_s and direct move −ρ θ_s, a penalty's s c_s ∇R(θ_s),
the recorded gradient's rounding s δ_s, and the carried state b, whose influence is −⟨λ_0 A_0, b⟩.

The certificates stay those of the forward recursion: a forward pass (:func:`replay_summed_buffers`) advances
the summed buffer Σ_u buffer_t(u) — the optimizer's own D-sized state — with the batch gradients, which gives
the gradient-sum and replay checks, the clip factors and which optimizer buffers exist at each step; the step
residuals r_t = f(θ_{t+1}) − f(θ_t) − Φ_t Δθ_t are formed from the same Φ_t the adjoint uses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..optimizers import template as recurrence
from ..progress import progress_bar
from .blocks import BlockResult, StepAccumulator
from .buffers import RuleBuffers, rule_coefficients
from .context import DecompositionContext, summed_unit_context
from .contract import KERNEL_CONTRACTIONS, Segment, integrated_jacobian, step_nodes
from .gradients import batch_gradient, gradient_rounding, penalty_gradient, step_batch, step_gradients
from .plan import chunks

__all__ = ["ForwardChecks", "AdjointTotals", "summed_unit_context", "replay_summed_buffers", "adjoint_pass",
           "run_adjoint"]

Params = dict[str, torch.Tensor]


@dataclass
class ForwardChecks:
    """What the forward pass of the checks gives, per step of a block: the replay error, the clip factor c_t,
    which optimizer buffers existed before the step (the coefficients' ``first_update``), and f at θ_t, θ_{t+1}."""

    steps: range
    replay_errors: list[float]
    scales: list[float]
    had_buffer: list[dict[str, bool]]
    f_values: list[torch.Tensor]  # f(θ_t) for t = steps.start … steps.stop

    def f_at(self, t: int) -> torch.Tensor:
        return self.f_values[t - self.steps.start]

    def buffers_before(self, t: int) -> dict[str, bool]:
        return self.had_buffer[t - self.steps.start]


def replay_summed_buffers(ctx: DecompositionContext, steps: range, buffers: RuleBuffers | None = None,
                          progress: bool | None = False) -> ForwardChecks:
    """The forward pass of the checks (MATH.md §12): the summed buffer advanced by the §4 recursion with the
    batch gradients, replay-checked at every step against Δθ_t, from ``buffers`` (a :class:`RuleBuffers` of
    :func:`summed_unit_context`; default: the run's initial state)."""
    summed = summed_unit_context(ctx)
    buffers = buffers if buffers is not None else RuleBuffers(summed)
    theta_t = ctx.theta(steps.start)
    out = ForwardChecks(steps, [], [], [], [ctx.target_values(theta_t)])
    for t in progress_bar(steps, enabled=progress, desc="replaying the summed buffer", unit="step"):
        theta_next = ctx.theta(t + 1)
        out.had_buffer.append(dict(buffers.has_buffer))
        updates = buffers.advance(t, step_gradients(summed, t, theta_t), theta_t, theta_next)
        out.replay_errors.append(updates.replay_error)
        out.scales.append(updates.gradient_scale)
        out.f_values.append(ctx.target_values(theta_next))
        theta_t = theta_next
    return out


@dataclass
class AdjointTotals:
    """The kept tensors the backward passes fill, for every test input: kernel (S, rows, X, U, O), pseudo-units
    (S, rows, X, O), with S the number of steps when the origin step is kept (else 1); the step residuals and
    the nodes per step."""

    kernel: torch.Tensor
    pseudo: dict[str, torch.Tensor]
    residuals: torch.Tensor
    nodes: list[int]
    probe_nodes: list[int]
    batch_modes: list[str] = dataclasses.field(default_factory=list)  # per step: "gradients", "jvp" or "none"

    @classmethod
    def zeros(cls, ctx: DecompositionContext, pseudo_names, device=None) -> "AdjointTotals":
        N, X, O, rows = ctx.trajectory.num_steps, ctx.xs_test.shape[0], ctx.num_outputs, ctx.num_rows
        S = N if ctx.keep_steps else 1
        zeros = lambda shape: torch.zeros(shape, dtype=ctx.dtype, device=device or ctx.device)  # noqa: E731
        return cls(zeros((S, rows, X, len(ctx.unit_labels), O)), {p: zeros((S, rows, X, O)) for p in pseudo_names},
                   zeros((N, X, O)), [0] * N, [0] * N, ["none"] * N)

    def to_block(self, ctx: DecompositionContext, checks_replay: list[float], scales: list[float],
                 f_start: torch.Tensor, f_end: torch.Tensor) -> BlockResult:
        """The :class:`BlockResult` the driver finishes into an :class:`Influence` (per-step lists or sums)."""
        def accumulator(tensor: torch.Tensor) -> StepAccumulator:
            acc = StepAccumulator(ctx.keep_steps)
            if ctx.keep_steps:
                acc.steps = list(tensor.unbind(0))
            else:
                acc.total = tensor[0]
            return acc

        modes = ["adjoint"] * ctx.trajectory.num_steps
        block = BlockResult(accumulator(self.kernel), {p: accumulator(v) for p, v in self.pseudo.items()},
                            list(self.residuals.unbind(0)), checks_replay, self.nodes, self.probe_nodes, modes,
                            scales, f_start, f_end)
        block.batch_modes = list(self.batch_modes)  # how each step's batch was contracted (the driver notes it)
        return block


def _rows(ctx: DecompositionContext, n: str, p: int):
    """The parameter-axis rows of tensor n: its group's row, or its coordinates' rows."""
    return slice(ctx.offsets[n], ctx.offsets[n] + p) if ctx.per_coordinate else ctx.row_of_tensor(n)


def _contract_units(ctx, n: str, kappa: torch.Tensor, grads: torch.Tensor, rows: torch.Tensor, sl: slice,
                    kernel: torch.Tensor) -> None:
    """kernel[rows of n, sl, u, :] −= Σ_j κ_s[x, o, j] grad_s(u)_j for the batch's units (equation 3), by the
    contraction table of the forward path (:data:`KERNEL_CONTRACTIONS`, units kept)."""
    X_c = sl.stop - sl.start
    K = kappa.reshape(X_c, -1, grads[0].numel())
    axis = "coordinate" if ctx.per_coordinate else "group"
    equation, unit_axis = KERNEL_CONTRACTIONS[axis, True]
    part = torch.einsum(equation, K, grads.reshape(grads.shape[0], -1))
    kernel[_rows(ctx, n, K.shape[2]), sl].index_add_(unit_axis, rows, part, alpha=-1)


def _contract_direction(ctx, n: str, covector: torch.Tensor, direction: torch.Tensor, sl: slice,
                        target: torch.Tensor, sign: float) -> None:
    """target[rows of n, sl] += sign · Σ_j covector[x, o, j] direction_j (a pseudo-unit's share, or Φ Δθ)."""
    X_c = sl.stop - sl.start
    K = covector.reshape(X_c, -1, direction.numel())
    axis = "coordinate" if ctx.per_coordinate else "group"
    target[_rows(ctx, n, K.shape[2]), sl] += sign * torch.einsum(KERNEL_CONTRACTIONS[axis, False][0], K,
                                                                 direction.reshape(-1))


def _batch_mode(ctx: DecompositionContext, step, fed: list[str], rows: int) -> str:
    """The plan's choice for this step's batch (:meth:`~.plan.ContractionPlan.batch_mode_for_step`): K = X_c · O
    covector rows on the parameter groups the fed tensors fall in."""
    groups = len(set(fed)) if ctx.per_coordinate else len({ctx.row_of_tensor(n) for n in fed})
    return ctx.plan.batch_mode_for_step(rows, groups, len(step.sample_ids))


def _contract_batch_by_jvp(ctx, s: int, theta_s: Params, kappa: Params, coefficients, fed: list[str], scale: float,
                           sl: slice, kernel: torch.Tensor) -> None:
    """kernel[row, sl, u, :] −= c_s w_u ⟨∇ℓ_u(θ_s), κ_s[x, o]⟩ restricted to each parameter group, for the batch's
    units: per group one forward-mode JVP of the batch's per-sample losses along every row of κ (vmapped, in
    ``plan.tangent_chunk`` rows), :meth:`~explaind_math.features.FunctionalModel.per_sample_loss_jvp`. The same
    numbers as the gradient path's matrix product, without the B · D per-sample gradients."""
    step = ctx.trajectory.steps[s]
    xb, yb, rows, weights = step_batch(ctx, step, s)
    X_c, O = sl.stop - sl.start, ctx.num_outputs
    groups: dict[int, list[str]] = {}
    for n in fed:
        groups.setdefault(ctx.row_of_tensor(n), []).append(n)
    for row, names in groups.items():
        tangents = {n: kappa[n] if coefficients[n].gradient_sign == 1 else -kappa[n] for n in names}
        values = ctx.fm.per_sample_loss_jvp(theta_s, ctx.loss_fn, xb, yb, tangents, vectorize=ctx.vectorize,
                                            tangent_chunk_size=ctx.plan.tangent_chunk)  # (X_c · O, B)
        part = (values * (weights * scale)).reshape(X_c, O, -1).transpose(1, 2)  # (X_c, B, O)
        kernel[row, sl].index_add_(1, rows, part, alpha=-1)


def _step_phi(ctx, s: int, theta_s: Params, theta_next: Params, moving: list[str], checks: ForwardChecks,
              sl: slice, totals: AdjointTotals) -> Params | None:
    """Φ_s for the test chunk (name → (X_c · O, *shape)), and the step residual r_s = f(θ_{s+1}) − f(θ_s) − Φ_s Δθ_s
    written into ``totals`` (None, and the whole change as residual, when Φ_s is not computed)."""
    f_s, f_next = checks.f_at(s), checks.f_at(s + 1)
    if s not in ctx.selected or not moving:
        totals.residuals[s, sl] = (f_next - f_s)[sl]
        return None
    seg = Segment(ctx, s, theta_s, theta_next)
    pairs, probes = step_nodes(ctx, seg, f_s, f_next)
    per_input = getattr(pairs, "nodes_per_input", None)  # a piecewise rule (MATH.md §13): nodes per test input
    totals.nodes[s], totals.probe_nodes[s] = (max(per_input) if per_input is not None else len(pairs)), probes
    phi = integrated_jacobian(ctx, seg, pairs, sl, moving)
    predicted = sum(phi[n].reshape(*phi[n].shape[:2], -1) @ seg.delta[n].reshape(-1) for n in moving)
    totals.residuals[s, sl] = (f_next - f_s)[sl] - predicted
    return {n: v.reshape(-1, *ctx.shapes[n]) for n, v in phi.items()}


def _step_pseudo(ctx, s, coefficients, kappa, phi, theta_s: Params, penalty: Params | None,
                 rounding: Params | None, sl: slice, totals: AdjointTotals, k: int) -> None:
    """The pseudo-units of step s: decay −⟨κ_s, κ θ_s⟩ + ⟨Φ_s, −ρ θ_s⟩, penalty −⟨κ_s, s c_s ∇R(θ_s)⟩, the
    recorded gradient's rounding −⟨κ_s, s δ_s⟩."""
    for n, c in coefficients.items():
        target = totals.pseudo["regularization"][k]
        if not recurrence.is_zero(c.decay_coupled) and not isinstance(kappa[n], int):
            _contract_direction(ctx, n, kappa[n], recurrence.decay_gradient(theta_s[n], c), sl, target, -1.0)
        if phi is not None and not recurrence.is_zero(c.decay_decoupled):
            _contract_direction(ctx, n, phi[n], recurrence.decay_direct_update(theta_s[n], c), sl, target, 1.0)
        if penalty is not None and not isinstance(kappa[n], int):
            _contract_direction(ctx, n, kappa[n], c.gradient_sign * penalty[n], sl, totals.pseudo["penalty"][k], -1.0)
        if rounding is not None and not isinstance(kappa[n], int):
            _contract_direction(ctx, n, kappa[n], c.gradient_sign * rounding[n], sl,
                                totals.pseudo["gradient_rounding"][k], -1.0)


def adjoint_pass(ctx: DecompositionContext, steps: range, checks: ForwardChecks, sl: slice, totals: AdjointTotals,
                 adjoint: Params | None = None, *, with_phi: bool = True, progress: bool | None = False) -> Params:
    """Steps ``steps`` in reverse for the test inputs ``sl``: λ_s, κ_s, the batch's share (3) and the pseudo-units,
    into ``totals``; starts from ``adjoint`` (λ_{b} A_{b} entering from the next block; default 0) and returns λ
    carried out of the block's first step, λ_a A_a. ``with_phi=False`` runs only the incoming λ's part (no Φ_s:
    the second pass of the reverse block scan, :mod:`~explaind_math.engine.distributed`)."""
    K = (sl.stop - sl.start) * ctx.num_outputs
    lam = adjoint if adjoint is not None else {n: ctx.zeros((K, *ctx.shapes[n])) for n in ctx.names}
    theta_next = ctx.theta(steps.stop)
    for s in progress_bar(reversed(steps), enabled=progress, desc="adjoint steps", unit="step"):
        step, theta_s = ctx.trajectory.steps[s], ctx.theta(s)
        moving = [n for n in ctx.names if n in set(step.updated)]
        before = checks.buffers_before(s)
        coefficients = {n: rule_coefficients(ctx, step, n, before[n]) for n in moving}
        phi = _step_phi(ctx, s, theta_s, theta_next, moving, checks, sl, totals) if with_phi else None
        kappa = {}
        for n, c in coefficients.items():
            p = None if phi is None else phi[n]
            lam[n] = recurrence.feed_adjoint(lam[n], c.D, p)
            kappa[n] = recurrence.unit_covector(lam[n], p, c)
        k = s if ctx.keep_steps else 0
        fed = [n for n in moving if not isinstance(kappa[n], int)]
        by_jvp = bool(fed) and _batch_mode(ctx, step, fed, K) == "jvp"
        totals.batch_modes[s] = "jvp" if by_jvp else "gradients" if fed else "none"
        gradients = None
        if by_jvp:  # ⟨grad_s(u), κ⟩ as JVPs of the batch's losses: no per-sample gradients (issue 15, item 4)
            scale = checks.scales[s - checks.steps.start]
            _contract_batch_by_jvp(ctx, s, theta_s, kappa, coefficients, fed, scale, sl, totals.kernel[k])
            penalty = None if not ctx.penalty else {n: v * scale for n, v in penalty_gradient(ctx.penalty, theta_s).items()}
        else:
            gradients = step_gradients(ctx, s, theta_s) if fed or ctx.penalty else None
            if fed:
                for rows, g in gradients.chunks():
                    for n in fed:
                        grads = g[n] if coefficients[n].gradient_sign == 1 else -g[n]
                        _contract_units(ctx, n, kappa[n], grads, rows, sl, totals.kernel[k])
                    del g
            penalty = gradients.penalty if gradients else None
        rounding = None
        if fed and "gradient_rounding" in totals.pseudo:  # δ_s needs Σ_u grad_s(u): one batch gradient after JVPs
            source = gradients if gradients is not None else batch_gradient(ctx, s, theta_s)
            rounding = gradient_rounding(ctx, s, source.summed, source.penalty)
        _step_pseudo(ctx, s, coefficients, kappa, phi, theta_s, penalty, rounding, sl, totals, k)
        for n, c in coefficients.items():
            lam[n] = recurrence.propagate_adjoint(lam[n], c.A)
        theta_next = theta_s
    if steps.start == 0 and "carried_state" in totals.pseudo:
        _carried_state(ctx, lam, sl, totals)
    return lam


def _carried_state(ctx: DecompositionContext, lam: Params, sl: slice, totals: AdjointTotals) -> None:
    """The state carried in from before the recording (Remark F.3): −⟨λ_0 A_0, b⟩, at origin step 0."""
    key = ctx.trajectory.rule.buffer_state_key
    for n, st in ctx.trajectory.initial_state.items():
        if key in st and n in ctx.names:
            b = st[key].to(device=ctx.device, dtype=ctx.dtype)
            _contract_direction(ctx, n, lam[n], b, sl, totals.pseudo["carried_state"][0], -1.0)


def run_adjoint(ctx: DecompositionContext, progress: bool | None = False) -> tuple[BlockResult, list[int]]:
    """The whole run by the adjoint in one process: the forward pass of the checks, then one backward pass per
    test chunk (``plan.test_chunk`` test inputs: λ of a chunk is what must fit the memory budget)."""
    steps = range(ctx.trajectory.num_steps)
    checks = replay_summed_buffers(ctx, steps, progress=progress)
    totals = AdjointTotals.zeros(ctx, ctx.pseudo_names)
    for sl in chunks(ctx.xs_test.shape[0], ctx.plan.test_chunk):
        adjoint_pass(ctx, steps, checks, sl, totals, progress=progress)
    block = totals.to_block(ctx, checks.replay_errors, checks.scales, checks.f_values[0], checks.f_values[-1])
    return block, list(steps)
