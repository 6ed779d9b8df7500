"""The path identity and its telescoping (MATH.md §1, equations (1) and (2)), machine-checked with sympy.

Proved:

* segment identity: for θ(α) = θ_t + α Δθ and Φ_t(x) = ∫_0^1 ∂_θ f(x; θ(α)) dα (integrated exactly),
  Φ_t(x) Δθ = f(x; θ_t + Δθ) − f(x; θ_t) for the generic scalar polynomial f = Σ_{k≤d} c_k θ^k and the
  generic two-parameter polynomial f = Σ_{p+q≤d} c_{pq} a^p b^q (all coefficients symbolic), d = 1..4;
* telescoping of the whole decomposition, for N = 4 steps with symbolic parameters θ_0..θ_4, symbolic
  data (x_i, y_i) of 3 samples in changing batches, the two-parameter model f(x; a, b) = a b x + a² x²,
  per-sample gradients of ℓ_i = (f(x_i; θ) − y_i)² taken from the model (sympy.diff), w = 1/|B_t|, and
  the library's per-unit updates (template + SGDRule with symbolic η_t, μ, τ, λ; AdamWRule with
  symbolic β1, η_t, λ_t and P_t as symbols since v is recorded):

      f(x; θ_0) + Σ_{t,j,i} I[t,j,x,i] + Σ_{t,j} Ψ[t,j,x] − f(x; θ_N) = −Σ_t Φ_t(x) (θ_{t+1} − θ_t − Δθ_t^torch)

  identically in all symbols, where Δθ_t^torch is PyTorch's step written independently. The right side
  vanishes on every PyTorch trajectory, so equation (2) holds exactly there;
* the same on realized trajectories (θ_{t+1} = θ_t + Σ_u update_t(u) substituted): exactly in rational
  arithmetic for N = 4 (SGD with momentum and AdamW with rational P_t), and symbolically in (η, μ)
  for N = 3.
"""

from __future__ import annotations

import itertools

import sympy as sp

from explaind_math.optimizers.adamw import AdamWRule
from explaind_math.optimizers.sgd import SGDRule
from explaind_math.optimizers.template import (
    buffer_step,
    decay_direct_update,
    decay_gradient,
    unit_update,
)

alpha = sp.Symbol("alpha")
x = sp.Symbol("x")


def feature_map(f, params, start, end):
    """Φ = ∫_0^1 ∂_θ f(θ_start + α (θ_end − θ_start)) dα, one entry per parameter, exact."""
    path = {p: s + alpha * (e - s) for p, s, e in zip(params, start, end)}
    return [sp.integrate(sp.expand(sp.diff(f, p).subs(path, simultaneous=True)), (alpha, 0, 1)) for p in params]


# ----------------------------------------------------------------------------- the segment identity
def test_segment_identity_scalar_polynomials():
    """Φ Δθ = f(θ_t + Δθ) − f(θ_t) for f = Σ_{k=0}^{d} c_k θ^k, d = 1..4, all symbols free."""
    theta, t0, d_theta = sp.symbols("theta theta_t Delta")
    for degree in range(1, 5):
        cs = sp.symbols(f"c0:{degree + 1}")
        f = sum(c * theta**k for k, c in enumerate(cs))
        (phi,) = feature_map(f, [theta], [t0], [t0 + d_theta])
        change = f.subs(theta, t0 + d_theta) - f.subs(theta, t0)
        assert sp.expand(phi * d_theta - change) == 0, degree
        # the left endpoint's gradient alone is not the integral once f is non-linear
        if degree >= 2:
            assert sp.expand(sp.diff(f, theta).subs(theta, t0) * d_theta - change) != 0


