"""MATH.md §4 — any optimizer that is linear in the gradients given its recorded state."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from ..engine import DecompositionOptions
from ..errors import ExplaindError
from ..influence import Influence
from ..trajectory import Trajectory
from .engine_call import decompose_with_rule
from .reference import (ReferenceDecomposition, check_replay, decompose_with_features, flat, model_output,
                        refuse_unsupported, sample_gradients, theta)

__all__ = ["decompose_training", "reference_template", "template_train_features", "template_table",
           "TemplateTable"]


def decompose_training(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    train_data: Any,
    test_inputs: torch.Tensor,
    options: DecompositionOptions | None = None,
    **option_keywords: Any,
) -> Influence:
    """Decompose f(x; θ_N) for a run of any registered optimizer rule (MATH.md §4):

        buffer_t(u) = A_t ⊙ buffer_{t−1}(u) + C_t ⊙ grad_t(u),   update_t(u) = −(D_t ⊙ buffer_t(u) + E_t ⊙ grad_t(u))
        f(x; θ_N) = f(x; θ_0) + Σ_t Σ_u Φ_t(x) update_t(u)

    with units u the training samples and the pseudo-units (weight decay, carried state, a loss
    penalty). Theorem 3.1 and Corollary 3.2 are the AdamW and SGD instances; RMSprop, Adagrad,
    Adamax, NAdam, RAdam and user rules (:func:`~explaind_math.optimizers.register_rule`) use this.
    Options are those of :func:`~explaind_math.decompose_adamw_training`.
    """
    return decompose_with_rule(model, trajectory, loss_fn, train_data, test_inputs,
                               statement="MATH.md §4 linear-optimizer template", options=options,
                               **option_keywords)


# ==================================================================================== the specification
COEFFICIENT_FIELDS = ("A", "C", "D", "E", "gradient_sign", "decay_coupled", "decay_decoupled")


@dataclass
class TemplateTable:
    """The rule's table (MATH.md §4) of every step as vectors over coordinates j, each a list over steps t:
    A_t, C_t, D_t, E_t, s_t (the gradient sign), κ_t (coupled decay), ρ_t (decoupled decay). A tensor that
    PyTorch skipped at step t (no gradient) has A = 1, C = D = E = κ = ρ = 0 there: its buffer is left
    alone and it does not move."""

    A: list[torch.Tensor]
    C: list[torch.Tensor]
    D: list[torch.Tensor]
    E: list[torch.Tensor]
    gradient_sign: list[torch.Tensor]
    decay_coupled: list[torch.Tensor]
    decay_decoupled: list[torch.Tensor]


def _coordinate_wise(value, numel: int, field: str, who: str) -> torch.Tensor:
    """A number or a tensor of the parameter's shape (or one element) as a float64 vector of ``numel``."""
    if callable(value):
        raise ExplaindError(f"{who} covers coordinate-wise coefficients (numbers or tensors), not the general "
                            f"linear map given as {field}; use the engine (decompose_training)")
    value = torch.as_tensor(value, dtype=torch.float64)
    return value.reshape(-1) if value.numel() == numel and value.dim() > 0 else value.expand(numel)


def template_table(trajectory: Trajectory, who: str = "reference_template") -> TemplateTable:
    """The table (A, C, D, E, s, κ, ρ) of every step, from ``trajectory.rule.coefficients(hyper, state,
    first_update=...)`` per tensor that received a gradient, with the recorded state after the step.
    ``first_update``: the optimizer's buffer did not exist before this step, i.e. no earlier step that
    updated the tensor had ``rule.creates_buffer(hyper)`` (PyTorch creates buffers lazily)."""
    rule, shapes = trajectory.rule, trajectory.shapes()
    has_buffer = {n: False for n in trajectory.parameter_names}
    identity = {"A": 1.0, "C": 0.0, "D": 0.0, "E": 0.0, "gradient_sign": 1.0, "decay_coupled": 0.0,
                "decay_decoupled": 0.0}
    columns: dict[str, list[torch.Tensor]] = {field: [] for field in COEFFICIENT_FIELDS}
    for step in trajectory.steps:
        parts: dict[str, list[torch.Tensor]] = {field: [] for field in COEFFICIENT_FIELDS}
        for n in trajectory.parameter_names:
            numel, values = torch.Size(shapes[n]).numel(), identity
            if n in step.updated:
                hyper = step.hyperparameters[trajectory.group_of[n]]
                state = {k: v.to(torch.float64) if isinstance(v, torch.Tensor) else v
                         for k, v in step.state.get(n, {}).items()}
                c = rule.coefficients(hyper, state, first_update=not has_buffer[n])
                has_buffer[n] = has_buffer[n] or rule.creates_buffer(hyper)
                values = {field: getattr(c, field) for field in COEFFICIENT_FIELDS}
            for field in COEFFICIENT_FIELDS:
                parts[field].append(_coordinate_wise(values[field], numel, field, who))
        for field in COEFFICIENT_FIELDS:
            columns[field].append(torch.cat(parts[field]))
    return TemplateTable(**columns)


