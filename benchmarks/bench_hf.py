"""Hugging Face runs, as ratios measured in one run (no timed assertions anywhere):

  1. the decomposition of a padded, dropout-on GPT-2 run with the default attention (SDPA) against the same
     run with ``attn_implementation="eager"`` (target: within 3x); and, for scale, per-sample gradients
     through torch's own SDPA under vmap (its per-sample fallback loop, what the decomposition avoids by
     evaluating SDPA in plain tensor operations);
  2. the Trainer's step time (its own ``train_runtime`` per step) with ``RecordingTrainer`` against the plain
     ``Trainer`` on the same run, CPU (target: <= 1.3x), for the small GPT-2 of part 1 and a 4-layer, width-128
     one on sequences up to 64 tokens, and the small one with dropout off (the checks and copies alone): best of
     the repeats, the median (with its 95% bootstrap interval) and range of the interleaved (plain, recording)
     pairs, the process CPU time per step, the minor page faults per step, the time in the recorder's
     optimizer-step hooks (its checks and copies); and the whole ``trainer.train()`` call. Where the recording keeps
     steps by their ``.grad`` (``rerun_optimizer="auto"``, :mod:`explaind_math.rerun`: the 4-layer model), the
     same recording with every step kept in full is interleaved too. Each Trainer run is a fresh process
     (``--in-process``: all in this one, where a run reuses memory an earlier one freed);
  3. the memory of the dropout record: bytes in the trajectory against bit-packed masks.

    python benchmarks/bench_hf.py [--layers 2] [--steps 8]
    python benchmarks/bench_hf.py --only-trainer --sizes small --trainer-repeats 30   # the 1.3x target, 30 pairs
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import sys
import tempfile
import time
import warnings

import torch

import explaind_math as em
from explaind_math.integrations import collate_padded, padded_collate
from explaind_math import features
from explaind_math.integrations import hf
from explaind_math.integrations.forward import ReplayMode
from explaind_math.rerun import RERUN_ABOVE

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from hf_gpt2_trainer import synthetic_sequences  # noqa: E402

warnings.filterwarnings("ignore")


def gpt2(attn: str, layers: int, width: int = 32, positions: int = 32, dropout: float = 0.1):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=4, n_positions=positions, vocab_size=24,
                                      bos_token_id=0, eos_token_id=0, attn_implementation=attn, resid_pdrop=dropout,
                                      embd_pdrop=dropout, attn_pdrop=dropout))


def args_for(out_dir: str, steps: int, batch: int):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True, learning_rate=1e-3)


def trainer_seconds(recording: bool, steps: int, layers: int, batch: int, data, width: int = 32,
                    positions: int = 32, dropout: float = 0.1,
                    options: dict | None = None) -> tuple[float, float, object, float]:
    """(wall time of trainer.train(), its train_runtime per step, the recorder, the process CPU time of train()
    per step) for a plain or recording Trainer (``options``: its ``recorder_options``)."""
    from transformers import Trainer

    model = gpt2("eager", layers, width, positions, dropout)
    with tempfile.TemporaryDirectory() as out:
        if recording:
            trainer = hf.RecordingTrainer(model=model, args=args_for(out, steps, batch),
                                          train_dataset=hf.with_sample_ids(data), data_collator=padded_collate,
                                          recorder_options=options)
        else:
            trainer = Trainer(model=model, args=args_for(out, steps, batch), train_dataset=data,
                              data_collator=padded_collate)
        start, cpu = time.perf_counter(), time.process_time()
        with contextlib.redirect_stdout(io.StringIO()):
            output = trainer.train()
        seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    return seconds, output.metrics["train_runtime"] / steps, (trainer.recorder if recording else None), cpu / steps


def decomposition_seconds(attn: str, layers: int, steps: int, data, test) -> tuple[float, float]:
    model = gpt2(attn, layers).double()
    with tempfile.TemporaryDirectory() as out:
        trainer = hf.RecordingTrainer(model=model, args=args_for(out, steps, 8),
                                      train_dataset=hf.with_sample_ids(data), data_collator=padded_collate)
        trainer.train()
    model.eval()
    batch = collate_padded(test)
    labels = batch.pop("labels")
    start = time.perf_counter()
    result = em.decompose_function_of_output(model, trainer.recorder.trajectory(), hf.causal_lm_loss, data, batch,
                                             hf.causal_lm_loss, test_labels=labels, keep=("test", "unit"),
                                             quadrature=em.gauss_legendre(4), dtype=torch.float64)
    return time.perf_counter() - start, float(result.relative_residual)


class _NativeTestTimeSDPA(ReplayMode):
    """ReplayMode, except that test-time evaluations (no dropout key) call torch's own SDPA: the slow path."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self._key is None:
            return func(*args, **(kwargs or {}))
        return super().__torch_function__(func, types, args, kwargs)


