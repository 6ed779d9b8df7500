"""A trajectory directory read lazily: :class:`ShardedTrajectory` is a :class:`~explaind_math.Trajectory`
whose ``parameters[t]`` and ``steps[t]`` open the shard holding step t memory-mapped (the tensors are
views of the mapped file, paged in when used), check it, and keep the last few shards opened.
Construction reads only the manifest and θ_0 (and, with recorded dropout, each shard's header: its rows)."""

from __future__ import annotations

import bisect
import os
from collections import OrderedDict
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import ExplaindError, TrajectoryFileError
from ..trajectory import OnDemandSequence, StepRecord, Trajectory, check_model_matches, check_snapshot
from .format import dtype_from_name
from .manifest import MANIFEST_NAME, read_initial, read_manifest, shard_name
from .records import decode_state
from .recovery import warn_unlisted_continuation
from .shard import Shard, read_shard_header

__all__ = ["ShardedTrajectory"]


class ShardedTrajectory(Trajectory):
    """A trajectory stored as a directory of shards, read lazily and memory-mapped.

    It is a :class:`Trajectory`: the decomposition and the analysis use it unchanged. ``parameters``
    and ``steps`` are sequences that open the shard holding the asked step (memory-mapped; checked
    when opened: size and CRC-32 against the manifest, names, shapes, dtypes, NaN/Inf, the optimizer
    state the rule needs) and keep the ``cache_shards`` most recently used. Construction reads only the
    manifest and ``initial.safetensors`` (θ_0, the state before step 0, buffers), and with recorded dropout each
    shard's header, where the rows that replay its steps' masks are.

    Args:
        directory: written by :class:`~explaind_math.TrajectoryRecorder` (``directory=``) or
            :meth:`Trajectory.save_directory`.
        cache_shards: shards kept opened (≥ 1; the decomposition reads θ_t and θ_{t+1}: 2 suffices).
        verify_checksums: compare each shard's CRC-32 with the manifest when opening it (reads the
            file once more; catches bytes changed on disk that are still finite numbers).

    ``shards_read`` counts shard openings (a cache miss each).
    """

    def __init__(self, directory: str | os.PathLike, *, cache_shards: int = 2, verify_checksums: bool = True):
        self.directory = Path(directory)
        if int(cache_shards) < 1:
            raise ExplaindError(f"cache_shards must be at least 1, got {cache_shards!r}")
        self.cache_shards = int(cache_shards)
        self.verify_checksums = verify_checksums
        manifest = read_manifest(self.directory)
        self._manifest = manifest
        warn_unlisted_continuation(self.directory, manifest)
        self.optimizer = manifest["optimizer"]
        self.parameter_names = list(manifest["parameter_names"])
        self.group_of = {n: int(g) for n, g in manifest["group_of"].items()}
        self.metadata = _with_dropout_rows(self.directory, manifest)
        self.manifest_metadata = dict(manifest["metadata"])  # as the manifest holds it (dropout rows not joined)
        self._shapes = {n: tuple(manifest["shapes"][n]) for n in self.parameter_names}
        self._dtypes = {n: dtype_from_name(manifest["dtypes"][n], str(self.directory)) for n in self.parameter_names}
        self._firsts = [e[0] for e in manifest["shards"]]
        self._cache: OrderedDict[int, Shard] = OrderedDict()
        self._units: list[int] | None = None
        self.shards_read = 0
        self._read_initial()
        self.parameters = OnDemandSequence(self.num_steps + 1, self._theta_at, "θ")
        self.steps = OnDemandSequence(self.num_steps, self._step_at, "step")

    def _theta_at(self, t: int) -> dict[str, torch.Tensor]:
        """θ_t, from θ_0 or from the shard holding step t − 1."""
        if t == 0:
            return dict(self._theta_0)
        shard = self._shard_of(t - 1)
        return dict(shard.thetas[t - 1 - shard.first])

    def _step_at(self, t: int) -> StepRecord:
        shard = self._shard_of(t)
        return shard.steps[t - shard.first]

    def _read_initial(self) -> None:
        f = read_initial(self.directory, self._manifest["initial"] if self.verify_checksums else
                          [None, self._manifest["initial"][1], None])
        path = f.path
        d = f.description
        try:
            for key in ("parameter_names", "group_of", "shapes", "dtypes", "buffers", "optimizer"):
                if d[key] != self._manifest[key]:
                    raise TrajectoryFileError(
                        f"{path}: its {key} differ from those of {self.directory / MANIFEST_NAME}"
                    )
            theta_0 = {n: f.get(f"theta/0/{n}") for n in self.parameter_names}
            for n, v in theta_0.items():
                if v.dtype != self._dtypes[n]:
                    raise TrajectoryFileError(f"{path}: θ_0[{n!r}] is {v.dtype}, the manifest says {self._dtypes[n]}")
            try:
                check_snapshot(0, theta_0, self.parameter_names, self._shapes)
            except TrajectoryFileError:
                raise
            except ExplaindError as exc:
                raise TrajectoryFileError(f"{path}: {exc}") from None
            self._theta_0 = theta_0
            self.initial_state = decode_state(d["initial_step_counts"], d["initial_state_keys"], "initial", f.get)
            self.buffers = {n: f.get(f"buffer/{n}") for n in d["buffers"]}
        except TrajectoryFileError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise TrajectoryFileError(f"{path}: malformed ({type(exc).__name__}: {exc})") from None

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ShardedTrajectory":
        return cls(path)

    # ------------------------------------------------------------------ facts from the manifest
    @property
    def num_steps(self) -> int:
        return self._manifest["num_steps"]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return dict(self._shapes)

    @property
    def dtype(self) -> torch.dtype:
        return self._dtypes[self.parameter_names[0]]

    def sample_ids(self) -> list[int]:
        """Every training-sample id used by any step, sorted: read from the shards' JSON headers (a few
        kB each; no tensor is read), once."""
        if self._units is None:
            units: set[int] = set()
            largest = 0
            for path in self.shard_files:
                try:
                    for s in read_shard_header(path)["steps"]:
                        units.update(int(i) for i in s["units"])
                        largest = max(largest, len(s["units"]))
                except TrajectoryFileError:
                    raise
                except (ValueError, KeyError, TypeError, AttributeError) as exc:
                    raise TrajectoryFileError(f"{path}: malformed description ({type(exc).__name__}: {exc})") from None
            self._units = sorted(units)
            self._largest_batch = largest
        return list(self._units)

    def largest_batch(self) -> int:
        """The most units any step used (from the shards' headers, like :meth:`units`)."""
        self.sample_ids()
        return self._largest_batch

    @property
    def shard_files(self) -> list[Path]:
        return [self.directory / shard_name(e[0], e[1]) for e in self._manifest["shards"]]

    def __repr__(self) -> str:
        return (
            f"ShardedTrajectory({str(self.directory)!r}, optimizer={self.optimizer!r}, steps={self.num_steps}, "
            f"shards={len(self._firsts)}, parameters={len(self.parameter_names)} tensors)"
        )

    # ------------------------------------------------------------------ shards
    def _shard_of(self, t: int) -> Shard:
        k = bisect.bisect_right(self._firsts, t) - 1
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        first, stop, size, crc = self._manifest["shards"][k]
        shard = Shard.read(self.directory / shard_name(first, stop), self._manifest, first, stop,
                            size=size, crc32=crc if self.verify_checksums else None)
        self.shards_read += 1
        self._cache[k] = shard
        while len(self._cache) > self.cache_shards:
            self._cache.popitem(last=False)
        return shard

    def check_files(self) -> None:
        """Cheap: every shard the manifest lists exists with the recorded size (no data is read).
        Called by :meth:`check_model`, so a decomposition stops before its first step, not at a
        missing shard hours later."""
        for first, stop, size, _ in self._manifest["shards"]:
            path = self.directory / shard_name(first, stop)
            if not path.is_file():
                raise TrajectoryFileError(f"{path}: missing (the manifest lists it, steps {first}..{stop - 1})")
            actual = path.stat().st_size
            if actual != size:
                raise TrajectoryFileError(
                    f"{path}: {actual} bytes, the manifest records {size} (truncated or overwritten)"
                )

    def validate(self) -> None:
        """Read and check every shard, one at a time (memory stays bounded; time is a full read)."""
        self.check_files()
        for t in range(self.num_steps):
            self._shard_of(t)

    def check_model(self, model: torch.nn.Module) -> None:
        """Match the model's parameters and buffers against the manifest and θ_0, and check that every
        shard is present (:meth:`check_files`); shard contents are checked as they are read."""
        self.check_files()
        check_model_matches(self, model)

    def to_memory(self) -> Trajectory:
        """The whole trajectory as an in-memory :class:`Trajectory` (copies every tensor)."""

        def copy(d):
            return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}

        steps = [
            StepRecord(list(s.sample_ids), s.weights.clone(), [dict(h) for h in s.hyperparameters], list(s.updated),
                       {n: copy(st) for n, st in s.state.items()},
                       None if s.gradient is None else copy(s.gradient),
                       None if s.batch_calls is None else [list(c) for c in s.batch_calls])
            for s in self.steps
        ]
        return Trajectory(
            optimizer=self.optimizer, parameter_names=self.parameter_names, group_of=self.group_of,
            parameters=[copy(p) for p in self.parameters], steps=steps,
            initial_state={n: copy(st) for n, st in self.initial_state.items()},
            buffers=copy(self.buffers), metadata=self.metadata,
        )


