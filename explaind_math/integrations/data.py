"""Sample ids from a training loop's data: a dataset wrapper and a DataLoader that yields ``(ids, batch)``.

    loader = DataLoaderWithIds(dataset, batch_size=32, shuffle=True)
    for ids, (x, y) in loader:          # batch exactly as DataLoader(dataset, ...) would give it
        ...
        recorder.record_batch(ids)      # the ids of this batch's rows, in row order

The decomposition takes the dataset itself (or this wrapper) as ``train_data``.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from torch.utils.data._utils.collate import default_collate

from .batches import collate_padded

__all__ = ["with_sample_ids", "SampleIds", "DataLoaderWithIds", "IdCollate", "padded_collate"]


class SampleIds(Dataset):
    """``dataset`` whose item ``i`` is ``(i, dataset[i])`` (``explaind_base_dataset`` is the dataset)."""

    def __init__(self, dataset):
        self.explaind_base_dataset = dataset

    def __len__(self) -> int:
        return len(self.explaind_base_dataset)

    def __getitem__(self, i):
        return int(i), self.explaind_base_dataset[i]


def with_sample_ids(dataset) -> SampleIds:
    """Wrap ``dataset`` so that every item carries its sample id."""
    return SampleIds(dataset)


def padded_collate(items: Sequence[Any]) -> Any:
    """``default_collate``, except dict samples of different lengths are padded on the right (labels with
    −100, attention masks with 0)."""
    if items and isinstance(items[0], Mapping):
        return collate_padded(items)
    return default_collate(items)


class IdCollate:
    """Collate ``(id, item)`` pairs into ``(ids, collate([items]))`` (a class, so workers can pickle it)."""

    def __init__(self, collate_fn: Callable | None = None):
        self.collate_fn = collate_fn or padded_collate

    def __call__(self, pairs):
        ids = torch.tensor([i for i, _ in pairs], dtype=torch.long)
        return ids, self.collate_fn([item for _, item in pairs])


class DataLoaderWithIds(DataLoader):
    """A ``DataLoader`` over ``dataset`` that yields ``(ids, batch)``: ``batch`` is what ``collate_fn``
    (default: :func:`padded_collate`) makes of the items, ``ids`` their sample ids in row order. Every
    other argument is DataLoader's (sampler, shuffle, workers: the ids travel with the batch, so
    prefetching cannot put them out of step)."""

    def __init__(self, dataset, *args, collate_fn: Callable | None = None, **kwargs):
        super().__init__(with_sample_ids(dataset), *args, collate_fn=IdCollate(collate_fn), **kwargs)
