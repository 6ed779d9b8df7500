"""Hugging Face ``transformers``: per-sample losses of HF's kind, their batch weights, and the ``Trainer``.

HF's causal-LM loss is the token-weighted mean Σ_tokens CE / (tokens in the batch), labels −100 ignored,
predicting token k+1 from position k. As a weighted sum of per-sample losses (MATH.md §0):

    ℓ_i = Σ_{k: y_{i,k+1} ≠ −100} −log softmax(f(x_i)_k)[y_{i,k+1}],     w_i = 1 / Σ_j #{k: y_{j,k+1} ≠ −100},

so ``record_batch(ids, weights=causal_lm_weights(batch["labels"]))`` reproduces the gradient of
``model(**batch).loss``. :class:`RecordingTrainer` records a ``Trainer`` run in three lines::

    trainer = RecordingTrainer(model=model, args=args, train_dataset=with_sample_ids(train), data_collator=padded_collate)
    trainer.train()
    trajectory = trainer.recorder.trajectory()
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import torch
from torch.utils.data import Dataset

from ..errors import RecordingError, UnsupportedOptimizerError
from ..optimizers import rule_for_optimizer
from ..recording import TrajectoryRecorder
from .batches import is_causal_model

__all__ = ["IGNORE_INDEX", "SAMPLE_ID", "causal_lm_loss", "causal_lm_losses", "causal_lm_weights",
           "classification_loss", "classification_losses",
           "with_sample_ids", "RecordingTrainer", "TrainerRecording"]

IGNORE_INDEX = -100
SAMPLE_ID = "sample_id"


def causal_lm_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ℓ_i of every sequence of a batch (logits (B, L, V), labels (B, L)) → (B,): Σ over predicted tokens of the
    cross-entropy, labels −100 ignored, position k predicting label k+1. What the Trainer integration trains
    with, without vmap."""
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    logp = torch.log_softmax(logits[:, :-1].to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)
    picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return -(picked * keep).sum(1)


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """ℓ_i of one sequence (logits (L, V), labels (L,)): :func:`causal_lm_losses` of a batch of one, the
    decomposition's per-sample function."""
    return causal_lm_losses(logits.unsqueeze(0), labels.unsqueeze(0))[0]


