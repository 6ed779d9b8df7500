"""Which exact contraction to run for the axes the caller keeps, and in what chunks (MATH.md §11).

Per step t the kept influences are Φ_t(x) contracted with the updates of the kept directions: every unit
(when units are kept) or their sum, restricted to every kept parameter group, plus the pseudo-units. Two
exact ways compute them:

* ``"jvp"`` — one forward-mode JVP per direction v: Φ_t(x) v = ∫ J(x; θ_t(α)) v dα. Cost per test input and
  node: K directions × the cost of one. Memory: K tangents of size D.
* ``"jacobian"`` — the Jacobian J(x; θ) (one reverse pass per output: O × the cost of one), integrated to
  Φ_t(x), then contracted with every direction by a matrix product (O · D multiply–accumulates per
  direction). Memory: X · O · D.

``contraction="auto"`` decides with counted costs — one JVP direction and one reverse pass per output
count alike, and a multiply–accumulate of the Jacobian's contraction counts 1/(3 D) of a pass (a pass over
the model costs at least ~3 D multiply–accumulates) — so a decomposition is reproducible bit for bit from
run to run. ``contraction="measured"`` times the three unit costs on a few test inputs at θ_0 instead
(:func:`measure_path_costs`, milliseconds) and picks the faster way on this machine; the choice can then
differ between runs (both ways are exact; the results differ by rounding only).

On the Jacobian path the quadrature nodes of a step are evaluated a chunk at a time in one vmapped call
(``node_chunk`` nodes: their Jacobians stacked, node_chunk · X_c · O · D numbers), which saves
torch.func's per-call cost (measured on CPU: the Jacobians of 8 nodes of the mod-23 Transformer in
25.6 ms vs 49.5 ms one call per node; small models gain most). Without a memory budget the stacked
Jacobians of a chunk are kept under ``DEFAULT_NODE_CHUNK_BYTES``; with one, under the budget's share.

The full atomic tensor I[t, j, x, i, o] is materialized only when asked for (``params="coordinate"`` with
every axis kept); otherwise only the kept axes are ever held, plus the per-unit buffers of the rule.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass

import torch

from ..errors import ExplaindError
from .options import BATCH_CONTRACTIONS

__all__ = ["ContractionPlan", "PathCosts", "MemoryBudgetError", "parse_memory_budget", "plan_contraction", "chunks",
           "bytes_of", "scaled_in_place", "measure_path_costs", "plan_adjoint", "AccumulationCosts",
           "count_accumulation_costs", "BATCH_CONTRACTIONS", "batch_contraction_costs"]

# Stacked Jacobians of one node chunk, without a memory budget. Measured on bench_scaling's MLP (2 CPU
# cores): chunks of up to 32 MiB were as fast as one node at a time or faster (up to 1.7×), chunks of
# 88 MB up to 1.6× slower (each is then mapped fresh by the allocator, above glibc's mmap threshold).
DEFAULT_NODE_CHUNK_BYTES = 32 * 2**20
MAX_NODE_CHUNK = 16  # beyond this, batching more nodes into one call gains little
MIN_NODE_BATCH = 3  # a step with fewer nodes takes them one at a time (2 nodes batched: no faster on CPU)

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "tb": 10**12}


class MemoryBudgetError(ExplaindError):
    """What must be held at once (per-unit buffers, kept axes) does not fit the caller's memory budget."""


def parse_memory_budget(budget: int | float | str | None) -> int | None:
    """Bytes from a number or a string such as ``"4GiB"``, ``"500MB"`` (None: no budget)."""
    if budget is None:
        return None
    if isinstance(budget, (int, float)):
        value = int(budget)
    else:
        match = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(budget))
        if not match or match.group(2).lower() not in _UNITS:
            raise ExplaindError(f"memory_budget must be bytes or a string like '4GiB' or '500MB', got {budget!r}")
        value = int(float(match.group(1)) * _UNITS[match.group(2).lower()])
    if value <= 0:
        raise ExplaindError(f"memory_budget must be positive, got {budget!r}")
    return value


