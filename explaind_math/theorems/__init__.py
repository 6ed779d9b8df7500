"""One public function per theorem, named for what it decomposes."""

from .adamw import decompose_adamw_training
from .checkpoints import AdamWCheckpoint, checkpoint_from_optimizer, decompose_from_checkpoints
from .linear_optimizers import decompose_training
from .partition import decompose_by_partition
from .post_composition import decompose_activation, decompose_function_of_output
from .sgd_momentum import decompose_sgd_momentum_training
from .step_subsampling import rank_steps_by_heldout_loss, step_subsampling_fidelity

#: the paper's names, for readers following it
theorem_3_1 = decompose_adamw_training
corollary_3_2 = decompose_sgd_momentum_training

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
    "theorem_3_1",
    "corollary_3_2",
]
