"""examples/table1_revisited.py --quick: the paper's Table 1 (Section 3.1) on three smooth recorded models and
two ReLU ones (the paper's kind: a ReLU/max-pool CNN and the paper's ReLU Transformer).

What must hold, and why:
- ReLU models: the default piecewise rule (MATH.md §13) ≤ 1e-9 relative, where GL(8) is not (kinks).
- GL(8) and adaptive GL(8): relative residual ≤ 1e-9 (README "Tolerances", smooth models; the quick runs'
  steps are small; the adaptive rule's per-step tolerance 1e-11 over 5 steps bounds the total by 5e-11).
- Wherever the relative residual δ is below 1e-9: EPK accuracy 1 and KL ≤ max|residual|²/2 + 1e-14
  (Hoeffding's lemma: KL(p ‖ softmax(z + r)) ≤ (max r − min r)²/8 ≤ max|r|²/2; 1e-14 covers the
  float64 rounding of log-softmax at logits of size O(10)).
- The midpoint rule is second order: its error ∝ 1/n², so going from 10 to 100 nodes divides the
  residual by ≈ 100 (asserted within [50, 200]) while it is above rounding.
"""

import pathlib

import pytest
from explaind_math.testing.scripts import load_script

pytest.importorskip("sklearn")

SMOOTH_TOLERANCE = 1e-9
PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "table1_revisited.py"


def _load():
    return load_script(PATH, "table1_revisited")


@pytest.fixture(scope="module")
def example():
    return _load()


@pytest.fixture(scope="module")
def rows(example):
    return example.main(["--quick"])


def _row(rows, model_prefix, rule):
    matches = [r for r in rows if r["model"].startswith(model_prefix) and r["rule"] == rule]
    assert len(matches) == 1, (model_prefix, rule)
    return matches[0]


MODELS = ("CNN", "Transformer", "ResNet")
#: the paper's kind of model: ReLU (and max-pooling), integrated between kinks by the default rule
RELU_MODELS = ("ReLU CNN", "ReLU Transformer")


def test_one_row_per_model_and_rule(example, rows):
    assert len(rows) == len(MODELS) * len(example.RULES) + len(RELU_MODELS) * len(example.RELU_RULES)
    for model in MODELS + RELU_MODELS:
        for label, _ in (example.RELU_RULES if model in RELU_MODELS else example.RULES):
            row = _row(rows, model, label)
            assert row["seconds"] > 0 and 0.0 <= row["epk_accuracy"] <= 1.0
    for label, n in [("midpoint(10)", 10), ("midpoint(100)", 100), ("gauss_legendre(2)", 2),
                     ("gauss_legendre(4)", 4), ("gauss_legendre(8)", 8)]:
        assert all(_row(rows, m, label)["nodes_per_step"] == n for m in MODELS)
    assert all(_row(rows, m, "adaptive GL(8)")["nodes_per_step"] >= 8 for m in MODELS)
    assert all(_row(rows, m, "hp-adaptive GL")["nodes_per_step"] >= 1 for m in MODELS)


@pytest.mark.parametrize("model", MODELS)
def test_gauss_legendre_8_and_adaptive_reach_the_smooth_tolerance(rows, model):
    for rule in ("gauss_legendre(8)", "adaptive GL(8)", "hp-adaptive GL"):
        assert _row(rows, model, rule)["relative_residual"] <= SMOOTH_TOLERANCE, rule


@pytest.mark.parametrize("model", RELU_MODELS)
def test_default_rule_is_exact_on_relu_models_where_gauss_legendre_8_is_not(rows, model):
    assert _row(rows, model, "piecewise (default)")["relative_residual"] <= SMOOTH_TOLERANCE
    assert _row(rows, model, "gauss_legendre(8)")["relative_residual"] > SMOOTH_TOLERANCE


@pytest.mark.parametrize("model", MODELS + RELU_MODELS)
def test_tiny_residual_means_same_decisions_and_distributions(rows, model):
    tiny = [r for r in rows if r["model"].startswith(model) and r["relative_residual"] <= SMOOTH_TOLERANCE]
    assert tiny  # at least GL(8)
    for r in tiny:
        assert r["epk_accuracy"] == 1.0, r["rule"]
        assert abs(r["kl"]) <= r["max_residual"] ** 2 / 2 + 1e-14, r["rule"]


@pytest.mark.parametrize("model", MODELS)
def test_midpoint_rule_is_second_order(rows, model):
    coarse, fine = _row(rows, model, "midpoint(10)"), _row(rows, model, "midpoint(100)")
    if fine["max_residual"] < 1e-12:
        pytest.skip("midpoint(100) already at rounding level")
    assert 50 <= coarse["max_residual"] / fine["max_residual"] <= 200


def test_unknown_model_is_refused(example):
    with pytest.raises(SystemExit):
        example.parse_args(["--models", "cnn,vgg"])
