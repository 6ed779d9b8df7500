"""What every reference implementation shares, written as in MATH.md (§0, §1, §5).

Each theorem module holds a ``reference_*`` function: a literal torch.func transcription of its formula,
the specification the engine (:func:`explaind_math.engine.decompose_trajectory`) is tested against.
This module holds only the pieces common to all formulas:

    g_{t,i} = w_{t,i} ∇_θ ℓ_i(θ_t)                                   vmap(grad(ℓ)) over functional_call   (§0)
    Φ_t(x) = ∫_0^1 ∂_θ f(x; θ_t + α Δθ_t) dα ≈ Σ_k w_k ∂_θ f(x; θ_t + α_k Δθ_t)   jacrev, Gauss–Legendre   (§1)
    I[t, j, x, i, o] = −η_t Φ_t(x)[o, j] T_t(i)[j],   Ψ[t, j, x, o] = −η_t Φ_t(x)[o, j] R_t[j]           (§5)

Parameters are flattened to one vector of coordinates j (``trajectory.parameter_names`` in order, each
tensor in row-major order), so every per-coordinate quantity (η_t, β's, P_t, T_t(i), R_t) is a vector.
Everything is float64 and materialized in full: for small models only, no chunking, nothing from the engine.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import torch
from torch.func import functional_call, grad, jacrev, vmap

from ..errors import ExplaindError
from ..trajectory import Trajectory

Target = Callable[[dict, torch.Tensor, Any], torch.Tensor]  # (θ, x, label) -> vector in R^O


@dataclass
class ReferenceDecomposition:
    """The atomic tensors of MATH.md §5 (every axis kept, one row per coordinate j).

    ``kernel`` I[t, j, x, i, o] (N, D, X, U, O), ``regularization`` Ψ[t, j, x, o] (N, D, X, O),
    f(x; θ_0) and f(x; θ_N) (X, O); ``units`` labels the i axis, ``param_labels`` the j axis."""

    kernel: torch.Tensor
    regularization: torch.Tensor
    f_initial: torch.Tensor
    f_final: torch.Tensor
    units: list
    param_labels: list[str]

    @property
    def reconstruction(self) -> torch.Tensor:
        """f(x; θ_0) + Σ_{t,j,i} I + Σ_{t,j} Ψ   (equation (2))."""
        return self.f_initial + self.kernel.sum(dim=(0, 1, 3)) + self.regularization.sum(dim=(0, 1))

    @property
    def residual(self) -> torch.Tensor:
        return self.f_final - self.reconstruction


# ------------------------------------------------------------------------------------ scope
def refuse_unsupported(trajectory: Trajectory, rules: tuple[str, ...], who: str) -> None:
    """The references cover fresh runs of the named optimizer rules without gradient rescaling."""
    if trajectory.optimizer not in rules:
        raise ExplaindError(f"{who} covers the optimizer rules {rules}, not {trajectory.optimizer!r}")
    if carries_state(trajectory):
        raise ExplaindError(f"{who} does not cover optimizer state carried in from before the recording "
                            "(the carried-state pseudo-unit); use the engine")
    if trajectory.metadata.get("gradient_rescaling", False):
        raise ExplaindError(f"{who} does not cover gradient rescaling (clip factors c_t); use the engine")


def carries_state(trajectory: Trajectory) -> bool:
    """Whether optimizer state existed before the recording: an entry other than a zero step count
    (torch.optim.Adagrad creates ``step = 0`` and its accumulator at construction: a fresh run)."""
    return any(set(entry) - {"step"} or int(entry.get("step", 0)) != 0
               for entry in trajectory.initial_state.values())


# ------------------------------------------------------------------------------------ coordinates
def theta(trajectory: Trajectory, t: int) -> dict[str, torch.Tensor]:
    """θ_t as a dict of float64 tensors."""
    return {n: trajectory.parameters[t][n].to(torch.float64) for n in trajectory.parameter_names}


def flat(params: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    """The tensors of ``names`` concatenated into one vector of coordinates j (last axis)."""
    return torch.cat([params[n].reshape(-1) for n in names])


def coordinate_labels(trajectory: Trajectory) -> list[str]:
    shapes = trajectory.shapes()
    return [f"{n}[{k}]" for n in trajectory.parameter_names for k in range(torch.Size(shapes[n]).numel())]


def per_coordinate(trajectory: Trajectory, t: int, value_of: Callable[[str, dict], Any]) -> torch.Tensor:
    """A vector over coordinates j: ``value_of(name, hyper)`` of the tensor holding j, with ``hyper`` the
    hyper-parameters of its group at step t; a scalar is repeated, a tensor flattened."""
    step, shapes, parts = trajectory.steps[t], trajectory.shapes(), []
    for n in trajectory.parameter_names:
        value = value_of(n, step.hyperparameters[trajectory.group_of[n]])
        numel = torch.Size(shapes[n]).numel()
        value = torch.as_tensor(value, dtype=torch.float64)
        parts.append(value.reshape(-1) if value.numel() == numel and value.dim() > 0 else value.expand(numel))
    return torch.cat(parts)


def hyperparameter(trajectory: Trajectory, t: int, key: str) -> torch.Tensor:
    """η_t, λ_t, β1, … of step t as a vector over coordinates (the value of each coordinate's group)."""
    return per_coordinate(trajectory, t, lambda n, hyper: float(hyper[key]))


def updated(trajectory: Trajectory, t: int) -> torch.Tensor:
    """Boolean vector over coordinates: did the tensor holding j receive a gradient at step t?"""
    moved = set(trajectory.steps[t].updated)
    return per_coordinate(trajectory, t, lambda n, hyper: float(n in moved)).bool()


# ------------------------------------------------------------------------------------ §0 gradients
def model_output(model: torch.nn.Module) -> Callable[[dict, torch.Tensor], torch.Tensor]:
    """f(x; θ) for one example: ``functional_call`` on x with a batch axis of one."""

    def f(params: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    return f


def sample_gradients(model, trajectory: Trajectory, loss_fn, train_data, t: int) -> torch.Tensor:
    """g_{t,i} = w_{t,i} ∇_θ ℓ_i(θ_t) for every unit i of the run (zero rows for i ∉ B_t): (U, D)."""
    f = model_output(model)
    step, names, units = trajectory.steps[t], trajectory.parameter_names, trajectory.sample_ids()
    X, Y = train_data
    ids = torch.as_tensor(step.sample_ids, dtype=torch.long)
    xs = X[ids].to(torch.float64) if X.is_floating_point() else X[ids]
    ys = Y[ids].to(torch.float64) if Y.is_floating_point() else Y[ids]

    def loss(params, x, y):
        return loss_fn(f(params, x), y).reshape(())

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(theta(trajectory, t), xs, ys)
    g = torch.cat([per_sample[n].reshape(len(step.sample_ids), -1) for n in names], dim=1)
    g = step.weights.to(torch.float64).unsqueeze(1) * g
    rows = torch.as_tensor([units.index(i) for i in step.sample_ids], dtype=torch.long)
    return torch.zeros(len(units), g.shape[1], dtype=torch.float64).index_add(0, rows, g)


# ------------------------------------------------------------------------------------ §1 Φ_t(x)
def gauss_legendre_nodes(n: int) -> list[tuple[float, float]]:
    """(α_k, w_k) of Gauss–Legendre with n nodes on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(n)
    return [(float(a), float(b)) for a, b in zip((x + 1.0) / 2.0, w / 2.0)]


def feature_map(target: Target, trajectory: Trajectory, t: int, test_inputs, test_labels, nodes: int):
    """The test feature map Φ_t(x) = Σ_k w_k ∂_θ target(x; θ_t + α_k Δθ_t) for every test input: (X, O, D)."""
    names = trajectory.parameter_names
    theta_t, theta_next = theta(trajectory, t), theta(trajectory, t + 1)
    jacobian = vmap(jacrev(lambda p, x, y: target(p, x, y).reshape(-1)), in_dims=(None, 0, 0))
    phi = 0
    for alpha, weight in gauss_legendre_nodes(nodes):
        point = {n: theta_t[n] + alpha * (theta_next[n] - theta_t[n]) for n in names}
        J = jacobian(point, test_inputs, test_labels)
        phi = phi + weight * torch.cat([J[n].reshape(*J[n].shape[:2], -1) for n in names], dim=2)
    return phi


# ------------------------------------------------------------------------------------ §5 I and Ψ
def decompose_with_features(target: Target, trajectory: Trajectory, test_inputs, eta, T, R, *, units,
                            test_labels=None, nodes: int = 8) -> ReferenceDecomposition:
    """I[t, j, x, i, o] = −η_t[j] Φ_t(x)[o, j] T_t(i)[j] and Ψ[t, j, x, o] = −η_t[j] Φ_t(x)[o, j] R_t[j]
    from η (N, D), T (N, U, D), R (N, D) and Φ_t of ``target`` (MATH.md §5)."""
    test_inputs = test_inputs.to(torch.float64) if test_inputs.is_floating_point() else test_inputs
    labels = torch.zeros(test_inputs.shape[0]) if test_labels is None else torch.as_tensor(test_labels)
    kernel, regularization = [], []
    for t in range(trajectory.num_steps):
        phi = feature_map(target, trajectory, t, test_inputs, labels, nodes)
        kernel.append(-torch.einsum("j,xoj,ij->jxio", eta[t], phi, T[t]))
        regularization.append(-torch.einsum("j,xoj,j->jxo", eta[t], phi, R[t]))

    def values(t):
        return vmap(lambda x, y: target(theta(trajectory, t), x, y).reshape(-1))(test_inputs, labels)

    return ReferenceDecomposition(torch.stack(kernel), torch.stack(regularization), values(0),
                                  values(trajectory.num_steps), list(units), coordinate_labels(trajectory))


def check_replay(trajectory: Trajectory, t: int, eta, T_t, R_t, who: str) -> None:
    """The replay check of MATH.md §2: θ_{t+1} − θ_t = −η_t (Σ_i T_t(i) + R_t), to 1e-8 of max |Δθ_t|."""
    names = trajectory.parameter_names
    delta = flat(theta(trajectory, t + 1), names) - flat(theta(trajectory, t), names)
    error = float((delta + eta * (T_t.sum(0) + R_t)).abs().max())
    if error > 1e-8 * float(delta.abs().max()) + 1e-14:
        raise ExplaindError(f"{who}: step {t} is not replayed by −η_t (Σ_i T_t(i) + R_t) (off by {error:.2e}); "
                            "is the run outside what this reference covers?")
