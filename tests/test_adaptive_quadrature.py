"""hp-adaptive Gauss–Legendre (MATH.md §1, issue 7): per step, the number of nodes is raised until the exact
step residual r_t = f(θ_{t+1}) − f(θ_t) − Φ_t Δθ_t is below the caller's tolerance, and a segment where
the highest order does not reach it (a ReLU kink) is bisected. The nodes are chosen by JVP probes along
Δθ_t; the contraction then runs once, on the chosen nodes.

Properties:
* smooth runs: every step's certified residual max_{x,o} |r_t(x)_o| ≤ tol (the acceptance test is the
  residual itself, so this is what the rule promises), whatever the kept axes and contraction path;
  ``nodes_per_step`` is recorded and each entry is one of the tried orders; the reconstruction agrees with
  a 16-node Gauss–Legendre decomposition to within N · tol + rounding;
* a step of length zero along the path (θ_{t+1} = θ_t for every trained tensor) is accepted at the lowest
  order (its residual is exactly 0);
* ReLU runs: the bisection makes the per-step residual ≤ tol + Σ_kinks O(|jump| 2^-max_depth) (see
  tests/test_relu_models.py), i.e. relative ≤ RELU_RTOL.
"""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import explaind_math as em
from explaind_math.testing import strategies as es
from explaind_math.testing.residuals import REPLAY_RTOL, SMOOTH_RTOL, check_certificate, report_residual

VERIFIES = "quadrature"

ORDERS = (1, 2, 4, 8, 16)
RELU_RTOL = 1e-9  # tests/test_relu_models.py: tol 1e-10, max_depth 30


def smooth_runs():
    return es.training_runs(
        families=es.SMOOTH_FAMILIES,
        schedule_strategy=es.training_schedules(max_steps=4, max_samples=12),
        num_test=st.integers(2, 3),
    )


@es.property_settings()
@given(spec=smooth_runs(), tol=st.sampled_from([1e-8, 1e-11, 1e-13]),
       keep=st.sampled_from([("step",), ("step", "param", "unit"), ("unit",)]))
def test_every_step_meets_the_tolerance(spec, tol, keep, device):
    run = es.train_and_record(spec, device=device)
    result = es.decompose(run, quadrature=em.adaptive_gauss_legendre(tol, ORDERS), keep=keep, replay_rtol=REPLAY_RTOL)
    assert result.quadrature == f"adaptive_gauss_legendre({','.join(map(str, ORDERS))}, tol={tol:g})"
    steps = run.trajectory.num_steps
    assert len(result.nodes_per_step) == steps and len(result.probe_nodes_per_step) == steps
    scale = float(1 + torch.maximum(result.f_initial.abs().max(), result.f_final.abs().max()))
    noise = 64 * torch.finfo(torch.float64).eps * scale  # the rule's own floor: below it bisection is futile
    per_step = result.step_residuals.abs().amax(dim=(1, 2))
    for t in range(steps):
        # a step accepted without bisection used one of the orders; bisected steps use sums of them
        assert result.nodes_per_step[t] >= 1
        assert result.probe_nodes_per_step[t] >= result.nodes_per_step[t]
        # the final contraction reproduces the probe's prediction, so the certificate meets the tolerance
        # (up to the difference Σ_u update_t(u) − Δθ_t, the replay error, times |Φ_t|)
        assert float(per_step[t]) <= max(tol, noise) * 1.01 + 1e-12 * scale * REPLAY_RTOL, (
            f"step {t}: residual {float(per_step[t]):.2e} > tol {tol:.0e} with {result.nodes_per_step[t]} nodes")
    # per-step errors ≤ tol add up to ≤ N · tol (relative to 1 + |Δf| ≥ 1)
    check_certificate(run, result, max(SMOOTH_RTOL, steps * tol * 1.01), family=f"{run.family} (hp-adaptive)")
    fixed = es.decompose(run, quadrature=em.gauss_legendre(16), keep=keep, replay_rtol=REPLAY_RTOL)
    gap = float((result.reconstruction - fixed.reconstruction).abs().max())
    assert gap <= steps * max(tol, noise) + float(fixed.residual.abs().max()) + noise
    report_residual(result.theorem, run.family, float(per_step.max()) / max(tol, noise),
                    "hp-adaptive: max step residual / tol", steer=False)


def test_nodes_follow_the_difficulty_of_each_step():
    """A run whose first steps are long (large lr) and later ones short (lr decayed 1000×): the adaptive rule
    spends more nodes on the long steps; a fixed rule spends the same everywhere."""
    from explaind_math.testing.small_runs import blob_loss

    g = torch.Generator().manual_seed(0)
    X = torch.randn(16, 4, generator=g, dtype=torch.float64)
    Y = torch.randint(0, 3, (16,), generator=g)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.5)
    recorder = em.TrajectoryRecorder(model, optimizer)
    for t in range(6):
        if t == 3:
            for group in optimizer.param_groups:
                group["lr"] = 5e-4
        ids = torch.randperm(16, generator=g)[:8]
        optimizer.zero_grad()
        blob_loss(model(X[ids]), Y[ids]).backward()
        recorder.record_batch(ids)
        optimizer.step()
    recorder.close()
    X_test = torch.randn(3, 4, generator=g, dtype=torch.float64)
    result = em.decompose_sgd_momentum_training(model, recorder.trajectory(), blob_loss, (X, Y), X_test,
                                                quadrature=em.adaptive_gauss_legendre(1e-12), keep=("step",))
    assert float(result.step_residuals.abs().max()) <= 1e-12 * 1.01
    long_steps, short_steps = result.nodes_per_step[:3], result.nodes_per_step[4:]
    assert min(long_steps) > max(short_steps), result.nodes_per_step


