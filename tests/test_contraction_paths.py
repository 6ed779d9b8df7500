"""Every contraction of the atomic tensor agrees (MATH.md §5, §11).

The atomic scores I[t, j, x, i, o] and Ψ[t, j, x, o] are one tensor; what the caller keeps only decides
which axes are summed and which code path computes it: forward-mode JVPs along the summed updates
(keep=("step",)), full Jacobians contracted per unit (keep=("unit",)), per tensor (keep=("param",)),
and with every axis kept per tensor, per module, per coordinate, all in one, or per a custom grouping.
Property: for one recorded run, all of them give the same reconstruction
(1e-12), and summing the atomic tensor (params="coordinate", every axis kept) over the axes a reduced
result left out reproduces that result entry by entry, to 1e-12 of the atomic scores' L1 mass
1 + Σ|I| + Σ|Ψ| (the bound on any partial sum, so on its rounding too).
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import explaind_math as em
from explaind_math.testing import strategies as es
from explaind_math.testing.residuals import (
    CONTRACTION_RTOL,
    REPLAY_RTOL,
    SMOOTH_RTOL,
    check_certificate,
    report_residual,
)

FULL = ("step", "param", "unit")
#: every path is compared on the same nodes (the default rule picks its nodes by what is kept, to bound
#: each kept entry's quadrature error, so two paths would integrate on different nodes)
SAME_NODES = em.gauss_legendre(8)


def _close(a: torch.Tensor, b: torch.Tensor, scale: float, what: str) -> float:
    assert a.shape == b.shape, f"{what}: shapes {tuple(a.shape)} and {tuple(b.shape)}"
    err = float((a - b).abs().max()) if a.numel() else 0.0
    assert err <= CONTRACTION_RTOL * scale, f"{what}: differ by {err:.3e} (scale {scale:.2e})"
    return err


def _group_rows(tensor: torch.Tensor, dim: int, labels_of_rows, labels) -> torch.Tensor:
    """Sum the rows of ``tensor`` along ``dim`` into the groups ``labels`` (row r → labels_of_rows[r])."""
    index = torch.as_tensor([labels.index(l) for l in labels_of_rows], dtype=torch.long, device=tensor.device)
    shape = list(tensor.shape)
    shape[dim] = len(labels)
    return torch.zeros(shape, dtype=tensor.dtype, device=tensor.device).index_add(dim, index, tensor)


def runs_for_contraction():
    """Smooth families, any optimizer, N ≤ 3 steps, ≤ 12 samples: eight decompositions per example."""
    return es.training_runs(
        families=es.SMOOTH_FAMILIES,
        schedule_strategy=es.training_schedules(max_steps=3, max_samples=12),
        num_test=st.integers(2, 3),
    )


@es.property_settings()
@given(spec=runs_for_contraction(), labels=st.lists(st.sampled_from(["a", "b", "c"]), min_size=8, max_size=8))
def test_all_contraction_paths_agree(spec, labels, device):
    """keep=("step",) (JVP), ("unit",), ("param",), every axis with params="coordinate", "tensor",
    "module", "all" and a random mapping: one reconstruction, and each is a sum of the atomic tensor."""
    run = es.train_and_record(spec, device=device)
    decompose = lambda **kw: es.decompose(run, replay_rtol=REPLAY_RTOL, quadrature=SAME_NODES, **kw)  # noqa: E731
    names = run.trajectory.parameter_names
    shapes = run.trajectory.shapes()

    atomic = decompose(keep=FULL, params="coordinate")  # I[t, j, x, i, o] with j the coordinates
    check_certificate(run, atomic, SMOOTH_RTOL, family=f"{run.family} (coordinate)")
    # any partial sum of the atomic scores is at most their L1 mass, and so is its rounding error / ε·K:
    # agreement is asked to 1e-12 of that mass
    scale = 1 + float(atomic.kernel.abs().sum()) + float(atomic.regularization.abs().sum())
    coord_tensor = [n for n in names for _ in range(torch.Size(shapes[n]).numel())]
    assert len(atomic.param_labels) == len(coord_tensor)
    assert all(label.startswith(n + "[") for label, n in zip(atomic.param_labels, coord_tensor))

    worst = 0.0
    reference = atomic.reconstruction

    # parameter groupings, every other axis kept: the coordinate rows summed by group
    module_of = {n: n.rsplit(".", 1)[0] if "." in n else n for n in names}
    custom = {n: labels[k % len(labels)] for k, n in enumerate(names)}
    groupings = (("tensor", {n: n for n in names}), ("module", module_of), ("all", {n: "all" for n in names}),
                 (custom, custom))
    for params, group_of in groupings:
        result = decompose(keep=FULL, params=params)
        expected_labels = list(dict.fromkeys(group_of[n] for n in names))
        assert result.param_labels == expected_labels, f"params={params!r}: labels {result.param_labels}"
        rows = [group_of[n] for n in coord_tensor]
        worst = max(worst, _close(result.kernel, _group_rows(atomic.kernel, 1, rows, expected_labels), scale,
                                  f"kernel, params={params!r}"))
        worst = max(worst, _close(result.regularization, _group_rows(atomic.regularization, 1, rows, expected_labels),
                                  scale, f"regularization, params={params!r}"))
        worst = max(worst, _close(result.reconstruction, reference, scale, f"reconstruction, params={params!r}"))

    # reduced axes: the Jacobian path with fewer axes, and the JVP path (no param, no unit axis)
    for keep in (("step",), ("unit",), ("param",)):
        result = decompose(keep=keep)
        kept = tuple(a for a in ("step", "param", "test", "unit", "output") if a in (*keep, "test", "output"))
        assert result.kernel_axes == kept, f"keep={keep}: axes {result.kernel_axes}"
        expected_k = atomic.kernel_sum(kept)
        expected_r = atomic.regularization_sum(tuple(a for a in kept if a != "unit"))
        if "param" in kept:  # tensor granularity: group the coordinate rows by tensor
            expected_k = _group_rows(expected_k, kept.index("param"), coord_tensor, names)
            expected_r = _group_rows(expected_r, kept.index("param"), coord_tensor, names)
        worst = max(worst, _close(result.kernel, expected_k, scale, f"kernel, keep={keep}"))
        worst = max(worst, _close(result.regularization, expected_r, scale, f"regularization, keep={keep}"))
        worst = max(worst, _close(result.reconstruction, reference, scale, f"reconstruction, keep={keep}"))
        # every path certifies itself with the same step residuals
        worst = max(worst, _close(result.step_residuals, atomic.step_residuals, scale, f"step residuals, keep={keep}"))
        assert result.relative_residual <= SMOOTH_RTOL
    report_residual(atomic.theorem, run.family, worst / scale, "contraction paths: max relative disagreement",
                    steer=True)

    # Influence's own accumulation agrees with explicit sums of the atomic tensor
    per_unit = atomic.kernel_sum(("test", "unit", "output"))
    _close(per_unit, atomic.kernel.sum(dim=(0, 1)), scale, "kernel_sum over steps and parameters")
    _close(atomic.kernel_sum(), atomic.kernel.sum(dim=(0, 1, 3)), scale, "kernel_sum to (test, output)")


# ----------------------------------------------------------------------------------------------------------
# Contraction planning (MATH.md §11): every way of computing a kept result — forced JVPs, forced Jacobians,
# the per-step automatic choice, test/sample/tangent chunks, and the Jacobian formed one parameter group at
# a time — equals the atomic tensor summed over the axes left out, to 1e-12 of its L1 mass.

KEPT_CHOICES = [(), ("step",), ("unit",), ("param",), ("step", "unit"), ("step", "param"), ("param", "unit"),
                ("step", "param", "unit")]


def _expected_from_atomic(atomic, kept, names, coord_tensor, group_of):
    """The atomic tensor (coordinate rows) summed to ``kept`` axes, its rows grouped by ``group_of``."""
    kernel = atomic.kernel_sum(kept)
    reg = atomic.regularization_sum(tuple(a for a in kept if a != "unit"))
    if "param" in kept:
        labels = list(dict.fromkeys(group_of[n] for n in names))
        rows = [group_of[n] for n in coord_tensor]
        kernel = _group_rows(kernel, kept.index("param"), rows, labels)
        reg = _group_rows(reg, kept.index("param"), rows, labels)
    return kernel, reg


@es.property_settings()
@given(spec=runs_for_contraction(), data=st.data())
def test_planned_contractions_equal_the_atomic_tensor(spec, data, device):
    """Random kept axes × parameter grouping × contraction (auto, measured, jvp, jacobian) × chunking: the result
    is the atomic tensor's partial sum (1e-12 of its L1 mass), certified by the same step residuals."""
    run = es.train_and_record(spec, device=device)
    names = run.trajectory.parameter_names
    shapes = run.trajectory.shapes()
    # the forward recursion's planner is under test (accumulation="auto" may take the adjoint, §12)
    decompose = lambda **kw: es.decompose(run, replay_rtol=REPLAY_RTOL, quadrature=SAME_NODES,  # noqa: E731
                                          accumulation="forward", **kw)
    atomic = decompose(keep=FULL, params="coordinate", contraction="jacobian")
    scale = 1 + float(atomic.kernel.abs().sum()) + float(atomic.regularization.abs().sum())
    coord_tensor = [n for n in names for _ in range(torch.Size(shapes[n]).numel())]

    extra = data.draw(st.sampled_from(KEPT_CHOICES), label="kept axes")
    kept = tuple(a for a in ("step", "param", "test", "unit", "output") if a in (*extra, "test", "output"))
    labels = data.draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=len(names), max_size=len(names)),
                       label="custom groups")
    grouping = data.draw(st.sampled_from(["tensor", "module", "all", "custom"]), label="params")
    group_of = {"tensor": {n: n for n in names}, "module": {n: n.rsplit(".", 1)[0] if "." in n else n for n in names},
                "all": {n: "all" for n in names}, "custom": dict(zip(names, labels))}[grouping]
    params = dict(zip(names, labels)) if grouping == "custom" else grouping
    contraction = data.draw(st.sampled_from(["auto", "measured", "jvp", "jacobian"]), label="contraction")
    chunking = data.draw(st.fixed_dictionaries({
        "test_chunk_size": st.sampled_from([None, 1, 2]),
        "train_chunk_size": st.sampled_from([None, 1, 3]),
    }), label="chunks")

    result = decompose(keep=kept, params=params, contraction=contraction, **chunking)
    assert result.kernel_axes == kept
    if contraction in ("jvp", "jacobian"):
        assert set(result.contraction_per_step) == {contraction}
    else:
        assert set(result.contraction_per_step) <= {"jvp", "jacobian"}
    expected_k, expected_r = _expected_from_atomic(atomic, kept, names, coord_tensor, group_of if "param" in kept
                                                   else {n: "all" for n in names})
    what = f"keep={kept}, params={params!r}, contraction={contraction}, {chunking}"
    worst = _close(result.kernel, expected_k, scale, f"kernel, {what}")
    worst = max(worst, _close(result.regularization, expected_r, scale, f"regularization, {what}"))
    worst = max(worst, _close(result.step_residuals, atomic.step_residuals, scale, f"step residuals, {what}"))
    assert result.relative_residual <= SMOOTH_RTOL
    report_residual(atomic.theorem, run.family, worst / scale, "planned contractions: max relative disagreement",
                    steer=True)


