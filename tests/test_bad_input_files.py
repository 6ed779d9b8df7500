"""Bad files (issue 17, categories 1 and 3): a flipped bit or an edited header of a single trajectory file
is an error naming the file and the tensor or field; recovery never deletes a readable shard; a
recording SIGKILLed at random moments recovers a readable prefix and resumes bit-identically."""

from __future__ import annotations

import json
import os
import random
import signal
import time
import warnings

import pytest
import safetensors.torch
import torch
from safetensors import safe_open

import explaind_math as em
from explaind_math.errors import TrajectoryFileError
from explaind_math.storage import ShardedTrajectory, recover_trajectory_directory
from explaind_math.storage.integrity import field_checksums
from explaind_math.storage.recovery import SET_ASIDE_NAME, RecoveryWarning, UnlistedShardWarning
from explaind_math.storage.single_file import FORMAT_VERSION
from explaind_math.testing.sharded_runs import assert_trajectories_identical, record

STEPS = 6


@pytest.fixture(scope="module")
def reference():
    model, traj, X, Y = record("adamw", STEPS)
    return model, traj, X, Y


@pytest.fixture
def saved(reference, tmp_path):
    _, traj, _, _ = reference
    return traj.save(tmp_path / "run.safetensors")


def _read(path):
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k).clone() for k in fh.keys()}
    return json.loads(meta["explaind_math"]), tensors


def _write(path, description, tensors, recompute=False):
    """Write an edited copy; ``recompute``: the adversary also recomputes every checksum."""
    if recompute:
        from explaind_math.storage.integrity import tensor_crc32

        description["tensor_crc32"] = {k: tensor_crc32(v) for k, v in tensors.items()}
        description["num_tensors"] = len(tensors)
        description["field_crc32"] = field_checksums(description)
    out = path.parent / "edited.safetensors"
    safetensors.torch.save_file(tensors, str(out), metadata={"explaind_math": json.dumps(description)})
    return out


