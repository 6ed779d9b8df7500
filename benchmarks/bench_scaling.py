"""Fidelity against cost, overhead over bare torch.func, cost against training, and scaling.

Everything printed is a ratio of times (or memory) measured in this one run on this machine; nothing is
asserted about time. Four tables:

1. Fidelity vs cost on the modular-addition Transformer of the paper's Appendix E.2, scaled down
   (modulus 23, tokens [a, b, =] through an embedding without positional encoding, one post-LN encoder
   layer with 4 heads of width d_model / 4 = 8 and an MLP of width 64, a linear decoder to the 23
   residues; GELU in the MLP, see below), 128 training samples in shuffled batches of 32, 20 AdamW
   steps, 8 test inputs, all 23 logits, influences kept per parameter tensor and per training sample
   (``keep=("param", "test", "unit", "output")``, ``params="tensor"``). Rules: Gauss–Legendre with
   2/3/4/8 nodes, ``adaptive(gauss_legendre(n), tol)`` with tol tuned (untimed) until the relative
   residual is ≤ 1e-6, and the paper's midpoint rule with 10 and 100 nodes. Every rule runs on this
   library's engine, which forms the Jacobians of several nodes of a step in one vmapped call (steps
   with ≥ 3 nodes; up to 16 while they fit 32 MiB); midpoint(100) is run a second time with one call per node (``node_chunk_size=1``),
   to show what that batching gives the comparator. Columns: wall time (best of
   --repeats; midpoint(100) once), the certified max residual |f(θ_N) − reconstruction| and the
   relative one max |r| / (1 + |f(θ_N) − f(θ_0)|) (the tests' measure), and the speed-up
   time(midpoint(100)) / time(rule). Run once with the model trained and decomposed in float64, once in
   float32 (where the residual floor is rounding, reported as such). "Equal or better residual" than
   midpoint(100) means ≤ max(its residual, 2 × the lowest residual of any rule in that dtype): in float32
   every rule sits at the rounding floor, and differences there are chance.
2. Overhead: decomposition time / time of the bare torch.func evaluations it needed — vmap(grad) of the
   per-sample loss over every step's batch, plus vmap(jacrev) of the model over the test inputs at
   every quadrature node it evaluated (``result.nodes_per_step``; batched over nodes in the plan's
   ``node_chunk`` as the decomposition does) — written here directly on
   ``torch.func.functional_call``, with the same shapes and dtype, timed in the same run. The
   contraction Φ_t(x) · update_t(i) (an einsum X·O·M·D per step, needed because units are kept) is not a
   torch.func evaluation; it is timed bare too and shown separately.
3. Cost relative to training: decomposition time / time of the 20 training steps (without recorder,
   after a warm-up), and the recorder's own overhead.
4. Scaling on a one-hidden-layer tanh MLP: from a base configuration, each of steps N, parameters D
   (the hidden width; D ≈ width · (inputs + outputs + 1)), training samples M (batch size fixed, so
   M is the number of per-sample buffers) and test inputs X is doubled (and, in full mode, also
   quadrupled), one at a time; "per ×2" is the ratio per doubling (≈ 2: linear, ≈ 1: flat). Each
   configuration runs in two fresh subprocesses (same thread count): one reports the decomposition
   time (GL(8), per parameter tensor and sample, float64; best of 3 after a warm-up), the other the
   peak memory of one decomposition: peak resident set size during it minus the resident set size
   just before it (VmHWM, reset through /proc/self/clear_refs just before, and VmRSS; where that is not
   possible, ru_maxrss after minus before), with glibc's malloc told to map every tensor above 128 KiB
   separately (MALLOC_MMAP_THRESHOLD_) so that the resident set follows the live tensors. Plain
   ru_maxrss deltas do not work here: ru_maxrss cannot be reset, includes training and warm-up, and on
   Linux it survives exec, so a subprocess reports the peak of the large parent that started it.

0. First, the paper's own ReLU models (``relu_fidelity.py`` beside this file, issue 14): its
   modular-addition Transformer with a ReLU MLP and a ReLU/max-pool CNN on the digits, every rule
   (midpoint 10/100 batched and one node per call, GL 2/4/8, hp-adaptive, bisection, the default
   piecewise rule of MATH.md §13), float32 and float64, with the max entry error against a float64
   reference and the ratios against the targets. Table 1 below keeps the GELU variant, where every rule
   converges, as the smooth comparison.

Run (intra-op threads: --threads, default 2, set once for every measurement and every subprocess):

    python benchmarks/bench_scaling.py            # full: about 10 minutes on 2 CPU cores
    python benchmarks/bench_scaling.py --quick    # scaled-down shapes, under a minute
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import time
import warnings
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

import explaind_math as em
from explaind_math.engine.plan import MIN_NODE_BATCH
from explaind_math.experiments import modular_addition

KEEP = ("param", "test", "unit", "output")
TARGET_RESIDUAL = 1e-6  # relative residual the tuned adaptive rule must reach
TARGET_SPEEDUP = 20.0  # issue 7: midpoint(100) / ours at equal or better residual
TARGET_OVERHEAD = 1.5  # issue 7: decomposition / bare torch.func evaluations


# --------------------------------------------------------------------------- the models
def ModularAdditionTransformer(p: int, d: int, heads: int, width: int) -> nn.Module:
    """Appendix E.2's grokking Transformer, scaled down (``explaind_math.experiments.modular_addition``):
    tokens [a, b, =], an embedding without positional encoding, one post-LN encoder layer with written-out
    multi-head attention (no key bias) and a GELU MLP, a linear decoder from the '=' position."""
    return modular_addition.ModularAdditionTransformer(p, d, heads, width)


@dataclass(frozen=True)
class TransformerConfig:
    p: int = 23
    d: int = 32
    heads: int = 4
    width: int = 64
    n_train: int = 128
    batch: int = 32
    steps: int = 20
    n_test: int = 8
    lr: float = 1e-3
    weight_decay: float = 1.0
    seed: int = 0


@dataclass(frozen=True)
class MLPConfig:
    steps: int = 16  # N
    width: int = 256  # D ≈ width · (inputs + outputs + 1)
    n_train: int = 256  # M
    n_test: int = 16  # X
    inputs: int = 16
    outputs: int = 4
    batch: int = 64  # steps · batch ≥ 4 · n_train: every sample of every M configuration is in some batch
    seed: int = 0

    @property
    def num_params(self) -> int:
        return self.width * (self.inputs + 1) + self.outputs * (self.width + 1)


FULL_TRANSFORMER = TransformerConfig()
QUICK_TRANSFORMER = TransformerConfig(p=11, d=16, heads=2, width=32, n_train=32, batch=8, steps=6, n_test=4)
SMOKE_TRANSFORMER = TransformerConfig(p=5, d=8, heads=2, width=8, n_train=8, batch=4, steps=2, n_test=2)
FULL_MLP = MLPConfig()
QUICK_MLP = MLPConfig(steps=6, width=128, n_train=64, n_test=8, batch=32)
SMOKE_MLP = MLPConfig(steps=2, width=8, n_train=4, n_test=2, batch=8)


def transformer_case(cfg: TransformerConfig, dtype: torch.dtype):
    """Model, training data (X, Y) and test inputs: pairs (a, b) without repetition, label (a + b) mod p."""
    g = torch.Generator().manual_seed(cfg.seed)
    a, b = torch.meshgrid(torch.arange(cfg.p), torch.arange(cfg.p), indexing="ij")
    pairs = torch.stack([a.reshape(-1), b.reshape(-1)], 1)
    if cfg.n_train + cfg.n_test > pairs.shape[0]:
        raise ValueError(f"modulus {cfg.p} has only {pairs.shape[0]} pairs")
    pairs = pairs[torch.randperm(pairs.shape[0], generator=g)]
    tokens = torch.cat([pairs, torch.full((pairs.shape[0], 1), cfg.p)], 1)  # [a, b, =]
    labels = (pairs[:, 0] + pairs[:, 1]) % cfg.p
    torch.manual_seed(cfg.seed)
    model = ModularAdditionTransformer(cfg.p, cfg.d, cfg.heads, cfg.width).to(dtype)
    X, Y = tokens[: cfg.n_train], labels[: cfg.n_train]
    X_test = tokens[cfg.n_train : cfg.n_train + cfg.n_test]
    return model, X, Y, X_test


def mlp_case(cfg: MLPConfig, dtype: torch.dtype):
    g = torch.Generator().manual_seed(cfg.seed)
    X = torch.randn(cfg.n_train, cfg.inputs, generator=g, dtype=dtype)
    X_test = torch.randn(cfg.n_test, cfg.inputs, generator=g, dtype=dtype)
    Y = torch.randint(0, cfg.outputs, (cfg.n_train,), generator=g)
    torch.manual_seed(cfg.seed)
    model = nn.Sequential(nn.Linear(cfg.inputs, cfg.width), nn.Tanh(), nn.Linear(cfg.width, cfg.outputs)).to(dtype)
    return model, X, Y, X_test


def loss_fn(out, y):
    return F.cross_entropy(out, y)  # one sample's loss; the training loss is its batch mean


def train(model, X, Y, *, steps: int, batch: int, lr: float, weight_decay: float, record: bool, seed: int = 1):
    """AdamW on shuffled mini-batches (a fresh permutation every epoch); returns (seconds, recorder)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    recorder = em.TrajectoryRecorder(model, optimizer) if record else None
    g = torch.Generator().manual_seed(seed)
    order = []
    t0 = time.perf_counter()
    for _ in range(steps):
        if len(order) < batch:
            order = torch.randperm(X.shape[0], generator=g).tolist()
        ids, order = order[:batch], order[batch:]
        optimizer.zero_grad()
        F.cross_entropy(model(X[ids]), Y[ids]).backward()
        if recorder is not None:
            recorder.record_batch(ids)
        optimizer.step()
    return time.perf_counter() - t0, recorder


