"""Corollary 3.3 (post-composition and intermediate activations, MATH.md §6), machine-checked with sympy.

Notation: θ(α) = θ_t + α Δθ on a segment; for h: R^O → R^Q,
Φ^h = ∫_0^1 ∂h(f(θ(α))) ∂_θ f(θ(α)) dα (the chain rule inside the integral).

Proved:

* (i) Φ^h Δθ = h(f(θ_t + Δθ)) − h(f(θ_t)) exactly, integrating in α with sympy, for the generic
  polynomial h(z) = Σ_{k≤4} c_k z^k (symbolic c_k) with the two-parameter polynomial model
  f(x; a, b) = a b x + a², and for h = exp with the scalar model f = θ³ x + θ x²; θ_t, Δθ, x symbolic;
* for an arbitrary (undefined) differentiable h: R² → R applied to a two-output polynomial model, the
  integrand Σ_o ∂_o h · ∂_θ f_o · Δθ is exactly d/dα h(f(θ(α))), so the identity follows from the
  fundamental theorem of calculus; the cross-entropy loss h = log(e^{f_1} + e^{f_2}) − f_1 included;
* linear h (a margin f_1 − f_2, a projection W f): Φ^h = W Φ exactly;
* the endpoint shortcut h'(f(θ_{t+1})) Φ Δθ is NOT the exact change in general: a symbolic difference and
  the counterexample h(z) = z², f = θ x, θ: 0 → 1, x = 1 (exact 1, shortcut 2, start-point shortcut 0);
* over a realized 2-step SGD-with-momentum trajectory (library's SGDRule tables, rational data),
  h(f(θ_N)) − h(f(θ_0)) = Σ_{t,j,i} Φ^h_t[j] update_t(i)[j] + Σ_{t,j} Φ^h_t[j] update_t(decay)[j] exactly;
* (ii) f = g ∘ a with the intermediate activation a(x; w1, c) = (w1 x + c)² and g(a; w2) = w2 a: the
  parameters after the activation (w2) have Φ^a[w2] = 0 identically, so their influences on a vanish for
  every update, and Φ^a Δθ = a(θ_{t+1}) − a(θ_t) while w2 moves too; on a realized SGD trajectory the
  decomposition of a telescopes exactly with zero influence from w2.
"""

from __future__ import annotations

import sympy as sp

from explaind_math.optimizers.sgd import SGDRule
from explaind_math.optimizers.template import buffer_step, decay_direct_update, decay_gradient, unit_update

al = sp.Symbol("alpha")
z = sp.Symbol("z")
a, b, x = sp.symbols("a b x")
a0, b0, da, db = sp.symbols("a_t b_t Delta_a Delta_b")
MODEL = a * b * x + a**2
PATH = {a: a0 + al * da, b: b0 + al * db}
END = {a: a0 + da, b: b0 + db}
START = {a: a0, b: b0}


def along(expr, point=PATH):
    return expr.subs(point, simultaneous=True)


def integrate01(expr):
    """∫_0^1 expr dα, exactly; polynomials in α through sympy.Poly (fast), anything else by sympy.integrate."""
    expr = sp.expand(expr)
    if expr.is_polynomial(al):
        antiderivative = sp.Poly(expr, al).integrate()
        return antiderivative.eval(1) - antiderivative.eval(0)
    return sp.integrate(expr, (al, 0, 1))


def composed_feature_map(h, f, params, path):
    """Φ^h[j] = ∫_0^1 h'(f(θ(α))) ∂_j f(θ(α)) dα, integrated exactly in α (h polynomial)."""
    hp = sp.diff(h, z).subs(z, f.subs(path, simultaneous=True))
    return [integrate01(hp * sp.diff(f, p).subs(path, simultaneous=True)) for p in params]


def test_chain_rule_inside_the_integral_polynomial_h():
    """Φ^h Δθ = h(f(θ_t+Δθ)) − h(f(θ_t)) for h = Σ_{k≤4} c_k z^k, f = a b x + a², everything symbolic."""
    h = sum(c * z**k for k, c in enumerate(sp.symbols("c0:5")))
    phi = composed_feature_map(h, MODEL, (a, b), PATH)
    change = h.subs(z, along(MODEL, END)) - h.subs(z, along(MODEL, START))
    assert sp.expand(phi[0] * da + phi[1] * db - change) == 0


def test_chain_rule_inside_the_integral_exp():
    """h = exp on the scalar model f = θ³ x + θ x²: Φ^h Δθ = ∫_0^1 e^{f(θ(α))} ∂_θ f(θ(α)) dα Δθ =
    exp(f(θ_t + Δθ)) − exp(f(θ_t)), integrated in closed form by sympy."""
    th, t0 = sp.symbols("theta theta_t")
    d = sp.Symbol("Delta", nonzero=True)  # Δθ = 0 is the trivial case (both sides vanish)
    f = th**3 * x + th * x**2
    path = {th: t0 + al * d}
    phi_h = sp.integrate(sp.exp(f.subs(path)) * sp.diff(f, th).subs(path), (al, 0, 1))
    assert not phi_h.has(sp.Integral)
    change = sp.exp(f.subs(th, t0 + d)) - sp.exp(f.subs(th, t0))
    assert sp.simplify(phi_h * d - change) == 0


