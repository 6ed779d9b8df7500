"""Trajectory directories (issue 7, capability 4): shards written as training runs, crash-safe and
resumable, read lazily and memory-mapped, with named errors for damaged files."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F

import explaind_math as em
from explaind_math import storage as shards
from explaind_math.errors import RecordingError, TrajectoryFileError
from explaind_math.storage import (
    ShardedTrajectory,
    TrajectoryShardWriter,
    recover_trajectory_directory,
    truncate_trajectory_directory,
)
from explaind_math.testing.sharded_runs import (
    assert_trajectories_identical,
    make_data,
    make_training,
    record,
    train_step,
)

STEPS = 8
ROOT = Path(__file__).resolve().parents[1]


def _decompose(model, traj, X, Y):
    fn = em.decompose_adamw_training if traj.optimizer == "adamw" else em.decompose_sgd_momentum_training
    return fn(model, traj, F.cross_entropy, (X, Y), X[:3], keep=("step", "param", "unit"))


def _files(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def _manifest(directory: Path) -> dict:
    return json.loads((directory / "manifest.json").read_text())


@pytest.fixture(scope="module")
def reference():
    """The uninterrupted in-memory recordings of both optimizers (model, trajectory, X, Y)."""
    return {kind: record(kind, STEPS) for kind in ("adamw", "sgd")}


# ---------------------------------------------------------------------------------------------
# the directory form equals the in-memory form, and so does its decomposition


@pytest.mark.parametrize("steps_per_shard, background", [(1, False), (3, False), (2, True)],
                         ids=["1-step-shards", "3-step-shards", "2-step-shards-background"])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_directory_recording_decomposes_bit_for_bit(kind, steps_per_shard, background, reference, tmp_path):
    model, in_memory, X, Y = reference[kind]
    model_d, on_disk, _, _ = record(kind, STEPS, tmp_path, steps_per_shard=steps_per_shard, background=background)
    assert isinstance(on_disk, ShardedTrajectory)
    for a, b in zip(model.parameters(), model_d.parameters()):
        assert torch.equal(a, b)
    assert_trajectories_identical(in_memory, on_disk)
    reopened = em.Trajectory.load(tmp_path)
    assert isinstance(reopened, ShardedTrajectory)
    a, b = _decompose(model, in_memory, X, Y), _decompose(model, reopened, X, Y)
    for field in ("kernel", "regularization", "f_initial", "f_final", "step_residuals"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.replay_errors == b.replay_errors and a.units == b.units
    assert b.relative_residual <= 1e-9, b.summary()
    # the decomposition read each shard once: the cache holds the shards of θ_t and θ_{t+1}
    assert reopened.shards_read == -(-STEPS // steps_per_shard)


def test_layout_of_a_directory(tmp_path):
    _, traj, _, _ = record("adamw", 7, tmp_path, steps_per_shard=3)
    assert _files(tmp_path) == [".lock", "initial.safetensors", "manifest.json",
                                "steps-00000000-00000003.safetensors", "steps-00000003-00000006.safetensors",
                                "steps-00000006-00000007.safetensors"]
    m = _manifest(tmp_path)
    assert (m["format"], m["version"]) == (shards.DIRECTORY_FORMAT, shards.DIRECTORY_VERSION)
    assert m["num_steps"] == 7 and [s[:2] for s in m["shards"]] == [[0, 3], [3, 6], [6, 7]]
    assert m["metadata"] == {"run": "adamw", "gradient_rescaling": False}
    # every shard is a plain safetensors file: θ_{t+1} and the step's tensors under the one-file keys
    keys = set(safetensors.torch.load_file(str(tmp_path / "steps-00000003-00000006.safetensors")))
    assert {f"theta/{t}/0.weight" for t in (4, 5, 6)} <= keys
    assert {"weights/3", "state/3/3.weight/max_exp_avg_sq", "state/5/0.bias/max_exp_avg_sq", "grad/4/0.bias"} <= keys
    assert not any(k.startswith("theta/3/") for k in keys)


def test_conversions_between_the_two_forms(reference, tmp_path):
    _, in_memory, _, _ = reference["adamw"]
    directory = in_memory.save_directory(tmp_path / "dir", steps_per_shard=2)
    assert isinstance(directory, ShardedTrajectory) and len(directory.shard_files) == STEPS // 2
    assert_trajectories_identical(in_memory, directory)
    one_file = em.Trajectory.load(directory.save(tmp_path / "one.safetensors"))  # directory → one file
    assert type(one_file) is em.Trajectory
    assert_trajectories_identical(in_memory, one_file)
    resharded = directory.save_directory(tmp_path / "resharded", steps_per_shard=5)  # shard by shard
    assert [p.name for p in resharded.shard_files] == ["steps-00000000-00000005.safetensors",
                                                      "steps-00000005-00000008.safetensors"]
    assert_trajectories_identical(in_memory, resharded)
    materialized = resharded.to_memory()
    assert type(materialized) is em.Trajectory
    assert_trajectories_identical(in_memory, materialized)
    with pytest.raises(TrajectoryFileError, match="already holds a trajectory"):
        in_memory.save_directory(tmp_path / "dir")


def test_recorder_flushes_on_trajectory_and_close(tmp_path):
    X, Y = make_data()
    model, opt, sched = make_training("sgd")
    rec = em.TrajectoryRecorder(model, opt, directory=tmp_path, steps_per_shard=4)
    assert rec.directory == tmp_path
    for t in range(3):
        train_step(model, opt, sched, X, Y, t, rec)
    assert rec.num_steps == 3 and not (tmp_path / "manifest.json").exists()  # pending, not on disk yet
    assert rec.trajectory().num_steps == 3  # writes the partial shard
    for t in range(3, 5):
        train_step(model, opt, sched, X, Y, t, rec)
    with pytest.raises(RecordingError, match="another process"):  # one writer per directory
        em.TrajectoryRecorder(model, opt, directory=tmp_path)
    rec.close()
    assert [s[:2] for s in _manifest(tmp_path)["shards"]] == [[0, 3], [3, 5]]
    # closed: the lock is free, and the same model and optimizer resume exactly where they stopped
    with em.TrajectoryRecorder(model, opt, directory=tmp_path) as again:
        assert again.resumed_from == 5 and again.num_steps == 5


# ---------------------------------------------------------------------------------------------
# crash and resume


CRASHES = {  # crash point, steps per shard, steps listed in the manifest after the crash, file left behind
    "exit-mid-training": ("after-step:4", 3, 3, None),  # steps 3 and 4 were pending in memory: lost
    "kill-between-shard-and-manifest": ("before-manifest:4", 2, 4, "steps-00000004-00000006.safetensors"),
    "kill-while-writing-a-shard": ("mid-shard:5", 1, 5, ".steps-00000005-00000006.safetensors."),
    # shards written by a thread: any prefix of the 6 finished steps may be committed, and a shard
    # finished but not yet listed may be adopted by recovery
    "exit-with-background-writes": ("background:after-step:5", 1, None, None),
}


@pytest.fixture(scope="module")
def crashed_directories(tmp_path_factory):
    """One subprocess (one interpreter start) records each crash scenario in a forked child."""
    base = tmp_path_factory.mktemp("crashed")
    runs = []
    for name, (crash, k, _, _) in CRASHES.items():
        runs += ["--run", f"{base / name}:{k}:{crash}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "explaind_math.testing.sharded_runs", "--optimizer", "adamw", "--steps", str(STEPS),
         *runs],
        env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return base


def _assert_same_parameters(trajectory, in_memory, steps: int) -> None:
    """θ_1 … θ_steps of ``trajectory`` are bit-identical to those of the uninterrupted run."""
    for t in range(steps):
        for n in in_memory.parameter_names:
            assert torch.equal(trajectory.parameters[t + 1][n], in_memory.parameters[t + 1][n])


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the crash scenarios run in forked children")
@pytest.mark.parametrize("scenario", list(CRASHES))
def test_crash_then_resume_equals_an_uninterrupted_run(scenario, crashed_directories, reference):
    crash, steps_per_shard, on_disk, leftover = CRASHES[scenario]
    directory = crashed_directories / scenario
    if leftover is not None:
        assert any(name.startswith(leftover) for name in os.listdir(directory)), _files(directory)
    # what the crash left is a readable trajectory of the steps listed in the manifest
    crashed = ShardedTrajectory(directory)
    if on_disk is None:
        on_disk = crashed.num_steps
        assert on_disk <= 6
    assert crashed.num_steps == on_disk
    _, in_memory, X, Y = reference["adamw"]
    _assert_same_parameters(crashed, in_memory, on_disk)
    recovered = recover_trajectory_directory(directory)
    if crash.startswith("background"):
        # the thread may have finished a shard whose manifest commit the exit cut off: recovery adopts
        # it, and every adopted step must be the uninterrupted run's
        assert on_disk <= recovered <= 6
        _assert_same_parameters(ShardedTrajectory(directory), in_memory, recovered)
    else:
        adopted = 2 if crash.startswith("before-manifest") else 0
        assert recovered == on_disk + adopted
    assert not any(name.endswith(".tmp") for name in os.listdir(directory))
    # resume: the model and optimizer restored to the last finished step (here: recomputed), then record on
    model, resumed, _, _ = record("adamw", STEPS, directory, steps_per_shard=steps_per_shard, resume=True,
                                  background=crash.startswith("background"))
    assert_trajectories_identical(in_memory, resumed)
    a, b = _decompose(model, in_memory, X, Y), _decompose(model, resumed, X, Y)
    assert torch.equal(a.kernel, b.kernel) and torch.equal(a.step_residuals, b.step_residuals)


def test_resume_after_truncating_to_an_earlier_checkpoint(reference, tmp_path):
    record("sgd", STEPS, tmp_path, steps_per_shard=3)
    # the user's checkpoint is after step 3 (θ_4); step 3 lives in the shard of steps 3..5, cut in two
    assert truncate_trajectory_directory(tmp_path, 4) == 4
    assert [s[:2] for s in _manifest(tmp_path)["shards"]] == [[0, 3], [3, 4]]
    assert "steps-00000003-00000006.safetensors" not in os.listdir(tmp_path)
    _, in_memory, X, Y = reference["sgd"]
    model, resumed, _, _ = record("sgd", STEPS, tmp_path, steps_per_shard=3, resume=True)
    assert_trajectories_identical(in_memory, resumed)
    with pytest.raises(em.ExplaindError, match="holds 8 steps; cannot truncate to 9"):
        truncate_trajectory_directory(tmp_path, 9)


def test_interrupted_truncation_leaves_no_stale_shard_behind(tmp_path):
    """Truncation commits the manifest, then deletes the dropped shards; a crash in between leaves a
    shard that continues the kept steps, and recovery must not adopt it (it has an older generation)."""
    record("sgd", 6, tmp_path, steps_per_shard=2)
    stale = (tmp_path / "steps-00000004-00000006.safetensors").read_bytes()
    truncate_trajectory_directory(tmp_path, 4)
    (tmp_path / "steps-00000004-00000006.safetensors").write_bytes(stale)  # as if the unlink never happened
    assert recover_trajectory_directory(tmp_path) == 4
    assert "steps-00000004-00000006.safetensors" not in os.listdir(tmp_path)


def _resume_refused(tmp_path, match, edit):
    """Record 4 steps and close; ``edit`` changes the model or optimizer; reopening must refuse."""
    X, Y = make_data()
    model, opt, sched = make_training("adamw")
    with em.TrajectoryRecorder(model, opt, directory=tmp_path) as rec:
        for t in range(4):
            train_step(model, opt, sched, X, Y, t, rec)
    before = _files(tmp_path), _manifest(tmp_path)
    model, opt = edit(model, opt)
    with pytest.raises(RecordingError, match=match):
        em.TrajectoryRecorder(model, opt, directory=tmp_path)
    assert (_files(tmp_path), _manifest(tmp_path)) == before  # a refusal writes nothing


def test_resume_refuses_parameters_that_are_not_the_last_theta(tmp_path):
    def nudge(model, opt):
        with torch.no_grad():
            model[3].bias[1] += 1e-12
        return model, opt

    _resume_refused(tmp_path, r"not the recorded θ_4: '3\.bias' \(max \|difference\| 1e-12\).*truncate", nudge)


def test_resume_refuses_a_fresh_model(tmp_path):
    def fresh(model, opt):
        return make_training("adamw")[:2]

    _resume_refused(tmp_path, r"not the recorded θ_4: '0\.weight'", fresh)


def test_resume_refuses_optimizer_step_counts_that_differ(tmp_path):
    def bump(model, opt):
        for st in opt.state.values():
            st["step"] += 1
        return model, opt

    _resume_refused(tmp_path, r"optimizer's state.*'0\.weight': step count 5, recorded 4", bump)


def test_resume_refuses_a_second_moment_that_differs(tmp_path):
    def scale(model, opt):
        st = opt.state[model[3].weight]
        st["max_exp_avg_sq"] = st["max_exp_avg_sq"] * 2
        return model, opt

    _resume_refused(tmp_path, r"'3\.weight': 'max_exp_avg_sq' differs", scale)


def test_resume_refuses_another_optimizer(tmp_path):
    def sgd(model, opt):
        return model, torch.optim.SGD(model.parameters(), lr=0.1)

    _resume_refused(tmp_path, r"recorded with the 'adamw' rule, this optimizer uses 'sgd'", sgd)


def test_resume_refuses_changed_buffers(tmp_path):
    def buffers(model, opt):
        with torch.no_grad():
            model[1].running_var += 1
        return model, opt

    _resume_refused(tmp_path, "buffers differ", buffers)


# ---------------------------------------------------------------------------------------------
# damaged directories: named errors, nothing else lost


@pytest.fixture
def recorded(tmp_path):
    """A directory of 6 AdamW steps in shards of 2, with the model and data that made it."""
    model, traj, X, Y = record("adamw", 6, tmp_path / "run", steps_per_shard=2)
    return tmp_path / "run", model, X, Y


def _steps_readable(directory, steps):
    traj = ShardedTrajectory(directory)
    for t in steps:
        assert traj.steps[t].sample_ids and traj.parameters[t + 1]


@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.999])
def test_truncated_shard(fraction, recorded):
    directory, model, X, Y = recorded
    path = directory / "steps-00000002-00000004.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    traj = ShardedTrajectory(directory)  # the manifest is intact: opening reads no shard
    with pytest.raises(TrajectoryFileError, match=r"steps-00000002-00000004\.safetensors: \d+ bytes, the manifest"):
        traj.steps[3]
    with pytest.raises(TrajectoryFileError, match=r"steps-00000002-00000004\.safetensors"):
        _decompose(model, traj, X, Y)  # caught before the first step (check_model looks at every file)
    _steps_readable(directory, [0, 1, 4, 5])  # the other shards are untouched


def test_missing_shard(recorded):
    directory, model, X, Y = recorded
    (directory / "steps-00000004-00000006.safetensors").unlink()
    with pytest.raises(TrajectoryFileError, match=r"steps-00000004-00000006\.safetensors: missing.*steps 4\.\.5"):
        _decompose(model, ShardedTrajectory(directory), X, Y)
    _steps_readable(directory, [0, 1, 2, 3])


def test_changed_bytes_are_caught_by_the_checksum(recorded):
    directory, _, _, _ = recorded
    path = directory / "steps-00000000-00000002.safetensors"
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x01  # one bit of a tensor: still a finite number
    path.write_bytes(bytes(data))
    with pytest.raises(TrajectoryFileError, match=r"steps-00000000-00000002\.safetensors: corrupted.*CRC-32"):
        ShardedTrajectory(directory).parameters[1]
    _steps_readable(directory, [2, 3, 4, 5])


def test_nan_in_a_shard_names_the_step_and_file(recorded):
    directory, _, _, _ = recorded
    path = directory / "steps-00000002-00000004.safetensors"
    tensors = safetensors.torch.load_file(str(path))
    header_size = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8: 8 + header_size])
    start, _ = header["theta/4/3.weight"]["data_offsets"]
    data = bytearray(path.read_bytes())
    data[8 + header_size + start: 8 + header_size + start + 8] = b"\xff" * 8  # a float64 NaN
    path.write_bytes(bytes(data))
    assert "theta/4/3.weight" in tensors
    traj = ShardedTrajectory(directory, verify_checksums=False)  # past the checksum, to the content checks
    with pytest.raises(TrajectoryFileError, match=r"steps-00000002-00000004\.safetensors: θ_4\['3\.weight'\] contains NaN"):
        traj.parameters[4]


def test_foreign_files(recorded):
    directory, model, X, Y = recorded
    (directory / "notes.txt").write_text("mine")  # a file that is not ours: ignored and kept
    foreign = directory / "steps-00000002-00000004.safetensors"
    safetensors.torch.save_file({"layer.weight": torch.zeros(2, 2)}, str(foreign))
    m = _manifest(directory)
    m["shards"][1][2] = foreign.stat().st_size  # even with the size and checksum made to match
    m["shards"][1][3] = shards.file_crc32(foreign)
    (directory / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(TrajectoryFileError, match=r"steps-00000002-00000004\.safetensors: a safetensors file, but not part"):
        ShardedTrajectory(directory).steps[2]
    assert recover_trajectory_directory(directory) == 6
    assert (directory / "notes.txt").read_text() == "mine"
    _steps_readable(directory, [0, 1, 4, 5])


def _tamper(directory, edit=None, text=None):
    path = directory / "manifest.json"
    if text is None:
        m = json.loads(path.read_text())
        edit(m)
        text = json.dumps(m)
    path.write_text(text)


@pytest.mark.parametrize(
    "edit, match",
    [
        (None, r"manifest\.json: not valid JSON"),
        (lambda m: m.update(version=2), r"manifest\.json: trajectory format version 2, this library reads 1"),
        (lambda m: m.update(format="someone.else"), r"manifest\.json: unknown format 'someone\.else'"),
        (lambda m: m["shards"].pop(1), r"manifest\.json: shard entry \[4, 6, .*does not continue"),
        (lambda m: m.update(num_steps=7), r"manifest\.json: num_steps is 7, the shards hold 6 steps"),
        (lambda m: m["shapes"].update({"0.weight": [4, 5]}), r"initial\.safetensors: its shapes differ"),
        (lambda m: m.update(optimizer="adagrad-ish"), r"manifest\.json: .*adagrad-ish"),
        (lambda m: m["group_of"].pop("0.bias"), r"manifest\.json: group_of covers"),
        (lambda m: m.pop("generation"), r"manifest\.json: malformed manifest \(KeyError"),
    ],
    ids=["not-json", "version", "format", "gap", "num-steps", "shape", "optimizer", "groups", "field-missing"],
)
def test_tampered_manifest_at_opening(edit, match, recorded):
    directory, _, _, _ = recorded
    _tamper(directory, edit, text="{broken" if edit is None else None)
    with pytest.raises(TrajectoryFileError, match=match):
        em.Trajectory.load(directory)


def test_tampered_manifest_found_when_the_shard_is_read(recorded):
    directory, _, _, _ = recorded
    _tamper(directory, lambda m: m["shards"][0].__setitem__(3, m["shards"][0][3] ^ 1))  # its CRC-32
    traj = ShardedTrajectory(directory)
    with pytest.raises(TrajectoryFileError, match=r"steps-00000000-00000002\.safetensors: corrupted"):
        traj.steps[0]
    with pytest.raises(TrajectoryFileError, match=r"steps-00000000-00000002\.safetensors: corrupted"):
        traj.validate()
    assert traj.steps[5].sample_ids  # the other shards are still read


def test_not_a_trajectory_directory(tmp_path):
    with pytest.raises(TrajectoryFileError, match="no manifest.json"):
        em.Trajectory.load(tmp_path)
    with pytest.raises(TrajectoryFileError, match="no such trajectory directory"):
        ShardedTrajectory(tmp_path / "absent")


def test_reading_a_directory_never_unpickles(recorded, monkeypatch):
    directory, _, _, _ = recorded

    def forbidden(*args, **kwargs):
        raise AssertionError("a trajectory directory must never be unpickled")

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    ShardedTrajectory(directory).validate()


@pytest.mark.parametrize(
    "values, finite",
    [([1.0, 2.0], True), ([1.0, float("nan")], False), ([float("inf"), 1.0], False),
     ([float("-inf"), float("inf")], False), ([1e308, 1e308], True), ([], True)],
    ids=["finite", "nan", "inf", "inf-minus-inf", "sum-overflows", "empty"],
)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.complex128])
def test_all_finite_is_exact(values, finite, dtype):
    """The recorder's and the shards' finiteness check: one reduction, exact also when the sum overflows."""
    from explaind_math.trajectory import all_finite

    x = torch.tensor(values, dtype=torch.float64)
    if dtype == torch.float16:
        x = x.clamp(-6e4, 6e4).where(x.isfinite(), x)  # 1e308 → the largest float16 (the sum still overflows)
    x = x.to(dtype)
    assert all_finite(x) is finite
    assert all_finite(x.reshape(-1, 1)) is finite


# ---------------------------------------------------------------------------------------------
# larger than memory: opening reads nothing, reading keeps a bounded working set


def _rss_mib() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="resident memory read from /proc")
def test_a_large_directory_is_read_lazily(tmp_path):
    """200 steps of a 250k-parameter model (float32, plain SGD: θ only; 50 shards of 4 steps, 200 MB):
    opening it and checking it against the model read no shard; walking every θ_t keeps at most the
    cached shards mapped, so resident memory grows by a few shards (4 MB each), not by the 200 MB."""
    steps, side = 200, 500
    size = side * side
    model = torch.nn.Linear(side, side, bias=False).float()
    writer = TrajectoryShardWriter(tmp_path, steps_per_shard=4)
    theta = model.weight.detach().clone()
    writer.begin(optimizer="sgd", parameter_names=["weight"], group_of={"weight": 0}, theta_0={"weight": theta},
                 initial_state={}, buffers={}, metadata={})
    hyper = em.Trajectory.from_records(  # the SGD group values as the recorder stores them
        optimizer="sgd", parameters=[{"w": torch.zeros(1)}] * 2, batches=[[0]], hyperparameters=[{"lr": 0.1}]
    ).steps[0].hyperparameters[0]
    for t in range(steps):
        theta = theta * 0.999  # a new tensor per step
        writer.append(em.StepRecord([t % 50], torch.ones(1, dtype=torch.float64), [hyper], ["weight"]), {"weight": theta})
    writer.close()
    assert sum(p.stat().st_size for p in tmp_path.glob("steps-*")) > steps * size * 4

    before = _rss_mib()
    traj = em.Trajectory.load(tmp_path)
    traj.check_model(model)
    assert traj.num_steps == steps and traj.shapes() == {"weight": (side, side)} and len(traj.sample_ids()) == 50
    assert traj.shards_read == 0
    assert _rss_mib() - before < 20, "opening a directory must not read its shards"

    peak = 0.0
    total = 0.0
    for t in range(steps + 1):
        total += float(traj.parameters[t]["weight"][0, 0])
        total += float(traj.parameters[t]["weight"].sum())  # touch every page of θ_t
        peak = max(peak, _rss_mib() - before)
    assert traj.shards_read == steps // 4 and len(traj._cache) <= traj.cache_shards
    # the cache (2 shards) and the θ being summed: a few MB; a generous bound, far below the 200 MB read
    assert peak < 40, f"resident memory grew by {peak:.0f} MiB while reading 200 MB of shards"
    assert torch.isfinite(torch.tensor(total))
