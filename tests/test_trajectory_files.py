"""Trajectory files: exact round trip, atomic writes, clear errors for bad files, never pickle."""

from __future__ import annotations

import json
import os
import pickle

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from safetensors import safe_open

import explaind_math as em
from explaind_math.errors import TrajectoryFileError
from explaind_math.testing.sharded_runs import assert_trajectories_identical, two_group_model_and_optimizer
from explaind_math.storage.single_file import FORMAT_NAME, FORMAT_VERSION

DT = torch.float64
N = 24



def _data(device):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 4, generator=g, dtype=DT)
    Y = torch.randint(0, 3, (N,), generator=g)
    return X.to(device), Y.to(device)


def _ce(out, y):
    return F.cross_entropy(out, y)


def _record(kind: str, record_gradients: bool, device, *, resumed: bool = False):
    """A recorded run with two param groups, an LR schedule, a frozen-statistics BatchNorm (buffers),
    unequal batches and explicit weights; optionally resumed from an optimizer state (carried state)."""
    X, Y = _data(device)
    model, opt = two_group_model_and_optimizer(kind, device)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    if resumed:
        for t in range(2):
            opt.zero_grad()
            _ce(model(X[:6]), Y[:6]).backward()
            opt.step()
    rec = em.TrajectoryRecorder(model, opt, record_gradients=record_gradients)
    for t in range(4):
        ids = torch.arange(5 * t, 5 * t + (5 if t < 3 else 3))
        w = torch.linspace(0.5, 1.5, len(ids), dtype=DT, device=X.device)  # the recorder moves w to the CPU
        opt.zero_grad()
        (F.cross_entropy(model(X[ids]), Y[ids], reduction="none") * w).sum().backward()
        rec.record_batch(ids, weights=w)
        opt.step()
        sched.step()
    traj = rec.trajectory(metadata={"run": kind, "seed": 1, "notes": ["α", 2.5, None]})
    return model, traj, X, Y


def _decompose(model, traj, X, Y):
    fn = em.decompose_adamw_training if traj.optimizer == "adamw" else em.decompose_sgd_momentum_training
    return fn(model, traj, _ce, (X, Y), X[:3], keep=("step", "param", "unit"))


# ---------------------------------------------------------------------------------------------
# round trip