def decompose(model, trajectory, X, Y, X_test, quadrature, dtype, **kw):
    # the tables compare quadrature rules on the forward recursion of §4 (the adjoint of §12, which
    # accumulation="auto" may pick here, has its own benchmark: bench_adjoint.py)
    kw.setdefault("accumulation", "forward")
    t0 = time.perf_counter()
    result = em.decompose_adamw_training(
        model, trajectory, loss_fn, (X, Y), X_test, quadrature=quadrature, keep=KEEP, params="tensor", dtype=dtype,
        **kw,
    )
    return result, time.perf_counter() - t0


# --------------------------------------------------------------------------- table 1 and 3
@dataclass
class Run:
    """A trained, recorded model with its data and training times."""

    model: nn.Module
    trajectory: em.Trajectory
    X: torch.Tensor
    Y: torch.Tensor
    X_test: torch.Tensor
    dtype: torch.dtype
    train_time: float  # bare training, no recorder, after a warm-up
    recorded_time: float  # the same steps with the recorder


def prepare_run(cfg: TransformerConfig, dtype: torch.dtype) -> Run:
    model, X, Y, X_test = transformer_case(cfg, dtype)
    hyper = dict(lr=cfg.lr, weight_decay=cfg.weight_decay)
    train(copy.deepcopy(model), X, Y, steps=2, batch=cfg.batch, record=False, **hyper)  # warm-up
    bare = min(train(copy.deepcopy(model), X, Y, steps=cfg.steps, batch=cfg.batch, record=False, **hyper)[0]
               for _ in range(3))
    recorded, recorder = train(model, X, Y, steps=cfg.steps, batch=cfg.batch, record=True, **hyper)
    trajectory = recorder.trajectory()
    recorder.close()
    # warm-up of the decomposition (first-call costs of torch.func are not the rule's)
    decompose(model, trajectory, X, Y, X_test[:1], em.gauss_legendre(1), dtype)
    return Run(model, trajectory, X, Y, X_test, dtype, bare, recorded)


