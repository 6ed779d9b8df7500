"""One public function per theorem, named for what it decomposes, and its reference implementation
(``reference_*``: a literal torch.func transcription of the formula, the specification the engine is tested
against; small models only)."""

from .activations import decompose_activation, reference_activation
from .adamw import decompose_adamw_training, reference_adamw
from .checkpoints import AdamWCheckpoint, checkpoint_from_optimizer, decompose_from_checkpoints
from .linear_optimizers import decompose_training, reference_template
from .partition import decompose_by_partition, reference_partition
from .post_composition import decompose_function_of_output, reference_function_of_output
from .sgd_momentum import decompose_sgd_momentum_training, reference_sgd_momentum
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
    # the specification implementations the engine is tested against (small models only)
    "reference_adamw",
    "reference_sgd_momentum",
    "reference_function_of_output",
    "reference_activation",
    "reference_partition",
    "reference_template",
]
