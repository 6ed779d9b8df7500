"""Quadrature for the test feature map Φ_t(x) = ∫_0^1 ∂_θ f(x; θ_t(α)) dα (MATH.md §1), in exact arithmetic.

Proved:

* Gauss–Legendre on [0, 1] with n = 1..5 nodes: the nodes, computed by sympy as the roots (radicals)
  of the shifted Legendre polynomial P_n(2α − 1), lie in (0, 1); the exact weights
  w_k = 1 / ((1 − u_k²) P_n'(u_k)²), u_k = 2α_k − 1, make Σ_k w_k α_k^d = 1/(d+1) exactly for every
  d ≤ 2n − 1, and for d = 2n the error is exactly ∫ − Σ = (n!)⁴ / ((2n+1) ((2n)!)²) ≠ 0 — so the rule is
  exact for polynomials of degree ≤ 2n − 1 in α and no more;
* the library's float rule ``gauss_legendre(n)`` agrees with these exact nodes and weights to 1e-14
  (n = 1..5), and its weights sum to 1;
* the midpoint rule with n nodes (h = 1/n), for symbolic n: ∫_0^1 α² − M_n = 1/(12 n²) exactly, it is
  exact for degree ≤ 1 only, and for every polynomial f of degree ≤ 5 (symbolic coefficients)
  ∫ f − M_n(f) = h²/24 Δf' − 7h⁴/5760 Δf''' + 31h⁶/967680 Δf⁽⁵⁾  (Δφ = φ(1) − φ(0), Euler–Maclaurin);
  the library's ``midpoint(n)`` has nodes (k + 1/2)/n and weights 1/n.
"""

from __future__ import annotations

import math
from functools import lru_cache

import sympy as sp

from explaind_math.quadrature import gauss_legendre, midpoint

a = sp.Symbol("alpha")


@lru_cache(maxsize=None)
def exact_gauss_legendre(n: int):
    """Exact nodes (radicals, increasing) and weights on [0, 1], from sympy's Legendre polynomial."""
    u = sp.Symbol("u")
    Pn = sp.legendre(n, u)
    shifted = sp.Poly(sp.expand(Pn.subs(u, 2 * a - 1)), a)
    roots = sp.roots(shifted)  # {root: multiplicity}
    assert sum(roots.values()) == n and all(m == 1 for m in roots.values())
    nodes = sorted(roots, key=lambda r: float(sp.re(sp.N(r, 50))))
    dPn = sp.diff(Pn, u)
    weights = [sp.radsimp(1 / ((1 - (2 * r - 1) ** 2) * dPn.subs(u, 2 * r - 1) ** 2)) for r in nodes]
    return nodes, weights


def is_zero(expr) -> bool:
    return sp.simplify(sp.expand(expr)) == 0


def test_gauss_legendre_nodes_are_real_and_inside():
    """The n roots of P_n(2α−1) are real, distinct and in (0, 1) for n = 1..5."""
    for n in range(1, 6):
        nodes, _ = exact_gauss_legendre(n)
        for r in nodes:
            assert r.is_real, (n, r)  # the radicals of P_n(2α−1) are real for n ≤ 5
            assert 0 < sp.N(r, 50) < 1
        assert len(set(sp.N(r, 50) for r in nodes)) == n


def test_gauss_legendre_exact_to_degree_2n_minus_1_and_not_2n():
    """Σ_k w_k α_k^d = 1/(d+1) exactly for d ≤ 2n−1; at d = 2n, ∫ − Σ = (n!)⁴/((2n+1)((2n)!)²) ≠ 0; n = 1..5."""
    for n in range(1, 6):
        nodes, weights = exact_gauss_legendre(n)
        for d in range(0, 2 * n):
            assert is_zero(sum(w * r**d for w, r in zip(weights, nodes)) - sp.Rational(1, d + 1)), (n, d)
        error = sp.Rational(1, 2 * n + 1) - sum(w * r ** (2 * n) for w, r in zip(weights, nodes))
        expected = sp.Rational(math.factorial(n) ** 4, (2 * n + 1) * math.factorial(2 * n) ** 2)
        assert is_zero(error - expected), n
        assert expected != 0


def test_gauss_legendre_integrates_generic_polynomials_along_a_segment():
    """For f of degree 2n−1 in α with symbolic coefficients, Σ_k w_k f(α_k) = ∫_0^1 f dα (n = 1..4)."""
    for n in range(1, 5):
        nodes, weights = exact_gauss_legendre(n)
        cs = sp.symbols(f"c0:{2 * n}")
        f = sum(c * a**k for k, c in enumerate(cs))
        rule = sum(w * f.subs(a, r) for w, r in zip(weights, nodes))
        integral = sp.integrate(f, (a, 0, 1))
        assert is_zero(sp.expand(rule - integral)), n


