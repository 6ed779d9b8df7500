"""The driver shared by every theorem: rule × target × contraction (MATH.md §1-§5, §11).

For each step t, in order:
  1. per-sample gradients g_{t,i} = w_{t,i} ∇ℓ_i(θ_t) of the step's units (vmap ∘ grad);
  2. the rule's table (A, C, D, E, s, κ, ρ) advances one buffer per unit and gives update_t(u);
  3. replay check: Σ_u update_t(u) must equal θ_{t+1} − θ_t (else an error naming step and parameter);
  4. the test feature map Φ_t(x) = ∫ ∂_θ f(x; θ_t + α Δθ_t) dα by quadrature, contracted with the
     updates on the kept axes: full Jacobians (vmap ∘ jacrev) when parameters or units are kept,
     forward-mode JVPs along the summed updates otherwise;
  5. the step residual r_t = f(θ_{t+1}) − f(θ_t) − Φ_t Σ_u update_t(u), which certifies the step.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from .errors import ExplaindError, NonFiniteError, ReplayMismatchError, TrajectoryMismatchError
from .features import FunctionalModel, TrainingData
from .influence import AXES, Influence
from .optimizers.template import apply_linear, buffer_step, decay_direct_update, decay_gradient, unit_update
from .quadrature import AdaptiveQuadrature, Quadrature, gauss_legendre
from .recording import check_deterministic_modules
from .trajectory import Trajectory

__all__ = ["decompose_trajectory", "DEFAULT_KEEP", "default_replay_rtol"]

DEFAULT_KEEP = ("step", "param", "test", "unit", "output")
Params = dict[str, torch.Tensor]


def default_replay_rtol(trajectory_dtype: torch.dtype) -> float:
    """Replay tolerance relative to max |Δθ| of a tensor: 1e-8 for float64 runs, 1e-4 for float32/16."""
    return 1e-8 if trajectory_dtype == torch.float64 else 1e-4


def _param_groups(spec: str | Mapping[str, str], names: Sequence[str], shapes: Mapping[str, tuple]) -> tuple[list[str], list[int] | None]:
    """Labels of the parameter axis and, per parameter, its label index (None: one row per coordinate)."""
    if spec == "coordinate":
        labels = []
        for n in names:
            count = 1
            for s in shapes[n]:
                count *= s
            labels.extend(f"{n}[{k}]" for k in range(count))
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


def _unit_rows(sample_ids: Sequence[int], partition: Any) -> tuple[list, dict[int, int]]:
    """Labels of the unit axis and, per training-sample id, its row (Corollary F.2 when grouped)."""
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


def _combine(acc: Params | None, part: Params, weight: float = 1.0) -> Params:
    if acc is None:
        return {k: v * weight for k, v in part.items()}
    return {k: acc[k] + v * weight for k, v in part.items()}


def decompose_trajectory(
    model: nn.Module,
    trajectory: Trajectory,
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
    train_data: Any,
    test_inputs: torch.Tensor,
    *,
    theorem: str,
    h: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
    activation: str | None = None,
    test_labels: torch.Tensor | None = None,
    partition: Any = None,
    decompose_steps: Iterable[int] | None = None,
    penalty: Callable[[Params], torch.Tensor] | None = None,
    quadrature: Quadrature | AdaptiveQuadrature | None = None,
    keep: Iterable[str] = DEFAULT_KEEP,
    params: str | Mapping[str, str] = "tensor",
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
    replay_rtol: float | None = None,
    test_chunk_size: int | None = None,
    train_chunk_size: int | None = None,
    vectorize: bool = True,
) -> Influence:
    """Decompose f(x; θ_N) − f(x; θ_0) over the trajectory with the trajectory's optimizer rule.

    Called by the theorem functions (:func:`~explaind_math.decompose_adamw_training`, …), which
    document the arguments; ``theorem`` is the label stored in the result. Beyond those:

    * ``h``, ``test_labels``: decompose h(f(x; θ_N), y) (Corollary 3.3 i), h applied at every node;
    * ``activation``: decompose the output of that named submodule instead of f (Corollary 3.3 ii);
    * ``partition``: units are groups of samples (Corollary F.2): ``"all"``, a mapping or sequence
      id → group label, or a callable id → label; buffers are kept per group (memory K·D);
    * ``penalty``: R(θ) added to the training loss (an L1/L2 term on the parameters): its gradient is
      its own pseudo-unit, reported as ``result.penalty``;
    * ``decompose_steps``: compute Φ_t only for these steps (Appendix G.2); the others contribute
      nothing, and the result is labelled an estimate.
    """
    # the test and output axes are always kept: the certificate is per prediction
    keep = tuple(dict.fromkeys((*keep, "test", "output")))
    unknown = set(keep) - set(AXES)
    if unknown:
        raise ExplaindError(f"unknown axes {sorted(unknown)} in keep; axes are {AXES}")
    keep_steps, keep_params, keep_units = "step" in keep, "param" in keep, "unit" in keep
    if not keep_params:
        params = "all"
    quadrature = quadrature or gauss_legendre(8)
    rule = trajectory.rule
    trajectory.check_model(model)
    check_deterministic_modules(model, "decomposition")
    if device is None:
        first = next(iter(model.parameters()), None)
        device = first.device if first is not None else torch.device("cpu")
    device = torch.device(device)
    dtype = dtype or trajectory.dtype
    rtol = default_replay_rtol(trajectory.dtype) if replay_rtol is None else replay_rtol
    eps_train = torch.finfo(trajectory.dtype).eps

    names = trajectory.parameter_names
    shapes = trajectory.shapes()
    fm = FunctionalModel(model, names, dtype=dtype, device=device, h=h, activation=activation)
    data = TrainingData(train_data, dtype=dtype, device=device)
    xs_test = test_inputs.to(device)
    xs_test = xs_test.to(dtype) if xs_test.is_floating_point() else xs_test
    if test_labels is None:
        y_test = torch.zeros(xs_test.shape[0], device=device)
    else:
        y_test = torch.as_tensor(test_labels).to(device)
        if y_test.shape[0] != xs_test.shape[0]:
            raise ExplaindError(f"{xs_test.shape[0]} test inputs but {y_test.shape[0]} test labels")
    labels, group_index = _param_groups(params, names, shapes)
    units, row_of = _unit_rows(trajectory.units(), partition)
    n_units = len(units)
    selected = set(range(trajectory.num_steps)) if decompose_steps is None else {int(t) for t in decompose_steps}

    def theta(t: int) -> Params:
        return {n: trajectory.parameters[t][n].to(device=device, dtype=dtype) for n in names}

    # buffers of the §4 template: one per unit (sample or group) and parameter, and one per pseudo-unit
    sample_buffer = {n: torch.zeros((n_units, *shapes[n]), dtype=dtype, device=device) for n in names}
    decay_buffer = {n: torch.zeros(shapes[n], dtype=dtype, device=device) for n in names}
    penalty_buffer = {n: torch.zeros(shapes[n], dtype=dtype, device=device) for n in names}
    key = rule.buffer_state_key
    carried_buffer = {
        n: st[key].to(device=device, dtype=dtype)
        for n, st in trajectory.initial_state.items()
        if key is not None and key in st
    }
    pseudo_names = ["regularization"] + (["carried_state"] if carried_buffer else []) + (["penalty"] if penalty else [])
    has_buffer = {n: (n in carried_buffer) for n in names}  # the optimizer's buffer exists (rule.creates_buffer)
    # first-order bound on how far the gradients' rounding moves each update (the replay check's floor):
    # a buffer of |perturbations| advanced by the same table, fed 64 ε · max|g_t| per coordinate per step
    rounding_buffer = {n: torch.zeros(shapes[n], dtype=dtype, device=device) for n in names}
    rescaling = bool(trajectory.metadata.get("gradient_rescaling", False))

    theta_t = theta(0)
    f_t = fm.targets(theta_t, xs_test, y_test, test_chunk_size).detach()
    f_initial = f_t.clone()
    residuals, replay_errors, nodes_per_step, gradient_scales = [], [], [], []
    # per-step tensors when "step" is kept, else a running sum (memory independent of the number of steps)
    kernel_steps = _StepAccumulator(keep_steps)
    pseudo_steps = {p: _StepAccumulator(keep_steps) for p in pseudo_names}

    for t, step in enumerate(trajectory.steps):
        theta_next = theta(t + 1)
        delta = {n: theta_next[n] - theta_t[n] for n in names}
        updated = set(step.updated)
        zeros = lambda n: torch.zeros(shapes[n], dtype=dtype, device=device)

        # 1. per-sample gradients, weighted: g_{t,i} = w_{t,i} ∇ℓ_i(θ_t); the penalty's ∇R(θ_t)
        xb, yb = data.fetch(step.units)
        rows = torch.as_tensor([row_of[u] for u in step.units], dtype=torch.long, device=device)
        weights = step.weights.to(device=device, dtype=dtype)
        raw = fm.per_sample_gradients(theta_t, loss_fn, xb, yb, vectorize=vectorize, chunk_size=train_chunk_size)
        per_sample = {n: raw[n] * weights.reshape(-1, *([1] * len(shapes[n]))) for n in names}
        penalty_grad = _penalty_gradient(penalty, theta_t) if penalty else None
        scale = 1.0
        if step.gradient is not None and rescaling:
            scale = _recover_gradient_scale(t, per_sample, penalty_grad, step.gradient, rtol, eps_train)
            per_sample = {n: v * scale for n, v in per_sample.items()}
            penalty_grad = None if penalty_grad is None else {n: v * scale for n, v in penalty_grad.items()}
        elif step.gradient is not None:
            _check_gradient_sum(t, per_sample, penalty_grad, step.gradient, rtol, eps_train)
        elif rescaling:
            raise ExplaindError(f"step {t}: gradient rescaling needs the recorded gradient of the step")
        gradient_scales.append(scale)
        gradient_rounding = 64 * eps_train * _global_gradient_scale(per_sample, penalty_grad, step.gradient)

        # 2. the rule's table advances the buffers and gives every unit's update
        unit_updates = {}
        update_rounding = {n: 0.0 for n in names}
        pseudo_updates: dict[str, Params] = {p: {} for p in pseudo_names}
        for n in names:
            if n not in updated:
                unit_updates[n] = torch.zeros_like(sample_buffer[n])
                for p in pseudo_names:
                    pseudo_updates[p][n] = zeros(n)
                continue
            hyper = step.hyperparameters[trajectory.group_of[n]]
            state = {k: (v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v)
                     for k, v in step.state.get(n, {}).items()}
            c = rule.coefficients(hyper, state, first_update=not has_buffer[n])
            has_buffer[n] = has_buffer[n] or rule.creates_buffer(hyper)
            grads = c.gradient_sign * per_sample[n]
            rounding = torch.full(shapes[n], gradient_rounding, dtype=dtype, device=device)
            rounding_buffer[n] = _abs_linear(c.A, rounding_buffer[n]) + _abs_linear(c.C, rounding)
            update_rounding[n] = float((_abs_linear(c.D, rounding_buffer[n]) + _abs_linear(c.E, rounding)).max())
            buf = apply_linear(c.A, sample_buffer[n])
            buf = buf.index_add(0, rows, apply_linear(c.C, grads))
            sample_buffer[n] = buf
            upd = -apply_linear(c.D, buf)
            unit_updates[n] = upd.index_add(0, rows, -apply_linear(c.E, grads))
            g_decay = decay_gradient(theta_t[n], c)
            decay_buffer[n] = buffer_step(decay_buffer[n], g_decay, c)
            pseudo_updates["regularization"][n] = (unit_update(decay_buffer[n], g_decay, c)
                                                   + decay_direct_update(theta_t[n], c))
            if "carried_state" in pseudo_updates:
                if n in carried_buffer:
                    carried_buffer[n] = apply_linear(c.A, carried_buffer[n])
                    pseudo_updates["carried_state"][n] = -apply_linear(c.D, carried_buffer[n])
                else:
                    pseudo_updates["carried_state"][n] = zeros(n)
            if "penalty" in pseudo_updates:
                g_penalty = c.gradient_sign * penalty_grad[n]
                penalty_buffer[n] = buffer_step(penalty_buffer[n], g_penalty, c)
                pseudo_updates["penalty"][n] = unit_update(penalty_buffer[n], g_penalty, c)

        # 3. replay check: Σ_u update_t(u) = θ_{t+1} − θ_t
        total = {n: unit_updates[n].sum(0) + sum(pseudo_updates[p][n] for p in pseudo_names) for n in names}
        replay_errors.append(_replay_check(t, total, delta, theta_t, theta_next, rtol, eps_train, updated,
                                           update_rounding))

        # 4. test feature map by quadrature, contracted on the kept axes
        f_next = fm.targets(theta_next, xs_test, y_test, test_chunk_size).detach()
        kernel_total = {n: unit_updates[n].sum(0) for n in names}
        if t not in selected:  # Appendix G.2: this step is left out; its change stays in the residual
            k_step, p_steps = None, {p: None for p in pseudo_names}
            predicted = torch.zeros_like(f_t)
            nodes = 0
        elif keep_params or keep_units:
            phi, nodes = _integrate(fm, xs_test, y_test, theta_t, delta, f_t, f_next, quadrature,
                                    test_chunk_size, mode="jacobian", step=t)
            k_step, p_steps, predicted = _contract_jacobian(
                phi, unit_updates, pseudo_updates, names, group_index, len(labels), keep_units
            )
        else:
            directions = [kernel_total] + [pseudo_updates[p] for p in pseudo_names] + [delta]
            tangents = {n: torch.stack([d[n] for d in directions]) for n in names}
            jv, nodes = _integrate(fm, xs_test, y_test, theta_t, delta, f_t, f_next, quadrature,
                                   test_chunk_size, mode="jvp", tangents=tangents, step=t)
            k_step = jv[0].unsqueeze(0)
            p_steps = {p: jv[1 + k].unsqueeze(0) for k, p in enumerate(pseudo_names)}
            predicted = jv[: 1 + len(pseudo_names)].sum(0)
        nodes_per_step.append(nodes)

        # 5. the step residual certifies this step
        residuals.append(f_next - f_t - predicted)
        kernel_steps.add(k_step)
        for p in pseudo_names:
            pseudo_steps[p].add(p_steps[p])
        theta_t, f_t = theta_next, f_next

    if not selected & set(range(trajectory.num_steps)):
        raise ExplaindError("decompose_steps selects none of the trajectory's steps")

    axes = tuple(a for a in AXES if (a != "step" or keep_steps) and (a != "unit" or keep_units))
    result = Influence(
        kernel=kernel_steps.result(), kernel_axes=axes, regularization=pseudo_steps["regularization"].result(),
        carried_state=pseudo_steps["carried_state"].result() if "carried_state" in pseudo_steps else None,
        penalty=pseudo_steps["penalty"].result() if "penalty" in pseudo_steps else None,
        f_initial=f_initial, f_final=f_t, step_residuals=torch.stack(residuals),
        replay_errors=replay_errors, steps=list(range(trajectory.num_steps)),
        param_labels=labels, units=units, quadrature=quadrature.describe(),
        nodes_per_step=nodes_per_step, theorem=theorem,
        gradient_scales=gradient_scales if rescaling else None,
    )
    skipped = sorted(set(range(trajectory.num_steps)) - selected)
    if skipped:
        result.estimated = True
        result.notes.append(
            f"step subsampling: Φ_t computed for {trajectory.num_steps - len(skipped)} of "
            f"{trajectory.num_steps} steps; the {len(skipped)} others contribute nothing, so the "
            "reconstruction is an approximation (Appendix G.2) and the residual measures what they carried"
        )
    return _drop_axes(result, keep)


def _drop_axes(result: Influence, keep: Sequence[str]) -> Influence:
    """Remove the parameter axis (computed as one group "all") when the caller did not keep it."""
    if "param" in keep:
        return result
    k_dim = result.kernel_axes.index("param")
    r_dim = result.regularization_axes.index("param")
    result.kernel = result.kernel.sum(k_dim)
    result.regularization = result.regularization.sum(r_dim)
    if result.carried_state is not None:
        result.carried_state = result.carried_state.sum(r_dim)
    if result.penalty is not None:
        result.penalty = result.penalty.sum(r_dim)
    result.kernel_axes = tuple(a for a in result.kernel_axes if a != "param")
    result.param_labels = []
    return result


def _integrate(fm: FunctionalModel, xs, ys, theta_t: Params, delta: Params, f_a, f_b, quadrature, chunk, *,
               mode: str, tangents: Params | None = None, step: int = 0):
    """∫ over [0, 1] of the Jacobian (mode "jacobian": name → (X, O, *shape)) or of the JVPs along
    ``tangents`` (mode "jvp": (K, X, O)); returns (integral, nodes evaluated)."""

    def point(alpha: float) -> Params:
        return {n: theta_t[n] + alpha * delta[n] for n in theta_t}

    def rule_on(a: float, b: float, base: Quadrature):
        acc = None
        for alpha, w in base.on_interval(a, b):
            if mode == "jacobian":
                value = fm.jacobian(point(alpha), xs, ys, chunk)
            else:
                value = {"jv": fm.directional(point(alpha), xs, ys, tangents, chunk)}
            for v in value.values():
                if not torch.isfinite(v).all():
                    raise NonFiniteError(
                        f"step {step}: the derivative of the decomposed quantity is NaN or Inf at α = {alpha:.6g} "
                        "on the segment θ_t → θ_{t+1} (is h differentiable there?)"
                    )
            acc = _combine(acc, {k: v.detach() for k, v in value.items()}, w)
        return acc

    def predicted_change(part) -> torch.Tensor:
        if mode == "jacobian":
            return sum(torch.einsum("xo...,...->xo", part[n], delta[n]) for n in delta)
        return part["jv"][-1]  # the last tangent is Δθ_t itself

    if isinstance(quadrature, Quadrature):
        result = rule_on(0.0, 1.0, quadrature)
        nodes = quadrature.num_nodes
    else:
        base, result, nodes = quadrature.base, None, 0
        stack = [(0.0, 1.0, f_a, f_b, 0)]
        while stack:
            a, b, fa, fb, depth = stack.pop()
            part = rule_on(a, b, base)
            nodes += base.num_nodes
            err = (fb - fa - predicted_change(part)).abs().max()
            # below the rounding error of f(θ(a)), f(θ(b)) the estimate is noise: bisecting further
            # (tol·(b − a) shrinks, the noise does not) would split every segment down to max_depth
            noise = 64 * torch.finfo(fa.dtype).eps * (1 + torch.maximum(fa.abs(), fb.abs()).max())
            if err <= max(quadrature.tol * (b - a), noise) or depth >= quadrature.max_depth:
                result = _combine(result, part)
            else:
                mid = 0.5 * (a + b)
                fm_mid = fm.targets(point(mid), xs, ys, chunk).detach()
                stack.append((a, mid, fa, fm_mid, depth + 1))
                stack.append((mid, b, fm_mid, fb, depth + 1))
    return (result if mode == "jacobian" else result["jv"]), nodes


def _contract_jacobian(phi: Params, unit_updates: Params, pseudo_updates: dict[str, Params], names, group_index,
                       n_labels, keep_units: bool):
    """I_t[j, x, i, o] = Φ_t(x)[o, j] update_t(i)[j], summed within parameter groups (or per coordinate);
    the same for every pseudo-unit (no unit axis). Returns (kernel, {pseudo: tensor}, Φ_t Σ_u update_t(u))."""
    kernel_parts = []
    pseudo_parts: dict[str, list] = {p: [] for p in pseudo_updates}
    predicted = 0
    per_coordinate = group_index is None
    for n in names:
        # (X, O, n_p) and (units, n_p); not flatten(2)/flatten(1), which fail for 0-dim parameters
        J = phi[n].reshape(*phi[n].shape[:2], phi[n].shape[2:].numel())
        U = unit_updates[n].reshape(unit_updates[n].shape[0], unit_updates[n].shape[1:].numel())
        if keep_units:
            kernel_parts.append(torch.einsum("xoj,uj->jxuo" if per_coordinate else "xoj,uj->xuo", J, U))
        else:
            kernel_parts.append(torch.einsum("xoj,j->jxo" if per_coordinate else "xoj,j->xo", J, U.sum(0)))
        direction = U.sum(0)
        for p, updates in pseudo_updates.items():
            R = updates[n].reshape(-1)
            pseudo_parts[p].append(torch.einsum("xoj,j->jxo" if per_coordinate else "xoj,j->xo", J, R))
            direction = direction + R
        predicted = predicted + torch.einsum("xoj,j->xo", J, direction)
    if per_coordinate:
        return torch.cat(kernel_parts), {p: torch.cat(v) for p, v in pseudo_parts.items()}, predicted

    def grouped(parts):
        out = torch.zeros((n_labels, *parts[0].shape), dtype=parts[0].dtype, device=parts[0].device)
        for gi, part in zip(group_index, parts):
            out[gi] += part
        return out

    return grouped(kernel_parts), {p: grouped(v) for p, v in pseudo_parts.items()}, predicted


def _replay_check(t, total: Params, delta: Params, theta_t: Params, theta_next: Params, rtol: float,
                  eps_train: float, updated: set[str], update_rounding: Mapping[str, float]) -> float:
    """Raise :class:`ReplayMismatchError` unless |Σ_u update_t(u) − Δθ_t| ≤ rtol·max|Δθ_t| + 16 ε max|θ| + r,
    with r the first-order effect of the gradients' rounding on this update (``update_rounding``: it
    matters where a preconditioner amplifies a gradient that is zero up to rounding, e.g. Adam on an
    attention key bias, which softmax ignores)."""
    worst = 0.0
    for n in total:
        err = float((total[n] - delta[n]).abs().max()) if total[n].numel() else 0.0
        scale = float(delta[n].abs().max()) if delta[n].numel() else 0.0
        size = max(float(theta_t[n].abs().max()), float(theta_next[n].abs().max())) if delta[n].numel() else 0.0
        tol = rtol * scale + 16 * eps_train * size + update_rounding.get(n, 0.0)
        if err > tol:
            what = "received a gradient" if n in updated else "received no gradient (so PyTorch skipped it)"
            raise ReplayMismatchError(
                f"step {t}, parameter {n!r} (which {what}): the update rebuilt from per-sample gradients "
                f"differs from θ_{{t+1}} − θ_t by {err:.3e} (tolerance {tol:.3e}, max |Δθ| {scale:.3e}). "
                "Is the training loss a weighted sum of the per-sample losses given as loss_fn, over exactly "
                "the ids recorded for this step? Was the gradient clipped or the parameter changed by hand?"
            )
        worst = max(worst, err / scale if scale > 0 else err)
    return worst


class _StepAccumulator:
    """Per-step tensors (stacked on a leading step axis), or their running sum when the step axis is not
    kept. A step left out by ``decompose_steps`` is None: zeros when stacked, skipped in the sum."""

    def __init__(self, keep_steps: bool):
        self.keep_steps, self.steps, self.total = keep_steps, [], None

    def add(self, value: torch.Tensor | None) -> None:
        if self.keep_steps:
            self.steps.append(value)
        elif value is not None:
            self.total = value.clone() if self.total is None else self.total.add_(value)

    def result(self) -> torch.Tensor:
        if not self.keep_steps:
            return self.total
        template = next(v for v in self.steps if v is not None)
        return torch.stack([torch.zeros_like(template) if v is None else v for v in self.steps])


def _global_gradient_scale(per_sample: Params | None, penalty_grad: Params | None,
                           recorded: Mapping[str, torch.Tensor] | None) -> float:
    """max |g| over every parameter tensor of the step: the recorded ``.grad`` when there is one, else
    Σ_i w_i ∇ℓ_i (+ ∇R). The scale of the backward pass's rounding."""
    if recorded is not None:
        tensors = list(recorded.values())
    else:
        tensors = [_with_penalty(per_sample, penalty_grad, n) for n in per_sample]
    return max((float(g.abs().max()) for g in tensors if g.numel()), default=0.0)


