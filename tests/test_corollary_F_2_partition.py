"""Corollary F.2: influences accumulated over a partition of the training samples (MATH.md §7).

    T_t(S_k) = Σ_{i∈S_k} T_t(i),     Σ_{i∈S_k} I[t, j, x, i, o] = −η_t Φ_t(x)[o, j] T_t(S_k)[j]

with buffers kept per group (memory K·D instead of M·D). Properties on random runs of the real
optimizer of every registered rule (AdamW, SGD with momentum, RMSprop, Adagrad, …; several groups, schedulers):

* for a partition given as the labels (a tensor indexed by id), a user list of group ids, a mapping, a
  callable, and ``"all"``: the grouped kernel equals the per-sample kernel (computed by the theorem's
  own function, buffers per sample) summed over each group's members, to 1e-12; Ψ, f(θ_0), f(θ_N) are
  unchanged, and the reconstruction stays exact (1e-9);
* a partition that does not cover every recorded id raises TrajectoryMismatchError naming the ids.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import explaind_math as em
from explaind_math.testing import strategies as es
from explaind_math.testing.residuals import RESIDUALS, assert_exact, report_residual

RTOL = 1e-9
SUM_RTOL = 1e-12
THEOREM = "corollary_f_2"  # the row of `python -m explaind_math verify`
#: per-sample and grouped runs are compared on the same nodes (the default rule picks its nodes by what is
#: kept, to bound each kept entry's quadrature error)
SAME_NODES = em.gauss_legendre(8)

SETTINGS = es.property_settings()  # the profile, plus the device fixture shared across examples


def group_sums(per_sample: em.Influence, group_of: dict[int, object], groups: list) -> torch.Tensor:
    """Σ over each group's members of the per-sample kernel (unit axis replaced by the groups)."""
    u = per_sample.kernel_axes.index("unit")
    rows = {g: k for k, g in enumerate(groups)}
    shape = list(per_sample.kernel.shape)
    shape[u] = len(groups)
    out = torch.zeros(shape, dtype=per_sample.kernel.dtype, device=per_sample.kernel.device)
    for r, unit in enumerate(per_sample.units):
        out.select(u, rows[group_of[unit]]).add_(per_sample.kernel.select(u, r))
    return out


def partitions(run: es.TrainedRun, data) -> dict[str, tuple[object, dict[int, object]]]:
    """Every accepted form of a partition: (the argument, the group of each recorded id)."""
    ids = sorted(set(run.trajectory.sample_ids()))
    M = run.train_data[0].shape[0]
    Y = run.train_data[1]
    labels = Y if Y.dtype == torch.long else (Y[:, 0] > 0).long()  # classes; a split of regression targets
    K = data.draw(st.integers(1, 4), label="K")
    user = data.draw(st.lists(st.integers(0, K - 1), min_size=M, max_size=M), label="user groups")
    names = ["a", "b", "c"]
    mapping = {i: names[data.draw(st.integers(0, 2), label=f"group of {i}")] for i in ids}
    modulus = data.draw(st.integers(2, 5), label="modulus")

    def parity_and_residue(i: int) -> tuple[str, int]:
        return ("odd" if i % 2 else "even", i % modulus)

    return {
        "labels": (labels, {i: int(labels[i]) for i in ids}),
        "user list": (user, {i: user[i] for i in ids}),
        "mapping": (mapping, dict(mapping)),
        "callable": (parity_and_residue, {i: parity_and_residue(i) for i in ids}),
        "all": ("all", {i: "all" for i in ids}),
    }


RUNS = es.training_runs(families=es.SMOOTH_FAMILIES)  # an optimizer of every registered rule


