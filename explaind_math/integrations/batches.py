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

__all__ = ["StructuredBatch", "pad_stack", "collate_padded", "DEFAULT_PAD_VALUES", "per_sample_attention_mask",
           "is_causal_model"]

DEFAULT_PAD_VALUES = {"labels": -100, "label": -100, "attention_mask": 0}
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


def pad_stack(tensors: Sequence[torch.Tensor], value: float | int = 0) -> torch.Tensor:
    """Stack tensors of equal rank, padded at the end of every axis to the largest size with ``value``."""
    tensors = [torch.as_tensor(t) for t in tensors]
    shape = [max(t.shape[d] for t in tensors) for d in range(tensors[0].dim())]
    out = torch.full((len(tensors), *shape), value, dtype=tensors[0].dtype)
    for k, t in enumerate(tensors):
        out[(k, *[slice(0, s) for s in t.shape])] = t
    return out


def collate_padded(items: Sequence[Mapping[str, Any]], pad_values: Mapping[str, Any] | None = None) -> dict:
    """A batch of dict samples: each entry stacked, padded on the right (labels with −100, attention masks
    with 0, everything else with 0 unless ``pad_values`` says otherwise)."""
    pads = {**DEFAULT_PAD_VALUES, **(pad_values or {})}
    return {name: pad_stack([item[name] for item in items], pads.get(name, 0)) for name in items[0]}


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
