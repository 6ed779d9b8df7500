"""Named tolerances, the certificate checks of an exact decomposition, and a residual log.

The measure is MATH.md's: for every test input x and output o,

    |f_o(x; θ_0) + Σ I + Σ Ψ − f_o(x; θ_N)|  ≤  tol · (1 + |f_o(x; θ_N) − f_o(x; θ_0)|)

which is ``Influence.relative_residual ≤ tol``. :func:`check_certificate` also checks that the
decomposition's f(x; θ_0) and f(x; θ_N) equal the live model's outputs and that the replay check
(Σ_u update_t(u) = θ_{t+1} − θ_t) held to :data:`REPLAY_RTOL`.
"""

from __future__ import annotations

import json
import math
import os
import threading
from collections import defaultdict
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..influence import Influence
    from .strategies import TrainedRun

__all__ = [
    "SMOOTH_RTOL",
    "POLYNOMIAL_RTOL",
    "LIVE_MODEL_RTOL",
    "REPLAY_RTOL",
    "CONTRACTION_RTOL",
    "ResidualLog",
    "RESIDUALS",
    "report_residual",
    "assert_exact",
    "check_certificate",
    "replay_rounding_floor",
    "check_skipped_parameters",
    "assert_close",
]

#: smooth models (tanh, GELU, CNN, attention) with 8 Gauss–Legendre nodes, float64
SMOOTH_RTOL = 1e-9
#: deep linear networks with gauss_legendre(ceil(L/2)): the quadrature is exact, only rounding remains
POLYNOMIAL_RTOL = 1e-12
#: f(x; θ_0), f(x; θ_N) of the decomposition against the live model's batched forward pass
LIVE_MODEL_RTOL = 1e-12
#: Influence.max_replay_error: |Σ_u update_t(u) − Δθ_t| / max |Δθ_t| per tensor, float64
REPLAY_RTOL = 1e-10
#: two contractions of the same atomic tensor (different kept axes or parameter groupings)
CONTRACTION_RTOL = 1e-12


class ResidualLog:
    """Residuals achieved, per (theorem, model family, quantity): the largest value and the count.

    ``summary()`` gives a table; when the environment variable ``EXPLAIND_RESIDUAL_LOG`` names a file,
    :meth:`dump` merges the maxima into that JSON file (so several pytest modules can share it).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._max: dict[tuple[str, str, str], float] = defaultdict(float)
        self._count: dict[tuple[str, str, str], int] = defaultdict(int)
        self._dumped: dict[tuple[str, str, str], int] = defaultdict(int)

    def add(self, theorem: str, family: str, value: float, quantity: str = "relative residual") -> None:
        key = (theorem, family, quantity)
        with self._lock:
            self._max[key] = max(self._max[key], float(value))
            self._count[key] += 1

    def maxima(self) -> dict[tuple[str, str, str], float]:
        return dict(self._max)

    def summary(self) -> str:
        if not self._max:
            return "(no residuals recorded)"
        rows = [f"{'theorem':34s} {'family':36s} {'quantity':44s} {'n':>4s} {'max':>10s}"]
        for key in sorted(self._max):
            theorem, family, quantity = key
            rows.append(f"{theorem:34s} {family:36s} {quantity:44s} {self._count[key]:4d} {self._max[key]:10.2e}")
        return "\n".join(rows)

    def dump(self, path: str | None = None) -> None:
        path = path or os.environ.get("EXPLAIND_RESIDUAL_LOG")
        if not path:
            return
        try:
            with open(path) as fh:
                existing = json.load(fh)
        except (OSError, ValueError):
            existing = {}
        for key, value in self._max.items():
            k = " | ".join(key)
            new = self._count[key] - self._dumped[key]  # counts not yet written by this process
            self._dumped[key] = self._count[key]
            old = existing.get(k, {})
            existing[k] = {"max": max(value, old.get("max", 0.0)), "n": new + old.get("n", 0)}
        with open(path, "w") as fh:
            json.dump(existing, fh, indent=1, sort_keys=True)


#: the process-wide log the test suite writes to
RESIDUALS = ResidualLog()


def _forward_to_verification(theorem: str, value: float) -> None:
    """Hand a reconstruction residual to the verification command's registry when ``theorem`` names
    one of its rows (a key, alias or library label such as ``Influence.theorem``)."""
    try:
        from ..verification import known_key, record_residual  # optional: the registry of `verify`
    except ImportError:
        return
    key = known_key(theorem)
    if key is not None:
        record_residual(key, float(value))


def report_residual(theorem: str, family: str, value: float, quantity: str = "relative residual",
                    steer: bool = True) -> None:
    """Log a residual per (theorem, family, quantity); forward reconstruction residuals of the two
    theorems to ``explaind_math.verification.record_residual`` (when the label names a row); and (inside a
    Hypothesis test, with ``steer``) ``hypothesis.target`` log10 of it, so the search moves towards
    larger residuals."""
    RESIDUALS.add(theorem, family, value, quantity)
    if quantity.startswith("relative residual"):  # negative controls are named "negative control: …"
        _forward_to_verification(theorem, value)
    if steer:
        try:
            from hypothesis import target
            from hypothesis.errors import InvalidArgument

            try:
                target(math.log10(float(value) + 1e-300), label=f"log10 {quantity}")
            except InvalidArgument:  # outside @given, or the label was already used in this example
                pass
        except ImportError:  # pragma: no cover
            pass


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, what: str) -> float:
    """max |actual − expected| / (1 + |expected|) ≤ rtol, elementwise; returns the measured value."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values {actual}"
    err = float(((actual - expected).abs() / (1 + expected.abs())).max()) if actual.numel() else 0.0
    assert err <= rtol, f"{what}: relative difference {err:.3e} > {rtol:.0e}"
    return err