def template_train_features(model: nn.Module, trajectory: Trajectory, loss_fn, train_data,
                            who: str = "reference_template"):
    """(η, T, R) of MATH.md §4 in the form of :func:`~explaind_math.theorems.reference.decompose_with_features`
    (I = −η Φ T): η_t = 1 and T_t(i) = −update_t(i), R_t = −update_t(decay), where, unrolled,

        buffer_t(u) = Σ_{s≤t} (A_t ⊙ ⋯ ⊙ A_{s+1}) ⊙ C_s ⊙ grad_s(u)
        update_t(u) = −(D_t ⊙ buffer_t(u) + E_t ⊙ grad_t(u))
        grad_s(i) = s_s g_{s,i},   grad_s(decay) = κ_s θ_s,   update_t(decay) gains −ρ_t θ_t

    (η_t is inside D_t and E_t). Vectors over coordinates j: (N, D), (N, U, D), (N, D). Each step is
    replay-checked: Δθ_t = Σ_i update_t(i) + update_t(decay)."""
    N, names = trajectory.num_steps, trajectory.parameter_names
    c = template_table(trajectory, who)
    grad = [c.gradient_sign[s] * sample_gradients(model, trajectory, loss_fn, train_data, s) for s in range(N)]
    theta_flat = [flat(theta(trajectory, s), names) for s in range(N)]
    decay_grad = [c.decay_coupled[s] * theta_flat[s] for s in range(N)]

    def transfer(t: int, s: int) -> torch.Tensor:
        """A_t ⊙ ⋯ ⊙ A_{s+1} (1 for s = t)."""
        product = torch.ones_like(c.A[t])
        for r in range(s + 1, t + 1):
            product = product * c.A[r]
        return product

    eta, T, R = [], [], []
    for t in range(N):
        buffer_samples = sum(transfer(t, s) * c.C[s] * grad[s] for s in range(t + 1))
        buffer_decay = sum(transfer(t, s) * c.C[s] * decay_grad[s] for s in range(t + 1))
        update_samples = -(c.D[t] * buffer_samples + c.E[t] * grad[t])
        update_decay = -(c.D[t] * buffer_decay + c.E[t] * decay_grad[t]) - c.decay_decoupled[t] * theta_flat[t]
        eta.append(torch.ones_like(c.A[t]))
        T.append(-update_samples)
        R.append(-update_decay)
        check_replay(trajectory, t, eta[t], T[t], R[t], who)
    return torch.stack(eta), torch.stack(T), torch.stack(R)


def reference_template(model: nn.Module, trajectory: Trajectory, loss_fn, train_data, test_inputs: torch.Tensor, *,
                       nodes: int = 8) -> ReferenceDecomposition:
    """The specification implementation of MATH.md §4 (with §5), a literal torch.func transcription:

        I[t, j, x, i, o] = Φ_t(x)[o, j] update_t(i)[j],     Ψ[t, j, x, o] = Φ_t(x)[o, j] update_t(decay)[j]

    with update_t(u) unrolled from the rule's table (:func:`template_train_features`) and Φ_t(x) by ``jacrev``
    at ``nodes`` Gauss–Legendre nodes on θ_t + α Δθ_t. Covers every registered rule (AdamW and SGD too, whose
    tables these are; RMSprop, Adagrad, Adamax, NAdam, RAdam; rules added with ``register_rule``) whose
    coefficients are coordinate-wise (numbers or tensors); refuses a general linear map (a callable
    coefficient), optimizer state carried in from before the recording and gradient rescaling; takes no loss
    penalty. Small models only (every axis is materialized). ``train_data`` is ``(X, Y)`` indexed by id.
    """
    refuse_unsupported(trajectory, (trajectory.optimizer,), "reference_template")
    eta, T, R = template_train_features(model, trajectory, loss_fn, train_data)
    f = model_output(model)
    return decompose_with_features(lambda params, x, label: f(params, x), trajectory, test_inputs, eta, T, R,
                                   units=trajectory.sample_ids(), nodes=nodes)
