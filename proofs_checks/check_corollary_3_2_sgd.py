"""Corollary 3.2 (SGD with momentum), machine-checked with sympy (MATH.md §3, §4).

The library side is the template (``buffer_step``, ``unit_update``, ``decay_gradient``,
``decay_direct_update``) driven by ``SGDRule().coefficients`` / ``sgd_coefficients`` on symbols. The
independent sides are PyTorch's recursion (``torch.optim.sgd._single_tensor_sgd``)

    d_t = s g_t + λ_t θ_t;   b_0 = d_0;   b_t = μ b_{t−1} + (1−τ) d_t;   θ_{t+1} = θ_t − η_t b_t
    (Nesterov: θ_{t+1} = θ_t − η_t (d_t + μ b_t))

and the closed form of MATH.md §3 with c_{t,s} = μ^{t−s} (1−τ)^{[s≥1]}:

    T_t(i) = Σ_{s≤t, i∈B_s} c_{t,s} g_{s,i},   R_t = Σ_{s≤t} c_{t,s} λ_s θ_s
    Nesterov: T_t(i) = g_{t,i} + μ Σ_s c_{t,s} g_{s,i},   R_t = λ_t θ_t + μ Σ_s c_{t,s} λ_s θ_s.

Proved for symbolic μ, τ, η_t, λ_t, θ_t and per-sample gradients g_{s,i} of 3 samples in batches that
change per step, t = 0..6: update_t(i) = −η_t T_t(i), update_t(decay) = −η_t R_t, and Σ_u update_t(u)
= θ_{t+1} − θ_t of PyTorch (plain, Nesterov, maximize). μ = 0 (the number) is plain gradient descent
θ_{t+1} − θ_t = −η_t (g_t + λ_t θ_t) for every τ, while the momentum branch evaluated at μ = 0 is not
(it would damp by 1−τ), which is why the library special-cases μ = 0 exactly as PyTorch does.
"""

from __future__ import annotations

import sympy as sp

from explaind_math.optimizers.sgd import SGDRule, sgd_coefficients
from explaind_math.optimizers.template import (
    buffer_step,
    decay_direct_update,
    decay_gradient,
    unit_update,
)

STEPS = 7
UNITS = (0, 1, 2)
BATCHES = ({0, 1}, {1, 2}, {0, 2}, {0}, {1, 2}, {0, 1, 2}, {2})

mu, tau = sp.symbols("mu tau")
lrs = [sp.Symbol(f"eta_{t}") for t in range(STEPS)]
wds = [sp.Symbol(f"lambda_{t}") for t in range(STEPS)]
thetas = [sp.Symbol(f"theta_{t}") for t in range(STEPS)]
G = {(s, i): sp.Symbol(f"g_{s}_{i}") for s in range(STEPS) for i in UNITS if i in BATCHES[s]}


def g(s: int, i: int):
    return G.get((s, i), sp.Integer(0))


def zero(expr) -> bool:
    return sp.expand(expr) == 0


def hyper(t, *, momentum=mu, dampening=tau, nesterov=False, maximize=False) -> dict:
    return {"lr": lrs[t], "momentum": momentum, "dampening": dampening, "weight_decay": wds[t],
            "nesterov": nesterov, "maximize": maximize}


def run_library(hypers):
    """Per-unit buffers and updates of the §4 template with SGDRule's tables (the driver's loop)."""
    rule = SGDRule()
    buf = {i: sp.Integer(0) for i in UNITS}
    decay_buf = sp.Integer(0)
    out = []
    has_buffer = False  # as the driver: torch creates momentum_buffer at the first step with μ ≠ 0
    for t in range(STEPS):
        c = rule.coefficients(hypers[t], {}, first_update=not has_buffer)
        has_buffer = has_buffer or rule.creates_buffer(hypers[t])
        upd = {}
        for i in UNITS:
            grad = c.gradient_sign * g(t, i)
            buf[i] = buffer_step(buf[i], grad, c)
            upd[i] = unit_update(buf[i], grad, c)
        gd = decay_gradient(thetas[t], c)
        decay_buf = buffer_step(decay_buf, gd, c)
        decay_upd = unit_update(decay_buf, gd, c) + decay_direct_update(thetas[t], c)
        out.append((c, upd, decay_upd))
    return out


