"""Appendix G.2 — reconstruct with the steps that changed a held-out loss most."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from torch import nn

from ..engine.options import DecompositionOptions, resolve_options, split_option_keywords
from ..features import FunctionalModel
from ..trajectory import Trajectory
from .engine_call import decompose_with_rule

__all__ = ["rank_steps_by_heldout_loss", "step_subsampling_fidelity"]


def rank_steps_by_heldout_loss(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    heldout: tuple[torch.Tensor, torch.Tensor],
    *,
    dtype: torch.dtype | None = None,
) -> list[tuple[int, float]]:
    """Steps ranked by |L_held(θ_{t+1}) − L_held(θ_t)|, largest first (MATH.md §9);
    L_held is the mean of ``loss_fn`` over the held-out batch ``(X, Y)``."""
    dtype = dtype or trajectory.dtype
    device = next(iter(model.parameters())).device
    fm = FunctionalModel(model, trajectory.parameter_names, dtype=dtype, device=device)
    X, Y = heldout
    X = X.to(device)
    X = X.to(dtype) if X.is_floating_point() else X
    Y = Y.to(device)

    def held_loss(t: int) -> float:
        theta = {n: trajectory.parameters[t][n].to(device=device, dtype=dtype) for n in trajectory.parameter_names}
        with torch.no_grad():
            return float(torch.stack([loss_fn(fm.output(theta, X[i]), Y[i]) for i in range(X.shape[0])]).mean())

    losses = [held_loss(t) for t in range(trajectory.num_steps + 1)]
    changes = [(t, abs(losses[t + 1] - losses[t])) for t in range(trajectory.num_steps)]
    return sorted(changes, key=lambda tc: -tc[1])


def _fidelity(f_final: torch.Tensor, reconstruction: torch.Tensor) -> tuple[float, float]:
    """(argmax agreement, mean KL(softmax f_N ‖ softmax reconstruction)) over test inputs (MATH.md §10)."""
    agreement = float((f_final.argmax(-1) == reconstruction.argmax(-1)).double().mean())
    logp = torch.log_softmax(f_final, -1)
    logq = torch.log_softmax(reconstruction, -1)
    kl = float((logp.exp() * (logp - logq)).sum(-1).mean())
    return agreement, kl


def step_subsampling_fidelity(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    train_data: Any,
    test_inputs: torch.Tensor,
    heldout: tuple[torch.Tensor, torch.Tensor],
    fractions: Sequence[float] = (0.1, 0.25, 0.5, 1.0),
    options: DecompositionOptions | None = None,
    **option_keywords: Any,
) -> list[dict]:
    """Appendix G.2: keep the top fraction q of steps by held-out loss change, reconstruct
    f(x; θ_0) + Σ_{t kept} (I_t + Ψ_t), and report fidelity against f(x; θ_N) for every q.

    Φ_t is computed only for the steps of the largest q (buffers still run over every step, since
    momentum carries gradients forward); smaller q's are sums over subsets of those steps.
    Returns one row per q: ``fraction``, ``steps_kept``, ``agreement`` (argmax), ``kl``,
    ``max_abs_error``. Rows with q < 1 are approximations by construction (labelled ``estimated``).
    """
    option_fields, target_arguments = split_option_keywords(option_keywords)
    opts = resolve_options(options, option_fields)
    ranking = [t for t, _ in rank_steps_by_heldout_loss(model, trajectory, loss_fn, heldout, dtype=opts.dtype)]
    counts = {q: max(1, int(round(q * trajectory.num_steps))) for q in fractions}
    largest = ranking[: max(counts.values())]
    result = decompose_with_rule(
        model, trajectory, loss_fn, train_data, test_inputs,
        statement="Appendix G.2, step subsampling", decompose_steps=largest, options=opts.replace(keep=("step",)),
        **target_arguments,
    )
    axes = ("step", "test", "output")
    per_step = result.kernel_sum(axes) + result.pseudo_unit_sum(axes)
    rows = []
    for q in fractions:
        kept = ranking[: counts[q]]
        reconstruction = result.f_initial + per_step[kept].sum(0)
        agreement, kl = _fidelity(result.f_final, reconstruction)
        rows.append({
            "fraction": q, "steps_kept": len(kept), "agreement": agreement, "kl": kl,
            "max_abs_error": float((result.f_final - reconstruction).abs().max()),
            "estimated": len(kept) < trajectory.num_steps,
        })
    return rows