def test_chain_rule_generic_h_of_two_outputs():
    """For undefined h(u, v) and outputs f_1 = a b x + a², f_2 = b² − a x: Σ_j Σ_o ∂_o h ∂_j f_o Δθ_j =
    d/dα h(f(θ(α))) identically (so ∫_0^1 = h(f(θ_{t+1})) − h(f(θ_t)) by the fundamental theorem);
    likewise for the cross-entropy h = log(e^{f_1} + e^{f_2}) − f_1."""
    u, v = sp.symbols("u v")
    f1, f2 = MODEL, b**2 - a * x
    for h in (sp.Function("h")(u, v), sp.log(sp.exp(u) + sp.exp(v)) - u):
        grad_h = [sp.diff(h, u), sp.diff(h, v)]
        at_path = {u: along(f1), v: along(f2)}
        integrand = sum(
            gh.subs(at_path, simultaneous=True) * along(sp.diff(fo, p)) * dp
            for gh, fo in zip(grad_h, (f1, f2)) for p, dp in ((a, da), (b, db))
        )
        total_derivative = sp.diff(h.subs(at_path, simultaneous=True), al)
        assert sp.simplify((integrand - total_derivative).doit()) == 0


def test_linear_post_composition_is_w_phi():
    """h(f) = W f (margins f_1 − f_2, projections): Φ^h = W Φ exactly, and for linear h the endpoint
    shortcut is exact."""
    f = (MODEL, b**2 - a * x)
    W = sp.Matrix(2, 2, sp.symbols("w11 w12 w21 w22"))
    Phi = sp.Matrix([[integrate01(along(sp.diff(fo, p))) for p in (a, b)] for fo in f])
    hf = W * sp.Matrix(f)
    Phi_h = sp.Matrix([[integrate01(along(sp.diff(ho, p))) for p in (a, b)] for ho in hf])
    assert (Phi_h - W * Phi).expand() == sp.zeros(2, 2)
    margin = sp.Matrix([[1, -1]])
    exact_change = along(f[0] - f[1], END) - along(f[0] - f[1], START)
    assert sp.expand((margin * Phi * sp.Matrix([da, db]))[0] - exact_change) == 0


def test_endpoint_shortcut_is_not_exact():
    """h'(f(θ_end)) Φ Δθ ≠ h(f(θ_end)) − h(f(θ_start)) in general: for h = z², f = θ x the shortcut exceeds
    the exact change by x² Δ² ≠ 0; at θ: 0 → 1, x = 1 the exact change is 1, the end-point shortcut 2, the
    start-point shortcut 0, and the chain rule inside the integral gives 1."""
    th, t0, d = sp.symbols("theta theta_t Delta")
    f = th * x
    h = z**2
    Phi = integrate01(sp.diff(f, th).subs(th, t0 + al * d))
    exact = h.subs(z, f.subs(th, t0 + d)) - h.subs(z, f.subs(th, t0))
    end_shortcut = sp.diff(h, z).subs(z, f.subs(th, t0 + d)) * Phi * d
    start_shortcut = sp.diff(h, z).subs(z, f.subs(th, t0)) * Phi * d
    assert sp.factor(end_shortcut - exact) == x**2 * d**2
    numbers = {t0: 0, d: 1, x: 1}
    assert exact.subs(numbers) == 1 and end_shortcut.subs(numbers) == 2 and start_shortcut.subs(numbers) == 0
    (phi_h,) = composed_feature_map(h, f, (th,), {th: t0 + al * d})
    assert (phi_h * d).subs(numbers) == 1 and sp.expand(phi_h * d - exact) == 0


# ----------------------------------------------------------------------------- realized trajectories
XS = (sp.Rational(1, 2), sp.Integer(-1), sp.Integer(2))
YS = (sp.Integer(1), sp.Rational(1, 3), sp.Rational(-1, 2))
BATCHES = ({0, 1}, {1, 2})


def sgd_trajectory(model, params, theta0, loss_of_output):
    """Two SGD steps (η = 1/10, μ = 1/2, τ = 1/4, λ = 1/20) driven by the library's SGDRule tables.

    Returns the points θ_0..θ_2 and, per step, ({unit: update vector}, decay update vector)."""
    rule = SGDRule()
    hyper = {"lr": sp.Rational(1, 10), "momentum": sp.Rational(1, 2), "dampening": sp.Rational(1, 4),
             "weight_decay": sp.Rational(1, 20), "nesterov": False, "maximize": False}
    thetas, steps = [tuple(theta0)], []
    buf = {i: [0] * len(params) for i in range(len(XS))}
    dbuf = [0] * len(params)
    for t, batch in enumerate(BATCHES):
        at = dict(zip(params, thetas[t]))
        upd = {i: [0] * len(params) for i in buf}
        dupd = [0] * len(params)
        for j, p in enumerate(params):
            c = rule.coefficients(hyper, {}, first_update=(t == 0))
            for i in buf:
                gij = 0
                if i in batch:
                    loss = loss_of_output(model.subs(x, XS[i]), YS[i]) / len(batch)
                    gij = c.gradient_sign * sp.diff(loss, p).subs(at)
                buf[i][j] = buffer_step(buf[i][j], gij, c)
                upd[i][j] = unit_update(buf[i][j], gij, c)
            gd = decay_gradient(thetas[t][j], c)
            dbuf[j] = buffer_step(dbuf[j], gd, c)
            dupd[j] = unit_update(dbuf[j], gd, c) + decay_direct_update(thetas[t][j], c)
        thetas.append(tuple(thetas[t][j] + sum(upd[i][j] for i in upd) + dupd[j] for j in range(len(params))))
        steps.append((upd, dupd))
    return thetas, steps