def _abs_linear(coefficient, x: torch.Tensor) -> torch.Tensor:
    """|A| ⊙ x for x ≥ 0 and a number or tensor A; |A(x)| for a callable linear map (a bound's estimate)."""
    if callable(coefficient):
        return coefficient(x).abs()
    if isinstance(coefficient, torch.Tensor):
        return coefficient.abs() * x
    return abs(coefficient) * x


def _penalty_gradient(penalty, theta_t: Params) -> Params:
    """∇R(θ_t) of a loss penalty R(θ) (an L1/L2 term inside the training loss), its own pseudo-unit."""

    def value(p: Params) -> torch.Tensor:
        out = penalty(p)
        if not isinstance(out, torch.Tensor) or out.numel() != 1:
            raise ExplaindError("penalty(params) must return a scalar tensor R(θ)")
        return out.reshape(())

    return {n: v.detach() for n, v in torch.func.grad(value)(theta_t).items()}


def _with_penalty(per_sample: Params, penalty_grad: Params | None, n: str) -> torch.Tensor:
    ours = per_sample[n].sum(0)
    return ours if penalty_grad is None else ours + penalty_grad[n]


def _recover_gradient_scale(t: int, per_sample: Params, penalty_grad: Params | None,
                            recorded: Mapping[str, torch.Tensor], rtol: float, eps_train: float) -> float:
    """c_t with recorded .grad = c_t (Σ_i w_i ∇ℓ_i + ∇R), by least squares over every recorded tensor,
    then verified coordinate-wise: clipping by norm passes, clipping by value or a non-additive loss fails."""
    num, den = 0.0, 0.0
    pairs = []
    for n, g in recorded.items():
        ours = _with_penalty(per_sample, penalty_grad, n)
        g = g.to(device=ours.device, dtype=ours.dtype)
        num += float((g * ours).sum())
        den += float((ours * ours).sum())
        pairs.append((n, ours, g))
    if den == 0.0:
        return 1.0
    c = num / den
    overall = _global_gradient_scale(None, None, recorded)
    for n, ours, g in pairs:
        scale = float(g.abs().max()) if g.numel() else 0.0
        err = float((c * ours - g).abs().max()) if g.numel() else 0.0
        if err > rtol * max(scale, 1e-30) + 64 * eps_train * overall + 1e-300:
            raise ReplayMismatchError(
                f"step {t}, parameter {n!r}: the gradient seen by optimizer.step() is not one scalar multiple "
                f"c_t = {c:.6g} of Σ_i w_i ∇ℓ_i (off by {err:.3e}, max |grad| {scale:.3e}). Clipping by norm over "
                "all trained parameters is exact; clipping by value (clip_grad_value_) or per-tensor clipping is "
                "not linear in the per-sample gradients and cannot be decomposed exactly"
            )
    return c


