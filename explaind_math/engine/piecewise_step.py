"""One step of the piecewise rule: breakpoints per test input, then pieces (MATH.md §13, :mod:`..piecewise`).

The probes are JVPs at (test input, α) pairs (:mod:`.pairs`) along two tangents: Δθ_t, whose integral the
exact step residual certifies, and v = Σ_{u, g} s_{u,g} update_t(u)|_g with random signs s (seeded by the
step), a combination of the kept directions in which units that cancel in Δθ_t do not cancel; the rule's
agreement test on v bounds the per-entry quadrature error (:func:`~explaind_math.piecewise.select_piecewise_nodes`).
"""

from __future__ import annotations

import warnings

import torch

from ..piecewise import StepNodes, find_breakpoints, select_piecewise_nodes
from .context import DecompositionContext
from .pairs import kink_values, probe_values, target_at_pairs

__all__ = ["piecewise_step_nodes", "entry_direction", "record_piecewise_nodes", "QuadratureToleranceWarning"]

Params = dict[str, torch.Tensor]


def entry_direction(ctx: DecompositionContext, seg, updates) -> Params:
    """v = Σ_{u, g} s_{u,g} update_t(u)|_g (random signs s = ±1 per unit and parameter group, seeded by t),
    plus the pseudo-units' updates with their own signs; Δθ_t with random signs per group when the updates
    are not at hand."""
    generator = torch.Generator().manual_seed(104729 + seg.t)
    per_unit = None if updates is None else getattr(updates, "per_unit", getattr(updates, "units", None))
    groups = {n: (ctx.offsets.get(n, 0) if ctx.per_coordinate else ctx.row_of_tensor(n)) for n in seg.moving}
    signs_of_group: dict = {}
    v = {}
    for n in seg.moving:
        g = groups[n]
        if g not in signs_of_group:
            count = 1 if per_unit is None else per_unit[n].shape[0]
            signs_of_group[g] = (torch.randint(0, 2, (count + 8,), generator=generator) * 2 - 1).to(ctx.dtype)
        signs = signs_of_group[g].to(ctx.device)
        if per_unit is None:
            v[n] = signs[0] * seg.delta[n]
            continue
        units = per_unit[n]
        v[n] = torch.tensordot(signs[: units.shape[0]], units, dims=1)
        for k, pseudo in enumerate(updates.pseudo.values()):
            v[n] = v[n] + signs[-1 - k] * pseudo[n]
    return v


def piecewise_step_nodes(ctx: DecompositionContext, seg, f_t: torch.Tensor, f_next: torch.Tensor,
                         updates=None) -> StepNodes:
    """The piecewise rule's nodes for step ``seg.t``: breakpoints of every test input, then Gauss–Legendre on
    each piece with the order it needs; pieces left over tolerance and the suspects seen are recorded."""
    rule = ctx.quadrature
    X = ctx.xs_test.shape[0]
    eps = torch.finfo(ctx.dtype).eps
    suspects: dict = {}
    kink_probe = lambda alphas, inputs, derivative=True: kink_values(  # noqa: E731
        ctx, seg, alphas, inputs, suspects, derivative)
    breakpoints, kink_evaluations = find_breakpoints(rule, kink_probe, X, eps)

    def find_inside(x: int, a: float, b: float) -> list[float]:
        """A missed breakpoint of input x in (a, b): the search again, on a grid of that piece."""
        def probe_x(alphas, idx, derivative=True):
            return kink_probe(alphas, [x for _ in idx], derivative)

        found, _ = find_breakpoints(rule, probe_x, 1, eps, (a, b))
        return found[0]

    v = entry_direction(ctx, seg, updates)
    tangents = {n: torch.stack([seg.delta[n], v[n]]) for n in seg.moving}
    nodes = select_piecewise_nodes(
        rule, lambda alphas, inputs: probe_values(ctx, seg, alphas, inputs, tangents),
        lambda alphas, inputs: target_at_pairs(ctx, seg, alphas, inputs), f_t, f_next, breakpoints, find_inside)
    nodes.probe_evaluations += kink_evaluations
    nodes.suspects = suspects
    return nodes


class QuadratureToleranceWarning(UserWarning):
    """Some step's certified residual stayed over the piecewise rule's tolerance (a non-smooth operation the
    rule does not bracket): the decomposition is reported, with the steps named, but is not exact there."""


def over_tolerance_message(steps: list[int], worst: tuple, suspects: dict[str, int]) -> str:
    """The warning for steps left over tolerance, naming the likely operation."""
    t, x, a, b, residual = worst
    where = (f"steps {steps}: a piece's certified residual |f(θ(b)) − f(θ(a)) − Φ_[a,b] Δθ_t| stayed over the "
             f"tolerance after bisection (largest {residual:.2e}, step {t}, test input {x}, α ∈ [{a:.6g}, {b:.6g}])")
    if suspects:
        named = ", ".join(f"{n} (×{c})" for n, c in sorted(suspects.items(), key=lambda kv: -kv[1]))
        return (f"{where}; the model's forward calls non-smooth operations the piecewise rule cannot bracket: "
                f"{named} — a jump or kink there breaks the path identity (MATH.md §1, §13)")
    return (f"{where}; no known non-smooth torch call was seen, so the likely cause is a custom autograd function "
            "or an operation outside torch's Python API with a kink or jump along θ_t → θ_{t+1}")


def record_piecewise_nodes(result, step_nodes: list, steps: list[int]) -> None:
    """Copy the piecewise rule's breakpoints, nodes per input and over-tolerance steps into ``result``
    (an :class:`~explaind_math.influence.Influence`); warn with the likely operation when a step failed."""
    if not any(n is not None for n in step_nodes):
        return
    result.breakpoints_per_step = [n.breakpoints if n is not None else [] for n in step_nodes]
    result.nodes_per_input_per_step = [n.nodes_per_input if n is not None else [] for n in step_nodes]
    failed = [(steps[k] if k < len(steps) else k, n) for k, n in enumerate(step_nodes)
              if n is not None and n.over_tolerance]
    result.steps_over_tolerance = [t for t, _ in failed]
    if not failed:
        return
    suspects: dict[str, int] = {}
    for _, n in failed:
        for name, count in n.suspects.items():
            suspects[name] = suspects.get(name, 0) + count
    worst = max(((t, *piece) for t, n in failed for piece in n.over_tolerance), key=lambda row: row[-1])
    message = over_tolerance_message(result.steps_over_tolerance, worst, suspects)
    result.notes.append(message)
    warnings.warn(message, QuadratureToleranceWarning, stacklevel=4)
