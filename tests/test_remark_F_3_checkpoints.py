"""Remark F.3: decompose one AdamW update simulated from a checkpoint (MATH.md §8).

From a checkpoint (θ, m, v, k, hyperparameters) one real ``torch.optim.AdamW`` step on a batch splits
exactly into the batch's units −η(1−β1) P g_{t,i}, a first-moment unit −η β1 P m_{t−1} (the stored
exp_avg: ``carried_state``) and the decay unit −ηλθ. Tested here, on checkpoints taken with
``checkpoint_from_optimizer`` in the middle of real AdamW runs (several parameter groups, amsgrad per
group, a LambdaLR schedule):

* the simulated step equals the real AdamW step that training took from that checkpoint (outputs of
  the live model before and after it), and its decomposition is exact (|residual| ≤ 1e-9·(1+|change|));
* the first-moment unit is present, nonzero when exp_avg ≠ 0 (and β1 > 0), exactly zero when exp_avg = 0;
* on a model linear in θ (f = W x + b, so Φ is exact and known), every unit equals its closed form:
  batch units, first-moment unit and decay unit, computed from the AdamW formulas by hand;
* ``persistence_steps`` scales the kernel by Σ_{j<H} β1^j and labels the result estimated, with a note;
* a checkpoint missing exp_avg, exp_avg_sq, step, hyperparameters, parameters (or max_exp_avg_sq under
  amsgrad) raises TrajectoryMismatchError naming the field.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import explaind_math as em
from explaind_math.testing import strategies as es
from explaind_math.testing.residuals import RESIDUALS, assert_exact, report_residual

RTOL = 1e-9
LIVE_RTOL = 1e-12
FORMULA_RTOL = 1e-12
THEOREM = "Remark F.3"
DT = torch.float64

SETTINGS = es.property_settings()  # the profile, plus the device fixture shared across examples


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / (1 + b.abs())).max())


# ---------------------------------------------------------------------------------------------------
# a real AdamW run, checkpointed in the middle
# ---------------------------------------------------------------------------------------------------
@st.composite
def checkpointed_runs(draw):
    model = draw(es.models(families=es.SMOOTH_FAMILIES, losses=("cross_entropy", "nll", "mse")))
    n_groups = draw(st.integers(1, 2))
    groups = [
        {
            "lr_factor": draw(st.sampled_from((1.0, 0.5))),
            "weight_decay": draw(st.one_of(st.just(0.0), st.floats(1e-3, 0.3))),
            "amsgrad": draw(st.booleans()),
        }
        for _ in range(n_groups)
    ]
    options = {
        "lr": draw(st.floats(1e-3, 0.1)),
        "betas": (draw(st.one_of(st.just(0.0), st.floats(0.5, 0.95))), draw(st.floats(0.9, 0.999))),
        "eps": draw(st.sampled_from((1e-8, 1e-6, 1e-3))),
    }
    steps = draw(st.integers(2, 5))
    checkpoint_steps = sorted(draw(st.sets(st.integers(0, steps - 1), min_size=1, max_size=3)))
    return dict(model=model, groups=groups, options=options, steps=steps, checkpoint_steps=checkpoint_steps,
                gamma=draw(st.sampled_from((1.0, 0.7))), batch=draw(st.integers(2, 6)), seed=draw(es.seeds()))


def train_with_checkpoints(cfg: dict, device):
    """Train with torch.optim.AdamW; before each step in cfg["checkpoint_steps"], snapshot the optimizer
    (checkpoint_from_optimizer) and remember the batch and the live outputs before and after that step."""
    spec: es.ModelSpec = cfg["model"]
    model = spec.build(seed=cfg["seed"], device=device)
    X, Y, X_test = es.make_data(spec, 16, 3, cfg["seed"])
    X, Y, X_test = X.to(device), Y.to(device), X_test.to(device)
    params = list(model.parameters())
    groups = [{"params": params[k::len(cfg["groups"])], "lr": cfg["options"]["lr"] * g["lr_factor"],
               "weight_decay": g["weight_decay"], "amsgrad": g["amsgrad"]}
              for k, g in enumerate(cfg["groups"]) if params[k::len(cfg["groups"])]]
    opt = torch.optim.AdamW(groups, betas=cfg["options"]["betas"], eps=cfg["options"]["eps"])
    gamma = cfg["gamma"]
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: gamma**t)
    loss = spec.loss_spec
    g = torch.Generator().manual_seed(cfg["seed"])
    taken = []
    for t in range(cfg["steps"]):
        ids = torch.randperm(16, generator=g)[: cfg["batch"]].tolist()
        entry = None
        if t in cfg["checkpoint_steps"]:
            entry = {"step": t, "ids": ids, "checkpoint": em.checkpoint_from_optimizer(model, opt),
                     "f_before": es.model_outputs(model, X_test),
                     "exp_avg_zero": all(float(opt.state.get(p, {}).get("exp_avg", torch.zeros(1)).abs().max()) == 0
                                         for p in params)}
        opt.zero_grad(set_to_none=True)
        loss.batched(model(X[ids]), Y[ids]).mean().backward()
        opt.step()
        scheduler.step()
        if entry is not None:
            entry["f_after"] = es.model_outputs(model, X_test)
            taken.append(entry)
    return model, (X, Y), X_test, loss.per_sample, taken


@SETTINGS
@given(cfg=checkpointed_runs(), H=st.integers(1, 6))
def test_checkpoint_update_is_exact_and_equals_the_real_step(cfg, H, device):
    model, train_data, X_test, loss_fn, taken = train_with_checkpoints(cfg, device)
    checkpoints = [e["checkpoint"] for e in taken]
    batches = [e["ids"] for e in taken]
    results = em.decompose_from_checkpoints(model, checkpoints, batches, loss_fn, train_data, X_test)
    assert len(results) == len(taken)
    beta1 = cfg["options"]["betas"][0]
    for entry, result in zip(taken, results):
        # the simulated step is the real step training took from that checkpoint
        assert rel_diff(result.f_initial, entry["f_before"]) <= LIVE_RTOL
        assert rel_diff(result.f_final, entry["f_after"]) <= LIVE_RTOL, (
            f"step {entry['step']}: the simulated AdamW step differs from the real one")
        assert "Remark F.3" in result.theorem
        assert not result.estimated and not result.notes
        assert result.units == sorted(set(entry["ids"]))  # the unit axis: the batch's ids, sorted
        rel = assert_exact(result, RTOL, what=f"checkpoint at step {entry['step']}")
        report_residual(THEOREM, cfg["model"].family, rel)
        # the first-moment unit
        assert result.carried_state is not None, "the first-moment unit is missing"
        carried = float(result.carried_state.abs().max())
        if entry["exp_avg_zero"] or beta1 == 0.0:
            assert carried == 0.0
        else:
            assert carried > 0.0, "exp_avg ≠ 0 but the first-moment unit has no influence"

    # persistence through the first moment: an estimate, labelled so
    estimates = em.decompose_from_checkpoints(model, checkpoints, batches, loss_fn, train_data, X_test,
                                              persistence_steps=[H] * len(taken))
    factor = sum(beta1**j for j in range(H))
    for exact, estimate in zip(results, estimates):
        assert estimate.estimated is True
        assert estimate.notes and any("estimate" in n.lower() or "persistence" in n.lower() for n in estimate.notes)
        scale = 1 + float(exact.kernel.abs().max()) * factor
        assert float((estimate.kernel - factor * exact.kernel).abs().max()) <= 1e-12 * scale
        assert torch.equal(estimate.regularization, exact.regularization)
        assert torch.equal(estimate.carried_state, exact.carried_state)
        assert "ESTIMATED" in estimate.summary()


# ---------------------------------------------------------------------------------------------------
# the split in closed form on a model linear in θ
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("amsgrad", [False, True])
def test_units_equal_their_closed_form_on_a_linear_model(amsgrad, device):
    torch.manual_seed(0)
    d_in, d_out, M = 3, 2, 10
    X = torch.randn(M, d_in, dtype=DT, device=device)
    Y = torch.randn(M, d_out, dtype=DT, device=device)
    X_test = torch.randn(4, d_in, dtype=DT, device=device)
    model = nn.Linear(d_in, d_out).to(device=device, dtype=DT)
    lr, (b1, b2), eps, wd = 0.05, (0.8, 0.95), 1e-6, 0.1
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(b1, b2), eps=eps, weight_decay=wd, amsgrad=amsgrad)
    loss_fn = lambda out, y: 0.5 * ((out - y) ** 2).sum()  # noqa: E731
    for t in range(3):
        ids = list(range(3 * t, 3 * t + 3))
        opt.zero_grad()
        torch.stack([loss_fn(model(X[i]), Y[i]) for i in ids]).mean().backward()
        opt.step()
    ckpt = em.checkpoint_from_optimizer(model, opt)
    batch = [7, 1, 4, 9]
    [result] = em.decompose_from_checkpoints(model, [ckpt], [batch], loss_fn, (X, Y), X_test)

    # by hand: weights 1/|B|, g_i = w ∇ℓ_i; for f = W x + b,
    # ∇_W ℓ_i = (f_i − y_i) x_iᵀ and ∇_b ℓ_i = f_i − y_i
    w = 1.0 / len(batch)
    W, b = ckpt["parameters"]["weight"].to(device), ckpt["parameters"]["bias"].to(device)
    residual = {i: X[i] @ W.T + b - Y[i] for i in batch}
    grads = {i: {"weight": w * torch.outer(residual[i], X[i]), "bias": w * residual[i]} for i in batch}
    k = ckpt["step"]["weight"] + 1
    units, carried, decay = {i: {} for i in batch}, {}, {}
    for n in ("weight", "bias"):
        g = sum(grads[i][n] for i in batch)
        v = b2 * ckpt["exp_avg_sq"][n].to(device) + (1 - b2) * g * g
        if amsgrad:
            v = torch.maximum(ckpt["max_exp_avg_sq"][n].to(device), v)
        P = 1.0 / ((1 - b1**k) * (torch.sqrt(v / (1 - b2**k)) + eps))
        carried[n] = -lr * b1 * P * ckpt["exp_avg"][n].to(device)
        decay[n] = -lr * wd * ckpt["parameters"][n].to(device)
        for i in batch:
            units[i][n] = -lr * (1 - b1) * P * grads[i][n]

    def through_f(update: dict) -> torch.Tensor:  # Φ(x) update = update_W x + update_b, per test input
        return X_test @ update["weight"].T + update["bias"]

    assert sorted(result.units) == sorted(batch)
    expected_kernel = torch.stack([through_f(units[i]) for i in result.units], dim=1)  # (test, unit, output)
    got_kernel = result.kernel_sum(("test", "unit", "output"))
    assert rel_diff(got_kernel, expected_kernel) <= FORMULA_RTOL
    assert rel_diff(result.carried_state_sum(), through_f(carried)) <= FORMULA_RTOL
    assert rel_diff(result.regularization_sum(), through_f(decay)) <= FORMULA_RTOL
    assert float(result.carried_state.abs().max()) > 0
    # per parameter tensor too (the bias part of the first-moment unit is X-independent)
    p = result.regularization_axes.index("param")
    j = result.param_labels.index("bias")
    assert rel_diff(result.carried_state.select(p, j).sum(0), carried["bias"].expand(4, -1)) <= FORMULA_RTOL
    report_residual(THEOREM, "linear, closed form", rel_diff(got_kernel, expected_kernel), "unit vs closed form",
                    steer=False)


# ---------------------------------------------------------------------------------------------------
# checkpoints without the fields they need
# ---------------------------------------------------------------------------------------------------
def _small_checkpoint(device, amsgrad: bool):
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(device=device, dtype=DT)
    X = torch.randn(8, 3, dtype=DT, device=device)
    Y = torch.randint(0, 2, (8,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.02, amsgrad=amsgrad)
    opt.zero_grad()
    F.cross_entropy(model(X[:4]), Y[:4]).backward()
    opt.step()
    return model, (X, Y), X[:2], em.checkpoint_from_optimizer(model, opt)


def _loss(out, y):
    return F.cross_entropy(out, y)


@pytest.mark.parametrize("field", ["exp_avg", "exp_avg_sq", "step", "hyperparameters", "parameters",
                                   "max_exp_avg_sq"])
def test_checkpoint_missing_a_field_is_refused_naming_it(field, device):
    amsgrad = field == "max_exp_avg_sq"
    model, data, X_test, ckpt = _small_checkpoint(device, amsgrad)
    # the complete checkpoint goes through
    [ok] = em.decompose_from_checkpoints(model, [ckpt], [[4, 5]], _loss, data, X_test)
    assert ok.relative_residual <= RTOL
    broken = copy.deepcopy(ckpt)
    del broken[field]
    with pytest.raises(em.TrajectoryMismatchError, match=field):
        em.decompose_from_checkpoints(model, [broken], [[4, 5]], _loss, data, X_test)


@pytest.mark.parametrize("field", ["exp_avg", "exp_avg_sq", "max_exp_avg_sq"])
def test_checkpoint_missing_one_parameter_entry_is_refused(field, device):
    model, data, X_test, ckpt = _small_checkpoint(device, amsgrad=field == "max_exp_avg_sq")
    broken = copy.deepcopy(ckpt)
    del broken[field]["2.weight"]
    with pytest.raises(em.TrajectoryMismatchError, match=rf"{field}.*2\.weight"):
        em.decompose_from_checkpoints(model, [broken], [[4, 5]], _loss, data, X_test)


def test_checkpoint_of_fresh_amsgrad_optimizer_is_usable(device):
    """checkpoint_from_optimizer before the first step of an amsgrad AdamW (no state yet) gives a
    complete checkpoint whose simulated step is the real first step."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).to(device=device, dtype=DT)
    X = torch.randn(8, 3, dtype=DT, device=device)
    Y = torch.randint(0, 2, (8,), device=device)
    opt = torch.optim.AdamW([{"params": model[0].parameters(), "amsgrad": True},
                             {"params": model[2].parameters(), "amsgrad": False}], lr=0.05)
    ckpt = em.checkpoint_from_optimizer(model, opt)
    before = es.model_outputs(model, X[:3])
    opt.zero_grad()
    F.cross_entropy(model(X[[1, 2, 6]]), Y[[1, 2, 6]]).backward()
    opt.step()
    [result] = em.decompose_from_checkpoints(model, [ckpt], [[1, 2, 6]], _loss, (X, Y), X[:3])
    assert rel_diff(result.f_initial, before) <= LIVE_RTOL
    assert rel_diff(result.f_final, es.model_outputs(model, X[:3])) <= LIVE_RTOL
    assert result.relative_residual <= RTOL
    assert float(result.carried_state.abs().max()) == 0.0  # exp_avg = 0 before the first step