@SETTINGS
@given(spec=RUNS, data=st.data())
def test_group_influences_are_sums_of_per_sample_influences(spec, data, device):
    run = es.train_and_record(spec, device=device)
    per_sample = es.decompose(run, quadrature=SAME_NODES)  # the theorem's own function: one buffer per training sample
    assert per_sample.units == list(dict.fromkeys(run.trajectory.sample_ids()))
    scale = 1 + float(per_sample.kernel.abs().max())

    for kind, (partition, group_of) in partitions(run, data).items():
        grouped = em.decompose_by_partition(run.model, run.trajectory, run.loss_fn, run.train_data,
                                            run.test_inputs, partition, quadrature=SAME_NODES)
        assert "Corollary F.2" in grouped.theorem and not grouped.estimated
        # the unit axis is labelled by group: exactly the groups that the recorded ids fall in
        assert sorted(map(repr, grouped.units)) == sorted(map(repr, set(group_of.values()))), kind
        assert grouped.kernel_axes == per_sample.kernel_axes
        expected = group_sums(per_sample, group_of, grouped.units)
        assert grouped.kernel.shape == expected.shape
        err = float((grouped.kernel - expected).abs().max())
        report_residual(THEOREM, f"{spec.model.family}, {kind}", err / scale, "Σ per-sample − grouped", steer=False)
        assert err <= SUM_RTOL * scale, f"{kind}: grouped kernel differs from the per-sample sums by {err:.3e}"
        # the parts that do not depend on the units are unchanged
        assert float((grouped.regularization - per_sample.regularization).abs().max()) <= SUM_RTOL * scale
        assert torch.equal(grouped.f_initial, per_sample.f_initial)
        assert torch.equal(grouped.f_final, per_sample.f_final)
        rel = assert_exact(grouped, RTOL, what=f"partition {kind}")
        report_residual(THEOREM, f"{spec.model.family}, {kind}", rel)


@pytest.mark.parametrize("kind", ["short tensor", "short list", "mapping", "callable"])
def test_partition_that_misses_ids_names_them(kind, device):
    spec = es.RunSpec(
        model=es.ModelSpec(family="mlp-tanh", input_shape=(3,), num_outputs=3, hidden=(4,), activation="tanh"),
        optimizer=es.OptimizerSpec("sgd", (("lr", 0.05), ("momentum", 0.9))),
        schedule=es.TrainingSchedule(num_samples=12, batch_sizes=(6, 6, 6)),
        seed=2,
    )
    run = es.train_and_record(spec, device=device)
    ids = sorted(set(run.trajectory.sample_ids()))
    missing = [i for i in ids if i >= 9] if kind.startswith("short") else ids[1::3]
    assert missing
    if kind == "short tensor":
        partition = run.train_data[1][:9]
    elif kind == "short list":
        partition = [0] * 9
    elif kind == "mapping":
        partition = {i: i % 2 for i in ids if i not in missing}
    else:
        lookup = {i: "kept" for i in ids if i not in missing}
        partition = lambda i: lookup[i]  # noqa: E731  (KeyError for the missing ids)
    with pytest.raises(em.TrajectoryMismatchError) as info:
        em.decompose_by_partition(run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs,
                                  partition)
    message = str(info.value)
    assert "partition" in message
    assert str(missing[:10]) in message, message


def test_one_group_uses_the_batch_gradient_and_matches_per_sample_buffers():
    """partition="all" takes one weighted-loss gradient per step instead of every sample's (Corollary F.2
    needs only the group sums); the influences equal the per-sample decomposition summed over units, and a
    float32 computation of a float64 run gets the float32 replay tolerance."""
    from explaind_math.testing.small_runs import blob_loss, recorded_blob_run
    from explaind_math.features import FunctionalModel

    model, trajectory, data, X_test = recorded_blob_run(seed=5, num_test=3)
    calls = {"per_sample": 0, "group": 0}
    per_sample, group = FunctionalModel.per_sample_gradients, FunctionalModel.group_gradients

    def counted(name, fn):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapper

    FunctionalModel.per_sample_gradients = counted("per_sample", per_sample)
    FunctionalModel.group_gradients = counted("group", group)
    try:
        grouped = em.decompose_by_partition(model, trajectory, blob_loss, data, X_test, "all", keep=("step", "param"),
                                            quadrature=SAME_NODES)
    finally:
        FunctionalModel.per_sample_gradients, FunctionalModel.group_gradients = per_sample, group
    assert calls == {"per_sample": 0, "group": trajectory.num_steps}
    assert "1 partition groups" in grouped.summary()
    single = em.decompose_adamw_training(model, trajectory, blob_loss, data, X_test, keep=("step", "param"),
                                         quadrature=SAME_NODES)
    scale = 1 + float(single.kernel.abs().sum())
    assert float((grouped.kernel - single.kernel).abs().max()) <= 1e-12 * scale
    low = em.decompose_adamw_training(model, trajectory, blob_loss, data, X_test, keep=("step",), dtype=torch.float32)
    assert low.relative_residual <= 1e-4
