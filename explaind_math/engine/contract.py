"""The contraction of a step: Φ_t(x) against the kept directions, by JVPs or by Jacobians (MATH.md §1, §5, §11).

Per step t: the quadrature nodes (a fixed rule's, or those an adaptive rule accepts by probing the exact step
residual with JVPs along Δθ_t), then Φ_t(x) = Σ_k w_k ∂_θ f(x; θ_t + α_k Δθ_t) contracted with every kept
direction — each unit's update (or their sum) and each pseudo-unit's, restricted to each parameter group —
by whichever exact way the plan finds cheaper:

* ``"jvp"``: one forward-mode JVP per direction and node;
* ``"jacobian"``: the Jacobian at every node, integrated to Φ_t(x), then one contraction per parameter tensor
  chosen from :data:`KERNEL_CONTRACTIONS` by the kept axes (parameter rows per coordinate or per group;
  units kept or summed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ..errors import NonFiniteError
from ..piecewise import PiecewiseQuadrature, StepNodes
from ..quadrature import Quadrature, select_nodes
from .buffers import UnitUpdates
from .context import DecompositionContext
from .pairs import directional_at_pairs, jacobian_at_pairs
from .piecewise_step import piecewise_step_nodes
from .plan import chunks, scaled_in_place

__all__ = ["StepContribution", "contract_step", "directional", "contract_tensor", "KERNEL_CONTRACTIONS",
           "Segment", "step_nodes", "integrated_jacobian"]

Params = dict[str, torch.Tensor]


@dataclass
class StepContribution:
    """One step's kept influences: kernel (rows, X, [U,] O), pseudo-units (rows, X, O), Φ_t Σ_u update_t(u)."""

    kernel: torch.Tensor | None
    pseudo: dict[str, torch.Tensor | None]
    predicted: torch.Tensor
    nodes: int
    probe_nodes: int
    mode: str
    step_nodes: StepNodes | None = None  # the piecewise rule's nodes and breakpoints per test input


class Segment:
    """The segment θ_t(α) = θ_t + α Δθ_t of step t (MATH.md §1) and the tensors that move along it."""

    def __init__(self, ctx: DecompositionContext, t: int, theta_t: Params, theta_next: Params):
        self.ctx, self.t, self.theta_t = ctx, t, theta_t
        self.delta = {n: theta_next[n] - theta_t[n] for n in ctx.names}
        updated = set(ctx.trajectory.steps[t].updated)
        self.moving = [n for n in ctx.names if n in updated]

    def point(self, alpha: float) -> Params:
        return {n: self.theta_t[n] + alpha * self.delta[n] for n in self.ctx.names}

    def points(self, alphas: Sequence[float]) -> Params:
        """θ_t + α_k Δθ_t stacked on a leading axis k."""
        a = torch.tensor(alphas, dtype=self.ctx.dtype, device=self.ctx.device)
        return {n: self.theta_t[n] + a.reshape(-1, *([1] * self.theta_t[n].dim())) * self.delta[n]
                for n in self.ctx.names}


@dataclass
class KeptTensors:
    """The kept tensors of one step, filled by the contraction: kernel, pseudo-units, Φ_t Δθ_t."""

    kernel: torch.Tensor
    pseudo: dict[str, torch.Tensor]
    predicted: torch.Tensor

    @classmethod
    def zeros(cls, ctx: DecompositionContext, pseudo_names) -> "KeptTensors":
        X, O, rows = ctx.xs_test.shape[0], ctx.num_outputs, ctx.num_rows
        kernel_shape = (rows, X, len(ctx.unit_labels), O) if ctx.keep_units else (rows, X, O)
        return cls(ctx.zeros(kernel_shape), {p: ctx.zeros((rows, X, O)) for p in pseudo_names}, ctx.zeros((X, O)))

    def all_finite(self) -> bool:
        return all(bool(torch.isfinite(v).all()) for v in (self.kernel, self.predicted, *self.pseudo.values()))


def _choose_mode(ctx: DecompositionContext, seg: Segment, updates: UnitUpdates) -> tuple[str, list, torch.Tensor | None]:
    """The contraction of this step by counted cost (MATH.md §11): the mode, the groups, the active unit rows."""
    active = updates.active if ctx.keep_units else None
    n_active = int(active.numel()) if active is not None else 1
    groups = sorted({ctx.row_of_tensor(n) for n in seg.moving}) if not ctx.per_coordinate else []
    n_pseudo = len(updates.pseudo)
    directions = len(groups) * (n_active + n_pseudo)
    macs = ctx.num_outputs * sum(ctx.numel(n) for n in seg.moving) * (
        (n_active + n_pseudo + 1) if ctx.keep_units else (n_pseudo + 2))
    return ctx.plan.mode_for_step(directions, ctx.num_outputs, macs), groups, active


