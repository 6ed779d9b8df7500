"""Exceptions of explaind_math.

Every error says what is wrong and names the step, parameter, flag or file concerned. All derive
from :class:`ExplaindError` (a ``ValueError``), so ``except ValueError`` also catches them.
"""


class ExplaindError(ValueError):
    """Base class of every error raised by explaind_math."""


class UnsupportedOptimizerError(ExplaindError):
    """The optimizer, or one of its flags, has no exact decomposition implemented."""


class ReplayMismatchError(ExplaindError):
    """Σ_u update_t(u) rebuilt from per-sample gradients does not match θ_{t+1} − θ_t (MATH.md §2-§4)."""


class TrajectoryMismatchError(ExplaindError):
    """A trajectory does not belong to the model or data it is used with."""


class TrajectoryFileError(ExplaindError):
    """A trajectory file is truncated, corrupted, foreign, or of an unknown format version."""


class NonFiniteError(ExplaindError):
    """A NaN or Inf appeared in a gradient, a parameter or an optimizer state."""


class StochasticTrainingError(ExplaindError):
    """A module makes the loss depend on more than one sample or on randomness (BatchNorm, dropout)."""


class RecordingError(ExplaindError):
    """The training loop was used in a way the recorder cannot turn into an exact trajectory."""


class QueryRangeError(ExplaindError, IndexError):
    """A query of a result asks for positions, steps or ids outside the result (or selects nothing)."""
