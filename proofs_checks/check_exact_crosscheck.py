"""Exact cross-check of the library's real pipeline (MATH.md §3, §2, §5, equation (2)).

A tiny polynomial model f(x; a, b, c) = c (a x + b x²) + a b c x (three scalar parameters, degree 3, so
Gauss–Legendre with 3 nodes integrates Φ_t exactly) is trained for 3 steps by an unmodified
``torch.optim.SGD`` / ``torch.optim.AdamW`` in float64, recorded by ``TrajectoryRecorder`` and decomposed
by ``decompose_sgd_momentum_training`` / ``decompose_adamw_training``. Independently, sympy recomputes
everything from MATH.md's closed forms — not from the library's template:

    SGD:   θ_{t+1} from PyTorch's recursion, T_t(i) = Σ_{s≤t, i∈B_s} μ^{t−s}(1−τ)^{[s≥1]} g_{s,i},
           R_t = Σ_s c_{t,s} λ θ_s (Nesterov: g_{t,i} + μ Σ c g and λθ_t + μ Σ c λθ);
    AdamW: v_t = β2 v_{t−1} + (1−β2) g_t², P_t = 1/((1−β1^k)(sqrt(v_t/(1−β2^k)) + ε)),
           T_t(i) = (1−β1) P_t Σ_s β1^{t−s} g_{s,i}, R_t = λ θ_t;
    Φ_t(x) = ∫_0^1 ∂_θ f(x; θ_t + α Δθ_t) dα exactly,  I[t,j,x,i] = −η Φ_t(x)[j] T_t(i)[j],
    Ψ[t,j,x] = −η Φ_t(x)[j] R_t[j],

in exact rational arithmetic for SGD (rational lr, μ, τ, λ; data and θ_0 exact binary fractions) and at
50 significant digits for AdamW (P_t is algebraic). Asserted: the recorded θ_t, every per-step,
per-parameter, per-test-input, per-sample influence I and every Ψ of the library agree with the exact
values to 1e-12, the exact reconstruction f(θ_0) + Σ I + Σ Ψ − f(θ_N) is 0 (exactly for SGD), and the
library's certified residual is below 1e-12.
"""

from __future__ import annotations

import pytest
import sympy as sp
import torch
from torch import nn

import explaind_math as em

TOL = 1e-12
BATCHES = ([0, 1], [1, 2, 3], [0, 3])
X_TRAIN = (0.5, -1.0, 1.5, 0.25)
Y_TRAIN = (1.0, -0.5, 2.0, 0.75)
X_TEST = (0.5, -1.5, 2.0)
THETA0 = {"a": 0.5, "b": -0.25, "c": 0.75}
NAMES = ("a", "b", "c")

# the model, symbolically
a_, b_, c_, x_ = sp.symbols("a b c x")
PARAMS = (a_, b_, c_)
F = c_ * (a_ * x_ + b_ * x_**2) + a_ * b_ * c_ * x_
alpha = sp.Symbol("alpha")


class PolyModel(nn.Module):
    """f(x; a, b, c) = c (a x + b x²) + a b c x, for a batch of scalar inputs x: (B,) → (B, 1)."""

    def __init__(self):
        super().__init__()
        for n in NAMES:
            setattr(self, n, nn.Parameter(torch.tensor(THETA0[n], dtype=torch.float64)))

    def forward(self, x):
        out = self.c * (self.a * x + self.b * x**2) + self.a * self.b * self.c * x
        return out.unsqueeze(-1)


def per_sample_loss(output, target):
    return ((output - target) ** 2).sum()


def train(make_optimizer):
    """Run 3 recorded steps with mean-reduced squared loss; return (model, trajectory, X, Y)."""
    torch.manual_seed(0)
    model = PolyModel()
    X = torch.tensor(X_TRAIN, dtype=torch.float64)
    Y = torch.tensor(Y_TRAIN, dtype=torch.float64)
    opt = make_optimizer(model.parameters())
    recorder = em.TrajectoryRecorder(model, opt)
    for ids in BATCHES:
        opt.zero_grad()
        idx = torch.tensor(ids)
        loss = ((model(X[idx]).squeeze(-1) - Y[idx]) ** 2).mean()
        loss.backward()
        recorder.record_batch(ids)
        opt.step()
    recorder.close()
    return model, recorder.trajectory(), X, Y


# ----------------------------------------------------------------------------- the exact side
def exact(v: float):
    """The exact rational value of a float64 (the data and θ_0 are binary fractions)."""
    return sp.Rational(v)


def f_at(theta, x):
    return F.subs({a_: theta[0], b_: theta[1], c_: theta[2], x_: x})


