"""Recording a DistributedDataParallel run (issue 16): 2 gloo ranks under torchrun, each rank's ids and
weights gathered into one trajectory; the averaged, clipped gradient is reproduced at every step (the
gradient-sum check) and the decomposition is exact."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import explaind_math as em

sys.path.insert(0, os.path.dirname(__file__))
from ddp_recording_worker import data, model  # noqa: E402


def test_ddp_run_recorded_by_two_ranks_decomposes_exactly(tmp_path):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build of torch")
    worker = os.path.join(os.path.dirname(__file__), "ddp_recording_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
               "--out", str(tmp_path)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    trajectory = em.Trajectory.load(str(tmp_path / "ddp.safetensors"))
    assert trajectory.num_steps == 8
    assert all(len(step.sample_ids) == 6 for step in trajectory.steps)  # 3 ids from each of the 2 ranks
    assert all(torch.allclose(step.weights, torch.full((6,), 1 / 6, dtype=torch.float64)) for step in trajectory.steps)
    X, Y = data()
    result = em.decompose_adamw_training(model(), trajectory, loss_fn=lambda out, y: F.cross_entropy(out, y),
                                         train_data=(X, Y), test_inputs=X[:3], quadrature=em.gauss_legendre(8),
                                         keep=("test", "unit", "output"), dtype=torch.float64)
    assert result.relative_residual <= 1e-9
    assert sorted(result.units) == list(range(24))
