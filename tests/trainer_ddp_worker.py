"""Worker of test_ddp_recording's Trainer case: 2 gloo ranks (torchrun) run the Hugging Face Trainer on a small
GPT-2, float64, with gradient clipping and padded variable-length sequences: once as the plain Trainer and once as
RecordingTrainer with dropout off (their parameters must agree: the recording trains as HF does, including the
W-fold loss scale of ``average_tokens_across_devices``), and once as RecordingTrainer with dropout on, whose
trajectory rank 0 saves."""

import argparse
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "examples"))
from hf_gpt2_trainer import synthetic_sequences  # noqa: E402

from explaind_math.integrations import hf, padded_collate  # noqa: E402


def gpt2(dropout: float):
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=16, vocab_size=24, bos_token_id=0, eos_token_id=0,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout, attn_implementation="eager")
    torch.manual_seed(0)
    return GPT2LMHeadModel(config).double()


def train_set():
    return synthetic_sequences(16, seed=1)


def run(trainer_class, dropout: float, out: str):
    from transformers import TrainingArguments

    args = TrainingArguments(output_dir=out, per_device_train_batch_size=2, num_train_epochs=1, learning_rate=3e-3,
                             max_grad_norm=0.5, report_to=[], save_strategy="no", logging_strategy="no",
                             use_cpu=True, seed=0, ddp_backend="gloo", disable_tqdm=True)
    data = train_set() if trainer_class is not hf.RecordingTrainer else hf.with_sample_ids(train_set())
    trainer = trainer_class(model=gpt2(dropout), args=args, train_dataset=data, data_collator=padded_collate)
    trainer.train()
    return trainer


if __name__ == "__main__":
    from transformers import Trainer

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    out = parser.parse_args().out
    plain = run(Trainer, 0.0, out)
    recorded = run(hf.RecordingTrainer, 0.0, out)
    with_dropout = run(hf.RecordingTrainer, 0.1, out)
    if dist.get_rank() == 0:
        same = max(float((p - q).abs().max()) for p, q in zip(plain.model.parameters(), recorded.model.parameters()))
        with open(os.path.join(out, "difference.txt"), "w") as f:
            f.write(repr(same))
        with_dropout.recorder.trajectory().save(os.path.join(out, "trainer.safetensors"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)  # without interpreter finalization, as ddp_recording_worker.py leaves (a gloo teardown race)