def exact_gradients(theta, batch):
    """g_{t,i} = (1/|B_t|) ∇_θ (f(x_i; θ_t) − y_i)², exactly."""
    grads = {}
    for i in batch:
        loss = (F.subs(x_, exact(X_TRAIN[i])) - exact(Y_TRAIN[i])) ** 2 / len(batch)
        grads[i] = [sp.diff(loss, p).subs(dict(zip(PARAMS, theta))) for p in PARAMS]
    return grads


def exact_phi(theta, theta_next, x):
    path = {p: s + alpha * (e - s) for p, s, e in zip(PARAMS, theta, theta_next)}
    out = []
    for p in PARAMS:
        poly = sp.Poly(sp.expand(sp.diff(F, p).subs(x_, x).subs(path, simultaneous=True)), alpha).integrate()
        out.append(poly.eval(1) - poly.eval(0))
    return out


def exact_sgd(lr, mu, tau, wd, nesterov):
    """Exact θ_t, I[t, j, x, i] and Ψ[t, j, x] from Corollary 3.2's closed form."""
    thetas = [tuple(exact(THETA0[n]) for n in NAMES)]
    grads = []
    b = None
    for t, batch in enumerate(BATCHES):
        grads.append(exact_gradients(thetas[t], batch))
        d = [sum(gi[j] for gi in grads[t].values()) + wd * thetas[t][j] for j in range(3)]
        b = d if b is None else [mu * bj + (1 - tau) * dj for bj, dj in zip(b, d)]
        step = [dj + mu * bj for dj, bj in zip(d, b)] if nesterov else b
        thetas.append(tuple(thetas[t][j] - lr * step[j] for j in range(3)))

    def c(t, s):
        return mu ** (t - s) * ((1 - tau) if s >= 1 else 1)

    units = sorted({i for bt in BATCHES for i in bt})
    T, R = [], []
    for t in range(len(BATCHES)):
        Tt = {i: [sum(c(t, s) * grads[s].get(i, [0, 0, 0])[j] for s in range(t + 1)) for j in range(3)] for i in units}
        Rt = [sum(c(t, s) * wd * thetas[s][j] for s in range(t + 1)) for j in range(3)]
        if nesterov:
            Tt = {i: [grads[t].get(i, [0, 0, 0])[j] + mu * Tt[i][j] for j in range(3)] for i in units}
            Rt = [wd * thetas[t][j] + mu * Rt[j] for j in range(3)]
        T.append(Tt)
        R.append(Rt)
    return thetas, T, R, [lr] * len(BATCHES), units


def exact_adamw(lr, beta1, beta2, eps, wd, digits=50):
    """θ_t, T_t(i), R_t of Theorem 3.1 at ``digits`` significant digits (v_t recomputed, not recorded)."""
    thetas = [tuple(exact(THETA0[n]) for n in NAMES)]
    grads, T, R = [], [], []
    v = [0, 0, 0]
    units = sorted({i for bt in BATCHES for i in bt})
    for t, batch in enumerate(BATCHES):
        k = t + 1
        grads.append(exact_gradients(thetas[t], batch))
        gt = [sum(gi[j] for gi in grads[t].values()) for j in range(3)]
        v = [beta2 * vj + (1 - beta2) * gj**2 for vj, gj in zip(v, gt)]
        P = [sp.N(1 / ((1 - beta1**k) * (sp.sqrt(vj / (1 - beta2**k)) + eps)), digits) for vj in v]
        Tt = {i: [(1 - beta1) * P[j] * sum(beta1 ** (t - s) * grads[s].get(i, [0, 0, 0])[j] for s in range(t + 1))
                  for j in range(3)] for i in units}
        Rt = [wd * thetas[t][j] for j in range(3)]
        T.append(Tt)
        R.append(Rt)
        thetas.append(tuple(sp.N(thetas[t][j] - lr * (sum(Tt[i][j] for i in units) + Rt[j]), digits) for j in range(3)))
    return thetas, T, R, [lr] * len(BATCHES), units


