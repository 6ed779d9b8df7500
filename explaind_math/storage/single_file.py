"""A whole :class:`~explaind_math.Trajectory` as one safetensors file: θ_t under ``theta/<t>/<name>``,
the step records under the keys of :mod:`~explaind_math.storage.records`, the buffers under
``buffer/<name>``, and the description (optimizer, names, groups, per-step JSON) in the header."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import ExplaindError, TrajectoryFileError
from ..trajectory import Trajectory
from .format import atomic_write, open_described_file, save_safetensors
from .integrity import check_description, check_tensor, field_checksums, tensor_crc32
from .records import decode_state, decode_step, encode_state, encode_step

__all__ = ["FORMAT_NAME", "FORMAT_VERSION", "load_file", "save_file"]

FORMAT_NAME = "explaind_math.trajectory"
FORMAT_VERSION = 2  # 2: a CRC-32 of every tensor and of every field of the description


def save_file(trajectory: Trajectory, path: str | os.PathLike) -> Path:
    """Write ``trajectory`` to ``path`` (one .safetensors file) atomically; returns the path."""
    path = Path(path)
    tensors: dict[str, torch.Tensor] = {}
    for t, snapshot in enumerate(trajectory.parameters):
        for n, v in snapshot.items():
            tensors[f"theta/{t}/{n}"] = v
    steps_json = [encode_step(t, step, tensors) for t, step in enumerate(trajectory.steps)]
    initial_counts, initial_keys = encode_state(trajectory.initial_state, "initial", tensors)
    for n, v in trajectory.buffers.items():
        tensors[f"buffer/{n}"] = v
    description = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION,
        "optimizer": trajectory.optimizer,
        "parameter_names": trajectory.parameter_names,
        "group_of": trajectory.group_of,
        "steps": steps_json,
        "initial_step_counts": initial_counts,
        "initial_state_keys": initial_keys,
        "buffers": sorted(trajectory.buffers),
        "metadata": trajectory.metadata,
        "num_tensors": len(tensors),
    }
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    description["tensor_crc32"] = {k: tensor_crc32(v) for k, v in tensors.items()}
    description["field_crc32"] = field_checksums(description)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, description))
    return path


def load_file(path: str | os.PathLike, cls: type[Trajectory] = Trajectory) -> Trajectory:
    """Read a file written by :func:`save_file` as a ``cls``; a truncated, foreign or corrupted file
    raises :class:`TrajectoryFileError` saying which."""
    try:
        return _read(path, cls)
    except TrajectoryFileError:
        raise
    except ExplaindError as exc:  # the trajectory's own checks (shapes, NaN/Inf, state the rule needs)
        raise TrajectoryFileError(f"{path}: {exc}") from None
    except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
        # a readable header whose description is incomplete, mistyped or inconsistent with the tensors
        raise TrajectoryFileError(
            f"{path}: corrupted trajectory file, its description is malformed or does not match its "
            f"tensors ({type(exc).__name__}: {exc})"
        ) from exc


def _read(path: str | os.PathLike, cls: type[Trajectory]) -> Trajectory:
    path = Path(path)
    if not path.is_file():
        raise TrajectoryFileError(f"{path}: no such trajectory file")
    with open_described_file(path, FORMAT_NAME, FORMAT_VERSION, "an explaind_math trajectory") as (fh, d, keys):
        check_description(path, d, keys)

        def get(key: str) -> torch.Tensor:
            if key not in keys:
                raise TrajectoryFileError(f"{path}: tensor {key!r} is missing")
            try:
                value = fh.get_tensor(key)
            except Exception as exc:
                raise TrajectoryFileError(f"{path}: tensor {key!r} cannot be read: {exc}") from None
            return check_tensor(path, key, value, d["tensor_crc32"])

        names = d["parameter_names"]
        steps_json = d["steps"]
        parameters = [{n: get(f"theta/{t}/{n}") for n in names} for t in range(len(steps_json) + 1)]
        steps = [decode_step(t, s, get) for t, s in enumerate(steps_json)]
        initial = decode_state(d["initial_step_counts"], d["initial_state_keys"], "initial", get)
        buffers = {n: get(f"buffer/{n}") for n in d["buffers"]}
    return cls(
        optimizer=d["optimizer"],
        parameter_names=names,
        group_of=d["group_of"],
        parameters=parameters,
        steps=steps,
        initial_state=initial,
        buffers=buffers,
        metadata=d.get("metadata", {}),
    )
