"""Integrity of the single-file form: a CRC-32 of every tensor's bytes and of every field of the JSON
description (each step's separately), written with the file and checked when it is read, so that a
flipped bit or a hand-edited header is an error naming the file and the tensor or field, never a run
that loads and is silently another one."""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..errors import ExplaindError, TrajectoryFileError
from ..optimizers import rule_by_name

__all__ = ["FIELDS", "check_description", "check_tensor", "field_checksums", "tensor_crc32"]

#: the fields of a single file's description that are covered by ``field_crc32``
FIELDS = ("optimizer", "parameter_names", "group_of", "steps", "initial_step_counts", "initial_state_keys",
          "buffers", "metadata", "tensor_crc32")


def tensor_crc32(v: torch.Tensor) -> int:
    """CRC-32 of a tensor's bytes (contiguous, on the CPU; any dtype)."""
    v = v.detach().cpu().contiguous()
    if v.numel() == 0:
        return 0
    return zlib.crc32(memoryview(v.reshape(-1).view(torch.uint8).numpy()))


def _crc_of(value: Any) -> int:
    return zlib.crc32(json.dumps(value, sort_keys=True, ensure_ascii=False).encode("utf-8"))


def field_checksums(description: Mapping[str, Any]) -> dict:
    """CRC-32 of every field of :data:`FIELDS`; ``steps`` gets one per step."""
    out: dict[str, Any] = {f: _crc_of(description[f]) for f in FIELDS if f != "steps"}
    out["steps"] = [_crc_of(s) for s in description["steps"]]
    return out


def check_description(path: Path, d: Mapping[str, Any], keys: Iterable[str]) -> None:
    """The description's fields exist, the optimizer is registered, the steps match the θ snapshots
    stored, and every field is as written (its CRC-32)."""
    for f in (*FIELDS, "field_crc32"):
        if f not in d:
            raise TrajectoryFileError(f"{path}: corrupted description: field {f!r} is missing")
    try:
        rule_by_name(d["optimizer"])
    except ExplaindError as exc:
        raise TrajectoryFileError(f"{path}: field 'optimizer': {exc}") from None
    if not isinstance(d["steps"], list):
        raise TrajectoryFileError(f"{path}: corrupted description: field 'steps' is not a list")
    snapshots = set()
    for k in keys:
        parts = k.split("/")
        if parts[0] == "theta" and len(parts) >= 3 and parts[1].isdigit():
            snapshots.add(int(parts[1]))
    if snapshots != set(range(len(d["steps"]) + 1)):
        stored = f"θ_{min(snapshots)}..θ_{max(snapshots)}" if snapshots else "no θ"
        raise TrajectoryFileError(
            f"{path}: field 'steps' describes {len(d['steps'])} steps (θ_0..θ_{len(d['steps'])}), but the file "
            f"holds {stored} ({len(snapshots)} snapshots): steps were removed from or added to the description"
        )
    written, now = d["field_crc32"], None
    if not isinstance(written, dict) or not isinstance(written.get("steps"), list):
        raise TrajectoryFileError(f"{path}: corrupted description: field 'field_crc32' is malformed")
    now = field_checksums(d)
    if len(written["steps"]) != len(now["steps"]):
        raise TrajectoryFileError(
            f"{path}: corrupted description: field 'steps' lists {len(now['steps'])} steps, "
            f"{len(written['steps'])} were written"
        )
    for t, (a, b) in enumerate(zip(written["steps"], now["steps"])):
        if a != b:
            raise TrajectoryFileError(
                f"{path}: corrupted description: field 'steps[{t}]' (units, hyper-parameters, state of step {t}) "
                "was changed after the file was written (its CRC-32 differs)"
            )
    for f in FIELDS:
        if f != "steps" and written.get(f) != now[f]:
            raise TrajectoryFileError(
                f"{path}: corrupted description: field {f!r} was changed after the file was written "
                "(its CRC-32 differs)"
            )


def check_tensor(path: Path, key: str, v: torch.Tensor, checksums: Mapping[str, int]) -> torch.Tensor:
    """``v`` as read, if its bytes have the CRC-32 written for ``key``."""
    if key not in checksums:
        raise TrajectoryFileError(f"{path}: corrupted: tensor {key!r} has no CRC-32 in the description")
    if tensor_crc32(v) != checksums[key]:
        raise TrajectoryFileError(
            f"{path}: corrupted tensor {key!r}: its CRC-32 differs from the one written (bytes changed on disk)"
        )
    return v