def test_post_composition_over_a_realized_trajectory():
    """h(f(x; θ_2)) − h(f(x; θ_0)) = Σ_t Σ_j Φ^h_t[j] (Σ_i update_t(i)[j] + update_t(decay)[j]) exactly, for
    h(z) = z³ − z (and a symbolic test input x), on 2 library-driven SGD steps with squared loss."""
    h = z**3 - z
    params = (a, b)
    thetas, steps = sgd_trajectory(MODEL, params, (sp.Rational(1, 2), sp.Rational(-1, 3)), lambda o, y: (o - y) ** 2)
    total = 0
    for t, (upd, dupd) in enumerate(steps):
        path = {p: s + al * (e - s) for p, s, e in zip(params, thetas[t], thetas[t + 1])}
        phi = composed_feature_map(h, MODEL, params, path)
        total += sum(phi[j] * (sum(u[j] for u in upd.values()) + dupd[j]) for j in range(2))
    change = h.subs(z, MODEL.subs(dict(zip(params, thetas[2])))) - h.subs(z, MODEL.subs(dict(zip(params, thetas[0]))))
    assert sp.expand(total - change) == 0
    assert sp.expand(change) != 0


w1, c1, w2 = sp.symbols("w1 c w2")
ACTIVATION = (w1 * x + c1) ** 2  # a(x; w1, c): parameters before the activation
OUTPUT = w2 * ACTIVATION  # f = g(a; w2): w2 comes after the activation
NET = (w1, c1, w2)


def test_parameters_after_the_activation_contribute_zero():
    """Φ^a[w2] = ∫ ∂a/∂w2 dα = 0 identically; Φ^a[w1] Δw1 + Φ^a[c] Δc = a(θ_{t+1}) − a(θ_t) with w2 moving
    too; whereas for the output f itself Φ^f[w2] ≠ 0."""
    starts = sp.symbols("w1_t c_t w2_t")
    deltas = sp.symbols("D_w1 D_c D_w2")
    path = {p: s + al * d for p, s, d in zip(NET, starts, deltas)}
    phi_a = [integrate01(sp.diff(ACTIVATION, p).subs(path, simultaneous=True)) for p in NET]
    assert phi_a[2] == 0
    end = {p: s + d for p, s, d in zip(NET, starts, deltas)}
    change = ACTIVATION.subs(end, simultaneous=True) - ACTIVATION.subs(dict(zip(NET, starts)), simultaneous=True)
    assert sp.expand(sum(ph * d for ph, d in zip(phi_a, deltas)) - change) == 0
    phi_f_w2 = integrate01(sp.diff(OUTPUT, w2).subs(path, simultaneous=True))
    assert sp.expand(phi_f_w2) != 0


def test_activation_decomposition_over_a_realized_trajectory():
    """On 2 library-driven SGD steps of f = w2 (w1 x + c)² with squared loss, the decomposition of the
    activation a has I^a[t, w2, x, i] = 0 for every step and sample, while Δw2 ≠ 0, and
    a(x; θ_0) + Σ I^a + Σ Ψ^a = a(x; θ_2) exactly."""
    thetas, steps = sgd_trajectory(OUTPUT, NET, (sp.Rational(1, 2), sp.Rational(1, 4), sp.Rational(3, 2)),
                                   lambda o, y: (o - y) ** 2)
    assert thetas[2][2] != thetas[0][2]  # w2 did move
    total = ACTIVATION.subs(dict(zip(NET, thetas[0])))
    for t, (upd, dupd) in enumerate(steps):
        path = {p: s + al * (e - s) for p, s, e in zip(NET, thetas[t], thetas[t + 1])}
        phi_a = [integrate01(sp.diff(ACTIVATION, p).subs(path, simultaneous=True)) for p in NET]
        for i, u in upd.items():
            assert phi_a[2] * u[2] == 0, (t, i)
            total += sum(phi_a[j] * u[j] for j in range(3))
        assert phi_a[2] * dupd[2] == 0
        total += sum(phi_a[j] * dupd[j] for j in range(3))
    assert sp.expand(total - ACTIVATION.subs(dict(zip(NET, thetas[2])))) == 0
