"""Grokking, explained step by step and layer by layer (the paper's Section 5, Appendix E.2, Figures 3a, 5, 12).

A one-layer Transformer (explaind_math.experiments.modular_addition: the Appendix E.2 architecture
scaled down) learns (a + b) mod p with full-batch AdamW and strong weight decay (1.0, as in the paper
and Nanda et al. 2023). It first memorizes the training pairs and only much later generalizes. The
WHOLE run is recorded and decomposed, every step, at step × layer granularity:

    f_o(x; θ_N) = f_o(x; θ_0) + Σ_t Σ_layers ( I[t, layer, x, o] + Ψ[t, layer, x, o] )

(Theorem 3.1 with the training samples summed into one unit, Corollary F.2 with one group: one momentum
buffer instead of one per sample), with the certified residual. Then:

1. kernel vs regularization importance per layer over training (paper Figure 3a): influence_over_steps.png;
2. cosine-similarity matrices of the test inputs' influence vectors in three windows (after
   memorization, at generalization, the last), for the layers of the paper's Figure 5 (attention
   encoder and decoder, linear 2, decoder): similarity.png. The test inputs are (a, b₀) for every a
   and one fixed b₀, ordered by a, so a − a′ is the difference of the sums a + b₀;
3. the cosine features of the similarity matrix (Appendix Figure 12): for each layer, in the last
   window, the similarities S[a, a′] are regressed (least squares, with an intercept) on
   cos(2π k (a − a′)/p), k = 1 … ⌊p/2⌋; reported: the dominant frequency k (the largest fraction of
   variance explained by cos(2π k (a − a′)/p) alone) and that fraction, and the R² of all frequencies
   together (the paper fits a Lasso on cosines and sines; S is symmetric, so the sines carry nothing);
4. the key Fourier frequencies of the embedding (Nanda et al.): the power of the token embeddings
   E[a] at each frequency k, as a fraction of all non-constant power; if the analysis works, the
   similarity's dominant frequency is one of them: cosine_features.png;
5. the grokking curve (train/test accuracy) and the wall time of each phase, with a per-step cost
   breakdown of the decomposition (bare torch.func timings: per-sample gradients, the Jacobian at a
   quadrature node, its contraction, and the per-layer JVPs a contraction planner could use instead).

Choices (and why): no LayerNorm (``norm="none"``, as Nanda et al.) — with post-LN and weight decay the
run had loss spikes (weight decay shrinks the weights before a LayerNorm, which raises the effective
step size), and at those steps f is far from polynomial along θ_t → θ_{t+1}, so fixed quadrature missed
by O(1); GELU, not ReLU, so that Gauss–Legendre converges (README, "Tolerances"); a split of unordered
pairs {a, b} (without positional encoding [a, b, =] and [b, a, =] are one input); float64 throughout;
adaptive_gauss_legendre(1e-7): per step the fewest Gauss–Legendre nodes (1, 2, 3, 4, 6, 8 or 16) whose
exactly computed residual is below 1e-7 — most steps need few, the violent ones (a loss spike) more, and
only a step that 16 nodes do not resolve is bisected; one intra-op thread by default (``--threads``).

    python examples/grokking.py --out grokking_out            # full: about 9 minutes on one CPU core
    python examples/grokking.py --quick --out grokking_quick  # every step exercised, well under a minute

``main(argv)`` returns the results as a dict and prints them.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.func import functional_call, grad, jacrev, jvp, vmap

import explaind_math as em
from explaind_math import analysis, plots
from explaind_math.experiments import modular_addition as ma
from explaind_math.trajectory import Trajectory

KEEP = ("step", "param", "test", "output")  # units summed: one unit (Corollary F.2 with one group)
SIMILARITY_LAYERS = ("attention encoder", "attention decoder", "linear 2", "decoder")  # the paper's Figure 5


@dataclass(frozen=True)
class GrokkingConfig:
    p: int = 23
    train_fraction: float = 0.8  # of the unordered pairs {a, b}
    d_model: int = 32
    heads: int = 4
    mlp_width: int = 64
    norm: str = "none"
    activation: str = "gelu"
    lr: float = 1e-2
    weight_decay: float = 1.0
    betas: tuple[float, float] = (0.9, 0.98)
    max_steps: int = 2500
    stop_at_test_accuracy: float | None = 0.95  # then train extra_steps more (the cleanup phase)
    extra_steps: int = 100
    eval_every: int = 10
    test_b: int = 0  # test inputs: (a, test_b) for every a
    nodes: int = 3  # Gauss–Legendre nodes of the fixed rule (tol = None)
    tol: float | None = 1e-7  # adaptive_gauss_legendre(tol, HP_ORDERS) per step; None: fixed gauss_legendre(nodes)
    window_fraction: float = 0.05  # width of a similarity window, as a fraction of the steps
    seed: int = 0
    threads: int = 1  # intra-op threads for the decomposition (training always runs on one: its tensors are tiny)
    compare_steps: int = 0  # first steps on which per-sample units vs one unit (partition "all") are timed; 0: skip

    def quadrature(self):
        if self.tol is None:
            return em.gauss_legendre(self.nodes)
        return em.adaptive_gauss_legendre(self.tol, orders=HP_ORDERS)


#: Gauss–Legendre orders the hp-adaptive rule tries per step (bisecting only where the last is not enough)
HP_ORDERS = (1, 2, 3, 4, 6, 8, 16)
FULL = GrokkingConfig()
# tiny: no grokking expected; every analysis step runs. GL(8) fixed: the README's smooth-model tolerance.
QUICK = GrokkingConfig(p=7, train_fraction=0.6, d_model=8, heads=2, mlp_width=16, max_steps=40,
                       stop_at_test_accuracy=None, eval_every=5, nodes=8, tol=None, window_fraction=0.25,
                       compare_steps=2, threads=1)


# ---------------------------------------------------------------------------------------------- training
def train(cfg: GrokkingConfig):
    tokens, labels = ma.modular_addition_data(cfg.p)
    train_ids, test_ids = ma.train_test_split(cfg.p, cfg.train_fraction, seed=cfg.seed)
    torch.manual_seed(cfg.seed)
    model = ma.ModularAdditionTransformer(cfg.p, cfg.d_model, cfg.heads, cfg.mlp_width, activation=cfg.activation,
                                          norm=cfg.norm).to(torch.float64)
    run = ma.train_full_batch(
        model, tokens, labels, train_ids, test_ids, steps=cfg.max_steps, lr=cfg.lr, weight_decay=cfg.weight_decay,
        betas=cfg.betas, eval_every=cfg.eval_every, stop_at_test_accuracy=cfg.stop_at_test_accuracy,
        extra_steps_after_stop=cfg.extra_steps,
    )
    return run, tokens, labels, train_ids, test_ids


def test_inputs(p: int, b: int) -> torch.Tensor:
    """Tokens [a, b, =] for a = 0 … p − 1 (ordered by a)."""
    tokens, _ = ma.modular_addition_data(p)
    return tokens[ma.sample_id(torch.arange(p), b, p)]


# ---------------------------------------------------------------------------------------------- decomposition
def decompose(cfg, model, trajectory, tokens, labels, X_test, *, per_sample_units: bool = False):
    """The whole run at step × layer granularity. One unit (``partition="all"``, Corollary F.2) unless
    ``per_sample_units``: Theorem 3.1 with one buffer per training sample, units summed at the end."""
    layers = ma.paper_layers(model)
    options = dict(quadrature=cfg.quadrature(), keep=KEEP, params=layers, dtype=torch.float64)
    start = time.perf_counter()
    if per_sample_units:
        result = em.decompose_adamw_training(model, trajectory, ma.per_sample_loss, (tokens, labels), X_test, **options)
    else:
        result = em.decompose_by_partition(model, trajectory, ma.per_sample_loss, (tokens, labels), X_test, "all",
                                           **options)
    return result, time.perf_counter() - start


def first_steps(trajectory: Trajectory, k: int) -> Trajectory:
    """The run's first k steps as a trajectory of their own (θ_0 … θ_k)."""
    return Trajectory(optimizer=trajectory.optimizer, parameter_names=trajectory.parameter_names,
                      group_of=trajectory.group_of, parameters=trajectory.parameters[: k + 1],
                      steps=trajectory.steps[:k], initial_state=trajectory.initial_state,
                      buffers=trajectory.buffers, metadata=trajectory.metadata)


