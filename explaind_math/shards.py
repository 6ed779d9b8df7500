"""Trajectories larger than memory: a directory of safetensors shards, written as training runs and
read memory-mapped by the decomposition (issue 7, capability 4; the data of MATH.md §0).

Layout of a trajectory directory::

    run/
      manifest.json                         the trajectory's description and its finished shards
      initial.safetensors                   θ_0, the optimizer state before step 0, the model buffers
      steps-00000000-00000004.safetensors   steps 0..3: θ_1..θ_4, weights w_{t,i}, optimizer state, gradients
      steps-00000004-00000008.safetensors   steps 4..7
      .lock                                 held (flock) while a recorder writes here

A shard holds the steps ``first ≤ t < stop`` under the tensor keys of the one-file form
(``theta/<t+1>/<name>``, ``weights/<t>``, ``state/<t>/<name>/<key>``, ``grad/<t>/<name>``), and
their units, hyper-parameters and step counts as JSON in its safetensors header. Every file is written
atomically (a temporary ``.<name>.<random>.tmp`` in the directory, fsync, rename, fsync of the
directory), the manifest last: the manifest lists exactly the finished shards, with each one's size
and CRC-32, so a crash at any moment leaves a readable trajectory of the steps finished before it.
After a crash, :func:`recover_trajectory_directory` (run by every writer that opens the directory)
deletes the temporary files, adopts a shard that was renamed but not yet listed, and deletes shards
left by an interrupted :func:`truncate_trajectory_directory`. Nothing is ever unpickled.

:class:`ShardedTrajectory` reads the directory lazily: ``parameters[t]`` and ``steps[t]`` open the
shard holding step t memory-mapped (``safetensors.safe_open``; the tensors are views of the mapped
file, paged in when used), check it (size, CRC-32, names, shapes, dtypes, NaN/Inf, the optimizer state
the rule needs) and keep the last few shards opened. Construction reads only the manifest and θ_0.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Mapping

import torch

from .errors import ExplaindError, RecordingError, TrajectoryFileError
from .optimizers import rule_by_name
from .trajectory import (
    _META_KEY,
    StepRecord,
    Trajectory,
    atomic_write,
    check_snapshot,
    check_step,
    decode_state,
    decode_step,
    encode_state,
    encode_step,
    fsync_directory,
    open_described_file,
    save_safetensors,
)

__all__ = [
    "ShardedTrajectory",
    "TrajectoryShardWriter",
    "recover_trajectory_directory",
    "truncate_trajectory_directory",
    "write_directory",
    "DIRECTORY_FORMAT",
    "DIRECTORY_VERSION",
    "MANIFEST_NAME",
]

DIRECTORY_FORMAT = "explaind_math.trajectory.directory"
SHARD_FORMAT = "explaind_math.trajectory.shard"
INITIAL_FORMAT = "explaind_math.trajectory.initial"
DIRECTORY_VERSION = 1
MANIFEST_NAME = "manifest.json"
INITIAL_NAME = "initial.safetensors"
LOCK_NAME = ".lock"
_SHARD_RE = re.compile(r"^steps-(\d{8,})-(\d{8,})\.safetensors$")
_TEMP_RE = re.compile(r"^\.(manifest\.json|initial\.safetensors|steps-\d{8,}-\d{8,}\.safetensors)\..+\.tmp$")

#: the description of a trajectory, shared by the manifest and the header of initial.safetensors
_DESCRIPTION_KEYS = ("optimizer", "parameter_names", "group_of", "shapes", "dtypes", "buffers", "metadata",
                     "initial_step_counts", "initial_state_keys")


def shard_name(first: int, stop: int) -> str:
    """File name of the shard holding steps first ≤ t < stop."""
    return f"steps-{first:08d}-{stop:08d}.safetensors"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _dtype_from_name(name: str, where: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise TrajectoryFileError(f"{where}: unknown dtype {name!r}")
    return dtype


def _file_crc32(path: Path) -> int:
    """CRC-32 of a whole file, read in blocks (detects bytes changed on disk; not a cryptographic hash)."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