@dataclass(frozen=True)
class PathCosts:
    """Costs of the two ways, per test input and node: one JVP direction, one output's reverse pass of the
    Jacobian, one multiply–accumulate of the Jacobian's contraction (seconds when measured, else passes)."""

    per_direction: float
    per_output: float
    per_mac: float
    measured: bool = True

    @classmethod
    def counted(cls, num_params: int) -> "PathCosts":
        """The deterministic default: a JVP direction = a reverse pass = 1, a contraction MAC = 1 / (3 D)."""
        return cls(1.0, 1.0, 1.0 / (3.0 * max(1, num_params)), measured=False)

    def describe(self) -> str:
        if not self.measured:
            return "costs counted (JVP direction = reverse pass; a contraction MAC = 1/(3D) pass)"
        return (f"measured: JVP {self.per_direction * 1e6:.0f} µs/direction, Jacobian {self.per_output * 1e6:.0f} "
                f"µs/output, contraction {self.per_mac * 1e9:.2f} ns/MAC")


def measure_path_costs(fm, params, xs, labels, num_outputs: int, directions: int = 8) -> PathCosts:
    """Time at θ_0, on the test inputs ``xs`` (a few), a JVP with ``directions`` directions, the Jacobian, and
    a matrix product (best of 3 after a warm-up): the constants of :meth:`ContractionPlan.mode_for_step`, per
    test input. Measured on batches like the real ones, so that torch.func's per-call overhead is shared as
    it is there (on one input and few directions it dominates and misjudges the JVP path). Milliseconds."""
    device = next(iter(params.values())).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    # constant values: timing does not depend on them, and the caller's random stream stays untouched
    tangents = {n: torch.full((directions, *v.shape), 0.5, dtype=v.dtype, device=device) for n, v in params.items()}
    a = torch.full((256, 256), 0.5, dtype=next(iter(params.values())).dtype, device=device)
    b = torch.full((256, 64), 0.5, dtype=a.dtype, device=device)

    def best(fn) -> float:
        fn()
        sync()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            sync()
            times.append(time.perf_counter() - t0)
        return min(times)

    count = xs.shape[0]
    per_direction = best(lambda: fm.directional(params, xs, labels, tangents)) / (directions * count)
    per_output = best(lambda: fm.jacobian(params, xs, labels)) / (max(1, num_outputs) * count)
    per_mac = best(lambda: a @ b) / (256 * 256 * 64)
    return PathCosts(per_direction, per_output, per_mac)


