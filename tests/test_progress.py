"""Progress bars on the long computations: on when asked, off when asked, and by default only on a terminal."""

import pytest

import explaind_math as em
from explaind_math import analysis
from explaind_math.progress import progress_bar
from explaind_math.testing.small_runs import blob_loss, recorded_blob_run


@pytest.fixture(scope="module")
def run():
    return recorded_blob_run(seed=9, num_test=2, steps=3)


@pytest.mark.parametrize("progress, shown", [(True, True), (False, False), (None, False)])
def test_decomposition_progress_bar(run, capsys, progress, shown):
    """None shows a bar only when stderr is a terminal (under pytest it is captured: no bar)."""
    model, trajectory, data, X_test = run
    em.decompose_adamw_training(model, trajectory, blob_loss, data, X_test, keep=("step",), progress=progress)
    err = capsys.readouterr().err
    assert ("decomposing steps" in err) is shown
    if shown:
        assert "3/3" in err


def test_quadrature_sweep_progress_bar(run, capsys):
    model, trajectory, data, X_test = run
    analysis.quadrature_fidelity(
        lambda q: em.decompose_adamw_training(model, trajectory, blob_loss, data, X_test, quadrature=q,
                                              keep=("step",), progress=False),
        nodes=(1, 2), progress=True)
    assert "quadrature fidelity" in capsys.readouterr().err


def test_progress_bar_passes_items_through():
    assert list(progress_bar(range(4), enabled=False, desc="x")) == [0, 1, 2, 3]
    assert list(progress_bar(range(4), enabled=True, desc="x")) == [0, 1, 2, 3]