# ---------------------------------------------------------------------- reading one file
class _SafetensorsFile:
    """One of our safetensors files, opened memory-mapped, with its JSON description; every failure is
    a :class:`TrajectoryFileError` naming the file."""

    def __init__(self, path: Path, expected_format: str, *, size: int | None = None, crc32: int | None = None):
        self.path = path
        if not path.is_file():
            raise TrajectoryFileError(f"{path}: missing (the manifest lists it)")
        actual_size = path.stat().st_size
        if size is not None and actual_size != size:
            raise TrajectoryFileError(
                f"{path}: {actual_size} bytes, the manifest records {size} (truncated or overwritten)"
            )
        if crc32 is not None and _file_crc32(path) != crc32:
            raise TrajectoryFileError(f"{path}: corrupted, its CRC-32 differs from the one the manifest records")
        with open_described_file(path, expected_format, DIRECTORY_VERSION,
                                 "part of an explaind_math trajectory") as (fh, d, keys):
            self.description = d
            # views of the mapped file: the mapping lives as long as any of these tensors
            self.tensors = {}
            for k in keys:
                try:
                    self.tensors[k] = fh.get_tensor(k)
                except Exception as exc:
                    raise TrajectoryFileError(f"{path}: tensor {k!r} cannot be read: {exc}") from None

    def get(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise TrajectoryFileError(f"{self.path}: tensor {key!r} is missing")
        return self.tensors[key]


def _write_file(path: Path, tensors: Mapping[str, torch.Tensor], description: dict) -> tuple[int, int]:
    """Write one file atomically; returns its size and CRC-32 (for the manifest)."""
    prepared, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        storage = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
        if storage in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()  # safetensors refuses tensors that share memory
        seen.add(storage)
        prepared[k] = v
    description = {**description, "num_tensors": len(prepared)}
    atomic_write(path, lambda tmp: save_safetensors(prepared, tmp, description))
    return path.stat().st_size, _file_crc32(path)


# ---------------------------------------------------------------------- the manifest
def _read_manifest(directory: Path) -> dict:
    path = directory / MANIFEST_NAME
    if not directory.is_dir():
        raise TrajectoryFileError(f"{directory}: no such trajectory directory")
    if not path.is_file():
        raise TrajectoryFileError(f"{directory}: no {MANIFEST_NAME}, so not a trajectory directory (or no step finished)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrajectoryFileError(f"{path}: not valid JSON: {exc}") from None
    try:
        _check_manifest(manifest, path)
    except TrajectoryFileError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise TrajectoryFileError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from None
    return manifest


def _check_manifest(m: Any, path: Path) -> None:
    """The cheap, up-front check: structure, names, groups, shapes, dtypes, and shards that tile 0..N."""
    if not isinstance(m, dict):
        raise TrajectoryFileError(f"{path}: the manifest is not a JSON object")
    if m.get("format") != DIRECTORY_FORMAT:
        raise TrajectoryFileError(f"{path}: unknown format {m.get('format')!r}")
    if m.get("version") != DIRECTORY_VERSION:
        raise TrajectoryFileError(
            f"{path}: trajectory format version {m.get('version')!r}, this library reads {DIRECTORY_VERSION}"
        )
    try:
        rule_by_name(m["optimizer"])
    except ExplaindError as exc:
        raise TrajectoryFileError(f"{path}: {exc}") from None
    names = m["parameter_names"]
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) for n in names):
        raise TrajectoryFileError(f"{path}: parameter_names must be distinct strings, got {names!r}")
    for field in ("group_of", "shapes", "dtypes"):
        if set(m[field]) != set(names):
            raise TrajectoryFileError(f"{path}: {field} covers {sorted(m[field])}, the parameters are {names}")
    for n in names:
        if not isinstance(m["group_of"][n], int) or m["group_of"][n] < 0:
            raise TrajectoryFileError(f"{path}: param group of {n!r} is {m['group_of'][n]!r}")
        if not all(isinstance(s, int) and s >= 0 for s in m["shapes"][n]):
            raise TrajectoryFileError(f"{path}: shape of {n!r} is {m['shapes'][n]!r}")
        _dtype_from_name(m["dtypes"][n], str(path))
    if not isinstance(m["metadata"], dict) or not isinstance(m["buffers"], list):
        raise TrajectoryFileError(f"{path}: metadata must be an object and buffers a list")
    stop = 0
    for entry in m["shards"]:
        first, last, size, crc = entry
        if first != stop or last <= first or not isinstance(size, int) or not isinstance(crc, int):
            raise TrajectoryFileError(
                f"{path}: shard entry {entry!r} does not continue the shards before it (steps 0..{stop - 1})"
            )
        stop = last
    if stop != m["num_steps"]:
        raise TrajectoryFileError(f"{path}: num_steps is {m['num_steps']!r}, the shards hold {stop} steps")
    if not isinstance(m["generation"], int):
        raise TrajectoryFileError(f"{path}: generation must be an integer")
    name, size, crc = m["initial"]
    if name != INITIAL_NAME or not isinstance(size, int) or not isinstance(crc, int):
        raise TrajectoryFileError(f"{path}: malformed entry for {INITIAL_NAME}")


