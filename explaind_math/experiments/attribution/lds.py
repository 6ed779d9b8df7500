"""The linear datamodeling score (Ilyas et al., 2022; Park et al., 2023; MATH.md §10): how well
Σ_{i∈S} score(x, i) ranks the outputs f_o(x; θ_S) of models retrained on subsets S."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ...errors import ExplaindError

__all__ = ["spearman_per_row", "LDSResult", "linear_datamodeling_score"]


def spearman_per_row(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation between a[r] and b[r] for every row r (average ranks for ties);
    NaN for a row where either side is constant (no ranking to correlate)."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ExplaindError(f"spearman_per_row needs two arrays of one 2-d shape, got {a.shape} and {b.shape}")
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(axis=1) / denom
    rho[denom == 0] = np.nan
    return np.clip(rho, -1.0, 1.0)


@dataclass
class LDSResult:
    """Linear datamodeling score: ``per_test[x]`` the Spearman correlation over subsets between
    f_o(x; θ_S) and Σ_{i∈S} score(x, i); ``value`` their mean over test inputs (NaN rows dropped,
    counted in ``undefined``); ``standard_error`` the bootstrap standard deviation of ``value`` over
    subsets resampled with replacement (an ESTIMATE; NaN when no resamples were asked for)."""

    value: float
    per_test: np.ndarray
    undefined: int = 0
    standard_error: float = float("nan")
    predictions: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)


def _mean_spearman(predictions: np.ndarray, outputs: np.ndarray) -> tuple[float, np.ndarray]:
    rho = spearman_per_row(predictions.T, outputs.T)
    defined = ~np.isnan(rho)
    return (float(rho[defined].mean()) if defined.any() else float("nan")), rho


def linear_datamodeling_score(
    scores: torch.Tensor,
    subsets: torch.Tensor,
    outputs: torch.Tensor,
    *,
    resamples: int = 0,
    seed: int = 0,
) -> LDSResult:
    """LDS (Ilyas et al., 2022; Park et al., 2023; MATH.md §10): with predictions
    g_k(x) = Σ_{i∈S_k} scores[x, i] and ground truth ``outputs[k, x]`` = f_o(x; θ_{S_k}),

        LDS = mean_x  Spearman_k( g_k(x), f_o(x; θ_{S_k}) ).

    ``scores`` (test, M), ``subsets`` boolean (K, M), ``outputs`` (K, test). With ``resamples`` > 0,
    the standard error is estimated by a bootstrap over the K subsets (all test inputs share the
    subsets, so their correlations are not independent and the spread over test inputs understates it)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    subsets = torch.as_tensor(subsets)
    outputs = torch.as_tensor(outputs, dtype=torch.float64)
    if subsets.dtype != torch.bool or subsets.dim() != 2 or subsets.shape[1] != scores.shape[1]:
        raise ExplaindError(
            f"subsets must be a boolean (K, M) mask with M = {scores.shape[1]} training samples, got "
            f"{subsets.dtype} of shape {tuple(subsets.shape)}"
        )
    if outputs.shape != (subsets.shape[0], scores.shape[0]):
        raise ExplaindError(
            f"outputs must have shape (subsets, test) = {(subsets.shape[0], scores.shape[0])}, "
            f"got {tuple(outputs.shape)}"
        )
    if subsets.shape[0] < 3:
        raise ExplaindError(f"a rank correlation over subsets needs at least 3 subsets, got {subsets.shape[0]}")
    predictions = (subsets.double() @ scores.T).numpy()  # (K, test)
    truth = outputs.numpy()
    value, rho = _mean_spearman(predictions, truth)
    standard_error = float("nan")
    if resamples > 0:
        rng = np.random.default_rng(seed)
        k = predictions.shape[0]
        draws = [_mean_spearman(predictions[idx], truth[idx])[0] for idx in rng.integers(0, k, size=(resamples, k))]
        standard_error = float(np.nanstd(draws, ddof=1))
    return LDSResult(value=value, per_test=rho, undefined=int(np.isnan(rho).sum()),
                     standard_error=standard_error, predictions=predictions)
