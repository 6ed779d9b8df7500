"""Worker of test_ddp_recording: 2 gloo ranks train a float64 MLP under DDP with a DistributedSampler (with
``--dropout P``, a dropout layer on); the DistributedTrajectoryRecorder gathers each rank's ids, weights and
dropout rows; rank 0 saves the trajectory."""

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DistributedSampler

from explaind_math.integrations import DataLoaderWithIds
from explaind_math.integrations.ddp import DistributedTrajectoryRecorder


def data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 5, generator=g, dtype=torch.float64)
    return X, (X[:, 0] > 0).long()


def model(dropout: float = 0.0):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Dropout(dropout),
                               torch.nn.Linear(8, 2)).double()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--dropout", type=float, default=0.0)
    a = parser.parse_args()
    out = a.out
    dist.init_process_group("gloo")
    X, Y = data()
    ddp = DistributedDataParallel(model(a.dropout))
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-2)
    recorder = DistributedTrajectoryRecorder(ddp, optimizer, gradient_rescaling=True)
    dataset = list(zip(X, Y))
    sampler = DistributedSampler(dataset, shuffle=True, seed=0)
    loader = DataLoaderWithIds(dataset, batch_size=3, sampler=sampler)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for ids, (x, y) in loader:
            optimizer.zero_grad()
            F.cross_entropy(ddp(x), y).backward()  # DDP averages this over the ranks
            torch.nn.utils.clip_grad_norm_(ddp.parameters(), 0.5)
            recorder.record_batch(ids)
            optimizer.step()
    if dist.get_rank() == 0:
        recorder.trajectory().save(os.path.join(out, "ddp.safetensors"))
    dist.barrier()
    dist.destroy_process_group()
    # leave without interpreter finalization: tearing down objects that gloo's worker threads still reference can
    # abort a rank ("terminate called without an active exception", seen once under CI load); the output is written
    os._exit(0)
