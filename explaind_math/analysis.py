"""Accumulations of the tensor of influences (MATH.md §5, paper Section 4) and their export.

    I(S, J, X, U, O) = Σ_{t∈S} Σ_{j∈J} Σ_{x∈X} Σ_{i∈U} Σ_{o∈O} I[t, j, x, i, o]      (accumulated influence)

An axis that is kept is not summed: ``keep=("step", "param")`` gives one value per step and
parameter group, summed over the selected test inputs, units and outputs. Every function is pure: it
reads an :class:`~explaind_math.Influence` and returns a labelled tensor, :class:`Accumulated`.

Selections (keyword arguments shared by every function):

* ``steps``: None (all), a ``slice`` of step positions, a list of step indices, or a list of
  ``(start, stop)`` windows (half-open, in step indices). With windows the step axis becomes one
  entry per window, Σ_{t∈window}; it must then be kept.
* ``groups``: how the parameter axis is grouped before selecting: None (the result's own labels),
  ``"tensor"``, ``"module"``, ``"layer"`` or a mapping name → group (keys: the result's labels, or
  for a result decomposed per coordinate, the tensor names). See :func:`parameter_groups`.
* ``params``: a group name or a list of group names (after grouping) to restrict J to.
* ``tests``, ``outputs``: an index, a list of indices or a slice; ``units``: a unit id or a list of ids.

pandas and xarray are imported inside the export functions only (``pip install explaind_math[analysis]``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .errors import ExplaindError, QueryRangeError
from .influence import AXES, Influence
from .query_range import positions

__all__ = [
    "Accumulated",
    "SOURCES",
    "parameter_groups",
    "layer_of",
    "accumulated_influence",
    "accumulated_importance",
    "accumulated_regularization_influence",
    "accumulated_regularization_importance",
    "relative_regularization_influence",
    "similarity_matrix",
    "test_train_kernel",
    "quadrature_fidelity",
    "to_numpy",
    "to_pandas",
    "to_xarray",
]

#: the tensors a function can accumulate: I, Ψ, Ξ, the penalty's, the recorded gradients' rounding, all pseudo-units
#: (Ψ + Ξ + penalty + rounding), and Σ_U I + all pseudo-units
SOURCES = ("kernel", "regularization", "carried_state", "penalty", "gradient_rounding", "pseudo_units", "total")

_COORDINATE_LABEL = re.compile(r"^(.*)\[(\d+)\]$")


@dataclass
class Accumulated:
    """A labelled tensor: ``values`` with axes ``axes`` and one coordinate list per axis in ``coords``."""

    values: torch.Tensor
    axes: tuple[str, ...]
    coords: dict[str, list] = field(default_factory=dict)
    source: str = "kernel"

    def numpy(self) -> np.ndarray:
        return self.values.detach().cpu().numpy()

    def __repr__(self) -> str:
        shape = ", ".join(f"{a}={len(self.coords.get(a, []))}" for a in self.axes)
        return f"Accumulated({self.source}, {shape or 'scalar'})"


# ---------------------------------------------------------------------------------------- parameters
def layer_of(name: str) -> str:
    """The layer of a parameter (or module) name: the prefix up to its first numeric component
    (``"encoder.layers.3.attn.weight"`` → ``"encoder.layers.3"``, ``"0.weight"`` → ``"0"``), else its
    first component (``"decoder.weight"`` → ``"decoder"``)."""
    parts = name.split(".")
    for k, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[: k + 1])
    return parts[0]


def _tensor_of(label: str) -> str:
    match = _COORDINATE_LABEL.match(label)
    return match.group(1) if match else label


def parameter_groups(
    result: Influence,
    by: str | Mapping[str, Any] | None = "layer",
    parameter_names: Sequence[str] | None = None,
) -> dict[str, str]:
    """Map each label of the result's parameter axis to its group.

    ``by``: None (each label its own group), ``"tensor"`` (coordinates ``name[k]`` → ``name``),
    ``"module"`` (tensor name without its last component), ``"layer"`` (:func:`layer_of`), or a
    mapping name → group. Labels are taken as tensor names unless they are coordinates; pass
    ``parameter_names`` (``[n for n, _ in model.named_parameters()]``) to have a result whose labels are
    coarser than tensors (decomposed with ``params="module"`` or a mapping) refused for "tensor"/"module".
    """
    if "param" not in result.kernel_axes:
        raise ValueError(
            "this result summed the parameter axis, so it cannot be grouped; decompose with 'param' in keep "
            "and params='tensor' (or 'coordinate')"
        )
    labels = list(result.param_labels)
    if by is None:
        return {label: label for label in labels}
    if isinstance(by, Mapping):
        groups, missing = {}, []
        for label in labels:
            if label in by:
                groups[label] = str(by[label])
            elif _tensor_of(label) in by:
                groups[label] = str(by[_tensor_of(label)])
            else:
                missing.append(label)
        if missing:
            raise ValueError(
                f"the grouping does not assign the result's parameter labels {missing[:10]} to a group; "
                f"its keys must be the labels {labels[:10]}{' …' if len(labels) > 10 else ''} "
                "(or tensor names, for a result decomposed with params='coordinate')"
            )
        return groups
    if by not in ("tensor", "module", "layer"):
        raise ValueError(f"groups must be None, 'tensor', 'module', 'layer' or a mapping, got {by!r}")
    if by in ("tensor", "module"):
        if labels == ["all"]:
            raise ValueError(
                f"this result summed all parameters into one group 'all'; grouping by {by!r} needs a result "
                "decomposed with params='tensor' or 'coordinate'"
            )
        if parameter_names is not None:
            known = set(parameter_names)
            coarse = [label for label in labels if _tensor_of(label) not in known]
            if coarse:
                raise ValueError(
                    f"the result's parameter labels {coarse[:10]} are not parameter tensors (the result was "
                    f"decomposed with a coarser params=); grouping by {by!r} needs params='tensor' or 'coordinate'"
                )
    if by == "tensor":
        return {label: _tensor_of(label) for label in labels}
    if by == "module":
        return {label: _tensor_of(label).rsplit(".", 1)[0] if "." in label else _tensor_of(label) for label in labels}
    return {label: layer_of(_tensor_of(label)) for label in labels}


# ---------------------------------------------------------------------------------------- selection
def _source_tensor(result: Influence, source: str) -> tuple[torch.Tensor, tuple[str, ...]]:
    if source == "kernel":
        return result.kernel, tuple(result.kernel_axes)
    axes = tuple(result.regularization_axes)
    if source == "regularization":
        return result.regularization, axes
    if source == "carried_state":
        value = result.carried_state
        return (torch.zeros_like(result.regularization) if value is None else value), axes
    if source in ("penalty", "gradient_rounding"):
        value = getattr(result, source)
        return (torch.zeros_like(result.regularization) if value is None else value), axes
    if source in ("pseudo_units", "total"):
        total = sum(_source_tensor(result, s)[0]
                    for s in ("regularization", "carried_state", "penalty", "gradient_rounding"))
        if source == "total":
            kernel = result.kernel
            if "unit" in result.kernel_axes:
                kernel = kernel.sum(result.kernel_axes.index("unit"))
            total = total + kernel
        return total, axes
    raise ValueError(f"source must be one of {SOURCES}, got {source!r}")


def _positions(selection, size: int, axis: str) -> list[int]:
    return positions(selection, size, f"{axis} index")


def _is_window_list(steps) -> bool:
    return (isinstance(steps, (list, tuple)) and len(steps) > 0
            and all(isinstance(w, (tuple, list)) and len(w) == 2 for w in steps))


def _step_matrix(result: Influence, steps) -> tuple[torch.Tensor, list, bool]:
    """Rows: the selected steps (one row per step) or windows (a row of ones per window)."""
    values = list(result.steps)
    n = len(values)
    if isinstance(steps, (list, tuple)) and any(isinstance(w, slice) for w in steps):
        raise ExplaindError("steps: give a list of step windows as (start, stop) pairs of step numbers, not slices")
    if _is_window_list(steps):
        rows, labels = [], []
        for start, stop in steps:
            row = [1.0 if start <= s < stop else 0.0 for s in values]
            if not any(row):
                raise QueryRangeError(f"the step window ({start}, {stop}) holds none of the result's steps {values[0]}…{values[-1]}")
            rows.append(row)
            labels.append(f"{start}:{stop}")
        return torch.tensor(rows, dtype=torch.float64), labels, True
    if isinstance(steps, range):
        steps = [s for s in steps]
        missing = [s for s in steps if s not in values]
        if missing:
            raise QueryRangeError(f"steps {missing[:10]} are not among the result's steps {values[0]}…{values[-1]}")
        steps = [values.index(s) for s in steps]
    chosen = _positions(steps, n, "step")
    matrix = torch.zeros(len(chosen), n, dtype=torch.float64)
    for r, p in enumerate(chosen):
        matrix[r, p] = 1.0
    return matrix, [values[p] for p in chosen], False


def _contract(values: torch.Tensor, dim: int, matrix: torch.Tensor) -> torch.Tensor:
    """values with axis ``dim`` replaced by matrix @ values along it."""
    moved = values.movedim(dim, -1)
    return (moved @ matrix.to(dtype=values.dtype, device=values.device).T).movedim(-1, dim)


def _select(
    result: Influence,
    source: str,
    *,
    steps=None,
    params=None,
    groups=None,
    tests=None,
    units=None,
    outputs=None,
    parameter_names=None,
) -> tuple[torch.Tensor, tuple[str, ...], dict[str, list], bool]:
    """The source tensor restricted to the selections, parameters grouped; nothing summed yet.
    Returns values, axes, coords and whether the step axis holds windows."""
    values, axes = _source_tensor(result, source)
    coords: dict[str, list] = {}
    windows = False
    requested = {"step": steps, "param": params if params is not None else groups, "unit": units}
    for axis, selection in requested.items():
        if selection is not None and axis not in axes:
            what = "Ψ, Ξ and the penalty have no unit axis" if axis == "unit" and "unit" in result.kernel_axes else (
                f"this result summed the {axis!r} axis; decompose with {axis!r} in keep")
            raise ValueError(f"cannot select or group along {axis!r}: {what}")
    for dim, axis in enumerate(axes):
        size = values.shape[dim]
        if axis == "step":
            matrix, labels, windows = _step_matrix(result, steps)
            values = _contract(values, dim, matrix)
            coords[axis] = labels
        elif axis == "param":
            group_of = parameter_groups(result, groups, parameter_names)
            names = list(dict.fromkeys(group_of[label] for label in result.param_labels))
            if params is not None:
                wanted = [params] if isinstance(params, str) else list(params)
                unknown = [p for p in wanted if p not in names]
                if unknown:
                    raise ValueError(f"parameter groups {unknown} are not among {names}")
                names = wanted
            matrix = torch.zeros(len(names), size, dtype=torch.float64)
            for col, label in enumerate(result.param_labels):
                if group_of[label] in names:
                    matrix[names.index(group_of[label]), col] = 1.0
            values = _contract(values, dim, matrix)
            coords[axis] = names
        elif axis == "unit":
            ids = list(result.units)
            if units is None:
                chosen = list(range(size))
            else:
                wanted = [units] if not isinstance(units, (list, tuple, range, np.ndarray, torch.Tensor)) else list(units)
                wanted = [w.item() if hasattr(w, "item") else w for w in wanted]
                unknown = [w for w in wanted if w not in ids]
                if unknown:
                    raise ValueError(f"unit ids {unknown[:10]} are not among the result's units")
                chosen = [ids.index(w) for w in wanted]
            values = values.index_select(dim, torch.as_tensor(chosen, dtype=torch.long, device=values.device))
            coords[axis] = [ids[p] for p in chosen]
        else:  # test, output: positions
            chosen = _positions(tests if axis == "test" else outputs, size, axis)
            values = values.index_select(dim, torch.as_tensor(chosen, dtype=torch.long, device=values.device))
            coords[axis] = chosen
    return values, axes, coords, windows


def _sum_except(values: torch.Tensor, axes: Sequence[str], coords: dict, keep: Sequence[str], source: str) -> Accumulated:
    dims = [d for d, a in enumerate(axes) if a not in keep]
    kept = tuple(a for a in axes if a in keep)
    summed = values.sum(dim=dims) if dims else values
    return Accumulated(summed, kept, {a: coords[a] for a in kept}, source)


def _check_keep(result: Influence, source: str, keep: Sequence[str], windows_given: bool) -> tuple[str, ...]:
    keep = tuple(keep)
    unknown = set(keep) - set(AXES)
    if unknown:
        raise ValueError(f"unknown axes {sorted(unknown)}; axes are {AXES}")
    _, axes = _source_tensor(result, source)
    missing = [a for a in keep if a not in axes]
    if missing:
        reason = ("Ψ, Ξ and the penalty have no unit axis" if missing == ["unit"] and "unit" in result.kernel_axes
                  else f"decompose with {missing} in keep")
        raise ValueError(f"cannot keep axes {missing}: the {source} tensor of this result has axes {list(axes)} ({reason})")
    if windows_given and "step" not in keep:
        raise ValueError("a list of step windows gives one value per window: keep 'step', or pass one window as a slice")
    return keep


# ---------------------------------------------------------------------------------------- accumulation
def accumulated_influence(result: Influence, keep: Sequence[str] = ("test", "output"), *, source: str = "kernel",
                          **selection) -> Accumulated:
    """Accumulated influence I(S, J, X, U, O) = Σ_{t∈S, j∈J, x∈X, i∈U, o∈O} I[t, j, x, i, o] (MATH.md §5),
    keeping the axes in ``keep`` (canonical order); ``source`` picks I, Ψ, Ξ, … (:data:`SOURCES`).
    Selections as in the module docstring."""
    _check_selection(selection)
    keep = _check_keep(result, source, keep, _is_window_list(selection.get("steps")))
    values, axes, coords, _ = _select(result, source, **selection)
    return _sum_except(values, axes, coords, keep, source)


SELECTIONS = ("steps", "params", "groups", "tests", "units", "outputs", "parameter_names")


def _check_selection(selection: dict) -> None:
    unknown = [k for k in selection if k not in SELECTIONS]
    if unknown:
        hints = [f"{k!r} (did you mean {k + 's'!r}?)" if k + "s" in SELECTIONS else repr(k) for k in unknown]
        raise ExplaindError(f"unknown selection {', '.join(hints)}; the selections are {SELECTIONS}")


def accumulated_importance(result: Influence, keep: Sequence[str] = (), *,
                           absolute_over: Sequence[str] = ("test", "output"), source: str = "kernel",
                           **selection) -> Accumulated:
    """Accumulated importance (MATH.md §5, paper §4.1): with A = ``absolute_over``,

        Imp_A(S, J, X, U, O)[k] = Σ_{a ∈ A} | I(S, J, X, U, O)[k, a] |

    where I(…)[k, a] is the accumulated influence keeping the axes of ``keep`` (k) and of A (a): the
    sums over every other axis are taken inside |·|, those over A outside, so that opposite signs on
    different a do not cancel. The default A = (test, output) gives Σ_{x∈X} Σ_{o∈O} |I(S, J, x, U, o)|;
    ``keep=("param",)`` with all steps and units is the pruning score of §4.1."""
    absolute_over = tuple(absolute_over)
    inner = tuple(a for a in AXES if a in keep or a in absolute_over)
    keep = _check_keep(result, source, keep, _is_window_list(selection.get("steps")))
    _check_keep(result, source, inner, False)
    _check_selection(selection)
    values, axes, coords, _ = _select(result, source, **selection)
    inside = _sum_except(values, axes, coords, inner, source)
    return _sum_except(inside.values.abs(), inside.axes, inside.coords, keep, source)


def accumulated_regularization_influence(result: Influence, keep: Sequence[str] = ("test", "output"),
                                         **selection) -> Accumulated:
    """Ψ(S, J, X, O) = Σ_{t∈S, j∈J, x∈X, o∈O} Ψ[t, j, x, o], the weight-decay analogue of I(S, J, X, U, O)."""
    return accumulated_influence(result, keep, source="regularization", **selection)


def accumulated_regularization_importance(result: Influence, keep: Sequence[str] = (), *,
                                          absolute_over: Sequence[str] = ("test", "output"),
                                          **selection) -> Accumulated:
    """Imp_Ψ(S, J, X, O) = Σ_{a ∈ A} |Ψ(S, J, X, O)[k, a]|, as :func:`accumulated_importance` for Ψ."""
    return accumulated_importance(result, keep, absolute_over=absolute_over, source="regularization", **selection)


def relative_regularization_influence(result: Influence, keep: Sequence[str] = ("param",), *,
                                      form: str = "difference",
                                      absolute_over: Sequence[str] = ("test", "output"),
                                      **selection) -> Accumulated:
    """Relative regularization influence of the kept steps/parameter groups (MATH.md §5, paper §4):

        form="difference":  ρ(S, J) = Imp_Ψ(S, J) − Imp_I(S, J)            (MATH.md's definition)
        form="ratio":       ρ(S, J) = Imp_Ψ(S, J) / (Imp_I(S, J) + Imp_Ψ(S, J)) ∈ [0, 1]   (NaN where both are 0)

    with Imp_I(S, J) = Σ_{x,o} |Σ_{t∈S, j∈J, i} I[t, j, x, i, o]| (units summed inside |·|) and
    Imp_Ψ(S, J) = Σ_{x,o} |Σ_{t∈S, j∈J} Ψ[t, j, x, o]|; each kept step / group is its own S / J."""
    if "unit" in keep or "unit" in absolute_over:
        raise ValueError("the relative regularization influence compares with Ψ, which has no unit axis")
    imp_kernel = accumulated_importance(result, keep, absolute_over=absolute_over, source="kernel", **selection)
    imp_reg = accumulated_importance(result, keep, absolute_over=absolute_over, source="regularization", **selection)
    if form == "difference":
        values = imp_reg.values - imp_kernel.values
    elif form == "ratio":
        values = imp_reg.values / (imp_kernel.values + imp_reg.values)
    else:
        raise ValueError(f"form must be 'difference' or 'ratio', got {form!r}")
    return Accumulated(values, imp_reg.axes, imp_reg.coords, f"relative_regularization_{form}")


def similarity_matrix(result: Influence, *, source: str = "kernel", sum_over: Sequence[str] = (),
                      **selection) -> Accumulated:
    """Cosine similarity of two predictions (MATH.md §5, paper Figure 5):

        sim(x, x′) = ⟨vec I(S, J, x, U, O), vec I(S, J, x′, U, O)⟩ / (‖vec I(S, J, x, U, O)‖₂ ‖vec I(S, J, x′, U, O)‖₂)

    vec flattens every axis the result kept except "test" (restricted to the selections, parameters
    grouped by ``groups``); axes in ``sum_over`` are summed first. A zero vector gives NaN.
    Axes of the result: ("test", "other_test")."""
    if "test" in sum_over:
        raise ValueError("the similarity is between test inputs: 'test' cannot be summed")
    _, axes = _source_tensor(result, source)
    keep = tuple(a for a in axes if a not in sum_over)
    acc = accumulated_influence(result, keep, source=source, **selection)
    vectors = acc.values.movedim(acc.axes.index("test"), 0).reshape(acc.values.shape[acc.axes.index("test")], -1)
    norms = vectors.norm(dim=1)
    if not bool((norms > 0).any()):
        raise ExplaindError("every selected test input has zero influence over the selection: the similarity is "
                            "undefined (select steps, parameters or units where the result has influence)")
    cosine = (vectors @ vectors.T) / (norms[:, None] * norms[None, :])
    tests = acc.coords["test"]
    return Accumulated(cosine, ("test", "other_test"), {"test": tests, "other_test": list(tests)}, f"similarity_{source}")


def test_train_kernel(result: Influence, *, source: str = "kernel", **selection) -> Accumulated:
    """The kernel matrix over test × train (paper Figure 4): I(S, J, x, i) = Σ_{t∈S, j∈J, o∈O} I[t, j, x, i, o]
    for a step window S (``steps``) and a layer J (``params``, ``groups``). With a list of windows the
    axes are ("step", "test", "unit"), else ("test", "unit")."""
    keep = ("step", "test", "unit") if _is_window_list(selection.get("steps")) else ("test", "unit")
    return accumulated_influence(result, keep, source=source, **selection)


test_train_kernel.__test__ = False  # not a pytest test, despite the name


def quadrature_fidelity(decompose: Callable[[Any], Influence], nodes: Sequence[int] = (1, 2, 4, 8),
                        rules: Sequence[str] = ("gauss_legendre", "midpoint"), *,
                        progress: bool | None = None) -> dict[str, dict[int, float]]:
    """Relative residual max_{x,o} |f(x; θ_N) − reconstruction| / (1 + |f(x; θ_N) − f(x; θ_0)|) of
    ``decompose(quadrature)`` for every rule and number of nodes n (rule ∈ "gauss_legendre", "midpoint").
    Returns {rule: {n: relative residual}}. ``progress``: a tqdm bar (:mod:`~explaind_math.progress`)."""
    from . import quadrature as quadratures
    from .progress import progress_bar

    jobs = [(rule, n) for rule in rules for n in nodes]
    for rule in rules:
        if rule not in ("gauss_legendre", "midpoint"):
            raise ValueError(f"rules are 'gauss_legendre' and 'midpoint', got {rule!r}")
    jobs = progress_bar(jobs, enabled=progress, desc="quadrature fidelity", unit="rule")
    out: dict[str, dict[int, float]] = {rule: {} for rule in rules}
    for rule, n in jobs:
        out[rule][int(n)] = decompose(getattr(quadratures, rule)(int(n))).relative_residual
    return out


# ---------------------------------------------------------------------------------------- export
def _labelled(obj: Influence | Accumulated, source: str) -> Accumulated:
    if isinstance(obj, Accumulated):
        return obj
    if isinstance(obj, Influence):
        values, axes = _source_tensor(obj, source)
        coords = {"step": list(obj.steps), "param": list(obj.param_labels), "test": list(range(obj.f_final.shape[0])),
                  "unit": list(obj.units), "output": list(range(obj.f_final.shape[1]))}
        return Accumulated(values, axes, {a: coords[a] for a in axes}, source)
    raise TypeError(f"expected an Influence or an Accumulated, got {type(obj).__name__}")


def to_numpy(obj: Influence | Accumulated, source: str = "kernel") -> dict[str, Any]:
    """{"values": array, "axes": names, <axis>: coordinate array, …} of an :class:`Accumulated`, or of
    ``source`` of an :class:`~explaind_math.Influence`."""
    labelled = _labelled(obj, source)
    out: dict[str, Any] = {"values": labelled.numpy(), "axes": labelled.axes}
    for axis in labelled.axes:
        out[axis] = np.asarray(labelled.coords[axis])
    return out


def to_pandas(obj: Influence | Accumulated, source: str = "kernel", value_name: str = "value"):
    """Long format: one row per index tuple, a column per axis holding its coordinate, and ``value_name``."""
    try:
        import pandas as pd
    except ImportError as error:
        raise ImportError("to_pandas needs pandas: pip install explaind_math[analysis]") from error
    labelled = _labelled(obj, source)
    values = labelled.numpy()
    if not labelled.axes:
        return pd.DataFrame({value_name: [values.item()]})
    index = pd.MultiIndex.from_product([labelled.coords[a] for a in labelled.axes], names=list(labelled.axes))
    return pd.DataFrame({value_name: values.reshape(-1)}, index=index).reset_index()


def to_xarray(obj: Influence | Accumulated, source: str = "kernel", name: str | None = None):
    """A DataArray with named dims (the axes) and coordinates: step indices (or windows "start:stop"),
    parameter labels, test positions, unit ids, output indices."""
    try:
        import xarray as xr
    except ImportError as error:
        raise ImportError("to_xarray needs xarray: pip install explaind_math[analysis]") from error
    labelled = _labelled(obj, source)
    attrs = {"source": labelled.source}
    if isinstance(obj, Influence):
        attrs.update(theorem=obj.theorem, quadrature=obj.quadrature, max_residual=obj.max_residual)
    return xr.DataArray(labelled.numpy(), dims=labelled.axes,
                        coords={a: labelled.coords[a] for a in labelled.axes}, name=name or labelled.source, attrs=attrs)
