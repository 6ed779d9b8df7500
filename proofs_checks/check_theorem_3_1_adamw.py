"""Theorem 3.1 (AdamW), machine-checked with sympy (MATH.md §2, §4).

Every check drives the library's own template (``buffer_step``, ``unit_update``, ``decay_gradient``,
``decay_direct_update``) with the table returned by ``AdamWRule().coefficients`` on sympy symbols, and
compares it with an independently written side: PyTorch's AdamW recursion (transcribed from
``torch.optim.adam._single_tensor_adam``) or the unrolled closed form of MATH.md §2.

Proved, symbolically in β1 (constant or time-varying β1_t), β2, ε, η_t, λ_t, v_t, θ_t and the
per-sample gradients g_{s,i} of 3 samples in batches B_t that change from step to step, t = 0..6:

* buffer_t(i) = (1−β1) Σ_{s≤t, i∈B_s} β1^{t−s} s·g_{s,i}, and with β1_t varying
  buffer_t(i) = Σ_{s≤t, i∈B_s} (1−β1_s) Π_{s<r≤t} β1_r s·g_{s,i};
* Σ_i buffer_t(i) = m_t of PyTorch's recursion;
* update_t(i) = −η_t T_t(i) with T_t(i) = (1−β1) P_t Σ β1^{t−s} g_{s,i}, and the decay unit's update is
  −η_t R_t = −η_t λ_t θ_t;
* Σ_u update_t(u) = θ_{t+1} − θ_t of PyTorch's AdamW step (replay identity), also under ``maximize``
  (s = −1), with ``amsgrad`` (P from max_exp_avg_sq), and for Adam's coupled L2 decay
  (decoupled_weight_decay=False), where the decay unit λ_s θ_s flows through m;
* P = adamw_preconditioner(v, k, β1, β2, ε) equals PyTorch's 1/((1−β1^k)(sqrt(v)/sqrt(1−β2^k) + ε)) for
  symbolic integer k, and MATH.md's form sqrt(v/(1−β2^k)) for v > 0, 1−β2^k > 0.
"""

from __future__ import annotations

import sympy as sp

from explaind_math.optimizers.adamw import AdamWRule, adamw_preconditioner
from explaind_math.optimizers.template import (
    buffer_step,
    decay_direct_update,
    decay_gradient,
    unit_update,
)

STEPS = 7  # t = 0..6
UNITS = (0, 1, 2)
#: B_t: the samples of step t (a different batch at every step; sample 1 skips steps 3 and 6)
BATCHES = ({0, 1}, {1, 2}, {0, 2}, {0}, {1, 2}, {0, 1, 2}, {2})


def is_zero(expr) -> bool:
    """Exact zero test: rational simplification first (sqrt(v) etc. are treated as independent
    generators, so cancellation there is a proof), the full simplifier as a fallback."""
    expr = sp.cancel(sp.together(sp.expand(expr)))
    return expr == 0 or sp.simplify(expr) == 0


def symbols_per_step(name: str, **assumptions):
    return [sp.Symbol(f"{name}_{t}", **assumptions) for t in range(STEPS)]


G = {(s, i): sp.Symbol(f"g_{s}_{i}") for s in range(STEPS) for i in UNITS if i in BATCHES[s]}


def g(s: int, i: int):
    """g_{s,i}, zero when i ∉ B_s."""
    return G.get((s, i), sp.Integer(0))


def hyper(lr, beta1, beta2, eps, wd, *, maximize=False, decoupled=True, amsgrad=False) -> dict:
    return {"lr": lr, "beta1": beta1, "beta2": beta2, "eps": eps, "weight_decay": wd,
            "amsgrad": amsgrad, "maximize": maximize, "decoupled_weight_decay": decoupled}


def run_library(hypers, states, thetas):
    """The template of MATH.md §4 run unit by unit with AdamWRule's tables, exactly as the driver does.

    Returns per step: the table, the per-unit buffers, the per-unit updates and the decay unit's update.
    """
    rule = AdamWRule()
    buf = {i: sp.Integer(0) for i in UNITS}
    decay_buf = sp.Integer(0)
    out = []
    for t in range(STEPS):
        c = rule.coefficients(hypers[t], states[t], first_update=(t == 0))
        upd = {}
        for i in UNITS:
            grad = c.gradient_sign * g(t, i)
            buf[i] = buffer_step(buf[i], grad, c)
            upd[i] = unit_update(buf[i], grad, c)
        gd = decay_gradient(thetas[t], c)
        decay_buf = buffer_step(decay_buf, gd, c)
        decay_upd = unit_update(decay_buf, gd, c) + decay_direct_update(thetas[t], c)
        out.append((c, dict(buf), upd, decay_upd))
    return out