def _to_test_output(tensor: torch.Tensor, axes) -> torch.Tensor:
    dims = [i for i, a in enumerate(axes) if a not in ("test", "output")]
    return tensor.sum(dim=dims) if dims else tensor


def assert_exact(result: "Influence", rtol: float, what: str = "reconstruction") -> float:
    """|f(θ_0) + Σ I + Σ (pseudo-units) − f(θ_N)| ≤ rtol (1 + |f(θ_N) − f(θ_0)|) elementwise; returns the measure."""
    assert torch.isfinite(result.reconstruction).all(), f"{what}: the reconstruction is not finite"
    rel = result.relative_residual
    # recompute the measure from the parts, so a wrong Influence.relative_residual cannot hide a failure
    parts = _to_test_output(result.kernel, result.kernel_axes)
    for name in ("regularization", "carried_state", "penalty", "gradient_rounding"):
        tensor = getattr(result, name, None)
        if tensor is not None:
            parts = parts + _to_test_output(tensor, result.regularization_axes)
    scale = 1 + (result.f_final - result.f_initial).abs()
    independent = (result.f_initial + parts - result.f_final).abs() / scale
    # the two sum the same parts in different orders: they may differ by rounding (seen: 0 vs 1.1e-15)
    assert abs(float(independent.max()) - rel) <= 1e-13 + 1e-6 * rel, (
        f"{what}: Influence.relative_residual {rel:.3e} disagrees with the recomputed {float(independent.max()):.3e}")
    assert rel <= rtol, (
        f"{what}: relative residual {rel:.3e} > {rtol:.0e} (max |residual| {result.max_residual:.3e}, "
        f"per-step {result.step_residuals.abs().amax(dim=(1, 2)).tolist()}, quadrature {result.quadrature})"
    )
    return rel


def replay_rounding_floor(trajectory) -> list[float]:
    """Per step, max over tensors of 16 ε max|θ| / max|Δθ_t|: the part of the relative replay error that
    is rounding of the RECORDED θ_{t+1} (stored as fl(θ_t + update), so Δθ_t carries ~ε|θ| absolute
    error however exact the replay). Negligible unless a step is tiny next to θ (an lr decayed by 10⁻⁵);
    it is the same floor the library's replay check adds to its tolerance."""
    eps = torch.finfo(trajectory.dtype).eps
    floors = []
    for t in range(trajectory.num_steps):
        worst = 0.0
        for n in trajectory.parameter_names:
            a, b = trajectory.parameters[t][n], trajectory.parameters[t + 1][n]
            if a.numel() == 0:
                continue
            scale = float((b - a).abs().max())
            if scale > 0:
                worst = max(worst, 16 * eps * max(float(a.abs().max()), float(b.abs().max())) / scale)
        floors.append(worst)
    return floors


