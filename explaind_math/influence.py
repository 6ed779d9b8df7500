"""The result of a decomposition: the tensor of influences and its certificate (MATH.md §5).

    f_o(x; θ_N) = f_o(x; θ_0) + Σ_{t,j,i} I[t, j, x, i, o] + Σ_{t,j} Ψ[t, j, x, o] (+ Σ_{t,j} Ξ[t, j, x, o])
                  (+ penalty) (+ gradient rounding)

I (``kernel``) is the kernel influence of training samples, Ψ (``regularization``) the weight-decay
influence, Ξ (``carried_state``) the influence of optimizer state that existed before the first
recorded step (absent when the recording started from a fresh optimizer). When the run recorded its
gradients, ``gradient_rounding`` is the influence of their rounding: the recorded ``.grad`` minus the exact
Σ_i w_i ∇ℓ_i (a float32 backward pass rounds; Adam amplifies it where a true gradient is near zero), fed through
the optimizer like a unit. Axes the caller did not
keep are summed already. The residual f(x; θ_N) − reconstruction is always computed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import torch

from .errors import ExplaindError
from .query_range import position

__all__ = ["Influence", "AXES"]

#: canonical axis order of the kernel tensor; Ψ and Ξ have the same order without "unit"
AXES = ("step", "param", "test", "unit", "output")


@dataclass
class Influence:
    """Kernel influence I, regularization influence Ψ, carried-state influence Ξ, and the certificate.

    Attributes:
        kernel: I with axes ``kernel_axes`` (a sub-sequence of :data:`AXES`).
        regularization: Ψ with the same axes minus ``"unit"``.
        carried_state: Ξ like Ψ, or None when no optimizer state was carried in.
        penalty: influence of a loss penalty R(θ) inside the training loss (like Ψ), or None.
        gradient_rounding: influence (like Ψ) of δ_t = recorded ``.grad`` − Σ_i w_{t,i} ∇ℓ_i(θ_t), the rounding of
            the gradient the optimizer used, or None (no gradients recorded). Only steps whose max|δ_t| is within
            that rounding's scale (64 ε max|g_t|) feed it; a larger δ_t is warned about and left in the residual.
        gradient_scales: per step, the recovered factor c_t of gradient clipping by norm (or None).
        f_initial, f_final: f(x; θ_0) and f(x; θ_N), shape (test, output).
        step_residuals: r_t(x) = f(θ_{t+1}) − f(θ_t) − Φ_t(x) Σ_u update_t(u), shape (step, test, output).
        replay_errors: per step, max over parameters of |Σ_u update_t(u) − Δθ_t| / max |Δθ_t|.
        steps, param_labels, units: coordinates of the kept axes.
        nodes_per_step: quadrature nodes of the rule used for each step (adaptive rules vary per step).
        probe_nodes_per_step: for adaptive rules, the JVP evaluations spent choosing each step's nodes (along
            Δθ_t; or, when the step takes the JVP path and its directions fit one batch, along every kept
            direction, and then the accepted probes are the contraction: nothing is evaluated twice).
        contraction_per_step: per step, ``"jvp"`` or ``"jacobian"`` (MATH.md §11), or ``"skipped"``.
        plan: the contraction plan (chunk sizes, memory budget) as text.
        unit_kind: what the unit axis indexes: ``"training samples"``, or ``"partition groups"`` (Corollary F.2).
        accumulation: ``"forward"`` (the §4 recursion) or ``"adjoint"`` (MATH.md §12), and
            ``accumulation_reason`` why it was chosen. With the adjoint the step axis, when kept, is
            ``"origin_step"``: the step at which a unit's gradient was computed, summed over every later update
            that carried it (the update step t of §5 is ``"step"``); both sum to the same totals.
        breakpoints_per_step, nodes_per_input_per_step: with the piecewise rule (MATH.md §13, the default),
            per step and test input the breakpoints α* found and the nodes used (``nodes_per_step`` is then
            the most any input used); empty for the other rules.
        steps_over_tolerance: the steps where a piece's certified residual stayed over the rule's tolerance
            (a non-smooth operation the rule does not bracket); a warning names the likely operation.
        estimated: True only when some part is an estimate (never for the exact theorems).
    """

    kernel: torch.Tensor
    kernel_axes: tuple[str, ...]
    regularization: torch.Tensor
    carried_state: torch.Tensor | None
    f_initial: torch.Tensor
    f_final: torch.Tensor
    step_residuals: torch.Tensor
    replay_errors: list[float]
    steps: list[int]
    param_labels: list[str]
    units: list[int]
    quadrature: str
    nodes_per_step: list[int]
    theorem: str
    estimated: bool = False
    notes: list[str] = field(default_factory=list)
    penalty: torch.Tensor | None = None
    gradient_rounding: torch.Tensor | None = None
    gradient_scales: list[float] | None = None
    unit_kind: str = "training samples"
    probe_nodes_per_step: list[int] = field(default_factory=list)
    contraction_per_step: list[str] = field(default_factory=list)
    plan: str = ""
    accumulation: str = "forward"
    accumulation_reason: str = ""
    breakpoints_per_step: list[list[list[float]]] = field(default_factory=list)
    nodes_per_input_per_step: list[list[int]] = field(default_factory=list)
    steps_over_tolerance: list[int] = field(default_factory=list)

    # ------------------------------------------------------------------ axes
    @property
    def regularization_axes(self) -> tuple[str, ...]:
        return tuple(a for a in self.kernel_axes if a != "unit")

    def _sum_to(self, tensor: torch.Tensor, axes: Sequence[str], keep: Sequence[str]) -> torch.Tensor:
        unknown = set(keep) - set(axes)
        if unknown:
            raise ValueError(f"cannot keep axes {sorted(unknown)}: this result has axes {list(axes)}")
        dims = [i for i, a in enumerate(axes) if a not in keep]
        return tensor.sum(dim=dims) if dims else tensor

    def kernel_sum(self, keep: Sequence[str] = ("test", "output")) -> torch.Tensor:
        """Accumulated kernel influence I(S, J, X, U, O) keeping the named axes (in canonical order)."""
        return self._sum_to(self.kernel, self.kernel_axes, keep)

    def regularization_sum(self, keep: Sequence[str] = ("test", "output")) -> torch.Tensor:
        """Accumulated regularization influence Ψ keeping the named axes."""
        return self._sum_to(self.regularization, self.regularization_axes, keep)

    def carried_state_sum(self, keep: Sequence[str] = ("test", "output")) -> torch.Tensor:
        """Accumulated influence Ξ of optimizer state carried in from before the recording (zero if none)."""
        if self.carried_state is None:
            return torch.zeros_like(self.regularization_sum(keep))
        return self._sum_to(self.carried_state, self.regularization_axes, keep)

    def penalty_sum(self, keep: Sequence[str] = ("test", "output")) -> torch.Tensor:
        """Accumulated influence of the loss penalty R(θ) (zero if none was given)."""
        if self.penalty is None:
            return torch.zeros_like(self.regularization_sum(keep))
        return self._sum_to(self.penalty, self.regularization_axes, keep)

    def gradient_rounding_sum(self, keep: Sequence[str] = ("test", "output")) -> torch.Tensor:
        """Accumulated influence of the recorded gradients' rounding (zero if no gradients were recorded)."""
        if self.gradient_rounding is None:
            return torch.zeros_like(self.regularization_sum(keep))
        return self._sum_to(self.gradient_rounding, self.regularization_axes, keep)

    def pseudo_unit_sum(self, keep: Sequence[str] = ("test", "output")) -> torch.Tensor:
        """Ψ + Ξ + penalty + gradient rounding: everything that is not attributable to training samples."""
        return (self.regularization_sum(keep) + self.carried_state_sum(keep) + self.penalty_sum(keep)
                + self.gradient_rounding_sum(keep))

    # ------------------------------------------------------------------ certificate
    @property
    def reconstruction(self) -> torch.Tensor:
        """f(x; θ_0) + Σ I + Σ Ψ + Σ Ξ (+ penalty, + gradient rounding), shape (test, output)."""
        return self.f_initial + self.kernel_sum() + self.pseudo_unit_sum()

    @property
    def residual(self) -> torch.Tensor:
        """f(x; θ_N) − reconstruction, shape (test, output); always computed."""
        return self.f_final - self.reconstruction

    @property
    def max_residual(self) -> float:
        return float(self.residual.abs().max())

    @property
    def relative_residual(self) -> float:
        """max over (x, o) of |residual| / (1 + |f(x; θ_N) − f(x; θ_0)|), the tests' measure."""
        scale = 1.0 + (self.f_final - self.f_initial).abs()
        return float((self.residual.abs() / scale).max())

    @property
    def max_replay_error(self) -> float:
        return max(self.replay_errors) if self.replay_errors else 0.0

    # ------------------------------------------------------------------ common questions
    def per_parameter(self, test: int | None = None, output: int | None = None) -> dict[str, float]:
        """Kernel + regularization (+ carried) influence per parameter label, summed over steps and units
        (for one test input/output, or summed over all)."""
        if "param" not in self.kernel_axes:
            raise ValueError("this result summed the parameter axis; decompose with 'param' in keep")
        total = self.kernel_sum(("param", "test", "output")) + self.pseudo_unit_sum(("param", "test", "output"))
        if test is not None:
            test = position(test, total.shape[1], "test")
            total = total[:, test : test + 1]
        if output is not None:
            output = position(output, total.shape[2], "output")
            total = total[..., output : output + 1]
        return {label: float(v) for label, v in zip(self.param_labels, total.sum(dim=(1, 2)))}

    def top_units(self, test: int, output: int, k: int = 5) -> list[tuple[int, float]]:
        """The k training samples with the largest |Σ_{t,j} I[t, j, x, i, o]| for one prediction."""
        if "unit" not in self.kernel_axes:
            raise ValueError("this result summed the unit axis; decompose with 'unit' in keep")
        scores = self.kernel_sum(("test", "unit", "output"))
        test, output = position(test, scores.shape[0], "test"), position(output, scores.shape[2], "output")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ExplaindError(f"k must be a positive integer (how many units), got {k!r}")
        scores = scores[test, :, output]
        order = torch.argsort(scores.abs(), descending=True)[:k]
        return [(self.units[int(i)], float(scores[i])) for i in order]

    def to_numpy(self) -> dict:
        """Plain numpy arrays of every tensor, with the axis names and coordinates."""
        out = {
            "kernel": self.kernel.detach().cpu().numpy(),
            "kernel_axes": self.kernel_axes,
            "regularization": self.regularization.detach().cpu().numpy(),
            "f_initial": self.f_initial.detach().cpu().numpy(),
            "f_final": self.f_final.detach().cpu().numpy(),
            "residual": self.residual.detach().cpu().numpy(),
            "steps": list(self.steps),
            "param_labels": list(self.param_labels),
            "units": list(self.units),
        }
        if self.carried_state is not None:
            out["carried_state"] = self.carried_state.detach().cpu().numpy()
        if self.penalty is not None:
            out["penalty"] = self.penalty.detach().cpu().numpy()
        if self.gradient_rounding is not None:
            out["gradient_rounding"] = self.gradient_rounding.detach().cpu().numpy()
        return out

    def summary(self) -> str:
        lines = [
            f"{self.theorem}: {len(self.steps)} steps, {len(self.units)} {self.unit_kind}, "
            f"{self.f_final.shape[0]} test inputs × {self.f_final.shape[1]} outputs",
            f"kernel influence axes {self.kernel_axes}, shape {tuple(self.kernel.shape)}",
            f"quadrature {self.quadrature}, {sum(self.nodes_per_step)} nodes in all"
            + (f" (+ {sum(self.probe_nodes_per_step)} JVP probes choosing them)" if any(self.probe_nodes_per_step) else ""),
            f"max replay error (relative) {self.max_replay_error:.3e}",
            f"certified residual: max |f(θ_N) − reconstruction| = {self.max_residual:.3e} "
            f"(relative {self.relative_residual:.3e})",
        ]
        if self.gradient_rounding is not None:
            lines.append(f"influence of the recorded gradients' rounding (pseudo-unit): max "
                         f"{float(self.gradient_rounding_sum().abs().max()):.3e}")
        if self.estimated:
            lines.append("ESTIMATED: " + "; ".join(self.notes))
        return "\n".join(lines)

    def __repr__(self) -> str:
        return f"Influence({self.theorem}, axes={self.kernel_axes}, residual={self.max_residual:.2e})"