def _check_gradient_sum(t: int, per_sample: Params, penalty_grad: Params | None,
                        recorded: Mapping[str, torch.Tensor], rtol: float, eps_train: float) -> None:
    """The recorded ``.grad`` must equal Σ_i w_{t,i} ∇ℓ_i(θ_t) (+ ∇R): pinpoints a non-additive loss.
    Rounding is measured against the largest gradient of any tensor: a tensor whose true gradient is zero
    (an attention key bias) holds only the rounding of the others' backward pass."""
    overall = _global_gradient_scale(None, None, recorded)
    for n, g in recorded.items():
        ours = _with_penalty(per_sample, penalty_grad, n)
        g = g.to(device=ours.device, dtype=ours.dtype)
        scale = float(g.abs().max()) if g.numel() else 0.0
        err = float((ours - g).abs().max()) if g.numel() else 0.0
        if err > rtol * max(scale, 1e-30) + 64 * eps_train * overall + 1e-300:
            raise ReplayMismatchError(
                f"step {t}, parameter {n!r}: the gradient seen by optimizer.step() differs from "
                f"Σ_i w_i ∇ℓ_i over the recorded ids by {err:.3e} (max |grad| {scale:.3e}). The training loss "
                "must be a weighted sum of per-sample losses loss_fn(model(x_i), y_i) over exactly the ids given "
                "to record_batch (weights as recorded), plus the penalty if one is given; for clip_grad_norm_ "
                "record with TrajectoryRecorder(..., gradient_rescaling=True)."
            )
