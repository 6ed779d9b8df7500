"""One writer per trajectory directory (an flock on ``.lock``), crash recovery, and truncation.

After a crash, :func:`recover_trajectory_directory` (run by every writer that opens the directory)
deletes the temporary files, adopts a shard that was renamed but not yet listed, and deletes shards
left by an interrupted :func:`truncate_trajectory_directory` (an older generation than the manifest's).
A readable shard is never deleted otherwise: one that cannot be adopted (after a gap, unreadable) is
moved into :data:`SET_ASIDE_NAME` with a :class:`RecoveryWarning`. Files that are not ours are left alone.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

from ..errors import ExplaindError, RecordingError, TrajectoryFileError
from .format import file_crc32, fsync_directory
from .manifest import (
    INITIAL_NAME,
    LOCK_NAME,
    MANIFEST_NAME,
    SHARD_FILE_RE,
    TEMP_FILE_RE,
    manifest_from_initial,
    read_manifest,
    shard_name,
    write_manifest,
)
from .shard import Shard, read_shard_header, write_shard

__all__ = ["SET_ASIDE_NAME", "DirectoryLock", "RecoveryWarning", "recover_locked", "recover_trajectory_directory",
           "truncate_trajectory_directory"]

#: the subdirectory where recovery moves the shards it cannot prove part of the trajectory
SET_ASIDE_NAME = "set-aside"


class RecoveryWarning(UserWarning):
    """Recovery moved shards it could not adopt aside (they are kept, not deleted)."""


class DirectoryLock:
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
        if TEMP_FILE_RE.match(entry.name):
            temps.append(Path(entry.path))
        elif (m := SHARD_FILE_RE.match(entry.name)) is not None:
            shards[(int(m.group(1)), int(m.group(2)))] = Path(entry.path)
    return temps, shards


def recover_locked(directory: Path) -> dict | None:
    """Crash recovery with the lock held; returns the (possibly updated) manifest, or None when the
    directory holds no trajectory. Files that are not ours are left alone."""
    temps, shards = _scan(directory)
    for tmp in temps:  # a write interrupted before its rename: never part of the trajectory
        tmp.unlink(missing_ok=True)
    if (directory / MANIFEST_NAME).is_file():
        manifest = read_manifest(directory)
    elif (directory / INITIAL_NAME).is_file():
        manifest = manifest_from_initial(directory)  # crashed before the first manifest was written
    else:
        if shards:
            raise TrajectoryFileError(
                f"{directory}: shards {sorted(p.name for p in shards.values())} but neither {MANIFEST_NAME} "
                f"nor {INITIAL_NAME}; not a trajectory this library can resume"
            )
        return None
    rebuilt = not (directory / MANIFEST_NAME).is_file()
    listed = {(first, stop) for first, stop, _, _ in manifest["shards"]}
    generations = {key: _generation(path) for key, path in shards.items() if key not in listed}
    changed = _adopt(directory, manifest, shards, listed, generations, rebuilt) or rebuilt
    if changed:
        write_manifest(directory, manifest)
    set_aside = []
    for key, path in sorted(shards.items()):
        if key in listed:
            continue
        generation = generations[key]
        if generation is not None and generation < manifest["generation"]:
            path.unlink(missing_ok=True)  # superseded: a truncation with a newer generation was committed
        else:
            set_aside.append(path)
    if set_aside:
        _set_aside(directory, set_aside, manifest["num_steps"])
    fsync_directory(directory)
    return manifest


class UnlistedShardWarning(UserWarning):
    """A directory holds a shard that continues the steps its manifest lists but is not listed (a crash
    between writing the shard and listing it, or a manifest edited to drop it): the run reads shorter."""


def warn_unlisted_continuation(directory: Path, manifest: dict) -> None:
    """Warn when a shard of the manifest's generation starts at its last step but is not listed (reads only
    file names and that shard's header)."""
    _, shards = _scan(directory)
    n = manifest["num_steps"]
    listed = {(first, stop) for first, stop, _, _ in manifest["shards"]}
    for key, path in sorted(shards.items()):
        if key[0] == n and key not in listed and _generation(path) == manifest["generation"]:
            warnings.warn(
                f"{directory}: {MANIFEST_NAME} lists {n} steps, but {path.name} continues them (steps {key[0]}.."
                f"{key[1] - 1}) and is not listed: a crash between writing it and listing it, or a manifest edited "
                f"to drop it. This reads as a {n}-step run; recover_trajectory_directory({str(directory)!r}) "
                "checks the shard and adopts it", UnlistedShardWarning, stacklevel=3)
            return