@dataclass
class Row:
    label: str
    quadrature: object
    seconds: float
    nodes: int  # quadrature nodes evaluated, all steps
    max_residual: float
    relative_residual: float
    nodes_per_step: list
    note: str = ""
    probe_nodes_per_step: list = None
    contraction_per_step: list = None
    node_chunk: int = 1  # quadrature nodes per vmapped Jacobian call (the decomposition's plan)


def tune_adaptive(run: Run, base_nodes: int, target: float) -> tuple[object, str]:
    """tol for adaptive(gauss_legendre(n), tol): start from target / N (per-step errors ≤ tol add up to
    ≤ N·tol ≤ target, relative to 1 + |Δf| ≥ 1) and divide by 10 while the measured relative residual
    misses the target (untimed; at most 3 tries). In float32 the rule also stops at the rounding noise of
    f, so a target below the rounding floor is not reached whatever tol is."""
    tol = target / run.trajectory.num_steps
    for _ in range(3):
        quad = em.adaptive(em.gauss_legendre(base_nodes), tol)
        result, _ = decompose(run.model, run.trajectory, run.X, run.Y, run.X_test, quad, run.dtype)
        if result.relative_residual <= target:
            return quad, f"tuned: tol = {tol:.0e}"
        tol /= 10
    return quad, f"target {target:.0e} not reached (tol down to {tol * 10:.0e})"


def tune_hp_adaptive(run: Run, target: float) -> tuple[object, str]:
    """tol for adaptive_gauss_legendre(tol): per-step errors ≤ tol add up to ≤ N·tol, so tol = target / N
    meets the target by construction where the residual is above rounding (checked, untimed)."""
    tol = target / run.trajectory.num_steps
    quad = em.adaptive_gauss_legendre(tol, orders=(1, 2, 3, 4, 6, 8))
    result, _ = decompose(run.model, run.trajectory, run.X, run.Y, run.X_test, quad, run.dtype)
    ok = result.relative_residual <= target
    return quad, f"tol = target / N = {tol:.0e}" + ("" if ok else f" (target missed: {result.relative_residual:.1e})")


