"""Corollary F.2 — partition accumulation (MATH.md §7), machine-checked with sympy.

For a partition {S_1..S_K} of the units, the library keeps one buffer per element S_k, advanced by
``buffer_step`` with the summed gradient grad_t(S_k) = Σ_{i∈S_k} grad_t(i). Proved, for 5 units with
symbolic per-sample gradients in batches that change per step, t = 0..6, and partitions into K = 1, 2
and 3 groups:

* buffer_t(S_k) = Σ_{i∈S_k} buffer_t(i) at every step (linearity of the recursion), and
  update_t(S_k) = Σ_{i∈S_k} update_t(i), so T_t(S_k) = Σ_{i∈S_k} T_t(i) and
  Σ_{i∈S_k} I[t,j,x,i,o] = −η_t Φ_t(x)[o,j] T_t(S_k)[j] for symbolic Φ;
* for the tables of AdamWRule (symbolic β1, η_t, v_t, k), SGDRule (symbolic μ, τ, η_t, first step,
  Nesterov with E ≠ 0, maximize) and for general linear maps A, C, D, E (symbolic 2×2 matrices acting
  on 2-coordinate gradients, as for a Shampoo-like preconditioner);
* K = 1: one buffer gives the whole step, Σ_k update_t(S_k) + update_t(decay) = θ_{t+1} − θ_t of PyTorch.
"""

from __future__ import annotations

import sympy as sp

from explaind_math.optimizers.adamw import AdamWRule
from explaind_math.optimizers.sgd import SGDRule
from explaind_math.optimizers.template import StepCoefficients, buffer_step, decay_gradient, unit_update

STEPS = 7
UNITS = (0, 1, 2, 3, 4)
BATCHES = ({0, 1, 2}, {3, 4}, {0, 2, 4}, {1}, {1, 2, 3}, {0, 1, 2, 3, 4}, {4, 0})
PARTITIONS = (
    ({0, 1, 2, 3, 4},),  # K = 1: parameter- and step-level attribution with one buffer
    ({0, 2, 4}, {1, 3}),  # K = 2
    ({0, 3}, {1}, {2, 4}),  # K = 3
)
G = {(t, i): sp.Symbol(f"g_{t}_{i}") for t in range(STEPS) for i in UNITS if i in BATCHES[t]}


def g(t, i):
    return G.get((t, i), sp.Integer(0))


def zero(expr) -> bool:
    return sp.expand(expr) == 0


def check_partition_linearity(tables, grad_of=g, zero_value=sp.Integer(0), equal=None):
    """Advance per-unit and per-group buffers with the same tables; compare at every step."""
    equal = equal or (lambda u, v: zero(u - v))
    for partition in PARTITIONS:
        unit_buf = {i: zero_value for i in UNITS}
        group_buf = [zero_value for _ in partition]
        for t, c in enumerate(tables):
            unit_upd = {}
            for i in UNITS:
                grad = c.gradient_sign * grad_of(t, i)
                unit_buf[i] = buffer_step(unit_buf[i], grad, c)
                unit_upd[i] = unit_update(unit_buf[i], grad, c)
            for k, S in enumerate(partition):
                grad_S = c.gradient_sign * sum((grad_of(t, i) for i in S), zero_value)
                group_buf[k] = buffer_step(group_buf[k], grad_S, c)
                upd_S = unit_update(group_buf[k], grad_S, c)
                assert equal(group_buf[k], sum((unit_buf[i] for i in S), zero_value)), (partition, t, k)
                assert equal(upd_S, sum((unit_upd[i] for i in S), zero_value)), (partition, t, k)
            # a wrong grouping (a unit counted in two groups) is detected
            if len(partition) > 1:
                assert not equal(group_buf[0], sum((unit_buf[i] for i in partition[0] | partition[1]), zero_value))


def test_partition_adamw_tables():
    """AdamW (symbolic β1, β2, ε, η_t, v_t, k = t+1): group buffers and updates are sums over the group."""
    b1, b2, eps = sp.symbols("beta1 beta2 epsilon")
    rule = AdamWRule()
    tables = []
    for t in range(STEPS):
        hyper = {"lr": sp.Symbol(f"eta_{t}"), "beta1": b1, "beta2": b2, "eps": eps, "weight_decay": sp.Symbol("lambda"),
                 "amsgrad": False, "maximize": False, "decoupled_weight_decay": True}
        tables.append(rule.coefficients(hyper, {"step": t + 1, "exp_avg_sq": sp.Symbol(f"v_{t}", positive=True)},
                                        first_update=(t == 0)))
    check_partition_linearity(tables)


