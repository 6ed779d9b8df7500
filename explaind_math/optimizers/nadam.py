"""NAdam as PyTorch implements it (with and without decoupled weight decay), MATH.md §4.

Let ψ be ``momentum_decay``, k the step count after the update, μ_k = β1 (1 − ½ · 0.96^{kψ}),
Π_k = Π_{j≤k} μ_j (``mu_product``, recorded), v_t the recorded ``exp_avg_sq`` and
a_t = sqrt(v_t / (1 − β2^k)) + ε. With d_t = s g_t (+ λ θ_t when coupled) and m_t = β1 m_{t−1} + (1 − β1) d_t:

    θ_{t+1} = θ_t (− η λ θ_t if decoupled) − η (1 − μ_k) / (1 − Π_k) · d_t / a_t
                                            − η μ_{k+1} / (1 − Π_k μ_{k+1}) · m_t / a_t

so A = β1, C = 1 − β1, D = η μ_{k+1} / ((1 − Π_k μ_{k+1}) a_t), E = η (1 − μ_k) / ((1 − Π_k) a_t).
"""

from __future__ import annotations

import torch

from .template import LinearOptimizerRule, StepCoefficients, adam_family_values, scalar, sqrt

__all__ = ["NAdamRule", "nadam_momentum"]


def nadam_momentum(beta1, k, momentum_decay):
    """μ_k = β1 (1 − ½ · 0.96^{k ψ})."""
    return beta1 * (1 - 0.5 * 0.96 ** (k * momentum_decay))


class NAdamRule(LinearOptimizerRule):
    """torch.optim.NAdam: ``betas``, ``eps``, ``weight_decay``, ``momentum_decay``,
    ``decoupled_weight_decay``, ``maximize`` exact."""

    name = "nadam"
    optimizer_classes = (torch.optim.NAdam,)
    example_settings = (
        {"lr": 0.02}, {"lr": 0.02, "weight_decay": 0.1}, {"lr": 0.02, "weight_decay": 0.1, "decoupled_weight_decay": True},
        {"lr": 0.02, "momentum_decay": 0.01, "maximize": True},
    )
    buffer_state_key = "exp_avg"
    scalar_state_keys = ("mu_product",)
    group_defaults = {"betas": (0.9, 0.999), "eps": 1e-8, "weight_decay": 0.0, "momentum_decay": 4e-3,
                      "decoupled_weight_decay": False, "maximize": False}

    def needs_step_count(self) -> bool:
        return True

    def hyperparameters(self, group: dict) -> dict:
        self._check_known_flags(
            group, {"lr", "betas", "eps", "weight_decay", "momentum_decay", "decoupled_weight_decay", "maximize"}
        )
        return {
            **adam_family_values(group),
            "momentum_decay": scalar(group["momentum_decay"]),
            "decoupled_weight_decay": bool(group["decoupled_weight_decay"]),
        }

    def state_keys(self, hyper: dict) -> tuple[str, ...]:
        return ("exp_avg_sq", "mu_product")

    def coefficients(self, hyper: dict, state: dict, *, first_update: bool) -> StepCoefficients:
        beta1, lr, wd, k = hyper["beta1"], hyper["lr"], hyper["weight_decay"], state["step"]
        mu = nadam_momentum(beta1, k, hyper["momentum_decay"])
        mu_next = nadam_momentum(beta1, k + 1, hyper["momentum_decay"])
        product = state["mu_product"]
        a = sqrt(state["exp_avg_sq"] / (1 - hyper["beta2"] ** k)) + hyper["eps"]
        decoupled = hyper["decoupled_weight_decay"]
        return StepCoefficients(
            A=beta1, C=1 - beta1,
            D=lr * mu_next / ((1 - product * mu_next) * a),
            E=lr * (1 - mu) / ((1 - product) * a),
            gradient_sign=-1 if hyper["maximize"] else 1,
            decay_coupled=0 if decoupled else wd,
            decay_decoupled=lr * wd if decoupled else 0,
        )