def test_segment_identity_two_parameter_polynomials():
    """Φ_a Δa + Φ_b Δb = f(a+Δa, b+Δb) − f(a, b) for f = Σ_{p+q≤d} c_{pq} a^p b^q, d = 1..4."""
    a, b, a0, b0, da, db = sp.symbols("a b a_t b_t Delta_a Delta_b")
    for degree in range(1, 5):
        f = sum(sp.Symbol(f"c_{p}{q}") * a**p * b**q
                for p, q in itertools.product(range(degree + 1), repeat=2) if p + q <= degree)
        phi = feature_map(f, [a, b], [a0, b0], [a0 + da, b0 + db])
        change = f.subs({a: a0 + da, b: b0 + db}, simultaneous=True) - f.subs({a: a0, b: b0}, simultaneous=True)
        assert sp.expand(phi[0] * da + phi[1] * db - change) == 0, degree


# ----------------------------------------------------------------------------- the whole decomposition
A, B = sp.symbols("a b")
PARAMS = (A, B)
MODEL = A * B * x + A**2 * x**2  # f(x; a, b), degree 3 in (a, b, x)
UNITS = (0, 1, 2)
BATCHES = ({0, 1}, {1, 2}, {0, 2}, {0, 1, 2})
N = len(BATCHES)
XS = sp.symbols("x0:3")
YS = sp.symbols("y0:3")


def f_at(theta, at_x=x):
    return MODEL.subs({A: theta[0], B: theta[1], x: at_x}, simultaneous=True)


def per_sample_gradients(theta, t, data=None):
    """g_{t,i} = w_{t,i} ∇_θ (f(x_i; θ_t) − y_i)², w = 1/|B_t|, from the model by differentiation
    (``data`` optionally substitutes numbers for the symbolic x_i, y_i)."""
    w = sp.Rational(1, len(BATCHES[t]))
    out = {}
    for i in UNITS:
        if i in BATCHES[t]:
            loss = (MODEL.subs(x, XS[i]) - YS[i]) ** 2
            grad = [w * sp.diff(loss, p) for p in PARAMS]
            if data:
                grad = [gr.subs(data) for gr in grad]
            out[i] = [gr.subs({A: theta[0], B: theta[1]}, simultaneous=True) for gr in grad]
        else:
            out[i] = [sp.Integer(0)] * len(PARAMS)
    return out


def library_updates(rule, hypers, states, thetas, data=None):
    """Per step: {unit: update vector} and the decay unit's update, from the library's template.

    ``thetas[t]`` is the parameter point at step t (free symbols or a realized trajectory);
    gradients are evaluated there."""
    buf = {i: [sp.Integer(0)] * len(PARAMS) for i in UNITS}
    dbuf = [sp.Integer(0)] * len(PARAMS)
    steps = []
    for t in range(len(hypers)):
        grads = per_sample_gradients(thetas[t], t, data)
        upd = {i: [None] * len(PARAMS) for i in UNITS}
        dupd = [None] * len(PARAMS)
        for j in range(len(PARAMS)):
            c = rule.coefficients(hypers[t], states[t][j], first_update=(t == 0))
            for i in UNITS:
                gij = c.gradient_sign * grads[i][j]
                buf[i][j] = buffer_step(buf[i][j], gij, c)
                upd[i][j] = unit_update(buf[i][j], gij, c)
            gd = decay_gradient(thetas[t][j], c)
            dbuf[j] = buffer_step(dbuf[j], gd, c)
            dupd[j] = unit_update(dbuf[j], gd, c) + decay_direct_update(thetas[t][j], c)
        steps.append((upd, dupd))
    return steps


def torch_sgd_deltas(hypers, thetas):
    """PyTorch SGD (momentum, dampening, coupled decay), coordinate-wise: Δθ_t per step."""
    b, deltas = None, []
    for t, h in enumerate(hypers):
        grads = per_sample_gradients(thetas[t], t)
        d = [sum(grads[i][j] for i in UNITS) + h["weight_decay"] * thetas[t][j] for j in range(len(PARAMS))]
        b = d if b is None else [h["momentum"] * bj + (1 - h["dampening"]) * dj for bj, dj in zip(b, d)]
        deltas.append([-h["lr"] * bj for bj in b])
    return deltas