def compare(result, trajectory, thetas, T, R, lrs, units, *, exact_zero: bool):
    """Assert the library's I, Ψ and θ_t agree with the exact ones to TOL; the exact residual vanishes."""
    assert result.kernel_axes == ("step", "param", "test", "unit", "output")
    assert list(result.param_labels) == list(NAMES) and list(result.units) == units
    for t, theta in enumerate(thetas):
        for j, n in enumerate(NAMES):
            assert abs(float(trajectory.parameters[t][n]) - float(theta[j])) < TOL, (t, n)
    kernel = result.kernel.detach().cpu().double()
    reg = result.regularization.detach().cpu().double()
    worst = 0.0
    for xi, xv in enumerate(X_TEST):
        x = exact(xv)
        reconstruction = f_at(thetas[0], x)
        for t in range(len(BATCHES)):
            phi = exact_phi(thetas[t], thetas[t + 1], x)
            for j in range(3):
                for u, i in enumerate(units):
                    influence = -lrs[t] * phi[j] * T[t][i][j]
                    reconstruction += influence
                    worst = max(worst, abs(float(kernel[t, j, xi, u, 0]) - float(influence)))
                psi = -lrs[t] * phi[j] * R[t][j]
                reconstruction += psi
                worst = max(worst, abs(float(reg[t, j, xi, 0]) - float(psi)))
        residual = sp.expand(reconstruction - f_at(thetas[-1], x))
        if exact_zero:
            assert residual == 0, (xi, residual)
        else:
            assert abs(float(residual)) < 1e-40, (xi, residual)
    assert worst < TOL, worst
    assert result.max_residual < TOL
    _report("exact cross-check", worst)
    return worst


def _report(theorem: str, value: float) -> None:
    """Hand the worst residual to the verification command (no-op when run by plain pytest)."""
    from explaind_math import verification

    verification.record_residual(theorem, value)


@pytest.mark.parametrize("nesterov", [False, True], ids=["heavy-ball", "nesterov"])
def test_sgd_momentum_pipeline_matches_exact_rational_influences(nesterov):
    """torch.optim.SGD (lr 1/10, μ 9/10, τ 1/4 (0 for Nesterov), λ 1/20), 3 steps, 4 samples in changing
    batches: the library's float64 I[t,j,x,i] and Ψ[t,j,x] equal the exact rational ones to 1e-12, and the
    exact decomposition reconstructs f(x; θ_3) exactly."""
    lr, mu, wd = sp.Rational(1, 10), sp.Rational(9, 10), sp.Rational(1, 20)
    tau = sp.Integer(0) if nesterov else sp.Rational(1, 4)
    model, trajectory, X, Y = train(lambda p: torch.optim.SGD(
        p, lr=float(lr), momentum=float(mu), dampening=float(tau), weight_decay=float(wd), nesterov=nesterov))
    result = em.decompose_sgd_momentum_training(
        model, trajectory, per_sample_loss, (X, Y), torch.tensor(X_TEST, dtype=torch.float64),
        quadrature=em.gauss_legendre(3), dtype=torch.float64)
    thetas, T, R, lrs, units = exact_sgd(lr, mu, tau, wd, nesterov)
    compare(result, trajectory, thetas, T, R, lrs, units, exact_zero=True)


def test_adamw_pipeline_matches_high_precision_influences():
    """torch.optim.AdamW (lr 1/20, β = (9/10, 99/100), ε = 1e-8, λ 1/10), 3 steps: the library's float64
    I and Ψ (with the recorded v_t) equal the 50-digit values from Theorem 3.1 (v_t recomputed) to 1e-12."""
    lr, b1, b2, eps, wd = sp.Rational(1, 20), sp.Rational(9, 10), sp.Rational(99, 100), sp.Rational(1, 10**8), sp.Rational(1, 10)
    model, trajectory, X, Y = train(lambda p: torch.optim.AdamW(
        p, lr=float(lr), betas=(float(b1), float(b2)), eps=float(eps), weight_decay=float(wd)))
    result = em.decompose_adamw_training(
        model, trajectory, per_sample_loss, (X, Y), torch.tensor(X_TEST, dtype=torch.float64),
        quadrature=em.gauss_legendre(3), dtype=torch.float64)
    thetas, T, R, lrs, units = exact_adamw(lr, b1, b2, eps, wd)
    compare(result, trajectory, thetas, T, R, lrs, units, exact_zero=False)


def test_too_few_nodes_are_not_exact():
    """Control: with 1 Gauss–Legendre node (exact only to degree 1 in α; ∂f here has degree 2) the library's
    influences differ from the exact ones by far more than 1e-12 — the comparison can fail."""
    lr, mu, tau, wd = sp.Rational(1, 10), sp.Rational(9, 10), sp.Rational(1, 4), sp.Rational(1, 20)
    model, trajectory, X, Y = train(lambda p: torch.optim.SGD(
        p, lr=float(lr), momentum=float(mu), dampening=float(tau), weight_decay=float(wd)))
    result = em.decompose_sgd_momentum_training(
        model, trajectory, per_sample_loss, (X, Y), torch.tensor(X_TEST, dtype=torch.float64),
        quadrature=em.gauss_legendre(1), dtype=torch.float64)
    thetas, T, R, lrs, units = exact_sgd(lr, mu, tau, wd, False)
    with pytest.raises(AssertionError):
        compare(result, trajectory, thetas, T, R, lrs, units, exact_zero=True)