def native_sdpa_decomposition_seconds(layers: int, steps: int, data, test) -> tuple[float, float]:
    """The decomposition with torch's SDPA under vmap for the Jacobians and JVPs at the test inputs (its
    per-sample fallback loop: what evaluating SDPA in plain tensor operations avoids)."""
    original = features.ReplayMode
    features.ReplayMode = _NativeTestTimeSDPA
    try:
        return decomposition_seconds("sdpa", layers, steps, data, test)
    finally:
        features.ReplayMode = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--steps", type=int, default=8, help="steps of the decomposed runs")
    parser.add_argument("--trainer-steps", type=int, default=200,
                        help="steps of the timed Trainer runs (one-time costs, the recorder's set-up and first-step "
                             "probe and the Trainer's own, are spread over them, as over a run)")
    parser.add_argument("--trainer-repeats", type=int, default=5, help="interleaved Trainer runs per size (best kept)")
    parser.add_argument("--only-trainer", action="store_true", help="part 2 only")
    parser.add_argument("--sizes", default=",".join(TRAINER_SIZES),
                        help=f"part 2: the Trainer runs to time, of {', '.join(TRAINER_SIZES)} (comma-separated)")
    parser.add_argument("--in-process", action="store_true",
                        help="part 2: every Trainer run in this process (default: each in a fresh one)")
    parser.add_argument("--one-run", help=argparse.SUPPRESS)  # the child of an isolated part-2 run
    a = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    if a.one_run:
        return one_isolated_run(a.one_run)
    data, test = synthetic_sequences(64, seed=1, max_len=24), synthetic_sequences(4, seed=2, max_len=24)

    if not a.only_trainer:
        decomposition_part(a, data, test)
    recorder = trainer_part(a, data)
    if not a.only_trainer:
        dropout_record_part(a, data, recorder)


def decomposition_part(a, data, test) -> None:
    decomposition_seconds("eager", a.layers, 2, data, test)  # warm-up (first-call costs)
    best = lambda runs: (min(r[0] for r in runs), runs[0][1])
    sdpa, r_sdpa = best([decomposition_seconds("sdpa", a.layers, a.steps, data, test) for _ in range(3)])
    eager, r_eager = best([decomposition_seconds("eager", a.layers, a.steps, data, test) for _ in range(3)])
    native, r_native = best([native_sdpa_decomposition_seconds(a.layers, a.steps, data, test) for _ in range(3)])
    print(f"1. decomposition (best of 3), padded GPT-2 ({a.layers} layers, {a.steps} steps, dropout on): default SDPA {sdpa:.2f} s, "
          f"eager {eager:.2f} s, ratio {sdpa / eager:.2f} (residuals {r_sdpa:.1e}, {r_eager:.1e})")
    print(f"   with torch's own SDPA under vmap at the test inputs (the slow path avoided): {native:.2f} s, "
          f"{native / eager:.1f}x eager (residual {r_native:.1e})")



