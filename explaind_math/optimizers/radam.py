"""RAdam as PyTorch implements it (with and without decoupled weight decay), MATH.md §4.

With k the step count after the update, ρ_∞ = 2 / (1 − β2) − 1, ρ_k = ρ_∞ − 2 k β2^k / (1 − β2^k),
m_t = β1 m_{t−1} + (1 − β1) d_t and v_t recorded (``exp_avg_sq``):

    ρ_k > 5:  θ_{t+1} = θ_t − η r_k sqrt(1 − β2^k) / (sqrt(v_t) + ε) · m_t / (1 − β1^k),
              r_k = sqrt((ρ_k − 4)(ρ_k − 2) ρ_∞ / ((ρ_∞ − 4)(ρ_∞ − 2) ρ_k))
    else:     θ_{t+1} = θ_t − η m_t / (1 − β1^k)

so A = β1, C = 1 − β1, E = 0 and D the factor in front of m_t (decoupled decay: ρ = η λ).
"""

from __future__ import annotations

import torch

from .template import LinearOptimizerRule, StepCoefficients, adam_family_values, sqrt

__all__ = ["RAdamRule", "radam_rectification"]


def radam_rectification(beta2, k):
    """(ρ_k, r_k): the variance-rectification term, r_k None when ρ_k ≤ 5 (un-adapted step)."""
    rho_inf = 2 / (1 - beta2) - 1
    rho = rho_inf - 2 * k * beta2**k / (1 - beta2**k)
    if rho > 5:
        return rho, sqrt((rho - 4) * (rho - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho))
    return rho, None


class RAdamRule(LinearOptimizerRule):
    """torch.optim.RAdam: ``betas``, ``eps``, ``weight_decay``, ``decoupled_weight_decay``, ``maximize``."""

    name = "radam"
    optimizer_classes = (torch.optim.RAdam,)
    example_settings = (
        {"lr": 0.02}, {"lr": 0.02, "weight_decay": 0.1}, {"lr": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True},
        {"lr": 0.02, "betas": (0.9, 0.9), "maximize": True},
    )
    buffer_state_key = "exp_avg"
    group_defaults = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "decoupled_weight_decay": False,
                      "maximize": False}

    def needs_step_count(self) -> bool:
        return True

    def hyperparameters(self, group: dict) -> dict:
        self._check_known_flags(group, {"lr", "betas", "eps", "weight_decay", "decoupled_weight_decay", "maximize"})
        return {
            **adam_family_values(group),
            "decoupled_weight_decay": bool(group["decoupled_weight_decay"]),
        }

    def state_keys(self, hyper: dict) -> tuple[str, ...]:
        return ("exp_avg_sq",)

    def coefficients(self, hyper: dict, state: dict, *, first_update: bool) -> StepCoefficients:
        beta1, beta2, lr, wd, k = hyper["beta1"], hyper["beta2"], hyper["lr"], hyper["weight_decay"], state["step"]
        _, rect = radam_rectification(beta2, k)
        D = lr / (1 - beta1**k)
        if rect is not None:
            D = D * rect * sqrt(1 - beta2**k) / (sqrt(state["exp_avg_sq"]) + hyper["eps"])
        decoupled = hyper["decoupled_weight_decay"]
        return StepCoefficients(
            A=beta1, C=1 - beta1, D=D, E=0, gradient_sign=-1 if hyper["maximize"] else 1,
            decay_coupled=0 if decoupled else wd, decay_decoupled=lr * wd if decoupled else 0,
        )