def _write_manifest(directory: Path, manifest: dict) -> None:
    text = json.dumps(manifest, ensure_ascii=False, separators=(",", ":"))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(directory / MANIFEST_NAME, write)


def _read_initial(directory: Path, entry=None) -> _SafetensorsFile:
    size, crc = (entry[1], entry[2]) if entry is not None else (None, None)
    return _SafetensorsFile(directory / INITIAL_NAME, INITIAL_FORMAT, size=size, crc32=crc)


def _manifest_from_initial(directory: Path) -> dict:
    """A manifest with no step, rebuilt from initial.safetensors (a crash before the first manifest)."""
    initial = _read_initial(directory)
    path = directory / INITIAL_NAME
    try:
        d = {k: initial.description[k] for k in _DESCRIPTION_KEYS}
        generation = int(initial.description["generation"])
    except KeyError as exc:
        raise TrajectoryFileError(f"{path}: its description lacks {exc.args[0]!r}") from None
    return {
        "format": DIRECTORY_FORMAT, "version": DIRECTORY_VERSION, **d, "generation": generation,
        "num_steps": 0, "initial": [INITIAL_NAME, path.stat().st_size, _file_crc32(path)],
        "shards": [],
    }


# ---------------------------------------------------------------------- crash recovery, truncation
class _DirectoryLock:
    """An exclusive flock on ``.lock``: one writer per directory. Released on close or process death."""

    def __init__(self, directory: Path):
        self.path = directory / LOCK_NAME
        self._fh = open(self.path, "a+")
        try:
            import fcntl
        except ImportError:  # no flock (Windows): one writer per directory is the caller's promise
            return
        try:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            self._fh.close()
            raise RecordingError(
                f"{directory}: another process (or another recorder in this one) is writing this trajectory "
                "directory; close it first"
            ) from None

    def release(self) -> None:
        if not self._fh.closed:
            self._fh.close()  # closing the file releases the flock


def _scan(directory: Path) -> tuple[list[Path], dict[tuple[int, int], Path]]:
    temps, shards = [], {}
    for entry in os.scandir(directory):
        if _TEMP_RE.match(entry.name):
            temps.append(Path(entry.path))
        elif (m := _SHARD_RE.match(entry.name)) is not None:
            shards[(int(m.group(1)), int(m.group(2)))] = Path(entry.path)
    return temps, shards


def _recover_locked(directory: Path) -> dict | None:
    """Crash recovery with the lock held; returns the (possibly updated) manifest, or None when the
    directory holds no trajectory. Files that are not ours are left alone."""
    temps, shards = _scan(directory)
    for tmp in temps:  # a write interrupted before its rename: never part of the trajectory
        tmp.unlink(missing_ok=True)
    if (directory / MANIFEST_NAME).is_file():
        manifest = _read_manifest(directory)
    elif (directory / INITIAL_NAME).is_file():
        manifest = _manifest_from_initial(directory)  # crashed before the first manifest was written
    else:
        if shards:
            raise TrajectoryFileError(
                f"{directory}: shards {sorted(p.name for p in shards.values())} but neither {MANIFEST_NAME} "
                f"nor {INITIAL_NAME}; not a trajectory this library can resume"
            )
        return None
    listed = {(first, stop) for first, stop, _, _ in manifest["shards"]}
    changed = not (directory / MANIFEST_NAME).is_file()
    # a shard renamed into place but not yet in the manifest is a finished step: adopt it when it
    # continues the listed steps and was written by this generation (not left by a truncation)
    while True:
        n = manifest["num_steps"]
        candidates = [key for key in shards if key[0] == n and key not in listed]
        if len(candidates) != 1:
            break
        key = candidates[0]
        path = shards[key]
        shard = _Shard.read(path, manifest, key[0], key[1], size=None, crc32=None)
        if shard.generation != manifest["generation"]:
            break
        manifest["shards"].append([key[0], key[1], path.stat().st_size, _file_crc32(path)])
        manifest["num_steps"] = key[1]
        listed.add(key)
        changed = True
    if changed:
        _write_manifest(directory, manifest)
    for key, path in shards.items():  # stale: beyond an adopted chain, or left by a truncation
        if key not in listed:
            path.unlink(missing_ok=True)
    fsync_directory(directory)
    return manifest