def torch_sgd_reference(hypers):
    """PyTorch's SGD on one coordinate; returns θ_{t+1} − θ_t per step (θ_t free symbols)."""
    b = None
    deltas = []
    for t in range(STEPS):
        h = hypers[t]
        d = sum(g(t, i) for i in UNITS)
        if h["maximize"]:
            d = -d
        d = d + h["weight_decay"] * thetas[t]
        if h["momentum"] != 0:
            b = d if b is None else h["momentum"] * b + (1 - h["dampening"]) * d
            d = d + h["momentum"] * b if h["nesterov"] else b
        deltas.append(-h["lr"] * d)
    return deltas


def c_ts(t: int, s: int):
    """c_{t,s} = μ^{t−s} (1−τ)^{[s≥1]}."""
    return mu ** (t - s) * ((1 - tau) if s >= 1 else 1)


def T(t: int, i: int, sign=1):
    return sign * sum(c_ts(t, s) * g(s, i) for s in range(t + 1))


def R(t: int):
    return sum(c_ts(t, s) * wds[s] * thetas[s] for s in range(t + 1))


def test_heavy_ball_units_are_the_closed_form():
    """update_t(i) = −η_t Σ_{s≤t, i∈B_s} μ^{t−s}(1−τ)^{[s≥1]} g_{s,i}; update_t(decay) = −η_t R_t (t = 0..6)."""
    lib = run_library([hyper(t) for t in range(STEPS)])
    for t in range(STEPS):
        _, upd, decay_upd = lib[t]
        for i in UNITS:
            assert zero(upd[i] + lrs[t] * T(t, i)), (t, i)
        assert zero(decay_upd + lrs[t] * R(t)), t


def test_heavy_ball_replay_identity():
    """Σ_u update_t(u) = −η_t b_t of PyTorch's recursion (first step undamped: b_0 = d_0)."""
    hypers = [hyper(t) for t in range(STEPS)]
    lib = run_library(hypers)
    ref = torch_sgd_reference(hypers)
    for t in range(STEPS):
        _, upd, decay_upd = lib[t]
        assert zero(sum(upd.values()) + decay_upd - ref[t]), t


def test_first_step_is_undamped():
    """c_{t,0} = μ^t (no 1−τ): damping the first step as well would not reproduce PyTorch."""
    lib = run_library([hyper(t) for t in range(STEPS)])
    damped_everywhere = sum(mu ** (3 - s) * (1 - tau) * g(s, 0) for s in range(4))
    assert not zero(lib[3][1][0] + lrs[3] * damped_everywhere)
    assert zero(lib[3][1][0] + lrs[3] * T(3, 0))


def test_nesterov_units_and_replay():
    """Nesterov: update_t(i) = −η_t (g_{t,i} + μ Σ_s c_{t,s} g_{s,i}), update_t(decay) =
    −η_t (λ_t θ_t + μ R_t), and Σ_u update_t(u) = −η_t (d_t + μ b_t) of PyTorch; for PyTorch's τ = 0
    and, as algebra, for symbolic τ."""
    for damp in (sp.Integer(0), tau):
        hypers = [hyper(t, dampening=damp, nesterov=True) for t in range(STEPS)]
        lib = run_library(hypers)
        ref = torch_sgd_reference(hypers)
        for t in range(STEPS):
            _, upd, decay_upd = lib[t]
            for i in UNITS:
                T_nes = g(t, i) + mu * T(t, i)
                assert zero((upd[i] + lrs[t] * T_nes).subs(tau, damp)), (t, i)
            R_nes = wds[t] * thetas[t] + mu * R(t)
            assert zero((decay_upd + lrs[t] * R_nes).subs(tau, damp)), t
            assert zero(sum(upd.values()) + decay_upd - ref[t]), t
    # Nesterov is not heavy ball: the heavy-ball closed form misses the look-ahead g_{t,i}
    lib = run_library([hyper(t, nesterov=True) for t in range(STEPS)])
    assert not zero(lib[2][1][0] + lrs[2] * T(2, 0))


