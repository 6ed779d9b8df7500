"""Evaluations at (test input, α) pairs: the piecewise rule's probes and its contraction (MATH.md §1, §13).

With nodes per test input (:mod:`explaind_math.piecewise`) a node α belongs to one input x. Each function
here takes P pairs (x_p, α_p) and evaluates at θ_t + α_p Δθ_t on x_p, vmapped over the pairs with the
parameters stacked (P copies of the moving tensors, so pairs go in chunks of :func:`pair_chunk`); inputs
that share a node share one call batched over those inputs (no parameter copies).
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.func import jvp, vmap

from ..kinks import KinkRecorder
from .context import DecompositionContext
from .plan import chunks

__all__ = ["pair_chunk", "kink_values", "probe_values", "target_at_pairs", "jacobian_at_pairs",
           "directional_at_pairs", "by_shared_node", "PAIR_CHUNK_BYTES"]

Params = dict[str, torch.Tensor]

#: bytes of stacked parameter copies per vmapped call over pairs
PAIR_CHUNK_BYTES = 2 ** 26


def pair_chunk(ctx: DecompositionContext) -> int:
    """Pairs per vmapped call: the stacked parameters stay under :data:`PAIR_CHUNK_BYTES` (1 to 256)."""
    itemsize = torch.empty((), dtype=ctx.dtype).element_size()
    size = sum(ctx.numel(n) for n in ctx.names) * itemsize
    return max(1, min(256, PAIR_CHUNK_BYTES // max(1, size)))


def _points(ctx: DecompositionContext, seg, alphas: Sequence[float]) -> Params:
    return seg.points(list(alphas))


def _over_pairs(ctx: DecompositionContext, seg, alphas, inputs, one, outputs: int = 1):
    """vmap of ``one(params, x, label)`` over the pairs, in chunks; results concatenated on the pair axis."""
    parts = []
    for s in chunks(len(alphas), pair_chunk(ctx)):
        index = torch.as_tensor(list(inputs[s]), dtype=torch.long, device=ctx.xs_test.device)
        parts.append(vmap(one)(_points(ctx, seg, alphas[s]), ctx.xs_test[index], ctx.y_test[index]))
    if outputs == 1:
        return torch.cat(parts) if len(parts) > 1 else parts[0]
    return tuple(torch.cat([p[k] for p in parts]) for k in range(outputs))


def _split(ctx: DecompositionContext, seg, alphas, inputs):
    """The stacked points of the pairs, split into moving (differentiated) and fixed tensors, and the inputs."""
    points = seg.points(list(alphas))
    moving = {n: points[n] for n in seg.moving}
    fixed = {n: v for n, v in points.items() if n not in moving}
    index = torch.as_tensor(list(inputs), dtype=torch.long, device=ctx.xs_test.device)
    return moving, fixed, ctx.xs_test[index], ctx.y_test[index]


def _along_delta(seg, moving: Params) -> Params:
    """Δθ_t as a tangent of the stacked points (one copy per pair, a broadcast view)."""
    return {n: seg.delta[n].expand_as(v) for n, v in moving.items()}


def kink_values(ctx: DecompositionContext, seg, alphas, inputs, suspects: dict, derivative: bool = True):
    """(z, dz/dα, gate), each (P, E), of every switching function of the target at the pairs (None: no kink).
    dz/dα is one JVP along Δθ_t of the computation vmapped over the pairs (zero without forward-mode AD, or
    without ``derivative``: then sign changes alone bracket the roots)."""
    recorded, seen = [False], {}

    def flat(params, x, y):
        with KinkRecorder() as recorder:
            ctx.fm.target(params, x, y)
        seen.update(recorder.suspects)
        z, gate = recorder.flat()
        recorded[0] = recorded[0] or z is not None
        if z is None:
            z = torch.zeros(1, dtype=ctx.dtype, device=ctx.device)
            return z, z
        return z, gate

    parts = []
    for s in chunks(len(alphas), pair_chunk(ctx)):
        moving, fixed, xs, ys = _split(ctx, seg, list(alphas)[s], list(inputs)[s])

        def over_pairs(m):
            return vmap(flat)({**fixed, **m}, xs, ys)

        if ctx.forward_ad and derivative:
            (z, gate), (dz, _) = jvp(over_pairs, (moving,), (_along_delta(seg, moving),))
        else:
            z, gate = over_pairs(moving)
            dz = torch.zeros_like(z)
        parts.append((z.detach(), dz.detach(), gate.detach()))
    suspects.update(seen)
    if not recorded[0]:
        return None
    return tuple(torch.cat([p[k] for p in parts]) for k in range(3))


def probe_values(ctx: DecompositionContext, seg, alphas, inputs, tangents: Params) -> torch.Tensor:
    """Φ(x_p; θ(α_p)) v_k for the K stacked ``tangents``: (P, K, O), JVPs of the target vmapped over the pairs
    and over the tangents (or from the Jacobian without forward-mode AD)."""
    if not ctx.forward_ad:
        def one(params, x, y):
            return ctx.fm.directional_by_jacobian(params, x.unsqueeze(0), y.unsqueeze(0), tangents)[:, 0]

        return _over_pairs(ctx, seg, list(alphas), list(inputs), one).detach()
    parts = []
    for s in chunks(len(alphas), pair_chunk(ctx)):
        moving, fixed, xs, ys = _split(ctx, seg, list(alphas)[s], list(inputs)[s])

        def over_pairs(m):
            return vmap(ctx.fm.target)({**fixed, **m}, xs, ys)

        def along(tangent: Params) -> torch.Tensor:
            return jvp(over_pairs, (moving,), ({n: tangent[n].expand_as(v) for n, v in moving.items()},))[1]

        # the K tangents in one vmapped JVP (one pass of the model's Python, not K), in the plan's tangent
        # chunks as ctx.fm.directional takes them
        values = vmap(along, chunk_size=ctx.plan.tangent_chunk)({n: tangents[n] for n in moving})
        parts.append(values.transpose(0, 1).detach())
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def target_at_pairs(ctx: DecompositionContext, seg, alphas, inputs) -> torch.Tensor:
    """f(x_p; θ(α_p)): (P, O)."""
    return _over_pairs(ctx, seg, list(alphas), list(inputs), lambda p, x, y: ctx.fm.target(p, x, y)).detach()


def _pair_jacobians(ctx: DecompositionContext, seg, part, wrt: list[str]) -> Params:
    """∂_θ f(x_p; θ(α_p)) for the tensors ``wrt`` at the pairs ``part`` [(x, α, w)]: name → (O, P, *shape)
    (outputs first, as the VJPs give them), by one VJP per output o of the target vmapped over the pairs
    (pairs are independent, so the cotangent e_o on every pair gives every pair's gradient of output o)."""
    points = seg.points([a for _, a, _ in part])
    sub = {n: points[n] for n in wrt}
    fixed = {n: v for n, v in points.items() if n not in sub}
    index = torch.as_tensor([x for x, _, _ in part], dtype=torch.long, device=ctx.xs_test.device)
    xs, ys = ctx.xs_test[index], ctx.y_test[index]
    out, pullback = torch.func.vjp(lambda q: vmap(ctx.fm.target)({**fixed, **q}, xs, ys), sub)
    O = out.shape[1]
    basis = torch.eye(O, dtype=out.dtype, device=out.device).unsqueeze(1).expand(O, out.shape[0], O)
    (grads,) = vmap(pullback)(basis)
    return {n: grads[n].detach() for n in wrt}


def _row_weights(ctx: DecompositionContext, rows: Sequence[int], weights: Sequence[float], num_rows: int) -> torch.Tensor:
    """S (num_rows, P) with S[rows[p], p] = w_p: Σ_p w_p J_p into row rows[p] is S @ J (one matrix product;
    index_add_ of the weighted values was ~1 ms per tensor and call on CPU)."""
    S = ctx.zeros((num_rows, len(rows)))
    S[torch.as_tensor(list(rows), device=ctx.device), torch.arange(len(rows), device=ctx.device)] = \
        torch.as_tensor(list(weights), dtype=ctx.dtype, device=ctx.device)
    return S


def by_shared_node(triples) -> tuple[dict[float, list[tuple[int, float]]], list[tuple[int, float, float]]]:
    """Split (input, α, w) into nodes shared by ≥ 2 inputs (α → [(input, w)]) and single pairs."""
    shared: dict[float, list[tuple[int, float]]] = {}
    for x, a, w in triples:
        shared.setdefault(a, []).append((x, w))
    single = [(x, a, w) for a, rows in shared.items() if len(rows) == 1 for x, w in rows]
    return {a: rows for a, rows in shared.items() if len(rows) > 1}, single


def jacobian_at_pairs(ctx: DecompositionContext, seg, triples, inputs: Sequence[int], wrt: list[str]) -> Params:
    """Φ_t(x) = Σ_{(x, α, w)} w ∂_θ f(x; θ(α)) for the test inputs ``inputs`` (rows in that order) and the
    tensors ``wrt``: name → (len(inputs), O, *shape)."""
    row = {x: r for r, x in enumerate(inputs)}
    mine = [(x, a, w) for x, a, w in triples if x in row]
    shared, single = by_shared_node(mine)
    phi = {n: ctx.zeros((len(inputs), ctx.num_outputs, *ctx.shapes[n])) for n in wrt}
    # shared nodes with the same inputs (on a smooth model: every node, every input) go plan.node_chunk at a
    # time into one vmapped call, as a fixed rule's nodes do
    by_inputs: dict[tuple, list] = {}
    for a, rows in shared.items():
        by_inputs.setdefault(tuple(x for x, _ in rows), []).append((a, [wt for _, wt in rows]))
    for group_inputs, nodes in by_inputs.items():
        index = torch.as_tensor(list(group_inputs), device=ctx.xs_test.device)
        target = torch.as_tensor([row[x] for x in group_inputs], device=ctx.device)
        batch = ctx.plan.node_chunk if len(nodes) >= ctx.plan.min_node_batch else 1
        for part in chunks(len(nodes), batch):
            alphas = [a for a, _ in nodes[part]]
            W = torch.tensor([w for _, w in nodes[part]], dtype=ctx.dtype, device=ctx.device)  # (K, inputs)
            J = ctx.fm.jacobians_at(seg.points(alphas), ctx.xs_test[index], ctx.y_test[index], wrt=wrt)
            for n in wrt:
                value = J[n].detach()  # (K, inputs, O, *shape)
                summed = torch.einsum("km,kmr->mr", W, value.reshape(*value.shape[:2], -1))
                phi[n].index_add_(0, target, summed.reshape(len(group_inputs), *phi[n].shape[1:]))
    for s in chunks(len(single), pair_chunk(ctx)):
        part = single[s]
        J = _pair_jacobians(ctx, seg, part, wrt)
        S = _row_weights(ctx, [row[x] for x, _, _ in part], [wt for _, _, wt in part], len(inputs))
        for n in wrt:
            value = J[n]  # (O, P, *shape): the product batched over outputs, S @ (P, numel) per output
            summed = S @ value.reshape(value.shape[0], value.shape[1], -1)  # (O, X, numel)
            phi[n] += summed.transpose(0, 1).reshape(phi[n].shape)
    return phi


def directional_at_pairs(ctx: DecompositionContext, seg, triples, tangents: Params) -> torch.Tensor:
    """Φ_t(x) v_k = Σ_{(x, α, w)} w J(x; θ(α)) v_k for the K stacked tangents, every test input: (K, X, O)."""
    K = next(iter(tangents.values())).shape[0]
    out = ctx.zeros((K, ctx.xs_test.shape[0], ctx.num_outputs))
    shared, single = by_shared_node(triples)
    for a, rows in shared.items():
        index = torch.as_tensor([x for x, _ in rows], device=ctx.xs_test.device)
        jv = ctx.fm.directional(seg.point(a), ctx.xs_test[index], ctx.y_test[index], tangents,
                                tangent_chunk_size=ctx.plan.tangent_chunk).detach()
        w = torch.tensor([wt for _, wt in rows], dtype=ctx.dtype, device=ctx.device)
        out.index_add_(1, index.to(ctx.device), jv * w.reshape(1, -1, 1))
    if single:
        alphas, inputs = [a for _, a, _ in single], [x for x, _, _ in single]
        values = probe_values(ctx, seg, alphas, inputs, tangents)  # (P, K, O)
        w = torch.tensor([wt for _, _, wt in single], dtype=ctx.dtype, device=ctx.device)
        index = torch.as_tensor(inputs, device=ctx.device)
        out.index_add_(1, index, (values * w.reshape(-1, 1, 1)).transpose(0, 1))
    return out
