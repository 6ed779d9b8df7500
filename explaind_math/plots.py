"""Figures of the paper, one call on a result each (matplotlib, imported inside the functions).

Every function returns a ``matplotlib.figure.Figure`` (not registered with pyplot, so nothing stays
open) and saves it as PNG when ``path`` is given. ``pip install explaind_math[analysis]``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from . import analysis
from .influence import Influence

__all__ = [
    "plot_influence_over_steps",
    "plot_test_train_kernel",
    "plot_similarity_matrices",
    "plot_pruning_curves",
    "plot_quadrature_fidelity",
]


def _new_figure(rows: int, cols: int, panel_size: tuple[float, float] = (4.0, 3.2)):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError("explaind_math.plots needs matplotlib: pip install explaind_math[analysis]") from error
    fig = Figure(figsize=(panel_size[0] * cols, panel_size[1] * rows), layout="constrained")
    axes = np.asarray(fig.subplots(rows, cols, squeeze=False))
    return fig, axes


def _finish(fig, path: str | Path | None):
    if path is not None:
        fig.savefig(Path(path), format="png", dpi=100)
    return fig


def _group_names(result: Influence, groups, layers, parameter_names) -> list[str] | None:
    if "param" not in result.kernel_axes:
        if layers is not None:
            raise ValueError("this result summed the parameter axis: no layers to select; decompose with 'param' in keep")
        return None
    names = list(dict.fromkeys(analysis.parameter_groups(result, groups, parameter_names).values()))
    return names if layers is None else ([layers] if isinstance(layers, str) else list(layers))


def plot_influence_over_steps(result: Influence, *, groups: Any = "layer", parameter_names: Sequence[str] | None = None,
                              relative: str = "difference", path: str | Path | None = None):
    """Kernel and regularization influence over the training steps (paper Figure 3a).

    Panels: Imp_I(t) and Imp_Ψ(t) per step (all parameters); per parameter group: Imp_I(t, J),
    Imp_Ψ(t, J) and the relative regularization influence ρ(t, J) (``relative``: "ratio" or
    "difference", see :func:`~explaind_math.analysis.relative_regularization_influence`). Importance is
    Σ_{x,o} |·|. Needs the step axis; the per-group panels need the parameter axis."""
    if "step" not in result.kernel_axes:
        raise ValueError("plotting over steps needs a result that kept the 'step' axis")
    steps = list(result.steps)
    per_group = "param" in result.kernel_axes
    fig, axes = _new_figure(2 if per_group else 1, 2 if per_group else 1)
    ax = axes[0, 0]
    ax.plot(steps, analysis.accumulated_importance(result, ("step",)).numpy(), label="kernel Imp_I")
    ax.plot(steps, analysis.accumulated_regularization_importance(result, ("step",)).numpy(), label="regularization Imp_Ψ")
    ax.set(title="kernel vs regularization", xlabel="step", ylabel="importance (Σ over x, o of |·|)")
    ax.legend(fontsize="small")
    if per_group:
        selection = dict(groups=groups, parameter_names=parameter_names)
        panels = [
            (axes[0, 1], analysis.accumulated_importance(result, ("step", "param"), **selection), "kernel importance per group"),
            (axes[1, 0], analysis.accumulated_regularization_importance(result, ("step", "param"), **selection),
             "regularization importance per group"),
            (axes[1, 1], analysis.relative_regularization_influence(result, ("step", "param"), form=relative, **selection),
             f"relative regularization influence ({relative})"),
        ]
        for ax, acc, title in panels:
            values = acc.numpy()
            for k, name in enumerate(acc.coords["param"]):
                ax.plot(steps, values[:, k], label=str(name))
            ax.set(title=title, xlabel="step")
            ax.legend(fontsize="small")
    return _finish(fig, path)


def _window_label(window) -> str:
    if isinstance(window, slice):
        return f"steps {window.start if window.start is not None else 0}:{window.stop if window.stop is not None else 'end'}"
    return f"steps {window[0]}:{window[1]}"


def _steps_of(result: Influence, window):
    """One window as a selection: a slice stays a slice, (start, stop) becomes the list of its steps."""
    if window is None or isinstance(window, slice):
        return window
    start, stop = window
    chosen = [k for k, s in enumerate(result.steps) if start <= s < stop]
    if not chosen:
        raise ValueError(f"the step window ({start}, {stop}) holds none of the result's steps")
    return chosen


def _matrix_grid(result, windows, layers, groups, parameter_names, compute, title, symmetric_limit, path, **imshow):
    if windows is None:
        windows = [None]
    if windows != [None] and "step" not in result.kernel_axes:
        raise ValueError("step windows need a result that kept the 'step' axis")
    names = _group_names(result, groups, layers, parameter_names)
    rows = names if names is not None else [None]
    fig, axes = _new_figure(len(rows), len(windows), (3.6, 3.2))
    for r, layer in enumerate(rows):
        for c, window in enumerate(windows):
            selection = dict(steps=_steps_of(result, window))
            if layer is not None:
                selection.update(params=layer, groups=groups, parameter_names=parameter_names)
            matrix = compute(selection)
            ax = axes[r, c]
            limit = symmetric_limit if symmetric_limit is not None else float(np.nanmax(np.abs(matrix))) or 1.0
            image = ax.imshow(matrix, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect="auto", interpolation="nearest")
            ax.set_title(f"{title}, J = {layer if layer is not None else 'all parameters'}\n"
                         f"{_window_label(window) if window is not None else 'all steps'}", fontsize="small")
            ax.set(**imshow)
            fig.colorbar(image, ax=ax, shrink=0.8)
    return _finish(fig, path)


def plot_test_train_kernel(result: Influence, windows: Sequence | None = None, *, layers: Sequence[str] | str | None = None,
                           groups: Any = "layer", outputs=None, parameter_names: Sequence[str] | None = None,
                           path: str | Path | None = None):
    """Test × train kernel matrices I(S, J, x, i) = Σ_{t∈S, j∈J, o} I[t, j, x, i, o] (paper Figure 4),
    one row per layer J (``layers``: group names under ``groups``; all when None) and one column per
    step window S (``(start, stop)`` or a slice; None: all steps). Needs the unit axis."""
    if "unit" not in result.kernel_axes:
        raise ValueError("the test × train kernel needs a result that kept the 'unit' axis")

    def compute(selection):
        return analysis.test_train_kernel(result, outputs=outputs, **selection).numpy()

    return _matrix_grid(result, list(windows) if windows is not None else None, layers, groups, parameter_names,
                        compute, "kernel I(S, J, x, i)", None, path, xlabel="training sample", ylabel="test input")


def plot_similarity_matrices(result: Influence, windows: Sequence | None = None, *,
                             layers: Sequence[str] | str | None = None, groups: Any = "layer",
                             sum_over: Sequence[str] = (), parameter_names: Sequence[str] | None = None,
                             path: str | Path | None = None):
    """Cosine-similarity matrices between test inputs (paper Figure 5), one row per layer and one column
    per step window, as :func:`~explaind_math.analysis.similarity_matrix` (colour scale [−1, 1])."""

    def compute(selection):
        return analysis.similarity_matrix(result, sum_over=sum_over, **selection).numpy()

    return _matrix_grid(result, list(windows) if windows is not None else None, layers, groups, parameter_names,
                        compute, "cosine similarity", 1.0, path, xlabel="test input", ylabel="test input")


def plot_pruning_curves(curves: Mapping[str, Mapping[str, Sequence[float]]], *,
                        metrics: Sequence[str] = ("accuracy", "kl"), path: str | Path | None = None):
    """Pruning curves (paper Figure 2): ``curves[method] = {"sparsity": [...], "accuracy": [...], "kl": [...]}``;
    one panel per metric, one line per method, against sparsity."""
    if not curves:
        raise ValueError("no pruning curves given")
    fig, axes = _new_figure(1, len(metrics))
    for ax, metric in zip(axes[0], metrics):
        for method, data in curves.items():
            if "sparsity" not in data or metric not in data:
                raise ValueError(f"curve {method!r} needs 'sparsity' and {metric!r}")
            sparsity, values = np.asarray(data["sparsity"], dtype=float), np.asarray(data[metric], dtype=float)
            if sparsity.shape != values.shape:
                raise ValueError(f"curve {method!r}: {len(sparsity)} sparsity levels but {len(values)} {metric} values")
            ax.plot(sparsity, values, marker="o", label=str(method))
        ax.set(xlabel="sparsity", ylabel=metric, title=metric)
        ax.legend(fontsize="small")
    return _finish(fig, path)


def plot_quadrature_fidelity(fidelity: Mapping[str, Mapping[int, Any]] | None = None, *,
                             decompose: Callable[[Any], Influence] | None = None, nodes: Sequence[int] = (1, 2, 4, 8),
                             rules: Sequence[str] = ("gauss_legendre", "midpoint"), progress: bool = False,
                             path: str | Path | None = None):
    """Reconstruction fidelity against the number of quadrature nodes n: the relative residual
    max |f(θ_N) − reconstruction| / (1 + |f(θ_N) − f(θ_0)|), log scale.

    Either ``fidelity = {rule: {n: Influence or relative residual}}`` (precomputed), or ``decompose``, a
    callable quadrature → Influence (e.g. ``lambda q: em.decompose_adamw_training(model, trajectory,
    loss_fn, data, X_test, quadrature=q, keep=("test", "output"))``), run for every rule and n."""
    if (fidelity is None) == (decompose is None):
        raise ValueError("give either fidelity (precomputed) or decompose (a callable quadrature → Influence)")
    if decompose is not None:
        fidelity = analysis.quadrature_fidelity(decompose, nodes, rules, progress=progress)
    fig, axes = _new_figure(1, 1, (5.0, 3.6))
    ax = axes[0, 0]
    floor = np.finfo(np.float64).eps / 10  # an exact zero cannot be drawn on a log scale
    for rule, by_n in fidelity.items():
        ns = sorted(int(n) for n in by_n)
        values = [v.relative_residual if isinstance(v, Influence) else float(v) for v in (by_n[n] for n in ns)]
        ax.plot(ns, np.maximum(values, floor), marker="o", label=rule)
    ax.set(xscale="log", yscale="log", xlabel="quadrature nodes per step", ylabel="relative residual",
           title="reconstruction fidelity")
    ax.legend(fontsize="small")
    return _finish(fig, path)
