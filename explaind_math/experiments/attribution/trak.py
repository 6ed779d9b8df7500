"""TRAK (Park et al., 2023, "TRAK: attributing model behavior at scale", ICML), in two implementations
of one method: a TRAK-STYLE random-projection baseline written here (:func:`trak_style_scores`), and
the ``traker`` package itself when it is importable (:func:`trak_package_scores`)."""

from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ...errors import ExplaindError
from .common import Params, ScalarOfOutput, cast_floating, class_mask, per_sample_gradients, true_class_output

__all__ = ["trak_kernel", "margin_output", "trak_style_scores", "trak_package_available", "trak_package_scores"]


def trak_kernel(train_features: torch.Tensor, ridge: float) -> torch.Tensor:
    """(ΦᵀΦ + λ I)⁻¹ for projected train features Φ (M × k), with λ = ridge · tr(ΦᵀΦ) / k, i.e. the
    ridge relative to the mean eigenvalue of ΦᵀΦ (scale-free; Park et al. use λ = 0 with k < M)."""
    k = train_features.shape[1]
    gram = train_features.T @ train_features
    lam = ridge * torch.trace(gram) / k
    return torch.linalg.inv(gram + lam * torch.eye(k, dtype=gram.dtype))


def margin_output(out: torch.Tensor, label: Any) -> torch.Tensor:
    """TRAK's model output for classification (Park et al., 2023, §3): the margin
    log(p_y / (1 − p_y)) = f_y − logsumexp_{o≠y} f_o."""
    out = out.reshape(-1)
    is_class = class_mask(out, label)
    own = torch.where(is_class, out, torch.zeros_like(out)).sum()
    return own - torch.logsumexp(out.masked_fill(is_class, float("-inf")), dim=0)


