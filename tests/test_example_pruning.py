"""examples/pruning.py --quick: pruning by accumulated importance vs magnitude (paper §4.1, MATH.md §10).

What must hold: the importance scores are Σ_{x,o} |Σ_{t,i} I[t, j, x, i, o]| of a decomposition certified
to the README's smooth-model tolerance (GL(8), float64); each sparsity s zeroes exactly round(s · D')
prunable coordinates — those with the lowest scores, nested as s grows — and never touches the output
layer; sparsity 0 reproduces the unpruned model; the evaluation inputs are disjoint from the importance
inputs and the training set. Which method wins is measured, not asserted (it need not hold in every run).
"""

import pathlib

import pytest
import torch
from explaind_math.testing.scripts import load_script

pytest.importorskip("sklearn")
pytest.importorskip("matplotlib")

SMOOTH_TOLERANCE = 1e-9
PATH = pathlib.Path(__file__).resolve().parents[1] / "examples" / "pruning.py"


def _load():
    return load_script(PATH, "pruning_example")


@pytest.fixture(scope="module")
def example():
    return _load()


@pytest.fixture(scope="module")
def quick_run(example):
    return example.run_pruning(quick=True, seed=0)


def test_importance_scores_come_from_a_certified_decomposition(quick_run):
    rows, ctx = quick_run
    result = ctx["result"]
    assert result.relative_residual <= SMOOTH_TOLERANCE
    # Imp(j) recomputed from the kernel tensor itself: |Σ_{t,i} I| per (j, x, o), summed over x and o
    kernel = result.kernel_sum(("param", "test", "output"))
    assert torch.allclose(ctx["scores"]["importance"], kernel.abs().sum(dim=(1, 2)), rtol=1e-12, atol=0)
    assert len(result.param_labels) == ctx["num_parameters"]


def test_every_sparsity_prunes_exactly_the_lowest_scores_and_never_the_output_layer(example, quick_run):
    rows, ctx = quick_run
    names, theta, prunable = ctx["names"], ctx["theta"], ctx["prunable"]
    d_prunable = int(prunable.sum())
    output = torch.cat([torch.full((theta[n].numel(),), n.startswith("output."), dtype=torch.bool) for n in names])
    assert torch.equal(prunable, ~output) and int(output.sum()) > 0
    flat_theta = example.flatten(theta, names)
    assert int((flat_theta == 0).sum()) == 0  # so every zero below was made by pruning
    for method, scores in ctx["scores"].items():
        dropped_before = torch.zeros_like(prunable)
        for sparsity in example.SPARSITIES:
            pruned, count = example.pruned_parameters(theta, scores, prunable, names, sparsity)
            row = next(r for r in rows if r["method"] == method and r["sparsity"] == sparsity)
            assert count == row["pruned"] == round(sparsity * d_prunable)
            flat = example.flatten(pruned, names)
            dropped = flat == 0
            assert int(dropped.sum()) == count and not bool((dropped & output).any())
            assert torch.equal(flat[~dropped], flat_theta[~dropped])  # the rest keep θ_N exactly
            for n in names:
                if n.startswith("output."):
                    assert torch.equal(pruned[n], theta[n])
            kept = prunable & ~dropped
            if count:
                assert float(scores[dropped].max()) <= float(scores[kept].min())  # the lowest scores go
            assert bool((dropped_before <= dropped).all())  # nested as the sparsity grows
            dropped_before = dropped


def test_zero_sparsity_reproduces_the_unpruned_model(quick_run):
    rows, ctx = quick_run
    for row in (r for r in rows if r["sparsity"] == 0.0):
        assert row["pruned"] == 0 and row["agreement"] == 1.0
        assert row["accuracy"] == ctx["unpruned_accuracy"]
        assert abs(row["kl"]) <= 1e-15
    assert all(r["kl"] >= -1e-15 and 0.0 <= r["accuracy"] <= 1.0 for r in rows)


def test_evaluation_inputs_are_held_out(quick_run):
    _, ctx = quick_run
    idx = ctx["data"].indices
    held, test, train = (set(idx[k].tolist()) for k in ("heldout", "test", "train"))
    assert held and not held & test and not held & train and not test & train
    assert ctx["result"].f_final.shape[0] == len(test)  # the importance inputs are the test split


def test_main_prints_the_table_and_draws_the_curves(example, tmp_path, capsys):
    out = tmp_path / "curves.png"
    rows = example.main(["--quick", "--out", str(out)])
    assert len(rows) == len(example.METHODS) * len(example.SPARSITIES)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "importance acc" in printed and "magnitude KL" in printed
