"""The driver shared by every theorem: rule × target × contraction (MATH.md §1-§5, §11).

For each step t, in order:
  1. per-sample gradients g_{t,i} = w_{t,i} ∇ℓ_i(θ_t) of the step's units (vmap ∘ grad, in chunks);
  2. the rule's table (A, C, D, E, s, κ, ρ) advances one buffer per unit and gives update_t(u)
     (:class:`RuleStage`);
  3. replay check: Σ_u update_t(u) must equal θ_{t+1} − θ_t (else an error naming step and parameter);
  4. the quadrature nodes: a fixed rule's, or those an adaptive rule accepts by probing the exact step
     residual with one JVP along Δθ_t per node (:func:`~explaind_math.quadrature.select_nodes`);
  5. the test feature map Φ_t(x) = ∫ ∂_θ f(x; θ_t + α Δθ_t) dα contracted with the updates on the kept
     axes, by whichever of JVPs or Jacobians is cheaper for this step (:mod:`~explaind_math.contraction`),
     test input chunk by test input chunk;
  6. the step residual r_t = f(θ_{t+1}) − f(θ_t) − Φ_t Σ_u update_t(u), which certifies the step.

The buffer recursion of step 2 is linear, so a block of steps can start from any buffer state: the
single-process run is one block from the initial state, and :mod:`~explaind_math.distributed` splits the
steps into blocks across ranks and joins the buffers by a scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .contraction import (ContractionPlan, PathCosts, bytes_of, chunks, measure_path_costs, parse_memory_budget,
                          plan_contraction)
from .errors import ExplaindError, NonFiniteError, ReplayMismatchError, TrajectoryMismatchError
from .features import FunctionalModel, TrainingData
from .influence import AXES, Influence
from .progress import progress_bar
from .optimizers.template import apply_linear, buffer_step, decay_direct_update, decay_gradient, unit_update
from .quadrature import AdaptiveQuadrature, Quadrature, gauss_legendre, select_nodes
from .recording import check_deterministic_modules
from .trajectory import Trajectory

__all__ = ["decompose_trajectory", "DEFAULT_KEEP", "default_replay_rtol", "RuleStage", "DecompositionContext"]

DEFAULT_KEEP = ("step", "param", "test", "unit", "output")
Params = dict[str, torch.Tensor]


def default_replay_rtol(trajectory_dtype: torch.dtype) -> float:
    """Replay tolerance relative to max |Δθ| of a tensor: 1e-8 for float64 runs, 1e-4 for float32/16."""
    return 1e-8 if trajectory_dtype == torch.float64 else 1e-4


def _param_groups(spec: str | Mapping[str, str], names: Sequence[str], shapes: Mapping[str, tuple]) -> tuple[list[str], list[int] | None]:
    """Labels of the parameter axis and, per parameter, its label index (None: one row per coordinate)."""
    if spec == "coordinate":
        labels = []
        for n in names:
            count = 1
            for s in shapes[n]:
                count *= s
            labels.extend(f"{n}[{k}]" for k in range(count))
        return labels, None
    if spec == "tensor":
        mapping = {n: n for n in names}
    elif spec == "module":
        mapping = {n: n.rsplit(".", 1)[0] if "." in n else n for n in names}
    elif spec == "all":
        mapping = {n: "all" for n in names}
    elif isinstance(spec, Mapping):
        missing = [n for n in names if n not in spec]
        if missing:
            raise ExplaindError(f"the parameter grouping does not assign parameters {missing} to a group")
        mapping = {n: str(spec[n]) for n in names}
    else:
        raise ExplaindError(f"params must be 'tensor', 'module', 'coordinate', 'all' or a mapping, got {spec!r}")
    labels = list(dict.fromkeys(mapping[n] for n in names))
    return labels, [labels.index(mapping[n]) for n in names]


def _unit_rows(sample_ids: Sequence[int], partition: Any) -> tuple[list, dict[int, int]]:
    """Labels of the unit axis and, per training-sample id, its row (Corollary F.2 when grouped)."""
    if partition is None:
        return list(sample_ids), {u: r for r, u in enumerate(sample_ids)}
    if isinstance(partition, str):
        if partition != "all":
            raise ExplaindError(f"partition must be None, 'all', a mapping, a sequence or a callable, got {partition!r}")
        return ["all"], {u: 0 for u in sample_ids}
    group_of: dict[int, Any] = {}
    missing = []
    for u in sample_ids:
        try:
            g = partition(u) if callable(partition) else partition[u]
        except (KeyError, IndexError):
            missing.append(u)
            continue
        group_of[u] = g.item() if isinstance(g, torch.Tensor) else g
    if missing:
        raise TrajectoryMismatchError(
            f"the partition does not cover training sample ids {missing[:10]}"
            f"{' …' if len(missing) > 10 else ''} ({len(missing)} in all)"
        )
    groups = sorted(set(group_of.values()), key=lambda g: (str(type(g)), g))
    row = {g: r for r, g in enumerate(groups)}
    return groups, {u: row[g] for u, g in group_of.items()}


def _is_zero(coefficient) -> bool:
    return not callable(coefficient) and not isinstance(coefficient, torch.Tensor) and coefficient == 0


def _add_rows(target: torch.Tensor, rows: torch.Tensor, source: torch.Tensor) -> None:
    """target[rows[k]] += source[k] along the first axis, repeated rows accumulated (a partition maps many
    samples to one row). index_put_ with accumulate: on CPU, index_add_ along a first axis with large rows
    is two to three orders of magnitude slower (measured: 173 ms against 0.1 ms for 32 rows of 4096)."""
    target.index_put_((rows,), source, accumulate=True)


def _scale_in_place(buffer: torch.Tensor, coefficient) -> torch.Tensor:
    """A ⊙ buffer written into ``buffer`` (a unit-by-parameter buffer is the largest tensor held: no copy);
    a callable linear map A returns a new tensor."""
    if callable(coefficient):
        return coefficient(buffer)
    if isinstance(coefficient, torch.Tensor) or coefficient != 1:
        buffer.mul_(coefficient)
    return buffer


def _subtract_product(target: torch.Tensor, coefficient, buffer: torch.Tensor) -> None:
    """target −= D ⊙ buffer, in place and without a buffer-sized temporary unless D is a callable map."""
    if callable(coefficient):
        target.sub_(coefficient(buffer))
    elif isinstance(coefficient, torch.Tensor):
        target.addcmul_(buffer, coefficient, value=-1)
    elif coefficient != 0:
        target.add_(buffer, alpha=-coefficient)


@dataclass
class DecompositionContext:
    """Everything about one decomposition that does not change from step to step."""

    trajectory: Trajectory
    fm: FunctionalModel
    data: TrainingData
    loss_fn: Callable
    penalty: Callable | None
    names: list[str]
    shapes: dict[str, tuple]
    xs_test: torch.Tensor
    y_test: torch.Tensor
    labels: list[str]
    group_index: list[int] | None
    units: list
    row_of: dict[int, int]
    keep: tuple[str, ...]
    quadrature: Quadrature | AdaptiveQuadrature
    plan: ContractionPlan
    selected: set[int]
    dtype: torch.dtype
    device: torch.device
    rtol: float
    eps_train: float
    rescaling: bool
    vectorize: bool
    num_outputs: int
    grouped_units: bool  # units are partition groups (Corollary F.2), not samples
    forward_ad: bool  # torch.func.jvp runs through the target (else: Jacobians only)
    offsets: dict[str, int] = field(default_factory=dict)  # per-coordinate rows: first row of each tensor

    @property
    def keep_steps(self) -> bool:
        return "step" in self.keep

    @property
    def keep_units(self) -> bool:
        return "unit" in self.keep

    @property
    def per_coordinate(self) -> bool:
        return self.group_index is None

    @property
    def num_rows(self) -> int:
        """Size of the parameter axis: groups, or coordinates."""
        return len(self.labels)

    def numel(self, n: str) -> int:
        return torch.Size(self.shapes[n]).numel()

    def theta(self, t: int) -> Params:
        snapshot = self.trajectory.parameters[t]
        return {n: snapshot[n].to(device=self.device, dtype=self.dtype) for n in self.names}

    def targets(self, params: Params) -> torch.Tensor:
        """f(x; θ) on every test input (X, O), in test chunks."""
        parts = [self.fm.targets(params, self.xs_test[s], self.y_test[s]).detach()
                 for s in chunks(self.xs_test.shape[0], self.plan.test_chunk)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]


class RuleStage:
    """The buffers of the §4 template, advanced step by step (MATH.md §4):

        buffer_t(u) = A_t ⊙ buffer_{t−1}(u) + C_t ⊙ s g_{t,u},   update_t(u) = −(D_t ⊙ buffer_t(u) + E_t ⊙ s g_{t,u})

    one buffer per unit (sample, or partition element) and one per pseudo-unit (weight decay, a loss
    penalty, optimizer state carried in from before the recording). The state is a set of tensors that the
    recursion maps linearly, so a stage can start from any state (:meth:`load_state`): that is how blocks of
    steps run on different ranks (:mod:`~explaind_math.distributed`).
    """

    def __init__(self, ctx: DecompositionContext, *, zero_state: bool = False):
        self.ctx = ctx
        traj, names, shapes = ctx.trajectory, ctx.names, ctx.shapes
        self.rule = traj.rule
        zeros = lambda shape: torch.zeros(shape, dtype=ctx.dtype, device=ctx.device)  # noqa: E731
        self.sample_buffer = {n: zeros((len(ctx.units), *shapes[n])) for n in names}
        self.decay_buffer = {n: zeros(shapes[n]) for n in names}
        self.penalty_buffer = {n: zeros(shapes[n]) for n in names}
        key = self.rule.buffer_state_key
        carried = {n: st[key] for n, st in traj.initial_state.items() if key is not None and key in st}
        self.carried_buffer = {
            n: (zeros(shapes[n]) if zero_state else v.to(device=ctx.device, dtype=ctx.dtype)) for n, v in carried.items()
        }
        self.pseudo_names = (["regularization"] + (["carried_state"] if self.carried_buffer else [])
                             + (["penalty"] if ctx.penalty else []))
        # the optimizer's buffer exists (rule.creates_buffer); carried state means it existed at the start
        self.has_buffer = {n: (n in carried) for n in names}
        # first-order bound on how far the gradients' rounding moves each update (the replay check's floor):
        # a buffer of |perturbations| advanced by the same table, fed 64 ε · max|g_t| per coordinate per step
        self.rounding_buffer = {n: zeros(shapes[n]) for n in names}
        # units whose buffer has been fed (C ≠ 0) at some step: only their rows can hold non-zero updates
        self.touched = torch.zeros(len(ctx.units), dtype=torch.bool, device=ctx.device)

    # ---------------------------------------------------------------- state, for blocks of steps
    def state(self) -> list[torch.Tensor]:
        """The linear state, in a fixed order (the same on every rank)."""
        out = []
        for n in self.ctx.names:
            out += [self.sample_buffer[n], self.decay_buffer[n], self.penalty_buffer[n], self.rounding_buffer[n]]
            if n in self.carried_buffer:
                out.append(self.carried_buffer[n])
        return out

    def load_state(self, tensors: Sequence[torch.Tensor]) -> None:
        it = iter(tensors)
        for n in self.ctx.names:
            self.sample_buffer[n], self.decay_buffer[n], self.penalty_buffer[n], self.rounding_buffer[n] = (
                next(it), next(it), next(it), next(it))
            if n in self.carried_buffer:
                self.carried_buffer[n] = next(it)
        for n in self.ctx.names:  # rows fed in earlier blocks
            b = self.sample_buffer[n]
            self.touched |= b.reshape(b.shape[0], -1).ne(0).any(1)

    def _coefficients(self, step, n: str):
        hyper = step.hyperparameters[self.ctx.trajectory.group_of[n]]
        state = {k: (v.to(device=self.ctx.device, dtype=self.ctx.dtype) if isinstance(v, torch.Tensor) else v)
                 for k, v in step.state.get(n, {}).items()}
        c = self.rule.coefficients(hyper, state, first_update=not self.has_buffer[n])
        self.has_buffer[n] = self.has_buffer[n] or self.rule.creates_buffer(hyper)
        return c

    def creates_buffers(self, step) -> set[str]:
        """The parameters whose optimizer buffer this step creates (a cheap pass: hyper-parameters only)."""
        return {n for n in step.updated
                if self.rule.creates_buffer(step.hyperparameters[self.ctx.trajectory.group_of[n]])}

    def propagate(self, t: int) -> None:
        """Advance the state through step t with no new input: buffer ← A_t buffer (|A_t| for the rounding
        bound). The scan of :mod:`~explaind_math.distributed` carries a block's incoming state this way."""
        step = self.ctx.trajectory.steps[t]
        for n in self.ctx.names:
            if n not in set(step.updated):
                continue
            c = self._coefficients(step, n)
            self.sample_buffer[n] = _scale_in_place(self.sample_buffer[n], c.A)
            self.decay_buffer[n] = apply_linear(c.A, self.decay_buffer[n])
            self.penalty_buffer[n] = apply_linear(c.A, self.penalty_buffer[n])
            self.rounding_buffer[n] = _abs_linear(c.A, self.rounding_buffer[n])
            if n in self.carried_buffer:
                self.carried_buffer[n] = apply_linear(c.A, self.carried_buffer[n])

    def add_state(self, other: Sequence[torch.Tensor]) -> None:
        self.load_state([a + b for a, b in zip(self.state(), other)])

    # ---------------------------------------------------------------- one step
    def advance(self, t: int, theta_t: Params, theta_next: Params, *, checks: bool = True) -> "StepUpdates":
        """Step t: per-sample gradients, the buffers advanced, every unit's update (:class:`StepUpdates`).

        With ``checks=False`` (a block's own part on a rank, which does not start from the true state) the
        gradient-sum and replay checks are skipped and no update is formed: only the state moves.
        """
        ctx, names, shapes = self.ctx, self.ctx.names, self.ctx.shapes
        step = ctx.trajectory.steps[t]
        updated = set(step.updated)
        zeros = lambda n: torch.zeros(shapes[n], dtype=ctx.dtype, device=ctx.device)  # noqa: E731

        # 1. per-sample gradients in chunks, weighted: g_{t,i} = w_{t,i} ∇ℓ_i(θ_t); the penalty's ∇R(θ_t)
        xb, yb = ctx.data.fetch(step.units)
        rows = torch.as_tensor([ctx.row_of[u] for u in step.units], dtype=torch.long, device=ctx.device)
        weights = step.weights.to(device=ctx.device, dtype=ctx.dtype)
        slices = chunks(len(step.units), ctx.plan.train_chunk)

        # a partition with few groups in this batch (Corollary F.2): one weighted-loss gradient per group
        # costs less than every sample's (measured: one batch gradient ≈ half of vmap over the samples)
        group_rows = torch.unique(rows) if ctx.grouped_units and ctx.vectorize else None
        by_group = group_rows is not None and group_rows.numel() <= 2

        def gradients(sl: slice) -> Params:
            if by_group:
                mask = (rows[sl].unsqueeze(0) == group_rows.unsqueeze(1)).to(ctx.dtype)  # (K_b, B)
                return ctx.fm.group_gradients(theta_t, ctx.loss_fn, xb[sl], _take(yb, sl), mask * weights[sl])
            raw = ctx.fm.per_sample_gradients(theta_t, ctx.loss_fn, xb[sl], _take(yb, sl), vectorize=ctx.vectorize)
            w = weights[sl]
            return {n: _weighted(raw[n], w) for n in names}

        def rows_of(sl: slice) -> torch.Tensor:
            return group_rows if by_group else rows[sl]

        cached = [gradients(slices[0])] if len(slices) == 1 else None
        penalty_grad = _penalty_gradient(ctx.penalty, theta_t) if ctx.penalty else None
        scale = 1.0
        if step.gradient is None and ctx.rescaling:
            raise ExplaindError(f"step {t}: gradient rescaling needs the recorded gradient of the step")
        if step.gradient is not None and ctx.rescaling:
            total = _sum_gradients(cached if cached else (gradients(sl) for sl in slices), names)
            scale = _recover_gradient_scale(t, total, penalty_grad, step.gradient, ctx.rtol, ctx.eps_train)
            penalty_grad = None if penalty_grad is None else {n: v * scale for n, v in penalty_grad.items()}

        # 2. the rule's table advances the buffers: A first, then every chunk's C ⊙ g (and E ⊙ g) by row
        coefficients = {n: self._coefficients(step, n) for n in names if n in updated}
        direct = {n: checks and n in updated and not _is_zero(coefficients[n].E) for n in names}
        unit_updates = {n: torch.zeros_like(self.sample_buffer[n]) for n in names if direct[n]} if checks else None
        for n in updated:
            self.sample_buffer[n] = _scale_in_place(self.sample_buffer[n], coefficients[n].A)
        if any(not _is_zero(coefficients[n].C) for n in updated):
            self.touched[rows] = True
        summed = {n: zeros(n) for n in names}
        for k, sl in enumerate(slices):
            g = cached[k] if cached else gradients(sl)
            if scale != 1.0:
                g = {n: v * scale for n, v in g.items()}
            for n in names:
                summed[n] += g[n].sum(0)
                if n not in updated:
                    continue
                c = coefficients[n]
                grads = g[n] if c.gradient_sign == 1 else -g[n]
                if not _is_zero(c.C):
                    _add_rows(self.sample_buffer[n], rows_of(sl), apply_linear(c.C, grads))
                if direct[n]:
                    _add_rows(unit_updates[n], rows_of(sl), -apply_linear(c.E, grads))
            del g
        cached = None
        if checks and step.gradient is not None and not ctx.rescaling:
            _check_gradient_sum(t, summed, penalty_grad, step.gradient, ctx.rtol, ctx.eps_train)
        gradient_rounding = 64 * ctx.eps_train * _global_gradient_scale(summed, penalty_grad, step.gradient)

        pseudo_updates: dict[str, Params] = {p: {} for p in self.pseudo_names}
        update_rounding = {n: 0.0 for n in names}
        for n in names:
            if n not in updated:  # PyTorch skipped it: every update is 0 (units: no tensor is formed)
                for p in self.pseudo_names:
                    pseudo_updates[p][n] = zeros(n)
                continue
            c = coefficients[n]
            if checks:  # update_t(u) = −(D ⊙ buffer_t(u) + E ⊙ g_{t,u})
                if direct[n]:
                    _subtract_product(unit_updates[n], c.D, self.sample_buffer[n])
                else:
                    unit_updates[n] = _negated_product(c.D, self.sample_buffer[n])
            rounding = torch.full(shapes[n], gradient_rounding, dtype=ctx.dtype, device=ctx.device)
            self.rounding_buffer[n] = _abs_linear(c.A, self.rounding_buffer[n]) + _abs_linear(c.C, rounding)
            update_rounding[n] = float((_abs_linear(c.D, self.rounding_buffer[n]) + _abs_linear(c.E, rounding)).max())
            g_decay = decay_gradient(theta_t[n], c)
            self.decay_buffer[n] = buffer_step(self.decay_buffer[n], g_decay, c)
            pseudo_updates["regularization"][n] = (unit_update(self.decay_buffer[n], g_decay, c)
                                                   + decay_direct_update(theta_t[n], c))
            if "carried_state" in pseudo_updates:
                if n in self.carried_buffer:
                    self.carried_buffer[n] = apply_linear(c.A, self.carried_buffer[n])
                    pseudo_updates["carried_state"][n] = -apply_linear(c.D, self.carried_buffer[n])
                else:
                    pseudo_updates["carried_state"][n] = zeros(n)
            if "penalty" in pseudo_updates:
                g_penalty = c.gradient_sign * penalty_grad[n]
                self.penalty_buffer[n] = buffer_step(self.penalty_buffer[n], g_penalty, c)
                pseudo_updates["penalty"][n] = unit_update(self.penalty_buffer[n], g_penalty, c)
        if not checks:
            return StepUpdates(None, None, pseudo_updates, None, 0.0, scale)

        # 3. replay check: Σ_u update_t(u) = θ_{t+1} − θ_t
        unit_totals = {n: unit_updates[n].sum(0) if n in unit_updates else zeros(n) for n in names}
        delta = {n: theta_next[n] - theta_t[n] for n in names}
        total = {n: unit_totals[n] + sum(pseudo_updates[p][n] for p in self.pseudo_names) for n in names}
        replay_error = _replay_check(t, total, delta, theta_t, theta_next, ctx.rtol, ctx.eps_train, updated,
                                     update_rounding)
        # rows that can hold a non-zero update: every unit whose buffer was ever fed, and this step's batch
        active = torch.nonzero(self.touched.clone().index_fill_(0, rows, True)).flatten()
        return StepUpdates(unit_updates, unit_totals, pseudo_updates, active, replay_error, scale)


