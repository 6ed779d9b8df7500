"""Example 4 (data attribution, Appendix G.1) and explaind_math.experiments.attribution: TracIn and the
TRAK-style baseline against hand computations, the LDS against its definition, the retraining
protocols, the ExPLAIND scores against the decomposition, and the --quick run of the example.
No test asserts which method wins (that is a measurement, reported by the example)."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em
from explaind_math.errors import ExplaindError
from explaind_math.experiments import attribution as at
from explaind_math.testing.small_runs import blob_loss, recorded_blob_run
from explaind_math.testing.scripts import load_script

pytest.importorskip("sklearn")
pytest.importorskip("scipy")

#: float64 sums of a few hundred products of O(1) numbers computed in two orders
SUM_ORDER_TOLERANCE = 1e-12
#: README "Tolerances": smooth models, Gauss–Legendre with ≥ 4 nodes on these short runs, float64
SMOOTH_TOLERANCE = 1e-9


def _load_example():
    return load_script(Path(__file__).resolve().parents[1] / "examples" / "data_attribution.py",
                       "example_data_attribution")


# ---------------------------------------------------------------------------------------------- TracIn
def _flat_grad(model, theta, x, y):
    """∇_θ ℓ(f(x; θ), y) by plain autograd on one example, flattened in the trajectory's order."""
    params = {n: t.clone().requires_grad_(True) for n, t in theta.items()}
    out = torch.func.functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)
    grads = torch.autograd.grad(blob_loss(out, y), list(params.values()))
    return torch.cat([g.reshape(-1) for g in grads])


def test_tracin_equals_a_direct_hand_computation():
    model, trajectory, (X, Y), X_test = recorded_blob_run(seed=3, num_test=3, steps=5)
    Y_test = torch.tensor([0, 2, 1])
    scores = at.tracin_scores(model, trajectory, blob_loss, (X, Y), X_test, Y_test)
    expected = torch.zeros(3, X.shape[0], dtype=torch.float64)
    for t, record in enumerate(trajectory.steps):
        theta = trajectory.parameters[t]
        eta = record.hyperparameters[0]["lr"]
        g_test = [_flat_grad(model, theta, X_test[x], Y_test[x]) for x in range(3)]
        for i, w in zip(record.sample_ids, record.weights.tolist()):
            g_i = _flat_grad(model, theta, X[i], Y[i])
            for x in range(3):
                expected[x, i] += eta * w * float(g_test[x] @ g_i)
    assert torch.allclose(scores, expected, rtol=0, atol=SUM_ORDER_TOLERANCE)
    never_used = sorted(set(range(X.shape[0])) - set(trajectory.sample_ids()))
    assert (scores[:, never_used] == 0).all()  # in-batch TracIn credits only samples a step used


def test_tracin_checkpoints_equals_a_direct_hand_computation():
    model, trajectory, (X, Y), X_test = recorded_blob_run(seed=4, num_test=2, steps=4)
    Y_test = torch.tensor([1, 0])
    checkpoints = [0, 2, 4]
    scores = at.tracin_checkpoint_scores(model, trajectory, blob_loss, (X, Y), X_test, Y_test, checkpoints)
    expected = torch.zeros(2, X.shape[0], dtype=torch.float64)
    for c in checkpoints:
        theta, eta = trajectory.parameters[c], trajectory.steps[min(c, 3)].hyperparameters[0]["lr"]
        g_test = [_flat_grad(model, theta, X_test[x], Y_test[x]) for x in range(2)]
        for i in range(X.shape[0]):
            g_i = _flat_grad(model, theta, X[i], Y[i])
            for x in range(2):
                expected[x, i] += eta * float(g_test[x] @ g_i)
    assert torch.allclose(scores, expected, rtol=0, atol=SUM_ORDER_TOLERANCE)
    with pytest.raises(ExplaindError, match="checkpoint 9"):
        at.tracin_checkpoint_scores(model, trajectory, blob_loss, (X, Y), X_test, Y_test, [9])


# ---------------------------------------------------------------------------------------------- TRAK-style
def test_trak_kernel_is_the_ridge_inverse():
    g = torch.Generator().manual_seed(0)
    phi = torch.randn(7, 3, generator=g, dtype=torch.float64)
    ridge = 0.2
    lam = ridge * float((phi**2).sum()) / 3  # tr(ΦᵀΦ) = ‖Φ‖_F²
    expected = np.linalg.inv(phi.numpy().T @ phi.numpy() + lam * np.eye(3))
    assert np.allclose(at.trak_kernel(phi, ridge).numpy(), expected, rtol=1e-12, atol=0)


