"""Progress bars (tqdm) for the long computations: decompositions (over steps), quadrature sweeps, the
examples' retraining loops. ``progress=None`` (the default) shows a bar when tqdm is installed and standard
error is a terminal, so notebooks and shells get one and logs, tests and CI do not; ``True`` always (tqdm
required: ``pip install explaind_math[analysis]``), ``False`` never."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

__all__ = ["progress_bar"]

T = TypeVar("T")


def progress_bar(iterable: Iterable[T], *, enabled: bool | None, desc: str, unit: str = "it",
                 total: int | None = None) -> Iterable[T]:
    """``iterable`` wrapped in a tqdm bar when ``enabled`` says so (see the module docstring)."""
    if enabled is False:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError as error:
        if enabled:
            raise ImportError("progress=True needs tqdm: pip install explaind_math[analysis]") from error
        return iterable
    if enabled is None and not (hasattr(sys.stderr, "isatty") and sys.stderr.isatty()):
        return iterable
    return tqdm(iterable, desc=desc, unit=unit, total=total)
