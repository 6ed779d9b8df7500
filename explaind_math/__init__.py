"""explaind_math — exact, certified decompositions of trained models (ExPLAIND, arXiv 2505.20076).

    f(x; θ_N) = f(x; θ_0) + Σ_{t,j,i} I[t, j, x, i, o] + Σ_{t,j} Ψ[t, j, x, o]

The mathematics is restated in MATH.md; every public function cites its theorem.
"""

from .errors import (
    ExplaindError,
    NonFiniteError,
    RecordingError,
    ReplayMismatchError,
    StochasticTrainingError,
    TrajectoryFileError,
    TrajectoryMismatchError,
    UnsupportedOptimizerError,
)
from .influence import Influence
from .piecewise import default_quadrature, piecewise_gauss_legendre
from .quadrature import adaptive, adaptive_gauss_legendre, gauss_legendre, midpoint
from .engine import DecompositionOptions, MemoryBudgetError
from .recording import TrajectoryRecorder
from . import targets
from . import analysis, plots  # matplotlib, pandas, xarray are imported only inside their functions
from .theorems import (
    AdamWCheckpoint,
    checkpoint_from_optimizer,
    corollary_3_2,
    decompose_activation,
    decompose_adamw_training,
    decompose_by_partition,
    decompose_from_checkpoints,
    decompose_function_of_output,
    decompose_sgd_momentum_training,
    decompose_training,
    rank_steps_by_heldout_loss,
    step_subsampling_fidelity,
    theorem_3_1,
)
from .trajectory import StepRecord, Trajectory
from .storage import ShardedTrajectory

__version__ = "0.1.0"

__all__ = [
    "decompose_adamw_training",
    "decompose_sgd_momentum_training",
    "decompose_training",
    "decompose_function_of_output",
    "decompose_activation",
    "decompose_by_partition",
    "decompose_from_checkpoints",
    "AdamWCheckpoint",
    "checkpoint_from_optimizer",
    "rank_steps_by_heldout_loss",
    "step_subsampling_fidelity",
    "targets",
    "analysis",
    "plots",
    "theorem_3_1",
    "corollary_3_2",
    "Trajectory",
    "ShardedTrajectory",
    "StepRecord",
    "TrajectoryRecorder",
    "Influence",
    "gauss_legendre",
    "midpoint",
    "adaptive",
    "adaptive_gauss_legendre",
    "piecewise_gauss_legendre",
    "default_quadrature",
    "MemoryBudgetError",
    "DecompositionOptions",
    "ExplaindError",
    "UnsupportedOptimizerError",
    "ReplayMismatchError",
    "TrajectoryMismatchError",
    "TrajectoryFileError",
    "NonFiniteError",
    "StochasticTrainingError",
    "RecordingError",
]
