"""Table 1 revisited: how many quadrature nodes does the exact path kernel need? (paper Section 3.1)

Three models, each trained by a real torch.optim optimizer and recorded, then decomposed
(f(x; θ_N) = f(x; θ_0) + Σ I + Σ Ψ, MATH.md §1-§3) once per quadrature rule of the test feature map
Φ_t(x) = ∫_0^1 ∂_θ f(x; θ_t + α Δθ_t) dα:

    (a) a small CNN on scikit-learn's 8×8 digits, AdamW in mini-batches        Theorem 3.1
    (b) the modular-addition one-layer Transformer (Appendix E.2, scaled down),
        AdamW on full batches                                                  Theorem 3.1
    (c) a small residual CNN on the digits, SGD + momentum in mini-batches     Corollary 3.2

One row per rule — midpoint(10), midpoint(100) (the paper's two settings), Gauss–Legendre with 2, 4
and 8 nodes, adaptive GL(8) (bisects a step until its exactly computed residual is below 1e-11) and
hp-adaptive GL (per step the lowest of 1, 2, 4, …, 32 nodes whose residual is below 1e-11, chosen by
JVP probes; bisection only where 32 do not suffice) —
with the average nodes per step, the EPK accuracy (argmax of the reconstruction = argmax of f(x; θ_N)),
the KL divergence KL(softmax f(θ_N) ‖ softmax reconstruction) averaged over test inputs (MATH.md §10),
the certified float64 residual max |f(θ_N) − reconstruction|, absolute and relative to
1 + |f(θ_N) − f(θ_0)|, and the wall time of the decomposition.

What the paper reported (Table 1; ResNet-9 on CIFAR-2, a Transformer on MOD-113 and a CNN on MNIST, the
midpoint rule only, ReLU models):

    integration steps   ResNet9 acc / KL    Transformer acc / KL    CNN acc / KL
    10                  0.997 / 0.0         0.748 / 0.885           0.998 / 0.0
    100                 1.0   / 0.0         1.0   / 0.0             1.0   / 0.0

What the full mode measured here (one run, seed 0, 2-core CPU, one thread; relative residuals, and the
average nodes per step of the adaptive rules):

    model (D, steps)                 mid(10)   mid(100)  GL(2)     GL(4)     GL(8)     adaptive GL(8)  hp-adaptive
    CNN, AdamW (3658, 30)            3.2e-4    3.2e-6    7.3e-5    2.4e-9    4.3e-15   4.4e-15 (8)     2.2e-12 (6.8)
    Transformer mod-23, AdamW (10039, 40)
                                     2.9e-4    2.9e-6    7.0e-4    1.9e-7    2.0e-14   1.9e-14 (8)     1.9e-14 (8)
    ResNet, SGD+momentum (2746, 30)  1.4e-2    1.3e-4    9.6e-1    1.8e-1    4.1e-2    1.0e-12 (20.8)  1.3e-12 (14)

EPK accuracy was 1.0 everywhere except the ResNet with GL(2) (0.970, KL 1.1e-2); every other KL was
≤ 4e-4. So the argmax and the softmax, the paper's two measures, are forgiving: they stay at 1.0 / ≈0
while the decomposition misses f(x; θ_N) by 1e-2 (midpoint(10) on the ResNet). The residual is the
sharper certificate. Our models are much smaller than the paper's and use smooth activations (GELU,
tanh, average pooling: see ``explaind_math.experiments.digits``), so Gauss–Legendre converges
exponentially in the number of nodes — but how fast depends on the step: on the CNN and the
Transformer GL(8) reaches 1e-14 with a twelfth of midpoint(100)'s nodes, while on the ResNet
(SGD, lr 0.2, momentum 0.9: large steps through tanh) a few steps make f oscillate along the segment
and GL(8) stays at 4e-2, worse than midpoint(10) (on its worst step and logit the error was 2.8e-3 with
GL(8), 2.5e-6 with GL(16), 5e-13 with GL(32)). The adaptive rules find those steps and certify
1e-12: bisection at 21 nodes per step on average, the hp rule (more nodes where a step needs them) at 14,
against midpoint(100)'s 100 nodes and its 1.3e-4. Wall times (same table, seconds): midpoint(100) 25 / 40
/ 69, GL(8) 2.5 / 5.4 / 7.3, hp-adaptive 3.8 / 7.9 / 22.6. Our small GELU Transformer (40 full-batch
steps, still at chance on the test pairs) did not reproduce the paper's drop to 0.748 at 10 midpoint
nodes (its residual there is 3e-4 relative, far below the logit gaps); we cannot tell from the paper
what made its ReLU Transformer at p = 113 need more nodes (larger steps, kinks, or both).

The paper's models are ReLU models, so two more rows use them: (a') the CNN with ReLU and max-pooling and
(b') the paper's ReLU Transformer (``PaperModularAdditionTransformer``, tokens [a, P, b, P + 1]). There
every fixed rule converges only algebraically across the kinks, and the default rule (``quadrature=None``,
piecewise Gauss–Legendre between the breakpoints of each test input, MATH.md §13) is the exact one. Quick
mode, float64, on a loaded 2-core machine: ReLU CNN (3 steps, 8 test inputs) GL(8) 5.2e-3 relative,
piecewise 1.3e-15 (46 nodes per step, the most any input used; its steps cross dozens of kinks); ReLU Transformer midpoint(100)
1.3e-4 in 14.4 s, GL(8) 1.1e-3, piecewise 2.6e-11 with 8 nodes per step in 5.4 s. The bisection rules are
left out on these models (``RELU_RULES``): ~2 · 30 segments per kink make them take minutes.

    python examples/table1_revisited.py            # full: about 4.5 CPU-minutes (one thread)
    python examples/table1_revisited.py --quick    # smaller models, fewer steps: well under a minute
    python examples/table1_revisited.py --models cnn,resnet --threads 2
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from typing import Callable

import torch

import explaind_math as em
from explaind_math.experiments import digits, metrics

#: per-step tolerance of the adaptive rule: N steps give a total ≤ N · 1e-11, below 1e-9 for N ≤ 100
ADAPTIVE_TOLERANCE = 1e-11
#: the quadrature rules of the table, in printing order: the paper's two, then Gauss–Legendre
RULES: tuple[tuple[str, Callable[[], object]], ...] = (
    ("midpoint(10)", lambda: em.midpoint(10)),
    ("midpoint(100)", lambda: em.midpoint(100)),
    ("gauss_legendre(2)", lambda: em.gauss_legendre(2)),
    ("gauss_legendre(4)", lambda: em.gauss_legendre(4)),
    ("gauss_legendre(8)", lambda: em.gauss_legendre(8)),
    ("adaptive GL(8)", lambda: em.adaptive(em.gauss_legendre(8), tol=ADAPTIVE_TOLERANCE)),
    ("hp-adaptive GL", lambda: em.adaptive_gauss_legendre(ADAPTIVE_TOLERANCE, orders=(1, 2, 4, 8, 16, 32))),
    ("piecewise (default)", lambda: None),
)
#: the rules on the ReLU models: bisection (adaptive GL(8), hp-adaptive) pays ~2 · 30 segments per kink and
#: a ReLU CNN step crosses dozens (minutes even in quick mode), so they are left out there
RELU_RULES = tuple(rule for rule in RULES if "adaptive" not in rule[0])
#: the smooth models (GELU, tanh, average pooling) and the paper's own kind: ReLU with max-pooling, and the
#: paper's ReLU Transformer (MATH.md §13: the default rule integrates between their kinks)
MODELS = ("cnn", "transformer", "resnet", "relu-cnn", "relu-transformer")

#: sizes of the two modes: (quick, full)
SIZES = {
    "cnn": {
        True: dict(channels=(4, 8), hidden=16, num_train=256, num_test=16, steps=5, batch_size=64),
        False: dict(channels=(8, 16), hidden=32, num_train=None, num_test=100, steps=30, batch_size=64),
    },
    "resnet": {
        True: dict(channels=4, num_train=256, num_test=16, steps=5, batch_size=64),
        False: dict(channels=8, num_train=None, num_test=100, steps=30, batch_size=64),
    },
    "relu-cnn": {
        True: dict(channels=(4, 8), hidden=16, num_train=256, num_test=8, steps=3, batch_size=64),
        False: dict(channels=(8, 16), hidden=32, num_train=None, num_test=100, steps=30, batch_size=64),
    },
    "relu-transformer": {
        True: dict(p=11, d_model=16, heads=2, mlp_width=32, num_train=32, steps=5, lr=1e-3, num_test=8),
        False: dict(p=23, d_model=32, heads=4, mlp_width=64, num_train=128, steps=20, lr=1e-3, num_test=32),
    },
    "transformer": {
        True: dict(p=11, d_model=16, heads=2, mlp_width=32, train_fraction=0.5, steps=5, lr=1e-2,
                   weight_decay=1.0, num_test=16),
        False: dict(p=23, d_model=32, heads=4, mlp_width=64, train_fraction=0.5, steps=40, lr=1e-2,
                    weight_decay=1.0, num_test=100),
    },
}


@dataclass
class Setting:
    """One recorded run to decompose: the arguments of a theorem function, and what describes it."""

    name: str
    description: str
    decompose: Callable
    model: torch.nn.Module
    trajectory: em.Trajectory
    loss_fn: Callable
    train_data: tuple
    test_inputs: torch.Tensor
    test_labels: torch.Tensor
    train_seconds: float

    @property
    def model_accuracy(self) -> float:
        with torch.no_grad():
            return metrics.accuracy(self.model(self.test_inputs), self.test_labels)

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def cnn_setting(quick: bool, seed: int) -> Setting:
    """(a) SmallCNN on the digits, AdamW (lr 2e-2, weight decay 1e-2) in mini-batches."""
    s = SIZES["cnn"][quick]
    data = digits.load_digits_data(num_train=s["num_train"], num_test=s["num_test"], seed=seed)
    model = digits.make_model(digits.SmallCNN, seed=seed, channels=s["channels"], hidden=s["hidden"])
    start = time.perf_counter()
    run = digits.train_digits(model, data, optimizer_factory=digits.default_adamw, steps=s["steps"],
                              batch_size=s["batch_size"], seed=seed)
    seconds = time.perf_counter() - start
    return Setting("CNN / digits / AdamW", f"{s['steps']} steps of {s['batch_size']} of {data.num_train} samples",
                   em.decompose_adamw_training, run.model, run.trajectory, digits.digits_loss, data.train,
                   data.test_x, data.test_y, seconds)


def resnet_setting(quick: bool, seed: int) -> Setting:
    """(c) SmallResidualCNN on the digits, SGD (lr 0.2, momentum 0.9, weight decay 5e-4) in mini-batches."""
    s = SIZES["resnet"][quick]
    data = digits.load_digits_data(num_train=s["num_train"], num_test=s["num_test"], seed=seed)
    model = digits.make_model(digits.SmallResidualCNN, seed=seed, channels=s["channels"])
    start = time.perf_counter()
    run = digits.train_digits(model, data, optimizer_factory=digits.default_sgd_momentum, steps=s["steps"],
                              batch_size=s["batch_size"], seed=seed)
    seconds = time.perf_counter() - start
    return Setting("ResNet / digits / SGD+momentum",
                   f"{s['steps']} steps of {s['batch_size']} of {data.num_train} samples",
                   em.decompose_sgd_momentum_training, run.model, run.trajectory, digits.digits_loss,
                   data.train, data.test_x, data.test_y, seconds)


def transformer_setting(quick: bool, seed: int) -> Setting:
    """(b) the modular-addition Transformer (GELU, post-LN), AdamW on full batches, betas (0.9, 0.98)."""
    from explaind_math.experiments import modular_addition as ma

    s = SIZES["transformer"][quick]
    tokens, labels = ma.modular_addition_data(s["p"])
    train_ids, test_ids = ma.train_test_split(s["p"], s["train_fraction"], seed=seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ma.ModularAdditionTransformer(s["p"], s["d_model"], s["heads"], s["mlp_width"])
    model = model.double()
    run = ma.train_full_batch(model, tokens, labels, train_ids, test_ids, steps=s["steps"], lr=s["lr"],
                              weight_decay=s["weight_decay"], record_gradients=True, eval_every=s["steps"])
    test = test_ids[: s["num_test"]]
    return Setting(f"Transformer / mod-{s['p']} / AdamW",
                   f"{s['steps']} full-batch steps on {train_ids.numel()} of {s['p'] ** 2} pairs",
                   em.decompose_adamw_training, run.model, run.trajectory, ma.per_sample_loss, (tokens, labels),
                   tokens[test], labels[test], run.seconds)


class MaxPoolReLUCNN(digits.SmallCNN):
    """``SmallCNN`` as the paper trains its CNNs: ReLU and 2×2 max-pooling."""

    def __init__(self, channels=(8, 16), hidden=32):
        super().__init__(channels, hidden, activation="relu")

    def forward(self, x):
        x = torch.nn.functional.max_pool2d(self.act1(self.conv1(x)), 2)
        x = torch.nn.functional.max_pool2d(self.act2(self.conv2(x)), 2)
        return self.output(self.act3(self.fc(x.flatten(-3))))


def relu_cnn_setting(quick: bool, seed: int) -> Setting:
    """(a') the CNN with ReLU and max-pooling (the paper's kind), AdamW as in (a)."""
    s = SIZES["relu-cnn"][quick]
    data = digits.load_digits_data(num_train=s["num_train"], num_test=s["num_test"], seed=seed)
    model = digits.make_model(MaxPoolReLUCNN, seed=seed, channels=s["channels"], hidden=s["hidden"])
    start = time.perf_counter()
    run = digits.train_digits(model, data, optimizer_factory=digits.default_adamw, steps=s["steps"],
                              batch_size=s["batch_size"], seed=seed)
    return Setting("ReLU CNN / digits / AdamW", f"{s['steps']} steps of {s['batch_size']} of {data.num_train} "
                   "samples, ReLU + max-pooling", em.decompose_adamw_training, run.model, run.trajectory,
                   digits.digits_loss, data.train, data.test_x, data.test_y, time.perf_counter() - start)


def relu_transformer_setting(quick: bool, seed: int) -> Setting:
    """(b') the paper's ReLU Transformer (tokens [a, P, b, P + 1]), AdamW (lr 1e-3, weight decay 1, betas
    (0.9, 0.98)) on full batches of ``num_train`` random pairs; its outputs are log-probabilities, on which
    cross-entropy is the negative log-likelihood (log-softmax is idempotent)."""
    from explaind_math.experiments import modular_addition as ma

    s = SIZES["relu-transformer"][quick]
    tokens, labels = ma.paper_token_data(s["p"])
    order = torch.randperm(s["p"] ** 2, generator=torch.Generator().manual_seed(seed))
    train_ids, test_ids = order[: s["num_train"]], order[s["num_train"]:]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ma.PaperModularAdditionTransformer(s["p"], s["d_model"], s["heads"], s["mlp_width"]).double()
    run = ma.train_full_batch(model, tokens, labels, train_ids, test_ids, steps=s["steps"], lr=s["lr"],
                              weight_decay=1.0, eval_every=s["steps"])
    test = test_ids[: s["num_test"]]
    return Setting(f"ReLU Transformer / mod-{s['p']} / AdamW",
                   f"{s['steps']} full-batch steps on {s['num_train']} of {s['p'] ** 2} pairs (the paper's model)",
                   em.decompose_adamw_training, run.model, run.trajectory, ma.per_sample_loss, (tokens, labels),
                   tokens[test], labels[test], run.seconds)


BUILDERS = {"cnn": cnn_setting, "transformer": transformer_setting, "resnet": resnet_setting,
            "relu-cnn": relu_cnn_setting, "relu-transformer": relu_transformer_setting}


def table_rows(setting: Setting, rules=RULES) -> list[dict]:
    """Decompose ``setting`` once per quadrature rule (float64, only the test and output axes kept: the
    cheapest contraction, MATH.md §11) and measure the reconstruction."""
    rows = []
    for label, make_rule in rules:
        start = time.perf_counter()
        result = setting.decompose(setting.model, setting.trajectory, setting.loss_fn, setting.train_data,
                                   setting.test_inputs, quadrature=make_rule(), keep=("test", "output"),
                                   dtype=torch.float64)
        seconds = time.perf_counter() - start
        scores = metrics.reconstruction_metrics(result)
        rows.append({
            "model": setting.name,
            "rule": label,
            "nodes_per_step": sum(result.nodes_per_step) / len(result.nodes_per_step),
            **scores,
            "max_change": float((result.f_final - result.f_initial).abs().max()),
            "seconds": seconds,
        })
    return rows


def format_table(rows: list[dict]) -> str:
    header = (f"{'model':32s} {'rule':18s} {'nodes/step':>10s} {'EPK acc':>8s} {'KL':>10s} {'max |residual|':>15s} "
              f"{'relative':>10s} {'seconds':>8s}")
    lines = [header, "-" * len(header)]
    for r in rows:
        lines.append(f"{r['model']:32s} {r['rule']:18s} {r['nodes_per_step']:10.1f} {r['epk_accuracy']:8.3f} "
                     f"{r['kl']:10.2e} {r['max_residual']:15.2e} {r['relative_residual']:10.2e} {r['seconds']:8.2f}")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small models and few steps (well under a minute)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of {', '.join(MODELS)} (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch.set_num_threads (default 1: the models are tiny, and intra-op threads on a "
                             "busy 2-core machine made a run many times slower)")
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(MODELS)
    if unknown or not args.models:
        parser.error(f"--models: unknown {sorted(unknown)}; choose from {', '.join(MODELS)}")
    return args


def main(argv=None) -> list[dict]:
    """Run the experiment and print the table; returns its rows (one dict per model and rule)."""
    args = parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        rows = []
        start = time.perf_counter()
        for name in args.models:
            setting = BUILDERS[name](args.quick, args.seed)
            print(f"{setting.name}: {setting.description}; D = {setting.num_parameters} parameters, "
                  f"{len(setting.test_inputs)} test inputs; test accuracy {setting.model_accuracy:.3f}; "
                  f"trained in {setting.train_seconds:.1f} s", flush=True)
            rows += table_rows(setting, RELU_RULES if name.startswith("relu") else RULES)
        print()
        print(format_table(rows))
        print(f"\ntotal {time.perf_counter() - start:.1f} s ({'quick' if args.quick else 'full'} mode, "
              f"{args.threads} threads); KL = KL(softmax f(θ_N) ‖ softmax reconstruction), mean over test inputs")
    finally:
        torch.set_num_threads(threads)
    return rows


if __name__ == "__main__":
    main()