def fidelity_rows(run: Run, repeats: int, include_adaptive: bool = True, adaptive_bases=(2, 4)) -> list[Row]:
    rules: list[tuple] = [(f"gauss_legendre({n})", em.gauss_legendre(n), "") for n in (2, 3, 4, 8)]
    if include_adaptive:
        quad, note = tune_hp_adaptive(run, TARGET_RESIDUAL)
        rules.append((f"adaptive_GL({quad.tol:.0e})", quad, "hp, JVP-probed; " + note))
        for n in adaptive_bases:
            quad, note = tune_adaptive(run, n, TARGET_RESIDUAL)
            rules.append((f"adaptive(GL({n}), {quad.tol:.0e})", quad, note))
    rules += [("midpoint(10)", em.midpoint(10), "paper"), ("midpoint(100)", em.midpoint(100), "paper"),
              (ONE_NODE_PER_CALL, em.midpoint(100), "paper's rule, one Jacobian call per node", {"node_chunk_size": 1}),
              (DEFAULT_RULE, None, "quadrature=None: piecewise GL (MATH.md §13), orders per piece and input")]
    rows = []
    for label, quad, note, *options in rules:
        best, result = float("inf"), None
        for _ in range(1 if label.startswith("midpoint(100)") else repeats):
            result, seconds = decompose(run.model, run.trajectory, run.X, run.Y, run.X_test, quad, run.dtype,
                                        **(options[0] if options else {}))
            best = min(best, seconds)
        rows.append(Row(label, quad, best, sum(result.nodes_per_step), result.max_residual,
                        result.relative_residual, list(result.nodes_per_step), note,
                        list(result.probe_nodes_per_step), list(result.contraction_per_step),
                        _node_chunk_of(result.plan)))
    return rows


def _node_chunk_of(plan: str) -> int:
    found = re.search(r"node_chunk=(\d+)", plan)
    return int(found.group(1)) if found else 1


ONE_NODE_PER_CALL = "midpoint(100) 1 node/call"
DEFAULT_RULE = "piecewise (default)"


def reference(rows: list[Row], label: str = "midpoint(100)") -> Row:
    return next(r for r in rows if r.label == label)


def format_fidelity(rows: list[Row], run: Run) -> str:
    ref = reference(rows)
    steps = run.trajectory.num_steps
    out = [f"  {'rule':26s} {'nodes/step':>10s} {'time (s)':>9s} {'max |r|':>9s} {'max rel r':>9s} "
           f"{'≤1e-6':>5s} {'speed-up':>9s}  note"]
    for r in rows:
        ok = "yes" if r.relative_residual <= TARGET_RESIDUAL else "no"
        out.append(f"  {r.label:26s} {r.nodes / steps:10.1f} {r.seconds:9.3f} {r.max_residual:9.2e} "
                   f"{r.relative_residual:9.2e} {ok:>5s} {ref.seconds / r.seconds:8.1f}×  {r.note}")
    return "\n".join(out)


def fidelity_verdict(rows: list[Row], dtype: torch.dtype) -> str:
    ref = reference(rows)
    ours = [r for r in rows if not r.label.startswith("midpoint")]
    lines = []
    floor = min(r.relative_residual for r in rows)
    bar = max(ref.relative_residual, 2 * floor)  # equal or better, up to the rounding floor
    as_good = [r for r in ours if r.relative_residual <= bar]
    if as_good:
        best = min(as_good, key=lambda r: r.seconds)
        s = ref.seconds / best.seconds
        what = f"≤ midpoint(100)'s ({ref.relative_residual:.2e})" if bar == ref.relative_residual else \
            f"≤ 2 × the rounding floor ({bar:.2e}; midpoint(100): {ref.relative_residual:.2e})"
        lines.append(f"  fastest rule with residual {what}: {best.label}, "
                     f"residual {best.relative_residual:.2e}, {s:.1f}× faster — target ≥ {TARGET_SPEEDUP:.0f}×: "
                     f"{'MET' if s >= TARGET_SPEEDUP else 'MISSED'}")
        one = reference(rows, ONE_NODE_PER_CALL)
        lines.append(f"  against midpoint(100) with one Jacobian call per node ({one.seconds:.2f} s; the default "
                     f"batches nodes, {ref.seconds:.2f} s): {best.label} {one.seconds / best.seconds:.1f}× faster")
    else:
        lines.append("  none of our rules reached midpoint(100)'s residual")
    lines.append(default_rule_verdict(rows, floor))
    tuned = [r for r in ours if r.label.startswith("adaptive") and r.relative_residual <= TARGET_RESIDUAL]
    if tuned:
        best = min(tuned, key=lambda r: r.seconds)
        s = ref.seconds / best.seconds
        lines.append(f"  adaptive rule tuned to ≤ {TARGET_RESIDUAL:.0e}: {best.label}, residual "
                     f"{best.relative_residual:.2e}, {s:.1f}× faster than midpoint(100) "
                     f"(whose residual is {ref.relative_residual:.2e}{'' if ref.relative_residual <= TARGET_RESIDUAL else ', missing 1e-6'})")
    else:
        lines.append(f"  no adaptive rule reached a relative residual ≤ {TARGET_RESIDUAL:.0e}")
    if dtype == torch.float32:
        eps = torch.finfo(torch.float32).eps
        at_floor = [r.label for r in rows if r.relative_residual <= 2 * floor]
        lines.append(f"  float32 rounding floor: the best residual of any rule is {floor:.2e} (ε = {eps:.1e}); "
                     f"within 2× of it: {', '.join(at_floor)} — there the residual is rounding, not quadrature, "
                     "and which of them is lowest is chance")
    return "\n".join(lines)