@pytest.mark.parametrize("record_gradients", [True, False], ids=["with-gradients", "without-gradients"])
@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_round_trip_is_identical_and_decomposes_bit_for_bit(kind, record_gradients, device, tmp_path):
    model, traj, X, Y = _record(kind, record_gradients, device)
    path = traj.save(tmp_path / "run.safetensors")
    assert path == tmp_path / "run.safetensors"
    loaded = em.Trajectory.load(path)
    assert_trajectories_identical(traj, loaded)
    if kind == "adamw":
        assert "max_exp_avg_sq" in loaded.steps[0].state["0.weight"]
    a, b = _decompose(model, traj, X, Y), _decompose(model, loaded, X, Y)
    for field in ("kernel", "regularization", "f_initial", "f_final", "step_residuals"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.replay_errors == b.replay_errors
    assert a.units == b.units and a.param_labels == b.param_labels
    assert a.relative_residual <= 1e-9, a.summary()


@pytest.mark.parametrize("kind", ["adamw", "sgd"])
def test_round_trip_of_carried_state(kind, device, tmp_path):
    model, traj, X, Y = _record(kind, False, device, resumed=True)
    assert traj.initial_state, "a resumed optimizer carries state into the first recorded step"
    loaded = em.Trajectory.load(traj.save(tmp_path / "resumed.safetensors"))
    assert_trajectories_identical(traj, loaded)
    a, b = _decompose(model, traj, X, Y), _decompose(model, loaded, X, Y)
    assert a.carried_state is not None and torch.equal(a.carried_state, b.carried_state)
    assert torch.equal(a.kernel, b.kernel)


def test_float32_trajectory_round_trip(tmp_path):
    traj = em.Trajectory.from_records(
        optimizer="sgd",
        parameters=[{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([0.9, 1.8])}],
        batches=[[3, 1]],
        hyperparameters=[{"lr": 0.1}],
    )
    loaded = em.Trajectory.load(traj.save(tmp_path / "f32.safetensors"))
    assert loaded.dtype == torch.float32
    assert_trajectories_identical(traj, loaded)


def test_file_is_plain_safetensors_with_our_description(device, tmp_path):
    _, traj, _, _ = _record("sgd", True, device)
    path = traj.save(tmp_path / "t.safetensors")
    with safe_open(str(path), framework="pt") as fh:
        description = json.loads(fh.metadata()["explaind_math"])
        assert (description["format"], description["version"]) == (FORMAT_NAME, FORMAT_VERSION)
        assert len(list(fh.keys())) == description["num_tensors"]


# ---------------------------------------------------------------------------------------------
# atomic writes


def test_save_leaves_no_temporary_file(device, tmp_path):
    _, traj, _, _ = _record("adamw", False, device)
    traj.save(tmp_path / "a.safetensors")
    traj.save(tmp_path / "a.safetensors")  # overwrite in place
    assert sorted(os.listdir(tmp_path)) == ["a.safetensors"]


def test_save_creates_missing_directories(device, tmp_path):
    _, traj, _, _ = _record("sgd", False, device)
    path = traj.save(tmp_path / "deep" / "er" / "t.safetensors")
    assert path.is_file()


@pytest.mark.parametrize("failure", ["raise-before-writing", "raise-after-partial-write", "interrupt"])
def test_failed_save_keeps_the_previous_file(failure, device, tmp_path, monkeypatch):
    _, traj, _, _ = _record("adamw", False, device)
    path = tmp_path / "run.safetensors"
    traj.save(path)
    before = path.read_bytes()
    real_save = safetensors.torch.save_file

    def failing_save(tensors, filename, metadata=None):
        if failure == "raise-after-partial-write":
            real_save(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as fh:
                fh.truncate(100)
            raise OSError("disk full")
        if failure == "interrupt":
            raise KeyboardInterrupt
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", failing_save)
    expected = KeyboardInterrupt if failure == "interrupt" else OSError
    with pytest.raises(expected):
        traj.save(path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["run.safetensors"]
    monkeypatch.setattr(safetensors.torch, "save_file", real_save)
    assert_trajectories_identical(traj, em.Trajectory.load(path))


# ---------------------------------------------------------------------------------------------
# bad files


@pytest.fixture
def saved(device, tmp_path):
    _, traj, _, _ = _record("adamw", True, device)
    path = traj.save(tmp_path / "good.safetensors")
    return path, path.read_bytes()


def _write(tmp_path, data: bytes, name="bad.safetensors"):
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("fraction", [0.0, 0.001, 0.01, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file(fraction, saved, tmp_path):
    path, data = saved
    cut = int(len(data) * fraction)
    bad = _write(tmp_path, data[:cut])
    with pytest.raises(TrajectoryFileError, match=r"bad\.safetensors.*(truncated|not a readable)"):
        em.Trajectory.load(bad)


def test_file_missing_its_last_byte(saved, tmp_path):
    _, data = saved
    with pytest.raises(TrajectoryFileError, match="truncated"):
        em.Trajectory.load(_write(tmp_path, data[:-1]))


def test_random_bytes(tmp_path):
    data = torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    with pytest.raises(TrajectoryFileError, match="not a readable safetensors file"):
        em.Trajectory.load(_write(tmp_path, bytes(data.tolist())))


def test_empty_file(tmp_path):
    with pytest.raises(TrajectoryFileError, match="not a readable safetensors file"):
        em.Trajectory.load(_write(tmp_path, b""))


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(TrajectoryFileError, match="no such trajectory file"):
        em.Trajectory.load(tmp_path / "absent.safetensors")
    with pytest.raises(TrajectoryFileError):
        em.Trajectory.load(tmp_path)


def test_foreign_safetensors_file(tmp_path):
    path = tmp_path / "weights.safetensors"
    safetensors.torch.save_file({"layer.weight": torch.zeros(2, 2)}, str(path), metadata={"format": "pt"})
    with pytest.raises(TrajectoryFileError, match="not an explaind_math trajectory"):
        em.Trajectory.load(path)


def _rewrite(path, tmp_path, edit_description=None, edit_tensors=None, raw_description=None):
    """A copy of a trajectory file with its JSON description and/or tensors edited by hand."""
    with safe_open(str(path), framework="pt") as fh:
        meta = dict(fh.metadata())
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    description = json.loads(meta["explaind_math"])
    if edit_description is not None:
        edit_description(description)
    if edit_tensors is not None:
        edit_tensors(tensors)
    out = tmp_path / "edited.safetensors"
    text = raw_description if raw_description is not None else json.dumps(description)
    safetensors.torch.save_file(tensors, str(out), metadata={"explaind_math": text})
    return out


def test_wrong_format_version(saved, tmp_path):
    path, _ = saved
    edited = _rewrite(path, tmp_path, lambda d: d.update(version=FORMAT_VERSION + 1))
    with pytest.raises(TrajectoryFileError, match=rf"format version {FORMAT_VERSION + 1}.*reads {FORMAT_VERSION}"):
        em.Trajectory.load(edited)


def test_wrong_format_name(saved, tmp_path):
    path, _ = saved
    edited = _rewrite(path, tmp_path, lambda d: d.update(format="someone.else"))
    with pytest.raises(TrajectoryFileError, match="unknown format 'someone.else'"):
        em.Trajectory.load(edited)


def test_version_written_by_hand_without_anything_else(tmp_path):
    path = tmp_path / "hand.safetensors"
    meta = {"explaind_math": json.dumps({"format": FORMAT_NAME, "version": 0})}
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(path), metadata=meta)
    with pytest.raises(TrajectoryFileError, match="format version 0"):
        em.Trajectory.load(path)


@pytest.mark.parametrize(
    "raw",
    ["{not json", "[1, 2, 3]", json.dumps({"format": FORMAT_NAME, "version": FORMAT_VERSION})],
    ids=["not-json", "json-list", "fields-missing"],
)
def test_malformed_description(raw, saved, tmp_path):
    path, _ = saved
    with pytest.raises(TrajectoryFileError, match=r"edited\.safetensors"):
        em.Trajectory.load(_rewrite(path, tmp_path, raw_description=raw))


def test_description_inconsistent_with_tensors(saved, tmp_path):
    path, _ = saved

    def reshape(tensors):
        tensors["theta/2/0.weight"] = torch.zeros(2, 2, dtype=DT)

    with pytest.raises(TrajectoryFileError, match=r"corrupted.*theta|θ_2"):
        em.Trajectory.load(_rewrite(path, tmp_path, edit_tensors=reshape))

    def drop(tensors):
        del tensors["weights/1"]

    with pytest.raises(TrajectoryFileError, match="tensors stored"):
        em.Trajectory.load(_rewrite(path, tmp_path, edit_tensors=drop))

    def mistype(d):
        d["steps"][0]["units"] = "abc"

    with pytest.raises(TrajectoryFileError, match="corrupted"):
        em.Trajectory.load(_rewrite(path, tmp_path, edit_description=mistype))


def test_loading_never_unpickles(saved, monkeypatch):
    path, _ = saved

    def forbidden(*args, **kwargs):
        raise AssertionError("a trajectory file must never be unpickled")

    class ForbiddenUnpickler:
        def __init__(self, *args, **kwargs):
            forbidden()

    monkeypatch.setattr(torch, "load", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", ForbiddenUnpickler)
    loaded = em.Trajectory.load(path)
    assert loaded.num_steps == 4


def test_saving_never_pickles(device, tmp_path, monkeypatch):
    _, traj, _, _ = _record("sgd", True, device)

    def forbidden(*args, **kwargs):
        raise AssertionError("a trajectory file must never be pickled")

    monkeypatch.setattr(torch, "save", forbidden)
    monkeypatch.setattr(pickle, "dump", forbidden)
    monkeypatch.setattr(pickle, "dumps", forbidden)
    traj.save(tmp_path / "t.safetensors")
