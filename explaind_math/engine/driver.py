"""The driver shared by every theorem: rule × target × contraction over the steps (MATH.md §1-§5, §11).

    trajectory ─▶ gradients (per unit) ─▶ the rule's buffers (§4) ─▶ unit updates (replay check)
               └▶ quadrature nodes (§1) ─▶ contraction on the kept axes (§11) ─▶ Influence (+ residual)

:func:`decompose_trajectory` builds the context (:mod:`.context`), runs the steps as one block
(:mod:`.blocks`), or as one block per rank (:mod:`.distributed`, which carries the buffers across blocks by
an exact scan), and assembles the :class:`~explaind_math.influence.Influence`. The driver knows no ranks.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from ..errors import ExplaindError
from ..influence import AXES, Influence
from ..quadrature import Quadrature
from ..trajectory import Trajectory
from .blocks import BlockResult, run_block
from .buffers import RuleBuffers
from .context import DecompositionContext, build_context
from .adjoint import run_adjoint
from .distributed import run_adjoint_distributed, run_distributed
from .options import DecompositionOptions, resolve_options
from .piecewise_step import record_piecewise_nodes
from .plan import count_accumulation_costs, plan_adjoint

__all__ = ["decompose_trajectory", "choose_accumulation"]

Params = dict[str, torch.Tensor]


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
    options: DecompositionOptions | None = None,
    **option_keywords: Any,
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
    * ``options`` (or its fields as keywords): how the exact answer is computed —
      :class:`~explaind_math.engine.options.DecompositionOptions` documents every field.
    """
    opts = resolve_options(options, option_keywords)
    origin = _check_kept_steps(opts)
    if origin:  # the context keeps "step"; the result names it origin_step (MATH.md §12)
        opts = opts.replace(keep=tuple("step" if a == "origin_step" else a for a in opts.keep),
                            accumulation="adjoint")
    ctx = build_context(model, trajectory, loss_fn, train_data, test_inputs, h=h, activation=activation,
                        test_labels=test_labels, partition=partition, decompose_steps=decompose_steps,
                        penalty=penalty, options=opts)
    accumulation, why = choose_accumulation(ctx, opts.accumulation)
    distributed, progress = opts.distributed, opts.progress
    if accumulation == "adjoint":
        ctx = replace(ctx, plan=plan_adjoint(**ctx.plan_inputs, batch_contraction=opts.batch_contraction,
                                             forward_ad=ctx.forward_ad))
        if distributed not in (None, False):
            block, steps = run_adjoint_distributed(ctx, distributed, progress)
        else:
            block, steps = run_adjoint(ctx, progress)
    elif distributed not in (None, False):
        block, steps = run_distributed(ctx, distributed, progress)
    else:
        block = run_block(ctx, RuleBuffers(ctx), range(trajectory.num_steps), progress)
        steps = list(range(trajectory.num_steps))
    result = _finish(ctx, block, steps, theorem)
    result.accumulation, result.accumulation_reason = accumulation, why
    if accumulation == "adjoint":
        _note_batch_contraction(result, getattr(block, "batch_modes", []))
    if origin:
        result.kernel_axes = tuple("origin_step" if a == "step" else a for a in result.kernel_axes)
    return result


def _note_batch_contraction(result: Influence, modes: list[str]) -> None:
    """How the adjoint contracted the steps' batches (``batch_contraction``, MATH.md §12), as a note."""
    counts = {m: modes.count(m) for m in ("gradients", "jvp") if m in modes}
    if counts:
        ways = {"gradients": "per-sample gradients (vmap∘grad) and a matrix product",
                "jvp": "forward-mode JVPs of the per-sample losses (no per-sample gradients)"}
        result.notes.append("batch contraction: " + "; ".join(f"{ways[m]} at {c} step{'s' * (c != 1)}"
                                                              for m, c in counts.items()))