@dataclass
class ContractionPlan:
    """Chunk sizes and the rule that picks the contraction per step.

    Attributes:
        contraction: what the caller asked for: ``"auto"``, ``"measured"``, ``"jvp"`` or ``"jacobian"``.
        test_chunk: test inputs per chunk (every Jacobian or JVP batch holds at most this many).
        train_chunk: training samples per per-sample-gradient batch (None: the whole step's batch).
        tangent_chunk: JVP directions per batch (None: all at once).
        groupwise_jacobian: form the Jacobian one parameter group at a time (memory X · O · D_group).
        costs: the costs of the two ways (counted for ``"auto"``, timed for ``"measured"``; None: Jacobian only).
        budget: the memory budget in bytes, or None.
        per_coordinate: the parameter axis is the atomic j (only the Jacobian path is exact and sensible).
        node_chunk: quadrature nodes whose Jacobians are formed in one vmapped call (1: one call per node).
        min_node_batch: steps with fewer nodes than this take them one at a time.
        batch_contraction: the adjoint's contraction of a step's batch with the K covector rows κ_s
            (:meth:`batch_mode_for_step`): ``"gradients"`` (vmap∘grad, then a matrix product), ``"jvp"`` (one
            forward-mode JVP of the batch's per-sample losses per row, batched with vmap) or ``"auto"``.
        num_params: D, the trained parameters (the matrix product's multiply–accumulates per row and sample).
        forward_ad: forward-mode AD runs through the model (else ``"auto"`` never takes the JVP path).
    """

    contraction: str
    test_chunk: int
    train_chunk: int | None
    tangent_chunk: int | None
    groupwise_jacobian: bool
    costs: PathCosts | None
    budget: int | None
    per_coordinate: bool
    node_chunk: int = 1
    min_node_batch: int = MIN_NODE_BATCH
    batch_contraction: str = "gradients"
    num_params: int = 0
    forward_ad: bool = True

    def mode_for_step(self, directions: int, outputs: int, contraction_macs: float) -> str:
        """``"jvp"`` if K = ``directions`` JVPs cost less than O = ``outputs`` reverse passes plus the
        Jacobian's matrix products (``contraction_macs`` per test input), with the plan's costs."""
        if self.contraction in ("jvp", "jacobian"):
            return self.contraction
        if self.per_coordinate or self.costs is None:  # no costs: the target has no forward-mode AD
            return "jacobian"
        jvp_cost = directions * self.costs.per_direction
        jacobian_cost = outputs * self.costs.per_output + contraction_macs * self.costs.per_mac
        return "jvp" if jvp_cost <= jacobian_cost else "jacobian"

    def batch_mode_for_step(self, rows: int, groups: int, batch: int) -> str:
        """The adjoint's way to form ⟨grad_s(u), κ⟩ for the ``batch`` samples of a step and ``rows`` covector rows
        on each of ``groups`` parameter groups: ``"jvp"`` when its counted cost (:func:`batch_contraction_costs`)
        is lower, or when the memory budget cannot hold the batch's per-sample gradients at once (the plan split
        the batch: ``train_chunk`` < ``batch``; the JVP path never forms B · D gradients); else ``"gradients"``."""
        if self.batch_contraction in ("jvp", "gradients"):
            return self.batch_contraction
        if self.per_coordinate or not self.forward_ad:
            return "gradients"
        jvp, gradients = batch_contraction_costs(rows, groups, batch, self.num_params,
                                                 self.costs or PathCosts.counted(self.num_params))
        split = self.budget is not None and self.train_chunk is not None and self.train_chunk < batch
        return "jvp" if jvp <= gradients or split else "gradients"

    def describe(self) -> str:
        parts = [f"contraction={self.contraction}", f"test_chunk={self.test_chunk}"]
        if self.batch_contraction != "gradients":
            parts.append(f"batch_contraction={self.batch_contraction}")
        if self.train_chunk is not None:
            parts.append(f"train_chunk={self.train_chunk}")
        if self.tangent_chunk is not None:
            parts.append(f"tangent_chunk={self.tangent_chunk}")
        if self.groupwise_jacobian:
            parts.append("groupwise_jacobian")
        if self.node_chunk > 1:
            parts.append(f"node_chunk={self.node_chunk}")
        if self.budget is not None:
            parts.append(f"budget={self.budget / 2**20:.0f}MiB")
        if self.costs is not None:
            parts.append(self.costs.describe())
        return ", ".join(parts)


