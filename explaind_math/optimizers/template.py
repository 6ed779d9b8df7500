"""The template for optimizers that are linear in the gradients (MATH.md §4).

Let u range over units: training samples, plus the pseudo-units "weight decay" and "carried state"
(optimizer state that existed before the recording started). Per parameter tensor and step t, given
the recorded non-linear state (second moments, step counts, learning rates), an optimizer is a table

    buffer_t(u) = A_t ⊙ buffer_{t−1}(u) + C_t ⊙ grad_t(u)
    update_t(u) = −( D_t ⊙ buffer_t(u) + E_t ⊙ grad_t(u) )          with  Σ_u update_t(u) = θ_{t+1} − θ_t

where grad_t(i) = s · g_{t,i} for a training sample (s = −1 under ``maximize``), grad_t(decay) = κ_t θ_t
for coupled weight decay, and the decay unit also moves by −ρ_t θ_t directly (decoupled decay).
A, C, D, E are numbers, tensors (coordinate-wise) or callables (general linear maps).

The recurrence is written once, here: :func:`scale_buffer`, :func:`feed_buffer`, :func:`subtract_direct`
and :func:`subtract_buffered` are the kernels the engine runs (in place on tensors, by rows of a batch),
and :func:`buffer_step` / :func:`unit_update` compose them. The same functions accept floats, tensors and
sympy symbols: the proof checks in ``proofs_checks/`` call exactly this code with symbols.

The adjoint (MATH.md §12) runs the transposed recursion backward in time on covectors λ (one row per test
input and output, stacked on a first axis): :func:`feed_adjoint` (λ_s = λ + D_sᵀ Φ_s), :func:`unit_covector`
(κ_s = C_sᵀ λ_s + E_sᵀ Φ_s, so that Σ_t Φ_t update_t(u) = −Σ_s ⟨κ_s, grad_s(u)⟩) and :func:`propagate_adjoint`
(λ ← A_sᵀ λ_s, entering step s − 1). :func:`transpose_linear` applies a coefficient's transpose.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar

import torch

from ..errors import UnsupportedOptimizerError

__all__ = [
    "StepCoefficients",
    "LinearOptimizerRule",
    "apply_linear",
    "is_zero",
    "scale_buffer",
    "feed_buffer",
    "subtract_direct",
    "subtract_buffered",
    "buffer_step",
    "unit_update",
    "transpose_linear",
    "propagate_adjoint",
    "feed_adjoint",
    "unit_covector",
    "decay_gradient",
    "decay_direct_update",
    "sqrt",
    "adam_family_values",
]


def sqrt(x):
    """Square root of a float, a tensor or a sympy expression (exact for sympy)."""
    module = type(x).__module__
    if module.startswith("torch"):
        return x.sqrt()
    if module.startswith("sympy"):
        import sympy

        return sympy.sqrt(x)
    return math.sqrt(x)


def apply_linear(coefficient, x):
    """A ⊙ x for a number or tensor A, A(x) for a callable linear map A."""
    if callable(coefficient):
        return coefficient(x)
    return coefficient * x


@dataclass(frozen=True)
class StepCoefficients:
    """One step of one parameter tensor in the template of MATH.md §4.

    buffer_t(u) = A ⊙ buffer_{t−1}(u) + C ⊙ grad_t(u);   update_t(u) = −(D ⊙ buffer_t(u) + E ⊙ grad_t(u)).

    ``gradient_sign`` is s (−1 when the optimizer maximizes); ``decay_coupled`` is κ (the decay unit's
    gradient is κ θ_t, entering like a sample's gradient); ``decay_decoupled`` is ρ (the decay unit also
    moves by −ρ θ_t directly, bypassing the buffer).
    """

    A: Any
    C: Any
    D: Any
    E: Any
    gradient_sign: int = 1
    decay_coupled: Any = 0
    decay_decoupled: Any = 0


def is_zero(coefficient) -> bool:
    """Whether a coefficient is the number 0 (a tensor or a map is never treated as zero)."""
    return not callable(coefficient) and not isinstance(coefficient, torch.Tensor) and coefficient == 0


def _accumulate(target, value, rows, sign: int):
    """target + sign · value, in place for a tensor target (``rows``: target[rows[k]] += sign · value[k]
    along the first axis, repeated rows accumulated); a new value for numbers and sympy expressions."""
    if not isinstance(target, torch.Tensor):
        if rows is None:
            return target + sign * value
        out = target.copy()  # a sympy Matrix (or list) of per-unit rows: the symbolic form of index_put_
        for k, r in enumerate(rows):
            out[int(r)] = out[int(r)] + sign * value[k]
        return out
    if rows is None:
        return target.add_(value, alpha=sign)
    # index_put_ with accumulate: on CPU, index_add_ along a first axis with large rows is two to three
    # orders of magnitude slower (measured: 173 ms against 0.1 ms for 32 rows of 4096)
    target.index_put_((rows,), value if sign == 1 else -value, accumulate=True)
    return target


def scale_buffer(buffer, A):
    """buffer ← A ⊙ buffer, the first half of buffer_t(u) = A_t ⊙ buffer_{t−1}(u) + C_t ⊙ grad_t(u).

    A tensor buffer is scaled in place and returned (a unit-by-parameter buffer is the largest tensor
    held: no copy); a callable linear map A returns A(buffer); numbers and sympy expressions give A·buffer.
    """
    if callable(A):
        return A(buffer)
    if isinstance(buffer, torch.Tensor):
        if isinstance(A, torch.Tensor) or A != 1:
            buffer.mul_(A)
        return buffer
    return A * buffer


def feed_buffer(buffer, C, grad, rows=None):
    """buffer ← buffer + C ⊙ grad, the second half of the buffer recursion (MATH.md §4).

    ``rows``: grad holds the gradients of a batch of units, stacked on a first axis, and row k of the
    buffer receives C ⊙ grad[k] (repeated rows accumulate: a partition maps many samples to one row).
    In place for a tensor buffer.
    """
    if is_zero(C):
        return buffer
    return _accumulate(buffer, apply_linear(C, grad), rows, 1)


def subtract_direct(update, E, grad, rows=None):
    """update ← update − E ⊙ grad: the part of update_t(u) that bypasses the buffer (Nesterov's E)."""
    if is_zero(E):
        return update
    return _accumulate(update, apply_linear(E, grad), rows, -1)


def subtract_buffered(update, D, buffer):
    """update ← update − D ⊙ buffer_t(u) (update None: a new tensor −D ⊙ buffer, no zero-filled
    intermediate). In place for a tensor update, without a buffer-sized temporary unless D is a map."""
    if update is None:
        if callable(D):
            return -D(buffer)
        if isinstance(D, torch.Tensor):
            return torch.mul(buffer, -D)  # −D has the parameter's shape: negating it is cheap
        return buffer * (-D)
    if not isinstance(update, torch.Tensor):
        return update - apply_linear(D, buffer)
    if callable(D):
        return update.sub_(D(buffer))
    if isinstance(D, torch.Tensor):
        return update.addcmul_(buffer, D, value=-1)
    if D != 0:
        update.add_(buffer, alpha=-D)
    return update


def buffer_step(buffer, grad, c: StepCoefficients, rows=None):
    """buffer_t(u) = A ⊙ buffer_{t−1}(u) + C ⊙ grad_t(u)  (:func:`scale_buffer`, then :func:`feed_buffer`).

    With tensors, ``buffer`` is updated in place and returned: pass a buffer you own."""
    return feed_buffer(scale_buffer(buffer, c.A), c.C, grad, rows)


def unit_update(buffer, grad, c: StepCoefficients):
    """update_t(u) = −(D ⊙ buffer_t(u) + E ⊙ grad_t(u)), with buffer_t(u) already advanced (a new value)."""
    return subtract_direct(subtract_buffered(None, c.D, buffer), c.E, grad)


def transpose_linear(coefficient, covector):
    """Aᵀ κ (MATH.md §12). A number or tensor A is coordinate-wise, hence its own transpose (broadcast over the
    covector's leading rows). A callable linear map is transposed by its ``transposed`` attribute (a callable)
    when it has one, else by ``torch.func.vjp``: for a linear map the vector–Jacobian product at any point
    (here 0) is the transpose applied. The map must act row by row on a stacked first axis, as it does on the
    stacked gradients of a batch in the forward recursion."""
    if not callable(coefficient):
        return coefficient * covector
    transposed = getattr(coefficient, "transposed", None)
    if transposed is not None:
        return transposed(covector)
    if not isinstance(covector, torch.Tensor):
        raise UnsupportedOptimizerError("a callable linear coefficient needs a `transposed` attribute to be "
                                        "transposed symbolically (torch.func.vjp transposes it for tensors)")
    _, pullback = torch.func.vjp(coefficient, torch.zeros_like(covector))
    return pullback(covector)[0]


def propagate_adjoint(adjoint, A):
    """λ ← A_sᵀ λ_s: the adjoint carried from step s into step s − 1 (λ_{s−1} = Φ_{s−1} D_{s−1} + λ_s A_s,
    MATH.md §12). In place for a tensor λ and a coordinate-wise A; A = 1 (a skipped parameter) leaves it."""
    if callable(A):
        return transpose_linear(A, adjoint)
    if isinstance(adjoint, torch.Tensor):
        if isinstance(A, torch.Tensor) or A != 1:
            adjoint.mul_(A)
        return adjoint
    return A * adjoint


def feed_adjoint(adjoint, D, phi):
    """λ_s = λ + D_sᵀ Φ_s, with λ = λ_{s+1} A_{s+1} already propagated (MATH.md §12; Φ None: a step whose
    Φ_s is not computed, Appendix G.2, adds nothing). In place for a tensor λ and a coordinate-wise D."""
    if phi is None or is_zero(D):
        return adjoint
    if isinstance(adjoint, torch.Tensor) and not callable(D):
        if isinstance(D, torch.Tensor):
            return adjoint.addcmul_(phi, D)
        return adjoint.add_(phi, alpha=D)
    return adjoint + transpose_linear(D, phi)


def unit_covector(adjoint, phi, c: StepCoefficients):
    """κ_s = C_sᵀ λ_s + E_sᵀ Φ_s: every unit's total influence through step s's gradient is −⟨κ_s, grad_s(u)⟩
    (MATH.md §12, equation 3). A new value (λ is not changed); 0 when C = E = 0."""
    out = 0 if is_zero(c.C) else transpose_linear(c.C, adjoint)
    if phi is not None and not is_zero(c.E):
        out = out + transpose_linear(c.E, phi)
    return out


def decay_gradient(theta, c: StepCoefficients):
    """grad_t(decay) = κ_t θ_t: the coupled weight-decay pseudo-unit's gradient."""
    return c.decay_coupled * theta


def decay_direct_update(theta, c: StepCoefficients):
    """−ρ_t θ_t: the decoupled weight-decay pseudo-unit's move that bypasses the buffer."""
    return -(c.decay_decoupled * theta)


class LinearOptimizerRule:
    """Contract for one optimizer family: which torch classes, which flags, which recorded state.

    Subclasses set the class attributes and implement :meth:`hyperparameters` and
    :meth:`coefficients`. A rule never touches devices, files or the training loop.
    """

    #: registry name, stored in trajectory files
    name: ClassVar[str] = ""
    #: torch.optim classes this rule decomposes exactly (matched by exact type)
    optimizer_classes: ClassVar[tuple[type, ...]] = ()
    #: optimizer-state tensors recorded after every step, per parameter (besides ``step``)
    recorded_state: ClassVar[tuple[str, ...]] = ()
    #: the state key holding the linear buffer (the carried-state pseudo-unit's initial value)
    buffer_state_key: ClassVar[str | None] = None
    #: optimizer constructor settings the shared checks train with (replay, decomposition, flags);
    #: cover every branch of :meth:`coefficients` (each flag on and off)
    example_settings: ClassVar[tuple[dict, ...]] = ()
    #: recorded state entries that are scalars (0-d tensors), not tensors shaped like the parameter
    scalar_state_keys: ClassVar[tuple[str, ...]] = ()
    #: group options a trajectory built by ``Trajectory.from_records`` may leave out (torch's defaults,
    #: only where Adam and AdamW, or every supported class, agree); the rest must be given
    group_defaults: ClassVar[dict] = {}
    #: flags accepted because they only pick an implementation, not the mathematics
    implementation_flags: ClassVar[tuple[str, ...]] = ("foreach", "fused", "capturable", "differentiable")
    #: keys that LR schedulers and named parameters add to a group; the step never reads them (the
    #: values a scheduler sets, lr, betas or momentum, are read at every step)
    bookkeeping_keys: ClassVar[tuple[str, ...]] = (
        "initial_lr", "max_lr", "min_lr", "base_lr", "base_momentum", "max_momentum", "param_names",
    )

    def hyperparameters(self, group: dict) -> dict:
        """The values used at this step for one param group, as JSON-able floats and bools.

        Raises :class:`UnsupportedOptimizerError` naming any flag whose value is not handled exactly.
        """
        raise NotImplementedError

    def needs_step_count(self) -> bool:
        """Whether :meth:`coefficients` reads the optimizer's per-parameter ``step`` count."""
        return False

    def state_keys(self, hyper: dict) -> tuple[str, ...]:
        """The optimizer-state tensors :meth:`coefficients` reads for a group with these values."""
        return ()

    def coefficients(self, hyper: dict, state: dict, *, first_update: bool) -> StepCoefficients:
        """The table (A, C, D, E, s, κ, ρ) of one step for one parameter that received a gradient.

        ``hyper``: this parameter's group values at step t; ``state``: the recorded state after the
        step (tensors or symbols); ``first_update``: whether the buffer did not exist before this step.
        """
        raise NotImplementedError

    def creates_buffer(self, hyper: dict) -> bool:
        """Whether a step with these values creates the buffer in the optimizer's state. PyTorch creates
        buffers lazily (SGD only once momentum ≠ 0), so ``first_update`` stays True until such a step."""
        return True

    # helpers shared by the rules -------------------------------------------------------------
    def _check_known_flags(self, group: dict, known: set[str]) -> None:
        unknown = sorted(k for k in group if k != "params" and k not in known and k not in self.implementation_flags
                         and k not in self.bookkeeping_keys)
        if unknown:
            raise UnsupportedOptimizerError(
                f"{self.name}: parameter-group option(s) {unknown} are not known to explaind_math's "
                f"{self.name} rule; refusing rather than decomposing approximately"
            )


def scalar(value) -> float:
    """A float from a Python number or a one-element tensor (torch allows tensor lr and betas)."""
    if hasattr(value, "item"):
        return float(value.item())
    return float(value)


def adam_family_values(group: dict) -> dict:
    """lr, β1, β2, ε, λ and ``maximize`` of an Adam-family param group, as floats and a bool."""
    beta1, beta2 = group["betas"]
    return {
        "lr": scalar(group["lr"]),
        "beta1": scalar(beta1),
        "beta2": scalar(beta2),
        "eps": scalar(group["eps"]),
        "weight_decay": scalar(group["weight_decay"]),
        "maximize": bool(group.get("maximize", False)),
    }


def refuse_flag(rule: str, flag: str, value, why: str) -> UnsupportedOptimizerError:
    return UnsupportedOptimizerError(f"{rule}: {flag}={value!r} is not supported: {why}")


RuleFactory = Callable[[], LinearOptimizerRule]
