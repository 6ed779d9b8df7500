"""Causal data attribution: ExPLAIND scores against TracIn and TRAK, judged by the linear datamodeling
score (the paper's Appendix G.1; MATH.md §10).

Every method here gives a score matrix ``scores[x, i]``: how much training sample i is credited with
the output f_o(x) of test input x for its true class o (``test_labels[x]``).

* ExPLAIND (MATH.md §5): score(x, i) = Σ_t Σ_j I[t, j, x, i, o], the kernel influence of sample i on
  the recorded run, exact by Theorem 3.1 (:func:`explaind_data_scores`).
* TracIn (Pruthi et al., 2020, "Estimating training data influence by tracing gradient descent"):
  the in-batch form of their TracIn (their eq. for mini-batches), score(x, i) =
  Σ_{t: i∈B_t} η_t w_{t,i} ⟨∇ℓ(x; θ_t), ∇ℓ_i(θ_t)⟩ over the recorded steps (:func:`tracin_scores`),
  and their practical TracInCP over checkpoints, Σ_c η_c ⟨∇ℓ(x; θ_c), ∇ℓ_i(θ_c)⟩ over every training
  sample (:func:`tracin_checkpoint_scores`).
* TRAK (Park et al., 2023, "TRAK: attributing model behavior at scale", ICML): a TRAK-STYLE
  random-projection baseline implemented here (:func:`trak_style_scores`), and the ``traker``
  package itself when it is importable (:func:`trak_package_scores`).

Ground truth is f_o(x; θ_S) of models retrained on subsets S of the training data
(:func:`retrain_outputs`); :func:`linear_datamodeling_score` is the Spearman correlation, over subsets,
between f_o(x; θ_S) and the linear prediction Σ_{i∈S} score(x, i), averaged over test inputs.

Modules, one job each: :mod:`.retraining` (schedules, subsets, retraining: the ground truth),
:mod:`.explaind`, :mod:`.tracin`, :mod:`.trak` (the methods), :mod:`.lds` (the score) and
:mod:`.common` (per-sample gradients and model outputs the methods share).
"""

from .common import per_sample_gradients, true_class_output
from .explaind import explaind_data_scores
from .lds import LDSResult, linear_datamodeling_score, spearman_per_row
from .retraining import (
    PROTOCOLS,
    Schedule,
    ScheduledStep,
    counterfactual_schedule,
    leave_one_out_subsets,
    random_subsets,
    recorded_schedule,
    retrain_outputs,
    train_on_schedule,
)
from .tracin import tracin_checkpoint_scores, tracin_scores
from .trak import margin_output, trak_kernel, trak_package_available, trak_package_scores, trak_style_scores

__all__ = [
    "ScheduledStep",
    "Schedule",
    "PROTOCOLS",
    "recorded_schedule",
    "counterfactual_schedule",
    "random_subsets",
    "leave_one_out_subsets",
    "train_on_schedule",
    "retrain_outputs",
    "explaind_data_scores",
    "tracin_scores",
    "tracin_checkpoint_scores",
    "trak_style_scores",
    "trak_kernel",
    "trak_package_available",
    "trak_package_scores",
    "per_sample_gradients",
    "true_class_output",
    "margin_output",
    "spearman_per_row",
    "linear_datamodeling_score",
    "LDSResult",
]