def one_isolated_run(spec: str) -> None:
    """A warm-up run and a timed run of one Trainer, in this (fresh) process; prints their readings as JSON."""
    import resource

    recording, steps, layers, width, max_len, dropout, options = json.loads(spec)
    sequences = synthetic_sequences(64, seed=1, max_len=max_len)
    positions = max(32, max_len)
    hooks = timed_recorder_hooks()
    trainer_seconds(recording, 2, layers, 8, sequences, width, positions, dropout, options)  # first-call costs
    faults, hooks[0] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, 0.0
    wall, step, _, cpu = trainer_seconds(recording, steps, layers, 8, sequences, width, positions, dropout, options)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) / steps
    print(json.dumps([wall, step, None, cpu, faults, hooks[0] / steps]))


def timed_recorder_hooks() -> list[float]:
    """The recorder's two optimizer-step hooks (the checks before the step, the copies and checks after it) timed
    in this process: the returned list's one entry adds up their seconds."""
    from explaind_math.recording import TrajectoryRecorder

    total = [0.0]

    def timed(method):
        def run(*args, **kwargs):
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                total[0] += time.perf_counter() - start
        return run

    TrajectoryRecorder._check_and_prepare = timed(TrajectoryRecorder._check_and_prepare)
    TrajectoryRecorder._after_step = timed(TrajectoryRecorder._after_step)
    return total


def isolated_trainer_seconds(recording: bool, steps: int, layers: int, width: int, max_len: int, dropout: float,
                             options: dict | None = None):
    """:func:`trainer_seconds` (and the minor page faults per step) of a run in a fresh process: a user's run, whose
    record needs memory no earlier run of this benchmark freed."""
    import subprocess

    spec = json.dumps([recording, steps, layers, width, max_len, dropout, options])
    out = subprocess.run([sys.executable, __file__, "--one-run", spec], capture_output=True, text=True, check=True)
    return tuple(json.loads(out.stdout.strip().splitlines()[-1]))


#: part 2's Trainer runs; the last, the small model without dropout: what the checks and copies cost without the
#: dropout record
TRAINER_SIZES = ("small", "large", "small-no-dropout")


def median_with_interval(values, resamples: int = 4000, seed: int = 0) -> tuple[float, float, float]:
    """The median of ``values`` and its 95% percentile-bootstrap interval (``resamples`` resamplings with
    replacement, seeded: the same values give the same interval)."""
    import random
    import statistics

    draw = random.Random(seed)
    medians = sorted(statistics.median(draw.choices(values, k=len(values))) for _ in range(resamples))
    return statistics.median(values), medians[int(0.025 * resamples)], medians[int(0.975 * resamples) - 1]


