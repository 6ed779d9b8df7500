"""RMSprop as PyTorch implements it (plain, centered, with momentum), in the template of MATH.md §4.

Let η, α, ε, λ, μ be ``lr``, ``alpha``, ``eps``, ``weight_decay``, ``momentum``; s = −1 under
``maximize``; d_t = s g_t + λ θ_t. With v_t (``square_avg``) and, centered, ḡ_t (``grad_avg``) taken
from the recorded state after the step, let a_t = sqrt(v_t − ḡ_t²) + ε (centered) or sqrt(v_t) + ε:

    μ > 0:   b_t = μ b_{t−1} + d_t / a_t,   θ_{t+1} = θ_t − η b_t      (A = μ, C = 1/a_t, D = η, E = 0)
    μ = 0:   θ_{t+1} = θ_t − η d_t / a_t                                 (A = 1, C = 0, D = 0, E = η/a_t)

weight decay coupled (κ = λ). PyTorch creates the momentum buffer as zeros, so no first-step case.
"""

from __future__ import annotations

import torch

from .template import LinearOptimizerRule, StepCoefficients, scalar, sqrt

__all__ = ["RMSpropRule", "rmsprop_denominator"]


def rmsprop_denominator(square_avg, grad_avg, eps):
    """a = sqrt(v − ḡ²) + ε (centered; pass grad_avg=None for plain RMSprop: sqrt(v) + ε)."""
    if grad_avg is None:
        return sqrt(square_avg) + eps
    return sqrt(square_avg - grad_avg * grad_avg) + eps


class RMSpropRule(LinearOptimizerRule):
    """torch.optim.RMSprop: ``alpha``, ``centered``, ``momentum``, ``weight_decay``, ``maximize`` exact."""

    name = "rmsprop"
    optimizer_classes = (torch.optim.RMSprop,)
    # RMSprop's first steps move each coordinate by ≈ lr / sqrt(1 − α) (10·lr at α = 0.99, more with momentum):
    # lr = 0.003 keeps max |Δθ| per step near AdamW's at lr = 0.02, where 8 Gauss–Legendre nodes reach 1e-9
    # (at lr = 0.01, centered with momentum 0.9, max |Δθ| = 0.19: GL(8) 1.6e-9, GL(16) 3e-16)
    example_settings = (
        {"lr": 0.003}, {"lr": 0.003, "centered": True, "momentum": 0.9, "weight_decay": 0.1},
        {"lr": 0.003, "momentum": 0.5, "maximize": True}, {"lr": 0.003, "alpha": 0.9, "centered": True},
    )
    buffer_state_key = "momentum_buffer"
    group_defaults = {"alpha": 0.99, "eps": 1e-8, "weight_decay": 0.0, "momentum": 0.0, "centered": False,
                      "maximize": False}

    def hyperparameters(self, group: dict) -> dict:
        self._check_known_flags(group, {"lr", "alpha", "eps", "weight_decay", "momentum", "centered", "maximize"})
        return {
            "lr": scalar(group["lr"]),
            "alpha": scalar(group["alpha"]),
            "eps": scalar(group["eps"]),
            "weight_decay": scalar(group["weight_decay"]),
            "momentum": scalar(group["momentum"]),
            "centered": bool(group["centered"]),
            "maximize": bool(group.get("maximize", False)),
        }

    def state_keys(self, hyper: dict) -> tuple[str, ...]:
        return ("square_avg", "grad_avg") if hyper["centered"] else ("square_avg",)

    def coefficients(self, hyper: dict, state: dict, *, first_update: bool) -> StepCoefficients:
        a = rmsprop_denominator(state["square_avg"], state["grad_avg"] if hyper["centered"] else None, hyper["eps"])
        sign = -1 if hyper["maximize"] else 1
        lr, mu, wd = hyper["lr"], hyper["momentum"], hyper["weight_decay"]
        if mu > 0:
            return StepCoefficients(A=mu, C=1 / a, D=lr, E=0, gradient_sign=sign, decay_coupled=wd)
        return StepCoefficients(A=1, C=0, D=0, E=lr / a, gradient_sign=sign, decay_coupled=wd)
