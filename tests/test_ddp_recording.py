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


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_ddp_run_recorded_by_two_ranks_decomposes_exactly(tmp_path, dropout):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build of torch")
    worker = os.path.join(os.path.dirname(__file__), "ddp_recording_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
               "--out", str(tmp_path), "--dropout", str(dropout)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    trajectory = em.Trajectory.load(str(tmp_path / "ddp.safetensors"))
    assert trajectory.num_steps == 8
    assert all(len(step.sample_ids) == 6 for step in trajectory.steps)  # 3 ids from each of the 2 ranks
    assert all(torch.allclose(step.weights, torch.full((6,), 1 / 6, dtype=torch.float64)) for step in trajectory.steps)
    if dropout:  # every rank's rows, rank r's micro-batch m at position m·W + r
        record = trajectory.metadata["dropout"]
        assert [len(mbs) for mbs in record["steps"].values()] == [2] * 8
        assert all(sorted(i for mb in mbs for i in mb) == step.sample_ids
                   for mbs, step in zip(record["steps"].values(), trajectory.steps))
    X, Y = data()
    result = em.decompose_adamw_training(model(dropout).eval(), trajectory, loss_fn=lambda out, y: F.cross_entropy(out, y),
                                         train_data=(X, Y), test_inputs=X[:3], quadrature=em.gauss_legendre(8),
                                         keep=("test", "unit", "output"), dtype=torch.float64)
    assert result.relative_residual <= 1e-9
    assert sorted(result.units) == list(range(24))


def test_trainer_under_torchrun_records_every_rank_and_trains_as_hf_does(tmp_path):
    """RecordingTrainer under torchrun (2 gloo ranks, DDP): the recorder gathers both ranks' ids, weights and dropout
    rows; with dropout off it trains to the plain Trainer's parameters; with dropout on the run decomposes exactly."""
    pytest.importorskip("transformers")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build of torch")
    from explaind_math.integrations import collate_padded, hf
    from trainer_ddp_worker import gpt2, synthetic_sequences, train_set

    worker = os.path.join(os.path.dirname(__file__), "trainer_ddp_worker.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
               "--out", str(tmp_path)]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    # the recording trains as HF's Trainer does (up to Adam's amplification of float64 rounding on gradients
    # that are zero but for rounding, e.g. GPT-2's attention key biases: measured 4e-8)
    assert float((tmp_path / "difference.txt").read_text()) <= 1e-6
    trajectory = em.Trajectory.load(str(tmp_path / "trainer.safetensors"))
    assert trajectory.num_steps == 4 and all(len(step.sample_ids) == 4 for step in trajectory.steps)  # 2 ranks × 2
    lengths = {i: len(item["input_ids"]) for i, item in enumerate(train_set())}
    for step in trajectory.steps:  # w_i = 1 / (HF's num_items_in_batch over both ranks' batches), not over one rank's
        counts = {sum(lengths[i] for i in step.sample_ids), sum(lengths[i] - 1 for i in step.sample_ids)}
        assert torch.all(step.weights == step.weights[0]) and round(1.0 / float(step.weights[0])) in counts
    test = collate_padded(synthetic_sequences(2, seed=2))
    labels = test.pop("labels")
    result = em.decompose_function_of_output(gpt2(0.1).eval(), trajectory, hf.causal_lm_loss, train_set(), test,
                                             hf.causal_lm_loss, test_labels=labels, keep=("test", "unit"),
                                             quadrature=em.gauss_legendre(8), dtype=torch.float64)
    assert result.relative_residual <= 1e-9, result.summary()