def _select_nodes(ctx: DecompositionContext, seg: Segment, batches, f_t, f_next,
                  updates: UnitUpdates | None = None) -> tuple[list | StepNodes, int, dict | None]:
    """The quadrature nodes (α_k, w_k) of this step: a fixed rule's, or an adaptive rule's chosen by probing
    the exact residual with JVPs. When every kept direction fits one JVP batch, the probes ARE the
    contraction (their sum over directions is Φ Σ_u update_t(u)): their values are returned as well. The
    piecewise rule (MATH.md §13) gives nodes per test input (a :class:`StepNodes`)."""
    if isinstance(ctx.quadrature, PiecewiseQuadrature) and seg.moving:
        nodes = piecewise_step_nodes(ctx, seg, f_t, f_next, updates)
        return nodes, nodes.probe_evaluations, None
    if isinstance(ctx.quadrature, Quadrature) or not seg.moving:
        rule = ctx.quadrature if isinstance(ctx.quadrature, Quadrature) else ctx.quadrature.rules[0]
        return rule.on_interval(0.0, 1.0), 0, None
    fused = None
    if batches is not None and len(batches) == 1:
        fused, tangents = {}, batches[0][1].get()

        def probe(alphas):
            values = directional_at(ctx, seg, alphas, tangents)  # (k, K, X, O)
            fused.update(zip(alphas, values))
            return values.sum(1)
    else:
        tangent = {n: seg.delta[n].unsqueeze(0) for n in seg.moving}

        def probe(alphas):
            return directional_at(ctx, seg, alphas, tangent)[:, 0]

    pairs, probe_nodes = select_nodes(ctx.quadrature, probe, lambda a: ctx.target_values(seg.point(a)), f_t, f_next)
    return pairs, probe_nodes, fused


def contract_step(ctx: DecompositionContext, t: int, theta_t: Params, theta_next: Params, f_t: torch.Tensor,
                  f_next: torch.Tensor, updates: UnitUpdates) -> StepContribution:
    """Step t's kept influences: the nodes, then the cheapest exact contraction of Φ_t with the updates."""
    seg = Segment(ctx, t, theta_t, theta_next)
    mode, groups, active = _choose_mode(ctx, seg, updates)
    batches = jvp_batches(ctx, seg.moving, groups, active, updates) if mode == "jvp" and seg.moving else None
    out = KeptTensors.zeros(ctx, updates.pseudo)
    pairs, probe_nodes, fused = _select_nodes(ctx, seg, batches, f_t, f_next, updates)
    if seg.moving:
        if fused is not None:
            jv = sum(w * fused[alpha] for alpha, w in pairs)
            scatter_jvp(batches[0][0], jv, slice(None), out)
        elif mode == "jvp":
            contract_by_jvp(ctx, seg, pairs, batches, out)
        else:
            contract_by_jacobian(ctx, seg, pairs, active, updates, out)
    if not out.all_finite():
        raise NonFiniteError(non_finite_message(ctx, seg, pairs))
    if isinstance(pairs, StepNodes):  # nodes per test input: the step's count is the largest
        return StepContribution(out.kernel, out.pseudo, out.predicted, max(pairs.nodes_per_input), probe_nodes,
                                mode, pairs)
    return StepContribution(out.kernel, out.pseudo, out.predicted, len(pairs), probe_nodes, mode)


def directional_at(ctx: DecompositionContext, seg: Segment, alphas: Sequence[float], tangents: Params) -> torch.Tensor:
    """Φ(α_k) v for every node α_k at once: (k, K, X, O). With forward-mode AD the nodes are one vmapped call
    (the per-call overhead of torch.func is paid once per order, not once per node); under a memory budget,
    one node at a time (vmap would hold k working sets at once)."""
    if not ctx.forward_ad or len(alphas) == 1 or ctx.plan.budget is not None:
        return torch.stack([directional(ctx, seg.point(a), tangents) for a in alphas])
    return torch.func.vmap(lambda p: directional(ctx, p, tangents))(seg.points(alphas))


def directional(ctx: DecompositionContext, params: Params, tangents: Params, sl: slice | None = None) -> torch.Tensor:
    """Φ(α) v for stacked tangents v (K, X, O) at one point, over all test inputs (in chunks) or ``sl``."""
    slices = [sl] if sl is not None else chunks(ctx.xs_test.shape[0], ctx.plan.test_chunk)
    if ctx.forward_ad:
        parts = [ctx.fm.directional(params, ctx.xs_test[s], ctx.y_test[s], tangents,
                                    tangent_chunk_size=ctx.plan.tangent_chunk).detach() for s in slices]
    else:  # the target has no forward-mode AD: the adaptive rules' probes go through the Jacobian
        parts = [ctx.fm.directional_by_jacobian(params, ctx.xs_test[s], ctx.y_test[s], tangents).detach()
                 for s in slices]
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