def test_trak_style_reduces_to_the_ridge_hat_matrix_of_a_linear_model():
    """For logits f(x) = W x and the identity projection, the TRAK-style score is the closed form
    τ = φ_test (ΦᵀΦ + λI)⁻¹ Φᵀ diag(1 − p), with φ_test(x) = vec(e_o xᵀ) and the margin gradient
    Φ[i] = vec((e_y − softmax_{≠y}(W x_i)) x_iᵀ), written out here without autograd."""
    g = torch.Generator().manual_seed(1)
    M, d, O, T = 9, 3, 3, 4
    X = torch.randn(M, d, generator=g, dtype=torch.float64)
    Y = torch.arange(M) % O
    X_test = torch.randn(T, d, generator=g, dtype=torch.float64)
    Y_test = torch.tensor([0, 1, 2, 1])
    model = nn.Linear(d, O, bias=False).double()
    W = torch.randn(O, d, generator=g, dtype=torch.float64)
    D = O * d
    ridge = 0.05
    scores = at.trak_style_scores(model, [{"weight": W}], (X, Y), X_test, Y_test, ridge=ridge,
                                  projections=[torch.eye(D, dtype=torch.float64)])

    logits = X @ W.T
    rows = []
    for i in range(M):
        others = logits[i].clone()
        others[Y[i]] = -math.inf
        q = torch.softmax(others, dim=0)  # softmax over the classes other than y, 0 at y
        rows.append(torch.outer(F.one_hot(Y[i], O).double() - q, X[i]).reshape(-1))
    Phi = torch.stack(rows).numpy()
    phi_test = torch.stack([torch.outer(F.one_hot(Y_test[x], O).double(), X_test[x]).reshape(-1)
                            for x in range(T)]).numpy()
    p_true = torch.softmax(logits, dim=1)[torch.arange(M), Y].numpy()
    gram = Phi.T @ Phi
    lam = ridge * np.trace(gram) / D
    expected = phi_test @ np.linalg.solve(gram + lam * np.eye(D), Phi.T) * (1.0 - p_true)
    assert np.allclose(scores.numpy(), expected, rtol=1e-10, atol=1e-13)


def test_trak_style_ensemble_is_the_mean_kernel_times_the_mean_q():
    model, trajectory, (X, Y), X_test = recorded_blob_run(seed=5, num_test=2, steps=3)
    Y_test = torch.tensor([0, 1])
    a, b = trajectory.parameters[-1], trajectory.parameters[1]
    P = [torch.randn(51, 8, generator=torch.Generator().manual_seed(s), dtype=torch.float64) for s in (0, 1)]
    both = at.trak_style_scores(model, [a, b], (X, Y), X_test, Y_test, projections=P)
    parts = []
    for theta, proj in ((a, P[0]), (b, P[1])):
        ones_q = at.trak_style_scores(model, [theta], (X, Y), X_test, Y_test, projections=[proj])
        with torch.no_grad():
            p = torch.softmax(torch.func.functional_call(model, theta, (X,)), 1)[torch.arange(X.shape[0]), Y]
        parts.append((ones_q / (1 - p), 1 - p))  # kernel part and Q part of one model
    expected = (parts[0][0] + parts[1][0]) / 2 * (parts[0][1] + parts[1][1]) / 2
    assert torch.allclose(both, expected, rtol=1e-10, atol=1e-14)


# ---------------------------------------------------------------------------------------------- the LDS
def test_spearman_matches_scipy_and_handles_ties_and_constants():
    from scipy.stats import spearmanr

    g = np.random.default_rng(0)
    a, b = g.normal(size=(5, 9)), g.normal(size=(5, 9))
    a[0, :3] = a[0, 3]  # ties
    rho = at.spearman_per_row(a, b)
    for r in range(5):
        assert rho[r] == pytest.approx(spearmanr(a[r], b[r]).statistic, abs=1e-12)
    constant = at.spearman_per_row(np.ones((1, 4)), np.arange(4.0)[None])
    assert np.isnan(constant[0])