def _generation(path: Path) -> int | None:
    """A shard's generation from its header alone; None when the header cannot be read."""
    try:
        return int(read_shard_header(path)["generation"])
    except (TrajectoryFileError, KeyError, TypeError, ValueError):
        return None


def _adopt(directory: Path, manifest: dict, shards: dict, listed: set, generations: dict, rebuilt: bool) -> bool:
    """Append to the manifest the shards that continue its steps: renamed into place but not yet listed
    (same generation), or, when the manifest was lost and rebuilt from θ_0, the newest generation found.
    Each is read and checked in full first; returns whether any was adopted."""
    changed = False
    while True:
        n = manifest["num_steps"]
        candidates = [key for key in shards if key[0] == n and key not in listed and generations[key] is not None]
        if rebuilt and candidates:
            newest = max(generations[key] for key in candidates)
            candidates = [key for key in candidates if generations[key] == newest]
        else:
            candidates = [key for key in candidates if generations[key] == manifest["generation"]]
        if len(candidates) != 1:
            return changed
        key = candidates[0]
        path = shards[key]
        try:
            Shard.read(path, manifest, key[0], key[1], size=None, crc32=None, check_tensors=True)
        except TrajectoryFileError:
            return changed
        manifest["shards"].append([key[0], key[1], path.stat().st_size, file_crc32(path)])
        manifest["num_steps"] = key[1]
        manifest["generation"] = generations[key]
        listed.add(key)
        changed = True


def _set_aside(directory: Path, paths: list[Path], num_steps: int) -> None:
    """Move shards that are not part of the recovered trajectory into SET_ASIDE_NAME, with a warning."""
    target = directory / SET_ASIDE_NAME
    target.mkdir(exist_ok=True)
    for path in paths:
        os.replace(path, target / path.name)
    fsync_directory(target)
    warnings.warn(
        f"{directory}: recovered {num_steps} steps (steps 0..{num_steps - 1}); shards "
        f"{[p.name for p in paths]} do not continue them (a shard before them is missing or unreadable) and were "
        f"moved, intact, into {target}. Put the missing shard back and move them back to recover the later steps",
        RecoveryWarning, stacklevel=3,
    )


def recover_trajectory_directory(directory: str | os.PathLike) -> int:
    """Tidy a trajectory directory after a crash and return how many steps it holds.

    Deletes temporary files of interrupted writes, adds to the manifest a shard that was written but
    not yet listed (the crash came between the two renames: its steps are finished), deletes shards of
    an older generation than the manifest (left by an interrupted truncation), and moves the other
    unlisted shards (after a gap, unreadable) into ``set-aside/`` with a :class:`RecoveryWarning`. Every recorder opened on the
    directory does this first; call it yourself to learn which step to restore your checkpoint to.
    Raises :class:`RecordingError` while a recorder is writing the directory.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise TrajectoryFileError(f"{directory}: no such trajectory directory")
    lock = DirectoryLock(directory)
    try:
        manifest = recover_locked(directory)
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
    lock = DirectoryLock(directory)
    try:
        manifest = recover_locked(directory)
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
                shard = Shard.read(directory / shard_name(first, stop), manifest, first, stop,
                                   size=entry[2], crc32=entry[3])
                steps = [shard.steps[t - first] for t in range(first, n)]
                thetas = [shard.thetas[t - first] for t in range(first, n)]
                rows = {t: r for t, r in shard.dropout_rows.items() if int(t) < n}
                size, crc = write_shard(directory, first, steps, thetas, generation, rows)
                kept.append([first, n, size, crc])
        manifest = {**manifest, "generation": generation, "num_steps": n, "shards": kept}
        write_manifest(directory, manifest)
        for name in dropped:
            if not any(shard_name(e[0], e[1]) == name for e in kept):
                (directory / name).unlink(missing_ok=True)
        fsync_directory(directory)
        return n
    finally:
        lock.release()
