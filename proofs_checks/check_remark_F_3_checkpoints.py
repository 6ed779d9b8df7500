"""Remark F.3 (checkpoints only), machine-checked with sympy (MATH.md §8).

From a checkpoint (θ, m_{t−1}, v, k) one AdamW step on a batch B with weights w_i splits into

    batch units          −η (1−β1) P w_i g_i                       (i ∈ B)
    first-moment unit    −η β1 P m_{t−1}                           (the stored exp_avg: ``carried_state``)
    decay unit           −η λ θ                                    (decoupled) or through m (coupled L2)

with P = 1 / ((1−β1^k)(sqrt(v)/sqrt(1−β2^k) + ε)). Proved here, symbolically in every quantity and for a
symbolic integer step count k, by driving the library's template (``AdamWRule().coefficients``,
``buffer_step``, ``unit_update``) exactly as the driver does for the carried-state pseudo-unit, and
comparing with PyTorch's AdamW step transcribed from ``torch.optim.adam._single_tensor_adam``:

* each unit has the closed form above;
* Σ units = θ_{t+1} − θ_t of PyTorch's step (decoupled and coupled decay, maximize);
* the persistence estimate: with P and Φ held constant, a batch's total effect through the first moment
  over H steps is Σ_{j<H} β1^j = (1−β1^H)/(1−β1) times its effect at the checkpoint's step (H = 1..8);
  with P varying over those steps the factor is NOT exact (a counterexample), which is why
  ``decompose_from_checkpoints(persistence_steps=…)`` labels its result an estimate.
"""

from __future__ import annotations

import sympy as sp

from explaind_math.optimizers.adamw import AdamWRule
from explaind_math.optimizers.template import buffer_step, decay_direct_update, decay_gradient, unit_update

BATCH = (0, 1, 2)

eta, lam, b1, b2, eps, theta, m_prev = sp.symbols("eta lambda beta1 beta2 epsilon theta m_prev")
v = sp.Symbol("v", positive=True)
k = sp.Symbol("k", integer=True, positive=True)
g = {i: sp.Symbol(f"g_{i}") for i in BATCH}
w = {i: sp.Symbol(f"w_{i}") for i in BATCH}

P = 1 / ((1 - b1**k) * (sp.sqrt(v) / sp.sqrt(1 - b2**k) + eps))


def is_zero(expr) -> bool:
    expr = sp.cancel(sp.together(sp.expand(expr)))
    return expr == 0 or sp.simplify(expr) == 0


def hyper(*, maximize=False, decoupled=True) -> dict:
    return {"lr": eta, "beta1": b1, "beta2": b2, "eps": eps, "weight_decay": lam, "amsgrad": False,
            "maximize": maximize, "decoupled_weight_decay": decoupled}


def library_units(h) -> dict:
    """One step from the checkpoint, unit by unit, as the driver runs it: sample buffers start at 0,
    the carried-state buffer starts at the stored m_{t−1} and receives no gradient."""
    c = AdamWRule().coefficients(h, {"step": k, "exp_avg_sq": v}, first_update=False)
    units = {}
    for i in BATCH:
        grad = c.gradient_sign * w[i] * g[i]
        units[i] = unit_update(buffer_step(0, grad, c), grad, c)
    units["carried_state"] = unit_update(buffer_step(m_prev, 0, c), 0, c)
    gd = decay_gradient(theta, c)
    units["decay"] = unit_update(buffer_step(0, gd, c), gd, c) + decay_direct_update(theta, c)
    return units


def torch_adamw_step(h) -> sp.Expr:
    """θ_{t+1} − θ_t of torch.optim.adam._single_tensor_adam from the checkpoint state (m_{t−1}, v, k)."""
    grad = sum(w[i] * g[i] for i in BATCH)
    if h["maximize"]:
        grad = -grad
    new_theta = theta
    if h["decoupled_weight_decay"]:
        new_theta = theta * (1 - eta * lam)
    else:
        grad = grad + lam * theta
    m = m_prev + (grad - m_prev) * (1 - b1)
    denom = sp.sqrt(v) / sp.sqrt(1 - b2**k) + eps
    return new_theta - eta / (1 - b1**k) * m / denom - theta


def test_units_have_the_closed_form_of_remark_F_3():
    units = library_units(hyper())
    for i in BATCH:
        assert is_zero(units[i] - (-eta * (1 - b1) * P * w[i] * g[i])), i
    assert is_zero(units["carried_state"] - (-eta * b1 * P * m_prev))
    assert is_zero(units["decay"] - (-eta * lam * theta))


def test_units_sum_to_the_simulated_pytorch_step():
    for maximize in (False, True):
        for decoupled in (True, False):
            h = hyper(maximize=maximize, decoupled=decoupled)
            total = sum(library_units(h).values())
            assert is_zero(total - torch_adamw_step(h)), (maximize, decoupled)


def test_coupled_decay_enters_through_the_first_moment():
    """Adam's L2 decay (decoupled_weight_decay=False): the decay unit is −η (1−β1) P λ θ."""
    units = library_units(hyper(decoupled=False))
    assert is_zero(units["decay"] - (-eta * (1 - b1) * P * lam * theta))


def test_persistence_factor_is_the_geometric_sum_when_P_is_constant():
    """A batch entering m at the checkpoint's step contributes (1−β1) β1^j P g at step +j; over H steps
    with P fixed that is Σ_{j<H} β1^j = (1−β1^H)/(1−β1) times its first-step contribution."""
    beta, Pc, gi = sp.symbols("beta P g")
    for H in range(1, 9):
        buffer, total = sp.Integer(0), sp.Integer(0)
        for j in range(H):
            buffer = beta * buffer + ((1 - beta) * gi if j == 0 else 0)
            total += -Pc * buffer
        first = -Pc * (1 - beta) * gi
        assert is_zero(total - first * (1 - beta**H) / (1 - beta)), H


def test_persistence_factor_is_not_exact_when_P_varies():
    """With the preconditioner changing over the skipped steps the geometric factor misses: an estimate."""
    beta, gi = sp.symbols("beta g")
    Ps = sp.symbols("P_0 P_1")
    total = -Ps[0] * (1 - beta) * gi - Ps[1] * beta * (1 - beta) * gi
    estimate = -Ps[0] * (1 - beta) * gi * (1 + beta)
    assert not is_zero(total - estimate)
    assert is_zero((total - estimate).subs(Ps[1], Ps[0]))