def _best_time(fn, repeats: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def cost_breakdown(model, trajectory: Trajectory, tokens, labels, X_test, step: int) -> dict:
    """Bare torch.func timings (seconds, best of 3) of what one decomposed step needs, at θ_step:
    per-sample gradients of the step's batch (vmap ∘ grad), the batch gradient alone (one backward:
    all that one unit needs), the Jacobian of f on the test inputs at one quadrature node (vmap ∘ jacrev),
    its contraction with the per-layer kernel and regularization updates, and the alternative a
    contraction planner could take when layers are kept and units summed: one JVP per layer and part
    (2 · layers tangents, vmapped) at one node."""
    names = trajectory.parameter_names
    theta = {n: trajectory.parameters[step][n] for n in names}
    delta = {n: trajectory.parameters[step + 1][n] - theta[n] for n in names}
    ids = torch.as_tensor(trajectory.steps[step].sample_ids)
    xb, yb = tokens[ids], labels[ids]

    def f_one(params, x):
        return functional_call(model, params, (x.unsqueeze(0),)).squeeze(0)

    def loss_one(params, x, y):
        return ma.per_sample_loss(f_one(params, x), y)

    def batch_gradient():
        leaves = {n: v.clone().requires_grad_() for n, v in theta.items()}
        loss = ma.per_sample_loss(functional_call(model, leaves, (xb,)), yb)
        return torch.autograd.grad(loss, list(leaves.values()))

    layers = ma.paper_layers(model)
    groups = list(dict.fromkeys(layers.values()))
    # tangents: Δθ restricted to each layer, twice (stands in for the kernel and regularization parts)
    tangents = {n: torch.stack([delta[n] * (layers[n] == g) for g in groups for _ in range(2)]) for n in names}
    jacobian = vmap(jacrev(f_one), in_dims=(None, 0))(theta, X_test)

    def contract():
        out = torch.zeros(len(groups), 2, *jacobian[names[0]].shape[:2], dtype=torch.float64)
        for n in names:
            J = jacobian[n].reshape(*jacobian[n].shape[:2], -1)
            d = delta[n].reshape(-1)
            g = groups.index(layers[n])
            out[g, 0] += J @ d
            out[g, 1] += J @ d
        return out

    def batched_f(params):
        return functional_call(model, params, (X_test,))

    def group_jvps():
        return vmap(lambda t: jvp(batched_f, (theta,), (t,))[1])(tangents)

    return {
        "per_sample_gradients": _best_time(lambda: vmap(grad(loss_one), in_dims=(None, 0, 0))(theta, xb, yb)),
        "batch_gradient": _best_time(batch_gradient),
        "jacobian_one_node": _best_time(lambda: vmap(jacrev(f_one), in_dims=(None, 0))(theta, X_test)),
        "contract_one_node": _best_time(contract),
        "layer_jvps_one_node": _best_time(group_jvps),
        "batch": int(ids.numel()),
        "layers": len(groups),
    }


# ---------------------------------------------------------------------------------------------- analyses
def windows_of(history, num_steps: int, fraction: float) -> list[tuple[int, int]]:
    """Three step windows [s, s + w): after memorization (train accuracy ≥ 0.99, or a third of the way),
    at generalization (test accuracy ≥ 0.9, or two thirds of the way), and the last w steps."""
    w = max(1, round(fraction * num_steps))
    memorized = next((s for s, _, acc, _ in history if acc >= 0.99), num_steps // 3)
    generalized = next((s for s, _, _, acc in history if acc >= 0.9), 2 * num_steps // 3)
    starts = [min(memorized, num_steps - w), min(generalized, num_steps - w), num_steps - w]
    return [(s, s + w) for s in starts]


def cosine_features(similarity: np.ndarray) -> dict:
    """Least-squares fit of the similarity matrix S[a, a′] (test inputs ordered by a) on an intercept and
    cos(2π k (a − a′)/p), k = 1 … ⌊p/2⌋ (Appendix Figure 12; S is symmetric, so sines carry nothing).

    Every entry is fitted, the diagonal (S[a, a] = 1) included: off the diagonal alone the cosines sum
    to the constant −1/2 and the intercept would not be identifiable. Together the ⌊p/2⌋ cosines and the
    intercept span every function of a − a′ mod p, so the R² of the full fit measures how far S depends on
    a − a′ only. Per k, the fraction of variance explained by cos(2π k (a − a′)/p) alone is the R² of the
    one-feature fit with intercept; the dominant k is the largest. Returns None when S holds NaNs (a
    zero influence vector) or is constant."""
    p = similarity.shape[0]
    if not np.isfinite(similarity).all():
        return None
    a, b = np.meshgrid(np.arange(p), np.arange(p), indexing="ij")
    y = similarity.reshape(-1)
    freqs = np.arange(1, p // 2 + 1)
    features = np.cos(2 * np.pi * freqs[None, :] * (a - b).reshape(-1)[:, None] / p)
    total = float(((y - y.mean()) ** 2).sum())
    if total <= 1e-300:
        return None

    def r_squared(columns):
        design = np.column_stack([np.ones_like(y), columns])
        coef, *_ = np.linalg.lstsq(design, y, rcond=None)
        residual = float(((y - design @ coef) ** 2).sum())
        return min(1.0, max(0.0, 1.0 - residual / total)), coef

    r2_all, coef = r_squared(features)
    alone = [r_squared(features[:, [k]])[0] for k in range(len(freqs))]
    dominant = int(np.argmax(alone))
    return {
        "frequencies": freqs.tolist(),
        "coefficients": coef[1:].tolist(),
        "intercept": float(coef[0]),
        "r2_all_frequencies": r2_all,
        "explained_alone": alone,
        "dominant_frequency": int(freqs[dominant]),
        "dominant_explained": alone[dominant],
    }


def fourier_power(rows: torch.Tensor) -> dict:
    """Power of a table indexed by residue (p, d) at each frequency k = 1 … ⌊p/2⌋,
    Σ_d |Σ_a rows[a, d] e^{−2πi k a/p}|², as a fraction of all non-constant power; top frequencies first."""
    p = rows.shape[0]
    spectrum = torch.fft.fft(rows.detach().to(torch.float64), dim=0).abs() ** 2  # (p, d)
    freqs = list(range(1, p // 2 + 1))
    power = torch.stack([spectrum[k].sum() + (spectrum[p - k].sum() if p - k != k else 0) for k in freqs])
    fraction = (power / power.sum()).tolist()
    order = sorted(range(len(freqs)), key=lambda k: -fraction[k])
    return {"frequencies": freqs, "fraction": fraction, "top": [freqs[k] for k in order],
            "top_fraction": [fraction[k] for k in order]}


def plot_cosine_features(fits: dict, embedding: dict, history, path: Path, window) -> None:
    from matplotlib.figure import Figure

    layers = [name for name, fit in fits.items() if fit is not None]
    fig = Figure(figsize=(13, 3.4), layout="constrained")
    ax_curve, ax_fit, ax_embed = fig.subplots(1, 3)
    steps = [h[0] for h in history]
    ax_curve.plot(steps, [h[2] for h in history], label="train")
    ax_curve.plot(steps, [h[3] for h in history], label="test")
    ax_curve.set(title="accuracy (the grokking curve)", xlabel="step", ylim=(-0.02, 1.02))
    ax_curve.legend(fontsize="small")
    width = 0.8 / max(1, len(layers))
    for i, name in enumerate(layers):
        fit = fits[name]
        ax_fit.bar(np.asarray(fit["frequencies"]) + (i - (len(layers) - 1) / 2) * width, fit["explained_alone"],
                   width=width, label=name)
    ax_fit.set(title=f"similarity ~ cos(2πk(a−a′)/p), steps {window[0]}:{window[1]}", xlabel="frequency k",
               ylabel="variance explained alone")
    ax_fit.legend(fontsize="x-small")
    ax_embed.bar(embedding["frequencies"], embedding["fraction"])
    ax_embed.set(title="embedding: Fourier power by frequency", xlabel="frequency k", ylabel="fraction of power")
    fig.savefig(path, format="png", dpi=100)


# ---------------------------------------------------------------------------------------------- main
def run_experiment(cfg: GrokkingConfig, out: Path) -> dict:
    """Train, decompose, analyse and plot; the caller's intra-op thread count is restored afterwards."""
    threads = torch.get_num_threads()
    try:
        return _run_experiment(cfg, out)
    finally:
        torch.set_num_threads(threads)


def _run_experiment(cfg: GrokkingConfig, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    walls = {}
    start_all = time.perf_counter()

    print(f"[1/5] training: p = {cfg.p}, train fraction {cfg.train_fraction} of the unordered pairs, full-batch "
          f"AdamW lr {cfg.lr}, weight decay {cfg.weight_decay}, up to {cfg.max_steps} steps", flush=True)
    torch.set_num_threads(1)
    try:
        run, tokens, labels, train_ids, test_ids = train(cfg)
    finally:
        torch.set_num_threads(cfg.threads)
    walls["training"] = run.seconds
    trajectory, model = run.trajectory, run.model
    N = trajectory.num_steps
    memorized = next((s for s, _, acc, _ in run.history if acc >= 0.99), None)
    crossed = run.first_step_reaching(0.9)
    X_test = test_inputs(cfg.p, cfg.test_b)

    comparison = None
    if cfg.compare_steps:
        print(f"[2/5] per-sample units vs one unit on the first {cfg.compare_steps} steps", flush=True)
        prefix = first_steps(trajectory, min(cfg.compare_steps, N))
        _, t_units = decompose(cfg, model, prefix, tokens, labels, X_test, per_sample_units=True)
        _, t_one = decompose(cfg, model, prefix, tokens, labels, X_test)
        comparison = {"steps": prefix.num_steps, "per_sample_units_seconds": t_units, "one_unit_seconds": t_one}

    print(f"[3/5] decomposing all {N} steps (quadrature {cfg.quadrature().describe()}, {X_test.shape[0]} test "
          f"inputs × {cfg.p} outputs, {len(set(ma.paper_layers(model).values()))} layers)", flush=True)
    result, walls["decomposition"] = decompose(cfg, model, trajectory, tokens, labels, X_test)
    print(result.summary(), flush=True)

    print("[4/5] per-step cost breakdown (bare torch.func)", flush=True)
    start = time.perf_counter()
    breakdown = cost_breakdown(model, trajectory, tokens, labels, X_test, N - 1)
    walls["cost_breakdown"] = time.perf_counter() - start

    print("[5/5] analyses and plots", flush=True)
    start = time.perf_counter()
    windows = windows_of(run.history, N, cfg.window_fraction)
    layer_names = list(result.param_labels)
    paths = {
        "influence_over_steps": out / "influence_over_steps.png",
        "similarity": out / "similarity.png",
        "cosine_features": out / "cosine_features.png",
    }
    plots.plot_influence_over_steps(result, groups=None, path=paths["influence_over_steps"])
    shown = [name for name in SIMILARITY_LAYERS if name in layer_names]
    plots.plot_similarity_matrices(result, windows, layers=shown, groups=None, path=paths["similarity"])
    last = windows[-1]
    similarities, fits = {}, {}
    for name in layer_names:
        matrix = analysis.similarity_matrix(result, groups=None, params=name, steps=list(range(*last))).numpy()
        similarities[name] = matrix
        fits[name] = cosine_features(matrix)
    embedding = fourier_power(model.embed.weight[: cfg.p])
    decoder_rows = fourier_power(model.decoder.weight)
    plot_cosine_features(fits, embedding, run.history, paths["cosine_features"], last)
    importance = analysis.accumulated_importance(result, ("param",), groups=None)
    reg_importance = analysis.accumulated_regularization_importance(result, ("param",), groups=None)
    walls["analysis"] = time.perf_counter() - start
    walls["total"] = time.perf_counter() - start_all

    headline = fits.get("decoder")
    nodes = list(result.nodes_per_step)
    results = {
        "config": asdict(cfg),
        "training": {
            "steps": N, "train_size": int(train_ids.numel()), "test_size": int(test_ids.numel()),
            "memorized_step": memorized, "test_accuracy_0.9_step": crossed, "grokked": crossed is not None,
            "final_train_accuracy": run.history[-1][2], "final_test_accuracy": run.history[-1][3],
            "history": run.history,
        },
        "decomposition": {
            "theorem": result.theorem, "quadrature": result.quadrature, "nodes_total": int(sum(nodes)),
            "nodes_per_step_mean": float(np.mean(nodes)), "nodes_per_step_max": int(max(nodes)),
            "max_residual": result.max_residual, "relative_residual": result.relative_residual,
            "max_replay_error": result.max_replay_error,
            "max_abs_change": float((result.f_final - result.f_initial).abs().max()),
            "kernel_shape": list(result.kernel.shape), "kernel_axes": list(result.kernel_axes),
            "layers": layer_names, "seconds_per_step": walls["decomposition"] / N,
        },
        "comparison_units": comparison,
        "cost_breakdown": breakdown,
        "windows": windows,
        "importance_per_layer": dict(zip(importance.coords["param"], importance.numpy().tolist())),
        "regularization_importance_per_layer": dict(zip(reg_importance.coords["param"], reg_importance.numpy().tolist())),
        "similarity_shape": list(next(iter(similarities.values())).shape),
        "cosine_fit": fits,
        "headline_layer": "decoder",
        "similarity_dominant_frequency": None if headline is None else headline["dominant_frequency"],
        "similarity_dominant_explained": None if headline is None else headline["dominant_explained"],
        "embedding_frequencies": embedding,
        "decoder_weight_frequencies": decoder_rows,
        "frequencies_agree": None if headline is None else headline["dominant_frequency"] in embedding["top"][:3],
        "plots": {k: str(v) for k, v in paths.items()},
        "wall_seconds": walls,
    }
    (out / "results.json").write_text(json.dumps(results, indent=1, default=float))
    report(results)
    return results


def report(r: dict) -> None:
    t, d = r["training"], r["decomposition"]
    print("\ngrokking curve (step: train loss, train accuracy, test accuracy):")
    history = t["history"]
    stride = max(1, len(history) // 25)
    for step, loss, acc_train, acc_test in history[::stride] + ([history[-1]] if (len(history) - 1) % stride else []):
        print(f"  {step:6d}: {loss:9.4f} {acc_train:6.3f} {acc_test:6.3f}")
    print(f"memorized (train accuracy ≥ 0.99) at step {t['memorized_step']}; test accuracy ≥ 0.9 at step "
          f"{t['test_accuracy_0.9_step'] if t['grokked'] else 'never (did not grok)'}; "
          f"final train/test accuracy {t['final_train_accuracy']:.3f}/{t['final_test_accuracy']:.3f}")
    print(f"decomposition of all {t['steps']} steps: {d['theorem']}, {d['quadrature']}, nodes/step mean "
          f"{d['nodes_per_step_mean']:.2f} (max {d['nodes_per_step_max']}); certified residual max |r| = "
          f"{d['max_residual']:.3e}, relative {d['relative_residual']:.3e} (max |Δf| {d['max_abs_change']:.3g}); "
          f"replay error {d['max_replay_error']:.1e}")
    print("importance Σ_{t,x,o}|·| per layer (kernel / regularization):")
    for name, value in r["importance_per_layer"].items():
        print(f"  {name:18s} {value:12.4g} {r['regularization_importance_per_layer'][name]:12.4g}")
    window = r["windows"][-1]
    print(f"cosine features of the similarity matrix, steps {window[0]}:{window[1]} (dominant k, variance explained "
          "by it alone, R² of all k):")
    for name, fit in r["cosine_fit"].items():
        if fit is None:
            print(f"  {name:18s} (zero influence: no similarity)")
        else:
            print(f"  {name:18s} k = {fit['dominant_frequency']:2d}  {fit['dominant_explained']:.3f}  "
                  f"{fit['r2_all_frequencies']:.3f}")
    e, dec = r["embedding_frequencies"], r["decoder_weight_frequencies"]
    print("key Fourier frequencies (fraction of power) — embedding: "
          + ", ".join(f"{k} ({f:.2f})" for k, f in zip(e["top"][:4], e["top_fraction"][:4]))
          + "; decoder weights: " + ", ".join(f"{k} ({f:.2f})" for k, f in zip(dec["top"][:4], dec["top_fraction"][:4])))
    print(f"decoder similarity's dominant frequency {r['similarity_dominant_frequency']} among the embedding's top 3: "
          f"{r['frequencies_agree']}")
    c = r["cost_breakdown"]
    per_node = c["jacobian_one_node"] + c["contract_one_node"]
    print(f"per-step cost (bare torch.func, ms): per-sample gradients of {c['batch']} samples "
          f"{1e3 * c['per_sample_gradients']:.1f} (the batch gradient alone {1e3 * c['batch_gradient']:.1f}); per node: "
          f"Jacobian {1e3 * c['jacobian_one_node']:.1f} + contraction {1e3 * c['contract_one_node']:.1f}, vs "
          f"{2 * c['layers']} per-layer JVPs {1e3 * c['layer_jvps_one_node']:.1f}; measured decomposition "
          f"{1e3 * d['seconds_per_step']:.1f} per step at {d['nodes_per_step_mean']:.2f} nodes "
          f"(bare estimate {1e3 * (c['per_sample_gradients'] + d['nodes_per_step_mean'] * per_node):.1f})")
    if r["comparison_units"]:
        cmp = r["comparison_units"]
        print(f"first {cmp['steps']} steps: per-sample units {cmp['per_sample_units_seconds']:.2f} s vs one unit "
              f"(partition 'all') {cmp['one_unit_seconds']:.2f} s")
    print("wall seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in r["wall_seconds"].items()))
    print("plots: " + ", ".join(r["plots"].values()))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny modulus, few steps: no grokking, every analysis runs")
    parser.add_argument("--out", default="grokking_out", help="directory for the PNGs and results.json")
    parser.add_argument("--p", type=int, help="modulus (overrides the mode's)")
    parser.add_argument("--max-steps", type=int)
    parser.add_argument("--nodes", type=int, help="Gauss–Legendre nodes per segment")
    parser.add_argument("--tol", type=float, help="adaptive tolerance per step (≤ 0: fixed Gauss–Legendre)")
    parser.add_argument("--threads", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--compare-units", type=int, dest="compare_steps",
                        help="time per-sample units against one unit on this many first steps (0: skip)")
    args = parser.parse_args(argv)
    cfg = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("p", args.p), ("max_steps", args.max_steps), ("nodes", args.nodes),
                                   ("threads", args.threads), ("seed", args.seed),
                                   ("compare_steps", args.compare_steps)) if v is not None}
    if args.tol is not None:
        overrides["tol"] = args.tol if args.tol > 0 else None
    cfg = replace(cfg, **overrides)
    return run_experiment(cfg, Path(args.out))


if __name__ == "__main__":
    main()