def _with_dropout_rows(directory: Path, manifest: Mapping[str, Any]) -> dict:
    """The manifest's metadata, with its dropout record made whole: the rows the manifest holds joined to those
    of every listed shard, read from its description (one header read per shard; a record written before rows
    went into the shards has none there, and a shard adopted after a crash may have them while the manifest
    predates them, so the shards are read whatever the manifest says)."""
    metadata = dict(manifest["metadata"])
    record = metadata.get("dropout")
    if not isinstance(record, dict):
        return metadata
    try:
        steps = dict(record.get("steps", {}))
        for entry in manifest["shards"]:
            path = directory / shard_name(entry[0], entry[1])
            rows = read_shard_header(path).get("dropout_rows", {})
            if not isinstance(rows, dict):
                raise TypeError(f"{path.name}: dropout_rows is a {type(rows).__name__}, not a mapping")
            steps.update(rows)
        steps = {str(int(t)): rows for t, rows in steps.items() if int(t) < manifest["num_steps"]}
    except TrajectoryFileError:
        raise
    except (OSError, ValueError, TypeError, AttributeError) as exc:
        raise TrajectoryFileError(f"{directory}: the dropout record cannot be read ({type(exc).__name__}: {exc})"
                                  ) from None
    rest = {k: v for k, v in record.items() if k not in ("steps", "steps_in_shards")}
    metadata["dropout"] = {**rest, "steps": steps}
    return metadata
