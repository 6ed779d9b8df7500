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
from .optimizers.template import apply_linear, decay_direct_update, decay_gradient
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

    # buffers of the §4 template, one per unit and parameter
    sample_buffer = {n: torch.zeros((n_units, *shapes[n]), dtype=dtype, device=device) for n in names}
    decay_buffer = {n: torch.zeros(shapes[n], dtype=dtype, device=device) for n in names}
    key = rule.buffer_state_key
    carried_buffer = {
        n: st[key].to(device=device, dtype=dtype)
        for n, st in trajectory.initial_state.items()
        if key is not None and key in st
    }
    has_carried = bool(carried_buffer)
    updated_before = {n: (n in carried_buffer) for n in names}

    theta_t = theta(0)
    f_t = fm.targets(theta_t, xs_test, y_test, test_chunk_size).detach()
    f_initial = f_t.clone()
    kernel_steps, reg_steps, carried_steps, residuals, replay_errors, nodes_per_step = [], [], [], [], [], []

    for t, step in enumerate(trajectory.steps):
        theta_next = theta(t + 1)
        delta = {n: theta_next[n] - theta_t[n] for n in names}
        updated = set(step.updated)

        # 1. per-sample gradients, weighted: g_{t,i} = w_{t,i} ∇ℓ_i(θ_t)
        xb, yb = data.fetch(step.units)
        rows = torch.as_tensor([row_of[u] for u in step.units], dtype=torch.long, device=device)
        weights = step.weights.to(device=device, dtype=dtype)
        raw = fm.per_sample_gradients(theta_t, loss_fn, xb, yb, vectorize=vectorize, chunk_size=train_chunk_size)
        per_sample = {n: raw[n] * weights.reshape(-1, *([1] * len(shapes[n]))) for n in names}
        if step.gradient is not None:
            _check_gradient_sum(t, per_sample, step.gradient, rtol, eps_train)

        # 2. the rule's table advances the buffers and gives every unit's update
        unit_updates, decay_updates, carried_updates = {}, {}, {}
        for n in names:
            if n not in updated:
                unit_updates[n] = torch.zeros_like(sample_buffer[n])
                decay_updates[n] = torch.zeros(shapes[n], dtype=dtype, device=device)
                carried_updates[n] = torch.zeros(shapes[n], dtype=dtype, device=device)
                continue
            hyper = step.hyperparameters[trajectory.group_of[n]]
            state = {k: (v.to(device=device, dtype=dtype) if isinstance(v, torch.Tensor) else v)
                     for k, v in step.state.get(n, {}).items()}
            c = rule.coefficients(hyper, state, first_update=not updated_before[n])
            updated_before[n] = True
            grads = c.gradient_sign * per_sample[n]
            buf = apply_linear(c.A, sample_buffer[n])
            buf = buf.index_add(0, rows, apply_linear(c.C, grads))
            sample_buffer[n] = buf
            upd = -apply_linear(c.D, buf)
            unit_updates[n] = upd.index_add(0, rows, -apply_linear(c.E, grads))
            g_decay = decay_gradient(theta_t[n], c)
            decay_buffer[n] = apply_linear(c.A, decay_buffer[n]) + apply_linear(c.C, g_decay)
            decay_updates[n] = (-(apply_linear(c.D, decay_buffer[n]) + apply_linear(c.E, g_decay))
                                + decay_direct_update(theta_t[n], c))
            if n in carried_buffer:
                carried_buffer[n] = apply_linear(c.A, carried_buffer[n])
                carried_updates[n] = -apply_linear(c.D, carried_buffer[n])
            else:
                carried_updates[n] = torch.zeros(shapes[n], dtype=dtype, device=device)

        # 3. replay check: Σ_u update_t(u) = θ_{t+1} − θ_t
        total = {n: unit_updates[n].sum(0) + decay_updates[n] + carried_updates[n] for n in names}
        replay_errors.append(_replay_check(t, total, delta, theta_t, theta_next, rtol, eps_train, updated))

        # 4. test feature map by quadrature, contracted on the kept axes
        f_next = fm.targets(theta_next, xs_test, y_test, test_chunk_size).detach()
        kernel_total = {n: unit_updates[n].sum(0) for n in names}
        use_jacobian = keep_params or keep_units
        if t not in selected:  # Appendix G.2: this step is left out; its change stays in the residual
            k_step = r_step = c_step = None
            predicted = torch.zeros_like(f_t)
            nodes = 0
        elif use_jacobian:
            phi, nodes = _integrate(fm, xs_test, y_test, theta_t, delta, f_t, f_next, quadrature,
                                    test_chunk_size, mode="jacobian", step=t)
            k_step, r_step, c_step, predicted = _contract_jacobian(
                phi, unit_updates, decay_updates, carried_updates, names, group_index, len(labels), keep_units
            )
        else:
            tangents = {n: torch.stack([kernel_total[n], decay_updates[n], carried_updates[n], delta[n]]) for n in names}
            jv, nodes = _integrate(fm, xs_test, y_test, theta_t, delta, f_t, f_next, quadrature,
                                   test_chunk_size, mode="jvp", tangents=tangents, step=t)
            k_step, r_step, c_step = jv[0].unsqueeze(0), jv[1].unsqueeze(0), jv[2].unsqueeze(0)
            predicted = jv[0] + jv[1] + jv[2]
        nodes_per_step.append(nodes)

        # 5. the step residual certifies this step
        residuals.append(f_next - f_t - predicted)
        kernel_steps.append(k_step)
        reg_steps.append(r_step)
        carried_steps.append(c_step)
        theta_t, f_t = theta_next, f_next

    if not selected & set(range(trajectory.num_steps)):
        raise ExplaindError("decompose_steps selects none of the trajectory's steps")
    template = next(k for k in kernel_steps if k is not None), next(r for r in reg_steps if r is not None)
    kernel_steps = [torch.zeros_like(template[0]) if k is None else k for k in kernel_steps]
    reg_steps = [torch.zeros_like(template[1]) if r is None else r for r in reg_steps]
    carried_steps = [torch.zeros_like(template[1]) if c is None else c for c in carried_steps]

    def stack(steps_list):
        out = torch.stack(steps_list)
        return out if keep_steps else out.sum(0)

    kernel = stack(kernel_steps)  # (step?, param, test, unit?, output)
    regularization = stack(reg_steps)
    carried = stack(carried_steps) if has_carried else None
    axes = tuple(a for a in AXES if (a != "step" or keep_steps) and (a != "unit" or keep_units))
    result = Influence(
        kernel=kernel, kernel_axes=axes, regularization=regularization, carried_state=carried,
        f_initial=f_initial, f_final=f_t, step_residuals=torch.stack(residuals),
        replay_errors=replay_errors, steps=list(range(trajectory.num_steps)),
        param_labels=labels, units=units, quadrature=quadrature.describe(),
        nodes_per_step=nodes_per_step, theorem=theorem,
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
        return part["jv"][3]

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
            if err <= quadrature.tol * (b - a) or depth >= quadrature.max_depth:
                result = _combine(result, part)
            else:
                mid = 0.5 * (a + b)
                fm_mid = fm.targets(point(mid), xs, ys, chunk).detach()
                stack.append((a, mid, fa, fm_mid, depth + 1))
                stack.append((mid, b, fm_mid, fb, depth + 1))
    return (result if mode == "jacobian" else result["jv"]), nodes


def _contract_jacobian(phi: Params, unit_updates, decay_updates, carried_updates, names, group_index, n_labels,
                       keep_units: bool):
    """I_t[j, x, i, o] = Φ_t(x)[o, j] update_t(i)[j], summed within parameter groups (or per coordinate)."""
    kernel_parts, reg_parts, carried_parts = [], [], []
    predicted = 0
    for n in names:
        J = phi[n].flatten(2)  # (X, O, n_p)
        U = unit_updates[n].flatten(1)  # (units, n_p)
        R = decay_updates[n].reshape(-1)
        Cs = carried_updates[n].reshape(-1)
        if group_index is None:  # one row per coordinate j
            k = torch.einsum("xoj,uj->jxuo", J, U) if keep_units else torch.einsum("xoj,j->jxo", J, U.sum(0))
            r = torch.einsum("xoj,j->jxo", J, R)
            c = torch.einsum("xoj,j->jxo", J, Cs)
        else:
            k = torch.einsum("xoj,uj->xuo", J, U) if keep_units else torch.einsum("xoj,j->xo", J, U.sum(0))
            r = torch.einsum("xoj,j->xo", J, R)
            c = torch.einsum("xoj,j->xo", J, Cs)
        kernel_parts.append(k)
        reg_parts.append(r)
        carried_parts.append(c)
        predicted = predicted + torch.einsum("xoj,j->xo", J, U.sum(0) + R + Cs)
    if group_index is None:
        return torch.cat(kernel_parts), torch.cat(reg_parts), torch.cat(carried_parts), predicted
    kernel = torch.zeros((n_labels, *kernel_parts[0].shape), dtype=kernel_parts[0].dtype, device=kernel_parts[0].device)
    reg = torch.zeros((n_labels, *reg_parts[0].shape), dtype=reg_parts[0].dtype, device=reg_parts[0].device)
    carried = torch.zeros_like(reg)
    for gi, k, r, c in zip(group_index, kernel_parts, reg_parts, carried_parts):
        kernel[gi] += k
        reg[gi] += r
        carried[gi] += c
    return kernel, reg, carried, predicted


def _replay_check(t, total: Params, delta: Params, theta_t: Params, theta_next: Params, rtol: float,
                  eps_train: float, updated: set[str]) -> float:
    """Raise :class:`ReplayMismatchError` unless |Σ_u update_t(u) − Δθ_t| ≤ rtol·max|Δθ_t| + 16 ε max|θ|."""
    worst = 0.0
    for n in total:
        err = float((total[n] - delta[n]).abs().max()) if total[n].numel() else 0.0
        scale = float(delta[n].abs().max()) if delta[n].numel() else 0.0
        size = max(float(theta_t[n].abs().max()), float(theta_next[n].abs().max())) if delta[n].numel() else 0.0
        tol = rtol * scale + 16 * eps_train * size
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


def _check_gradient_sum(t: int, per_sample: Params, recorded: Mapping[str, torch.Tensor], rtol: float,
                        eps_train: float) -> None:
    """The recorded ``.grad`` must equal Σ_i w_{t,i} ∇ℓ_i(θ_t): pinpoints a non-additive loss."""
    for n, g in recorded.items():
        ours = per_sample[n].sum(0)
        g = g.to(device=ours.device, dtype=ours.dtype)
        scale = float(g.abs().max()) if g.numel() else 0.0
        err = float((ours - g).abs().max()) if g.numel() else 0.0
        if err > rtol * max(scale, 1e-30) + 64 * eps_train * scale + 1e-300:
            raise ReplayMismatchError(
                f"step {t}, parameter {n!r}: the gradient seen by optimizer.step() differs from "
                f"Σ_i w_i ∇ℓ_i over the recorded ids by {err:.3e} (max |grad| {scale:.3e}). The training loss "
                "must be a weighted sum of per-sample losses loss_fn(model(x_i), y_i) over exactly the ids given "
                "to record_batch (weights as recorded); gradient clipping is not supported yet."
            )