def recover_trajectory_directory(directory: str | os.PathLike) -> int:
    """Tidy a trajectory directory after a crash and return how many steps it holds.

    Deletes temporary files of interrupted writes, adds to the manifest a shard that was written but
    not yet listed (the crash came between the two renames: its steps are finished), and deletes
    shards that are listed nowhere (left by an interrupted truncation). Every recorder opened on the
    directory does this first; call it yourself to learn which step to restore your checkpoint to.
    Raises :class:`RecordingError` while a recorder is writing the directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise TrajectoryFileError(f"{directory}: no such trajectory directory")
    lock = _DirectoryLock(directory)
    try:
        manifest = _recover_locked(directory)
    finally:
        lock.release()
    if manifest is None:
        raise TrajectoryFileError(f"{directory}: holds no trajectory")
    return manifest["num_steps"]


def truncate_trajectory_directory(directory: str | os.PathLike, num_steps: int) -> int:
    """Keep steps 0 … num_steps − 1 (θ_0 … θ_{num_steps}) and drop the rest, so that recording can resume
    from a checkpoint of the model and optimizer taken after step ``num_steps`` − 1 (i.e. at θ_{num_steps}).

    Crash-safe: a shard cut in two is rewritten under a new name, the manifest is committed with a new
    generation number, and only then are the dropped shards deleted (a crash before that leaves them
    to :func:`recover_trajectory_directory`, which recognizes them by their older generation).
    Returns the number of steps kept.
    """
    directory = Path(directory)
    lock = _DirectoryLock(directory)
    try:
        manifest = _recover_locked(directory)
        if manifest is None:
            raise TrajectoryFileError(f"{directory}: holds no trajectory")
        n = int(num_steps)
        if not 0 <= n <= manifest["num_steps"]:
            raise ExplaindError(f"{directory} holds {manifest['num_steps']} steps; cannot truncate to {num_steps}")
        if n == manifest["num_steps"]:
            return n
        generation = manifest["generation"] + 1
        kept, dropped = [], []
        for entry in manifest["shards"]:
            first, stop = entry[0], entry[1]
            if stop <= n:
                kept.append(entry)
                continue
            dropped.append(shard_name(first, stop))
            if first < n:  # the shard holding step n − 1 keeps its first n − first steps
                shard = _Shard.read(directory / shard_name(first, stop), manifest, first, stop,
                                    size=entry[2], crc32=entry[3])
                steps = [shard.steps[t - first] for t in range(first, n)]
                thetas = [shard.thetas[t - first] for t in range(first, n)]
                size, crc = _write_shard(directory, first, steps, thetas, generation)
                kept.append([first, n, size, crc])
        manifest = {**manifest, "generation": generation, "num_steps": n, "shards": kept}
        _write_manifest(directory, manifest)
        for name in dropped:
            if not any(shard_name(e[0], e[1]) == name for e in kept):
                (directory / name).unlink(missing_ok=True)
        fsync_directory(directory)
        return n
    finally:
        lock.release()


def _read_header(path: Path) -> dict:
    """Our JSON description from a safetensors header, without mapping the file: 8 bytes (the header's
    length, little-endian), then the header, whose ``__metadata__`` holds it."""
    try:
        with open(path, "rb") as fh:
            length = int.from_bytes(fh.read(8), "little")
            if length > path.stat().st_size - 8:
                raise TrajectoryFileError(f"{path}: truncated (its header claims {length} bytes)")
            header = json.loads(fh.read(length))
    except FileNotFoundError:
        raise TrajectoryFileError(f"{path}: missing (the manifest lists it)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TrajectoryFileError(f"{path}: not a readable safetensors header: {exc}") from None
    try:
        d = json.loads(header["__metadata__"][_META_KEY])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise TrajectoryFileError(f"{path}: not part of an explaind_math trajectory") from None
    if not isinstance(d, dict) or d.get("format") != SHARD_FORMAT or d.get("version") != DIRECTORY_VERSION:
        raise TrajectoryFileError(f"{path}: not a shard of this format version")
    return d


# ---------------------------------------------------------------------- one shard
class _Shard:
    """Steps first ≤ t < stop of one shard: θ_{t+1} and the step records, checked."""

    def __init__(self, first: int, stop: int, generation: int, thetas: list[dict], steps: list[StepRecord]):
        self.first, self.stop, self.generation = first, stop, generation
        self.thetas, self.steps = thetas, steps

    @classmethod
    def read(cls, path: Path, manifest: Mapping[str, Any], first: int, stop: int, *,
             size: int | None, crc32: int | None) -> "_Shard":
        f = _SafetensorsFile(path, SHARD_FORMAT, size=size, crc32=crc32)
        d = f.description
        try:
            if (d["first_step"], d["stop_step"]) != (first, stop):
                raise TrajectoryFileError(
                    f"{path}: holds steps {d['first_step']}..{d['stop_step'] - 1}, expected {first}..{stop - 1}"
                )
            if len(d["steps"]) != stop - first:
                raise TrajectoryFileError(f"{path}: describes {len(d['steps'])} steps, expected {stop - first}")
            names = manifest["parameter_names"]
            shapes = {n: tuple(manifest["shapes"][n]) for n in names}
            dtypes = {n: _dtype_from_name(manifest["dtypes"][n], str(path)) for n in names}
            rule = rule_by_name(manifest["optimizer"])
            num_groups = max(manifest["group_of"].values()) + 1
            thetas, steps = [], []
            for k, s in enumerate(d["steps"]):
                t = first + k
                theta = {n: f.get(f"theta/{t + 1}/{n}") for n in names}
                step = decode_step(t, s, f.get)
                for n, v in theta.items():
                    if v.dtype != dtypes[n]:
                        raise TrajectoryFileError(f"{path}: θ_{t + 1}[{n!r}] is {v.dtype}, the manifest says {dtypes[n]}")
                try:
                    check_snapshot(t + 1, theta, names, shapes)
                    check_step(t, step, rule, names, shapes, manifest["group_of"], num_groups)
                except TrajectoryFileError:
                    raise
                except ExplaindError as exc:
                    raise TrajectoryFileError(f"{path}: {exc}") from None
                thetas.append(theta)
                steps.append(step)
            generation = int(d["generation"])
        except TrajectoryFileError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise TrajectoryFileError(
                f"{path}: corrupted shard, its description is malformed or does not match its tensors "
                f"({type(exc).__name__}: {exc})"
            ) from None
        return cls(first, stop, generation, thetas, steps)


def _write_shard(directory: Path, first: int, steps: Sequence[StepRecord], thetas: Sequence[Mapping[str, torch.Tensor]],
                 generation: int) -> tuple[int, int]:
    tensors: dict[str, torch.Tensor] = {}
    steps_json = []
    for k, (step, theta) in enumerate(zip(steps, thetas)):
        t = first + k
        for n, v in theta.items():
            tensors[f"theta/{t + 1}/{n}"] = v
        steps_json.append(encode_step(t, step, tensors))
    stop = first + len(steps)
    description = {"format": SHARD_FORMAT, "version": DIRECTORY_VERSION, "first_step": first, "stop_step": stop,
                   "generation": generation, "steps": steps_json}
    return _write_file(directory / shard_name(first, stop), tensors, description)


# ---------------------------------------------------------------------- the writer
class TrajectoryShardWriter:
    """Appends steps to a trajectory directory, one shard per ``steps_per_shard`` steps.

    Opening it takes the directory's lock and runs crash recovery. On an empty (or new) directory call
    :meth:`begin` with the trajectory's description and θ_0 (written with the first shard); on a
    directory that holds a trajectory, :attr:`num_steps` says how many steps it has and :meth:`append`
    continues after them. :meth:`flush` writes the pending steps (a shard, then the manifest);
    :meth:`close` flushes and releases the lock. :class:`~explaind_math.TrajectoryRecorder` with
    ``directory=`` drives one of these from the optimizer's hooks.

    ``background=True`` hands each shard to one writer thread, so that training continues while the
    shard is written and fsynced; at most one shard waits while another is written (memory stays
    bounded), and a crash loses, besides the pending steps, the shards not yet committed. A failed
    write is raised by the next call, and the writer then refuses to go on (the directory holds the
    steps committed before the failure).
    """

    def __init__(self, directory: str | os.PathLike, *, steps_per_shard: int = 1, background: bool = False):
        if int(steps_per_shard) < 1:
            raise ExplaindError(f"steps_per_shard must be a positive integer, got {steps_per_shard!r}")
        self.directory = Path(directory)
        self.steps_per_shard = int(steps_per_shard)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = _DirectoryLock(self.directory)
        try:
            self.manifest = _recover_locked(self.directory)
        except BaseException:
            self._lock.release()
            raise
        self._initial: tuple[dict, dict] | None = None  # (tensors, description) until the first flush
        self._started = self.manifest is not None
        self._submitted = self.manifest["num_steps"] if self.manifest is not None else 0
        self._pending: list[tuple[StepRecord, dict]] = []
        self._failure: BaseException | None = None
        self.closed = False
        self._queue = None
        if background:
            import queue
            import threading

            self._queue = queue.Queue(maxsize=1)
            self._thread = threading.Thread(target=self._work, name=f"explaind_math shards {self.directory.name}",
                                            daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ facts
    @property
    def has_trajectory(self) -> bool:
        """Whether the directory holds a trajectory (or :meth:`begin` started one)."""
        return self._started

    @property
    def num_steps(self) -> int:
        """Steps appended: on disk, being written, and pending in memory."""
        return self._submitted + len(self._pending)

    @property
    def num_steps_on_disk(self) -> int:
        """Steps committed (listed in the manifest on disk)."""
        manifest = self.manifest
        return manifest["num_steps"] if manifest is not None else 0

    # ------------------------------------------------------------------ writing
    def begin(self, *, optimizer: str, parameter_names, group_of, theta_0: Mapping[str, torch.Tensor],
              initial_state: Mapping[str, Mapping[str, Any]], buffers: Mapping[str, torch.Tensor],
              metadata: Mapping[str, Any]) -> None:
        """Start a new trajectory (nothing is written until the first shard is)."""
        if self.has_trajectory:
            raise RecordingError(f"{self.directory} already holds a trajectory")
        names = list(parameter_names)
        tensors: dict[str, torch.Tensor] = {f"theta/0/{n}": theta_0[n] for n in names}
        counts, keys = encode_state(initial_state, "initial", tensors)
        for n, v in buffers.items():
            tensors[f"buffer/{n}"] = v
        description = {
            "optimizer": optimizer, "parameter_names": names, "group_of": {n: int(group_of[n]) for n in names},
            "shapes": {n: list(theta_0[n].shape) for n in names},
            "dtypes": {n: _dtype_name(theta_0[n].dtype) for n in names},
            "buffers": sorted(buffers), "metadata": json.loads(json.dumps(dict(metadata))),
            "initial_step_counts": counts, "initial_state_keys": keys,
        }
        self._initial = (tensors, description)
        self._started = True

    def append(self, step: StepRecord, theta_next: Mapping[str, torch.Tensor]) -> None:
        """Add step t = :attr:`num_steps` and θ_{t+1}; writes a shard when ``steps_per_shard`` are pending."""
        self._check_usable()
        if not self.has_trajectory:
            raise RecordingError("append() before begin(): the trajectory has no θ_0 yet")
        self._pending.append((step, dict(theta_next)))
        if len(self._pending) >= self.steps_per_shard:
            self.flush()

    def set_metadata(self, metadata: Mapping[str, Any]) -> None:
        """Replace the trajectory's metadata (written with the next manifest, or now if nothing is pending)."""
        metadata = json.loads(json.dumps(dict(metadata)))  # JSON-able, and a copy
        self.wait()
        if self._initial is not None:
            self._initial[1]["metadata"] = metadata
        if self.manifest is not None:
            self.manifest = {**self.manifest, "metadata": metadata}
            if not self._pending:
                _write_manifest(self.directory, self.manifest)

    def flush(self) -> None:
        """Write the pending steps as one shard, then the manifest that lists it (with ``background``:
        hand them to the writer thread, waiting while it still has a shard queued)."""
        self._check_usable()
        if self._initial is None and not self._pending:
            return
        job = (self._initial, self._submitted, [s for s, _ in self._pending], [th for _, th in self._pending])
        self._initial = None
        self._submitted += len(self._pending)
        self._pending = []
        if self._queue is None:
            self._commit(job)
        else:
            self._queue.put(job)

    def wait(self) -> None:
        """Return once every shard handed to the writer thread is committed (raises its failure, if any)."""
        if self._queue is not None:
            self._queue.join()
        self._check_usable()

    def close(self) -> None:
        """Flush the pending steps, wait for the writes, and release the directory."""
        if self.closed:
            return
        try:
            self.flush()
            self.wait()
        finally:
            self._stop_thread()
            self.closed = True
            self._lock.release()

    def abandon(self) -> None:
        """Release the directory without writing the pending steps."""
        self._pending = []
        try:
            self._stop_thread()
        finally:
            self.closed = True
            self._lock.release()

    # ------------------------------------------------------------------ internals
    def _check_usable(self) -> None:
        if self._failure is not None:
            raise RecordingError(
                f"{self.directory}: writing the trajectory failed ({type(self._failure).__name__}: {self._failure}); "
                f"the directory holds the {self.num_steps_on_disk} steps committed before it"
            ) from self._failure
        if self.closed:
            raise RecordingError(f"{self.directory}: this writer is closed")

    def _commit(self, job) -> None:
        """Write one job: initial.safetensors (the first time), the shard, then the manifest."""
        initial, first, steps, thetas = job
        manifest = self.manifest
        if initial is not None:
            tensors, description = initial
            size, crc = _write_file(self.directory / INITIAL_NAME, tensors,
                                    {"format": INITIAL_FORMAT, "version": DIRECTORY_VERSION, **description,
                                     "generation": 0})
            manifest = {
                "format": DIRECTORY_FORMAT, "version": DIRECTORY_VERSION, **description, "generation": 0,
                "num_steps": 0, "initial": [INITIAL_NAME, size, crc], "shards": [],
            }
        if steps:
            if first != manifest["num_steps"]:
                raise RecordingError(f"{self.directory}: shard of step {first} after {manifest['num_steps']} steps")
            size, crc = _write_shard(self.directory, first, steps, thetas, manifest["generation"])
            stop = first + len(steps)
            manifest = {**manifest, "shards": [*manifest["shards"], [first, stop, size, crc]], "num_steps": stop}
        _write_manifest(self.directory, manifest)
        self.manifest = manifest

    def _work(self) -> None:
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                if self._failure is None:  # after a failure nothing more is committed (no gap in the steps)
                    self._commit(job)
            except BaseException as exc:  # surfaced by the next append / flush / wait / close
                self._failure = exc
            finally:
                self._queue.task_done()

    def _stop_thread(self) -> None:
        if self._queue is not None and self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()