def torch_adam_reference(hypers, vs, thetas):
    """PyTorch's Adam/AdamW, one parameter coordinate (torch.optim.adam._single_tensor_adam):

        grad = −grad if maximize;  grad += λ θ (Adam, coupled);  θ *= 1 − η λ (AdamW, decoupled)
        m = lerp(m, grad, 1 − β1);  denom = sqrt(v) / sqrt(1 − β2^k) + ε;  θ −= η / (1 − β1^k) · m / denom

    with v (v_max under amsgrad) the recorded value. Returns (m_t, θ_{t+1} − θ_t) per step."""
    m = sp.Integer(0)
    rows = []
    for t in range(STEPS):
        h, theta, k = hypers[t], thetas[t], t + 1
        grad = sum(g(t, i) for i in UNITS)
        if h["maximize"]:
            grad = -grad
        new_theta = theta
        if h["decoupled_weight_decay"]:
            new_theta = theta * (1 - h["lr"] * h["weight_decay"])
        else:
            grad = grad + h["weight_decay"] * theta
        m = m + (grad - m) * (1 - h["beta1"])
        denom = sp.sqrt(vs[t]) / sp.sqrt(1 - h["beta2"] ** k) + h["eps"]
        new_theta = new_theta - h["lr"] / (1 - h["beta1"] ** k) * m / denom
        rows.append((m, new_theta - theta))
    return rows


# ----------------------------------------------------------------------------- shared symbols
b1, b2, eps = sp.symbols("beta1 beta2 epsilon")
lrs = symbols_per_step("eta")
wds = symbols_per_step("lambda")
vs = symbols_per_step("v", positive=True)
thetas = symbols_per_step("theta")
b1s = symbols_per_step("beta1")


def states_for(vlist):
    return [{"step": t + 1, "exp_avg_sq": vlist[t]} for t in range(STEPS)]


def preconditioner_math_md(v, k, beta1, beta2, epsilon):
    """MATH.md §2, written out: P = 1 / ((1−β1^k)(sqrt(v/(1−β2^k)) + ε))."""
    return 1 / ((1 - beta1**k) * (sp.sqrt(v / (1 - beta2**k)) + epsilon))


# ----------------------------------------------------------------------------- the checks
def test_buffers_are_the_unrolled_first_moment():
    """buffer_t(i) = (1−β1) Σ_{s≤t, i∈B_s} β1^{t−s} g_{s,i} for t = 0..6, and Σ_i buffer_t(i) = m_t."""
    hypers = [hyper(lrs[t], b1, b2, eps, wds[t]) for t in range(STEPS)]
    lib = run_library(hypers, states_for(vs), thetas)
    ref = torch_adam_reference(hypers, vs, thetas)
    for t in range(STEPS):
        _, buf, _, _ = lib[t]
        for i in UNITS:
            unrolled = (1 - b1) * sum(b1 ** (t - s) * g(s, i) for s in range(t + 1))
            assert sp.expand(buf[i] - unrolled) == 0, (t, i)
        assert sp.expand(sum(buf.values()) - ref[t][0]) == 0, t


def test_buffers_with_time_varying_beta1():
    """With β1_t varying: buffer_t(i) = Σ_{s≤t} (1−β1_s) Π_{s<r≤t} β1_r g_{s,i} = PyTorch's m_t split by sample."""
    hypers = [hyper(lrs[t], b1s[t], b2, eps, wds[t]) for t in range(STEPS)]
    lib = run_library(hypers, states_for(vs), thetas)
    ref = torch_adam_reference(hypers, vs, thetas)
    for t in range(STEPS):
        _, buf, upd, _ = lib[t]
        for i in UNITS:
            unrolled = sum((1 - b1s[s]) * sp.Mul(*b1s[s + 1 : t + 1]) * g(s, i) for s in range(t + 1))
            assert sp.expand(buf[i] - unrolled) == 0, (t, i)
        assert sp.expand(sum(buf.values()) - ref[t][0]) == 0, t
        # the replay identity with the time-varying β1 (bias correction uses β1_t^k, as PyTorch)
        total = sum(upd.values()) + lib[t][3]
        assert is_zero(total - ref[t][1]), t


