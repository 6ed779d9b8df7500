"""ExPLAIND data scores (MATH.md §5): score(x, i) = Σ_t Σ_j I[t, j, x, i, o], the kernel influence of
training sample i on the recorded run, exact by Theorem 3.1 (any registered rule otherwise)."""

from __future__ import annotations

import torch
from torch import nn

from ...trajectory import Trajectory
from .common import ScalarOfOutput, true_class_output

__all__ = ["explaind_data_scores"]


def explaind_data_scores(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: ScalarOfOutput,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    true_class_only: bool = True,
    **options,
):
    """ExPLAIND data scores score(x, i) = Σ_t Σ_j I[t, j, x, i, o] for o = the true class of x
    (MATH.md §5, the paper's Appendix G.1), from the exact decomposition of the recorded run
    (Theorem 3.1 for AdamW; any registered rule otherwise), keeping the axes (test, unit, output).

    With ``true_class_only`` (default) the decomposed function is h(f) = f_o with o = ``test_labels[x]``
    (Corollary 3.3 i, :func:`~explaind_math.decompose_function_of_output`): h is linear, so its
    influences are exactly the o-th output's I, and the unit contraction costs 1/O of keeping every
    output. ``true_class_only=False`` runs :func:`~explaind_math.decompose_adamw_training` (or
    :func:`~explaind_math.decompose_training` for other optimizers) with keep=("test", "unit",
    "output") and selects o afterwards (the same numbers; the tests compare them).

    Returns ``(scores, influence)``: scores (test, M) in float64 with a zero column for a sample no
    step used, and the :class:`~explaind_math.Influence` with its certified residual.
    """
    from ... import decompose_adamw_training, decompose_function_of_output, decompose_training

    keep = ("test", "unit", "output")
    num_train = train_data[0].shape[0]
    labels = torch.as_tensor(test_labels, dtype=torch.long)
    if true_class_only:
        influence = decompose_function_of_output(
            model, trajectory, loss_fn, train_data, test_inputs, true_class_output,
            test_labels=labels, keep=keep, **options,
        )
        per_unit = influence.kernel_sum(("test", "unit", "output"))[:, :, 0]
    else:
        decompose = decompose_adamw_training if trajectory.optimizer == "adamw" else decompose_training
        influence = decompose(model, trajectory, loss_fn, train_data, test_inputs, keep=keep, **options)
        full = influence.kernel_sum(("test", "unit", "output"))
        per_unit = full[torch.arange(full.shape[0]), :, labels]
    scores = torch.zeros(test_inputs.shape[0], num_train, dtype=torch.float64)
    scores[:, torch.as_tensor(influence.units, dtype=torch.long)] = per_unit.detach().double().cpu()
    return scores, influence