def test_lds_is_one_for_the_exact_linear_datamodel_and_minus_one_for_its_negation():
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(4, 30, generator=g, dtype=torch.float64)
    subsets = at.random_subsets(30, 0.5, 12, g)
    outputs = 3.0 + subsets.double() @ scores.T  # f_o(x; θ_S) exactly linear in the subset
    exact = at.linear_datamodeling_score(scores, subsets, outputs, resamples=50)
    assert exact.value == pytest.approx(1.0, abs=1e-12)
    assert exact.standard_error == pytest.approx(0.0, abs=1e-12)  # every resample is exactly linear too
    assert at.linear_datamodeling_score(-scores, subsets, outputs).value == pytest.approx(-1.0, abs=1e-12)
    result = at.linear_datamodeling_score(scores, subsets, torch.randn(12, 4, generator=g, dtype=torch.float64),
                                          resamples=50)
    assert -1.0 <= result.value <= 1.0 and result.per_test.shape == (4,)
    assert 0.0 < result.standard_error < 1.0
    assert math.isnan(at.linear_datamodeling_score(scores, subsets, outputs).standard_error)  # none asked for


def test_lds_refuses_bad_shapes():
    scores = torch.zeros(2, 5, dtype=torch.float64)
    masks = torch.ones(4, 5, dtype=torch.bool)
    with pytest.raises(ExplaindError, match="boolean"):
        at.linear_datamodeling_score(scores, masks.double(), torch.zeros(4, 2))
    with pytest.raises(ExplaindError, match=r"shape \(subsets, test\)"):
        at.linear_datamodeling_score(scores, masks, torch.zeros(2, 4))
    with pytest.raises(ExplaindError, match="at least 3 subsets"):
        at.linear_datamodeling_score(scores, masks[:2], torch.zeros(2, 2))
    with pytest.raises(ExplaindError, match="fraction"):
        at.random_subsets(5, 1.0, 2, torch.Generator())
    with pytest.raises(ExplaindError, match="sample 7"):
        at.leave_one_out_subsets(5, [7])


# ---------------------------------------------------------------------------------------------- retraining
def test_counterfactual_schedules():
    model, trajectory, (X, Y), _ = recorded_blob_run(seed=6, num_test=1, steps=6)
    recorded = at.recorded_schedule(trajectory)
    everyone = torch.ones(X.shape[0], dtype=torch.bool)
    for protocol in ("restricted", "zero-weight"):
        same = at.counterfactual_schedule(recorded, everyone, protocol)
        assert [s.ids.tolist() for s in same] == [s.ids.tolist() for s in recorded]
        assert all(s.scale == 1.0 for s in same)
    # replaying the recorded schedule from θ_0 reproduces θ_N: the retraining loop is the recorded loop
    replay = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    replay.load_state_dict(trajectory.parameters[0])
    at.train_on_schedule(replay, lambda m: torch.optim.AdamW(m.parameters(), lr=3e-2, weight_decay=0.1),
                         blob_loss, (X, Y), recorded)
    for n, p in replay.named_parameters():
        assert torch.allclose(p.detach(), trajectory.parameters[-1][n], rtol=0, atol=1e-14)

    first = recorded[0].ids
    keep = everyone.clone()
    keep[first] = False  # the whole first batch removed
    keep[recorded[1].ids[0]] = False
    restricted = at.counterfactual_schedule(recorded, keep, "restricted")
    zero = at.counterfactual_schedule(recorded, keep, "zero-weight")
    nonempty = [s for s in recorded if bool(keep[s.ids].any())]
    assert len(restricted) == len(nonempty) < len(recorded) and len(zero) == len(recorded)
    for step, r in zip(nonempty, restricted):  # B_t ∩ S, mean over the kept samples
        assert r.ids.tolist() == step.ids[keep[step.ids]].tolist() and r.scale == 1.0
    for step, z in zip(recorded, zero):  # Σ_{j ∈ B_t ∩ S} ℓ_j / |B_t|; an emptied step keeps a zero loss
        kept = int(keep[step.ids].sum())
        assert z.scale == pytest.approx(kept / step.ids.numel(), rel=1e-15)
        if kept:
            assert z.ids.tolist() == step.ids[keep[step.ids]].tolist()
    assert zero[0].scale == 0.0
    shuffled = at.counterfactual_schedule(recorded, keep, "reshuffled", generator=torch.Generator().manual_seed(0))
    assert len(shuffled) == round(len(recorded) * int(keep.sum()) / keep.numel())
    assert all(bool(keep[s.ids].all()) for s in shuffled)
    with pytest.raises(ExplaindError, match="unknown retraining protocol"):
        at.counterfactual_schedule(recorded, keep, "bootstrap")


