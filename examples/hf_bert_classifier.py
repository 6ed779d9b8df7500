"""A BERT-style sequence classifier (built from a config, no hub weights) trained in a plain loop with a
``DataLoader`` that yields sample ids, on padded variable-length sequences, dropout on; decomposed into
the influence of every training sequence on a test sequence's logits, with the certified residual.

The task: is token 1 in the sequence? (tokens 2..V−1 are filler; padding is masked out).

    python examples/hf_bert_classifier.py --quick
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

import explaind_math as em
from explaind_math.integrations import DataLoaderWithIds, collate_padded
from explaind_math.integrations import hf

VOCAB = 12


def synthetic_sequences(n: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    items = []
    for k in range(n):
        length = int(torch.randint(3, 9, (), generator=g))
        ids = torch.randint(2, VOCAB, (length,), generator=g)
        label = k % 2
        if label:
            ids[int(torch.randint(0, length, (), generator=g))] = 1
        items.append({"input_ids": ids, "attention_mask": torch.ones(length, dtype=torch.long),
                      "labels": torch.tensor(label)})
    return items


def build_model(dtype: torch.dtype):
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2, hidden_dropout_prob=0.1,
                        attention_probs_dropout_prob=0.1, attn_implementation="eager")
    torch.manual_seed(0)
    return BertForSequenceClassification(config).to(dtype)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="16 sequences, 3 epochs (the test suite's run)")
    a = parser.parse_args(argv)
    dtype = torch.float64
    train_set, test_set = synthetic_sequences(16 if a.quick else 64, seed=1), synthetic_sequences(2, seed=2)
    model = build_model(dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    recorder = em.TrajectoryRecorder(model, optimizer)
    loader = DataLoaderWithIds(train_set, batch_size=4, shuffle=True, generator=torch.Generator().manual_seed(0))
    model.train()  # dropout on
    for _ in range(3 if a.quick else 10):
        for ids, batch in loader:
            optimizer.zero_grad()
            labels = batch.pop("labels")
            F.cross_entropy(model(**batch).logits, labels).backward()  # mean over the batch: weights 1/|B_t|
            recorder.record_batch(ids)
            optimizer.step()
    trajectory = recorder.trajectory()
    model.eval()
    test_batch = collate_padded(test_set)
    test_labels = test_batch.pop("labels")
    result = em.decompose_adamw_training(
        model, trajectory, loss_fn=hf.classification_loss, train_data=train_set, test_inputs=test_batch,
        keep=("test", "unit", "output"), quadrature=em.gauss_legendre(8), dtype=torch.float64)
    print(result.summary())
    print("most influential training sequences for test 0, logit of its label:",
          result.top_units(test=0, output=int(test_labels[0])))
    return {"relative_residual": float(result.relative_residual), "trajectory": trajectory, "result": result}


if __name__ == "__main__":
    main()
