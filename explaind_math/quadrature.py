"""Quadrature rules on [0, 1] for the test feature map (MATH.md §1).

Φ_t(x) = ∫_0^1 ∂_θ f(x; θ_t + α Δθ_t) dα  ≈  Σ_k w_k ∂_θ f(x; θ_t + α_k Δθ_t).

* :func:`gauss_legendre` — n nodes, exact when the integrand is a polynomial of degree ≤ 2n − 1 in α
  (a deep linear network of L layers needs n ≥ L / 2), exponentially convergent for smooth f.
* :func:`midpoint` — the paper's rule (10 or 100 nodes in its Table 1); error O(n⁻²).
* :func:`adaptive` — composite Gauss–Legendre: a segment is bisected until the exactly computable
  step residual f(θ(b)) − f(θ(a)) − Φ_[a,b] Δθ_t falls below a tolerance. Needed for ReLU networks,
  which are only piecewise polynomial along a segment.
* :func:`adaptive_gauss_legendre` — hp-adaptive: per step, the number of Gauss–Legendre nodes is raised
  (p-refinement, 1 → 2 → 4 → …) until the step residual is below the tolerance, and a segment where the
  highest order does not get there is bisected (h-refinement, for kinks).

The adaptive rules choose their nodes with a cheap probe, one forward-mode JVP along Δθ_t per node,
which gives Φ_[a,b] Δθ_t and so the residual exactly; the expensive contraction (Jacobians or one JVP
per kept direction) then runs once, on the chosen nodes only (:mod:`explaind_math.engine.contract`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

__all__ = ["Quadrature", "AdaptiveQuadrature", "gauss_legendre", "midpoint", "adaptive", "adaptive_gauss_legendre",
           "select_nodes"]


@dataclass(frozen=True)
class Quadrature:
    """A fixed rule: nodes α_k ∈ [0, 1] and weights w_k with Σ_k w_k = 1 (tuples of floats)."""

    name: str
    nodes: tuple[float, ...]
    weights: tuple[float, ...]

    def __post_init__(self):
        if len(self.nodes) != len(self.weights) or not self.nodes:
            raise ValueError("a quadrature rule needs as many weights as nodes, and at least one node")
        if not all(0.0 <= a <= 1.0 for a in self.nodes):
            raise ValueError(f"quadrature nodes must lie in [0, 1], got {self.nodes}")

    @property
    def num_nodes(self) -> int:
        return len(self.nodes)

    def on_interval(self, a: float, b: float) -> list[tuple[float, float]]:
        """(node, weight) pairs of the rule mapped from [0, 1] to [a, b]."""
        h = b - a
        return [(a + h * x, h * w) for x, w in zip(self.nodes, self.weights)]

    def describe(self) -> str:
        return self.name


@dataclass(frozen=True)
class AdaptiveQuadrature:
    """Composite rule: on a segment [a, b] try the rules of ``orders`` (Gauss–Legendre orders, lowest
    first; none given: ``base`` alone) and accept the first with max |f(θ(b)) − f(θ(a)) − Φ_[a,b] Δθ| ≤
    tol · (b − a); if none does, bisect [a, b] and start again on each half.

    A segment is also accepted when its residual is below the rounding noise of f(θ(a)), f(θ(b)), or
    at depth ``max_depth``. Where the integrand is smooth, the accepted segments add up to a per-step
    error ≤ tol on every test input and output. Where it has a kink (a ReLU pre-activation crossing 0
    inside the step) no rule converges fast: the segment holding the kink is accepted at depth
    ``max_depth`` with an error ∝ |jump of ∂_α f| · 2^-max_depth, so the per-step bound is
    tol + Σ_kinks O(|jump| · 2^-max_depth), not tol. The residual is computed and reported either way
    (``Influence.step_residuals``); ``tests/test_relu_models.py`` states the tolerance this gives.
    """

    base: Quadrature
    tol: float
    max_depth: int = 30
    orders: tuple[int, ...] = ()

    @property
    def name(self) -> str:
        if self.orders:
            return f"adaptive_gauss_legendre({','.join(map(str, self.orders))}, tol={self.tol:g})"
        return f"adaptive({self.base.name}, tol={self.tol:g})"

    @property
    def rules(self) -> tuple[Quadrature, ...]:
        """The fixed rules tried on every segment, in order (p-refinement)."""
        return tuple(gauss_legendre(n) for n in self.orders) if self.orders else (self.base,)

    def describe(self) -> str:
        return self.name


@lru_cache(maxsize=64)
def _gauss_legendre_cached(n: int) -> Quadrature:
    x, w = np.polynomial.legendre.leggauss(n)
    nodes = tuple(float(v) for v in (x + 1.0) / 2.0)
    weights = tuple(float(v) for v in w / 2.0)
    return Quadrature(f"gauss_legendre({n})", nodes, weights)


def gauss_legendre(n: int = 8) -> Quadrature:
    """Gauss–Legendre rule with ``n`` nodes on [0, 1]; exact for polynomials of degree ≤ 2n − 1."""
    if int(n) != n or n < 1:
        raise ValueError(f"gauss_legendre needs a positive integer number of nodes, got {n!r}")
    return _gauss_legendre_cached(int(n))


def midpoint(n: int = 100) -> Quadrature:
    """The paper's midpoint rule: nodes (k + 1/2) / n, weights 1 / n; exact only for degree ≤ 1."""
    if int(n) != n or n < 1:
        raise ValueError(f"midpoint needs a positive integer number of nodes, got {n!r}")
    n = int(n)
    return Quadrature(f"midpoint({n})", tuple((k + 0.5) / n for k in range(n)), tuple(1.0 / n for _ in range(n)))