def default_rule_verdict(rows: list[Row], floor: float) -> str:
    """Issue 14's smooth-model target: the default rule no slower than the fastest other rule that reaches its
    residual (or 2 × the rounding floor, where every rule sits at rounding)."""
    default = reference(rows, DEFAULT_RULE)
    bar = max(default.relative_residual, 2 * floor)
    rivals = [r for r in rows if r.label != DEFAULT_RULE and r.relative_residual <= bar]
    if not rivals:
        return (f"  default rule: {default.seconds:.2f} s at {default.relative_residual:.2e}; no other rule reaches "
                "that residual — target (no slower than the best rule at the same residual): MET")
    best = min(rivals, key=lambda r: r.seconds)
    ratio = default.seconds / best.seconds
    return (f"  default rule: {default.seconds:.2f} s at {default.relative_residual:.2e}; fastest other rule at that "
            f"residual or better: {best.label}, {best.seconds:.2f} s ({best.relative_residual:.2e}); default / best = "
            f"{ratio:.2f} — target (no slower): {'MET' if ratio <= 1.0 else 'MISSED'}")


# --------------------------------------------------------------------------- table 2
def bare_evaluation_seconds(run: Run, row: Row) -> tuple[float, float]:
    """(torch.func seconds, contraction seconds) for the evaluations the decomposition of ``row`` needed:
    vmap(grad) per-sample gradients over every step's batch, vmap(jacrev) at every node it contracted (the
    nodes of a step in chunks of the plan's ``node_chunk`` per vmapped call, as the decomposition does), and
    for adaptive rules one JVP along Δθ_t (vmap over test inputs of jvp) per probe node; and the einsum
    Φ·update per step with the shapes of the kept axes."""
    assert set(row.contraction_per_step) == {"jacobian"}, "this benchmark keeps units: the Jacobian path"
    model, dtype = run.model, run.dtype
    names = run.trajectory.parameter_names
    thetas = [{n: run.trajectory.parameters[t][n].to(dtype) for n in names} for t in range(run.trajectory.num_steps + 1)]
    batches = [(run.X[s.sample_ids], run.Y[s.sample_ids]) for s in run.trajectory.steps]
    quad = row.quadrature
    if isinstance(quad, em.quadrature.Quadrature):
        alphas = [list(quad.nodes)] * run.trajectory.num_steps
    else:  # adaptive: the same number of nodes per step (their positions do not change the cost)
        alphas = [[(k + 0.5) / n for k in range(n)] for n in row.nodes_per_step]

    def output(p, x):
        return functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)

    def loss(p, x, y):
        return F.cross_entropy(output(p, x), y)

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))
    jacobian = vmap(jacrev(output), in_dims=(None, 0))
    jacobians_at = vmap(jacobian, in_dims=(0, None))  # k stacked parameter points

    def node_jacobians(theta, delta, step_alphas):
        size = row.node_chunk if len(step_alphas) >= MIN_NODE_BATCH else 1
        for start in range(0, len(step_alphas), size):
            part = step_alphas[start:start + size]
            if len(part) == 1:
                jacobian({n: theta[n] + part[0] * delta[n] for n in names}, run.X_test)
            else:
                a = torch.tensor(part, dtype=dtype)
                jacobians_at({n: theta[n] + a.reshape(-1, *([1] * theta[n].dim())) * delta[n] for n in names},
                             run.X_test)
    along = lambda p, v, xs: jvp(lambda q: vmap(output, in_dims=(None, 0))(q, xs), (p,), (v,))[1]  # noqa: E731
    probes = row.probe_nodes_per_step or [0] * len(batches)
    per_sample(thetas[0], *batches[0])  # warm-up
    jacobian(thetas[0], run.X_test)
    along(thetas[0], thetas[0], run.X_test)
    t0 = time.perf_counter()
    for t, (xb, yb) in enumerate(batches):
        per_sample(thetas[t], xb, yb)
        delta = {n: thetas[t + 1][n] - thetas[t][n] for n in names}
        node_jacobians(thetas[t], delta, alphas[t])
        for k in range(probes[t]):
            along({n: thetas[t][n] + (k + 0.5) / probes[t] * delta[n] for n in names}, delta, run.X_test)
    func_seconds = time.perf_counter() - t0

    # contraction: I_t[j, x, i, o] = Φ_t(x)[o, j] · update_t(i)[j] per tensor, units = all training samples
    units = len(run.trajectory.sample_ids())
    phi = jacobian(thetas[0], run.X_test)
    updates = {n: torch.randn(units, *thetas[0][n].shape, dtype=dtype) for n in names}
    t0 = time.perf_counter()
    for _ in range(run.trajectory.num_steps):
        for n in names:
            J = phi[n].reshape(*phi[n].shape[:2], -1)
            torch.einsum("xoj,uj->xuo", J, updates[n].reshape(units, -1))
    return func_seconds, time.perf_counter() - t0


