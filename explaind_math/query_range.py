"""Range checks of the queries of a result (:class:`~explaind_math.Influence`, :mod:`~explaind_math.analysis`):
a position outside an axis, a non-integer position, or a selection that selects nothing is a
:class:`~explaind_math.errors.QueryRangeError` naming the argument and the valid range, never zeros."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch

from .errors import ExplaindError, QueryRangeError

__all__ = ["position", "positions"]


def position(value: Any, size: int, what: str) -> int:
    """``value`` as a position on an axis of ``size`` (negative counts from the end, as in Python)."""
    if isinstance(value, torch.Tensor) and value.dim() == 0 and not value.is_floating_point():
        value = int(value)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Integral, np.integer)):
        raise ExplaindError(f"{what} must be an integer position, got {value!r} ({type(value).__name__})")
    if not -size <= int(value) < size:
        raise QueryRangeError(
            f"{what} {int(value)} is out of range: this result has {size} "
            + (f"(positions 0..{size - 1}, or -{size}..-1)" if size else "(none)")
        )
    return int(value) % size


def positions(selection: Any, size: int, what: str) -> list[int]:
    """Positions selected by None (all), a slice, one position, or a sequence of positions; a selection
    that selects nothing is an error."""
    if selection is None:
        return list(range(size))
    if isinstance(selection, slice):
        chosen = list(range(size))[selection]
        if not chosen:
            raise QueryRangeError(
                f"{what} slice({selection.start}, {selection.stop}, {selection.step}) selects none of this "
                f"result's {size} positions (0..{size - 1})"
            )
        return chosen
    if isinstance(selection, torch.Tensor):
        if selection.dim() > 1:
            raise ExplaindError(f"{what} must be one position or a 1-D sequence, got shape {tuple(selection.shape)}")
        selection = selection.tolist()
    elif isinstance(selection, np.ndarray):
        selection = selection.tolist()
    items = [selection] if not isinstance(selection, (list, tuple, range)) else list(selection)
    if not items:
        raise QueryRangeError(f"{what}: an empty selection selects nothing")
    return [position(k, size, what) for k in items]