def test_library_gauss_legendre_matches_exact():
    """gauss_legendre(n).nodes/.weights agree with the exact ones to 1e-14 (n = 1..5); Σ w = 1."""
    for n in range(1, 6):
        nodes, weights = exact_gauss_legendre(n)
        q = gauss_legendre(n)
        assert q.num_nodes == n
        order = sorted(range(n), key=lambda k: q.nodes[k])
        for k, (r, w) in enumerate(zip(nodes, weights)):
            assert abs(q.nodes[order[k]] - float(sp.re(sp.N(r, 40)))) < 1e-14, (n, k)
            assert abs(q.weights[order[k]] - float(sp.N(w, 40))) < 1e-14, (n, k)
        assert abs(sum(q.weights) - 1) < 1e-14


def test_library_gauss_legendre_exactness_in_floats():
    """In floats, the library's n-node rule integrates α^d to 1e-14 for d ≤ 2n−1 and misses α^{2n} by
    (n!)⁴/((2n+1)((2n)!)²) (n = 1..8)."""
    for n in range(1, 9):
        q = gauss_legendre(n)
        for d in range(0, 2 * n):
            assert abs(sum(w * x**d for x, w in zip(q.nodes, q.weights)) - 1 / (d + 1)) < 1e-14, (n, d)
        err = 1 / (2 * n + 1) - sum(w * x ** (2 * n) for x, w in zip(q.nodes, q.weights))
        expected = math.factorial(n) ** 4 / ((2 * n + 1) * math.factorial(2 * n) ** 2)
        assert abs(err - expected) < 1e-14 + 1e-9 * expected, n


# ----------------------------------------------------------------------------- midpoint
n_sym = sp.Symbol("n", integer=True, positive=True)
k_sym = sp.Symbol("k", integer=True, nonnegative=True)


def midpoint_sum(f):
    """M_n(f) = (1/n) Σ_{k=0}^{n−1} f((k + 1/2)/n) as a closed form in symbolic n (f polynomial)."""
    return sp.simplify(sp.summation(sp.expand(f.subs(a, (k_sym + sp.Rational(1, 2)) / n_sym)), (k_sym, 0, n_sym - 1)) / n_sym)


def test_midpoint_error_for_alpha_squared():
    """∫_0^1 α² dα − M_n(α²) = 1/(12 n²) for every n, so the midpoint rule is not exact at degree 2."""
    error = sp.Rational(1, 3) - midpoint_sum(a**2)
    assert is_zero(error - 1 / (12 * n_sym**2))
    for n in (1, 10, 100):
        assert error.subs(n_sym, n) != 0


def test_midpoint_exact_to_degree_one_only():
    """M_n(c0 + c1 α) = c0 + c1/2 exactly; M_n(α^2) ≠ 1/3 for every n."""
    c0, c1 = sp.symbols("c0 c1")
    assert is_zero(midpoint_sum(c0 + c1 * a) - (c0 + c1 / 2))
    assert not is_zero(midpoint_sum(a**2) - sp.Rational(1, 3))


def test_midpoint_euler_maclaurin_error():
    """For f of degree ≤ 5 (symbolic coefficients), with h = 1/n:
    ∫ f − M_n(f) = h²/24 Δf' − 7h⁴/5760 Δf''' + 31h⁶/967680 Δf⁽⁵⁾, exactly."""
    cs = sp.symbols("c0:6")
    f = sum(c * a**k for k, c in enumerate(cs))
    h = 1 / n_sym

    def jump(expr):
        return expr.subs(a, 1) - expr.subs(a, 0)

    predicted = (h**2 / 24 * jump(sp.diff(f, a)) - 7 * h**4 / 5760 * jump(sp.diff(f, a, 3))
                 + 31 * h**6 / 967680 * jump(sp.diff(f, a, 5)))
    error = sp.integrate(f, (a, 0, 1)) - midpoint_sum(f)
    assert is_zero(error - predicted)
    # the leading term alone is not the whole error once f has degree ≥ 4
    assert not is_zero(error - h**2 / 24 * jump(sp.diff(f, a)))


def test_library_midpoint_rule():
    """midpoint(n) has nodes (k + 1/2)/n and weights 1/n (n = 1, 2, 7, 100), and its float error on α² is
    1/(12 n²)."""
    for n in (1, 2, 7, 100):
        q = midpoint(n)
        assert q.num_nodes == n
        for k in range(n):
            assert abs(q.nodes[k] - (k + 0.5) / n) < 1e-15 and abs(q.weights[k] - 1 / n) < 1e-15
        err = 1 / 3 - sum(w * x * x for x, w in zip(q.nodes, q.weights))
        assert abs(err - 1 / (12 * n * n)) < 1e-14
