"""One public function per theorem, named for what it decomposes."""

from .adamw import decompose_adamw_training
from .sgd_momentum import decompose_sgd_momentum_training

#: the paper's names, for readers following it
theorem_3_1 = decompose_adamw_training
corollary_3_2 = decompose_sgd_momentum_training

__all__ = ["decompose_adamw_training", "decompose_sgd_momentum_training", "theorem_3_1", "corollary_3_2"]
