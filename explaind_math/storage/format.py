"""The files this library writes: safetensors files whose header carries a JSON description under
:data:`HEADER_KEY`, written atomically, checked when opened, with sizes and CRC-32s for the manifest.
Nothing is ever unpickled."""

from __future__ import annotations

import json
import os
import tempfile
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import TrajectoryFileError
from .integrity import check_tensor, tensor_crc32

__all__ = [
    "HEADER_KEY",
    "DescribedFile",
    "atomic_write",
    "dtype_from_name",
    "dtype_name",
    "file_crc32",
    "fsync_directory",
    "open_described_file",
    "read_description",
    "save_safetensors",
    "write_file",
]

#: the key of the safetensors header's ``__metadata__`` that holds our JSON description
HEADER_KEY = "explaind_math"


# ---------------------------------------------------------------------- writing
def atomic_write(path: Path, write) -> None:
    """Create ``path`` so that a crash at any moment leaves either the old file or the complete new one:
    ``write(tmp)`` fills a temporary file in the same directory (named ``.<name>.<random>.tmp``), which
    is fsynced, renamed over ``path``, and the directory fsynced (the rename itself is then durable)."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    fsync_directory(path.parent)


def fsync_directory(directory: Path) -> None:
    """Make renames and unlinks in ``directory`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def save_safetensors(tensors: Mapping[str, torch.Tensor], filename: str, description: Mapping[str, Any]) -> None:
    """One safetensors file whose header carries ``description`` as JSON under :data:`HEADER_KEY`."""
    import safetensors.torch

    safetensors.torch.save_file(dict(tensors), filename, metadata={HEADER_KEY: json.dumps(description)})


def write_file(path: Path, tensors: Mapping[str, torch.Tensor], description: dict) -> tuple[int, int]:
    """Write one file of a trajectory directory atomically (``num_tensors`` added to its description);
    returns its size and CRC-32 (for the manifest)."""
    prepared, seen = {}, set()
    for k, v in tensors.items():
        v = v.detach().cpu().contiguous()
        storage = (v.untyped_storage().data_ptr(), v.untyped_storage().nbytes())
        if storage in seen or v.untyped_storage().nbytes() != v.numel() * v.element_size():
            v = v.clone()  # safetensors refuses tensors that share memory
        seen.add(storage)
        prepared[k] = v
    description = {**description, "num_tensors": len(prepared),
                   "tensor_crc32": {k: tensor_crc32(v) for k, v in prepared.items()}}
    atomic_write(path, lambda tmp: save_safetensors(prepared, tmp, description))
    return path.stat().st_size, file_crc32(path)


# ---------------------------------------------------------------------- checks
def file_crc32(path: Path) -> int:
    """CRC-32 of a whole file, read in blocks (detects bytes changed on disk; not a cryptographic hash)."""
    crc = 0
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            crc = zlib.crc32(block, crc)
    return crc


def dtype_name(dtype: torch.dtype) -> str:
    """``torch.float64`` → ``"float64"`` (the spelling of the manifest)."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, where: str) -> torch.dtype:
    """Inverse of :func:`dtype_name`; an unknown name is a :class:`TrajectoryFileError` naming ``where``."""
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype):
        raise TrajectoryFileError(f"{where}: unknown dtype {name!r}")
    return dtype


# ---------------------------------------------------------------------- reading
@contextmanager
def open_described_file(path: Path, expected_format: str, expected_version: int, kind: str):
    """Open one of this library's safetensors files memory-mapped and yield ``(handle, description,
    tensor names)``, after checking that it is readable, that its header carries our JSON description of
    ``expected_format`` and ``expected_version``, and that it holds as many tensors as the description
    lists. Every failure is a :class:`TrajectoryFileError` naming the file (``kind`` says what a foreign
    safetensors file is not)."""
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # safetensors raises its own error types for bad headers
        raise TrajectoryFileError(f"{path}: not a readable safetensors file (truncated or foreign?): {exc}") from None
    with handle as fh:
        meta = fh.metadata() or {}
        if HEADER_KEY not in meta:
            raise TrajectoryFileError(f"{path}: a safetensors file, but not {kind}")
        try:
            d = json.loads(meta[HEADER_KEY])
        except json.JSONDecodeError as exc:
            raise TrajectoryFileError(f"{path}: its description is not valid JSON: {exc}") from None
        if not isinstance(d, dict) or d.get("format") != expected_format:
            got = d.get("format") if isinstance(d, dict) else None
            raise TrajectoryFileError(f"{path}: unknown format {got!r}, expected {expected_format!r}")
        if d.get("version") != expected_version:
            raise TrajectoryFileError(
                f"{path}: trajectory format version {d.get('version')!r}, this library reads {expected_version}"
            )
        keys = set(fh.keys())
        if len(keys) != d.get("num_tensors"):
            raise TrajectoryFileError(f"{path}: {len(keys)} tensors stored, the description lists {d.get('num_tensors')}")
        yield fh, d, keys


class DescribedFile:
    """One file of a trajectory directory, opened memory-mapped, with its JSON description; every
    failure is a :class:`TrajectoryFileError` naming the file. ``size`` and ``crc32``, when given, are
    the manifest's record of it; ``check_tensors``: check every tensor against the CRC-32 in the file's
    own header (for a file the manifest does not list yet)."""

    def __init__(self, path: Path, expected_format: str, expected_version: int, *,
                 size: int | None = None, crc32: int | None = None, check_tensors: bool = False):
        self.path = path
        if not path.is_file():
            raise TrajectoryFileError(f"{path}: missing (the manifest lists it)")
        actual_size = path.stat().st_size
        if size is not None and actual_size != size:
            raise TrajectoryFileError(
                f"{path}: {actual_size} bytes, the manifest records {size} (truncated or overwritten)"
            )
        if crc32 is not None and file_crc32(path) != crc32:
            raise TrajectoryFileError(f"{path}: corrupted, its CRC-32 differs from the one the manifest records")
        with open_described_file(path, expected_format, expected_version,
                                 "part of an explaind_math trajectory") as (fh, d, keys):
            self.description = d
            # views of the mapped file: the mapping lives as long as any of these tensors
            self.tensors = {}
            for k in keys:
                try:
                    self.tensors[k] = fh.get_tensor(k)
                except Exception as exc:
                    raise TrajectoryFileError(f"{path}: tensor {k!r} cannot be read: {exc}") from None
            if check_tensors:
                if not isinstance(d.get("tensor_crc32"), dict):
                    raise TrajectoryFileError(f"{path}: its header has no CRC-32 of its tensors")
                for k, v in self.tensors.items():
                    check_tensor(path, k, v, d["tensor_crc32"])

    def get(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise TrajectoryFileError(f"{self.path}: tensor {key!r} is missing")
        return self.tensors[key]


def read_description(path: Path) -> Any:
    """Our JSON description from a safetensors header, without mapping the file: 8 bytes (the header's
    length, little-endian), then the header, whose ``__metadata__`` holds it. The caller checks its
    format and version."""
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
        return json.loads(header["__metadata__"][HEADER_KEY])
    except (KeyError, TypeError, json.JSONDecodeError):
        raise TrajectoryFileError(f"{path}: not part of an explaind_math trajectory") from None