def check_certificate(run: "TrainedRun", result: "Influence", rtol: float, *, family: str | None = None,
                      replay_rtol: float = REPLAY_RTOL) -> float:
    """Every check of an exact theorem on one recorded run; logs and returns the relative residual.

    1. f_initial = the live model's output before training, f_final = after (:data:`LIVE_MODEL_RTOL`);
    2. the replay check ran at every step and held: ``replay_errors[t] ≤ replay_rtol`` (plus
       :func:`replay_rounding_floor`, which is below 1e-12 unless a step is tiny next to θ);
    3. the reconstruction is exact: ``relative_residual ≤ rtol`` (:func:`assert_exact`);
    4. the theorem label matches the optimizer.
    """
    family = family or run.family
    assert result.theorem == run.theorem, f"result labelled {result.theorem!r}, run needs {run.theorem!r}"
    assert len(result.steps) == run.trajectory.num_steps
    assert_close(result.f_initial, run.f_before, LIVE_MODEL_RTOL, "f(x; θ_0) against the live model before training")
    assert_close(result.f_final, run.f_after, LIVE_MODEL_RTOL, "f(x; θ_N) against the live model after training")
    replay = result.max_replay_error
    assert len(result.replay_errors) == run.trajectory.num_steps, "the replay check did not run at every step"
    floors = replay_rounding_floor(run.trajectory)
    for t, (err, floor) in enumerate(zip(result.replay_errors, floors)):
        assert math.isfinite(err) and err <= replay_rtol + floor, (
            f"step {t}: replay error {err:.3e} > {replay_rtol:.0e} (+ rounding floor of the recorded Δθ {floor:.1e})")
    report_residual(result.theorem, family, replay, "replay error", steer=False)
    report_residual(result.theorem, family, max(max(e - f, 0.0) for e, f in zip(result.replay_errors, floors)),
                    "replay error beyond the rounding floor", steer=False)
    rel = result.relative_residual
    report_residual(result.theorem, family, rel, f"relative residual, {result.quadrature}")
    assert_exact(result, rtol)
    return rel


def check_skipped_parameters(run: "TrainedRun", result: "Influence") -> int:
    """A parameter whose ``.grad`` was None at step t is skipped by PyTorch (no decay, no moment update):
    θ_{t+1} = θ_t for it, and every influence through it at step t is exactly 0 (MATH.md §2).

    Needs a result with the step and parameter axes and ``params="tensor"``. Also checks that the
    recorder saw the freezing the schedule asked for. Returns how many (step, tensor) pairs were skipped.
    """
    traj = run.trajectory
    assert "step" in result.kernel_axes and "param" in result.kernel_axes
    assert result.param_labels == traj.parameter_names, "check_skipped_parameters needs params='tensor'"
    k_step, k_param = result.kernel_axes.index("step"), result.kernel_axes.index("param")
    r_param = result.regularization_axes.index("param")
    schedule = run.spec.schedule if run.spec is not None else None
    frozen_name = None
    if schedule is not None and schedule.frozen and len(list(run.model.parameters())) > 1:
        names = [n for n, _ in run.model.named_parameters()]
        frozen_name = names[schedule.frozen_param % len(names)]
    skipped = 0
    for t, step in enumerate(traj.steps):
        if frozen_name is not None and schedule.frozen[t]:
            assert frozen_name not in step.updated, f"step {t}: {frozen_name!r} was frozen but recorded as updated"
        for j, n in enumerate(traj.parameter_names):
            if n in step.updated:
                continue
            skipped += 1
            assert torch.equal(traj.parameters[t + 1][n], traj.parameters[t][n]), f"step {t}: skipped {n!r} moved"
            k = result.kernel.select(k_step, t).select(k_param - 1, j)
            r = result.regularization.select(0, t).select(r_param - 1, j)
            assert float(k.abs().max()) == 0.0 and float(r.abs().max()) == 0.0, (
                f"step {t}: parameter {n!r} received no gradient, yet carries influence "
                f"{float(k.abs().max()):.3e} / {float(r.abs().max()):.3e}")
    return skipped
