"""The block scan of explaind_math.engine.distributed, machine-checked with sympy (MATH.md §4, §11).

The §4 template advances one buffer per unit, buffer_t(u) = A_t buffer_{t−1}(u) + C_t grad_t(u). Split the
steps 0..N−1 into consecutive blocks [a_r, b_r) (``block_of_rank``). The distributed driver

  1. finds which optimizer buffers exist when each block starts (``creates_buffer`` of the earlier blocks'
     hyper-parameters), because the table of a step depends on it (SGD: A = 0, C = 1 at the first update);
  2. computes each block's own part E_r: its buffers at b_r when started from zero at a_r;
  3. scans S_0 = 0, S_{r+1} = A_{b_r−1} ⋯ A_{a_r} S_r + E_r (each rank applies its block's A's to the state it
     receives and adds its own part);
  4. runs block r from S_r.

Proved here for symbolic coefficients, with the library's own coefficient tables (``sgd_coefficients``,
``AdamWRule().coefficients`` on symbols) and partition (``block_of_rank``), N = 7 steps, 3 units in batches
that change per step, and every split into 2 and 3 blocks: every unit's buffer and update at every step of
every block equals the single sequential run's, exactly. Cases: SGD with momentum μ and dampening τ
switched on at step 3 (the buffer is created inside the run, undamped), Nesterov, and AdamW with a
symbolic, time-varying β1 and preconditioner P_t.
"""

from __future__ import annotations

import itertools

import sympy as sp

from explaind_math.engine.distributed import block_of_rank
from explaind_math.optimizers.adamw import AdamWRule
from explaind_math.optimizers.sgd import SGDRule, sgd_coefficients
from explaind_math.optimizers.template import apply_linear, buffer_step, unit_update

STEPS = 7
UNITS = (0, 1, 2)
BATCHES = ({0, 1}, {1, 2}, {0, 2}, {0}, {1, 2}, {0, 1, 2}, {2})
G = {(s, i): sp.Symbol(f"g_{s}_{i}") for s in range(STEPS) for i in UNITS if i in BATCHES[s]}
mu, tau = sp.symbols("mu tau")
lrs = [sp.Symbol(f"eta_{t}") for t in range(STEPS)]


def grad(t: int, u: int):
    return G.get((t, u), sp.Integer(0))


def sgd_tables(nesterov: bool):
    """SGD, momentum 0 for steps 0..2 (a warm-up) and μ afterwards: (hyper, coefficients(first_update))."""
    rule = SGDRule()

    def table(t, first_update):
        momentum = 0 if (t < 3 and not nesterov) else mu
        hyper = {"lr": lrs[t], "momentum": momentum, "dampening": 0 if nesterov else tau, "weight_decay": 0,
                 "nesterov": nesterov, "maximize": False}
        c = sgd_coefficients(lrs[t], momentum, hyper["dampening"], 0, nesterov=nesterov, maximize=False,
                             first_update=first_update)
        return hyper, c, rule.creates_buffer(hyper)

    return table


def adamw_tables():
    rule = AdamWRule()
    betas1 = [sp.Symbol(f"beta1_{t}") for t in range(STEPS)]
    precond = [sp.Symbol(f"P_{t}") for t in range(STEPS)]

    def table(t, first_update):
        hyper = {"lr": lrs[t], "beta1": betas1[t], "beta2": sp.Symbol("beta2"), "eps": sp.Symbol("epsilon"),
                 "weight_decay": 0, "amsgrad": False, "maximize": False, "decoupled_weight_decay": True}
        c = rule.coefficients(hyper, {"step": t + 1, "exp_avg_sq": precond[t]}, first_update=first_update)
        return hyper, c, rule.creates_buffer(hyper)

    return table


def sequential(table):
    """Buffers and updates of every unit at every step, one pass from step 0 (the single-process driver)."""
    buffers = {u: sp.Integer(0) for u in UNITS}
    exists = False
    out = []
    for t in range(STEPS):
        _, c, creates = table(t, not exists)
        exists = exists or creates
        buffers = {u: buffer_step(buffers[u], grad(t, u), c) for u in UNITS}
        out.append({u: (buffers[u], unit_update(buffers[u], grad(t, u), c)) for u in UNITS})
    return out


def blocked(table, blocks):
    """The distributed driver's four stages on symbols; returns the same per-step list as ``sequential``."""
    # 1. buffers existing at each block's start
    created = [any(table(t, True)[2] for t in block) for block in blocks]
    start_exists = [any(created[:r]) for r in range(len(blocks))]
    # 2. own parts E_r from zero
    own = []
    for r, block in enumerate(blocks):
        b, exists = {u: sp.Integer(0) for u in UNITS}, start_exists[r]
        for t in block:
            _, c, creates = table(t, not exists)
            exists = exists or creates
            b = {u: buffer_step(b[u], grad(t, u), c) for u in UNITS}
        own.append(b)
    # 3. scan: S_{r+1} = A_{b−1} ⋯ A_a S_r + E_r
    states = [{u: sp.Integer(0) for u in UNITS}]
    for r, block in enumerate(blocks[:-1]):
        s, exists = dict(states[r]), start_exists[r]
        for t in block:
            _, c, creates = table(t, not exists)
            exists = exists or creates
            s = {u: apply_linear(c.A, s[u]) for u in UNITS}
        states.append({u: s[u] + own[r][u] for u in UNITS})
    # 4. every block from its exact start
    out = []
    for r, block in enumerate(blocks):
        b, exists = dict(states[r]), start_exists[r]
        for t in block:
            _, c, creates = table(t, not exists)
            exists = exists or creates
            b = {u: buffer_step(b[u], grad(t, u), c) for u in UNITS}
            out.append({u: (b[u], unit_update(b[u], grad(t, u), c)) for u in UNITS})
    return out


def splits(parts: int):
    """Every split of 0..STEPS−1 into ``parts`` non-empty consecutive blocks, plus block_of_rank's own."""
    yield [block_of_rank(STEPS, parts, r) for r in range(parts)]
    for cuts in itertools.combinations(range(1, STEPS), parts - 1):
        edges = (0, *cuts, STEPS)
        yield [range(edges[k], edges[k + 1]) for k in range(parts)]


def check(table) -> int:
    reference = sequential(table)
    checked = 0
    for parts in (2, 3):
        for blocks in splits(parts):
            got = blocked(table, blocks)
            assert len(got) == STEPS
            for t in range(STEPS):
                for u in UNITS:
                    for k in range(2):
                        assert sp.expand(got[t][u][k] - reference[t][u][k]) == 0, (blocks, t, u, k)
            checked += 1
    return checked


def test_block_scan_sgd_momentum_switched_on_mid_run():
    assert check(sgd_tables(nesterov=False)) == 1 + 6 + 1 + 15


def test_block_scan_sgd_nesterov():
    assert check(sgd_tables(nesterov=True)) > 0


def test_block_scan_adamw_time_varying_beta1():
    assert check(adamw_tables()) > 0


def test_the_scan_needs_the_carried_state():
    """Negative control: dropping S_r (every block from zero) changes later steps' buffers."""
    table = sgd_tables(nesterov=False)
    reference = sequential(table)
    blocks = [range(0, 4), range(4, STEPS)]
    own_only = []
    for block in blocks:
        b, exists = {u: sp.Integer(0) for u in UNITS}, True
        for t in block:
            _, c, _ = table(t, not exists)
            b = {u: buffer_step(b[u], grad(t, u), c) for u in UNITS}
            own_only.append(b)
    assert any(sp.expand(own_only[t][u] - reference[t][u][0]) != 0 for t in range(4, STEPS) for u in UNITS)
