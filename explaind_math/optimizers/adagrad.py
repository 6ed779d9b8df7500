"""Adagrad as PyTorch implements it (dense gradients), in the template of MATH.md §4.

Let η, δ, ε, λ be ``lr``, ``lr_decay``, ``eps``, ``weight_decay``, k the step count after the update
and S_t the recorded accumulator ``sum`` after the step (it includes ``initial_accumulator_value``).
With d_t = s g_t + λ θ_t:

    θ_{t+1} = θ_t − η / (1 + (k − 1) δ) · d_t / (sqrt(S_t) + ε)        (A = 1, C = 0, D = 0, E = that factor)

No buffer: each step's update is linear in that step's gradients alone (κ = λ).
"""

from __future__ import annotations

import torch

from .template import LinearOptimizerRule, StepCoefficients, refuse_flag, scalar, sqrt

__all__ = ["AdagradRule", "adagrad_step_size"]


def adagrad_step_size(lr, lr_decay, k, state_sum, eps):
    """E = η / (1 + (k − 1) δ) / (sqrt(S) + ε)."""
    return lr / (1 + (k - 1) * lr_decay) / (sqrt(state_sum) + eps)


class AdagradRule(LinearOptimizerRule):
    """torch.optim.Adagrad: ``lr_decay``, ``weight_decay``, ``initial_accumulator_value``, ``maximize``
    exact; sparse gradients refused by the recorder."""

    name = "adagrad"
    optimizer_classes = (torch.optim.Adagrad,)
    # Adagrad's first step moves each coordinate by ≈ lr: lr = 0.03 keeps steps where GL(8) reaches 1e-9
    example_settings = (
        {"lr": 0.03}, {"lr": 0.03, "lr_decay": 0.01, "weight_decay": 0.1, "initial_accumulator_value": 0.1},
        {"lr": 0.03, "maximize": True},
    )
    group_defaults = {"lr_decay": 0.0, "eps": 1e-10, "weight_decay": 0.0, "initial_accumulator_value": 0.0,
                      "maximize": False}

    def needs_step_count(self) -> bool:
        return True

    def hyperparameters(self, group: dict) -> dict:
        self._check_known_flags(
            group, {"lr", "lr_decay", "eps", "weight_decay", "initial_accumulator_value", "maximize"}
        )
        if group.get("fused"):
            raise refuse_flag(self.name, "fused", True, "not covered by the replay tests")
        return {
            "lr": scalar(group["lr"]),
            "lr_decay": scalar(group["lr_decay"]),
            "eps": scalar(group["eps"]),
            "weight_decay": scalar(group["weight_decay"]),
            "maximize": bool(group.get("maximize", False)),
        }

    def state_keys(self, hyper: dict) -> tuple[str, ...]:
        return ("sum",)

    def coefficients(self, hyper: dict, state: dict, *, first_update: bool) -> StepCoefficients:
        E = adagrad_step_size(hyper["lr"], hyper["lr_decay"], state["step"], state["sum"], hyper["eps"])
        return StepCoefficients(A=1, C=0, D=0, E=E, gradient_sign=-1 if hyper["maximize"] else 1,
                                decay_coupled=hyper["weight_decay"])