@dataclass
class StepUpdates:
    """What the rule gives for one step: every unit's update (units, *shape) per parameter, their sum over
    units, every pseudo-unit's update, the rows that can be non-zero, the replay error, the clip factor."""

    units: Params | None
    unit_totals: Params | None
    pseudo: dict[str, Params]
    active: torch.Tensor | None
    replay_error: float
    gradient_scale: float


def _negated_product(coefficient, buffer: torch.Tensor) -> torch.Tensor:
    """−D ⊙ buffer as one new tensor (no zero-filled intermediate)."""
    if callable(coefficient):
        return -coefficient(buffer)
    if isinstance(coefficient, torch.Tensor):
        return torch.mul(buffer, -coefficient)  # −D has the parameter's shape: negating it is cheap
    return buffer * (-coefficient)


def _weighted(per_sample: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """w_i ∇ℓ_i, written into the per-sample gradients (B · D, the step's largest temporary) where they own
    their memory; a gradient that vmap returned as an expanded view (a parameter the loss ignores) is copied."""
    return _scaled_in_place(per_sample, weights.reshape(-1, *([1] * (per_sample.dim() - 1))))


def _take(ys: Any, sl: slice) -> Any:
    return ys[sl]


def _sum_gradients(parts: Iterable[Params], names: Sequence[str]) -> Params:
    total = None
    for g in parts:
        s = {n: g[n].sum(0) for n in names}
        total = s if total is None else {n: total[n] + s[n] for n in names}
    return total


# ==================================================================================== the contraction
@dataclass
class StepContribution:
    """One step's kept influences: kernel (rows, X, [U,] O), pseudo-units (rows, X, O), Φ_t Σ_u update_t(u)."""

    kernel: torch.Tensor | None
    pseudo: dict[str, torch.Tensor | None]
    predicted: torch.Tensor
    nodes: int
    probe_nodes: int
    mode: str


def contract_step(ctx: DecompositionContext, t: int, theta_t: Params, theta_next: Params, f_t: torch.Tensor,
                  f_next: torch.Tensor, updates: StepUpdates) -> StepContribution:
    """Steps 4-5 of the module docstring for step t: nodes, then the cheapest exact contraction."""
    pseudo_updates = updates.pseudo
    names = ctx.names
    delta = {n: theta_next[n] - theta_t[n] for n in names}
    step = ctx.trajectory.steps[t]
    moving = [n for n in names if n in set(step.updated)]
    X, O = f_t.shape

    def point(alpha: float) -> Params:
        return {n: theta_t[n] + alpha * delta[n] for n in names}

    def points(alphas: Sequence[float]) -> Params:  # θ_t + α_k Δθ_t stacked on a leading axis k
        a = torch.tensor(alphas, dtype=ctx.dtype, device=ctx.device)
        return {n: theta_t[n] + a.reshape(-1, *([1] * theta_t[n].dim())) * delta[n] for n in names}

    # 4. the contraction for this step: count what each way would cost
    active = updates.active if ctx.keep_units else None
    n_active = int(active.numel()) if active is not None else 1
    groups = sorted({_row_group(ctx, n) for n in moving}) if not ctx.per_coordinate else []
    n_pseudo = len(pseudo_updates)
    directions = len(groups) * (n_active + n_pseudo)
    moving_params = sum(ctx.numel(n) for n in moving)
    macs = O * moving_params * ((n_active + n_pseudo + 1) if ctx.keep_units else (n_pseudo + 2))
    mode = ctx.plan.mode_for_step(directions, O, macs)
    batches = _jvp_batches(ctx, moving, groups, active, updates) if mode == "jvp" and moving else None

    rows = ctx.num_rows
    kernel_shape = (rows, X, len(ctx.units), O) if ctx.keep_units else (rows, X, O)
    kernel = torch.zeros(kernel_shape, dtype=ctx.dtype, device=ctx.device)
    pseudo = {p: torch.zeros((rows, X, O), dtype=ctx.dtype, device=ctx.device) for p in pseudo_updates}
    predicted = torch.zeros((X, O), dtype=ctx.dtype, device=ctx.device)

    # 5. nodes: a fixed rule's, or an adaptive rule's chosen by probing the exact residual with JVPs. When
    # every kept direction fits one JVP batch, the probes ARE the contraction (their sum over directions is
    # Φ Σ_u update_t(u)), and the accepted nodes' values are used as they are; otherwise the probe is one
    # JVP along Δθ_t and the contraction runs afterwards on the chosen nodes.
    fused = None
    if isinstance(ctx.quadrature, Quadrature) or not moving:
        rule = ctx.quadrature if isinstance(ctx.quadrature, Quadrature) else ctx.quadrature.rules[0]
        pairs, probe_nodes = rule.on_interval(0.0, 1.0), 0
    else:
        if batches is not None and len(batches) == 1:
            fused, tangents = {}, batches[0][1].get()

            def probe(alphas):
                values = _directional_at(ctx, point, points, alphas, tangents)  # (k, K, X, O)
                fused.update(zip(alphas, values))
                return values.sum(1)
        else:
            tangent = {n: delta[n].unsqueeze(0) for n in moving}

            def probe(alphas):
                return _directional_at(ctx, point, points, alphas, tangent)[:, 0]

        pairs, probe_nodes = select_nodes(ctx.quadrature, probe, lambda a: ctx.targets(point(a)), f_t, f_next)
    if moving:
        if fused is not None:
            jv = sum(w * fused[alpha] for alpha, w in pairs)
            _scatter_jvp(batches[0][0], jv, slice(None), kernel, pseudo, predicted)
        elif mode == "jvp":
            _contract_by_jvp(ctx, point, pairs, batches, kernel, pseudo, predicted)
        else:
            _contract_by_jacobian(ctx, point, points, pairs, moving, active, updates, kernel, pseudo, predicted)
    values = [kernel, predicted, *pseudo.values()]
    if not all(bool(torch.isfinite(v).all()) for v in values):
        raise NonFiniteError(_non_finite_message(ctx, t, point, pairs, moving, delta))
    return StepContribution(kernel, pseudo, predicted, len(pairs), probe_nodes, mode)


def _row_group(ctx: DecompositionContext, n: str) -> int:
    return ctx.group_index[ctx.names.index(n)]


def _directional_at(ctx: DecompositionContext, point, points, alphas: Sequence[float],
                    tangents: Params) -> torch.Tensor:
    """Φ(α_k) v for every node α_k at once: (k, K, X, O), with ``point(α)`` the parameters at one node and
    ``points(alphas)`` those of every node stacked. With forward-mode AD the nodes are one vmapped call (the
    per-call overhead of torch.func is paid once per order, not once per node); under a memory budget, one
    node at a time (vmap would hold k working sets at once)."""
    if not ctx.forward_ad or len(alphas) == 1 or ctx.plan.budget is not None:
        return torch.stack([_directional(ctx, point(a), tangents) for a in alphas])
    return torch.func.vmap(lambda p: _directional(ctx, p, tangents))(points(alphas))


def _directional(ctx: DecompositionContext, params: Params, tangents: Params, sl: slice | None = None) -> torch.Tensor:
    """Φ(α) v for stacked tangents v (K, X, O) at one point, over all test inputs (in chunks) or ``sl``."""
    slices = [sl] if sl is not None else chunks(ctx.xs_test.shape[0], ctx.plan.test_chunk)
    if ctx.forward_ad:
        parts = [ctx.fm.directional(params, ctx.xs_test[s], ctx.y_test[s], tangents,
                                    tangent_chunk_size=ctx.plan.tangent_chunk).detach() for s in slices]
    else:  # the target has no forward-mode AD: the adaptive rules' probes go through the Jacobian
        parts = [ctx.fm.directional_by_jacobian(params, ctx.xs_test[s], ctx.y_test[s], tangents).detach()
                 for s in slices]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def _jvp_batches(ctx, moving, groups, active, updates) -> list[tuple[list, Params]]:
    """The kept directions of a step, in batches of at most ``plan.tangent_chunk``: each unit's update (or
    their sum) restricted to each parameter group, and each pseudo-unit's restricted likewise. Returns
    [(blocks, tangents)] with blocks (group, pseudo name or None, unit rows or None) and the stacked
    tangents (K_batch, *shape) per moving parameter; tangents are built when a batch is reached."""
    shapes = ctx.shapes
    group_names = {g: [n for n in moving if _row_group(ctx, n) == g] for g in groups}
    blocks = []
    for g in groups:
        if ctx.keep_units:
            size = ctx.plan.tangent_chunk or active.numel()
            for s in range(0, active.numel(), max(1, size)):
                blocks.append((g, None, active[s:s + size]))
        else:
            blocks.append((g, None, None))
        blocks.extend((g, p, None) for p in updates.pseudo)

    def vectors(block) -> Params:
        g, p, rows = block
        count = 1 if rows is None else rows.numel()
        out = {}
        for n in moving:
            if n not in group_names[g]:
                out[n] = torch.zeros((count, *shapes[n]), dtype=ctx.dtype, device=ctx.device)
            elif p is not None:
                out[n] = updates.pseudo[p][n].unsqueeze(0)
            elif rows is None:
                out[n] = updates.unit_totals[n].unsqueeze(0)
            else:
                out[n] = updates.units[n].index_select(0, rows)
        return out

    limit = ctx.plan.tangent_chunk or sum(1 if b[2] is None else b[2].numel() for b in blocks)
    batches, current, size = [], [], 0
    for b in blocks:
        count = 1 if b[2] is None else b[2].numel()
        if current and size + count > limit:
            batches.append(current)
            current, size = [], 0
        current.append(b)
        size += count
    if current:
        batches.append(current)

    def stacked(batch) -> Params:
        parts = [vectors(b) for b in batch]
        return {n: torch.cat([v[n] for v in parts]) for n in moving}

    return [(batch, _Lazy(stacked, batch)) for batch in batches]


class _Lazy:
    """A value computed on first use (a batch's tangents are built only when the batch is processed)."""

    def __init__(self, fn, *args):
        self.fn, self.args, self.value = fn, args, None

    def get(self):
        if self.value is None:
            self.value = self.fn(*self.args)
        return self.value


def _scatter_jvp(batch, jv: torch.Tensor, sl: slice, kernel, pseudo, predicted) -> None:
    """Add the integrated JVPs ``jv`` (K_batch, X_chunk, O) of one batch of directions to the kept tensors."""
    predicted[sl] += jv.sum(0)
    k = 0
    for g, p, rows in batch:
        count = 1 if rows is None else rows.numel()
        part = jv[k:k + count]
        k += count
        if p is not None:
            pseudo[p][g, sl] += part[0]
        elif rows is None:
            kernel[g, sl] += part[0]
        else:
            kernel[g, sl].index_add_(1, rows, part.transpose(0, 1))


def _contract_by_jvp(ctx, point, pairs, batches, kernel, pseudo, predicted):
    """Φ_t(x) v = Σ_k w_k J(x; θ_t(α_k)) v for every kept direction v (:func:`_jvp_batches`): one
    forward-mode JVP per direction and node."""
    for batch, tangents in batches:
        for sl in chunks(ctx.xs_test.shape[0], ctx.plan.test_chunk):
            jv = None
            for alpha, w in pairs:
                value = _directional(ctx, point(alpha), tangents.get(), sl)
                jv = value * w if jv is None else jv.add_(value, alpha=w)  # value may be an expanded view
            _scatter_jvp(batch, jv, sl, kernel, pseudo, predicted)


def _contract_by_jacobian(ctx, point, points, pairs, moving, active, updates, kernel, pseudo, predicted):
    """Φ_t(x) = Σ_k w_k ∂_θ f(x; θ_t(α_k)) for a test chunk, then I[j, x, u, o] = Φ_t(x)[o, j] update_t(u)[j]
    summed within parameter groups (or per coordinate), and the same for every pseudo-unit. The nodes are
    evaluated ``plan.node_chunk`` at a time in one vmapped call; the quadrature sum is accumulated in place
    (into the first node's Jacobian when nodes go one at a time)."""
    if ctx.plan.groupwise_jacobian:
        by_group: dict = {}
        for n in moving:
            by_group.setdefault(n if ctx.per_coordinate else _row_group(ctx, n), []).append(n)
        name_sets = list(by_group.values())
    else:
        name_sets = [moving]
    node_chunks = chunks(len(pairs), ctx.plan.node_chunk if len(pairs) >= ctx.plan.min_node_batch else 1)
    for sl in chunks(ctx.xs_test.shape[0], ctx.plan.test_chunk):
        for wrt in name_sets:
            phi = {}
            for nodes in node_chunks:
                alphas = [alpha for alpha, _ in pairs[nodes]]
                weights = [w for _, w in pairs[nodes]]
                if len(alphas) == 1:
                    value = ctx.fm.jacobian(point(alphas[0]), ctx.xs_test[sl], ctx.y_test[sl], wrt=wrt)
                    part = {n: _scaled_in_place(value[n].detach(), weights[0]) for n in wrt}
                else:
                    value = ctx.fm.jacobians_at(points(alphas), ctx.xs_test[sl], ctx.y_test[sl], wrt=wrt)
                    w = torch.tensor(weights, dtype=ctx.dtype, device=ctx.device)
                    part = {n: torch.tensordot(w, value[n].detach(), dims=1) for n in wrt}
                del value
                for n in wrt:
                    phi[n] = part[n] if n not in phi else phi[n].add_(part[n])
                del part
            for n in wrt:
                _contract_tensor(ctx, n, phi[n], sl, active, updates, kernel, pseudo, predicted)
            del phi


def _scaled_in_place(tensor: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """factor · tensor, in place where the tensor owns its memory (a vmap result can be an expanded view of
    zeros, for a parameter the target ignores: then a copy)."""
    try:
        return tensor.mul_(factor)
    except RuntimeError:
        return tensor * factor


def _contract_tensor(ctx, n, phi_n, sl, active, updates, kernel, pseudo, predicted):
    """Add parameter tensor n's share of the step to the kept tensors for test chunk ``sl``."""
    # (X, O, n_p) and (units, n_p); not flatten(2)/flatten(1), which fail for 0-dim parameters
    J = phi_n.reshape(*phi_n.shape[:2], phi_n.shape[2:].numel())
    total = updates.unit_totals[n].reshape(-1)
    if ctx.keep_units:
        U = updates.units[n].reshape(updates.units[n].shape[0], -1)
        every_row = active.numel() == U.shape[0]
        U_active = U if every_row else U.index_select(0, active)
    if ctx.per_coordinate:
        rows = slice(ctx.offsets[n], ctx.offsets[n] + J.shape[2])
        if ctx.keep_units:
            part = torch.einsum("xoj,aj->jxao", J, U_active)
            if every_row:
                kernel[rows, sl] += part
            else:
                kernel[rows, sl].index_add_(2, active, part)
        else:
            kernel[rows, sl] += torch.einsum("xoj,j->jxo", J, total)
    else:
        g = _row_group(ctx, n)
        if ctx.keep_units:
            part = torch.einsum("xoj,aj->xao", J, U_active)
            if every_row:
                kernel[g, sl] += part
            else:
                kernel[g, sl].index_add_(1, active, part)
        else:
            kernel[g, sl] += J @ total
    direction = total
    for p, pseudo_update in updates.pseudo.items():
        R = pseudo_update[n].reshape(-1)
        if ctx.per_coordinate:
            pseudo[p][rows, sl] += torch.einsum("xoj,j->jxo", J, R)
        else:
            pseudo[p][g, sl] += J @ R
        direction = direction + R
    predicted[sl] += J @ direction


def _non_finite_message(ctx, t, point, pairs, moving, delta) -> str:
    """Name the first node where the derivative along Δθ_t is NaN or Inf (found only once one occurred)."""
    tangent = {n: delta[n].unsqueeze(0) for n in moving}
    bad = [alpha for alpha, _ in pairs if not bool(torch.isfinite(_directional(ctx, point(alpha), tangent)).all())]
    where = f"at α = {bad[0]:.6g}" if bad else f"at one of the nodes α ∈ {[round(a, 6) for a, _ in pairs]}"
    return (f"step {t}: the derivative of the decomposed quantity is NaN or Inf {where} on the segment "
            "θ_t → θ_{t+1} (is h differentiable there?)")


# ==================================================================================== the driver
@dataclass
class BlockResult:
    """What a block of steps produced: kept tensors (per step, or summed), per-step certificates and facts."""

    kernel: "_StepAccumulator"
    pseudo: dict[str, "_StepAccumulator"]
    residuals: list[torch.Tensor]
    replay_errors: list[float]
    nodes: list[int]
    probe_nodes: list[int]
    modes: list[str]
    scales: list[float]
    f_start: torch.Tensor
    f_end: torch.Tensor


def run_block(ctx: DecompositionContext, stage: RuleStage, steps: range, progress: bool | None = False) -> BlockResult:
    """Steps ``steps`` (consecutive) from the stage's current state: rule, replay check, contraction, residual."""
    theta_t = ctx.theta(steps.start)
    f_t = ctx.targets(theta_t)
    out = BlockResult(_StepAccumulator(ctx.keep_steps), {p: _StepAccumulator(ctx.keep_steps) for p in stage.pseudo_names},
                      [], [], [], [], [], [], f_t, f_t)
    for t in progress_bar(steps, enabled=progress, desc="decomposing steps", unit="step"):
        theta_next = ctx.theta(t + 1)
        updates = stage.advance(t, theta_t, theta_next)
        f_next = ctx.targets(theta_next)
        if t in ctx.selected:
            part = contract_step(ctx, t, theta_t, theta_next, f_t, f_next, updates)
        else:  # Appendix G.2: this step is left out; its change stays in the residual
            part = StepContribution(None, {p: None for p in updates.pseudo}, torch.zeros_like(f_t), 0, 0, "skipped")
        replay_error, scale = updates.replay_error, updates.gradient_scale
        del updates
        out.residuals.append(f_next - f_t - part.predicted)
        out.kernel.add(part.kernel)
        for p in stage.pseudo_names:
            out.pseudo[p].add(part.pseudo[p])
        out.replay_errors.append(replay_error)
        out.nodes.append(part.nodes)
        out.probe_nodes.append(part.probe_nodes)
        out.modes.append(part.mode)
        out.scales.append(scale)
        theta_t, f_t = theta_next, f_next
    out.f_end = f_t
    return out


def decompose_trajectory(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    train_data: Any,
    test_inputs: torch.Tensor,
    *,
    theorem: str,
    h: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    activation: str | None = None,
    test_labels: torch.Tensor | None = None,
    partition: Any = None,
    decompose_steps: Iterable[int] | None = None,
    penalty: Callable[[Params], torch.Tensor] | None = None,
    quadrature: Quadrature | AdaptiveQuadrature | None = None,
    keep: Iterable[str] = DEFAULT_KEEP,
    params: str | Mapping[str, str] = "tensor",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    replay_rtol: float | None = None,
    test_chunk_size: int | None = None,
    train_chunk_size: int | None = None,
    vectorize: bool = True,
    contraction: str = "auto",
    memory_budget: int | str | None = None,
    progress: bool | None = None,
    distributed: Any = None,
    node_chunk_size: int | None = None,
) -> Influence:
    """Decompose f(x; θ_N) − f(x; θ_0) over the trajectory with the trajectory's optimizer rule.

    Called by the theorem functions (:func:`~explaind_math.decompose_adamw_training`, …), which
    document the arguments; ``theorem`` is the label stored in the result. Beyond those:

    * ``h``, ``test_labels``: decompose h(f(x; θ_N), y) (Corollary 3.3 i), h applied at every node;
    * ``activation``: decompose the output of that named submodule instead of f (Corollary 3.3 ii);
    * ``partition``: units are groups of samples (Corollary F.2): ``"all"``, a mapping or sequence
      id → group label, or a callable id → label; buffers are kept per group (memory K·D);
    * ``penalty``: R(θ) added to the training loss (an L1/L2 term on the parameters): its gradient is
      its own pseudo-unit, reported as ``result.penalty``;
    * ``decompose_steps``: compute Φ_t only for these steps (Appendix G.2); the others contribute
      nothing, and the result is labelled an estimate;
    * ``contraction``: ``"auto"`` (per step, the cheaper of JVPs and Jacobians by counted costs: the same
      choice on every run), ``"measured"`` (by costs timed on this machine), ``"jvp"`` or ``"jacobian"``
      (MATH.md §11; every choice is exact);
    * ``memory_budget``: bytes (or ``"4GiB"``) for the working set: test inputs, training samples and JVP
      tangents are processed in chunks that fit, the Jacobian is formed one parameter group at a time
      if one test input's does not fit, and a :class:`~explaind_math.contraction.MemoryBudgetError` names
      what cannot fit at all; ``test_chunk_size`` / ``train_chunk_size`` set the chunks directly;
    * ``node_chunk_size``: quadrature nodes whose Jacobians are formed in one vmapped call (default: up
      to 16 while their stacked Jacobians fit 32 MiB, or the memory budget's share; 1: one call per node);
    * ``progress``: a tqdm progress bar over the steps (None: when tqdm is installed and stderr is a
      terminal; :mod:`~explaind_math.progress`);
    * ``distributed``: ``True`` (the default process group) or a process group of ``torch.distributed``:
      the steps are split into one block per rank, the buffers are carried across blocks exactly by a
      scan, and every rank returns the whole result (:mod:`~explaind_math.distributed`).
    """
    ctx = _build_context(
        model, trajectory, loss_fn, train_data, test_inputs, h=h, activation=activation, test_labels=test_labels,
        partition=partition, decompose_steps=decompose_steps, penalty=penalty, quadrature=quadrature, keep=keep,
        params=params, dtype=dtype, device=device, replay_rtol=replay_rtol, test_chunk_size=test_chunk_size,
        train_chunk_size=train_chunk_size, vectorize=vectorize, contraction=contraction, memory_budget=memory_budget,
        node_chunk_size=node_chunk_size)
    if distributed not in (None, False):
        from .distributed import run_distributed

        block, steps = run_distributed(ctx, distributed, progress)
    else:
        block = run_block(ctx, RuleStage(ctx), range(trajectory.num_steps), progress)
        steps = list(range(trajectory.num_steps))
    return _finish(ctx, block, steps, theorem)


def _build_context(model, trajectory, loss_fn, train_data, test_inputs, *, h, activation, test_labels, partition,
                   decompose_steps, penalty, quadrature, keep, params, dtype, device, replay_rtol, test_chunk_size,
                   train_chunk_size, vectorize, contraction, memory_budget, node_chunk_size=None):
    # the test and output axes are always kept: the certificate is per prediction
    keep = tuple(dict.fromkeys((*keep, "test", "output")))
    unknown = set(keep) - set(AXES)
    if unknown:
        raise ExplaindError(f"unknown axes {sorted(unknown)} in keep; axes are {AXES}")
    if "param" not in keep:
        params = "all"
    quadrature = quadrature or gauss_legendre(8)
    trajectory.check_model(model)
    check_deterministic_modules(model, "decomposition")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    dtype = dtype or trajectory.dtype
    # the replay is as precise as the coarser of the recorded run and the computation
    coarser = trajectory.dtype if torch.finfo(trajectory.dtype).eps >= torch.finfo(dtype).eps else dtype
    rtol = default_replay_rtol(coarser) if replay_rtol is None else replay_rtol

    names = trajectory.parameter_names
    shapes = trajectory.shapes()
    fm = FunctionalModel(model, names, dtype=dtype, device=device, h=h, activation=activation)
    data = TrainingData(train_data, dtype=dtype, device=device)
    xs_test = test_inputs.to(device)
    xs_test = xs_test.to(dtype) if xs_test.is_floating_point() else xs_test
    if test_labels is None:
        y_test = torch.zeros(xs_test.shape[0], device=device)
    else:
        y_test = torch.as_tensor(test_labels).to(device)
        if y_test.shape[0] != xs_test.shape[0]:
            raise ExplaindError(f"{xs_test.shape[0]} test inputs but {y_test.shape[0]} test labels")
    labels, group_index = _param_groups(params, names, shapes)
    units, row_of = _unit_rows(trajectory.units(), partition)
    selected = set(range(trajectory.num_steps)) if decompose_steps is None else {int(t) for t in decompose_steps}
    if not selected & set(range(trajectory.num_steps)):
        raise ExplaindError("decompose_steps selects none of the trajectory's steps")
    numel = {n: torch.Size(shapes[n]).numel() for n in names}
    offsets, acc = {}, 0
    for n in names:
        offsets[n], acc = acc, acc + numel[n]

    theta_0 = {n: trajectory.parameters[0][n].to(device=device, dtype=dtype) for n in names}
    # O and the forward cost F of one test input, from one evaluation
    probe_out = fm.target(theta_0, xs_test[0], y_test[0]).detach()
    num_outputs = probe_out.numel()
    forward_ad, why = fm.supports_forward_ad(theta_0, xs_test[0], y_test[0])
    if not forward_ad and contraction == "jvp":
        raise ExplaindError(f"contraction='jvp' needs forward-mode AD through the model, which PyTorch refuses here "
                            f"({why}); use contraction='auto' or 'jacobian'")
    costs = None  # None: Jacobians only (no forward-mode AD, or a parameter axis per coordinate)
    if contraction in ("auto", "measured") and group_index is not None and forward_ad:
        if contraction == "measured":
            sample = slice(0, min(xs_test.shape[0], 8, test_chunk_size or 8))
            costs = measure_path_costs(fm, theta_0, xs_test[sample], y_test[sample], num_outputs)
        else:
            costs = PathCosts.counted(sum(numel.values()))
    itemsize = torch.empty((), dtype=dtype).element_size()
    X, U = xs_test.shape[0], len(units)
    kept_shape = [len(labels), X, num_outputs] + ([U] if "unit" in keep else [])
    steps_kept = trajectory.num_steps if "step" in keep else 1
    kept_bytes = steps_kept * (bytes_of(kept_shape, itemsize) + 3 * bytes_of(kept_shape[:3], itemsize))
    group_sizes = ([numel[n] for n in names] if group_index is None else
                   [sum(numel[n] for n, g in zip(names, group_index) if g == k) for k in range(len(labels))])
    plan = plan_contraction(
        contraction=contraction, memory_budget=parse_memory_budget(memory_budget), itemsize=itemsize,
        num_params=sum(numel.values()), largest_group=max(group_sizes), num_units=U, num_test=X,
        num_outputs=num_outputs, largest_batch=trajectory.largest_batch(),
        kept_bytes=kept_bytes, per_coordinate=group_index is None, costs=costs,
        test_chunk_size=test_chunk_size, train_chunk_size=train_chunk_size, node_chunk_size=node_chunk_size)
    ctx = DecompositionContext(
        trajectory=trajectory, fm=fm, data=data, loss_fn=loss_fn, penalty=penalty, names=names, shapes=shapes,
        xs_test=xs_test, y_test=y_test, labels=labels, group_index=group_index, units=units, row_of=row_of,
        keep=keep, quadrature=quadrature, plan=plan, selected=selected, dtype=dtype, device=device, rtol=rtol,
        eps_train=torch.finfo(trajectory.dtype).eps, rescaling=bool(trajectory.metadata.get("gradient_rescaling", False)),
        vectorize=vectorize, num_outputs=num_outputs, grouped_units=partition is not None, forward_ad=forward_ad,
        offsets=offsets)
    return ctx


def _finish(ctx: DecompositionContext, block: BlockResult, steps: list[int], theorem: str) -> Influence:
    """The :class:`Influence` of a run of blocks, with its axes, labels and notes."""
    keep_units = ctx.keep_units
    axes = tuple(a for a in AXES if (a != "step" or ctx.keep_steps) and (a != "unit" or keep_units))
    # per-step tensors are (rows, X, [U,] O); the canonical order puts the unit axis after test
    result = Influence(
        kernel=block.kernel.result(), kernel_axes=axes, regularization=block.pseudo["regularization"].result(),
        carried_state=block.pseudo["carried_state"].result() if "carried_state" in block.pseudo else None,
        penalty=block.pseudo["penalty"].result() if "penalty" in block.pseudo else None,
        f_initial=block.f_start, f_final=block.f_end, step_residuals=torch.stack(block.residuals),
        replay_errors=block.replay_errors, steps=steps, param_labels=ctx.labels, units=ctx.units,
        quadrature=ctx.quadrature.describe(), nodes_per_step=block.nodes, theorem=theorem,
        gradient_scales=block.scales if ctx.rescaling else None,
        probe_nodes_per_step=block.probe_nodes, contraction_per_step=block.modes, plan=ctx.plan.describe(),
        unit_kind="partition groups" if ctx.grouped_units else "training samples",
    )
    skipped = sorted(set(range(ctx.trajectory.num_steps)) - ctx.selected)
    if skipped:
        result.estimated = True
        result.notes.append(
            f"step subsampling: Φ_t computed for {ctx.trajectory.num_steps - len(skipped)} of "
            f"{ctx.trajectory.num_steps} steps; the {len(skipped)} others contribute nothing, so the "
            "reconstruction is an approximation (Appendix G.2) and the residual measures what they carried"
        )
    return _drop_axes(result, ctx.keep)


def _drop_axes(result: Influence, keep: Sequence[str]) -> Influence:
    """Remove the parameter axis (computed as one group "all") when the caller did not keep it."""
    if "param" in keep:
        return result
    k_dim = result.kernel_axes.index("param")
    r_dim = result.regularization_axes.index("param")
    result.kernel = result.kernel.sum(k_dim)
    result.regularization = result.regularization.sum(r_dim)
    if result.carried_state is not None:
        result.carried_state = result.carried_state.sum(r_dim)
    if result.penalty is not None:
        result.penalty = result.penalty.sum(r_dim)
    result.kernel_axes = tuple(a for a in result.kernel_axes if a != "param")
    result.param_labels = []
    return result


def _replay_check(t, total: Params, delta: Params, theta_t: Params, theta_next: Params, rtol: float,
                  eps_train: float, updated: set[str], update_rounding: Mapping[str, float]) -> float:
    """Raise :class:`ReplayMismatchError` unless |Σ_u update_t(u) − Δθ_t| ≤ rtol·max|Δθ_t| + 16 ε max|θ| + r,
    with r the first-order effect of the gradients' rounding on this update (``update_rounding``: it
    matters where a preconditioner amplifies a gradient that is zero up to rounding, e.g. Adam on an
    attention key bias, which softmax ignores)."""
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
            )
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


class _StepAccumulator:
    """Per-step tensors (rows, X, [U,] O), stacked on a leading step axis, or their running sum when the step
    axis is not kept. A step left out by ``decompose_steps`` is None: zeros when stacked, skipped in the sum."""

    def __init__(self, keep_steps: bool):
        self.keep_steps, self.steps, self.total = keep_steps, [], None

    def add(self, value: torch.Tensor | None) -> None:
        if self.keep_steps:
            self.steps.append(value)
        elif value is not None:
            self.total = value.clone() if self.total is None else self.total.add_(value)

    def result(self) -> torch.Tensor:
        if not self.keep_steps:
            return self.total
        template = next(v for v in self.steps if v is not None)
        return torch.stack([torch.zeros_like(template) if v is None else v for v in self.steps])


def _global_gradient_scale(summed: Params | None, penalty_grad: Params | None,
                           recorded: Mapping[str, torch.Tensor] | None) -> float:
    """max |g| over every parameter tensor of the step: the recorded ``.grad`` when there is one, else
    Σ_i w_i ∇ℓ_i (+ ∇R). The scale of the backward pass's rounding."""
    if recorded is not None:
        tensors = list(recorded.values())
    else:
        tensors = [_with_penalty(summed, penalty_grad, n) for n in summed]
    return max((float(g.abs().max()) for g in tensors if g.numel()), default=0.0)


def _abs_linear(coefficient, x: torch.Tensor) -> torch.Tensor:
    """|A| ⊙ x for x ≥ 0 and a number or tensor A; |A(x)| for a callable linear map (a bound's estimate)."""
    if callable(coefficient):
        return coefficient(x).abs()
    if isinstance(coefficient, torch.Tensor):
        return coefficient.abs() * x
    return abs(coefficient) * x


def _penalty_gradient(penalty, theta_t: Params) -> Params:
    """∇R(θ_t) of a loss penalty R(θ) (an L1/L2 term inside the training loss), its own pseudo-unit."""

    def value(p: Params) -> torch.Tensor:
        out = penalty(p)
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise ExplaindError("penalty(params) must return a scalar tensor R(θ)")
        return out.reshape(())

    return {n: v.detach() for n, v in torch.func.grad(value)(theta_t).items()}


def _with_penalty(summed: Params, penalty_grad: Params | None, n: str) -> torch.Tensor:
    return summed[n] if penalty_grad is None else summed[n] + penalty_grad[n]


def _recover_gradient_scale(t: int, summed: Params, penalty_grad: Params | None,
                            recorded: Mapping[str, torch.Tensor], rtol: float, eps_train: float) -> float:
    """c_t with recorded .grad = c_t (Σ_i w_i ∇ℓ_i + ∇R), by least squares over every recorded tensor,
    then verified coordinate-wise: clipping by norm passes, clipping by value or a non-additive loss fails."""
    num, den = 0.0, 0.0
    pairs = []
    for n, g in recorded.items():
        ours = _with_penalty(summed, penalty_grad, n)
        g = g.to(device=ours.device, dtype=ours.dtype)
        num += float((g * ours).sum())
        den += float((ours * ours).sum())
        pairs.append((n, ours, g))
    if den == 0.0:
        return 1.0
    c = num / den
    overall = _global_gradient_scale(None, None, recorded)
    for n, ours, g in pairs:
        scale = float(g.abs().max()) if g.numel() else 0.0
        err = float((c * ours - g).abs().max()) if g.numel() else 0.0
        if err > rtol * max(scale, 1e-30) + 64 * eps_train * overall + 1e-300:
            raise ReplayMismatchError(
                f"step {t}, parameter {n!r}: the gradient seen by optimizer.step() is not one scalar multiple "
                f"c_t = {c:.6g} of Σ_i w_i ∇ℓ_i (off by {err:.3e}, max |grad| {scale:.3e}). Clipping by norm over "
                "all trained parameters is exact; clipping by value (clip_grad_value_) or per-tensor clipping is "
                "not linear in the per-sample gradients and cannot be decomposed exactly"
            )
    return c


def _check_gradient_sum(t: int, summed: Params, penalty_grad: Params | None,
                        recorded: Mapping[str, torch.Tensor], rtol: float, eps_train: float) -> None:
    """The recorded ``.grad`` must equal Σ_i w_{t,i} ∇ℓ_i(θ_t) (+ ∇R): pinpoints a non-additive loss.
    Rounding is measured against the largest gradient of any tensor: a tensor whose true gradient is zero
    (an attention key bias) holds only the rounding of the others' backward pass."""
    overall = _global_gradient_scale(None, None, recorded)
    for n, g in recorded.items():
        ours = _with_penalty(summed, penalty_grad, n)
        g = g.to(device=ours.device, dtype=ours.dtype)
        scale = float(g.abs().max()) if g.numel() else 0.0
        err = float((ours - g).abs().max()) if g.numel() else 0.0
        if err > rtol * max(scale, 1e-30) + 64 * eps_train * overall + 1e-300:
            raise ReplayMismatchError(
                f"step {t}, parameter {n!r}: the gradient seen by optimizer.step() differs from "
                f"Σ_i w_i ∇ℓ_i over the recorded ids by {err:.3e} (max |grad| {scale:.3e}). The training loss "
                "must be a weighted sum of per-sample losses loss_fn(model(x_i), y_i) over exactly the ids given "
                "to record_batch (weights as recorded), plus the penalty if one is given; for clip_grad_norm_ "
                "record with TrajectoryRecorder(..., gradient_rescaling=True)."
            )