def trainer_part(a, data):
    recorder = None
    longer = synthetic_sequences(64, seed=1, max_len=64)
    chosen = a.sizes.split(",")
    unknown = sorted(set(chosen) - set(TRAINER_SIZES))
    if unknown:
        raise SystemExit(f"--sizes: unknown {unknown}; choose from {list(TRAINER_SIZES)}")
    sizes = {"small": (a.layers, 32, 24, data, 0.1), "large": (4, 128, 64, longer, 0.1),
             "small-no-dropout": (a.layers, 32, 24, data, 0.0)}
    for layers, width, max_len, sequences, dropout in (sizes[name] for name in TRAINER_SIZES if name in chosen):
        positions = max(32, max_len)
        if a.in_process:
            trainer_seconds(False, 2, layers, 8, sequences, width, positions, dropout)  # warm-up (first-call costs)
            trainer_seconds(True, 2, layers, 8, sequences, width, positions, dropout)
            run = lambda recording, options=None: (*trainer_seconds(  # noqa: E731
                recording, a.trainer_steps, layers, 8, sequences, width, positions, dropout, options), float("nan"))
        else:
            run = lambda recording, options=None: isolated_trainer_seconds(  # noqa: E731
                recording, a.trainer_steps, layers, width, max_len, dropout, options)
        # where rerun_optimizer="auto" keeps steps by their .grad, the same recording with every step kept in full
        reruns = sum(p.numel() for p in gpt2("eager", layers, width, positions, dropout).parameters()) > RERUN_ABOVE
        plain, runs, full = [], [], []
        for _ in range(a.trainer_repeats):  # interleaved, best kept
            plain.append(run(False))
            runs.append(run(True))
            if reruns:
                full.append(run(True, {"rerun_optimizer": False}))
        step_plain, step_rec = min(r[1] for r in plain), min(r[1] for r in runs)
        wall_plain, wall_rec = min(r[0] for r in plain), min(r[0] for r in runs)
        cpu_plain, cpu_rec = min(r[3] for r in plain), min(r[3] for r in runs)
        pairs = sorted(r[1] / p[1] for p, r in zip(plain, runs))  # each recording run against the plain run before it
        median, low, high = median_with_interval(pairs)
        if recorder is None:  # the dropout record of part 3 is the first size's
            recorder = runs[0][2] if a.in_process else trainer_seconds(True, a.trainer_steps, layers, 8, sequences,
                                                                        width, positions, dropout)[2]
        faults = f"; minor page faults per step {plain[0][4]:.0f} plain, {runs[0][4]:.0f} recording" if not a.in_process else ""
        if not a.in_process:
            hooks = sorted(r[5] for r in runs)
            faults += (f"; the recorder's step hooks {hooks[len(hooks) // 2] * 1e3:.2f} ms a step (median), "
                       f"{hooks[len(hooks) // 2] / step_plain:.2f} of the plain step")
        print(f"2. Trainer, GPT-2 {layers} layers width {width}, dropout {dropout}, sequences <= {max_len}, "
              f"{a.trainer_steps} steps "
              f"(best of {a.trainer_repeats}): step {step_plain * 1e3:.2f} ms plain, {step_rec * 1e3:.2f} ms recording, ratio "
              f"{step_rec / step_plain:.2f} (interleaved pairs: median {median:.3f}, 95% bootstrap interval "
              f"{low:.3f}-{high:.3f}, range {pairs[0]:.2f}-{pairs[-1]:.2f}); process CPU time per step {cpu_plain * 1e3:.1f} vs {cpu_rec * 1e3:.1f} ms, "
              f"ratio {cpu_rec / cpu_plain:.2f}; whole train() {wall_plain:.2f} s vs {wall_rec:.2f} s, ratio "
              f"{wall_rec / wall_plain:.2f}{faults}")
        if full:
            step_full = min(r[1] for r in full)
            pairs_full = sorted(r[1] / p[1] for p, r in zip(plain, full))
            print(f"   steps kept by their .grad (rerun_optimizer='auto' here): against the same recording with every "
                  f"step kept in full, {step_full * 1e3:.2f} ms a step, ratio {step_full / step_plain:.2f} to the plain "
                  f"Trainer (median of pairs {pairs_full[len(pairs_full) // 2]:.2f}); the rerun's step over the full "
                  f"one {step_rec / step_full:.2f} (best), "
                  f"{sorted(r[1] / f[1] for r, f in zip(runs, full))[len(full) // 2]:.2f} (median of pairs)"
                  + (f"; minor page faults per step {full[0][4]:.0f} kept in full" if not a.in_process else ""))
    return recorder


def dropout_record_part(a, data, recorder) -> None:
    record = recorder.trajectory().metadata["dropout"]
    recorded_bytes = len(json.dumps(record))
    steps = len(record["steps"])
    model = gpt2("eager", a.layers)
    width, heads = model.config.n_embd, model.config.n_head
    per_token = (3 * a.layers + 1) * width  # embedding dropout + attention-output and MLP dropout per block
    mean_len = sum(len(d["input_ids"]) for d in data) / len(data)
    max_len = max(len(d["input_ids"]) for d in data)
    packed = steps * 8 * (per_token * mean_len + a.layers * heads * max_len * max_len) / 8
    print(f"3. dropout record: {recorded_bytes} bytes for {steps} steps ({recorded_bytes / steps:.0f} per step); "
          f"bit-packed masks would take about {packed / 1024:.0f} KiB ({packed / recorded_bytes:.0f}x)")


if __name__ == "__main__":
    main()