def torch_adamw_deltas(hypers, Ps, thetas):
    """PyTorch AdamW with the recorded preconditioner P_t (per coordinate): Δθ = −ηλθ − η P m_t."""
    m, deltas = [sp.Integer(0)] * len(PARAMS), []
    for t, h in enumerate(hypers):
        grads = per_sample_gradients(thetas[t], t)
        gt = [sum(grads[i][j] for i in UNITS) for j in range(len(PARAMS))]
        m = [h["beta1"] * mj + (1 - h["beta1"]) * gj for mj, gj in zip(m, gt)]
        deltas.append([-h["lr"] * h["weight_decay"] * thetas[t][j] - h["lr"] * Ps[t][j] * m[j]
                       for j in range(len(PARAMS))])
    return deltas


def decomposition_residual(steps, thetas):
    """f(x; θ_0) + Σ I + Σ Ψ − f(x; θ_N) with I[t,j,x,i] = Φ_t(x)[j] update_t(i)[j], Ψ likewise."""
    total = f_at(thetas[0]) - f_at(thetas[len(steps)])
    phis = []
    for t, (upd, dupd) in enumerate(steps):
        phi = feature_map(MODEL, PARAMS, thetas[t], thetas[t + 1])
        phis.append(phi)
        kernel = sum(phi[j] * upd[i][j] for i in UNITS for j in range(len(PARAMS)))
        reg = sum(phi[j] * dupd[j] for j in range(len(PARAMS)))
        total += kernel + reg
    return total, phis


def free_trajectory():
    return [(sp.Symbol(f"a_{t}"), sp.Symbol(f"b_{t}")) for t in range(N + 1)]


def sgd_hypers(lr, momentum, dampening, wd):
    return [{"lr": lr[t], "momentum": momentum, "dampening": dampening, "weight_decay": wd,
             "nesterov": False, "maximize": False} for t in range(len(lr))]


def adamw_hypers(lr, beta1, wd):
    return [{"lr": lr[t], "beta1": beta1, "beta2": sp.Rational(999, 1000), "eps": sp.Rational(1, 10**8),
             "weight_decay": wd[t], "amsgrad": False, "maximize": False, "decoupled_weight_decay": True}
            for t in range(len(lr))]


class RecordedP(AdamWRule):
    """AdamWRule with P_t given directly (v is recorded, so P_t is data): D = η_t P_t, every other entry
    of the table exactly as AdamWRule builds it."""

    def coefficients(self, hyper, state, *, first_update):
        c = super().coefficients(hyper, {"step": 1, "exp_avg_sq": sp.Integer(1)}, first_update=first_update)
        return type(c)(A=c.A, C=c.C, D=hyper["lr"] * state["P"], E=c.E, gradient_sign=c.gradient_sign,
                       decay_coupled=c.decay_coupled, decay_decoupled=c.decay_decoupled)


def test_telescoping_sgd_momentum_symbolic():
    """N = 4 SGD steps (symbolic η_t, μ, τ, λ, data, θ_t): the decomposition's residual equals
    −Σ_t Φ_t (θ_{t+1} − θ_t − Δθ_t^torch) identically, so it is exactly zero on PyTorch's trajectory."""
    thetas = free_trajectory()
    lrs = sp.symbols("eta0:4")
    hypers = sgd_hypers(lrs, *sp.symbols("mu tau lambda"))
    steps = library_updates(SGDRule(), hypers, [[{}, {}]] * N, thetas)
    residual, phis = decomposition_residual(steps, thetas)
    ref = torch_sgd_deltas(hypers, thetas)
    constraint = sum(phis[t][j] * (thetas[t + 1][j] - thetas[t][j] - ref[t][j]) for t in range(N) for j in range(2))
    assert sp.expand(residual + constraint) == 0
    assert sp.expand(residual) != 0  # the constraint is what makes it vanish: off-trajectory it does not