def test_memory_budget_chunks_and_groupwise_jacobian_are_exact():
    """A budget too small for one test input's full Jacobian forms it one parameter group at a time, with
    small test, sample and tangent chunks; the result equals the unbudgeted one. A budget too small for
    the per-unit buffers is refused with an error that names them."""
    from explaind_math.engine.plan import MemoryBudgetError
    from explaind_math.testing.small_runs import blob_loss, recorded_blob_run

    model, trajectory, data, X_test = recorded_blob_run(seed=4, num_test=3)
    decompose = lambda **kw: em.decompose_adamw_training(model, trajectory, blob_loss, data, X_test,  # noqa: E731
                                                         dtype=torch.float64, quadrature=SAME_NODES, **kw)
    reference = decompose(keep=("step", "param", "unit"), contraction="jacobian")
    D = sum(p.numel() for p in trajectory.parameters[0].values())
    U, O, X, N = len(reference.units), 3, 3, trajectory.num_steps
    itemsize = 8
    kept = N * (len(reference.param_labels) * X * O * U + 3 * len(reference.param_labels) * X * O) * itemsize
    fixed = (2 * U * D + 8 * D) * itemsize + kept
    largest_group = max(p.numel() for p in trajectory.parameters[0].values())
    # room for the Jacobian of one input over the largest tensor, not over all parameters
    budget = fixed + 3 * 4 * O * largest_group * itemsize + 64
    for contraction in ("jacobian", "jvp", "auto"):
        result = decompose(keep=("step", "param", "unit"), contraction=contraction, memory_budget=budget)
        if contraction == "jacobian":
            assert "groupwise_jacobian" in result.plan, result.plan
        scale = 1 + float(reference.kernel.abs().sum())
        _close(result.kernel, reference.kernel, scale, f"kernel under a memory budget ({contraction})")
        _close(result.regularization, reference.regularization, scale, f"regularization under a budget ({contraction})")
    with pytest.raises(MemoryBudgetError, match=r"per-unit buffers"):
        decompose(keep=("step", "param", "unit"), memory_budget=fixed // 2)
    with pytest.raises(em.ExplaindError, match=r"memory_budget"):
        decompose(memory_budget="lots")


@pytest.mark.parametrize("groupwise", [False, True], ids=["full-jacobian", "groupwise-jacobian"])
def test_quadrature_nodes_in_chunks_are_exact(groupwise):
    """The Jacobians of a step's nodes formed in one vmapped call (all 8 nodes, or as many as the memory
    budget's share holds), in chunks of 3, 3, 2, or one node at a time give the same influences; the plan
    says how many nodes go into one call."""
    from explaind_math.testing.small_runs import blob_loss, recorded_blob_run

    model, trajectory, data, X_test = recorded_blob_run(seed=5, num_test=3)
    budget = {}
    if groupwise:  # room for one input's Jacobians of 3 nodes over the largest tensor, not over all of θ
        D = sum(p.numel() for p in trajectory.parameters[0].values())
        largest = max(p.numel() for p in trajectory.parameters[0].values())
        U, O, X, N, rows = len(trajectory.sample_ids()), 3, 3, trajectory.num_steps, len(trajectory.parameter_names)
        kept = N * (rows * X * O * U + 3 * rows * X * O) * 8
        share = (2 * 3 + 2) * O * largest * 8  # (2k + 2) Jacobians of one group, k = 3 nodes
        assert share < 4 * O * D * 8, "the share must be too small for one input's full Jacobian"
        budget = {"memory_budget": (2 * U * D + 8 * D) * 8 + kept + 3 * share + 2, "test_chunk_size": 1}
    results = {}
    for chunk in (1, 3, None):
        result = em.decompose_adamw_training(model, trajectory, blob_loss, data, X_test, dtype=torch.float64,
                                             keep=FULL, contraction="jacobian", quadrature=em.gauss_legendre(8),
                                             node_chunk_size=chunk, **budget)
        expected = chunk or (3 if groupwise else 16)
        assert (f"node_chunk={expected}" in result.plan) == (expected > 1), result.plan
        assert ("groupwise_jacobian" in result.plan) == groupwise, result.plan
        results[chunk] = result
    scale = 1 + float(results[1].kernel.abs().sum())
    for chunk in (3, None):
        _close(results[chunk].kernel, results[1].kernel, scale, f"kernel, nodes in chunks of {chunk}")
        _close(results[chunk].regularization, results[1].regularization, scale, f"regularization, chunks of {chunk}")
        _close(results[chunk].step_residuals, results[1].step_residuals, scale, f"step residuals, chunks of {chunk}")
        assert results[chunk].relative_residual <= SMOOTH_RTOL
    with pytest.raises(em.ExplaindError, match=r"node_chunk_size"):
        em.decompose_adamw_training(model, trajectory, blob_loss, data, X_test, node_chunk_size=0)


def test_planning_leaves_the_random_stream_alone():
    """contraction="measured" times the two ways on a few test inputs; it must not draw from torch's global RNG
    (a user who seeds, decomposes and then trains would otherwise get a different run)."""
    from explaind_math.testing.small_runs import blob_loss, recorded_blob_run

    model, trajectory, data, X_test = recorded_blob_run(seed=2, num_test=2, steps=2)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    result = em.decompose_adamw_training(model, trajectory, blob_loss, data, X_test, keep=("param",),
                                         contraction="measured")
    assert "measured" in result.plan
    assert torch.equal(torch.rand(3), expected)


class _ReverseOnlyTanh(torch.autograd.Function):
    """tanh with a backward but no forward-mode rule, like kernels that implement reverse mode only (CPU
    flash attention inside nn.MultiheadAttention in some builds)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return torch.tanh(x)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output)

    @staticmethod
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


class _ReverseOnlyMLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.first, self.second = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

    def forward(self, x):
        return self.second(_ReverseOnlyTanh.apply(self.first(x)))


def test_models_without_forward_mode_ad_take_the_jacobian_path():
    """A target PyTorch cannot differentiate in forward mode: "auto" plans Jacobians only, adaptive rules
    probe through the Jacobian, and the result equals the same decomposition of an ordinary tanh MLP with
    the same weights; contraction="jvp" is refused with the reason."""
    from explaind_math.testing.small_runs import blob_loss, recorded_blob_run

    model, trajectory, data, X_test = recorded_blob_run(seed=8, num_test=3, steps=4)
    reverse_only = _ReverseOnlyMLP().double()
    reverse_only.first.load_state_dict(model[0].state_dict())
    reverse_only.second.load_state_dict(model[2].state_dict())
    renamed = em.Trajectory.from_records(
        optimizer="adamw",
        parameters=[{n.replace("0.", "first.").replace("2.", "second."): v for n, v in p.items()}
                    for p in trajectory.parameters],
        batches=[(s.sample_ids, s.weights) for s in trajectory.steps],
        hyperparameters=[s.hyperparameters for s in trajectory.steps],
        states=[{n.replace("0.", "first.").replace("2.", "second."): v for n, v in s.state.items()}
                for s in trajectory.steps])
    options = dict(keep=("step", "param"), quadrature=em.adaptive_gauss_legendre(1e-12))
    plain = em.decompose_adamw_training(model, trajectory, blob_loss, data, X_test, **options)
    result = em.decompose_adamw_training(reverse_only, renamed, blob_loss, data, X_test, **options)
    assert set(result.contraction_per_step) == {"jacobian"} and "costs" not in result.plan
    scale = 1 + float(plain.kernel.abs().sum())
    assert float((result.kernel - plain.kernel).abs().max()) <= 1e-12 * scale
    assert result.nodes_per_step == plain.nodes_per_step
    with pytest.raises(em.ExplaindError, match="forward-mode AD"):
        em.decompose_adamw_training(reverse_only, renamed, blob_loss, data, X_test, contraction="jvp")


def test_auto_planning_is_reproducible_bit_for_bit():
    """contraction="auto" decides by counted costs, so two runs take the same path at every step and give
    identical scores (a timed choice could flip between runs; both are exact, but differ by rounding)."""
    from explaind_math.testing.small_runs import blob_loss, recorded_blob_run

    model, trajectory, data, X_test = recorded_blob_run(seed=10, num_test=3, steps=4)
    runs = [em.decompose_adamw_training(model, trajectory, blob_loss, data, X_test, keep=("step", "param"))
            for _ in range(2)]
    assert runs[0].contraction_per_step == runs[1].contraction_per_step
    assert "counted" in runs[0].plan
    assert torch.equal(runs[0].kernel, runs[1].kernel) and torch.equal(runs[0].regularization, runs[1].regularization)
