"""How a decomposition is computed: one options object, documented once (MATH.md §1, §11).

Nothing here changes *what* is decomposed (that is the theorem: the trajectory, the loss, the target h or
activation, the partition, a loss penalty); every option changes only how the exact answer is computed,
and every choice is exact (or, for ``decompose_steps``-style subsampling elsewhere, labelled otherwise).

Every theorem function accepts ``options=DecompositionOptions(...)``, the same fields as keywords, or both
(keywords override the object's fields)::

    opts = DecompositionOptions(quadrature=gauss_legendre(4), keep=("param", "test", "output"))
    decompose_adamw_training(model, traj, loss_fn, data, xs, options=opts, dtype=torch.float64)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterable, Mapping

import torch

from ..errors import ExplaindError

__all__ = ["ACCUMULATIONS", "BATCH_CONTRACTIONS", "DEFAULT_KEEP", "DecompositionOptions", "resolve_options",
           "split_option_keywords"]

#: how the per-unit influences are accumulated over the steps (MATH.md §4 forward, §12 adjoint)
ACCUMULATIONS = ("auto", "forward", "adjoint")

#: how the adjoint contracts a step's batch with its covectors (MATH.md §12)
BATCH_CONTRACTIONS = ("auto", "jvp", "gradients")

#: the five axes of the atomic tensor I[t, j, x, i, o] (MATH.md §5), all kept by default
DEFAULT_KEEP = ("step", "param", "test", "unit", "output")


@dataclass(frozen=True)
class DecompositionOptions:
    """The computational choices of a decomposition (none changes the mathematics).

    Attributes:
        quadrature: the rule for Φ_t(x) = ∫_0^1 ∂_θ f(x; θ_t + α Δθ_t) dα (MATH.md §1): ``gauss_legendre(8)``
            by default; ``midpoint(n)``; ``adaptive(...)`` / ``adaptive_gauss_legendre(tol)`` for ReLU models.
        keep: axes to keep among ``("step", "param", "test", "unit", "output")`` (MATH.md §5); test and
            output are always kept. Leaving out "param" and "unit" switches to forward-mode JVPs (cheapest).
        params: granularity of the parameter axis: ``"tensor"``, ``"module"``, ``"coordinate"`` (the atomic
            j), ``"all"``, or a mapping parameter name → group label.
        dtype: computation dtype (default: the trajectory's); ``torch.float64`` to verify.
        device: computation device (default: the model's).
        replay_rtol: tolerance of the replay check Σ_u update_t(u) = Δθ_t, relative to max |Δθ_t| per tensor
            (default: 1e-8 for float64, 1e-4 for float32/16).
        contraction: ``"auto"`` (per step the cheaper exact way by counted costs, MATH.md §11),
            ``"measured"`` (by costs timed on this machine; the choice may differ between runs),
            ``"jvp"`` or ``"jacobian"``.
        memory_budget: bytes or a string like ``"4GiB"``: test inputs, samples and JVP tangents go in
            chunks that fit; an error names what cannot fit at all.
        test_chunk_size, train_chunk_size: set those chunks directly (test inputs, training samples).
        node_chunk_size: quadrature nodes evaluated in one vmapped call (default: as many as fit, up to 16;
            1: one call per node).
        vectorize: per-sample gradients by ``vmap(grad)`` (True) or a loop over samples (False, for models
            vmap cannot batch).
        progress: a tqdm progress bar over the steps (None: when tqdm is installed and stderr is a terminal).
        distributed: ``True`` or a ``torch.distributed`` process group: one block of steps per rank, the
            optimizer buffers carried across blocks by an exact scan (launch with ``torchrun``).
        accumulation: ``"forward"`` (the §4 recursion, one buffer per unit: M · D memory, every unit seen
            contracted at every step), ``"adjoint"`` (MATH.md §12: the transposed recursion run backward with
            λ_s, O · X × D memory, only each step's batch contracted; needs "unit" kept and the update step
            "step" summed; keep ``"origin_step"`` for the step at which a unit's gradient was computed) or
            ``"auto"`` (the adjoint where the kept axes allow it and its counted cost is lower, or the forward
            recursion does not fit ``memory_budget``). ``result.accumulation`` says which ran.
        batch_contraction: how the adjoint contracts each step's batch with the O · X covector rows κ_s of
            λ_s C_s + Φ_s E_s (MATH.md §12): ``"gradients"`` (the per-sample gradients by vmap∘grad, B · D
            numbers, then a matrix product), ``"jvp"`` (one forward-mode JVP of the vector of the batch's
            per-sample losses along each row κ, batched over the rows with vmap: the B · D gradients are never
            formed) or ``"auto"`` (per step the cheaper by counted cost, or the JVP path when ``memory_budget``
            cannot hold one batch's per-sample gradients; gradients per coordinate or without forward-mode AD).
            Both are exact; the forward recursion always forms the per-sample gradients (its buffers need them).
    """

    quadrature: Any = None
    keep: tuple[str, ...] = DEFAULT_KEEP
    params: str | Mapping[str, str] = "tensor"
    dtype: torch.dtype | None = None
    device: torch.device | str | None = None
    replay_rtol: float | None = None
    contraction: str = "auto"
    memory_budget: int | str | None = None
    test_chunk_size: int | None = None
    train_chunk_size: int | None = None
    node_chunk_size: int | None = None
    vectorize: bool = True
    progress: bool | None = None
    distributed: Any = None
    accumulation: str = "auto"
    batch_contraction: str = "auto"

    def __post_init__(self):
        if isinstance(self.keep, str):
            raise ExplaindError(f"keep must be a sequence of axis names, got the string {self.keep!r}")
        object.__setattr__(self, "keep", tuple(self.keep))
        if self.accumulation not in ACCUMULATIONS:
            raise ExplaindError(f"accumulation must be one of {ACCUMULATIONS}, got {self.accumulation!r}")
        if self.batch_contraction not in BATCH_CONTRACTIONS:
            raise ExplaindError(f"batch_contraction must be one of {BATCH_CONTRACTIONS}, got {self.batch_contraction!r}")

    def replace(self, **changes) -> "DecompositionOptions":
        """A copy with some fields changed (unknown names are an error naming them)."""
        return resolve_options(self, changes)


_FIELDS = tuple(f.name for f in dataclasses.fields(DecompositionOptions))


def resolve_options(options: DecompositionOptions | None, keywords: Mapping[str, Any]) -> DecompositionOptions:
    """``options`` (or the defaults) with the given keywords overriding its fields.

    Raises:
        TypeError: a keyword that is not an option, named, with the list of options.
    """
    if options is None:
        options = DecompositionOptions()
    elif not isinstance(options, DecompositionOptions):
        raise TypeError(f"options must be a DecompositionOptions, got {type(options).__name__}")
    unknown = sorted(set(keywords) - set(_FIELDS))
    if unknown:
        raise TypeError(f"unknown decomposition option(s) {unknown}; the options are {list(_FIELDS)}")
    return dataclasses.replace(options, **keywords) if keywords else options


def split_option_keywords(keywords: Mapping[str, Any]) -> tuple[dict, dict]:
    """(the options among ``keywords``, the rest): a theorem function that forwards both — the target's
    arguments (``h``, ``test_labels``, ``activation``, ``partition``, ``penalty``) and the options — to the
    engine, but reads an option itself, resolves only the first part."""
    options = {k: v for k, v in keywords.items() if k in _FIELDS}
    return options, {k: v for k, v in keywords.items() if k not in _FIELDS}


def keep_axes(keep: Iterable[str]) -> tuple[str, ...]:
    """The kept axes with test and output added (the certificate is per prediction)."""
    return tuple(dict.fromkeys((*keep, "test", "output")))
