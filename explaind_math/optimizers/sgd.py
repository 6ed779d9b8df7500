"""Corollary 3.2 — SGD with momentum, dampening, Nesterov and coupled weight decay (MATH.md §3).

Let η_t, μ, τ, λ be ``lr``, ``momentum``, ``dampening``, ``weight_decay`` of the parameter's group at
step t and s = −1 under ``maximize``. PyTorch computes d_t = s g_t + λ θ_t, then

    b_t = d_t at the parameter's first update,   b_t = μ b_{t−1} + (1 − τ) d_t afterwards
    θ_{t+1} = θ_t − η_t b_t                       (Nesterov: θ_{t+1} = θ_t − η_t (d_t + μ b_t))

so in the template of §4 (weight decay a unit with gradient λ θ_t flowing through the buffer, κ = λ):
    μ = 0:              A = 1, C = 0, D = 0, E = η   (no buffer is touched, as in PyTorch)
    μ > 0, first:       A = 0, C = 1, D = η, E = 0   (Nesterov: D = η μ, E = η)
    μ > 0, afterwards:  A = μ, C = 1 − τ, D = η, E = 0  (Nesterov: D = η μ, E = η)
Unrolled, c_{t,s} = μ^{t−s} (1 − τ)^{[s ≥ 1]} as in MATH.md §3.
"""

from __future__ import annotations

import torch

from .template import LinearOptimizerRule, StepCoefficients, refuse_flag, scalar

__all__ = ["SGDRule", "sgd_coefficients"]


def sgd_coefficients(lr, momentum, dampening, weight_decay, *, nesterov: bool, maximize: bool, first_update: bool):
    """The §4 table of one SGD step; plain arithmetic, so lr, μ, τ, λ may be sympy symbols."""
    sign = -1 if maximize else 1
    if momentum == 0:
        return StepCoefficients(A=1, C=0, D=0, E=lr, gradient_sign=sign, decay_coupled=weight_decay)
    A, C = (0, 1) if first_update else (momentum, 1 - dampening)
    if nesterov:
        return StepCoefficients(A=A, C=C, D=lr * momentum, E=lr, gradient_sign=sign, decay_coupled=weight_decay)
    return StepCoefficients(A=A, C=C, D=lr, E=0, gradient_sign=sign, decay_coupled=weight_decay)


class SGDRule(LinearOptimizerRule):
    """torch.optim.SGD: ``momentum``, ``dampening``, ``nesterov``, ``weight_decay``, ``maximize`` exact;
    ``foreach``, ``fused`` and ``differentiable`` change only the implementation."""

    name = "sgd"
    optimizer_classes = (torch.optim.SGD,)
    example_settings = (
        {"lr": 0.05}, {"lr": 0.05, "momentum": 0.9, "dampening": 0.3, "weight_decay": 0.01},
        {"lr": 0.05, "momentum": 0.8, "nesterov": True, "weight_decay": 0.01}, {"lr": 0.05, "momentum": 0.5, "maximize": True},
    )
    recorded_state = ()
    buffer_state_key = "momentum_buffer"
    group_defaults = {"momentum": 0.0, "dampening": 0.0, "weight_decay": 0.0, "nesterov": False, "maximize": False}

    def hyperparameters(self, group: dict) -> dict:
        self._check_known_flags(group, {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"})
        hyper = {
            "lr": scalar(group["lr"]),
            "momentum": scalar(group["momentum"]),
            "dampening": scalar(group["dampening"]),
            "weight_decay": scalar(group["weight_decay"]),
            "nesterov": bool(group["nesterov"]),
            "maximize": bool(group.get("maximize", False)),
        }
        # torch runs plain SGD while a group's momentum is 0 (a warm-up), Nesterov or not: exact by the table
        if hyper["nesterov"] and hyper["momentum"] != 0 and hyper["dampening"] != 0:
            raise refuse_flag(self.name, "nesterov", True, "Nesterov needs dampening = 0 while momentum ≠ 0")
        return hyper

    def state_keys(self, hyper: dict) -> tuple[str, ...]:
        return ()

    def creates_buffer(self, hyper: dict) -> bool:
        """torch.optim.SGD allocates ``momentum_buffer`` at the first step with momentum ≠ 0, undamped."""
        return hyper["momentum"] != 0

    def coefficients(self, hyper: dict, state: dict, *, first_update: bool) -> StepCoefficients:
        return sgd_coefficients(
            hyper["lr"],
            hyper["momentum"],
            hyper["dampening"],
            hyper["weight_decay"],
            nesterov=hyper["nesterov"],
            maximize=hyper["maximize"],
            first_update=first_update,
        )
