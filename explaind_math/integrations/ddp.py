"""Recording a ``DistributedDataParallel`` run: one trajectory for all ranks.

DDP averages the ranks' gradients, so the step's gradient is (1/W) Σ_r Σ_{i∈B_r} w_i ∇ℓ_i: before every
``optimizer.step()`` each rank's recorded ids and weights are gathered (``all_gather_object``) and every
weight divided by the world size W. Every rank then holds the same trajectory (the parameters are equal
on all ranks); save it from one. Dropout is recorded as in one process (:mod:`~explaind_math.integrations.watch`):
rank 0's seed is broadcast, rank r's micro-batch m gets the key index m·W + r, and each step's record gathers
every rank's rows, so the decomposition replays the masks each rank drew::

    recorder = DistributedTrajectoryRecorder(ddp_model, optimizer)
    ...                                   # each rank: record_batch(ids of its shard of the batch)
    if dist.get_rank() == 0:
        recorder.trajectory().save("run.safetensors")
"""

from __future__ import annotations

import torch.distributed as dist

from ..errors import RecordingError
from ..recording import TrajectoryRecorder

__all__ = ["DistributedTrajectoryRecorder"]


class DistributedTrajectoryRecorder(TrajectoryRecorder):
    """A :class:`~explaind_math.TrajectoryRecorder` whose steps hold the ids and weights of every rank
    (``group``: the process group DDP averages over; default the world)."""

    def __init__(self, model, optimizer, *, group=None, **kwargs):
        if not dist.is_available() or not dist.is_initialized():
            raise RecordingError("DistributedTrajectoryRecorder needs an initialised torch.distributed process group")
        super().__init__(model, optimizer, **kwargs)
        self.group = group
        self.world_size = dist.get_world_size(group)
        # dropout: one seed for all ranks (rank 0's), and rank r's micro-batch m keyed m·W + r (no two ranks
        # draw the same masks; the gathered record holds every rank's rows)
        seed = [self._watch.seed]
        dist.broadcast_object_list(seed, src=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        self._watch.seed = int(seed[0])
        self._watch.rank, self._watch.world_size = dist.get_rank(group), self.world_size

    def _check_and_prepare(self, optimizer, args, kwargs) -> None:
        gathered: list = [None] * self.world_size
        dist.all_gather_object(gathered, (dict(self._pending), self._watch.local_forwards()), group=self.group)
        merged: dict[int, float] = {}
        for pending, _ in gathered:
            for i, w in pending.items():
                merged[i] = merged.get(i, 0.0) + w / self.world_size
        self._pending = merged
        self._watch.merge_ranks([forwards for _, forwards in gathered])
        super()._check_and_prepare(optimizer, args, kwargs)
