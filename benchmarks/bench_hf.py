"""Hugging Face runs, as ratios measured in one run (no timed assertions anywhere):

  1. the decomposition of a padded, dropout-on GPT-2 run with the default attention (SDPA) against the same
     run with ``attn_implementation="eager"`` (target: within 3x); and, for scale, per-sample gradients
     through torch's own SDPA under vmap (its per-sample fallback loop, what the decomposition avoids by
     evaluating SDPA in plain tensor operations);
  2. the Trainer's step time with ``RecordingTrainer`` against the plain ``Trainer`` on the same run, CPU
     (target: <= 1.3x);
  3. the memory of the dropout record: bytes in the trajectory against bit-packed masks.

    python benchmarks/bench_hf.py [--layers 2] [--steps 8]
"""

from __future__ import annotations

import argparse
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

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from hf_gpt2_trainer import synthetic_sequences  # noqa: E402

warnings.filterwarnings("ignore")


def gpt2(attn: str, layers: int, width: int = 32):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=width, n_head=4, n_positions=32, vocab_size=24,
                                      bos_token_id=0, eos_token_id=0, attn_implementation=attn))


def args_for(out_dir: str, steps: int, batch: int):
    from transformers import TrainingArguments

    return TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch, max_steps=steps, report_to=[],
                             save_strategy="no", logging_strategy="no", use_cpu=True, seed=0,
                             disable_tqdm=True, learning_rate=1e-3)


def trainer_seconds(recording: bool, steps: int, layers: int, batch: int, data) -> tuple[float, object]:
    from transformers import Trainer

    model = gpt2("eager", layers)
    with tempfile.TemporaryDirectory() as out:
        if recording:
            trainer = hf.RecordingTrainer(model=model, args=args_for(out, steps, batch),
                                          train_dataset=hf.with_sample_ids(data), data_collator=padded_collate)
        else:
            trainer = Trainer(model=model, args=args_for(out, steps, batch), train_dataset=data,
                              data_collator=padded_collate)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
    return seconds, (trainer.recorder if recording else None)


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
    parser.add_argument("--trainer-steps", type=int, default=48, help="steps of the timed Trainer runs")
    a = parser.parse_args()
    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    data, test = synthetic_sequences(64, seed=1, max_len=24), synthetic_sequences(4, seed=2, max_len=24)

    decomposition_seconds("eager", a.layers, 2, data, test)  # warm-up (first-call costs)
    best = lambda runs: (min(r[0] for r in runs), runs[0][1])
    sdpa, r_sdpa = best([decomposition_seconds("sdpa", a.layers, a.steps, data, test) for _ in range(3)])
    eager, r_eager = best([decomposition_seconds("eager", a.layers, a.steps, data, test) for _ in range(3)])
    native, r_native = best([native_sdpa_decomposition_seconds(a.layers, a.steps, data, test) for _ in range(3)])
    print(f"1. decomposition (best of 3), padded GPT-2 ({a.layers} layers, {a.steps} steps, dropout on): default SDPA {sdpa:.2f} s, "
          f"eager {eager:.2f} s, ratio {sdpa / eager:.2f} (residuals {r_sdpa:.1e}, {r_eager:.1e})")
    print(f"   with torch's own SDPA under vmap at the test inputs (the slow path avoided): {native:.2f} s, "
          f"{native / eager:.1f}x eager (residual {r_native:.1e})")

    trainer_seconds(False, 2, a.layers, 8, data)  # warm-up (imports, first-call costs)
    plain = min(trainer_seconds(False, a.trainer_steps, a.layers, 8, data)[0] for _ in range(5))
    runs = [trainer_seconds(True, a.trainer_steps, a.layers, 8, data) for _ in range(5)]
    recorded, recorder = min(r[0] for r in runs), runs[0][1]
    print(f"2. Trainer, {a.trainer_steps} steps (best of 5): plain {plain:.2f} s, RecordingTrainer {recorded:.2f} s, "
          f"ratio {recorded / plain:.2f}")

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
