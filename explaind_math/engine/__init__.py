"""The engine that runs every theorem: rule × target × contraction, step by step (MATH.md §1-§5, §11).

Data flow: trajectory → gradients (per sample or per group) → the rule's buffers (§4) → quadrature nodes
(§1) → contraction on the kept axes (§11) → :class:`~explaind_math.influence.Influence` with its residual.
"""

from .driver import decompose_trajectory
from .options import DEFAULT_KEEP, DecompositionOptions, resolve_options
from .plan import MemoryBudgetError

__all__ = ["decompose_trajectory", "DecompositionOptions", "resolve_options", "DEFAULT_KEEP", "MemoryBudgetError"]