def trak_style_scores(
    model: nn.Module,
    final_params: Sequence[Params],
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    projection_dim: int = 512,
    ridge: float = 0.1,
    seed: int = 0,
    projections: Sequence[torch.Tensor] | None = None,
    test_output: ScalarOfOutput = true_class_output,
    dtype: torch.dtype = torch.float64,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """A TRAK-STYLE random-projection baseline implemented here (not the authors' code), after
    Park et al. (2023), eq. for τ_TRAK: for each trained model m with parameters θ*_m,

        Φ_m = G_m P_m,   G_m[i] = ∇_θ margin_i(θ*_m)          (train features, M × k)
        φ_m(x) = P_mᵀ ∇_θ f_o(x; θ*_m)                         (test features, o = true class)
        Q_m = diag(1 − p_i(θ*_m))                             (∂ loss / ∂ margin at θ*_m)
        τ(x, ·) = (1/E Σ_m φ_m(x)ᵀ (Φ_mᵀ Φ_m + λ I)⁻¹ Φ_mᵀ) · (1/E Σ_m Q_m)

    with P_m a D × k matrix of independent N(0, 1/k) entries (a Gaussian Johnson–Lindenstrauss map;
    ``projections`` overrides it), margin_i = log(p_yi/(1 − p_yi)) and the ridge λ of :func:`trak_kernel`.
    Simplified against the paper: Gaussian rather than Rademacher projection, a ridge term, no
    soft-thresholding of the scores, gradients of the whole parameter vector in float64, and the test
    side uses the true-class logit f_o (the quantity the LDS here predicts) instead of the margin.
    Positive = the sample raises f_o(x). Returns (test, M)."""
    X, Y = train_data
    if not final_params:
        raise ExplaindError("trak_style_scores needs at least one trained model's parameters")
    if projections is not None and len(projections) != len(final_params):
        raise ExplaindError(f"{len(projections)} projections for {len(final_params)} models")
    x_train, x_test = cast_floating(X, dtype), cast_floating(test_inputs, dtype)
    y_test = torch.as_tensor(test_labels)
    kernel_sum = torch.zeros(test_inputs.shape[0], X.shape[0], dtype=dtype)
    q_sum = torch.zeros(X.shape[0], dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    for m, params in enumerate(final_params):
        theta = {n: p.detach().to(dtype) for n, p in params.items()}
        g_train = per_sample_gradients(model, theta, margin_output, x_train, Y, chunk_size=chunk_size)
        g_test = per_sample_gradients(model, theta, test_output, x_test, y_test, chunk_size=chunk_size)
        if projections is not None:
            P = projections[m].to(dtype)
        else:
            P = torch.randn(g_train.shape[1], projection_dim, generator=generator, dtype=dtype)
            P = P / math.sqrt(projection_dim)
        phi_train, phi_test = g_train @ P, g_test @ P
        kernel_sum += phi_test @ trak_kernel(phi_train, ridge) @ phi_train.T
        with torch.no_grad():
            buffers = {n: b for n, b in model.named_buffers()}
            logits = functional_call(model, {**theta, **buffers}, (x_train,))
            p_true = torch.softmax(logits, dim=-1)[torch.arange(X.shape[0]), Y]
        q_sum += 1.0 - p_true
    count = len(final_params)
    return (kernel_sum / count) * (q_sum / count)


def trak_package_available() -> bool:
    """Whether the ``traker`` package (import name ``trak``) is importable."""
    try:
        import trak  # noqa: F401
    except ImportError:
        return False
    return True


def trak_package_scores(
    model: nn.Module,
    final_params: Sequence[Params],
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    projection_dim: int = 512,
    batch_size: int = 100,
    seed: int = 0,
) -> torch.Tensor:
    """TRAK scores from the ``traker`` package (Park et al., 2023) on CPU, task "image_classification"
    (margin outputs on both sides), float32, its BasicProjector (Gaussian), one checkpoint per model.

    ``projection_dim`` must exceed 100: traker 0.3.2's BasicProjector frees its matrix after
    featurizing and, with a single block of ≤ 100 columns, does not regenerate it before scoring
    (AttributeError). Returns (test, M) float64; positive = the sample raises the test margin."""
    import tempfile

    try:
        from trak import TRAKer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ExplaindError("the traker package is not installed (pip install traker)") from exc
    if projection_dim <= 100:
        raise ExplaindError("trak_package_scores: projection_dim must exceed 100 (traker 0.3.2 CPU projector bug)")
    X, Y = train_data
    work = _clone_float32(model)
    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(
            model=work, task="image_classification", train_set_size=X.shape[0], save_dir=save_dir,
            device="cpu", use_half_precision=False, proj_dim=projection_dim, projector_seed=seed,
            logging_level=40,
        )
        for m, params in enumerate(final_params):
            state = {n: p.detach().float() for n, p in params.items()}
            traker.load_checkpoint(state, model_id=m)
            for start in range(0, X.shape[0], batch_size):
                xs, ys = X[start : start + batch_size].float(), Y[start : start + batch_size]
                traker.featurize(batch=(xs, ys), num_samples=xs.shape[0])
        traker.finalize_features()
        for m, params in enumerate(final_params):
            state = {n: p.detach().float() for n, p in params.items()}
            traker.start_scoring_checkpoint(exp_name="lds", checkpoint=state, model_id=m,
                                            num_targets=test_inputs.shape[0])
            for start in range(0, test_inputs.shape[0], batch_size):
                xs = test_inputs[start : start + batch_size].float()
                ys = torch.as_tensor(test_labels)[start : start + batch_size]
                traker.score(batch=(xs, ys), num_samples=xs.shape[0])
        scores = np.array(traker.finalize_scores(exp_name="lds"))  # (M, test), copied out of the memmap
    return torch.as_tensor(scores, dtype=torch.float64).T.contiguous()


def _clone_float32(model: nn.Module) -> nn.Module:
    import copy

    work = copy.deepcopy(model).float()
    work.eval()
    return work