def adaptive(base: Quadrature | None = None, tol: float = 1e-10, max_depth: int = 30) -> AdaptiveQuadrature:
    """Adaptive composite quadrature on the exact step residual (default base: ``gauss_legendre(8)``):
    per-step error ≤ ``tol`` where f is smooth along the step, plus O(jump · 2^-max_depth) per kink
    (see :class:`AdaptiveQuadrature`)."""
    if tol <= 0:
        raise ValueError(f"adaptive quadrature needs a positive tolerance, got {tol!r}")
    return AdaptiveQuadrature(base or gauss_legendre(8), float(tol), int(max_depth))


def adaptive_gauss_legendre(tol: float = 1e-10, orders: tuple[int, ...] = (1, 2, 4, 8, 16),
                            max_depth: int = 30) -> AdaptiveQuadrature:
    """hp-adaptive Gauss–Legendre: per step (and per segment), the first order in ``orders`` whose step
    residual max_{x,o} |f(θ(b)) − f(θ(a)) − Φ_[a,b] Δθ_t| is ≤ ``tol`` · (b − a); bisection where even the
    last order is not (a kink). Smooth steps take few nodes (a short step often 1 or 2), so cost follows
    the difficulty of each step; ``Influence.nodes_per_step`` records what each step used. The total
    residual is ≤ N · tol on smooth runs (N steps)."""
    if tol <= 0:
        raise ValueError(f"adaptive quadrature needs a positive tolerance, got {tol!r}")
    orders = tuple(int(n) for n in orders)
    if not orders or any(n < 1 for n in orders) or list(orders) != sorted(set(orders)):
        raise ValueError(f"orders must be increasing positive integers, got {orders!r}")
    return AdaptiveQuadrature(gauss_legendre(orders[-1]), float(tol), int(max_depth), orders)


def select_nodes(quadrature: AdaptiveQuadrature, probe, target_at, f_a, f_b) -> tuple[list[tuple[float, float]], int]:
    """The composite nodes (α, w) on [0, 1] that ``quadrature`` accepts for one step.

    ``probe(alphas)`` returns Φ(α_k) Δθ_t stacked over the nodes (a tensor (k, X, O), from JVPs along Δθ_t);
    ``target_at(α)`` returns f(θ_t + α Δθ_t) (X, O); ``f_a``, ``f_b`` are f at α = 0 and 1. Returns the
    accepted nodes and the number of probe evaluations spent. A segment is accepted with the first order
    whose residual is ≤ tol · (b − a). Below the rounding noise of f(θ(a)), f(θ(b)) the residual no longer
    measures the quadrature error, so there an order is accepted only once two consecutive orders (or the
    last one) are at the noise — the quadrature has converged to the rounding floor, and bisecting or
    raising the order further would not lower it. A segment is also accepted at depth ``max_depth``.
    """
    accepted: list[tuple[float, float]] = []
    evaluations = 0
    stack = [(0.0, 1.0, f_a, f_b, 0)]
    eps = None
    while stack:
        a, b, fa, fb, depth = stack.pop()
        if eps is None:
            import torch  # local: quadrature rules themselves are plain floats

            eps = torch.finfo(fa.dtype).eps
        noise = 64 * eps * (1 + float(fa.abs().max().maximum(fb.abs().max())))
        chosen, previous_at_noise = None, False
        rules = quadrature.rules
        for index, rule in enumerate(rules):
            pairs = rule.on_interval(a, b)
            values = probe([alpha for alpha, _ in pairs])
            evaluations += len(pairs)
            predicted = sum(w * values[k] for k, (_, w) in enumerate(pairs))
            err = float((fb - fa - predicted).abs().max())
            chosen = pairs
            at_noise = err <= noise
            if err <= quadrature.tol * (b - a) or (at_noise and (previous_at_noise or index == len(rules) - 1)):
                break
            previous_at_noise = at_noise
        else:
            if depth < quadrature.max_depth:
                mid = 0.5 * (a + b)
                f_mid = target_at(mid)
                stack.append((a, mid, fa, f_mid, depth + 1))
                stack.append((mid, b, f_mid, fb, depth + 1))
                continue
        accepted.extend(chosen)
    accepted.sort()
    return accepted, evaluations
