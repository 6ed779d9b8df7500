"""A block of consecutive steps, decomposed from a given state of the rule's buffers (MATH.md §1, §4, §11).

Each step is a chain of value objects: :class:`~explaind_math.engine.gradients.StepGradients` →
:class:`~explaind_math.engine.buffers.UnitUpdates` (replay-checked) →
:class:`~explaind_math.engine.contract.StepContribution`, certified by the step residual
r_t = f(θ_{t+1}) − f(θ_t) − Φ_t Δθ_t. The single-process run is one block from the initial state; the
distributed run gives each rank one block, from the state carried in by the scan.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..progress import progress_bar
from .buffers import RuleBuffers
from .context import DecompositionContext
from .contract import StepContribution, contract_step
from .gradients import step_gradients

__all__ = ["BlockResult", "StepAccumulator", "run_block"]


class StepAccumulator:
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


@dataclass
class BlockResult:
    """What a block of steps produced: kept tensors (per step, or summed), per-step certificates and facts."""

    kernel: StepAccumulator
    pseudo: dict[str, StepAccumulator]
    residuals: list[torch.Tensor]
    replay_errors: list[float]
    nodes: list[int]
    probe_nodes: list[int]
    modes: list[str]
    scales: list[float]
    f_start: torch.Tensor
    f_end: torch.Tensor
    step_nodes: list = field(default_factory=list)  # per step: the piecewise rule's StepNodes (or None)

    @classmethod
    def empty(cls, ctx: DecompositionContext, pseudo_names, f_start: torch.Tensor) -> "BlockResult":
        return cls(StepAccumulator(ctx.keep_steps), {p: StepAccumulator(ctx.keep_steps) for p in pseudo_names},
                   [], [], [], [], [], [], f_start, f_start)

    def append(self, part: StepContribution, residual: torch.Tensor, replay_error: float, scale: float) -> None:
        self.residuals.append(residual)
        self.kernel.add(part.kernel)
        for p, acc in self.pseudo.items():
            acc.add(part.pseudo[p])
        self.replay_errors.append(replay_error)
        self.nodes.append(part.nodes)
        self.probe_nodes.append(part.probe_nodes)
        self.modes.append(part.mode)
        self.scales.append(scale)
        self.step_nodes.append(part.step_nodes)


def run_block(ctx: DecompositionContext, buffers: RuleBuffers, steps: range, progress: bool | None = False) -> BlockResult:
    """Steps ``steps`` (consecutive) from the buffers' current state: gradients, the rule's updates and their
    replay check, the contraction, the residual."""
    theta_t = ctx.theta(steps.start)
    f_t = ctx.target_values(theta_t)
    out = BlockResult.empty(ctx, buffers.pseudo_names, f_t)
    for t in progress_bar(steps, enabled=progress, desc="decomposing steps", unit="step"):
        theta_next = ctx.theta(t + 1)
        updates = buffers.advance(t, step_gradients(ctx, t, theta_t), theta_t, theta_next)
        f_next = ctx.target_values(theta_next)
        if t in ctx.selected:
            part = contract_step(ctx, t, theta_t, theta_next, f_t, f_next, updates)
        else:  # Appendix G.2: this step is left out; its change stays in the residual
            part = StepContribution(None, {p: None for p in updates.pseudo}, torch.zeros_like(f_t), 0, 0, "skipped")
        replay_error, scale = updates.replay_error, updates.gradient_scale
        del updates
        out.append(part, f_next - f_t - part.predicted, replay_error, scale)
        theta_t, f_t = theta_next, f_next
    out.f_end = f_t
    return out