def test_recorded_schedule_refuses_a_run_that_is_not_mean_reduced():
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(6, 4, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    model = nn.Sequential(nn.Linear(4, 3)).double()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    recorder = em.TrajectoryRecorder(model, optimizer)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    optimizer.zero_grad()
    (weights * F.cross_entropy(model(X[:3]), Y[:3], reduction="none")).sum().backward()
    recorder.record_batch(torch.arange(3), weights=weights)
    optimizer.step()
    recorder.close()
    with pytest.raises(ExplaindError, match="not a mean-reduced batch loss"):
        at.recorded_schedule(recorder.trajectory())


# ---------------------------------------------------------------------------------------------- ExPLAIND
def test_explaind_scores_are_the_decompositions_kernel_influence():
    from explaind_math.experiments import digits

    data = digits.load_digits_data(num_train=40, num_test=5, seed=2)
    model, trajectory, data = digits.train_digits(digits.make_model(digits.SmallCNN, seed=2, channels=(2, 4), hidden=8),
                                                  data, steps=4, batch_size=16, seed=2)
    options = dict(quadrature=em.gauss_legendre(8), dtype=torch.float64)
    scores, influence = at.explaind_data_scores(model, trajectory, digits.digits_loss, data.train, data.test_x,
                                                data.test_y, **options)
    full, full_influence = at.explaind_data_scores(model, trajectory, digits.digits_loss, data.train, data.test_x,
                                                   data.test_y, true_class_only=False, **options)
    assert full_influence.kernel_axes == ("test", "unit", "output")
    # score(x, i) = Σ_{t,j} I[t, j, x, i, o]: summed over units it is the kernel total of the true class
    rows = torch.arange(5)
    kernel_total = full_influence.kernel_sum(("test", "output"))[rows, data.test_y]
    assert torch.allclose(scores.sum(dim=1), kernel_total, rtol=0, atol=SUM_ORDER_TOLERANCE)
    # h(f) = f_o (Corollary 3.3 i) gives the o-th output's I exactly
    assert torch.allclose(scores, full, rtol=0, atol=SUM_ORDER_TOLERANCE)
    assert influence.relative_residual < SMOOTH_TOLERANCE and full_influence.relative_residual < SMOOTH_TOLERANCE
    unused = sorted(set(range(40)) - set(trajectory.sample_ids()))
    assert (scores[:, unused] == 0).all()


# ---------------------------------------------------------------------------------------------- the example
@pytest.fixture(scope="module")
def quick_table():
    return _load_example().main(["--quick"])


def test_example_quick_table(quick_table):
    table = quick_table
    assert list(table["lds"]) == ["restricted", "reshuffled"]
    assert table["columns"] == ["α=0.25", "α=0.5", "α=0.75", "leave-one-out"]
    for protocol, rows in table["lds"].items():
        methods = [row["method"] for row in rows]
        assert methods[0] == "ExPLAIND" and methods == list(table["score seconds"])
        assert any(m.startswith("TracIn (") for m in methods) and any(m.startswith("TracInCP") for m in methods)
        assert "TRAK-style (1 model)" in methods
        for row in rows:
            for column in table["columns"]:
                assert -1.0 <= row[column] <= 1.0, (protocol, row["method"], column, row[column])
                assert 0.0 <= row["standard errors"][column] < 1.0
        assert all(s > 0 for s in table["retraining seconds"][protocol].values())
    assert all(s > 0 for s in table["score seconds"].values())
    certificate = table["certificate"]
    assert certificate["relative residual"] < SMOOTH_TOLERANCE
    assert certificate["scores sum to the kernel total (max error)"] < SUM_ORDER_TOLERANCE
    assert certificate["replayed schedule reproduces θ_N (max error)"] < SUM_ORDER_TOLERANCE


def test_example_formats_its_table(quick_table):
    text = _load_example().format_table(quick_table)
    assert "LDS α=0.25" in text and "LOO" in text and "ExPLAIND certificate" in text