def test_unit_updates_are_the_train_and_regularization_maps():
    """update_t(i) = −η_t T_t(i), T_t(i) = (1−β1) P_t Σ_s β1^{t−s} g_{s,i}; decay unit: −η_t λ_t θ_t (t = 0..6)."""
    hypers = [hyper(lrs[t], b1, b2, eps, wds[t]) for t in range(STEPS)]
    lib = run_library(hypers, states_for(vs), thetas)
    for t in range(STEPS):
        _, _, upd, decay_upd = lib[t]
        P = 1 / ((1 - b1 ** (t + 1)) * (sp.sqrt(vs[t]) / sp.sqrt(1 - b2 ** (t + 1)) + eps))
        for i in UNITS:
            T = (1 - b1) * P * sum(b1 ** (t - s) * g(s, i) for s in range(t + 1))
            assert is_zero(upd[i] + lrs[t] * T), (t, i)
        assert sp.expand(decay_upd + lrs[t] * wds[t] * thetas[t]) == 0, t


def test_replay_identity_adamw():
    """Σ_i update_t(i) + update_t(decay) = θ_{t+1} − θ_t of PyTorch's AdamW = −η_t λ_t θ_t − η_t P_t m_t."""
    hypers = [hyper(lrs[t], b1, b2, eps, wds[t]) for t in range(STEPS)]
    lib = run_library(hypers, states_for(vs), thetas)
    ref = torch_adam_reference(hypers, vs, thetas)
    for t in range(STEPS):
        _, _, upd, decay_upd = lib[t]
        assert is_zero(sum(upd.values()) + decay_upd - ref[t][1]), t


def test_replay_identity_maximize():
    """maximize=True: s = −1 enters every sample's gradient (not the decay); the replay identity holds."""
    hypers = [hyper(lrs[t], b1, b2, eps, wds[t], maximize=True) for t in range(STEPS)]
    lib = run_library(hypers, states_for(vs), thetas)
    ref = torch_adam_reference(hypers, vs, thetas)
    for t in range(STEPS):
        c, buf, upd, decay_upd = lib[t]
        assert c.gradient_sign == -1
        for i in UNITS:
            unrolled = -(1 - b1) * sum(b1 ** (t - s) * g(s, i) for s in range(t + 1))
            assert sp.expand(buf[i] - unrolled) == 0, (t, i)
        assert is_zero(sum(upd.values()) + decay_upd - ref[t][1]), t
    # and the sign matters: the non-maximizing table does not reproduce the maximizing step
    plain = run_library([hyper(lrs[t], b1, b2, eps, wds[t]) for t in range(STEPS)], states_for(vs), thetas)
    assert not is_zero(sum(plain[2][2].values()) + plain[2][3] - ref[2][1])


def test_coupled_adam_decay_flows_through_the_first_moment():
    """Adam (decoupled_weight_decay=False): κ = λ, ρ = 0; the decay unit's buffer is
    (1−β1) Σ_s β1^{t−s} λ_s θ_s, its update −η_t P_t times that, and the replay identity holds
    (also with maximize, where only the samples' gradients change sign)."""
    for maximize in (False, True):
        hypers = [hyper(lrs[t], b1, b2, eps, wds[t], decoupled=False, maximize=maximize) for t in range(STEPS)]
        lib = run_library(hypers, states_for(vs), thetas)
        ref = torch_adam_reference(hypers, vs, thetas)
        for t in range(STEPS):
            c, _, upd, decay_upd = lib[t]
            assert c.decay_coupled == wds[t] and c.decay_decoupled == 0
            R_buffer = (1 - b1) * sum(b1 ** (t - s) * wds[s] * thetas[s] for s in range(t + 1))
            P = 1 / ((1 - b1 ** (t + 1)) * (sp.sqrt(vs[t]) / sp.sqrt(1 - b2 ** (t + 1)) + eps))
            assert is_zero(decay_upd + lrs[t] * P * R_buffer), t
            assert is_zero(sum(upd.values()) + decay_upd - ref[t][1]), (maximize, t)
        # the coupled decay is not the decoupled one: treating it as AdamW would miss the β1 memory
        decoupled = run_library([hyper(lrs[t], b1, b2, eps, wds[t]) for t in range(STEPS)], states_for(vs), thetas)
        assert not is_zero(sum(decoupled[3][2].values()) + decoupled[3][3] - ref[3][1])


