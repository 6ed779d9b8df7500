"""How recorded dropout reaches the recorder (explaind_math.integrations.forward.DropoutRoute): the first recorded
forward runs under the torch-function mode and the route together; when the mode saw no dropout call that the
route did not, later forwards take the route alone (the mode's hook costs every tensor operation). A dropout
called by a name bound before recording keeps the mode; a routed forward that still draws random numbers is
refused at its step, the earlier steps kept. Every run here decomposes exactly either way."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.functional import dropout as bound_dropout  # a name bound before any recording

import explaind_math as em
from explaind_math.errors import RecordingError
from explaind_math.integrations import DataLoaderWithIds
from explaind_math.integrations.forward import ORIGINAL_DROPOUT, ORIGINAL_SDPA

DT = torch.float64


class _Net(nn.Module):
    """Linear → tanh → dropout → linear; ``how`` says how the dropout is called, ``from_step`` from which training
    forward on a second dropout through another name (or noise) joins in."""

    def __init__(self, how: str = "module", from_step: int = 0):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b, self.drop = nn.Linear(4, 8).to(DT), nn.Linear(8, 3).to(DT), nn.Dropout(0.3)
        self.how, self.from_step, self._forwards = how, from_step, 0

    def forward(self, x):
        h = self.drop(torch.tanh(self.a(x)))
        if self.training and torch.is_grad_enabled():
            self._forwards += 1
        late = self._forwards > self.from_step
        if self.how == "bound-name" and late:
            h = bound_dropout(h, 0.2, self.training)
        elif self.how == "noise" and late and self.training:
            h = h + 0.01 * torch.randn_like(h)
        return self.b(h)


def _data():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(24, 4, generator=g, dtype=DT)
    return X, list(zip(X, (X[:, 0] > 0).long()))


def _train(model, steps: int):
    X, dataset = _data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    recorder = em.TrajectoryRecorder(model, optimizer)
    done = 0
    for ids, (x, y) in DataLoaderWithIds(dataset, batch_size=6):
        if done == steps:
            break
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        recorder.record_batch(ids)
        optimizer.step()
        done += 1
    return recorder, dataset, X


def _assert_exact(model, recorder, dataset, X):
    model.eval()
    result = em.decompose_adamw_training(model, recorder.trajectory(), loss_fn=F.cross_entropy, train_data=dataset,
                                         test_inputs=X[:3], dtype=DT)
    assert result.relative_residual <= 1e-9, result.summary()


def test_module_dropout_takes_the_route_alone_after_the_first_forward_and_decomposes_exactly():
    model = _Net("module")
    recorder, dataset, X = _train(model, 4)
    assert recorder._watch.route_alone
    assert F.dropout is ORIGINAL_DROPOUT and F.scaled_dot_product_attention is ORIGINAL_SDPA  # restored
    _assert_exact(model, recorder, dataset, X)


def test_a_dropout_called_by_a_bound_name_keeps_the_mode_and_decomposes_exactly():
    model = _Net("bound-name", from_step=0)
    recorder, dataset, X = _train(model, 4)
    assert not recorder._watch.route_alone
    assert recorder.trajectory().metadata["dropout"]["calls"] == [0.3, 0.2]
    _assert_exact(model, recorder, dataset, X)


@pytest.mark.parametrize("how", ["bound-name", "noise"])
def test_randomness_the_route_does_not_see_is_refused_at_its_step_and_earlier_steps_are_kept(how):
    model = _Net(how, from_step=2)  # forwards 1 and 2 are plain; the third draws through an unseen name
    X, dataset = _data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    recorder = em.TrajectoryRecorder(model, optimizer)
    batches = iter(DataLoaderWithIds(dataset, batch_size=6))
    for t in range(3):
        ids, (x, y) = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        recorder.record_batch(ids)
        if t < 2:
            optimizer.step()
            continue
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.raises(RecordingError, match=r"step 2: a recorded training forward drew random numbers"):
            optimizer.step()
        assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the step did not happen
    assert recorder.trajectory().num_steps == 2
    assert not recorder._watch.route_alone  # the next forwards are watched by the mode again


# ---------------------------------------------------------------------- dropout in a trajectory directory
def _steps(recorder, model, optimizer, batches, steps: int) -> None:
    for _ in range(steps):
        ids, (x, y) = next(batches)
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        recorder.record_batch(ids)
        optimizer.step()


def _directory_metadata(directory) -> dict:
    """The metadata of the trajectory in ``directory``, its dropout rows joined from the shards."""
    return em.ShardedTrajectory(directory).metadata


def _assert_directory_exact(model, directory, dataset, X, steps: int):
    model.eval()
    trajectory = em.ShardedTrajectory(directory)
    assert trajectory.num_steps == steps
    result = em.decompose_adamw_training(model, trajectory, loss_fn=F.cross_entropy, train_data=dataset,
                                         test_inputs=X[:3], dtype=DT)
    assert result.relative_residual <= 1e-9, result.summary()


def test_every_manifest_of_a_directory_recording_holds_the_dropout_record_of_its_steps(tmp_path):
    """The dropout record (seed and row orders: the masks cannot be drawn again without it) goes into each manifest
    with the steps it lists, so a run that dies mid-way, or a recorder closed without flush(), leaves steps that
    decompose exactly."""
    model, (X, dataset) = _Net("module"), _data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    directory = tmp_path / "run"
    batches = iter(DataLoaderWithIds(dataset, batch_size=6))
    with em.TrajectoryRecorder(model, optimizer, directory=directory, steps_per_shard=2) as recorder:
        _steps(recorder, model, optimizer, batches, 3)  # one shard of 2 steps written, the third pending
        record = _directory_metadata(directory)["dropout"]
        assert sorted(record["steps"]) == ["0", "1"] and record["seed"] == recorder._watch.seed
        _steps(recorder, model, optimizer, batches, 1)
    assert sorted(_directory_metadata(directory)["dropout"]["steps"]) == ["0", "1", "2", "3"]  # closed, no flush
    _assert_directory_exact(model, directory, dataset, X, 4)


def test_a_resumed_directory_recording_continues_the_dropout_record(tmp_path):
    model, (X, dataset) = _Net("module"), _data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    directory = tmp_path / "run"
    batches = iter(DataLoaderWithIds(dataset, batch_size=6))
    with em.TrajectoryRecorder(model, optimizer, directory=directory) as recorder:
        _steps(recorder, model, optimizer, batches, 2)
        recorder.flush(metadata={"run": "first"})
        seed = recorder._watch.seed
    with em.TrajectoryRecorder(model, optimizer, directory=directory) as resumed:
        assert resumed.resumed_from == 2 and resumed._watch.seed == seed
        _steps(resumed, model, optimizer, batches, 2)
    metadata = _directory_metadata(directory)
    assert metadata["run"] == "first" and metadata["dropout"]["seed"] == seed  # kept across the resume
    assert sorted(metadata["dropout"]["steps"]) == ["0", "1", "2", "3"]
    _assert_directory_exact(model, directory, dataset, X, 4)


@pytest.mark.parametrize("change", ["another seed", "dropout off", "dropout on"])
def test_resuming_with_other_dropout_is_refused_and_the_directory_is_kept(change, tmp_path):
    model, (X, dataset) = _Net("module"), _data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    directory = tmp_path / "run"
    batches = iter(DataLoaderWithIds(dataset, batch_size=6))
    with em.TrajectoryRecorder(model, optimizer, directory=directory, dropout=change != "dropout on",
                               **({"check_modules": False} if change == "dropout on" else {})) as recorder:
        if change == "dropout on":
            model.drop.p = 0.0  # recorded without dropout
        _steps(recorder, model, optimizer, batches, 2)
        seed = recorder._watch.seed
    options, message = {
        "another seed": ({"dropout_seed": seed + 1}, r"dropout_seed=\d+ differs from the recorded run's seed"),
        "dropout off": ({"dropout": False}, r"recorded with dropout \(p = \[0\.3\]\), and this recorder records none"),
        "dropout on": ({}, r"its 2 steps have no dropout record .*, and this model has active dropout"),
    }[change]
    model.drop.p = 0.3
    before = sorted(p.name for p in directory.iterdir())
    with pytest.raises(RecordingError, match=rf"cannot resume recording in .*{message}"):
        em.TrajectoryRecorder(model, optimizer, directory=directory, **options)
    assert sorted(p.name for p in directory.iterdir()) == before
    with em.TrajectoryRecorder(model, optimizer, directory=directory, dropout=change != "dropout on",
                               **({"check_modules": False} if change == "dropout on" else {})) as again:
        assert again.resumed_from == 2  # the directory was released and is still resumable


def _dropout_run(directory, steps: int, **options):
    model, (X, dataset) = _Net("module"), _data()
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    batches = (batch for _ in range(4) for batch in DataLoaderWithIds(dataset, batch_size=6))  # 4 epochs
    recorder = em.TrajectoryRecorder(model, optimizer, directory=directory, **options)
    _steps(recorder, model, optimizer, batches, steps)
    return model, optimizer, batches, recorder, dataset, X


def test_the_dropout_rows_stay_with_their_shard_a_crash_before_its_manifest_and_a_truncation(tmp_path, monkeypatch):
    """Each shard holds its steps' dropout rows and the manifest only the seed and calls (a manifest stays small
    however long the run): a shard that recovery adopts after a crash between writing it and listing it, and a
    shard a truncation cuts, keep the rows of their steps, and resuming goes on from there exactly."""
    import json

    from explaind_math.storage import truncate_trajectory_directory, writer

    directory = tmp_path / "run"
    model, optimizer, batches, recorder, dataset, X = _dropout_run(directory, 4, steps_per_shard=2)
    manifest = json.loads((directory / "manifest.json").read_text())["metadata"]["dropout"]
    assert manifest["steps"] == {} and manifest["steps_in_shards"]  # the rows are in the shards
    original = writer.write_manifest
    monkeypatch.setattr(writer, "write_manifest", lambda *a: (_ for _ in ()).throw(OSError("crash before listing")))
    with pytest.raises(OSError, match="crash before listing"):
        _steps(recorder, model, optimizer, batches, 2)  # steps 4 and 5: their shard written, the manifest not
    monkeypatch.setattr(writer, "write_manifest", original)
    recorder._writer.abandon()
    recorder.close()
    with pytest.warns(UserWarning, match="not listed"):
        em.ShardedTrajectory(directory)
    resumed = em.TrajectoryRecorder(model, optimizer, directory=directory, steps_per_shard=2)  # recovery adopts it
    assert resumed.resumed_from == 6
    _steps(resumed, model, optimizer, batches, 1)
    resumed.close()
    assert sorted(map(int, _directory_metadata(directory)["dropout"]["steps"])) == list(range(7))
    _assert_directory_exact(model, directory, dataset, X, 7)
    assert truncate_trajectory_directory(directory, 3) == 3  # cuts the shard of steps 2 and 3
    assert sorted(_directory_metadata(directory)["dropout"]["steps"]) == ["0", "1", "2"]
    _assert_directory_exact(model, directory, dataset, X, 3)


def test_metadata_that_is_not_json_is_refused_by_its_call_alone(tmp_path):
    from pathlib import Path

    directory = tmp_path / "run"
    model, optimizer, batches, recorder, dataset, X = _dropout_run(directory, 2)
    with pytest.raises(TypeError, match="not JSON serializable"):
        recorder.flush(metadata={"out": Path("somewhere")})
    _steps(recorder, model, optimizer, batches, 2)  # the recorder goes on
    recorder.close()
    _assert_directory_exact(model, directory, dataset, X, 4)


def test_rows_in_an_adopted_shard_are_read_whatever_the_manifest_says(tmp_path):
    """A manifest that predates the shards' rows (a directory resumed from an older version, a crash before its
    first new manifest) still gets the rows of a shard recovery adopts: the reader joins every shard's rows."""
    import json

    directory = tmp_path / "run"
    model, optimizer, batches, recorder, dataset, X = _dropout_run(directory, 4, steps_per_shard=2)
    recorder.close()
    manifest_path = directory / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    full = em.ShardedTrajectory(directory).metadata["dropout"]
    manifest["metadata"]["dropout"] = {"seed": full["seed"], "calls": full["calls"],
                                       "steps": {"0": full["steps"]["0"]}}  # an older manifest: no flag
    manifest_path.write_text(json.dumps(manifest))
    assert sorted(_directory_metadata(directory)["dropout"]["steps"]) == ["0", "1", "2", "3"]
    _assert_directory_exact(model, directory, dataset, X, 4)
