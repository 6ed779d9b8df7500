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
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn
from torch.func import functional_call

from ..errors import ExplaindError
from ..features import FunctionalModel
from ..trajectory import Trajectory

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

Params = dict[str, torch.Tensor]
#: one example's loss or output function of the model output: fn(output without batch axis, label) -> scalar
ScalarOfOutput = Callable[[torch.Tensor, Any], torch.Tensor]


# ----------------------------------------------------------------------------- schedules and subsets
@dataclass(frozen=True)
class ScheduledStep:
    """One optimizer step of a (re)training run: the batch ``ids`` and the factor ``scale`` of its
    loss, scale · mean_{j∈ids} ℓ_j (scale = 1: the usual mean-reduced batch loss)."""

    ids: torch.Tensor
    scale: float = 1.0


#: a training schedule: the steps in order
Schedule = list[ScheduledStep]

#: how a model "trained on S" is obtained from the recorded run (see :func:`counterfactual_schedule`)
PROTOCOLS = ("restricted", "zero-weight", "reshuffled")


def recorded_schedule(trajectory: Trajectory) -> Schedule:
    """The recorded run's batches B_t (all mean-reduced, checked), as a schedule to replay."""
    steps = []
    for t, record in enumerate(trajectory.steps):
        w = torch.as_tensor(record.weights, dtype=torch.float64)
        if not torch.allclose(w, torch.full_like(w, 1.0 / w.numel()), rtol=1e-12, atol=0.0):
            raise ExplaindError(
                f"step {t} of the recorded run is not a mean-reduced batch loss (weights {w.tolist()[:4]}…)"
            )
        steps.append(ScheduledStep(torch.as_tensor(record.units, dtype=torch.long)))
    return steps


def counterfactual_schedule(
    recorded: Schedule,
    keep: torch.Tensor,
    protocol: str,
    *,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
) -> Schedule:
    """The schedule of a model trained on the subset S (boolean mask ``keep`` over sample ids), from
    the same θ_0 as the recorded run (the caller's job), under one of three protocols:

    * ``"restricted"``: step t uses B_t ∩ S with the mean over the kept samples (a step whose batch
      becomes empty is dropped). Same order, same number of steps; only S is trained on.
    * ``"zero-weight"``: step t keeps the recorded loss with w_{t,i} = 0 for i ∉ S, i.e.
      Σ_{j∈B_t∩S} ℓ_j / |B_t| (an empty step still steps, with a zero gradient). The counterfactual that
      data-attribution scores linearize: delete sample i's loss terms and change nothing else.
    * ``"reshuffled"``: the usual datamodels retraining: fresh random passes over S in batches of
      ``batch_size`` (default: the recorded first batch's size), for as many epochs as the recorded run
      (round(N · |S| / M) steps), order drawn from ``generator``.

    The first two are deterministic given S, so their ground truth carries no seed noise.
    """
    keep = torch.as_tensor(keep, dtype=torch.bool)
    if protocol == "restricted":
        out = []
        for step in recorded:
            kept = step.ids[keep[step.ids]]
            if kept.numel():
                out.append(ScheduledStep(kept, step.scale))
        return out
    if protocol == "zero-weight":
        out = []
        for step in recorded:
            kept = step.ids[keep[step.ids]]
            if kept.numel():
                out.append(ScheduledStep(kept, step.scale * kept.numel() / step.ids.numel()))
            else:  # a zero gradient: AdamW still decays and moves with its moments, as in the recorded run
                out.append(ScheduledStep(step.ids, 0.0))
        return out
    if protocol == "reshuffled":
        if generator is None:
            raise ExplaindError("the reshuffled protocol needs a torch.Generator for the batch order")
        members = torch.nonzero(keep).flatten()
        size = batch_size or int(recorded[0].ids.numel())
        steps = max(1, round(len(recorded) * members.numel() / keep.numel()))
        out, order = [], torch.empty(0, dtype=torch.long)
        while len(out) < steps:
            if order.numel() == 0:
                order = members[torch.randperm(members.numel(), generator=generator)]
            out.append(ScheduledStep(order[:size]))
            order = order[size:]
        return out
    raise ExplaindError(f"unknown retraining protocol {protocol!r}; choose one of {PROTOCOLS}")


