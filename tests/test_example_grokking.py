"""examples/grokking.py --quick: every analysis step runs and what must hold, holds.

Grokking itself is not asserted (the quick run is 40 steps on p = 7); asserted are the certificate
(float64, Gauss–Legendre with 8 nodes on a GELU Transformer: the README's smooth-model tolerance
1e-9 · (1 + |Δf|)), shapes, the cosine fit's invariants, and that the PNGs hold a picture.
"""

import math
import sys
from pathlib import Path

import numpy as np
import pytest
from explaind_math.testing.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "grokking.py"


@pytest.fixture(scope="module")
def grokking():
    try:
        yield load_script(SCRIPT, "example_grokking")
    finally:
        sys.modules.pop("example_grokking", None)


@pytest.fixture(scope="module")
def quick(grokking, tmp_path_factory):
    out = tmp_path_factory.mktemp("grokking")
    return grokking.main(["--quick", "--out", str(out)]), out


def test_quick_run_decomposes_every_step_within_the_smooth_model_tolerance(quick):
    results, _ = quick
    t, d = results["training"], results["decomposition"]
    p = results["config"]["p"]
    assert t["steps"] == results["config"]["max_steps"]  # no early stop in quick mode
    assert d["kernel_axes"] == ["step", "param", "test", "output"]
    assert d["kernel_shape"] == [t["steps"], len(d["layers"]), p, p]
    assert set(d["layers"]) == {"embedding", "attention encoder", "attention decoder", "linear 1", "linear 2", "decoder"}
    assert d["nodes_per_step_mean"] == 8 and d["nodes_total"] == 8 * t["steps"]
    assert d["max_abs_change"] > 1e-2  # training moved the logits: the identity is not met trivially
    assert d["max_residual"] <= 1e-9 * (1 + d["max_abs_change"])
    assert d["max_replay_error"] <= 1e-8


def test_cosine_fit_and_fourier_frequencies_are_well_formed(quick):
    results, _ = quick
    p = results["config"]["p"]
    assert results["similarity_shape"] == [p, p]
    fits = [f for f in results["cosine_fit"].values() if f is not None]
    assert fits, "every layer's similarity matrix was undefined"
    for fit in fits:
        assert fit["frequencies"] == list(range(1, p // 2 + 1))
        assert isinstance(fit["dominant_frequency"], int) and 1 <= fit["dominant_frequency"] <= p // 2
        assert 0.0 <= fit["dominant_explained"] <= 1.0 and 0.0 <= fit["r2_all_frequencies"] <= 1.0
        # one frequency alone cannot explain more than all of them together
        assert fit["dominant_explained"] <= fit["r2_all_frequencies"] + 1e-12
        assert fit["dominant_explained"] == max(fit["explained_alone"])
    embedding = results["embedding_frequencies"]
    assert math.isclose(sum(embedding["fraction"]), 1.0, rel_tol=1e-12)
    assert sorted(embedding["top"]) == list(range(1, p // 2 + 1))
    assert isinstance(results["frequencies_agree"], bool)


def test_plots_are_written_and_not_blank(quick):
    from matplotlib.image import imread

    results, out = quick
    assert set(results["plots"]) == {"influence_over_steps", "similarity", "cosine_features"}
    for path in results["plots"].values():
        image = imread(path)
        assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
        assert np.asarray(image[..., :3]).std() > 0.01  # more than one colour
    assert (out / "results.json").stat().st_size > 0


def test_cosine_fit_recovers_a_planted_frequency(grokking):
    """On S[a, a′] = 0.2 + 0.7 cos(2π·3(a − a′)/p) + 0.1 cos(2π·1(a − a′)/p) the fit finds k = 3, the
    coefficients exactly (the model holds without noise), and R² = 1."""
    p = 13
    a = np.arange(p)
    diff = a[:, None] - a[None, :]
    S = 0.2 + 0.7 * np.cos(2 * np.pi * 3 * diff / p) + 0.1 * np.cos(2 * np.pi * diff / p)
    fit = grokking.cosine_features(S)
    assert fit["dominant_frequency"] == 3
    assert np.allclose(fit["coefficients"], [0.1, 0, 0.7, 0, 0, 0], atol=1e-10)
    assert math.isclose(fit["r2_all_frequencies"], 1.0, rel_tol=1e-12)
    assert 0.9 < fit["dominant_explained"] < 1.0
    assert grokking.cosine_features(np.full((p, p), np.nan)) is None
    assert grokking.cosine_features(np.ones((p, p))) is None  # constant: no variance to explain


def test_fourier_power_finds_the_frequency_of_a_planted_embedding(grokking):
    import torch

    p, k = 11, 4
    a = torch.arange(p, dtype=torch.float64)
    rows = torch.stack([torch.cos(2 * math.pi * k * a / p), torch.sin(2 * math.pi * k * a / p), torch.ones(p)], 1)
    power = grokking.fourier_power(rows)
    assert power["top"][0] == k and math.isclose(power["top_fraction"][0], 1.0, rel_tol=1e-12)
