"""Real models and training loops: sample ids from a DataLoader, structured (dict) batches with padding
masks, dropout recorded for exact replay, wrapper prefixes, Hugging Face models and the ``Trainer``
(:mod:`explaind_math.integrations.hf`, needs ``transformers``), DistributedDataParallel recording
(:mod:`explaind_math.integrations.ddp`)."""

from .batches import LeftPadded, StructuredBatch, collate_padded, pad_stack
from .data import DataLoaderWithIds, IdCollate, SampleIds, padded_collate, with_sample_ids
from .names import align_model, unwrap_model
from .outputs import SelectOutput

__all__ = ["StructuredBatch", "collate_padded", "LeftPadded", "pad_stack", "DataLoaderWithIds", "IdCollate", "SampleIds",
           "padded_collate", "with_sample_ids", "align_model", "unwrap_model", "SelectOutput"]