def random_subsets(num_samples: int, fraction: float, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` boolean masks (count, num_samples), each selecting round(fraction · num_samples) samples
    uniformly at random without replacement (the datamodels' S ~ D_α; Ilyas et al., 2022)."""
    if not 0.0 < fraction < 1.0:
        raise ExplaindError(f"subset fraction must lie in (0, 1), got {fraction}")
    size = max(1, round(fraction * num_samples))
    masks = torch.zeros(count, num_samples, dtype=torch.bool)
    for k in range(count):
        masks[k, torch.randperm(num_samples, generator=generator)[:size]] = True
    return masks


def leave_one_out_subsets(num_samples: int, removed: Sequence[int]) -> torch.Tensor:
    """Masks D \\ {i} for each removed sample i (the LDS at α = 1 − 1/M, the paper's leave-one-out)."""
    masks = torch.ones(len(removed), num_samples, dtype=torch.bool)
    for k, i in enumerate(removed):
        if not 0 <= int(i) < num_samples:
            raise ExplaindError(f"leave-one-out: sample {i} is not among the {num_samples} training samples")
        masks[k, int(i)] = False
    return masks


# ----------------------------------------------------------------------------- (re)training
def train_on_schedule(
    model: nn.Module,
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train_data: tuple[torch.Tensor, torch.Tensor],
    schedule: Schedule,
) -> nn.Module:
    """Train ``model`` in place: per step, zero the gradients, backpropagate
    scale · ``loss_fn``(f(X[ids]), Y[ids]) (``loss_fn`` batched, mean-reduced), ``optimizer.step()``."""
    X, Y = train_data
    optimizer = make_optimizer(model)
    for step in schedule:
        optimizer.zero_grad()
        loss = loss_fn(model(X[step.ids]), Y[step.ids])
        (loss if step.scale == 1.0 else loss * step.scale).backward()
        optimizer.step()
    return model


def retrain_outputs(
    initial_state: Mapping[str, torch.Tensor],
    make_model: Callable[[], nn.Module],
    make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    train_data: tuple[torch.Tensor, torch.Tensor],
    schedules: Sequence[Schedule],
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    progress: Callable[[int, int], None] | None = None,
) -> torch.Tensor:
    """Ground truth for the LDS: for each schedule (one per subset S_k), a fresh ``make_model()`` loaded
    with ``initial_state`` (the recorded run's θ_0) and trained on it; returns f_o(x; θ_{S_k}) for the
    true class o of every test input, shape (subsets, test), float64."""
    outputs = torch.empty(len(schedules), test_inputs.shape[0], dtype=torch.float64)
    rows = torch.arange(test_inputs.shape[0])
    for k, schedule in enumerate(schedules):
        model = make_model()
        model.load_state_dict(initial_state)
        train_on_schedule(model, make_optimizer, loss_fn, train_data, schedule)
        with torch.no_grad():
            outputs[k] = model(test_inputs)[rows, test_labels].double()
        if progress is not None:
            progress(k + 1, len(schedules))
    return outputs


# ----------------------------------------------------------------------------- per-sample gradients
def per_sample_gradients(
    model: nn.Module,
    params: Params,
    fn: ScalarOfOutput,
    inputs: torch.Tensor,
    labels: torch.Tensor,
    *,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """∇_θ fn(f(x_n; θ), y_n) for every example n, flattened over ``params`` (in its key order):
    shape (n, D). The decomposition's own per-sample gradients (:meth:`FunctionalModel.per_sample_gradients`,
    one vmap of grad over the examples; the model's buffers are held constant)."""
    names = list(params)
    first = next(iter(params.values()))
    fm = FunctionalModel(model, names, dtype=first.dtype, device=first.device)
    g = fm.per_sample_gradients(params, fn, inputs, labels, chunk_size=chunk_size)
    return torch.cat([g[n].reshape(inputs.shape[0], -1) for n in names], dim=1)


def _learning_rates(trajectory: Trajectory, t: int, dtype: torch.dtype) -> torch.Tensor:
    """η_t per coordinate (parameter groups may differ), flattened in the trajectory's parameter order."""
    shapes = trajectory.shapes()
    parts = []
    for n in trajectory.parameter_names:
        lr = float(trajectory.steps[t].hyperparameters[trajectory.group_of[n]]["lr"])
        parts.append(torch.full((math.prod(shapes[n]),), lr, dtype=dtype))
    return torch.cat(parts)


def _theta(trajectory: Trajectory, t: int, dtype: torch.dtype) -> Params:
    return {n: trajectory.parameters[t][n].to(dtype) for n in trajectory.parameter_names}


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype) if x.is_floating_point() else x


def _is_class(out: torch.Tensor, label: Any) -> torch.Tensor:
    """Boolean mask of the output coordinate o = label (a comparison, so it works under vmap)."""
    return torch.arange(out.numel(), device=out.device) == label


def true_class_output(out: torch.Tensor, label: Any) -> torch.Tensor:
    """f_o(x) for the true class o = label: the quantity the LDS predicts."""
    out = out.reshape(-1)
    return torch.where(_is_class(out, label), out, torch.zeros_like(out)).sum()


# ----------------------------------------------------------------------------- ExPLAIND
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
    from .. import decompose_adamw_training, decompose_function_of_output, decompose_training

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


# ----------------------------------------------------------------------------- TracIn
def tracin_scores(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: ScalarOfOutput,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    dtype: torch.dtype = torch.float64,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """TracIn in its in-batch form (Pruthi et al., 2020, the idealised TracIn for mini-batch SGD):

        TracIn(x, i) = Σ_{t : i ∈ B_t} η_t w_{t,i} ⟨∇_θ ℓ(x; θ_t), ∇_θ ℓ_i(θ_t)⟩

    over the recorded steps t, with w_{t,i} = 1/|B_t| for a mean-reduced batch loss (their η_t/b), the
    test loss ℓ(x) = loss_fn(f(x), y(x)) with the true label, and the inner product weighted by each
    parameter group's η_t. Positive = proponent (a plain SGD step on i lowers the test loss to first
    order). It ignores the optimizer's preconditioner and momentum (AdamW here), as TracIn does.
    Returns (test, M) in ``dtype``."""
    X, Y = train_data
    num_train = X.shape[0]
    scores = torch.zeros(test_inputs.shape[0], num_train, dtype=dtype)
    x_test = _cast(test_inputs, dtype)
    y_test = torch.as_tensor(test_labels)
    for t, record in enumerate(trajectory.steps):
        theta_t = _theta(trajectory, t, dtype)
        ids = torch.as_tensor(record.units, dtype=torch.long)
        weights = torch.as_tensor(record.weights, dtype=dtype)
        g_train = per_sample_gradients(model, theta_t, loss_fn, _cast(X[ids], dtype), Y[ids], chunk_size=chunk_size)
        g_test = per_sample_gradients(model, theta_t, loss_fn, x_test, y_test, chunk_size=chunk_size)
        eta = _learning_rates(trajectory, t, dtype)
        scores[:, ids] += ((g_test * eta) @ g_train.T) * weights
    return scores


def tracin_checkpoint_scores(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: ScalarOfOutput,
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    checkpoints: Sequence[int],
    *,
    dtype: torch.dtype = torch.float64,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """TracInCP (Pruthi et al., 2020, their practical approximation from checkpoints):

        TracInCP(x, i) = Σ_c η_c ⟨∇_θ ℓ(x; θ_c), ∇_θ ℓ_i(θ_c)⟩

    over the checkpoints θ_c = ``trajectory.parameters[c]`` (c in 0..N) and every training sample i,
    η_c the learning rate of step c (of step N−1 for c = N), per parameter group. Returns (test, M)."""
    X, Y = train_data
    x_test = _cast(test_inputs, dtype)
    y_test = torch.as_tensor(test_labels)
    scores = torch.zeros(test_inputs.shape[0], X.shape[0], dtype=dtype)
    n = trajectory.num_steps
    for c in checkpoints:
        if not 0 <= int(c) <= n:
            raise ExplaindError(f"TracInCP: checkpoint {c} is not a recorded parameter state (0..{n})")
        theta_c = _theta(trajectory, int(c), dtype)
        g_train = per_sample_gradients(model, theta_c, loss_fn, _cast(X, dtype), Y, chunk_size=chunk_size)
        g_test = per_sample_gradients(model, theta_c, loss_fn, x_test, y_test, chunk_size=chunk_size)
        eta = _learning_rates(trajectory, min(int(c), n - 1), dtype)
        scores += (g_test * eta) @ g_train.T
    return scores


# ----------------------------------------------------------------------------- TRAK
def trak_kernel(train_features: torch.Tensor, ridge: float) -> torch.Tensor:
    """(ΦᵀΦ + λ I)⁻¹ for projected train features Φ (M × k), with λ = ridge · tr(ΦᵀΦ) / k, i.e. the
    ridge relative to the mean eigenvalue of ΦᵀΦ (scale-free; Park et al. use λ = 0 with k < M)."""
    k = train_features.shape[1]
    gram = train_features.T @ train_features
    lam = ridge * torch.trace(gram) / k
    return torch.linalg.inv(gram + lam * torch.eye(k, dtype=gram.dtype))


def margin_output(out: torch.Tensor, label: Any) -> torch.Tensor:
    """TRAK's model output for classification (Park et al., 2023, §3): the margin
    log(p_y / (1 − p_y)) = f_y − logsumexp_{o≠y} f_o."""
    out = out.reshape(-1)
    is_class = _is_class(out, label)
    own = torch.where(is_class, out, torch.zeros_like(out)).sum()
    return own - torch.logsumexp(out.masked_fill(is_class, float("-inf")), dim=0)


def trak_style_scores(
    model: nn.Module,
    final_params: Sequence[Params],
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    projection_dim: int = 512,
    ridge: float = 0.1,
    seed: int = 0,
    projections: Sequence[torch.Tensor] | None = None,
    test_output: ScalarOfOutput = true_class_output,
    dtype: torch.dtype = torch.float64,
    chunk_size: int | None = 256,
) -> torch.Tensor:
    """A TRAK-STYLE random-projection baseline implemented here (not the authors' code), after
    Park et al. (2023), eq. for τ_TRAK: for each trained model m with parameters θ*_m,

        Φ_m = G_m P_m,   G_m[i] = ∇_θ margin_i(θ*_m)          (train features, M × k)
        φ_m(x) = P_mᵀ ∇_θ f_o(x; θ*_m)                         (test features, o = true class)
        Q_m = diag(1 − p_i(θ*_m))                             (∂ loss / ∂ margin at θ*_m)
        τ(x, ·) = (1/E Σ_m φ_m(x)ᵀ (Φ_mᵀ Φ_m + λ I)⁻¹ Φ_mᵀ) · (1/E Σ_m Q_m)

    with P_m a D × k matrix of independent N(0, 1/k) entries (a Gaussian Johnson–Lindenstrauss map;
    ``projections`` overrides it), margin_i = log(p_yi/(1 − p_yi)) and the ridge λ of :func:`trak_kernel`.
    Simplified against the paper: Gaussian rather than Rademacher projection, a ridge term, no
    soft-thresholding of the scores, gradients of the whole parameter vector in float64, and the test
    side uses the true-class logit f_o (the quantity the LDS here predicts) instead of the margin.
    Positive = the sample raises f_o(x). Returns (test, M)."""
    X, Y = train_data
    if not final_params:
        raise ExplaindError("trak_style_scores needs at least one trained model's parameters")
    if projections is not None and len(projections) != len(final_params):
        raise ExplaindError(f"{len(projections)} projections for {len(final_params)} models")
    x_train, x_test = _cast(X, dtype), _cast(test_inputs, dtype)
    y_test = torch.as_tensor(test_labels)
    kernel_sum = torch.zeros(test_inputs.shape[0], X.shape[0], dtype=dtype)
    q_sum = torch.zeros(X.shape[0], dtype=dtype)
    generator = torch.Generator().manual_seed(seed)
    for m, params in enumerate(final_params):
        theta = {n: p.detach().to(dtype) for n, p in params.items()}
        g_train = per_sample_gradients(model, theta, margin_output, x_train, Y, chunk_size=chunk_size)
        g_test = per_sample_gradients(model, theta, test_output, x_test, y_test, chunk_size=chunk_size)
        if projections is not None:
            P = projections[m].to(dtype)
        else:
            P = torch.randn(g_train.shape[1], projection_dim, generator=generator, dtype=dtype)
            P = P / math.sqrt(projection_dim)
        phi_train, phi_test = g_train @ P, g_test @ P
        kernel_sum += phi_test @ trak_kernel(phi_train, ridge) @ phi_train.T
        with torch.no_grad():
            buffers = {n: b for n, b in model.named_buffers()}
            logits = functional_call(model, {**theta, **buffers}, (x_train,))
            p_true = torch.softmax(logits, dim=-1)[torch.arange(X.shape[0]), Y]
        q_sum += 1.0 - p_true
    count = len(final_params)
    return (kernel_sum / count) * (q_sum / count)


def trak_package_available() -> bool:
    """Whether the ``traker`` package (import name ``trak``) is importable."""
    try:
        import trak  # noqa: F401
    except ImportError:
        return False
    return True


def trak_package_scores(
    model: nn.Module,
    final_params: Sequence[Params],
    train_data: tuple[torch.Tensor, torch.Tensor],
    test_inputs: torch.Tensor,
    test_labels: torch.Tensor,
    *,
    projection_dim: int = 512,
    batch_size: int = 100,
    seed: int = 0,
) -> torch.Tensor:
    """TRAK scores from the ``traker`` package (Park et al., 2023) on CPU, task "image_classification"
    (margin outputs on both sides), float32, its BasicProjector (Gaussian), one checkpoint per model.

    ``projection_dim`` must exceed 100: traker 0.3.2's BasicProjector frees its matrix after
    featurizing and, with a single block of ≤ 100 columns, does not regenerate it before scoring
    (AttributeError). Returns (test, M) float64; positive = the sample raises the test margin."""
    import tempfile

    try:
        from trak import TRAKer
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ExplaindError("the traker package is not installed (pip install traker)") from exc
    if projection_dim <= 100:
        raise ExplaindError("trak_package_scores: projection_dim must exceed 100 (traker 0.3.2 CPU projector bug)")
    X, Y = train_data
    work = _clone_float32(model)
    with tempfile.TemporaryDirectory() as save_dir:
        traker = TRAKer(
            model=work, task="image_classification", train_set_size=X.shape[0], save_dir=save_dir,
            device="cpu", use_half_precision=False, proj_dim=projection_dim, projector_seed=seed,
            logging_level=40,
        )
        for m, params in enumerate(final_params):
            state = {n: p.detach().float() for n, p in params.items()}
            traker.load_checkpoint(state, model_id=m)
            for start in range(0, X.shape[0], batch_size):
                xs, ys = X[start : start + batch_size].float(), Y[start : start + batch_size]
                traker.featurize(batch=(xs, ys), num_samples=xs.shape[0])
        traker.finalize_features()
        for m, params in enumerate(final_params):
            state = {n: p.detach().float() for n, p in params.items()}
            traker.start_scoring_checkpoint(exp_name="lds", checkpoint=state, model_id=m,
                                            num_targets=test_inputs.shape[0])
            for start in range(0, test_inputs.shape[0], batch_size):
                xs = test_inputs[start : start + batch_size].float()
                ys = torch.as_tensor(test_labels)[start : start + batch_size]
                traker.score(batch=(xs, ys), num_samples=xs.shape[0])
        scores = np.array(traker.finalize_scores(exp_name="lds"))  # (M, test), copied out of the memmap
    return torch.as_tensor(scores, dtype=torch.float64).T.contiguous()


def _clone_float32(model: nn.Module) -> nn.Module:
    import copy

    work = copy.deepcopy(model).float()
    work.eval()
    return work


# ----------------------------------------------------------------------------- the LDS
def spearman_per_row(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Spearman rank correlation between a[r] and b[r] for every row r (average ranks for ties);
    NaN for a row where either side is constant (no ranking to correlate)."""
    from scipy.stats import rankdata

    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 2:
        raise ExplaindError(f"spearman_per_row needs two arrays of one 2-d shape, got {a.shape} and {b.shape}")
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra -= ra.mean(axis=1, keepdims=True)
    rb -= rb.mean(axis=1, keepdims=True)
    denom = np.sqrt((ra**2).sum(axis=1) * (rb**2).sum(axis=1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(axis=1) / denom
    rho[denom == 0] = np.nan
    return np.clip(rho, -1.0, 1.0)


@dataclass
class LDSResult:
    """Linear datamodeling score: ``per_test[x]`` the Spearman correlation over subsets between
    f_o(x; θ_S) and Σ_{i∈S} score(x, i); ``value`` their mean over test inputs (NaN rows dropped,
    counted in ``undefined``); ``standard_error`` the bootstrap standard deviation of ``value`` over
    subsets resampled with replacement (an ESTIMATE; NaN when no resamples were asked for)."""

    value: float
    per_test: np.ndarray
    undefined: int = 0
    standard_error: float = float("nan")
    predictions: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)


def _mean_spearman(predictions: np.ndarray, outputs: np.ndarray) -> tuple[float, np.ndarray]:
    rho = spearman_per_row(predictions.T, outputs.T)
    defined = ~np.isnan(rho)
    return (float(rho[defined].mean()) if defined.any() else float("nan")), rho


def linear_datamodeling_score(
    scores: torch.Tensor,
    subsets: torch.Tensor,
    outputs: torch.Tensor,
    *,
    resamples: int = 0,
    seed: int = 0,
) -> LDSResult:
    """LDS (Ilyas et al., 2022; Park et al., 2023; MATH.md §10): with predictions
    g_k(x) = Σ_{i∈S_k} scores[x, i] and ground truth ``outputs[k, x]`` = f_o(x; θ_{S_k}),

        LDS = mean_x  Spearman_k( g_k(x), f_o(x; θ_{S_k}) ).

    ``scores`` (test, M), ``subsets`` boolean (K, M), ``outputs`` (K, test). With ``resamples`` > 0,
    the standard error is estimated by a bootstrap over the K subsets (all test inputs share the
    subsets, so their correlations are not independent and the spread over test inputs understates it)."""
    scores = torch.as_tensor(scores, dtype=torch.float64)
    subsets = torch.as_tensor(subsets)
    outputs = torch.as_tensor(outputs, dtype=torch.float64)
    if subsets.dtype != torch.bool or subsets.dim() != 2 or subsets.shape[1] != scores.shape[1]:
        raise ExplaindError(
            f"subsets must be a boolean (K, M) mask with M = {scores.shape[1]} training samples, got "
            f"{subsets.dtype} of shape {tuple(subsets.shape)}"
        )
    if outputs.shape != (subsets.shape[0], scores.shape[0]):
        raise ExplaindError(
            f"outputs must have shape (subsets, test) = {(subsets.shape[0], scores.shape[0])}, "
            f"got {tuple(outputs.shape)}"
        )
    if subsets.shape[0] < 3:
        raise ExplaindError(f"a rank correlation over subsets needs at least 3 subsets, got {subsets.shape[0]}")
    predictions = (subsets.double() @ scores.T).numpy()  # (K, test)
    truth = outputs.numpy()
    value, rho = _mean_spearman(predictions, truth)
    standard_error = float("nan")
    if resamples > 0:
        rng = np.random.default_rng(seed)
        k = predictions.shape[0]
        draws = [_mean_spearman(predictions[idx], truth[idx])[0] for idx in rng.integers(0, k, size=(resamples, k))]
        standard_error = float(np.nanstd(draws, ddof=1))
    return LDSResult(value=value, per_test=rho, undefined=int(np.isnan(rho).sum()),
                     standard_error=standard_error, predictions=predictions)