def test_partition_sgd_tables():
    """SGD heavy ball (symbolic μ, τ; first step undamped), Nesterov (E = η ≠ 0) and maximize: group buffers and
    updates are sums over the group."""
    mu, tau = sp.symbols("mu tau")
    rule = SGDRule()
    for nesterov, maximize in ((False, False), (True, False), (False, True)):
        tables = [rule.coefficients({"lr": sp.Symbol(f"eta_{t}"), "momentum": mu, "dampening": 0 if nesterov else tau,
                                     "weight_decay": sp.Symbol("lambda"), "nesterov": nesterov, "maximize": maximize},
                                    {}, first_update=(t == 0)) for t in range(STEPS)]
        assert all(c.gradient_sign == (-1 if maximize else 1) for c in tables)
        check_partition_linearity(tables)


def test_partition_general_linear_maps():
    """A, C, D, E arbitrary linear maps (symbolic 2×2 matrices per step) on 2-coordinate gradients:
    buffer_t(S_k) = Σ_{i∈S_k} buffer_t(i) and update_t(S_k) = Σ_{i∈S_k} update_t(i)."""
    steps = 4
    tables = []
    for t in range(steps):
        mats = [sp.Matrix(2, 2, sp.symbols(f"{name}{t}_0:4")) for name in "ACDE"]
        tables.append(StepCoefficients(*(lambda v, M=M: M * v for M in mats)))

    def grad2(t, i):
        if i not in BATCHES[t]:
            return sp.zeros(2, 1)
        return sp.Matrix(sp.symbols(f"g{t}_{i}_0:2"))

    def equal(u, v):
        return (u - v).expand() == sp.zeros(2, 1)

    check_partition_linearity(tables, grad_of=grad2, zero_value=sp.zeros(2, 1), equal=equal)


def test_group_influence_is_the_sum_of_unit_influences():
    """Σ_{i∈S_k} I[t,j,x,i,o] = −η_t Φ_t(x)[o,j] T_t(S_k)[j] with T_t(S_k) from the group buffer (SGD, symbolic Φ),
    and with K = 1 the group update plus the decay unit equals PyTorch's step θ_{t+1} − θ_t."""
    mu, tau, lam = sp.symbols("mu tau lambda")
    rule = SGDRule()
    phi = [sp.Symbol(f"Phi_{t}") for t in range(STEPS)]
    thetas = [sp.Symbol(f"theta_{t}") for t in range(STEPS)]
    lrs = [sp.Symbol(f"eta_{t}") for t in range(STEPS)]
    partition = PARTITIONS[2]
    unit_buf = {i: 0 for i in UNITS}
    group_buf = [0] * len(partition)
    whole, decay_buf, torch_buf = 0, 0, None
    for t in range(STEPS):
        c = rule.coefficients({"lr": lrs[t], "momentum": mu, "dampening": tau, "weight_decay": lam,
                               "nesterov": False, "maximize": False}, {}, first_update=(t == 0))
        unit_I = {}
        for i in UNITS:
            unit_buf[i] = buffer_step(unit_buf[i], g(t, i), c)
            unit_I[i] = phi[t] * unit_update(unit_buf[i], g(t, i), c)
        for k, S in enumerate(partition):
            grad_S = sum(g(t, i) for i in S)
            group_buf[k] = buffer_step(group_buf[k], grad_S, c)
            T_S = group_buf[k]  # D = η: update_t(S) = −η_t T_t(S)
            assert zero(sum(unit_I[i] for i in S) - (-lrs[t] * phi[t] * T_S)), (t, k)
        # K = 1 and the decay unit against PyTorch's recursion
        g_all = sum(g(t, i) for i in UNITS)
        whole = buffer_step(whole, g_all, c)
        gd = decay_gradient(thetas[t], c)
        decay_buf = buffer_step(decay_buf, gd, c)
        d = g_all + lam * thetas[t]
        torch_buf = d if torch_buf is None else mu * torch_buf + (1 - tau) * d
        assert zero(unit_update(whole, g_all, c) + unit_update(decay_buf, gd, c) - (-lrs[t] * torch_buf)), t
