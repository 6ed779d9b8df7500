"""Adamax as PyTorch implements it, in the template of MATH.md §4.

With d_t = s g_t + λ θ_t, m_t = β1 m_{t−1} + (1 − β1) d_t, u_t = max(β2 u_{t−1}, |d_t| + ε) recorded
(``exp_inf``), k the step count after the update:

    θ_{t+1} = θ_t − η / (1 − β1^k) · m_t / u_t        (A = β1, C = 1 − β1, D = η / ((1 − β1^k) u_t), E = 0)

u_t is a maximum, not linear in the gradients, so it is taken from the real run, like Adam's v_t.
"""

from __future__ import annotations

import torch

from .template import LinearOptimizerRule, StepCoefficients, adam_family_values

__all__ = ["AdamaxRule"]


class AdamaxRule(LinearOptimizerRule):
    """torch.optim.Adamax: ``betas``, ``eps``, ``weight_decay`` (coupled), ``maximize`` exact."""

    name = "adamax"
    optimizer_classes = (torch.optim.Adamax,)
    example_settings = ({"lr": 0.02}, {"lr": 0.02, "weight_decay": 0.1}, {"lr": 0.02, "maximize": True})
    buffer_state_key = "exp_avg"
    group_defaults = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "maximize": False}

    def needs_step_count(self) -> bool:
        return True

    def hyperparameters(self, group: dict) -> dict:
        self._check_known_flags(group, {"lr", "betas", "eps", "weight_decay", "maximize"})
        return adam_family_values(group)

    def state_keys(self, hyper: dict) -> tuple[str, ...]:
        return ("exp_inf",)

    def coefficients(self, hyper: dict, state: dict, *, first_update: bool) -> StepCoefficients:
        beta1 = hyper["beta1"]
        D = hyper["lr"] / ((1 - beta1 ** state["step"]) * state["exp_inf"])
        return StepCoefficients(A=beta1, C=1 - beta1, D=D, E=0, gradient_sign=-1 if hyper["maximize"] else 1,
                                decay_coupled=hyper["weight_decay"])
