"""The engine held to the specification: compare an engine result with a theorem's reference implementation.

The reference implementations (``explaind_math.theorems.*.reference_*``) transcribe each theorem literally
with torch.func and return the full atomic tensors I[t, j, x, i, o] and Ψ[t, j, x, o] (MATH.md §5). The
engine, run with every axis kept and ``params="coordinate"``, computes the same tensors by other means
(buffers per unit, chunked contractions, JVPs or Jacobians). With the same Gauss–Legendre nodes in both,
the two differ by rounding only:

    max |I_engine − I_reference| ≤ REFERENCE_RTOL · Σ |I_reference|        (and the same for Ψ)
"""

from __future__ import annotations

import torch

from .residuals import LIVE_MODEL_RTOL, assert_close, report_residual

__all__ = ["REFERENCE_RTOL", "ATOMIC_AXES", "assert_engine_equals_reference", "reference_relative_residual"]

#: engine against reference, entrywise, relative to the L1 mass of the reference's tensor
REFERENCE_RTOL = 1e-12
#: the axes the engine must keep for an entrywise comparison
ATOMIC_AXES = ("step", "param", "test", "unit", "output")


def _relative_to_mass(actual: torch.Tensor, expected: torch.Tensor, what: str) -> float:
    assert actual.shape == expected.shape, f"{what}: engine shape {tuple(actual.shape)}, reference {tuple(expected.shape)}"
    assert torch.isfinite(actual).all() and torch.isfinite(expected).all(), f"{what}: non-finite entries"
    mass = float(expected.abs().sum())
    error = float((actual - expected).abs().max()) if actual.numel() else 0.0
    assert error <= REFERENCE_RTOL * mass, (
        f"{what}: max |engine − reference| = {error:.3e} > {REFERENCE_RTOL:.0e} · L1 mass {mass:.3e}")
    return error / mass if mass > 0 else 0.0


def assert_engine_equals_reference(engine, reference, theorem: str, family: str) -> float:
    """The engine's :class:`~explaind_math.Influence` (every axis kept, ``params="coordinate"``) equals the
    reference's :class:`~explaind_math.theorems.reference.ReferenceDecomposition` entrywise, I and Ψ each to
    :data:`REFERENCE_RTOL` of its L1 mass; f(x; θ_0), f(x; θ_N) and the axis labels agree. Returns the worst
    relative difference (logged as "engine against reference")."""
    assert engine.kernel_axes == ATOMIC_AXES, f"the engine kept {engine.kernel_axes}, the comparison needs all axes"
    assert engine.units == reference.units, f"unit axes differ: {engine.units} vs {reference.units}"
    assert engine.param_labels == reference.param_labels, "parameter axes differ (params='coordinate' needed)"
    assert engine.carried_state is None and engine.penalty is None, "the references cover no carried state or penalty"
    assert_close(engine.f_initial, reference.f_initial, LIVE_MODEL_RTOL, "f(x; θ_0): engine against reference")
    assert_close(engine.f_final, reference.f_final, LIVE_MODEL_RTOL, "f(x; θ_N): engine against reference")
    worst = max(_relative_to_mass(engine.kernel, reference.kernel, f"{theorem}: kernel influence I"),
                _relative_to_mass(engine.regularization, reference.regularization,
                                  f"{theorem}: regularization influence Ψ"))
    report_residual(theorem, family, worst, "engine against reference (relative to L1 mass)", steer=False)
    return worst


def reference_relative_residual(reference) -> float:
    """max |f(θ_0) + Σ I + Σ Ψ − f(θ_N)| / (1 + |f(θ_N) − f(θ_0)|) of a reference decomposition (the measure
    of :func:`~explaind_math.testing.residuals.assert_exact`)."""
    scale = 1 + (reference.f_final - reference.f_initial).abs()
    return float((reference.residual.abs() / scale).max())
