"""Structured batches: named tensors that share a leading sample axis (``input_ids``, ``attention_mask``,
``labels``, …), padding of variable-length samples, and the per-sample attention masks of Hugging Face
models.

Inside ``vmap`` each sample's 2-D padding mask (one row of ``attention_mask``) is turned into the 4-D
additive mask the model would build — causal ∧ not padding for a decoder, not padding for an encoder — *before*
the model runs: Hugging Face's masking code returns a 4-D mask as it is, so its data-dependent branches
(which ``vmap`` cannot trace) are never taken.
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import torch
from torch.utils import _pytree as pytree

__all__ = ["StructuredBatch", "pad_stack", "collate_padded", "LeftPadded", "DEFAULT_PAD_VALUES",
           "per_sample_attention_mask", "is_causal_model"]

IGNORE_LABEL = -100
DEFAULT_PAD_VALUES = {"labels": IGNORE_LABEL, "label": IGNORE_LABEL, "attention_mask": 0}
DROPOUT_KEY = "__dropout_key__"


class StructuredBatch(Mapping):
    """Tensors by name with a common leading axis; indexing by a sample index, slice or index tensor
    indexes every tensor (``batch[2:5]``), indexing by a name returns that tensor. ``vmap`` maps over it
    (registered as a pytree node)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]):
        self._tensors = dict(tensors)

    def __getitem__(self, key):
        if isinstance(key, str):
            return self._tensors[key]
        return StructuredBatch({n: v[key] for n, v in self._tensors.items()})

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    @property
    def shape(self) -> torch.Size:
        """(number of samples,) — the common leading axis."""
        first = next(iter(self._tensors.values()))
        return torch.Size([first.shape[0]]) if first.dim() else torch.Size([])

    @property
    def device(self) -> torch.device:
        return next(iter(self._tensors.values())).device

    def unsqueeze(self, dim: int) -> "StructuredBatch":
        return StructuredBatch({n: v.unsqueeze(dim) for n, v in self._tensors.items()})

    def is_floating_point(self) -> bool:
        return False

    def to(self, device=None, dtype=None) -> "StructuredBatch":
        """Moved to ``device``; floating tensors (only) cast to ``dtype``."""
        def move(t: torch.Tensor) -> torch.Tensor:
            t = t.to(device) if device is not None else t
            return t.to(dtype) if dtype is not None and t.is_floating_point() else t

        return StructuredBatch({n: move(v) for n, v in self._tensors.items()})

    def with_entry(self, name: str, value: torch.Tensor) -> "StructuredBatch":
        return StructuredBatch({**self._tensors, name: value})

    def without(self, name: str) -> "StructuredBatch":
        return StructuredBatch({n: v for n, v in self._tensors.items() if n != name})

    def __repr__(self) -> str:
        return "StructuredBatch(" + ", ".join(f"{n}: {tuple(v.shape)}" for n, v in self._tensors.items()) + ")"


pytree.register_pytree_node(
    StructuredBatch,
    lambda b: (list(b._tensors.values()), list(b._tensors.keys())),
    lambda values, keys: StructuredBatch(dict(zip(keys, values))),
)


def pad_stack(tensors: Sequence[torch.Tensor], value: float | int = 0, *, left: bool = False) -> torch.Tensor:
    """Stack tensors of equal rank, padded to the largest size of every axis with ``value``: at the end of every
    axis, or (``left``) at the start of the first (the sequence axis) and the end of the others."""
    tensors = [torch.as_tensor(t) for t in tensors]
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    out = torch.full((len(tensors), *shape), value, dtype=tensors[0].dtype)
    for k, t in enumerate(tensors):
        where = [slice(0, s) for s in t.shape]
        if left and where:
            where[0] = slice(shape[0] - t.shape[0], shape[0])
        out[(k, *where)] = t
    return out


def collate_padded(items: Sequence[Mapping[str, Any]], pad_values: Mapping[str, Any] | None = None, *,
                   side: str = "right", causal: bool | None = None) -> dict:
    """A batch of dict samples: each entry stacked and padded (labels with −100, attention masks with 0, everything
    else with 0 unless ``pad_values`` says otherwise), on the right or (``side="left"``) before each sequence.

    Left padding keeps every sequence's own function (what the decomposition evaluates unpadded): it adds
    ``position_ids`` = (Σ_{k'≤k} mask_{k'}) − 1 from the attention mask (a sequence starts at position 0 after its
    padding), and for a causal LM (``causal=True``; required when labels are per token) it ignores the label of
    each sequence's first token, which only padding predicts (unpadded, nothing does)."""
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    pads = {**DEFAULT_PAD_VALUES, **(pad_values or {})}
    left = side == "left"
    batch = {name: pad_stack([item[name] for item in items], pads.get(name, 0), left=left) for name in items[0]}
    if not left:
        return batch
    mask = batch.get("attention_mask")
    if mask is not None and "position_ids" not in batch:
        batch["position_ids"] = (mask.long().cumsum(-1) - 1).clamp_min(0)
    labels, tokens = batch.get("labels"), batch.get("input_ids")
    if labels is not None and tokens is not None and labels.shape == tokens.shape:
        if causal is None:
            raise ValueError("collate_padded(side='left') with per-token labels: say causal=True (a causal LM, whose "
                             "first label only padding predicts: it is ignored) or causal=False (labels not shifted)")
        if causal:
            lengths = torch.tensor([len(item["labels"]) for item in items])
            first = labels.shape[1] - lengths
            labels[torch.arange(len(items)), first.clamp_max(labels.shape[1] - 1)] = IGNORE_LABEL
    return batch


class LeftPadded:
    """A collate function (for ``DataLoaderWithIds(collate_fn=...)`` or the Trainer's ``data_collator``) that pads
    dict samples on the left: :func:`collate_padded` with ``side="left"`` (a class, so workers can pickle it)."""

    def __init__(self, causal: bool | None = None, pad_values: Mapping[str, Any] | None = None):
        self.causal, self.pad_values = causal, pad_values

    def __call__(self, items: Sequence[Mapping[str, Any]]) -> dict:
        return collate_padded(items, self.pad_values, side="left", causal=self.causal)


def is_causal_model(model) -> bool:
    """Whether a Hugging Face model attends causally (a decoder): ``config.is_decoder`` or a model type with
    a causal-LM head and no masked-LM head."""
    config = model.config
    if getattr(config, "is_decoder", False):
        return True
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_MASKED_LM_MAPPING_NAMES)

    kind = getattr(config, "model_type", None)
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def per_sample_attention_mask(padding: torch.Tensor, causal: bool, dtype: torch.dtype) -> torch.Tensor:
    """One sample's additive 4-D mask (1, 1, L, L) from its padding mask (L,) (1: token, 0: padding)."""
    keep = padding.bool()[None, :]
    if causal:
        L = padding.shape[-1]
        position = torch.arange(L, device=padding.device)
        keep = keep & (position[:, None] >= position[None, :])
    zero = torch.zeros((), dtype=dtype, device=padding.device)
    lowest = torch.full((), torch.finfo(dtype).min, dtype=dtype, device=padding.device)
    return torch.where(keep, zero, lowest)[None, None]