def write_directory(trajectory: Trajectory, directory: str | os.PathLike, *, steps_per_shard: int = 1) -> "ShardedTrajectory":
    """Write any trajectory (in memory or sharded) as a new directory; see :meth:`Trajectory.save_directory`."""
    writer = TrajectoryShardWriter(directory, steps_per_shard=steps_per_shard)
    try:
        if writer.has_trajectory:
            raise TrajectoryFileError(f"{directory}: already holds a trajectory; give an empty or new directory")
        writer.begin(
            optimizer=trajectory.optimizer, parameter_names=trajectory.parameter_names,
            group_of=trajectory.group_of, theta_0=trajectory.parameters[0],
            initial_state=trajectory.initial_state, buffers=trajectory.buffers, metadata=trajectory.metadata,
        )
        for t, step in enumerate(trajectory.steps):
            writer.append(step, trajectory.parameters[t + 1])
        writer.close()
    except BaseException:
        writer.abandon()
        raise
    return ShardedTrajectory(directory)


# ---------------------------------------------------------------------- the reader
class _LazyParameters(Sequence):
    """θ_0 … θ_N, each read on demand from its shard (a dict name → memory-mapped tensor)."""

    def __init__(self, owner: "ShardedTrajectory"):
        self._owner = owner

    def __len__(self) -> int:
        return self._owner.num_steps + 1

    def __getitem__(self, t):
        if isinstance(t, slice):
            return [self[i] for i in range(*t.indices(len(self)))]
        t = _index(t, len(self), "θ")
        if t == 0:
            return dict(self._owner._theta_0)
        shard = self._owner._shard_of(t - 1)
        return dict(shard.thetas[t - 1 - shard.first])