def _flip_bit(tensor):
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).clone()
    raw[len(raw) // 2] ^= 0x10
    return raw.view(tensor.dtype).reshape(tensor.shape)


# ---------------------------------------------------------------------------------------------
# the single file: checksums per tensor and per field


def test_round_trip_still_decomposes_exactly(reference, saved):
    model, traj, X, Y = reference
    loaded = em.Trajectory.load(saved)
    assert_trajectories_identical(traj, loaded)


@pytest.mark.parametrize("key", ["theta/0/0.weight", "theta/3/3.bias", "weights/2", "state/1/0.weight/max_exp_avg_sq",
                                 "grad/4/3.weight", "buffer/1.running_mean"])
def test_flipped_bit_in_a_tensor_names_the_tensor(key, saved):
    d, tensors = _read(saved)
    tensors[key] = _flip_bit(tensors[key])
    with pytest.raises(TrajectoryFileError, match=rf"edited\.safetensors: corrupted tensor '{key}': its CRC-32 differs"):
        em.Trajectory.load(_write(saved, d, tensors))


@pytest.mark.parametrize("edit, field", [
    (lambda d: d["steps"][1]["hyperparameters"][0].update(lr=0.5), r"field 'steps\[1\]'"),
    (lambda d: d["steps"][3]["units"].reverse(), r"field 'steps\[3\]'"),
    (lambda d: d["steps"][0]["step_counts"].update({"0.weight": 9}), r"field 'steps\[0\]'"),
    (lambda d: d.update(optimizer="sgd"), r"field 'optimizer' was changed"),
    (lambda d: d["group_of"].update({"0.weight": 1}), r"field 'group_of' was changed"),
    (lambda d: d["metadata"].update(run="other"), r"field 'metadata' was changed"),
    (lambda d: d["parameter_names"].reverse(), r"field 'parameter_names' was changed"),
    (lambda d: d["tensor_crc32"].update({"weights/0": 1}), r"field 'tensor_crc32' was changed"),
])
def test_edited_header_field_is_named(edit, field, saved):
    d, tensors = _read(saved)
    edit(d)
    with pytest.raises(TrajectoryFileError, match=rf"edited\.safetensors: corrupted description: {field}"):
        em.Trajectory.load(_write(saved, d, tensors))


def test_header_edited_to_drop_a_step_is_refused(saved):
    d, tensors = _read(saved)
    d["steps"].pop()
    with pytest.raises(TrajectoryFileError, match=r"field 'steps' describes 5 steps \(θ_0..θ_5\), but the file holds "
                                                  r"θ_0..θ_6 \(7 snapshots\)"):
        em.Trajectory.load(_write(saved, d, tensors))


def test_step_dropped_with_its_tensors_is_refused_by_the_field_checksums(saved):
    d, tensors = _read(saved)
    d["steps"].pop()
    for k in [k for k in tensors if k.startswith(("theta/6/", "weights/5", "state/5/", "grad/5/"))]:
        del tensors[k]
        del d["tensor_crc32"][k]
    d["num_tensors"] = len(tensors)
    with pytest.raises(TrajectoryFileError, match=r"field 'steps' lists 5 steps, 6 were written"):
        em.Trajectory.load(_write(saved, d, tensors))


@pytest.mark.parametrize("field", ["field_crc32", "tensor_crc32", "steps", "optimizer"])
def test_missing_field_is_named(field, saved):
    d, tensors = _read(saved)
    del d[field]
    with pytest.raises(TrajectoryFileError, match=rf"field '{field}' is missing"):
        em.Trajectory.load(_write(saved, d, tensors))


def test_unknown_optimizer_name_is_named(saved):
    d, tensors = _read(saved)
    d["optimizer"] = "adagrad-ish"
    with pytest.raises(TrajectoryFileError, match=r"edited\.safetensors: field 'optimizer': .*adagrad-ish"):
        em.Trajectory.load(_write(saved, d, tensors))


# the adversary recomputes every checksum: the consistency checks still name the cause
@pytest.mark.parametrize("edit, match", [
    (lambda d, t: d["steps"][2]["hyperparameters"][0].pop("eps"), r"step 2: the hyper-parameters of param group 0 lack \['eps'\]"),
    (lambda d, t: d.update(optimizer="sgd"), r"step 0, param group 0: sgd: parameter-group option\(s\) \['amsgrad'"),
    (lambda d, t: d["steps"][1]["hyperparameters"][0].update(lr="fast"), r"step 1: the hyper-parameters of param group 0 are malformed"),
    (lambda d, t: d["steps"][1]["hyperparameters"].pop(), r"step 1: hyper-parameters for 1 param groups, the parameters use 2"),
    (lambda d, t: t.update({"theta/2/0.weight": t["theta/2/0.weight"] * float("nan")}), r"θ_2\['0.weight'\] contains NaN"),
    (lambda d, t: t.update({"weights/1": t["weights/1"][:2]}), r"step 1: \d+ sample ids but weights of shape \(2,\)"),
    (lambda d, t: d["steps"][0]["state_keys"].update({"0.weight": []}), r"step 0: parameter '0.weight' lacks optimizer state"),
])
def test_consistent_forgery_is_caught_by_the_consistency_checks(edit, match, saved):
    d, tensors = _read(saved)
    edit(d, tensors)
    with pytest.raises(TrajectoryFileError, match=rf"edited\.safetensors: {match}"):
        em.Trajectory.load(_write(saved, d, tensors, recompute=True))


def test_file_of_the_previous_format_version_is_refused_by_version(saved):
    d, tensors = _read(saved)
    d["version"] = 1
    with pytest.raises(TrajectoryFileError, match=rf"format version 1, this library reads {FORMAT_VERSION}"):
        em.Trajectory.load(_write(saved, d, tensors))


# ---------------------------------------------------------------------------------------------
# recovery never deletes a readable shard


@pytest.fixture
def directory(tmp_path):
    record("adamw", STEPS, tmp_path / "run", steps_per_shard=2)
    return tmp_path / "run"


def _same_steps(a, b, steps):
    """θ_0 … θ_steps and the units and weights of the steps before agree bit for bit."""
    for t in range(steps + 1):
        for n in a.parameter_names:
            assert torch.equal(a.parameters[t][n], b.parameters[t][n]), (t, n)
    for t in range(steps):
        assert a.steps[t].sample_ids == b.steps[t].sample_ids and torch.equal(a.steps[t].weights, b.steps[t].weights)


def _shards(directory):
    return sorted(p.name for p in directory.glob("steps-*.safetensors"))


def test_manifest_and_a_middle_shard_gone_keeps_the_prefix_and_sets_the_rest_aside(directory, reference):
    later = (directory / "steps-00000004-00000006.safetensors").read_bytes()
    middle = (directory / "steps-00000002-00000004.safetensors").read_bytes()
    (directory / "manifest.json").unlink()
    (directory / "steps-00000002-00000004.safetensors").unlink()
    with pytest.warns(RecoveryWarning, match=r"recovered 2 steps .*steps-00000004-00000006.*moved, intact"):
        assert recover_trajectory_directory(directory) == 2
    assert (directory / SET_ASIDE_NAME / "steps-00000004-00000006.safetensors").read_bytes() == later
    assert _shards(directory) == ["steps-00000000-00000002.safetensors"]
    _, traj, _, _ = reference
    assert torch.equal(ShardedTrajectory(directory).parameters[2]["0.weight"], traj.parameters[2]["0.weight"])
    # the user puts the missing shard back and the set-aside one too: everything is recovered
    (directory / "steps-00000002-00000004.safetensors").write_bytes(middle)
    os.replace(directory / SET_ASIDE_NAME / "steps-00000004-00000006.safetensors",
               directory / "steps-00000004-00000006.safetensors")
    assert recover_trajectory_directory(directory) == STEPS
    _same_steps(traj, ShardedTrajectory(directory), STEPS)  # (the metadata lived in the lost manifest)


def test_manifest_gone_rebuilds_every_step(directory, reference):
    (directory / "manifest.json").unlink()
    assert recover_trajectory_directory(directory) == STEPS
    _same_steps(reference[1], ShardedTrajectory(directory), STEPS)


def test_manifest_gone_and_a_corrupted_last_shard_is_set_aside_not_deleted(directory):
    path = directory / "steps-00000004-00000006.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-20] ^= 0xFF
    path.write_bytes(bytes(raw))
    (directory / "manifest.json").unlink()
    with pytest.warns(RecoveryWarning, match="steps-00000004-00000006"):
        assert recover_trajectory_directory(directory) == 4
    assert (directory / SET_ASIDE_NAME / path.name).read_bytes() == bytes(raw)


def test_unlisted_shard_after_a_gap_with_the_manifest_present_is_set_aside(directory):
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    assert [s[:2] for s in manifest["shards"]] == [[0, 2], [2, 4], [4, 6]]
    manifest.update(num_steps=2, shards=manifest["shards"][:1])  # as if the crash came before [2, 4] was listed
    path.write_text(json.dumps(manifest))
    (directory / "steps-00000002-00000004.safetensors").unlink()  # … and that shard is lost
    with pytest.warns(RecoveryWarning, match=r"recovered 2 steps .*steps-00000004-00000006"):
        assert recover_trajectory_directory(directory) == 2
    assert (directory / SET_ASIDE_NAME / "steps-00000004-00000006.safetensors").exists()


def test_shard_of_an_older_generation_is_deleted_after_truncation(directory):
    from explaind_math.storage import truncate_trajectory_directory

    old = (directory / "steps-00000004-00000006.safetensors").read_bytes()
    truncate_trajectory_directory(directory, 4)
    (directory / "steps-00000004-00000006.safetensors").write_bytes(old)  # left by an interrupted truncation
    assert recover_trajectory_directory(directory) == 4
    assert _shards(directory) == ["steps-00000000-00000002.safetensors", "steps-00000002-00000004.safetensors"]
    assert not (directory / SET_ASIDE_NAME).exists()


# ---------------------------------------------------------------------------------------------
# SIGKILL at random moments, then recover and resume


@pytest.mark.skipif(not (hasattr(signal, "SIGKILL") and hasattr(os, "fork")), reason="needs fork and SIGKILL")
@pytest.mark.parametrize("seed, steps_per_shard, background", [(0, 1, False), (1, 2, True), (2, 3, False), (3, 1, True)])
def test_sigkill_at_a_random_moment_then_resume_is_bit_identical(seed, steps_per_shard, background, tmp_path):
    """A forked child records 60 steps; once its first step is on disk it is SIGKILLed after a random delay
    (no clean-up of any kind). Whatever the moment, recovery leaves a readable prefix of the reference run and
    resuming from it records the rest bit-identically (no assertion depends on when the kill came)."""
    steps = 60
    directory = tmp_path / "run"
    _, reference, _, _ = record("adamw", steps)  # also warms torch up before forking
    pid = os.fork()
    if pid == 0:  # the child: record, never return into pytest
        try:
            record("adamw", steps, directory, steps_per_shard=steps_per_shard, background=background)
        finally:
            os._exit(0)
    deadline = time.monotonic() + 120
    while not (directory / "manifest.json").exists() and time.monotonic() < deadline:
        if os.waitpid(pid, os.WNOHANG) != (0, 0):
            break
        time.sleep(0.001)
    time.sleep(random.Random(seed).uniform(0.0, 0.15))
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    on_disk = recover_trajectory_directory(directory)
    assert 1 <= on_disk <= steps
    crashed = ShardedTrajectory(directory)
    _same_steps(reference, crashed, on_disk)
    _, resumed, _, _ = record("adamw", steps, directory, steps_per_shard=steps_per_shard, resume=True,
                              background=background)
    assert_trajectories_identical(reference, resumed)


def test_a_manifest_edited_to_drop_the_last_shard_warns_when_opened(directory, reference):
    """A manifest edited consistently (step count and shard list) to drop the last shard, that shard still
    on disk: opening warns that an unlisted shard continues the run; recovery adopts it, and the run is whole."""
    path = directory / "manifest.json"
    manifest = json.loads(path.read_text())
    manifest.update(num_steps=4, shards=manifest["shards"][:2])
    path.write_text(json.dumps(manifest))
    with pytest.warns(UnlistedShardWarning, match=r"lists 4 steps, but steps-00000004-00000006\.safetensors "
                                                  r"continues them .*recover_trajectory_directory"):
        assert ShardedTrajectory(directory).num_steps == 4
    assert recover_trajectory_directory(directory) == STEPS
    with warnings.catch_warnings():
        warnings.simplefilter("error", UnlistedShardWarning)  # whole again: no warning
        _same_steps(reference[1], ShardedTrajectory(directory), STEPS)
