"""Corollary 3.3 (ii) — decompose an intermediate activation a(x; θ_N) (MATH.md §6)."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn
from torch.func import functional_call

from ..errors import ExplaindError
from ..engine import DecompositionOptions
from ..influence import Influence
from ..trajectory import Trajectory
from .engine_call import decompose_with_rule
from .reference import ReferenceDecomposition, decompose_with_features
from .reference_features import train_features

__all__ = ["decompose_activation", "reference_activation"]


def decompose_activation(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    train_data: Any,
    test_inputs: torch.Tensor,
    module: str,
    *,
    select: Callable[[torch.Tensor], torch.Tensor] | None = None,
    options: DecompositionOptions | None = None,
    **option_keywords: Any,
) -> Influence:
    """Corollary 3.3 (ii): decompose the output a(x; θ) of the submodule named ``module``
    (e.g. ``"encoder.layers.0.attn"``), without changing the model's code:

        Φ^a_t(x) = ∫_0^1 ∂_θ a(x; θ_t(α)) dα,     a(x; θ_N) = a(x; θ_0) + Σ I^a + Σ Ψ^a

    Parameters used only after the activation have ∂_θ a = 0, so they contribute exactly zero.
    ``select`` picks part of the activation (one example, no batch axis), e.g. one position of a
    residual stream: ``select=lambda a: a[2]``. The forward pass stops at the module.
    """
    h = None if select is None else (lambda value, label: select(value))
    return decompose_with_rule(
        model, trajectory, loss_fn, train_data, test_inputs,
        statement=f"Corollary 3.3 (ii), activation {module!r}", activation=module, h=h, options=options, **option_keywords,
    )


class _ActivationReached(Exception):
    """Raised by the forward hook: carries a(x; θ) out, the rest of the forward pass is not run."""

    def __init__(self, value: torch.Tensor):
        super().__init__()
        self.value = value


def reference_activation(model: nn.Module, trajectory: Trajectory, loss_fn, train_data, test_inputs: torch.Tensor,
                         module: str, *, select: Callable[[torch.Tensor], torch.Tensor] | None = None,
                         nodes: int = 8) -> ReferenceDecomposition:
    """The specification implementation of Corollary 3.3 (ii): the T_t(i), R_t of the run's optimizer
    (Theorem 3.1, Corollary 3.2 or the §4 template:
    :func:`~explaind_math.theorems.reference_features.train_features`) with

        Φ^a_t(x) = Σ_k w_k ∂_θ a(x; θ_t + α_k Δθ_t)      a = the output of submodule ``module`` (``select``-ed),
                                                        the forward stopped there by a forward hook
        I^a[t, j, x, i, o] = −η_t Φ^a_t(x)[o, j] T_t(i)[j],   Ψ^a[t, j, x, o] = −η_t Φ^a_t(x)[o, j] R_t[j]

    so that a(x; θ_N) = a(x; θ_0) + Σ I^a + Σ Ψ^a; parameters after the module get ∂_θ a = 0. Refuses what
    :func:`~explaind_math.theorems.linear_optimizers.reference_template` refuses.
    """
    submodules = dict(model.named_modules())
    if module not in submodules or module == "":
        raise ExplaindError(f"the model has no submodule named {module!r}")

    def activation(params: dict, x: torch.Tensor, label: Any) -> torch.Tensor:
        def stop(_module, _inputs, output):
            raise _ActivationReached(output)

        handle = submodules[module].register_forward_hook(stop)
        try:
            functional_call(model, params, (x.unsqueeze(0),))
        except _ActivationReached as reached:
            a = reached.value.squeeze(0)
        else:
            raise ExplaindError(f"the forward pass did not call submodule {module!r}")
        finally:
            handle.remove()
        return a if select is None else select(a)

    eta, T, R = train_features(model, trajectory, loss_fn, train_data, "reference_activation")
    return decompose_with_features(activation, trajectory, test_inputs, eta, T, R, units=trajectory.sample_ids(),
                                   nodes=nodes)
