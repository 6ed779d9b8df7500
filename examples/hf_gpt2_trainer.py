"""A GPT-2-architecture language model (built from a config, no hub weights) trained with the Hugging Face
``Trainer`` — dropout on, gradient clipping, gradient accumulation, a linear schedule — on variable-length
padded sequences of a synthetic language (arithmetic progressions mod V), recorded by
``RecordingTrainer`` and decomposed: per layer and per step, the training sequences with the most
influence on a test sequence's loss, and the certified residual.

    python examples/hf_gpt2_trainer.py --quick             # float32 run (the test suite runs this)
    python examples/hf_gpt2_trainer.py --quick --float64   # float64 run
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import explaind_math as em
from explaind_math.integrations import collate_padded, padded_collate
from explaind_math.integrations import hf

VOCAB = 24


def synthetic_sequences(n: int, seed: int, min_len: int = 5, max_len: int = 12) -> list[dict]:
    """x_k = (a + k·d) mod V with a random start a, step d ∈ {1, 2, 3} and length: a language a small LM learns."""
    g = torch.Generator().manual_seed(seed)
    items = []
    for _ in range(n):
        length = int(torch.randint(min_len, max_len + 1, (), generator=g))
        start, step = int(torch.randint(0, VOCAB, (), generator=g)), int(torch.randint(1, 4, (), generator=g))
        ids = (start + step * torch.arange(length)) % VOCAB
        items.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long), "labels": ids.clone()})
    return items


def layer_of(name: str) -> str:
    """The parameter axis per layer: embeddings, each transformer block, the final LayerNorm."""
    if name.startswith("transformer.h."):
        return "block " + name.split(".")[2]
    return "embeddings" if name.startswith(("transformer.wte", "transformer.wpe")) else "final norm"


def build_model(dtype: torch.dtype, layers: int = 2):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=layers, n_embd=16, n_head=2, n_positions=16, vocab_size=VOCAB, bos_token_id=0,
                        eos_token_id=0, resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, attn_implementation="eager")
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).to(dtype)


def train(model, train_set, out_dir: str, epochs: int, seed: int = 0):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             num_train_epochs=epochs, learning_rate=3e-3, weight_decay=0.01, max_grad_norm=0.5,
                             lr_scheduler_type="linear", report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, seed=0, dataloader_num_workers=0)
    trainer = hf.RecordingTrainer(model=model, args=args, train_dataset=hf.with_sample_ids(train_set),
                                  data_collator=padded_collate, recorder_options={"dropout_seed": seed})
    trainer.train()
    return trainer.recorder.trajectory()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 sequences, 2 epochs (the test suite's run)")
    parser.add_argument("--float64", action="store_true", help="train and decompose in float64")
    parser.add_argument("--dropout-seed", type=int, default=0, help="the seed of the recorded dropout masks")
    a = parser.parse_args(argv)
    dtype = torch.float64 if a.float64 else torch.float32
    train_set = synthetic_sequences(16 if a.quick else 64, seed=1)
    test_set = synthetic_sequences(2, seed=2)
    model = build_model(dtype)
    with tempfile.TemporaryDirectory() as out_dir:
        trajectory = train(model, train_set, out_dir, epochs=2 if a.quick else 4, seed=a.dropout_seed)
    model.eval()  # the test-time f(x; θ): dropout off
    test_batch = collate_padded(test_set)
    test_labels = test_batch.pop("labels")
    result = em.decompose_function_of_output(
        model, trajectory, hf.causal_lm_loss, train_set, test_batch, hf.causal_lm_loss, test_labels=test_labels,
        keep=("step", "param", "test", "unit"), params={n: layer_of(n) for n in trajectory.parameter_names},
        quadrature=em.gauss_legendre(8), dtype=torch.float64)
    print(result.summary())
    per_step = result.kernel_sum(keep=("step",))
    print("influence on the test losses per layer:", {k: f"{v:.3e}" for k, v in result.per_parameter().items()})
    print("per step:", [f"{v:.3e}" for v in per_step.tolist()])
    top = result.top_units(test=0, output=0)
    print("training sequences with the most influence on test sequence 0's loss:", top)
    dropout = trajectory.metadata.get("dropout", {})
    print(f"dropout record: {len(dropout.get('calls', []))} calls per forward, {len(str(dropout))} bytes")
    return {"relative_residual": float(result.relative_residual), "trajectory": trajectory, "result": result}


if __name__ == "__main__":
    main()