class _LazySteps(Sequence):
    """The N step records, each read on demand from its shard."""

    def __init__(self, owner: "ShardedTrajectory"):
        self._owner = owner

    def __len__(self) -> int:
        return self._owner.num_steps

    def __getitem__(self, t):
        if isinstance(t, slice):
            return [self[i] for i in range(*t.indices(len(self)))]
        t = _index(t, len(self), "step")
        shard = self._owner._shard_of(t)
        return shard.steps[t - shard.first]


def _index(t, length: int, what: str) -> int:
    t = int(t)
    if t < 0:
        t += length
    if not 0 <= t < length:
        raise IndexError(f"{what} index {t} out of range (length {length})")
    return t


class ShardedTrajectory(Trajectory):
    """A trajectory stored as a directory of shards, read lazily and memory-mapped.

    It is a :class:`Trajectory`: the decomposition and the analysis use it unchanged. ``parameters``
    and ``steps`` are sequences that open the shard holding the asked step (memory-mapped; checked
    when opened: size and CRC-32 against the manifest, names, shapes, dtypes, NaN/Inf, the optimizer
    state the rule needs) and keep the ``cache_shards`` most recently used. Construction reads only the
    manifest and ``initial.safetensors`` (θ_0, the state before step 0, buffers).

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
        manifest = _read_manifest(self.directory)
        self._manifest = manifest
        self.optimizer = manifest["optimizer"]
        self.parameter_names = list(manifest["parameter_names"])
        self.group_of = {n: int(g) for n, g in manifest["group_of"].items()}
        self.metadata = dict(manifest["metadata"])
        self._shapes = {n: tuple(manifest["shapes"][n]) for n in self.parameter_names}
        self._dtypes = {n: _dtype_from_name(manifest["dtypes"][n], str(self.directory)) for n in self.parameter_names}
        self._firsts = [e[0] for e in manifest["shards"]]
        self._cache: OrderedDict[int, _Shard] = OrderedDict()
        self._units: list[int] | None = None
        self.shards_read = 0
        self._read_initial()
        self.parameters = _LazyParameters(self)
        self.steps = _LazySteps(self)

    def _read_initial(self) -> None:
        f = _read_initial(self.directory, self._manifest["initial"] if self.verify_checksums else
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

    def units(self) -> list[int]:
        """Every training-sample id used by any step, sorted: read from the shards' JSON headers (a few
        kB each; no tensor is read), once."""
        if self._units is None:
            units: set[int] = set()
            largest = 0
            for path in self.shard_files:
                try:
                    for s in _read_header(path)["steps"]:
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
        self.units()
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
    def _shard_of(self, t: int) -> _Shard:
        k = bisect.bisect_right(self._firsts, t) - 1
        if k in self._cache:
            self._cache.move_to_end(k)
            return self._cache[k]
        first, stop, size, crc = self._manifest["shards"][k]
        shard = _Shard.read(self.directory / shard_name(first, stop), self._manifest, first, stop,
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
        self._check_model_parameters(model)

    def to_memory(self) -> Trajectory:
        """The whole trajectory as an in-memory :class:`Trajectory` (copies every tensor)."""

        def copy(d):
            return {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}

        steps = [
            StepRecord(list(s.units), s.weights.clone(), [dict(h) for h in s.hyperparameters], list(s.updated),
                       {n: copy(st) for n, st in s.state.items()},
                       None if s.gradient is None else copy(s.gradient))
            for s in self.steps
        ]
        return Trajectory(
            optimizer=self.optimizer, parameter_names=self.parameter_names, group_of=self.group_of,
            parameters=[copy(p) for p in self.parameters], steps=steps,
            initial_state={n: copy(st) for n, st in self.initial_state.items()},
            buffers=copy(self.buffers), metadata=self.metadata,
        )
