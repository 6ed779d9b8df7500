"""explaind_math.plots: every figure is drawn from a small recorded run and saved as a real PNG."""

from __future__ import annotations

import pytest
import torch

matplotlib = pytest.importorskip("matplotlib")
matplotlib.use("Agg")
import matplotlib.image  # noqa: E402

import explaind_math as em  # noqa: E402
from explaind_math import plots  # noqa: E402
from explaind_math.testing.small_runs import blob_loss, recorded_blob_run  # noqa: E402

STEPS = 6


_loss = blob_loss


@pytest.fixture(scope="module")
def run():
    model, trajectory, (X, Y), X_test = recorded_blob_run(seed=2, num_test=6, steps=STEPS)

    def decompose(quadrature=None, keep=("step", "param", "test", "unit", "output")):
        return em.decompose_adamw_training(model, trajectory, _loss, (X, Y), X_test, keep=keep,
                                           quadrature=quadrature or em.gauss_legendre(4), dtype=torch.float64)

    return {"decompose": decompose, "full": decompose()}


def assert_png_with_content(fig, path):
    assert fig.__class__.__name__ == "Figure"
    assert path.exists() and path.stat().st_size > 0
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    flat = pixels.reshape(-1, pixels.shape[-1])
    assert (flat != flat[0]).any(), "the image is one colour"


def test_influence_over_steps(run, tmp_path):
    path = tmp_path / "steps.png"
    fig = plots.plot_influence_over_steps(run["full"], path=path)
    assert_png_with_content(fig, path)
    assert len(fig.axes) == 4
    lines = fig.axes[1].get_lines()  # kernel importance per layer: one line per layer, one point per step
    assert [line.get_label() for line in lines] == ["0", "2"]
    assert all(len(line.get_xdata()) == STEPS for line in lines)


def test_influence_over_steps_needs_the_step_axis(run):
    with pytest.raises(ValueError, match="'step' axis"):
        plots.plot_influence_over_steps(run["decompose"](keep=("param", "test", "output")))


def test_test_train_kernel_grid(run, tmp_path):
    path = tmp_path / "kernel.png"
    fig = plots.plot_test_train_kernel(run["full"], [(0, 3), (3, STEPS)], path=path)
    assert_png_with_content(fig, path)
    images = [ax.get_images()[0] for ax in fig.axes if ax.get_images()]
    assert len(images) == 4  # 2 layers × 2 windows
    assert images[0].get_array().shape == (6, len(run["full"].units))


def test_similarity_grid(run, tmp_path):
    path = tmp_path / "similarity.png"
    fig = plots.plot_similarity_matrices(run["full"], [slice(0, 3), (3, STEPS)], layers=["2"], path=path)
    assert_png_with_content(fig, path)
    images = [ax.get_images()[0] for ax in fig.axes if ax.get_images()]
    assert len(images) == 2
    matrix = images[0].get_array()
    assert matrix.shape == (6, 6) and abs(float(matrix[0, 0]) - 1.0) < 1e-12


def test_pruning_curves(tmp_path):
    path = tmp_path / "pruning.png"
    sparsity = [0.1, 0.3, 0.5, 0.7]
    curves = {"ExPLAIND": {"sparsity": sparsity, "accuracy": [0.99, 0.97, 0.9, 0.7], "kl": [0.01, 0.05, 0.2, 0.6]},
              "magnitude": {"sparsity": sparsity, "accuracy": [0.98, 0.95, 0.85, 0.6], "kl": [0.1, 0.3, 0.7, 1.2]}}
    fig = plots.plot_pruning_curves(curves, path=path)
    assert_png_with_content(fig, path)
    assert [line.get_label() for line in fig.axes[0].get_lines()] == ["ExPLAIND", "magnitude"]
    with pytest.raises(ValueError, match="sparsity levels"):
        plots.plot_pruning_curves({"bad": {"sparsity": [0.1, 0.2], "accuracy": [1.0], "kl": [0.0, 0.1]}})


def test_quadrature_fidelity_from_a_run_and_precomputed(run, tmp_path):
    path = tmp_path / "fidelity.png"
    fig = plots.plot_quadrature_fidelity(decompose=lambda q: run["decompose"](q, keep=("test", "output")),
                                         nodes=(1, 2, 4), path=path)
    assert_png_with_content(fig, path)
    gauss = fig.axes[0].get_lines()[0]
    assert gauss.get_label() == "gauss_legendre" and gauss.get_ydata()[-1] < gauss.get_ydata()[0]
    precomputed = {"gauss_legendre": {8: run["full"], 4: 1e-10}}
    fig = plots.plot_quadrature_fidelity(precomputed, path=tmp_path / "given.png")
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [4, 8]
    with pytest.raises(ValueError, match="either"):
        plots.plot_quadrature_fidelity()
