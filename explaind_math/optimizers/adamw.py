"""Theorem 3.1 — AdamW (and Adam), as PyTorch implements them (MATH.md §2).

Let η_t, λ_t, (β1, β2), ε be ``lr``, ``weight_decay``, ``betas``, ``eps`` of the parameter's group at
step t, k its own step count after the update, and v_t its ``exp_avg_sq`` (``max_exp_avg_sq`` with
``amsgrad``) after the update, taken from the real run (v is never unrolled). Then

    P_t = 1 / ((1 − β1^k) (sqrt(v_t) / sqrt(1 − β2^k) + ε))
    m_t = β1 m_{t−1} + (1 − β1) s g_t                 (s = −1 with ``maximize``)
    θ_{t+1} − θ_t = −η_t λ_t θ_t − η_t P_t ⊙ m_t       (decoupled decay, AdamW)

so in the template of §4: A = β1, C = 1 − β1, D = η_t P_t, E = 0, ρ = η_t λ_t, κ = 0.
``torch.optim.Adam`` with ``decoupled_weight_decay=False`` adds λ θ_t to the gradient before both
moments; since v_t is recorded, that stays linear: κ = λ_t, ρ = 0 (the decay unit flows through m).
"""

from __future__ import annotations

import torch

from .template import LinearOptimizerRule, StepCoefficients, refuse_flag, scalar, sqrt

__all__ = ["AdamWRule", "adamw_preconditioner"]


def adamw_preconditioner(v, k, beta1, beta2, eps):
    """P = 1 / ((1 − β1^k)(sqrt(v) / sqrt(1 − β2^k) + ε)), PyTorch's bias-corrected Adam preconditioner."""
    return 1 / ((1 - beta1**k) * (sqrt(v) / sqrt(1 - beta2**k) + eps))


class AdamWRule(LinearOptimizerRule):
    """torch.optim.AdamW and torch.optim.Adam: every flag handled exactly.

    ``amsgrad`` (P from the running maximum of v), ``maximize`` (s = −1), ``decoupled_weight_decay``
    (ρ vs κ), tensor-valued ``lr``/``betas`` (read per step); ``foreach``, ``fused``, ``capturable`` and
    ``differentiable`` change only the implementation. Complex parameters are refused.
    """

    name = "adamw"
    optimizer_classes = (torch.optim.AdamW, torch.optim.Adam)
    example_settings = (
        {"lr": 0.02}, {"lr": 0.02, "weight_decay": 0.1, "amsgrad": True}, {"lr": 0.02, "maximize": True},
        {"lr": 0.02, "betas": (0.8, 0.99), "eps": 1e-6, "weight_decay": 0.05},
        {"optimizer_class": torch.optim.Adam, "lr": 0.02, "weight_decay": 0.1},
        {"optimizer_class": torch.optim.Adam, "lr": 0.02, "weight_decay": 0.1, "amsgrad": True},
    )
    recorded_state = ("exp_avg_sq", "max_exp_avg_sq")
    buffer_state_key = "exp_avg"
    group_defaults = {"betas": (0.9, 0.999), "eps": 1e-8, "amsgrad": False, "maximize": False}

    def needs_step_count(self) -> bool:
        return True

    def hyperparameters(self, group: dict) -> dict:
        self._check_known_flags(
            group, {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "decoupled_weight_decay"}
        )
        beta1, beta2 = group["betas"]
        hyper = {
            "lr": scalar(group["lr"]),
            "beta1": scalar(beta1),
            "beta2": scalar(beta2),
            "eps": scalar(group["eps"]),
            "weight_decay": scalar(group["weight_decay"]),
            "amsgrad": bool(group.get("amsgrad", False)),
            "maximize": bool(group.get("maximize", False)),
            # torch.optim.AdamW is Adam with decoupled_weight_decay=True
            "decoupled_weight_decay": bool(group.get("decoupled_weight_decay", True)),
        }
        if not 0.0 <= hyper["beta1"] < 1.0:
            raise refuse_flag(self.name, "betas[0]", hyper["beta1"], "β1 must lie in [0, 1)")
        self._check_scalar_precision(group)
        return hyper

    def _check_scalar_precision(self, group: dict) -> None:
        """Refuse what makes torch round the step in a coarser dtype than the parameters'.

        Outside the fused kernel, torch computes the bias corrections and the step size as tensors of
        the dtype of a tensor ``lr``/``betas``, and under ``capturable``/``differentiable`` of
        ``state['step']`` (float32 unless ``torch.get_default_dtype()`` is float64). With float64
        parameters that rounds every update to float32 precision, which no float64 replay reproduces.
        Only a live group (with its ``params``) is checked; recorded values are plain floats.
        """
        params = [p for p in group.get("params", ()) if isinstance(p, torch.Tensor) and p.is_floating_point()]
        if not params or group.get("fused"):
            return
        finest = min(torch.finfo(p.dtype).eps for p in params)
        finest_dtype = next(p.dtype for p in params if torch.finfo(p.dtype).eps == finest)

        def coarse(dtype) -> bool:
            return dtype.is_floating_point and torch.finfo(dtype).eps > finest

        betas = group.get("betas", ())
        for flag, value in (("lr", group.get("lr")), ("betas[0]", betas[0] if betas else None),
                            ("betas[1]", betas[1] if len(betas) > 1 else None)):
            if isinstance(value, torch.Tensor) and coarse(value.dtype):
                raise refuse_flag(
                    self.name, flag, value,
                    f"a {value.dtype} tensor makes torch compute the step size and bias corrections in "
                    f"{value.dtype}, coarser than the {finest_dtype} parameters; pass a Python float or a "
                    f"{finest_dtype} tensor",
                )
        for flag in ("capturable", "differentiable"):
            step_dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
            if group.get(flag) and coarse(step_dtype):
                raise refuse_flag(
                    self.name, flag, True,
                    f"with it torch computes the bias corrections in the dtype of state['step'] ({step_dtype}, "
                    f"from torch.get_default_dtype()), coarser than the {finest_dtype} parameters; call "
                    "torch.set_default_dtype(torch.float64) before the first step, or leave the flag off",
                )

    def state_keys(self, hyper: dict) -> tuple[str, ...]:
        return ("max_exp_avg_sq",) if hyper["amsgrad"] else ("exp_avg_sq",)

    def coefficients(self, hyper: dict, state: dict, *, first_update: bool) -> StepCoefficients:
        beta1, lr, wd = hyper["beta1"], hyper["lr"], hyper["weight_decay"]
        v = state["max_exp_avg_sq"] if hyper["amsgrad"] else state["exp_avg_sq"]
        P = adamw_preconditioner(v, state["step"], beta1, hyper["beta2"], hyper["eps"])
        decoupled = hyper["decoupled_weight_decay"]
        return StepCoefficients(
            A=beta1,
            C=1 - beta1,
            D=lr * P,
            E=0,
            gradient_sign=-1 if hyper["maximize"] else 1,
            decay_coupled=0 if decoupled else wd,
            decay_decoupled=lr * wd if decoupled else 0,
        )