def causal_lm_weights(labels: torch.Tensor, num_items: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """w_i = 1 / (predicted tokens in the batch) for a batch of labels (B, L); ``num_items`` overrides the
    count (the Trainer's ``num_items_in_batch`` over accumulated micro-batches)."""
    count = float((labels[:, 1:] != IGNORE_INDEX).sum()) if num_items is None else float(num_items)
    return torch.full((labels.shape[0],), 1.0 / count, dtype=torch.float64)


def classification_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of every sample of a batch (logits (B, C), labels (B,)) → (B,), without vmap."""
    return -torch.log_softmax(logits, dim=-1).gather(-1, labels.long().reshape(-1, 1)).reshape(-1)


def classification_loss(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of one sample's logits (C,) at its label: :func:`classification_losses` of a batch of one."""
    return classification_losses(logits.unsqueeze(0), label.reshape(1))[0]


#: the batched form of each built-in per-sample loss (a user's own per-sample loss is vmapped)
_BATCHED = {causal_lm_loss: causal_lm_losses, classification_loss: classification_losses}


class _WithIds(Dataset):
    def __init__(self, dataset):
        self.explaind_base_dataset = dataset

    def __len__(self) -> int:
        return len(self.explaind_base_dataset)

    def __getitem__(self, i):
        item = self.explaind_base_dataset[i]
        if not isinstance(item, Mapping):
            raise RecordingError(f"the Trainer's dataset must return dicts; item {i} is a {type(item).__name__}")
        return {**item, SAMPLE_ID: int(i)}


def with_sample_ids(dataset) -> Dataset:
    """A dict dataset whose items also carry ``sample_id`` (the Trainer integration reads and removes it)."""
    return _WithIds(dataset)


def _refusals(trainer) -> list[str]:
    """Settings of a Trainer that the recording cannot reproduce exactly, each with the reason."""
    args, problems = trainer.args, []
    if getattr(args, "label_smoothing_factor", 0) > 0:
        problems.append(f"label_smoothing_factor={args.label_smoothing_factor}: HF smooths over the batch's "
                        "tokens; use a per-sample loss with smoothing (per_sample_loss=) and label_smoothing_factor=0")
    if getattr(trainer, "compute_loss_func", None) is not None:
        problems.append("compute_loss_func: a custom loss is not known to be a weighted sum of per-sample losses; "
                        "give it as per_sample_loss= (one sample's loss) and sample_weights=")
    if type(trainer).compute_loss is not TrainerRecording.compute_loss:
        problems.append(f"{type(trainer).__name__}.compute_loss overrides the recording one; give the loss as "
                        "per_sample_loss= and sample_weights= instead")
    if getattr(args, "deepspeed", None) or getattr(trainer, "is_deepspeed_enabled", False):
        problems.append("deepspeed: DeepSpeed's sharded optimizers have no exact rule")
    if getattr(args, "fsdp", None) or getattr(trainer, "is_fsdp_enabled", False):
        problems.append("fsdp: FSDP shards parameters and optimizer state, which the recorder cannot read")
    for flag in ("bf16", "fp16"):
        if getattr(args, flag, False):
            problems.append(f"{flag}=True: mixed precision is refused, a low-precision gradient differs from its "
                            "exact per-sample sum by its rounding (train in float32)")
    if getattr(args, "gradient_checkpointing", False):
        problems.append("gradient_checkpointing=True: the recomputed forward is not the recorded one")
    if getattr(args, "n_gpu", 1) > 1:
        problems.append(f"n_gpu={args.n_gpu}: DataParallel splits the batch; use DDP (torchrun)")
    return problems


class TrainerRecording:
    """Mixin for ``transformers.Trainer`` (``class T(TrainerRecording, Trainer)``): records the run into
    ``self.recorder`` (a :class:`~explaind_math.TrajectoryRecorder`).

    The loss is Σ_i w_i ℓ_i with ``per_sample_loss`` (default: :func:`causal_lm_loss` for a causal LM,
    :func:`classification_loss` otherwise) and ``sample_weights(labels, num_items_in_batch)`` (default:
    1/tokens of the accumulated batch for an LM, 1/samples otherwise); the ids are those of the batch
    that produced the gradient (they travel in it). Gradient clipping (``max_grad_norm``) is recorded
    as the per-step factor c_t, gradient accumulation as micro-batches, the scheduler through the
    optimizer's learning rate at each step. Settings it cannot reproduce raise before training.
    """

    def __init__(self, *args, per_sample_loss: Callable | None = None, sample_weights: Callable | None = None,
                 recorder_options: Mapping[str, Any] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        problems = _refusals(self)
        if problems:
            raise RecordingError("the Trainer cannot be recorded exactly: " + "; ".join(problems))
        causal = is_causal_model(self.model)
        self.per_sample_loss = per_sample_loss or (causal_lm_loss if causal else classification_loss)
        self.sample_weights = sample_weights or (causal_lm_weights if causal else self._per_sample_mean)
        self.recorder_options = dict(recorder_options or {})
        self.loss_is_scaled_for_ga = True  # the weights already normalise over the accumulated batch
        self.recorder: TrajectoryRecorder | None = None

    def _per_sample_mean(self, labels: torch.Tensor, num_items: Any = None) -> torch.Tensor:
        count = labels.shape[0] * self.current_gradient_accumulation_steps if num_items is None else float(num_items)
        return torch.full((labels.shape[0],), 1.0 / float(count), dtype=torch.float64)

    def _rank_scale(self, num_items: Any) -> float:
        """W when ``num_items_in_batch`` counts the batches of all W ranks (``average_tokens_across_devices``): the
        Trainer then multiplies each rank's loss by W so that DDP's average is Σ_all ℓ / num_items; the recorder
        divides every rank's weights by W again when it gathers them (:mod:`~explaind_math.integrations.ddp`)."""
        if num_items is None or not getattr(self.args, "average_tokens_across_devices", False):
            return 1.0
        return float(self.args.world_size) if self.args.world_size > 1 else 1.0

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if SAMPLE_ID not in self._signature_columns:
            self._signature_columns.append(SAMPLE_ID)

    def create_optimizer(self, *args, **kwargs):
        optimizer = super().create_optimizer(*args, **kwargs)
        if self.recorder is None:
            try:
                rule_for_optimizer(optimizer)
            except UnsupportedOptimizerError as error:
                optim = getattr(self.args.optim, "value", self.args.optim)
                raise RecordingError(f"optim={optim!r} gives a {type(optimizer).__name__}, which has no "
                                     f"exact rule ({error}); use optim='adamw_torch' or 'sgd'") from None
            options = {"gradient_rescaling": self.args.max_grad_norm > 0, **self.recorder_options}
            self.recorder = _recorder_class()(self.model, optimizer, **options)
        return optimizer

    def train(self, *args, **kwargs):
        """``Trainer.train``; then (also when a step was refused) the recorder's steps not yet on disk are written, so
        that a recorder with ``recorder_options={"directory": ...}`` leaves every recorded step in the directory."""
        try:
            result = super().train(*args, **kwargs)
        except BaseException as error:
            if self.recorder is not None:
                try:
                    self.recorder.flush()
                except Exception as failed:  # the training error is the one to see
                    error.add_note(f"writing the recorded steps failed too: {failed}")
            raise
        if self.recorder is not None:
            self.recorder.flush()
        return result

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        ids = inputs.pop(SAMPLE_ID, None)
        if not (model.training and torch.is_grad_enabled()):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        if ids is None:
            raise RecordingError("a training batch has no sample ids: give train_dataset=with_sample_ids(dataset) "
                                 f"and a collator that keeps the {SAMPLE_ID!r} entry")
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs.logits if hasattr(outputs, "logits") else outputs
        batched = _BATCHED.get(self.per_sample_loss) or torch.func.vmap(self.per_sample_loss)
        losses = batched(logits, labels)  # ℓ_i, the decomposition's function (batched when built in)
        weights = self.sample_weights(labels, num_items_in_batch) * self._rank_scale(num_items_in_batch)
        self.recorder.record_batch(ids, weights=weights)
        loss = (losses * weights.to(device=losses.device, dtype=losses.dtype)).sum()
        return (loss, outputs) if return_outputs else loss


def _recorder_class():
    """The recorder of a Trainer run: one rank, or every rank of a DDP run (torchrun) gathered into one trajectory."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from .ddp import DistributedTrajectoryRecorder

        return DistributedTrajectoryRecorder
    return TrajectoryRecorder


def _recording_trainer_class():
    from transformers import Trainer

    return type("RecordingTrainer", (TrainerRecording, Trainer), {"__doc__": TrainerRecording.__doc__})


def __getattr__(name: str):
    if name == "RecordingTrainer":  # built on first use: transformers is an optional dependency
        cls = _recording_trainer_class()
        globals()["RecordingTrainer"] = cls
        return cls
    raise AttributeError(name)