def _check_kept_steps(opts: DecompositionOptions) -> bool:
    """Whether the origin step (MATH.md §12) is kept; refuses keeping it with the update step, or with forward."""
    if "origin_step" not in opts.keep:
        if "step" in opts.keep and opts.accumulation == "adjoint":
            raise ExplaindError("accumulation='adjoint' sums over the update step t: keep 'origin_step' (the step "
                                "whose gradient carried the influence, MATH.md §12) instead of 'step', or leave it out")
        return False
    if "step" in opts.keep:
        raise ExplaindError("keep holds both 'step' (the update step t, MATH.md §5) and 'origin_step' (the step "
                            "whose gradient carried the influence, §12): keep one of them")
    if opts.accumulation == "forward":
        raise ExplaindError("keep=('origin_step', …) is the adjoint's step axis (MATH.md §12); it needs "
                            "accumulation='adjoint' or 'auto', not 'forward' (whose step axis is 'step')")
    return True


def choose_accumulation(ctx: DecompositionContext, requested: str) -> tuple[str, str]:
    """``"forward"`` (§4) or ``"adjoint"`` (§12) and why: the adjoint needs the unit axis kept and the update step
    summed; ``"auto"`` takes it when the forward recursion does not fit the memory budget or its counted cost
    (then memory) is lower (:func:`~explaind_math.engine.plan.count_accumulation_costs`)."""
    allowed = ctx.keep_units and (not ctx.keep_steps or requested == "adjoint")
    if requested == "adjoint" and not ctx.keep_units:
        raise ExplaindError("accumulation='adjoint' attributes to units: keep 'unit' (MATH.md §12); with units "
                            "summed the forward JVPs along Δθ_t are already cheapest")
    if requested == "forward" or not allowed:
        if ctx.plan is None:
            raise ctx.forward_plan_error
        return "forward", "requested" if requested == "forward" else "the kept axes need the forward recursion"
    if requested == "adjoint":
        return "adjoint", "requested"
    if ctx.plan is None:
        return "adjoint", f"the forward recursion does not fit the memory budget ({ctx.forward_plan_error})"
    i = ctx.plan_inputs
    quadrature = ctx.quadrature if isinstance(ctx.quadrature, Quadrature) else ctx.quadrature.rules[0]
    costs = count_accumulation_costs(
        num_steps=ctx.trajectory.num_steps, batch=i["largest_batch"], num_units=i["num_units"], num_test=i["num_test"],
        num_outputs=i["num_outputs"], num_params=i["num_params"], num_groups=ctx.num_rows,
        nodes=len(quadrature.on_interval(0.0, 1.0)), pseudo=len(ctx.pseudo_names), itemsize=i["itemsize"],
        kept_bytes=i["kept_bytes"])
    return ("adjoint" if costs.adjoint_is_cheaper() else "forward"), costs.describe()


def _finish(ctx: DecompositionContext, block: BlockResult, steps: list[int], theorem: str) -> Influence:
    """The :class:`Influence` of a run of blocks, with its axes, labels and notes."""
    keep_units = ctx.keep_units
    axes = tuple(a for a in AXES if (a != "step" or ctx.keep_steps) and (a != "unit" or keep_units))
    # per-step tensors are (rows, X, [U,] O); the canonical order puts the unit axis after test
    result = Influence(
        kernel=block.kernel.result(), kernel_axes=axes, regularization=block.pseudo["regularization"].result(),
        carried_state=block.pseudo["carried_state"].result() if "carried_state" in block.pseudo else None,
        penalty=block.pseudo["penalty"].result() if "penalty" in block.pseudo else None,
        gradient_rounding=(block.pseudo["gradient_rounding"].result() if "gradient_rounding" in block.pseudo
                           else None),
        f_initial=block.f_start, f_final=block.f_end, step_residuals=torch.stack(block.residuals),
        replay_errors=block.replay_errors, steps=steps, param_labels=ctx.labels, units=ctx.unit_labels,
        quadrature=ctx.quadrature.describe(), nodes_per_step=block.nodes, theorem=theorem,
        gradient_scales=block.scales if ctx.rescaling else None,
        probe_nodes_per_step=block.probe_nodes, contraction_per_step=block.modes, plan=ctx.plan.describe(),
        unit_kind="partition groups" if ctx.grouped_units else "training samples",
    )
    record_piecewise_nodes(result, getattr(block, "step_nodes", []), steps)
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
    if result.gradient_rounding is not None:
        result.gradient_rounding = result.gradient_rounding.sum(r_dim)
    result.kernel_axes = tuple(a for a in result.kernel_axes if a != "param")
    result.param_labels = []
    return result