def per_node_diagnosis(run: Run, repeats: int = 10) -> dict[str, float]:
    """Milliseconds per quadrature node, on the Jacobian of one node (shapes of this run): the bare
    vmap(jacrev); a finiteness check of it; the weighted accumulation written out of place
    (acc + J·w, two new Jacobian-sized tensors per node) and in place (acc.add_(J, alpha=w))."""
    model, dtype = run.model, run.dtype
    names = run.trajectory.parameter_names
    theta = {n: run.trajectory.parameters[0][n].to(dtype) for n in names}
    jacobian = vmap(jacrev(lambda p, x: functional_call(model, p, (x.unsqueeze(0),)).squeeze(0)), in_dims=(None, 0))
    J = jacobian(theta, run.X_test)
    acc = {k: v.clone() for k, v in J.items()}

    def ms(fn):
        fn()
        t0 = time.perf_counter()
        for _ in range(repeats):
            fn()
        return 1e3 * (time.perf_counter() - t0) / repeats

    return {
        "jacobian": ms(lambda: jacobian(theta, run.X_test)),
        "isfinite": ms(lambda: [bool(torch.isfinite(v).all()) for v in J.values()]),
        "accumulate out of place": ms(lambda: {k: acc[k] + v * 0.5 for k, v in J.items()}),
        "accumulate in place": ms(lambda: [acc[k].add_(v, alpha=0.5) for k, v in J.items()]),
        "jacobian MB": sum(v.numel() * v.element_size() for v in J.values()) / 2**20,
    }


def overhead_rows(run: Run, rows: list[Row], labels) -> list[tuple[str, float, float, float]]:
    out = []
    for r in rows:
        if r.label in labels or (r.label.startswith("adaptive") and "adaptive" in labels):
            func_s, contraction_s = bare_evaluation_seconds(run, r)
            out.append((r.label, r.seconds, func_s, contraction_s))
    return out


def format_overhead(rows) -> str:
    out = [f"  {'rule':26s} {'decomp (s)':>10s} {'torch.func (s)':>14s} {'ratio':>6s} {'≤1.5':>5s} "
           f"{'+contraction (s)':>16s} {'ratio':>6s}"]
    for label, dec, func_s, con_s in rows:
        ratio = dec / func_s
        out.append(f"  {label:26s} {dec:10.3f} {func_s:14.3f} {ratio:6.2f} {'yes' if ratio <= TARGET_OVERHEAD else 'no':>5s} "
                   f"{con_s:16.3f} {dec / (func_s + con_s):6.2f}")
    return "\n".join(out)