def plan_contraction(
    *,
    contraction: str,
    memory_budget: int | None,
    itemsize: int,
    num_params: int,
    largest_group: int,
    num_units: int,
    num_test: int,
    num_outputs: int,
    largest_batch: int,
    kept_bytes: int,
    per_coordinate: bool,
    costs: PathCosts | None,
    test_chunk_size: int | None = None,
    train_chunk_size: int | None = None,
    node_chunk_size: int | None = None,
) -> ContractionPlan:
    """Chunk sizes that keep the working set within ``memory_budget`` bytes.

    What must be held whatever the chunks (``fixed``): the rule's per-unit buffers and the step's unit
    updates (2 · U · D), the pseudo-unit buffers (a few D), and the kept result (``kept_bytes``). The rest
    of the budget is split in three: per-sample gradients (3 · B_c · D: raw, weighted, the buffer input),
    the Jacobians of a test chunk (4 · X_c · O · D: the node's value, the integral, the reverse pass's
    intermediates, the contraction), and JVP tangents (3 · K_c · D). Explicit ``test_chunk_size``,
    ``train_chunk_size`` and ``node_chunk_size`` win over the budget. Quadrature nodes are batched while
    the Jacobians of k nodes, (2 k + 2) · X_c · O · D (k values, their reverse passes' intermediates, the
    integral, the contraction), fit the same share; without a budget while k · X_c · O · D ≤
    ``DEFAULT_NODE_CHUNK_BYTES``; a step with fewer than ``MIN_NODE_BATCH`` nodes then takes them one at a
    time (an explicit ``node_chunk_size`` applies to every step).
    """
    if node_chunk_size is not None and (not isinstance(node_chunk_size, int) or node_chunk_size < 1):
        raise ExplaindError(f"node_chunk_size must be a positive integer, got {node_chunk_size!r}")
    if contraction not in ("auto", "measured", "jvp", "jacobian"):
        raise ExplaindError(f"contraction must be 'auto', 'measured', 'jvp' or 'jacobian', got {contraction!r}")
    if per_coordinate and contraction == "jvp":
        raise ExplaindError("contraction='jvp' with params='coordinate' would take one JVP per coordinate and unit; "
                            "use contraction='jacobian' (or 'auto')")
    D, O = num_params, num_outputs
    if memory_budget is None:
        test_chunk = test_chunk_size or num_test
        node_chunk = DEFAULT_NODE_CHUNK_BYTES // max(1, test_chunk * O * D * itemsize)
        return ContractionPlan(contraction, test_chunk, train_chunk_size, None, False, costs, None,
                               per_coordinate, node_chunk_size or _clamp_node_chunk(node_chunk),
                               1 if node_chunk_size else MIN_NODE_BATCH)
    fixed = (2 * num_units * D + 8 * D) * itemsize + kept_bytes
    if fixed > memory_budget:
        raise MemoryBudgetError(
            f"the memory budget of {memory_budget / 2**20:.1f} MiB cannot hold what every step needs at once: "
            f"per-unit buffers and updates 2 × {num_units} units × {D} parameters "
            f"({2 * num_units * D * itemsize / 2**20:.1f} MiB) and the kept axes ({kept_bytes / 2**20:.1f} MiB). "
            "Keep fewer axes (leave out 'unit' or 'step', or group parameters), group the units "
            "(decompose_by_partition: K · D buffers, Corollary F.2), or raise memory_budget"
        )
    share = (memory_budget - fixed) // 3
    train_chunk = train_chunk_size or max(1, min(largest_batch, share // max(1, 3 * D * itemsize)))
    per_test = 4 * O * D * itemsize
    groupwise = per_test > share  # even one test input's full Jacobian does not fit: one parameter group at a time
    if groupwise:
        per_test = 4 * O * largest_group * itemsize
        if per_test > share:
            raise MemoryBudgetError(
                f"the memory budget leaves {share / 2**20:.1f} MiB per working set, but the Jacobian of one test "
                f"input over the largest parameter group ({largest_group} parameters × {O} outputs) needs "
                f"{per_test / 2**20:.1f} MiB; group parameters more finely, decompose fewer outputs "
                "(decompose_function_of_output), or raise memory_budget"
            )
    test_chunk = test_chunk_size or max(1, min(num_test, share // per_test))
    tangent_chunk = max(1, share // max(1, 3 * D * itemsize))
    jacobian_numbers = test_chunk * O * (largest_group if groupwise else D)
    node_chunk = (share // max(1, jacobian_numbers * itemsize) - 2) // 2
    return ContractionPlan(contraction, test_chunk, train_chunk, tangent_chunk, groupwise, costs,
                           memory_budget, per_coordinate, node_chunk_size or _clamp_node_chunk(node_chunk),
                           1 if node_chunk_size else MIN_NODE_BATCH)


def plan_adjoint(*, contraction: str, memory_budget: int | None, itemsize: int, num_params: int, largest_group: int,
                 num_test: int, num_outputs: int, largest_batch: int, kept_bytes: int, per_coordinate: bool,
                 costs: PathCosts | None, test_chunk_size: int | None = None, train_chunk_size: int | None = None,
                 node_chunk_size: int | None = None, batch_contraction: str = "auto", forward_ad: bool = True,
                 **_unused) -> ContractionPlan:
    """Chunks for the adjoint (MATH.md §12): what is held whatever the chunks is the kept result and the replay
    pass's D-sized buffers (8 D); per test input, λ, κ and Φ (3 · O · D) plus the Jacobian's working set
    (4 · O · D, or 4 · O · D_group one group at a time); per training sample, its gradient (3 · D). Half the rest
    goes to a test chunk (λ for X_c test inputs: when λ of all of them does not fit, the backward pass runs once
    per test chunk), half to the per-sample gradients (or, on the JVP path of ``batch_contraction``, to the
    tangents: 3 · D per covector row, :meth:`ContractionPlan.batch_mode_for_step`). The per-unit buffers of §4 are
    never formed."""
    if batch_contraction not in BATCH_CONTRACTIONS:
        raise ExplaindError(f"batch_contraction must be one of {BATCH_CONTRACTIONS}, got {batch_contraction!r}")
    if batch_contraction == "jvp" and per_coordinate:
        raise ExplaindError("batch_contraction='jvp' with params='coordinate' would take one JVP per coordinate; "
                            "use batch_contraction='gradients' (or 'auto')")
    batch = dict(batch_contraction=batch_contraction, num_params=num_params, forward_ad=forward_ad)
    D, O = num_params, num_outputs
    if memory_budget is None:
        test_chunk = test_chunk_size or num_test
        node_chunk = DEFAULT_NODE_CHUNK_BYTES // max(1, test_chunk * O * D * itemsize)
        return ContractionPlan(contraction, test_chunk, train_chunk_size, None, False, costs, None, per_coordinate,
                               node_chunk_size or _clamp_node_chunk(node_chunk), 1 if node_chunk_size else MIN_NODE_BATCH,
                               **batch)
    fixed = 8 * D * itemsize + kept_bytes
    share = (memory_budget - fixed) // 2
    per_test = 7 * O * D * itemsize
    groupwise = per_test > share
    if groupwise:
        per_test = (3 * O * D + 4 * O * largest_group) * itemsize
    if fixed > memory_budget or per_test > share:
        raise MemoryBudgetError(
            f"the memory budget of {memory_budget / 2**20:.1f} MiB cannot hold the adjoint of one test input: the kept "
            f"axes ({kept_bytes / 2**20:.1f} MiB) and λ, κ, Φ of {O} outputs × {D} parameters "
            f"({per_test / 2**20:.1f} MiB). Keep fewer axes, group parameters, or raise memory_budget")
    test_chunk = test_chunk_size or max(1, min(num_test, share // per_test))
    train_chunk = train_chunk_size or max(1, min(largest_batch, share // max(1, 3 * D * itemsize)))
    tangent_chunk = max(1, share // max(1, 3 * D * itemsize))
    return ContractionPlan(contraction, test_chunk, train_chunk, tangent_chunk, groupwise, costs, memory_budget,
                           per_coordinate, node_chunk_size or 1, 1, **batch)


def batch_contraction_costs(rows: int, groups: int, batch: int, num_params: int, costs: PathCosts) -> tuple[float, float]:
    """The two exact ways to form ⟨grad_s(u), κ_k⟩ for the ``batch`` samples u of a step and ``rows`` covector rows
    κ_k on each of ``groups`` parameter groups (MATH.md §12, the O · X rows of λ_s C_s + Φ_s E_s), with the plan's
    unit costs: (JVP path, gradient path). JVP: per group and row one forward-mode JVP of the vector of the
    batch's per-sample losses, a directional pass per sample (groups · rows · batch directions). Gradients:
    vmap∘grad, a reverse pass per sample, then the matrix product rows · batch · D multiply–accumulates. Counted
    (:meth:`PathCosts.counted`) the JVP path is cheaper only when groups · rows < 1 + rows / 3, one row on one
    group; it never holds the B · D per-sample gradients, which the plan weighs when the budget splits a batch."""
    jvp = groups * rows * batch * costs.per_direction
    gradients = batch * costs.per_output + rows * batch * max(1, num_params) * costs.per_mac
    return jvp, gradients


@dataclass(frozen=True)
class AccumulationCosts:
    """Counted cost (in passes over the model, as :meth:`PathCosts.counted`) and memory (bytes) of the forward
    recursion of §4 and of the adjoint of §12 for one decomposition."""

    forward_cost: float
    adjoint_cost: float
    forward_bytes: int
    adjoint_bytes: int

    def adjoint_is_cheaper(self) -> bool:
        return (self.adjoint_cost, self.adjoint_bytes) < (self.forward_cost, self.forward_bytes)

    def describe(self) -> str:
        return (f"counted cost forward {self.forward_cost:.3g} vs adjoint {self.adjoint_cost:.3g} passes; memory "
                f"forward {self.forward_bytes / 2**20:.1f} MiB vs adjoint {self.adjoint_bytes / 2**20:.1f} MiB")


def count_accumulation_costs(*, num_steps: int, batch: int, num_units: int, num_test: int, num_outputs: int,
                             num_params: int, num_groups: int, nodes: int, pseudo: int, itemsize: int,
                             kept_bytes: int) -> AccumulationCosts:
    """The two accumulations counted step by step (MATH.md §11, §12), with U_t = min(U, (t+1) · B) units touched by
    step t. Forward: B gradients, then per test input and node the cheaper of G · (U_t + P) JVP directions and
    O reverse passes plus O · D · (U_t + P + 1) multiply–accumulates (3 D to a pass); memory 2 · U · D. Adjoint: a
    batch gradient for the replay pass, per test input O reverse passes per node, the batch's contraction (the
    cheaper of B gradients plus X · O · B · D MACs and G · X · O · B JVP directions, :func:`batch_contraction_costs`)
    and λ's update (a few X · O · D); memory 7 · X · O · D."""
    X, O, D = num_test, num_outputs, max(1, num_params)
    forward = 0.0
    for t in range(num_steps):
        touched = min(num_units, (t + 1) * batch)
        jvp = num_groups * (touched + pseudo)
        jacobian = O + O * (touched + pseudo + 1) / 3.0
        forward += batch + X * nodes * min(jvp, jacobian) + touched / 3.0
    contraction = min(batch_contraction_costs(X * O, num_groups, batch, D, PathCosts.counted(D)))
    adjoint = num_steps * (batch + X * nodes * O + contraction + X * O)
    return AccumulationCosts(forward, adjoint, (2 * num_units * D + 8 * D) * itemsize + kept_bytes,
                             (7 * X * O * D + 8 * D) * itemsize + kept_bytes)


def _clamp_node_chunk(node_chunk: int) -> int:
    return int(max(1, min(MAX_NODE_CHUNK, node_chunk)))


def chunks(n: int, size: int | None):
    """Consecutive slices covering range(n) with at most ``size`` elements each."""
    size = n if not size else size
    return [slice(s, min(n, s + size)) for s in range(0, n, max(1, size))]


def bytes_of(shape, itemsize: int) -> int:
    return int(math.prod(shape)) * itemsize


def scaled_in_place(tensor: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """factor · tensor, in place where the tensor owns its memory (a vmap result can be an expanded view of
    zeros, for a parameter the target ignores: then a copy)."""
    try:
        return tensor.mul_(factor)
    except RuntimeError:
        return tensor * factor