def test_amsgrad_uses_the_running_maximum():
    """amsgrad=True: D = η P(v_max), PyTorch's denominator from max_exp_avg_sq; not P(v)."""
    v, vmax = sp.symbols("v v_max", positive=True)
    k = 3
    h = hyper(lrs[0], b1, b2, eps, wds[0], amsgrad=True)
    c = AdamWRule().coefficients(h, {"step": k, "exp_avg_sq": v, "max_exp_avg_sq": vmax}, first_update=False)
    torch_D = lrs[0] / (1 - b1**k) / (sp.sqrt(vmax) / sp.sqrt(1 - b2**k) + eps)
    assert is_zero(c.D - torch_D)
    assert not is_zero(c.D - torch_D.subs(vmax, v))
    # the replay identity with amsgrad over all steps (v_max recorded per step)
    vmaxs = symbols_per_step("vmax", positive=True)
    hypers = [hyper(lrs[t], b1, b2, eps, wds[t], amsgrad=True) for t in range(STEPS)]
    states = [{"step": t + 1, "exp_avg_sq": vs[t], "max_exp_avg_sq": vmaxs[t]} for t in range(STEPS)]
    lib = run_library(hypers, states, thetas)
    ref = torch_adam_reference(hypers, vmaxs, thetas)
    for t in range(STEPS):
        assert is_zero(sum(lib[t][2].values()) + lib[t][3] - ref[t][1]), t


def test_template_table_is_theorem_3_1():
    """AdamWRule's table is (A, C, D, E, ρ, κ) = (β1, 1−β1, η P, 0, η λ, 0) for AdamW."""
    v = sp.Symbol("v", positive=True)
    for k in (1, 2, 5):
        c = AdamWRule().coefficients(hyper(lrs[0], b1, b2, eps, wds[0]), {"step": k, "exp_avg_sq": v},
                                     first_update=(k == 1))
        P = 1 / ((1 - b1**k) * (sp.sqrt(v) / sp.sqrt(1 - b2**k) + eps))
        assert sp.expand(c.A - b1) == 0 and sp.expand(c.C - (1 - b1)) == 0
        assert is_zero(c.D - lrs[0] * P) and c.E == 0
        assert sp.expand(c.decay_decoupled - lrs[0] * wds[0]) == 0 and c.decay_coupled == 0
        assert c.gradient_sign == 1


def test_preconditioner_forms():
    """adamw_preconditioner(v, k, β1, β2, ε) = PyTorch's 1/((1−β1^k)(sqrt(v)/sqrt(1−β2^k) + ε)) for symbolic
    integer k, and = MATH.md's 1/((1−β1^k)(sqrt(v/(1−β2^k)) + ε)) when v > 0 and 1−β2^k > 0."""
    v = sp.Symbol("v", positive=True)
    k = sp.Symbol("k", integer=True, positive=True)
    P = adamw_preconditioner(v, k, b1, b2, eps)
    torch_form = 1 / (1 - b1**k) / (sp.sqrt(v) / sp.sqrt(1 - b2**k) + eps)
    assert is_zero(P - torch_form)
    # MATH.md's form, with q = 1 − β2^k > 0 (β2 ∈ (0, 1)): substitute β2^k = 1 − q
    q = sp.Symbol("q", positive=True)
    P_q = P.subs(b2**k, 1 - q)
    assert P_q.has(q) and not P_q.has(b2)
    assert is_zero(P_q - preconditioner_math_md(v, k, b1, b2, eps).subs(b2**k, 1 - q))
    # a wrong bias correction (β2 in place of β1) is detected
    assert not is_zero(P - adamw_preconditioner(v, k, b2, b2, eps))