# --------------------------------------------------------------------------- table 4
def _proc_status_kb(key: str) -> float | None:
    """A field of /proc/self/status in KiB (VmRSS: resident now; VmHWM: peak of this process image)."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return float(line.split()[1])
    except OSError:
        return None
    return None


def _maxrss_kb() -> float:
    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return value / 1024 if sys.platform == "darwin" else float(value)  # bytes on macOS, KiB on Linux


def _reset_peak_rss() -> bool:
    """Reset this process's peak RSS (VmHWM) to its current RSS (Linux ≥ 4.0); False where impossible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def scaling_worker(cfg: MLPConfig, dtype: torch.dtype = torch.float64, repeats: int = 3,
                   measure: str = "both") -> dict:
    """One scaling configuration (meant for a fresh process): decomposition seconds (best of
    ``repeats`` after a warm-up) and/or the peak memory of one decomposition above the RSS before it."""
    model, X, Y, X_test = mlp_case(cfg, dtype)
    _, recorder = train(model, X, Y, steps=cfg.steps, batch=cfg.batch, lr=1e-2, weight_decay=0.1, record=True)
    trajectory = recorder.trajectory()
    recorder.close()
    quad = em.gauss_legendre(8)
    decompose(model, trajectory, X, Y, X_test[:1], em.gauss_legendre(1), dtype)  # warm-up
    out = {"num_params": cfg.num_params, "seconds": float("nan"), "peak_delta_mb": float("nan")}
    result = None
    if measure in ("memory", "both"):
        gc.collect()
        # VmHWM reset to the current RSS, so the peak is this decomposition's (not training's or the
        # warm-up's); ru_maxrss cannot be reset, and on Linux it even survives exec (a subprocess
        # reports the peak of the large parent that forked it), so it is only the fallback
        if _reset_peak_rss() and _proc_status_kb("VmRSS") is not None:
            before = _proc_status_kb("VmRSS")
            result, _ = decompose(model, trajectory, X, Y, X_test, quad, dtype)
            peak = _proc_status_kb("VmHWM")
        else:
            before = _maxrss_kb()
            result, _ = decompose(model, trajectory, X, Y, X_test, quad, dtype)
            peak = _maxrss_kb()
        out["peak_delta_mb"] = max(peak - before, 0.0) / 1024
    if measure in ("time", "both"):
        seconds = float("inf")
        for _ in range(repeats):
            result, t = decompose(model, trajectory, X, Y, X_test, quad, dtype)
            seconds = min(seconds, t)
        out["seconds"] = seconds
    out.update(relative_residual=result.relative_residual, units=len(result.units))
    return out


def scaling_configs(base: MLPConfig, factors=(2,)) -> list[tuple[str, MLPConfig]]:
    """The base configuration, then each axis multiplied by each factor (one axis at a time)."""
    if base.steps * base.batch < max(factors) * base.n_train:
        raise ValueError("steps · batch must cover the largest training set, or M would not be the number of units")
    out = [("base", base)]
    for axis, field in (("N", "steps"), ("D", "width"), ("M", "n_train"), ("X", "n_test")):
        for k in factors:
            out.append((f"{axis}×{k}", replace(base, **{field: k * getattr(base, field)})))
    return out


def run_scaling_subprocess(cfg: MLPConfig, threads: int, measure: str) -> dict:
    """Run one configuration in a fresh interpreter. For memory, glibc's malloc gets a fixed mmap
    threshold (MALLOC_MMAP_THRESHOLD_): tensors above 128 KiB are then mapped and unmapped one by one,
    so the resident set follows the live tensors instead of what the allocator kept from earlier
    allocations. Time is measured in a separate process with the default allocator."""
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--scaling-worker",
           json.dumps(asdict(cfg)), "--measure", measure]
    env = dict(os.environ)
    if measure == "memory":
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"scaling worker failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def scaling_measurement(cfg: MLPConfig, threads: int) -> dict:
    timed = run_scaling_subprocess(cfg, threads, "time")
    timed["peak_delta_mb"] = run_scaling_subprocess(cfg, threads, "memory")["peak_delta_mb"]
    return timed


def format_scaling(results: list[tuple[str, MLPConfig, dict]]) -> str:
    """One row per configuration; "per doubling" is (ratio to base) ** (1 / log2(factor))."""
    base = results[0][2]
    out = [f"  {'config':7s} {'N':>4s} {'D':>7s} {'M':>5s} {'X':>4s} {'time (s)':>9s} {'× base':>7s} {'per ×2':>7s} "
           f"{'peak Δ MB':>10s} {'× base':>7s} {'per ×2':>7s} {'max rel r':>9s}"]
    for label, cfg, r in results:
        doublings = math.log2(int(label.split("×")[1])) if "×" in label else 0.0
        t_ratio = r["seconds"] / base["seconds"]
        m_ratio = r["peak_delta_mb"] / base["peak_delta_mb"] if base["peak_delta_mb"] > 0 else float("nan")
        per = (lambda x: f"{x ** (1 / doublings):7.2f}" if doublings and x > 0 else f"{'':7s}")
        out.append(f"  {label:7s} {cfg.steps:4d} {cfg.num_params:7,d} {r['units']:5d} {cfg.n_test:4d} "
                   f"{r['seconds']:9.3f} {t_ratio:7.2f} {per(t_ratio)} {r['peak_delta_mb']:10.1f} "
                   f"{m_ratio:7.2f} {per(m_ratio)} {r['relative_residual']:9.1e}")
    return "\n".join(out)


