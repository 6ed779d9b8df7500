"""Load a script of the source checkout (``examples/``, ``benchmarks/``) as a module, for the tests that run
its functions (``main(["--quick"])``, its pieces)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

__all__ = ["load_script"]


def load_script(path: str | Path, name: str) -> ModuleType:
    """Execute the file at ``path`` as module ``name``, registered in ``sys.modules`` first (dataclasses with
    ``from __future__ import annotations`` look their module up there while the file executes)."""
    spec = importlib.util.spec_from_file_location(name, Path(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module
