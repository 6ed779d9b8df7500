"""The steps split across two torch.distributed ranks (gloo, launched with torchrun) give the single-process
result to 1e-12 (MATH.md §11: the buffers are carried across the block boundary by a scan).

The cases (explaind_math.testing.distributed_cases) put a block boundary where it matters: inside a run whose
SGD momentum is switched on mid-run, through AdamW's first moment, with optimizer state carried in from before
the recording, with an adaptive quadrature, on the Jacobian and JVP paths, with the step axis gathered or
summed by all_reduce, and with fewer steps than ranks.
"""

import os
import subprocess
import sys

import pytest
import torch.distributed as dist
from safetensors.torch import load_file

from explaind_math.testing.distributed_cases import CASES, decompose_case

VERIFIES = "block_scan"

AGREEMENT = 1e-12  # relative to 1 + the L1 mass of the compared tensor: only the order of sums differs


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build of torch")
    out = tmp_path_factory.mktemp("distributed")
    worker = os.path.join(os.path.dirname(__file__), "distributed_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker,
               "--out", str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, f"torchrun failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return {name: load_file(os.path.join(out, f"{name}.safetensors")) for name in CASES}


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process(two_rank_results, name):
    split = two_rank_results[name]
    single = decompose_case(name)
    assert single.relative_residual <= 1e-9
    expected = {"kernel": single.kernel, "regularization": single.regularization, "f_initial": single.f_initial,
                "f_final": single.f_final, "step_residuals": single.step_residuals}
    if single.carried_state is not None:
        expected["carried_state"] = single.carried_state
    assert set(expected) <= set(split), f"missing {set(expected) - set(split)}"
    for key, value in expected.items():
        got = split[key]
        assert got.shape == value.shape, f"{name}/{key}: shape {tuple(got.shape)} vs {tuple(value.shape)}"
        scale = 1 + float(value.abs().sum())
        err = float((got - value).abs().max()) if value.numel() else 0.0
        assert err <= AGREEMENT * scale, f"{name}/{key}: differs by {err:.3e} (scale {scale:.2e})"
    assert split["nodes_per_step"].tolist() == single.nodes_per_step
    # the replay check ran on every rank's steps and passed there as here
    assert len(split["replay_errors"]) == len(single.replay_errors)
    assert max(split["replay_errors"].tolist()) <= 1e-8


def test_blocks_cover_the_steps_once():
    from explaind_math.engine.distributed import block_of_rank

    for steps in range(0, 12):
        for world in range(1, 5):
            covered = [t for r in range(world) for t in block_of_rank(steps, world, r)]
            assert covered == list(range(steps))


def test_distributed_without_a_process_group_is_refused():
    import explaind_math as em

    with pytest.raises(em.ExplaindError, match="init_process_group"):
        decompose_case("adamw_one_step", distributed=True)


def test_the_distributed_example_runs_under_torchrun():
    """examples/distributed.py: rank 0 records to a trajectory directory, two ranks decompose it, rank 0
    compares with one process (the step axis is gathered, so the scores are equal bit for bit)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available in this build of torch")
    example = os.path.join(os.path.dirname(__file__), os.pardir, "examples", "distributed.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", example,
               "--steps", "5"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(l for l in done.stdout.splitlines() if l.startswith("max |I(ranks) − I(one process)|"))
    assert float(line.split("= ")[1].split()[0]) <= 1e-12