def test_telescoping_adamw_symbolic():
    """N = 4 AdamW steps (symbolic β1, η_t, λ_t, P_t per coordinate, data, θ_t): residual =
    −Σ_t Φ_t (θ_{t+1} − θ_t − Δθ_t^torch) identically."""
    thetas = free_trajectory()
    lrs, wds = sp.symbols("eta0:4"), sp.symbols("lambda0:4")
    Ps = [sp.symbols(f"P_{t}_a P_{t}_b", positive=True) for t in range(N)]
    hypers = adamw_hypers(lrs, sp.Symbol("beta1"), wds)
    states = [[{"P": Ps[t][0]}, {"P": Ps[t][1]}] for t in range(N)]
    steps = library_updates(RecordedP(), hypers, states, thetas)
    residual, phis = decomposition_residual(steps, thetas)
    ref = torch_adamw_deltas(hypers, Ps, thetas)
    constraint = sum(phis[t][j] * (thetas[t + 1][j] - thetas[t][j] - ref[t][j]) for t in range(N) for j in range(2))
    assert sp.expand(residual + constraint) == 0


def realize(rule, hypers, states, theta0, data=None):
    """Run the library's updates forward: θ_{t+1} = θ_t + Σ_u update_t(u); returns (steps, thetas)."""
    thetas = [tuple(theta0)]
    steps = []
    for t in range(len(hypers)):
        # the buffers depend on earlier steps only, so re-running the prefix is exact
        steps = library_updates(rule, hypers[: t + 1], states[: t + 1], thetas, data)
        upd, dupd = steps[t]
        thetas.append(tuple(sp.expand(thetas[t][j] + sum(upd[i][j] for i in UNITS) + dupd[j]) for j in range(2)))
    return steps, thetas


DATA = {XS[0]: sp.Rational(1, 2), XS[1]: -1, XS[2]: sp.Rational(3, 2),
        YS[0]: 1, YS[1]: sp.Rational(-1, 3), YS[2]: sp.Rational(2, 5)}
THETA0 = (sp.Rational(1, 2), sp.Rational(-3, 4))


def test_telescoping_realized_sgd_rational():
    """A realized 4-step SGD trajectory (η = 1/10, μ = 9/10, τ = 1/5, λ = 1/100, rational data and θ_0):
    f(x; θ_0) + Σ I + Σ Ψ = f(x; θ_N) exactly in Q, for symbolic test input x."""
    hypers = sgd_hypers([sp.Rational(1, 10)] * N, sp.Rational(9, 10), sp.Rational(1, 5), sp.Rational(1, 100))
    steps, thetas = realize(SGDRule(), hypers, [[{}, {}]] * N, THETA0, DATA)
    residual, _ = decomposition_residual(steps, thetas)
    assert all(th.is_Rational for pair in thetas for th in pair)
    assert sp.expand(residual) == 0
    assert sp.expand(f_at(thetas[N]) - f_at(thetas[0])) != 0  # training did move the prediction


def test_telescoping_realized_adamw_rational():
    """A realized 4-step AdamW trajectory with rational P_t (as recorded), β1 = 9/10, η = 1/20, λ = 1/10:
    the reconstruction is exact in Q."""
    hypers = adamw_hypers([sp.Rational(1, 20)] * N, sp.Rational(9, 10), [sp.Rational(1, 10)] * N)
    states = [[{"P": sp.Rational(3 + t, 2)}, {"P": sp.Rational(5, 3 + t)}] for t in range(N)]
    steps, thetas = realize(RecordedP(), hypers, states, THETA0, DATA)
    residual, _ = decomposition_residual(steps, thetas)
    assert sp.expand(residual) == 0


def test_telescoping_realized_symbolic_lr_and_momentum():
    """A realized 3-step SGD-with-momentum trajectory with symbolic η and μ (θ_3 a polynomial of degree
    13 in (η, μ)): the reconstruction is exact as a polynomial identity in η, μ and x."""
    eta, mu = sp.symbols("eta mu")
    hypers = sgd_hypers([eta] * 3, mu, sp.Rational(1, 4), sp.Rational(1, 10))
    steps, thetas = realize(SGDRule(), hypers, [[{}, {}]] * 3, THETA0, DATA)
    residual, _ = decomposition_residual(steps, thetas)
    assert thetas[3][0].has(eta) and thetas[3][0].has(mu)
    assert sp.expand(residual) == 0
