"""Example 4 — causal data attribution (the paper's Appendix G.1; MATH.md §10, linear datamodeling score).

A small CNN is trained on scikit-learn's digits with AdamW and recorded. Each method credits every
training sample i with a score(x, i) for the true-class logit f_o(x) of each test input x:

* ExPLAIND: score(x, i) = Σ_t Σ_j I[t, j, x, i, o] from the exact decomposition (Theorem 3.1), with the
  certified residual;
* TracIn (Pruthi et al., 2020), in-batch over every recorded step, and TracInCP over epoch-end checkpoints;
* TRAK: a TRAK-STYLE random-projection baseline implemented in explaind_math.experiments.attribution
  (Park et al., 2023; simplified, see there), single model and an ensemble of independently trained
  models, and the ``traker`` package itself when it is importable.

Ground truth: models retrained from the recorded run's θ_0 on random subsets S of fraction α ∈ {0.25,
0.5, 0.75} and on D \\ {i} for a few random i (leave-one-out, the LDS at α = 1 − 1/M). The LDS is the
Spearman correlation over subsets between f_o(x; θ_S) and Σ_{i∈S} score(x, i), averaged over test
inputs. Three retraining protocols (``--protocols``; ``attribution.counterfactual_schedule``), all from
the recorded θ_0: "restricted" — the recorded batches with the samples outside S removed (mean over
the rest), "zero-weight" — the recorded batches and loss with w_{t,i} = 0 for i ∉ S (the counterfactual
the scores linearize), both deterministic, so their ground truth carries no seed noise — and
"reshuffled" — fresh random batches of S for as many epochs as the recorded run (the usual datamodels
retraining). The scores are computed once; each protocol only adds retraining.

    python examples/data_attribution.py            # full: all 1697 training digits, a few minutes
    python examples/data_attribution.py --quick    # seconds
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import asdict, dataclass, field, replace

import torch

import explaind_math as em
from explaind_math.experiments import attribution as at
from explaind_math.experiments import digits, metrics

FRACTIONS = (0.25, 0.5, 0.75)


@dataclass(frozen=True)
class Config:
    """Sizes of one run of the experiment (``full`` and ``quick`` below)."""

    num_train: int | None = None  # None: every training digit of the split (1697)
    num_test: int = 100  # test inputs whose LDS is averaged
    steps: int = 60  # optimizer steps of the recorded run
    batch_size: int = 64
    subsets_per_fraction: int = 48  # retrained models per α (and protocol)
    leave_one_out: int = 48  # retrained models without one sample each (per protocol)
    nodes: int = 4  # Gauss–Legendre nodes of the decomposition
    test_chunk_size: int | None = 25
    projection_dim: int = 512  # TRAK's k
    ridge: float = 0.1  # TRAK's λ relative to the mean eigenvalue of ΦᵀΦ (see the report: 1e-3 did worse)
    resamples: int = 200  # bootstrap resamples of the subsets for the LDS standard error
    ensemble: int = 3  # models in the TRAK-style ensemble (the first is the recorded run)
    protocols: tuple[str, ...] = ("restricted", "zero-weight", "reshuffled")
    threads: int = 1  # torch intra-op threads: the models are tiny; 2 threads on a busy 2-core machine ran 30× slower
    seed: int = 0


FULL = Config()
QUICK = Config(num_train=160, num_test=16, steps=10, batch_size=32, subsets_per_fraction=6, leave_one_out=6,
               nodes=4, test_chunk_size=None, projection_dim=128, ensemble=2, protocols=("restricted", "reshuffled"),
               resamples=50)


@dataclass
class Experiment:
    """Everything one run produced: the table (with the timings), the score matrices (test × train) by
    method, the decomposition, and the ground truth f_o(x; θ_S) by (protocol, subset label)."""

    config: Config
    table: dict
    scores: dict[str, torch.Tensor] = field(default_factory=dict)
    influence: em.Influence | None = None
    ground_truth: dict[tuple[str, str], torch.Tensor] = field(default_factory=dict)
    subsets: dict[str, torch.Tensor] = field(default_factory=dict)


def _optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    return digits.default_adamw(model.parameters())


def run_experiment(config: Config, *, log=print) -> Experiment:
    """Train and record, score with every method, retrain on subsets, and compute the LDS table."""
    generator = torch.Generator().manual_seed(config.seed)
    data = digits.load_digits_data(num_train=config.num_train, num_test=max(config.num_test, 1), seed=config.seed)
    test_x, test_y = data.test_x[: config.num_test], data.test_y[: config.num_test]
    M = data.num_train

    def new_model(seed: int = config.seed) -> torch.nn.Module:
        return digits.make_model(digits.SmallCNN, seed=seed)

    t0 = time.perf_counter()
    run = digits.train_digits(new_model(), data, steps=config.steps, batch_size=config.batch_size, seed=config.seed)
    recorded_training_seconds = time.perf_counter() - t0
    model, trajectory = run.model, run.trajectory
    theta_0 = {n: p.clone() for n, p in trajectory.parameters[0].items()}
    with torch.no_grad():
        accuracy = metrics.accuracy(model(test_x), test_y)
    log(f"recorded AdamW run: {config.steps} steps of {config.batch_size} on {M} digits, "
        f"test accuracy {accuracy:.3f} on {config.num_test} test inputs")

    # replaying the recorded schedule must reproduce θ_N: the retraining loop is the recorded loop
    recorded = at.recorded_schedule(trajectory)
    replay = at.train_on_schedule(_loaded(new_model(), theta_0), _optimizer, digits.digits_loss, data.train, recorded)
    replay_error = max(float((p.detach() - trajectory.parameters[-1][n]).abs().max())
                       for n, p in replay.named_parameters())

    scores: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}

    t0 = time.perf_counter()
    scores["ExPLAIND"], influence = at.explaind_data_scores(
        model, trajectory, digits.digits_loss, data.train, test_x, test_y,
        quadrature=em.gauss_legendre(config.nodes), dtype=torch.float64, test_chunk_size=config.test_chunk_size,
    )
    seconds["ExPLAIND"] = time.perf_counter() - t0
    kernel_total = influence.kernel_sum(("test", "output"))[:, 0]
    sum_error = float((scores["ExPLAIND"].sum(dim=1) - kernel_total).abs().max())
    log(f"ExPLAIND: {influence.summary().splitlines()[-1]}  ({seconds['ExPLAIND']:.1f} s)")

    t0 = time.perf_counter()
    scores["TracIn (in-batch, every step)"] = at.tracin_scores(model, trajectory, digits.digits_loss, data.train,
                                                               test_x, test_y)
    seconds["TracIn (in-batch, every step)"] = time.perf_counter() - t0
    checkpoints = sorted({min(config.steps, e * run.steps_per_epoch)
                          for e in range(1, math.ceil(config.steps / run.steps_per_epoch) + 1)})
    t0 = time.perf_counter()
    scores[f"TracInCP ({len(checkpoints)} epoch-end checkpoints)"] = at.tracin_checkpoint_scores(
        model, trajectory, digits.digits_loss, data.train, test_x, test_y, checkpoints)
    seconds[f"TracInCP ({len(checkpoints)} epoch-end checkpoints)"] = time.perf_counter() - t0

    # TRAK: the recorded model, plus independently trained ones (fresh initialization and batch order);
    # the ensemble's seconds include training those extra models
    final_params = [{n: p.detach() for n, p in model.named_parameters()}]
    t0 = time.perf_counter()
    for e in range(1, config.ensemble):
        seed = config.seed + 1000 * e
        other = new_model(seed)
        order = at.counterfactual_schedule(recorded, torch.ones(M, dtype=torch.bool), "reshuffled",
                                           generator=torch.Generator().manual_seed(seed))
        at.train_on_schedule(other, _optimizer, digits.digits_loss, data.train, order)
        final_params.append({n: p.detach() for n, p in other.named_parameters()})
    ensemble_training = time.perf_counter() - t0
    for count in sorted({1, config.ensemble}):
        name = f"TRAK-style ({count} model{'s' if count > 1 else ''})"
        t0 = time.perf_counter()
        scores[name] = at.trak_style_scores(model, final_params[:count], data.train, test_x, test_y,
                                            projection_dim=config.projection_dim, ridge=config.ridge, seed=config.seed)
        seconds[name] = time.perf_counter() - t0 + (ensemble_training if count > 1 else 0.0)
    trak_note = "traker package not importable: TRAK-style baseline only"
    if at.trak_package_available():
        name = "TRAK (traker package, 1 model)"
        t0 = time.perf_counter()
        scores[name] = at.trak_package_scores(model, final_params[:1], data.train, test_x, test_y,
                                              projection_dim=max(config.projection_dim, 128), seed=config.seed)
        seconds[name] = time.perf_counter() - t0
        trak_note = "traker package used on CPU (float32, BasicProjector)"

    # ground truth: retrain on subsets from the same θ_0, under each protocol
    subsets = {f"α={a}": at.random_subsets(M, a, config.subsets_per_fraction, generator) for a in FRACTIONS}
    removed = torch.randperm(M, generator=generator)[: config.leave_one_out].tolist()
    subsets["leave-one-out"] = at.leave_one_out_subsets(M, removed)
    ground_truth, retrain_seconds = {}, {}
    for protocol in config.protocols:
        for label, masks in subsets.items():
            orders = [torch.Generator().manual_seed(config.seed + 7919 * (k + 1)) for k in range(len(masks))]
            schedules = [at.counterfactual_schedule(recorded, mask, protocol, batch_size=config.batch_size, generator=g)
                         for mask, g in zip(masks, orders)]
            t0 = time.perf_counter()
            ground_truth[protocol, label] = at.retrain_outputs(theta_0, new_model, _optimizer, digits.digits_loss,
                                                               data.train, schedules, test_x, test_y)
            retrain_seconds[protocol, label] = time.perf_counter() - t0
            log(f"ground truth, {protocol} {label}: {len(schedules)} retrained models "
                f"({retrain_seconds[protocol, label]:.1f} s)")

    lds = {protocol: [] for protocol in config.protocols}
    for protocol in config.protocols:
        for name, matrix in scores.items():
            row = {"method": name, "standard errors": {}}
            for label, masks in subsets.items():
                result = at.linear_datamodeling_score(matrix, masks, ground_truth[protocol, label],
                                                      resamples=config.resamples, seed=config.seed)
                row[label], row["standard errors"][label] = result.value, result.standard_error
            lds[protocol].append(row)
    table = {
        "lds": lds,
        "columns": list(subsets),
        "score seconds": seconds,
        "retraining seconds": {p: {label: retrain_seconds[p, label] for label in subsets} for p in config.protocols},
        "retrained models": {label: int(masks.shape[0]) for label, masks in subsets.items()},
        "recorded training seconds": recorded_training_seconds,
        "test accuracy": accuracy,
        "certificate": {
            "max residual": influence.max_residual,
            "relative residual": influence.relative_residual,
            "scores sum to the kernel total (max error)": sum_error,
            "replayed schedule reproduces θ_N (max error)": replay_error,
        },
        "trak": trak_note,
        "config": asdict(config),
    }
    return Experiment(config, table, scores, influence, ground_truth, subsets)


def _loaded(model: torch.nn.Module, state) -> torch.nn.Module:
    model.load_state_dict(state)
    return model


def format_table(table: dict) -> str:
    columns = table["columns"]
    head = f"{'method':<38}" + "".join(f"{('LDS ' + c) if c.startswith('α') else 'LOO':>15}" for c in columns)
    lines = []
    for protocol, rows in table["lds"].items():
        gt = ", ".join(f"{c} {s:.1f} s" for c, s in table["retraining seconds"][protocol].items())
        lines += [f"ground truth: {protocol} retraining from θ_0 ({gt})", head + f"{'score s':>10}",
                  "-" * (len(head) + 10)]
        for row in rows:
            cells = "".join(f"{row[c]:>9.3f} ±{row['standard errors'][c]:<4.2f}" for c in columns)
            lines.append(f"{row['method']:<38}{cells}{table['score seconds'][row['method']]:>10.1f}")
        lines.append("")
    counts = ", ".join(f"{c}: {n}" for c, n in table["retrained models"].items())
    cert = table["certificate"]
    lines += [
        f"retrained models per protocol: {counts}; ± is a bootstrap standard error over the subsets (an estimate)",
        f"recorded training {table['recorded training seconds']:.1f} s, test accuracy {table['test accuracy']:.3f}; "
        f"{table['trak']}",
        f"ExPLAIND certificate: max residual {cert['max residual']:.2e} (relative {cert['relative residual']:.2e}); "
        f"Σ_i score − kernel total {cert['scores sum to the kernel total (max error)']:.1e}; "
        f"replayed schedule vs θ_N {cert['replayed schedule reproduces θ_N (max error)']:.1e}",
        "timings are wall-clock seconds on this machine (preliminary if the machine was shared)",
    ]
    return "\n".join(lines)


def config_from_args(argv=None) -> Config:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes (seconds), as in the test suite")
    parser.add_argument("--protocols", default=None,
                        help=f"comma-separated retraining protocols among {', '.join(at.PROTOCOLS)}")
    parser.add_argument("--subsets", type=int, default=None, help="retrained models per α (and for leave-one-out)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps of the recorded run")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default 1)")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    if args.protocols is not None:
        protocols = tuple(p.strip() for p in args.protocols.split(",") if p.strip())
        unknown = [p for p in protocols if p not in at.PROTOCOLS]
        if unknown or not protocols:
            parser.error(f"unknown protocols {unknown}; choose among {', '.join(at.PROTOCOLS)}")
        config = replace(config, protocols=protocols)
    if args.subsets is not None:
        config = replace(config, subsets_per_fraction=args.subsets, leave_one_out=args.subsets)
    if args.steps is not None:
        config = replace(config, steps=args.steps)
    if args.seed is not None:
        config = replace(config, seed=args.seed)
    if args.threads is not None:
        config = replace(config, threads=args.threads)
    return config


def main(argv=None) -> dict:
    """Run the experiment, print the table, and return it as data (``format_table`` renders it)."""
    config = config_from_args(argv)
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        experiment = run_experiment(config)
    finally:
        torch.set_num_threads(previous_threads)
    print(format_table(experiment.table))
    return experiment.table


if __name__ == "__main__":
    main()