# --------------------------------------------------------------------------- main
def machine_line(threads: int) -> str:
    return (f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, python "
            f"{platform.python_version()}, torch {torch.__version__}, torch.set_num_threads({threads}) for every "
            "measurement (subprocesses included)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="scaled-down shapes (under a minute on 2 cores)")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per rule (best is kept)")
    parser.add_argument("--scaling-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--skip-relu", action="store_true", help="leave out table 0 (the paper's ReLU models)")
    parser.add_argument("--measure", default="both", choices=["time", "memory", "both"], help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    # nn.MultiheadAttention is not used, but keep torch's vmap fallback warnings out of the tables
    warnings.filterwarnings("ignore", message="There is a performance drop")
    if args.scaling_worker is not None:
        print(json.dumps(scaling_worker(MLPConfig(**json.loads(args.scaling_worker)), measure=args.measure)))
        return 0

    t_start = time.perf_counter()
    cfg = QUICK_TRANSFORMER if args.quick else FULL_TRANSFORMER
    mlp = QUICK_MLP if args.quick else FULL_MLP
    repeats = args.repeats or (1 if args.quick else 3)
    print(machine_line(args.threads))
    print(f"mode: {'quick' if args.quick else 'full'}; times are the best of {repeats} run(s) "
          "(midpoint(100): one run); no timing is asserted")

    if not args.skip_relu:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import relu_fidelity

        relu_fidelity.main(quick=args.quick)

    runs, fidelity = {}, {}
    for dtype in (torch.float64, torch.float32):
        run = prepare_run(cfg, dtype)
        rows = fidelity_rows(run, repeats)
        runs[dtype], fidelity[dtype] = run, rows
        n_params = sum(p.numel() for p in run.model.parameters())
        print(f"\n[1] fidelity vs cost — modular-addition Transformer (mod {cfg.p}, d_model {cfg.d}, {cfg.heads} heads, "
              f"MLP {cfg.width}, {n_params:,} params), {cfg.n_train} samples in batches of {cfg.batch}, "
              f"{cfg.steps} AdamW steps, {cfg.n_test} test inputs × {cfg.p} logits, keep={KEEP}, params='tensor', "
              f"{str(dtype).replace('torch.', '')}")
        print(format_fidelity(rows, run))
        print(fidelity_verdict(rows, dtype))

    print("\n[2] overhead — decomposition time / bare torch.func evaluations it needed "
          f"(per-sample vmap(grad) + vmap(jacrev) at every node; target ≤ {TARGET_OVERHEAD})")
    for dtype in (torch.float64, torch.float32):
        labels = ("gauss_legendre(2)", "gauss_legendre(8)", "adaptive", "midpoint(10)")
        print(f"  {str(dtype).replace('torch.', '')}:")
        print(format_overhead(overhead_rows(runs[dtype], fidelity[dtype], labels)))
        d = per_node_diagnosis(runs[dtype])
        per_node = min(r.seconds / r.nodes for r in fidelity[dtype] if r.label == "midpoint(100)") * 1e3
        print(f"  per node ({d['jacobian MB']:.1f} MB Jacobian): decomposition ≈ {per_node:.1f} ms "
              f"(midpoint(100) time / nodes);\n    bare vmap(jacrev) {d['jacobian']:.1f} ms, isfinite check "
              f"{d['isfinite']:.1f} ms, weighted accumulation out of place {d['accumulate out of place']:.1f} ms "
              f"vs in place {d['accumulate in place']:.1f} ms")

    print("\n[3] cost relative to training — decomposition time / training time of the same run")
    print(f"  {'dtype':8s} {'training (s)':>12s} {'recorded (s)':>12s} {'rule':26s} {'decomp / training':>17s}")
    for dtype in (torch.float64, torch.float32):
        run = runs[dtype]
        for r in fidelity[dtype]:
            print(f"  {str(dtype).replace('torch.', ''):8s} {run.train_time:12.4f} {run.recorded_time:12.4f} "
                  f"{r.label:26s} {r.seconds / run.train_time:17.0f}")

    print(f"\n[4] scaling — one-hidden-layer tanh MLP ({mlp.inputs} inputs, {mlp.outputs} outputs), AdamW, batches "
          f"of {mlp.batch}, GL(8), keep={KEEP}, float64; each row two fresh subprocesses (time; memory); peak Δ = "
          "peak RSS (VmHWM, reset just before) during one decomposition − RSS before it")
    factors = (2,) if args.quick else (2, 4)
    results = [(label, c, scaling_measurement(c, args.threads)) for label, c in scaling_configs(mlp, factors)]
    print(format_scaling(results))
    print(f"\ntotal wall time {time.perf_counter() - t_start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
