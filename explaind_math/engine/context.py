"""What a decomposition knows before its first step: the model, the data, the axes and the plan.

The kept axes of the result (MATH.md §5): the parameter axis (rows: parameter groups, or coordinates j),
the test inputs x and outputs o (always kept: the certificate is per prediction), the unit axis (training
samples, or partition groups S_k of Corollary F.2) and the step axis t.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch

from ..errors import ExplaindError, TrajectoryMismatchError
from ..features import FunctionalModel, TrainingData
from ..integrations.batches import StructuredBatch
from ..integrations.names import align_model
from ..influence import AXES
from ..piecewise import PiecewiseQuadrature, default_quadrature
from ..quadrature import AdaptiveQuadrature, Quadrature
from ..recording import check_deterministic_modules
from ..trajectory import Trajectory
from .input_checks import check_loss_fn, check_test_inputs, check_training_sample, first_target_size
from .options import DecompositionOptions, keep_axes
from .plan import ContractionPlan, MemoryBudgetError, PathCosts, bytes_of, chunks, measure_path_costs, parse_memory_budget, plan_contraction

__all__ = ["DecompositionContext", "build_context", "default_replay_rtol", "parameter_rows", "unit_rows",
           "summed_unit_context", "pseudo_unit_names"]

Params = dict[str, torch.Tensor]


def default_replay_rtol(trajectory_dtype: torch.dtype) -> float:
    """Replay tolerance relative to max |Δθ| of a tensor: 1e-8 for float64 runs, 1e-4 for float32/16."""
    return 1e-8 if trajectory_dtype == torch.float64 else 1e-4


def parameter_rows(spec: str | Mapping[str, str], names: Sequence[str],
                   shapes: Mapping[str, tuple]) -> tuple[list[str], list[int] | None]:
    """Labels of the parameter axis and, per parameter tensor, the index of its group (None: one row per
    coordinate j, ``params="coordinate"``)."""
    if spec == "coordinate":
        labels = []
        for n in names:
            labels.extend(f"{n}[{k}]" for k in range(torch.Size(shapes[n]).numel()))
        return labels, None
    if spec == "tensor":
        mapping = {n: n for n in names}
    elif spec == "module":
        mapping = {n: n.rsplit(".", 1)[0] if "." in n else n for n in names}
    elif spec == "all":
        mapping = {n: "all" for n in names}
    elif isinstance(spec, Mapping):
        missing = [n for n in names if n not in spec]
        if missing:
            raise ExplaindError(f"the parameter grouping does not assign parameters {missing} to a group")
        mapping = {n: str(spec[n]) for n in names}
    else:
        raise ExplaindError(f"params must be 'tensor', 'module', 'coordinate', 'all' or a mapping, got {spec!r}")
    labels = list(dict.fromkeys(mapping[n] for n in names))
    return labels, [labels.index(mapping[n]) for n in names]


def unit_rows(sample_ids: Sequence[int], partition: Any) -> tuple[list, dict[int, int]]:
    """Labels of the unit axis and, per training-sample id, its row: one row per sample, or one per
    partition group S_k (Corollary F.2)."""
    if partition is None:
        return list(sample_ids), {u: r for r, u in enumerate(sample_ids)}
    if isinstance(partition, str):
        if partition != "all":
            raise ExplaindError(f"partition must be None, 'all', a mapping, a sequence or a callable, got {partition!r}")
        return ["all"], {u: 0 for u in sample_ids}
    group_of: dict[int, Any] = {}
    missing = []
    for u in sample_ids:
        try:
            g = partition(u) if callable(partition) else partition[u]
        except (KeyError, IndexError):
            missing.append(u)
            continue
        group_of[u] = g.item() if isinstance(g, torch.Tensor) else g
    if missing:
        raise TrajectoryMismatchError(
            f"the partition does not cover training sample ids {missing[:10]}"
            f"{' …' if len(missing) > 10 else ''} ({len(missing)} in all)"
        )
    groups = sorted(set(group_of.values()), key=lambda g: (str(type(g)), g))
    row = {g: r for r, g in enumerate(groups)}
    return groups, {u: row[g] for u, g in group_of.items()}


@dataclass
class DecompositionContext:
    """Everything about one decomposition that does not change from step to step."""

    trajectory: Trajectory
    fm: FunctionalModel
    data: TrainingData
    loss_fn: Callable
    penalty: Callable | None
    names: list[str]
    shapes: dict[str, tuple]
    xs_test: torch.Tensor
    y_test: torch.Tensor
    labels: list[str]  # the parameter axis
    group_index: list[int] | None  # per parameter tensor, its row; None: a row per coordinate
    unit_labels: list  # the unit axis: sample ids, or partition groups
    row_of_sample: dict[int, int]  # training-sample id → its row on the unit axis
    keep: tuple[str, ...]
    quadrature: Quadrature | AdaptiveQuadrature | PiecewiseQuadrature
    plan: ContractionPlan
    selected: set[int]  # the steps whose Φ_t is computed (all, unless subsampled: Appendix G.2)
    dtype: torch.dtype
    device: torch.device
    rtol: float
    eps_train: float
    rescaling: bool
    vectorize: bool
    num_outputs: int
    grouped_units: bool  # units are partition groups (Corollary F.2), not samples
    forward_ad: bool  # torch.func.jvp runs through the target (else: Jacobians only)
    offsets: dict[str, int] = field(default_factory=dict)  # per-coordinate rows: first row of each tensor
    plan_inputs: dict = field(default_factory=dict)  # the sizes the plans are made from (forward §11, adjoint §12)
    forward_plan_error: Exception | None = None  # the forward plan did not fit the budget (plan is then None)
    pseudo_names: list[str] = field(default_factory=lambda: ["regularization"])  # see pseudo_unit_names

    @property
    def keep_steps(self) -> bool:
        return "step" in self.keep

    @property
    def keep_units(self) -> bool:
        return "unit" in self.keep

    @property
    def per_coordinate(self) -> bool:
        return self.group_index is None

    @property
    def num_rows(self) -> int:
        """Size of the parameter axis: groups, or coordinates."""
        return len(self.labels)

    def numel(self, n: str) -> int:
        return torch.Size(self.shapes[n]).numel()

    def row_of_tensor(self, n: str) -> int:
        """The parameter-axis row of tensor n (its group)."""
        return self.group_index[self.names.index(n)]

    def zeros(self, shape) -> torch.Tensor:
        return torch.zeros(shape, dtype=self.dtype, device=self.device)

    def theta(self, t: int) -> Params:
        snapshot = self.trajectory.parameters[t]
        return {n: snapshot[n].to(device=self.device, dtype=self.dtype) for n in self.names}

    def target_values(self, params: Params) -> torch.Tensor:
        """The target (the decomposed quantity: f, h∘f or an activation) on every test input at θ: (X, O), in chunks."""
        parts = [self.fm.target_values(params, self.xs_test[s], self.y_test[s]).detach()
                 for s in chunks(self.xs_test.shape[0], self.plan.test_chunk)]
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _test_set(test_inputs, test_labels, dtype, device) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(test_inputs, Mapping):  # named inputs (input_ids, attention_mask, …)
        test_inputs = StructuredBatch(test_inputs).to(device, dtype)
    xs_test = test_inputs.to(device)
    xs_test = xs_test.to(dtype) if xs_test.is_floating_point() else xs_test
    if test_labels is None:
        return xs_test, torch.zeros(xs_test.shape[0], device=device)
    y_test = torch.as_tensor(test_labels).to(device)
    if y_test.shape[0] != xs_test.shape[0]:
        raise ExplaindError(f"{xs_test.shape[0]} test inputs but {y_test.shape[0]} test labels")
    return xs_test, y_test


def _path_costs(o: DecompositionOptions, fm, theta_0, xs_test, y_test, num_outputs, num_params, group_index,
                forward_ad) -> PathCosts | None:
    """The unit costs the plan compares (None: Jacobians only, without forward-mode AD or per coordinate)."""
    if o.contraction not in ("auto", "measured") or group_index is None or not forward_ad:
        return None
    if o.contraction == "measured":
        sample = slice(0, min(xs_test.shape[0], 8, o.test_chunk_size or 8))
        return measure_path_costs(fm, theta_0, xs_test[sample], y_test[sample], num_outputs)
    return PathCosts.counted(num_params)


def build_context(model, trajectory: Trajectory, loss_fn, train_data, test_inputs, *, h, activation, test_labels,
                  partition, decompose_steps, penalty, options: DecompositionOptions) -> DecompositionContext:
    """Validate the inputs against the trajectory and plan the contraction (MATH.md §11)."""
    o = options
    keep = keep_axes(o.keep)
    unknown = set(keep) - set(AXES)
    if unknown:
        raise ExplaindError(f"unknown axes {sorted(unknown)} in keep; axes are {AXES}")
    params = o.params if "param" in keep else "all"
    model, name_map = align_model(model, trajectory)  # names checked (across wrapper prefixes), shapes, buffers
    check_deterministic_modules(model, "decomposition")
    device = o.device
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    dtype = o.dtype or trajectory.dtype
    # the replay is as precise as the coarser of the recorded run and the computation
    coarser = trajectory.dtype if torch.finfo(trajectory.dtype).eps >= torch.finfo(dtype).eps else dtype
    rtol = default_replay_rtol(coarser) if o.replay_rtol is None else o.replay_rtol

    names = trajectory.parameter_names
    shapes = trajectory.shapes()
    fm = FunctionalModel(model, names, dtype=dtype, device=device, h=h, activation=activation, name_map=name_map,
                         dropout=trajectory.metadata.get("dropout"))
    data = TrainingData(train_data, dtype=dtype, device=device)
    check_loss_fn(loss_fn)
    check_test_inputs(test_inputs)
    xs_test, y_test = _test_set(test_inputs, test_labels, dtype, device)
    labels, group_index = parameter_rows(params, names, shapes)
    units, row_of = unit_rows(trajectory.sample_ids(), partition)
    selected = set(range(trajectory.num_steps)) if decompose_steps is None else {int(t) for t in decompose_steps}
    if not selected & set(range(trajectory.num_steps)):
        raise ExplaindError("decompose_steps selects none of the trajectory's steps")
    numel = {n: torch.Size(shapes[n]).numel() for n in names}
    offsets, acc = {}, 0
    for n in names:
        offsets[n], acc = acc, acc + numel[n]

    theta_0 = {n: trajectory.parameters[0][n].to(device=device, dtype=dtype) for n in names}
    num_outputs = first_target_size(fm, theta_0, xs_test, y_test)  # a failure names test_inputs
    check_training_sample(fm, theta_0, loss_fn, data, trajectory, o.vectorize)  # … or train_data, or loss_fn
    forward_ad, why = fm.supports_forward_ad(theta_0, xs_test[0], y_test[0])
    if not forward_ad and o.contraction == "jvp":
        raise ExplaindError(f"contraction='jvp' needs forward-mode AD through the model, which PyTorch refuses here "
                            f"({why}); use contraction='auto' or 'jacobian'")
    costs = _path_costs(o, fm, theta_0, xs_test, y_test, num_outputs, sum(numel.values()), group_index, forward_ad)
    itemsize = torch.empty((), dtype=dtype).element_size()
    X, U = xs_test.shape[0], len(units)
    kept_shape = [len(labels), X, num_outputs] + ([U] if "unit" in keep else [])
    steps_kept = trajectory.num_steps if "step" in keep else 1
    kept_bytes = steps_kept * (bytes_of(kept_shape, itemsize) + 3 * bytes_of(kept_shape[:3], itemsize))
    group_sizes = ([numel[n] for n in names] if group_index is None else
                   [sum(numel[n] for n, g in zip(names, group_index) if g == k) for k in range(len(labels))])
    plan_inputs = dict(
        contraction=o.contraction, memory_budget=parse_memory_budget(o.memory_budget), itemsize=itemsize,
        num_params=sum(numel.values()), largest_group=max(group_sizes), num_units=U, num_test=X,
        num_outputs=num_outputs, largest_batch=trajectory.largest_batch(),
        kept_bytes=kept_bytes, per_coordinate=group_index is None, costs=costs,
        test_chunk_size=o.test_chunk_size, train_chunk_size=o.train_chunk_size, node_chunk_size=o.node_chunk_size)
    plan, forward_plan_error = None, None
    try:
        plan = plan_contraction(**plan_inputs)
    except MemoryBudgetError as error:  # the adjoint (MATH.md §12) may still fit: the driver decides
        if o.accumulation == "forward":
            raise
        forward_plan_error = error
    return DecompositionContext(
        trajectory=trajectory, fm=fm, data=data, loss_fn=loss_fn,
        penalty=penalty, names=names, shapes=shapes, xs_test=xs_test, y_test=y_test, labels=labels,
        group_index=group_index, unit_labels=units, row_of_sample=row_of, keep=keep,
        quadrature=o.quadrature or default_quadrature(), plan=plan, selected=selected, dtype=dtype, device=device,
        rtol=rtol, eps_train=torch.finfo(trajectory.dtype).eps,
        rescaling=bool(trajectory.metadata.get("gradient_rescaling", False)), vectorize=o.vectorize,
        num_outputs=num_outputs, grouped_units=partition is not None, forward_ad=forward_ad, offsets=offsets,
        plan_inputs=plan_inputs, forward_plan_error=forward_plan_error,
        pseudo_names=pseudo_unit_names(trajectory, penalty))


def pseudo_unit_names(trajectory: Trajectory, penalty: Callable | None) -> list[str]:
    """The pseudo-units of a run: weight decay; optimizer state carried in (Remark F.3); a loss penalty; and,
    when the run recorded its gradients (the recorder records all steps' or none: the first step says), their
    rounding (the recorded ``.grad`` − Σ_i g_{t,i}). Read once per decomposition (a sharded trajectory's steps
    are read from disk)."""
    key = trajectory.rule.buffer_state_key
    carried = key is not None and any(key in st for st in trajectory.initial_state.values())
    recorded = trajectory.num_steps > 0 and trajectory.steps[0].gradient is not None
    return (["regularization"] + (["carried_state"] if carried else []) + (["penalty"] if penalty else [])
            + (["gradient_rounding"] if recorded else []))


def summed_unit_context(ctx: DecompositionContext) -> DecompositionContext:
    """``ctx`` with every sample in one unit: its buffer is Σ_u buffer_t(u), the optimizer's own state, fed with
    the batch gradient (one weighted-loss gradient per step, Corollary F.2 with K = 1)."""
    return dataclasses.replace(ctx, unit_labels=["all"], row_of_sample={u: 0 for u in ctx.row_of_sample},
                               grouped_units=True)
