"""The adjoint of MATH.md §12, machine-checked with sympy: it equals the forward form of §4.

Forward (§4, the library's kernels ``buffer_step`` / ``unit_update``): buffer_t(u) = A_t buffer_{t−1}(u) +
C_t grad_t(u), update_t(u) = −(D_t buffer_t(u) + E_t grad_t(u)); the total influence of unit u is
Σ_t Φ_t update_t(u). Adjoint (the library's ``feed_adjoint`` / ``unit_covector`` / ``propagate_adjoint``):
λ_{N−1} = Φ_{N−1} D_{N−1}, λ_s = Φ_s D_s + λ_{s+1} A_{s+1}, κ_s = λ_s C_s + Φ_s E_s, total −Σ_s ⟨κ_s, grad_s(u)⟩.

Proved for N = 1..5 steps with symbolic A, C, D, E, Φ and gradients, coordinate-wise (scalars) and general
linear (2 × 2 symbolic matrices, transposed through the ``transposed`` attribute), with every pattern of
skipped steps (A = 1, C = D = E = 0) for N ≤ 4, and for the reverse block scan of
:mod:`explaind_math.engine.distributed`: L_r = O_r + P_r(L_{r+1}) over every split of N = 5 steps into 2 and 3
blocks, own parts plus the incoming λ's part equal the sequential totals, exactly.
"""

from __future__ import annotations

import itertools

import sympy as sp

from explaind_math.engine.distributed import block_of_rank
from explaind_math.optimizers.template import (StepCoefficients, buffer_step, feed_adjoint, propagate_adjoint,
                                               unit_covector, unit_update)


class MatrixMap:
    """A general linear coefficient: x ↦ M x, with its transpose (what the adjoint applies to covectors)."""

    def __init__(self, M: sp.Matrix):
        self.M = M
        self.transposed = lambda x: M.T * x

    def __call__(self, x):
        return self.M * x


def tables(N: int, skipped: tuple[bool, ...], size: int):
    """Per step: (coefficients, Φ_s as a column covector, grad_s(u) for 2 units); symbols throughout."""
    out = []
    for s in range(N):
        def sym(name):
            if size == 1:
                return sp.Symbol(f"{name}{s}")
            return MatrixMap(sp.Matrix(size, size, lambda i, j: sp.Symbol(f"{name}{s}_{i}{j}")))
        phi = sp.Symbol(f"phi{s}") if size == 1 else sp.Matrix(size, 1, lambda i, _: sp.Symbol(f"phi{s}_{i}"))
        grads = [sp.Symbol(f"g{s}_{u}") if size == 1 else sp.Matrix(size, 1, lambda i, _: sp.Symbol(f"g{s}_{u}_{i}"))
                 for u in range(2)]
        if skipped[s]:
            c = StepCoefficients(A=1, C=0, D=0, E=0)
        else:
            c = StepCoefficients(A=sym("A"), C=sym("C"), D=sym("D"), E=sym("E"))
        out.append((c, phi, grads))
    return out


def dot(a, b):
    return a * b if not isinstance(a, sp.MatrixBase) else (a.T * b)[0, 0]


def forward_total(table, u: int, size: int):
    zero = 0 if size == 1 else sp.zeros(size, 1)
    buffer, total = zero, 0
    for c, phi, grads in table:
        if c.C == 0 and c.D == 0:  # a skipped parameter: PyTorch leaves it (and its buffer) untouched
            continue
        buffer = buffer_step(buffer, grads[u], c)
        total += dot(phi, unit_update(buffer, grads[u], c))
    return sp.expand(total)


def adjoint_totals(table, steps, size: int, incoming=None, with_phi: bool = True):
    """The backward pass over ``steps``: (the per-unit totals, λ carried out of the first step)."""
    lam = incoming if incoming is not None else (0 if size == 1 else sp.zeros(size, 1))
    totals = [0, 0]
    for s in reversed(steps):
        c, phi, grads = table[s]
        lam = feed_adjoint(lam, c.D, phi if with_phi else None)
        kappa = unit_covector(lam, phi if with_phi else None, c)
        for u in range(2):
            if not (isinstance(kappa, int) and kappa == 0):
                totals[u] -= dot(kappa, grads[u])
        lam = propagate_adjoint(lam, c.A)
    return [sp.expand(t) for t in totals], lam


def check_equal(N: int, skipped, size: int) -> None:
    table = tables(N, skipped, size)
    adjoint, _ = adjoint_totals(table, range(N), size)
    for u in range(2):
        assert sp.expand(adjoint[u] - forward_total(table, u, size)) == 0, (N, skipped, size, u)


def test_adjoint_equals_forward_coordinatewise_with_skipped_steps():
    for N in range(1, 6):
        patterns = itertools.product([False, True], repeat=N) if N <= 4 else [(False,) * N, (False, True, False, True, False)]
        for skipped in patterns:
            check_equal(N, skipped, 1)


def test_adjoint_equals_forward_for_matrix_coefficients():
    for N, skipped in [(1, (False,)), (2, (False, False)), (3, (False, True, False)), (4, (False,) * 4)]:
        check_equal(N, skipped, 2)


def test_reverse_block_scan_equals_the_sequential_recursion():
    N = 5
    for size in (1, 2):
        table = tables(N, (False, True, False, False, False), size)
        expected, lam_expected = adjoint_totals(table, range(N), size)
        for world in (2, 3):
            blocks = [block_of_rank(N, world, r) for r in range(world)]
            own = [adjoint_totals(table, b, size) for b in blocks]  # O_r: each block from λ = 0
            totals, carried = [0, 0], None
            for r in reversed(range(world)):  # L_r = O_r + P_r(L_{r+1}); block r adds L_{r+1}'s part
                part, lam_own = own[r]
                if carried is not None:
                    incoming_part, propagated = adjoint_totals(table, blocks[r], size, incoming=carried,
                                                               with_phi=False)
                    part = [a + b for a, b in zip(part, incoming_part)]
                    lam_own = lam_own + propagated
                totals = [a + b for a, b in zip(totals, part)]
                carried = lam_own
            for u in range(2):
                assert sp.expand(totals[u] - expected[u]) == 0, (size, world, u)
            assert sp.expand(carried - lam_expected) == (0 if size == 1 else sp.zeros(size, 1))


if __name__ == "__main__":
    test_adjoint_equals_forward_coordinatewise_with_skipped_steps()
    test_adjoint_equals_forward_for_matrix_coefficients()
    test_reverse_block_scan_equals_the_sequential_recursion()
    print("adjoint = forward (§4, §12) and the reverse block scan = the sequential recursion: proved")