def test_maximize_flips_only_the_samples():
    """maximize=True: d_t = −g_t + λ_t θ_t; update_t(i) = +η_t T_t(i), decay unit unchanged; replay holds."""
    for nesterov in (False, True):
        hypers = [hyper(t, nesterov=nesterov, maximize=True, dampening=0 if nesterov else tau) for t in range(STEPS)]
        lib = run_library(hypers)
        ref = torch_sgd_reference(hypers)
        for t in range(STEPS):
            c, upd, decay_upd = lib[t]
            assert c.gradient_sign == -1
            assert zero(sum(upd.values()) + decay_upd - ref[t]), (nesterov, t)
            if not nesterov:
                for i in UNITS:
                    assert zero(upd[i] - lrs[t] * T(t, i)), (t, i)
                assert zero(decay_upd + lrs[t] * R(t)), t


def test_zero_momentum_is_gradient_descent():
    """μ = 0: update_t(i) = −η_t g_{t,i}, update_t(decay) = −η_t λ_t θ_t, Σ = −η_t (g_t + λ_t θ_t) for every τ,
    at the first step and later ones (Bell et al.'s exact path kernel setting)."""
    hypers = [hyper(t, momentum=0) for t in range(STEPS)]
    lib = run_library(hypers)
    ref = torch_sgd_reference(hypers)
    for t in range(STEPS):
        _, upd, decay_upd = lib[t]
        for i in UNITS:
            assert zero(upd[i] + lrs[t] * g(t, i)), (t, i)
        assert zero(decay_upd + lrs[t] * wds[t] * thetas[t]), t
        gd = -lrs[t] * (sum(g(t, i) for i in UNITS) + wds[t] * thetas[t])
        assert zero(ref[t] - gd) and zero(sum(upd.values()) + decay_upd - gd), t
    for first in (True, False):
        c = sgd_coefficients(lrs[0], 0, tau, wds[0], nesterov=False, maximize=False, first_update=first)
        assert (c.A, c.C, c.D, c.E) == (1, 0, 0, lrs[0])


def test_momentum_branch_at_zero_is_not_gradient_descent():
    """The momentum branch with μ → 0 substituted gives −η_t (1−τ) d_t for t ≥ 1, not −η_t d_t: the μ = 0
    special case of the library (and of PyTorch) is necessary, not cosmetic."""
    lib = run_library([hyper(t) for t in range(STEPS)])
    t = 2
    branch_at_zero = (sum(lib[t][1].values()) + lib[t][2]).subs(mu, 0)
    gd = -lrs[t] * (sum(g(t, i) for i in UNITS) + wds[t] * thetas[t])
    assert zero(branch_at_zero - (1 - tau) * gd)
    assert not zero(branch_at_zero - gd)


def test_sgd_table():
    """sgd_coefficients gives (A, C, D, E, κ) = (0, 1, η, 0, λ) first, (μ, 1−τ, η, 0, λ) afterwards;
    Nesterov D = ημ, E = η."""
    first = sgd_coefficients(lrs[0], mu, tau, wds[0], nesterov=False, maximize=False, first_update=True)
    later = sgd_coefficients(lrs[0], mu, tau, wds[0], nesterov=False, maximize=False, first_update=False)
    nes = sgd_coefficients(lrs[0], mu, 0, wds[0], nesterov=True, maximize=False, first_update=False)
    assert (first.A, first.C, first.D, first.E, first.decay_coupled) == (0, 1, lrs[0], 0, wds[0])
    assert zero(later.A - mu) and zero(later.C - (1 - tau)) and later.D == lrs[0] and later.E == 0
    assert zero(nes.D - lrs[0] * mu) and nes.E == lrs[0]
    assert first.decay_decoupled == 0 and later.decay_decoupled == 0


def test_momentum_switched_on_mid_run_starts_undamped():
    """μ = 0 for t < 3, then μ with dampening τ (a momentum warm-up): PyTorch creates the buffer at
    t = 3 as b_3 = d_3, undamped, and the library's units reproduce every step; damping the buffer's
    first step (treating t = 3 as a continuation) would not."""
    hypers = [hyper(t, momentum=(0 if t < 3 else mu)) for t in range(STEPS)]
    lib = run_library(hypers)
    ref = torch_sgd_reference(hypers)
    for t in range(STEPS):
        _, upd, decay_upd = lib[t]
        assert zero(sum(upd.values()) + decay_upd - ref[t]), t
    wrong = SGDRule().coefficients(hypers[3], {}, first_update=False)
    assert not zero(wrong.C - 1) and zero(wrong.C - (1 - tau))