def jvp_batches(ctx, moving, groups, active, updates) -> list[tuple[list, Params]]:
    """The kept directions of a step, in batches of at most ``plan.tangent_chunk``: each unit's update (or
    their sum) restricted to each parameter group, and each pseudo-unit's restricted likewise. Returns
    [(blocks, tangents)] with blocks (group, pseudo name or None, unit rows or None) and the stacked
    tangents (K_batch, *shape) per moving parameter; tangents are built when a batch is reached."""
    shapes = ctx.shapes
    group_names = {g: [n for n in moving if ctx.row_of_tensor(n) == g] for g in groups}
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
                out[n] = updates.per_unit[n].index_select(0, rows)
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


def scatter_jvp(batch, jv: torch.Tensor, sl: slice, out: KeptTensors) -> None:
    """Add the integrated JVPs ``jv`` (K_batch, X_chunk, O) of one batch of directions to the kept tensors."""
    out.predicted[sl] += jv.sum(0)
    k = 0
    for g, p, rows in batch:
        count = 1 if rows is None else rows.numel()
        part = jv[k:k + count]
        k += count
        if p is not None:
            out.pseudo[p][g, sl] += part[0]
        elif rows is None:
            out.kernel[g, sl] += part[0]
        else:
            out.kernel[g, sl].index_add_(1, rows, part.transpose(0, 1))


def contract_by_jvp(ctx: DecompositionContext, seg: Segment, pairs, batches, out: KeptTensors) -> None:
    """Φ_t(x) v = Σ_k w_k J(x; θ_t(α_k)) v for every kept direction v (:func:`jvp_batches`): one
    forward-mode JVP per direction and node (with nodes per test input: per (input, node) pair)."""
    if isinstance(pairs, StepNodes):
        for batch, tangents in batches:
            scatter_jvp(batch, directional_at_pairs(ctx, seg, pairs.triples(), tangents.get()), slice(None), out)
        return
    for batch, tangents in batches:
        for sl in chunks(ctx.xs_test.shape[0], ctx.plan.test_chunk):
            jv = None
            for alpha, w in pairs:
                value = directional(ctx, seg.point(alpha), tangents.get(), sl)
                jv = value * w if jv is None else jv.add_(value, alpha=w)  # value may be an expanded view
            scatter_jvp(batch, jv, sl, out)


def _integrated_jacobian(ctx: DecompositionContext, seg: Segment, pairs, sl: slice, wrt: list[str]) -> Params:
    """Φ_t(x) = Σ_k w_k ∂_θ f(x; θ_t(α_k)) for test chunk ``sl`` and the tensors ``wrt``. The nodes are
    evaluated ``plan.node_chunk`` at a time in one vmapped call; the quadrature sum is accumulated in place
    (into the first node's Jacobian when nodes go one at a time). Nodes per test input: by pairs."""
    if isinstance(pairs, StepNodes):
        return jacobian_at_pairs(ctx, seg, pairs.triples(), list(range(ctx.xs_test.shape[0]))[sl], wrt)
    phi: Params = {}
    for nodes in chunks(len(pairs), ctx.plan.node_chunk if len(pairs) >= ctx.plan.min_node_batch else 1):
        alphas = [alpha for alpha, _ in pairs[nodes]]
        weights = [w for _, w in pairs[nodes]]
        if len(alphas) == 1:
            value = ctx.fm.jacobian(seg.point(alphas[0]), ctx.xs_test[sl], ctx.y_test[sl], wrt=wrt)
            part = {n: scaled_in_place(value[n].detach(), weights[0]) for n in wrt}
        else:
            value = ctx.fm.jacobians_at(seg.points(alphas), ctx.xs_test[sl], ctx.y_test[sl], wrt=wrt)
            w = torch.tensor(weights, dtype=ctx.dtype, device=ctx.device)
            part = {n: torch.tensordot(w, value[n].detach(), dims=1) for n in wrt}
        del value
        for n in wrt:
            phi[n] = part[n] if n not in phi else phi[n].add_(part[n])
        del part
    return phi


