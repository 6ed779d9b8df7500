"""The names in a trajectory directory and its manifest: ``manifest.json`` describes the trajectory
(optimizer, parameter names, groups, shapes, dtypes, buffers, metadata) and lists the finished shards
that tile steps 0 … N−1, each with its size and CRC-32, and ``initial.safetensors`` with θ_0."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from ..errors import ExplaindError, TrajectoryFileError
from ..optimizers import rule_by_name
from .format import DescribedFile, atomic_write, dtype_from_name, file_crc32

__all__ = [
    "DESCRIPTION_KEYS",
    "DIRECTORY_FORMAT",
    "DIRECTORY_VERSION",
    "INITIAL_FORMAT",
    "INITIAL_NAME",
    "LOCK_NAME",
    "MANIFEST_NAME",
    "SHARD_FORMAT",
    "SHARD_FILE_RE",
    "TEMP_FILE_RE",
    "check_manifest",
    "manifest_from_initial",
    "read_initial",
    "read_manifest",
    "shard_name",
    "write_manifest",
]

DIRECTORY_FORMAT = "explaind_math.trajectory.directory"
SHARD_FORMAT = "explaind_math.trajectory.shard"
INITIAL_FORMAT = "explaind_math.trajectory.initial"
DIRECTORY_VERSION = 1
MANIFEST_NAME = "manifest.json"
INITIAL_NAME = "initial.safetensors"
LOCK_NAME = ".lock"
SHARD_FILE_RE = re.compile(r"^steps-(\d{8,})-(\d{8,})\.safetensors$")
TEMP_FILE_RE = re.compile(r"^\.(manifest\.json|initial\.safetensors|steps-\d{8,}-\d{8,}\.safetensors)\..+\.tmp$")

#: the description of a trajectory, shared by the manifest and the header of initial.safetensors
DESCRIPTION_KEYS = ("optimizer", "parameter_names", "group_of", "shapes", "dtypes", "buffers", "metadata",
                    "initial_step_counts", "initial_state_keys")


def shard_name(first: int, stop: int) -> str:
    """File name of the shard holding steps first ≤ t < stop."""
    return f"steps-{first:08d}-{stop:08d}.safetensors"


def read_manifest(directory: Path) -> dict:
    """The manifest of ``directory``, checked by :func:`check_manifest`; a :class:`TrajectoryFileError`
    naming what is wrong otherwise."""
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
        check_manifest(manifest, path)
    except TrajectoryFileError:
        raise
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        raise TrajectoryFileError(f"{path}: malformed manifest ({type(exc).__name__}: {exc})") from None
    return manifest


def check_manifest(m: Any, path: Path) -> None:
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
        dtype_from_name(m["dtypes"][n], str(path))
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


def write_manifest(directory: Path, manifest: dict) -> None:
    """Commit ``manifest`` atomically (the last write of every change to a directory)."""
    text = json.dumps(manifest, ensure_ascii=False, separators=(",", ":"))

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)

    atomic_write(directory / MANIFEST_NAME, write)


def read_initial(directory: Path, entry=None) -> DescribedFile:
    """``initial.safetensors``, checked against the manifest's ``entry`` (name, size, CRC-32) when given."""
    size, crc = (entry[1], entry[2]) if entry is not None else (None, None)
    return DescribedFile(directory / INITIAL_NAME, INITIAL_FORMAT, DIRECTORY_VERSION, size=size, crc32=crc)


def manifest_from_initial(directory: Path) -> dict:
    """A manifest with no step, rebuilt from initial.safetensors (a crash before the first manifest)."""
    initial = read_initial(directory)
    path = directory / INITIAL_NAME
    try:
        d = {k: initial.description[k] for k in DESCRIPTION_KEYS}
        generation = int(initial.description["generation"])
    except KeyError as exc:
        raise TrajectoryFileError(f"{path}: its description lacks {exc.args[0]!r}") from None
    return {
        "format": DIRECTORY_FORMAT, "version": DIRECTORY_VERSION, **d, "generation": generation,
        "num_steps": 0, "initial": [INITIAL_NAME, path.stat().st_size, file_crc32(path)],
        "shards": [],
    }