_KINKED = es.RunSpec(
    model=es.ModelSpec(family="mlp-relu", input_shape=(3,), num_outputs=2, hidden=(5,), loss="cross_entropy",
                       activation="relu", bias=True, init_scale=2.0),
    optimizer=es.OptimizerSpec(kind="adamw", options=(("lr", 0.05), ("betas", (0.9, 0.99)), ("weight_decay", 0.01))),
    schedule=es.TrainingSchedule(num_samples=12, batch_sizes=(5, 5, 2)),
    seed=0, num_test=4)  # the kinked run of tests/test_relu_models.py


@pytest.mark.parametrize("orders", [(2, 4, 8), (1, 2, 4, 8, 16)])
def test_relu_kinks_are_bisected(orders, device):
    """On a run whose steps cross ReLU kinks, no order reaches the tolerance on the segment holding the kink:
    the rule bisects there and certifies the run to RELU_RTOL, with the kinked steps taking more nodes."""
    run = es.train_and_record(_KINKED, device=device)
    plain = es.decompose(run, quadrature=em.gauss_legendre(orders[-1]), keep=("step",), replay_rtol=REPLAY_RTOL)
    result = es.decompose(run, quadrature=em.adaptive_gauss_legendre(1e-10, orders), keep=("step", "param", "unit"),
                          replay_rtol=REPLAY_RTOL)
    check_certificate(run, result, RELU_RTOL, family="mlp-relu (hp-adaptive)")
    assert plain.relative_residual > 1e-6, "no kink was crossed: the negative control failed"
    plain_steps = plain.step_residuals.abs().amax(dim=(1, 2))
    for t, nodes in enumerate(result.nodes_per_step):
        if float(plain_steps[t]) > 1e-8:
            assert nodes > orders[-1], f"step {t}: plain residual {float(plain_steps[t]):.1e} but {nodes} nodes"


def test_below_the_rounding_floor_the_rule_converges_instead_of_accepting_noise():
    """float32, a tolerance far below its rounding floor: one node whose residual happens to be under the
    noise of f must not be accepted on its own (its quadrature error hides there, and N steps of it add up:
    here 1 node per step gave 3.9e-6 against the 2.8e-7 floor); the rule goes on until two orders agree at
    the floor, so the run ends at the floor of a fixed high-order rule."""
    import torch.nn.functional as F

    from explaind_math.experiments.modular_addition import ModularAdditionTransformer, modular_addition_data

    tokens, labels = modular_addition_data(11)
    order = torch.randperm(tokens.shape[0], generator=torch.Generator().manual_seed(0))
    X, Y, X_test = tokens[order[:32]], labels[order[:32]], tokens[order[32:36]]
    torch.manual_seed(0)
    model = ModularAdditionTransformer(11, 16, 2, 32)  # float32
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.98), weight_decay=1.0)
    recorder = em.TrajectoryRecorder(model, optimizer)
    g = torch.Generator().manual_seed(1)
    for _ in range(6):
        ids = torch.randperm(32, generator=g)[:8]
        optimizer.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        recorder.record_batch(ids)
        optimizer.step()
    recorder.close()
    loss = lambda out, y: F.cross_entropy(out, y)  # noqa: E731
    decompose = lambda quadrature: em.decompose_adamw_training(  # noqa: E731
        model, recorder.trajectory(), loss, (X, Y), X_test, quadrature=quadrature, keep=("step",))
    fixed = decompose(em.gauss_legendre(8))
    hp = decompose(em.adaptive_gauss_legendre(1e-12, orders=(1, 2, 4, 8)))
    assert all(n >= 2 for n in hp.nodes_per_step), hp.nodes_per_step
    assert hp.relative_residual <= 3 * fixed.relative_residual, (hp.relative_residual, fixed.relative_residual)


def test_probes_that_carry_every_direction_are_the_contraction():
    """On the JVP path with every kept direction in one batch, the adaptive rule probes with the directions
    themselves and keeps the accepted probes as the contraction; the result equals the Jacobian path on the
    same rule (same nodes, scores to 1e-12 of their L1 mass)."""
    from explaind_math.testing.small_runs import blob_loss, recorded_blob_run

    model, trajectory, data, X_test = recorded_blob_run(seed=7, num_test=3, steps=5)
    decompose = lambda contraction: em.decompose_adamw_training(  # noqa: E731
        model, trajectory, blob_loss, data, X_test, quadrature=em.adaptive_gauss_legendre(1e-12),
        keep=("step", "param"), contraction=contraction)
    fused, jacobian = decompose("jvp"), decompose("jacobian")
    assert fused.nodes_per_step == jacobian.nodes_per_step
    assert all(p >= n for p, n in zip(fused.probe_nodes_per_step, fused.nodes_per_step))
    scale = 1 + float(jacobian.kernel.abs().sum()) + float(jacobian.regularization.abs().sum())
    assert float((fused.kernel - jacobian.kernel).abs().max()) <= 1e-12 * scale
    assert float((fused.regularization - jacobian.regularization).abs().max()) <= 1e-12 * scale
    assert float(fused.step_residuals.abs().max()) <= 1e-12 * 1.01