def contract_by_jacobian(ctx: DecompositionContext, seg: Segment, pairs, active, updates: UnitUpdates,
                         out: KeptTensors) -> None:
    """Φ_t(x) per test chunk (one parameter group at a time when the plan says so), then every tensor's
    share I[j, x, u, o] = Φ_t(x)[o, j] update_t(u)[j] by :func:`contract_tensor`."""
    if ctx.plan.groupwise_jacobian:
        by_group: dict = {}
        for n in seg.moving:
            by_group.setdefault(n if ctx.per_coordinate else ctx.row_of_tensor(n), []).append(n)
        name_sets = list(by_group.values())
    else:
        name_sets = [seg.moving]
    for sl in chunks(ctx.xs_test.shape[0], ctx.plan.test_chunk):
        for wrt in name_sets:
            phi = _integrated_jacobian(ctx, seg, pairs, sl, wrt)
            for n in wrt:
                contract_tensor(ctx, n, phi.pop(n), sl, active, updates, out)


#: the contraction of Φ_t(x) (x, o, j) with the updates, keyed by (parameter axis, units kept): the einsum
#: of Φ with every active unit's update (a, j) or with their sum (j), and the axis of the result that
#: indexes units (None: units summed). The pseudo-units use the "units summed" entry.
KERNEL_CONTRACTIONS: dict[tuple[str, bool], tuple[str, int | None]] = {
    ("coordinate", True): ("xoj,aj->jxao", 2),
    ("coordinate", False): ("xoj,j->jxo", None),
    ("group", True): ("xoj,aj->xao", 1),
    ("group", False): ("xoj,j->xo", None),
}


def contract_tensor(ctx: DecompositionContext, n: str, phi_n: torch.Tensor, sl: slice, active,
                    updates: UnitUpdates, out: KeptTensors) -> None:
    """Add parameter tensor n's share of the step to the kept tensors for test chunk ``sl``:
    I[j, x, u, o] = Φ_t(x)[o, j] update_t(u)[j] (summed within the group of j, or per coordinate j)."""
    # (X, O, n_p) and (units, n_p); not flatten(2)/flatten(1), which fail for 0-dim parameters
    J = phi_n.reshape(*phi_n.shape[:2], phi_n.shape[2:].numel())
    axis = "coordinate" if ctx.per_coordinate else "group"
    rows = slice(ctx.offsets[n], ctx.offsets[n] + J.shape[2]) if ctx.per_coordinate else ctx.row_of_tensor(n)
    total = updates.unit_totals[n].reshape(-1)
    equation, unit_axis = KERNEL_CONTRACTIONS[axis, ctx.keep_units]
    target = out.kernel[rows, sl]
    if unit_axis is None:
        target += torch.einsum(equation, J, total)
    else:
        U = updates.per_unit[n].reshape(updates.per_unit[n].shape[0], -1)
        every_row = active.numel() == U.shape[0]
        part = torch.einsum(equation, J, U if every_row else U.index_select(0, active))
        if every_row:
            target += part
        else:
            target.index_add_(unit_axis, active, part)
    pseudo_equation = KERNEL_CONTRACTIONS[axis, False][0]
    direction = total
    for p, pseudo_update in updates.pseudo.items():
        R = pseudo_update[n].reshape(-1)
        out.pseudo[p][rows, sl] += torch.einsum(pseudo_equation, J, R)
        direction = direction + R
    out.predicted[sl] += J @ direction


def non_finite_message(ctx: DecompositionContext, seg: Segment, pairs) -> str:
    """Name the first node where the derivative along Δθ_t is NaN or Inf (found only once one occurred)."""
    tangent = {n: seg.delta[n].unsqueeze(0) for n in seg.moving}
    if isinstance(pairs, StepNodes):
        pairs = sorted({(a, w) for _, a, w in pairs.triples()})
    bad = [alpha for alpha, _ in pairs if not bool(torch.isfinite(directional(ctx, seg.point(alpha), tangent)).all())]
    where = f"at α = {bad[0]:.6g}" if bad else f"at one of the nodes α ∈ {[round(a, 6) for a, _ in pairs]}"
    return (f"step {seg.t}: the derivative of the decomposed quantity is NaN or Inf {where} on the segment "
            "θ_t → θ_{t+1} (is h differentiable there?)")


def step_nodes(ctx: DecompositionContext, seg: Segment, f_t: torch.Tensor, f_next: torch.Tensor) -> tuple[list, int]:
    """The quadrature nodes (α_k, w_k) of step t and the probes spent choosing them (an adaptive rule probes the
    exact residual along Δθ_t), for callers that need Φ_t itself (the adjoint, MATH.md §12)."""
    pairs, probe_nodes, _ = _select_nodes(ctx, seg, None, f_t, f_next)
    return pairs, probe_nodes


def integrated_jacobian(ctx: DecompositionContext, seg: Segment, pairs, sl: slice, wrt: list[str]) -> Params:
    """Φ_t(x) = Σ_k w_k ∂_θ f(x; θ_t(α_k)) for the test inputs ``sl`` and the tensors ``wrt``: name → (X_c, O, *shape)."""
    return _integrated_jacobian(ctx, seg, pairs, sl, wrt)
