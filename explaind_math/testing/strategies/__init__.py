"""Hypothesis strategies for property tests of exact decompositions (Theorem 3.1, Corollary 3.2, and
the linear-optimizer template of MATH.md §4 for every registered optimizer rule).

Everything here runs a REAL training loop: the user's unmodified ``torch.optim`` optimizer, an LR
scheduler, and :class:`explaind_math.TrajectoryRecorder` on the optimizer's step hooks. The
strategies only draw *specifications* (plain dataclasses with a readable ``repr``, so a failing
example prints as something you can paste into ``@example``); the tensors are made from a seed
drawn by Hypothesis with ``torch.Generator``, so every example is reproducible on any device.

Three kinds of specification, combined by :func:`training_runs`:

* :class:`ModelSpec` — tiny models (D ≲ 300 parameters), built in float64 by :meth:`ModelSpec.build`:
  MLPs with tanh / GELU / ReLU (:func:`mlp_models`), a small CNN on 1×6×6 inputs (:func:`cnn_models`),
  a single-head or ``nn.MultiheadAttention`` self-attention block over 2–3 tokens of dimension 4 with
  mean pooling (:func:`attention_models`), and deep linear networks of L layers (:func:`deep_linear_models`).
  The loss decides the head: ``"cross_entropy"`` trains raw logits with ``F.cross_entropy``,
  ``"nll"`` puts a log-softmax head on the model, ``"mse"`` is a regression.
* :class:`OptimizerSpec` — an optimizer of any rule in :data:`explaind_math.optimizers.RULES` (also
  one enrolled later with ``register_rule``): ``torch.optim.AdamW``; ``torch.optim.Adam`` with coupled
  (L2) or decoupled weight decay; ``torch.optim.SGD`` with momentum (0 included), dampening, Nesterov,
  weight decay, ``maximize``; every other rule (RMSprop, Adagrad, Adamax, NAdam, RAdam, …) from its
  ``example_settings``; 1–3 parameter groups with their own lr and weight decay; ``LambdaLR``,
  ``StepLR`` or ``OneCycleLR`` (which also cycles β1 / the momentum). See :func:`adamw_optimizers`,
  :func:`sgd_optimizers`, :func:`rule_optimizers`, :func:`optimizers`.
* :class:`TrainingSchedule` — N steps with unequal batch sizes (a short last batch), sample weights
  (mean, sum, or random positive: the training loss is then Σ_i w_i ℓ_i and the weights go to
  ``recorder.record_batch(ids, weights=w)``), and optionally one parameter that receives no gradient
  at some steps (``requires_grad=False`` and ``zero_grad(set_to_none=True)``, so PyTorch skips it).
  See :func:`training_schedules`.

:func:`train_and_record` runs the loop and returns a :class:`TrainedRun` (model, trajectory, data,
per-sample loss, test inputs, and the live model's outputs before and after training);
:func:`decompose` calls the theorem that matches the optimizer.

Modules: :mod:`.models` (models and losses), :mod:`.optimizers` (optimizers and LR schedulers, from the
rule registry), :mod:`.runs` (training schedules, run specifications), :mod:`.training` (the loop).

Example (an extension author testing a new model family; ``device`` is the fixture of the
repository's ``conftest.py``, hence :func:`property_settings`)::

    from hypothesis import given
    from explaind_math.testing import strategies as es
    from explaind_math.testing.residuals import SMOOTH_RTOL, check_certificate

    @es.property_settings()
    @given(spec=es.training_runs(families=("mlp-tanh",), optimizer_kinds=("adamw",)))
    def test_exact(spec, device):
        run = es.train_and_record(spec, device=device)
        check_certificate(run, es.decompose(run, replay_rtol=1e-10), SMOOTH_RTOL)

The regime is that of ordinary training: learning rates and weightings are drawn so that steps stay
moderate (:func:`stabilize`), because "8 Gauss–Legendre nodes reach 1e-9" is a statement about
smooth functions on segments of moderate length — a diverging run (SGD ascent on an MSE loss) makes
steps of size 10 on which any fixed rule fails, which says nothing about the theorems.

Numerical caveats worth knowing when writing new model families:

* Adam divides by sqrt(v) + ε, so a coordinate whose gradient is zero *mathematically* but a rounding
  error numerically (the key bias of an attention layer: softmax ignores a constant shift of the
  scores) gets an update of size lr · roundoff / ε, which no replay reproduces to better than
  ~1e-10–1e-9 relative. The attention models here therefore have no key bias.
* ``F.avg_pool2d`` in float64 on CPU costs milliseconds per call; the CNN pools with a reshape.
"""

from .models import (
    ALL_FAMILIES,
    LOSSES,
    SMOOTH_FAMILIES,
    LossSpec,
    ModelSpec,
    SmallCNN,
    TinySelfAttention,
    attention_models,
    cnn_models,
    deep_linear_models,
    mlp_models,
    models,
)
from .optimizers import (
    TEMPLATE_THEOREM,
    THEOREM_OF_OPTIMIZER,
    OptimizerSpec,
    ScheduleSpec,
    accepts_option,
    adamw_optimizers,
    lr_schedules,
    optimizer_class,
    optimizer_kinds,
    optimizers,
    rule_of_kind,
    rule_optimizers,
    schedule_kinds_for,
    sgd_optimizers,
    theorem_of,
)
from .runs import GRADIENT_SCALE_FREE_KINDS, RunSpec, TrainingSchedule, seeds, stabilize, training_runs, training_schedules
from .training import TrainedRun, decompose, make_data, model_outputs, property_settings, train_and_record

__all__ = [
    # families
    "SMOOTH_FAMILIES",
    "ALL_FAMILIES",
    "LOSSES",
    "THEOREM_OF_OPTIMIZER",
    "TEMPLATE_THEOREM",
    # specifications
    "ModelSpec",
    "LossSpec",
    "OptimizerSpec",
    "ScheduleSpec",
    "TrainingSchedule",
    "RunSpec",
    "TrainedRun",
    "SmallCNN",
    "TinySelfAttention",
    # the optimizer registry, as the strategies see it
    "optimizer_kinds",
    "optimizer_class",
    "rule_of_kind",
    "theorem_of",
    "accepts_option",
    "schedule_kinds_for",
    # strategies
    "seeds",
    "mlp_models",
    "cnn_models",
    "attention_models",
    "deep_linear_models",
    "models",
    "adamw_optimizers",
    "sgd_optimizers",
    "rule_optimizers",
    "optimizers",
    "lr_schedules",
    "training_schedules",
    "training_runs",
    "stabilize",
    "GRADIENT_SCALE_FREE_KINDS",
    # running
    "property_settings",
    "make_data",
    "train_and_record",
    "decompose",
    "model_outputs",
]
