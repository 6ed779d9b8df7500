"""One shard of a trajectory directory: the steps first ≤ t < stop, with θ_{t+1} under
``theta/<t+1>/<name>`` and the step records under the keys of :mod:`~explaind_math.storage.records`;
their units, hyper-parameters and step counts as JSON in its header. Read memory-mapped and checked
(names, shapes, dtypes, NaN/Inf, the optimizer state the rule needs) against the manifest."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from ..errors import ExplaindError, TrajectoryFileError
from ..optimizers import rule_by_name
from ..trajectory import StepRecord, check_snapshot, check_step
from .format import DescribedFile, dtype_from_name, read_description, write_file
from .manifest import DIRECTORY_VERSION, SHARD_FORMAT, shard_name
from .records import decode_step, encode_step

__all__ = ["Shard", "read_shard_header", "write_shard"]


class Shard:
    """Steps first ≤ t < stop of one shard: θ_{t+1} and the step records, checked."""

    def __init__(self, first: int, stop: int, generation: int, thetas: list[dict], steps: list[StepRecord],
                 dropout_rows: Mapping[str, Any] | None = None):
        self.first, self.stop, self.generation = first, stop, generation
        self.thetas, self.steps = thetas, steps
        self.dropout_rows = dict(dropout_rows or {})  # the recorded dropout's rows of these steps (see write_shard)

    @classmethod
    def read(cls, path: Path, manifest: Mapping[str, Any], first: int, stop: int, *,
             size: int | None, crc32: int | None, check_tensors: bool = False) -> "Shard":
        """Open the shard file ``path`` (checked against the manifest's ``size`` and ``crc32`` when given, and
        each tensor against its header's CRC-32 with ``check_tensors``)."""
        f = DescribedFile(path, SHARD_FORMAT, DIRECTORY_VERSION, size=size, crc32=crc32, check_tensors=check_tensors)
        d = f.description
        try:
            if (d["first_step"], d["stop_step"]) != (first, stop):
                raise TrajectoryFileError(
                    f"{path}: holds steps {d['first_step']}..{d['stop_step'] - 1}, expected {first}..{stop - 1}"
                )
            if len(d["steps"]) != stop - first:
                raise TrajectoryFileError(f"{path}: describes {len(d['steps'])} steps, expected {stop - first}")
            thetas, steps = _read_steps(path, f, d["steps"], manifest, first)
            generation = int(d["generation"])
            dropout_rows = dict(d.get("dropout_rows", {}))
        except TrajectoryFileError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError, IndexError) as exc:
            raise TrajectoryFileError(
                f"{path}: corrupted shard, its description is malformed or does not match its tensors "
                f"({type(exc).__name__}: {exc})"
            ) from None
        return cls(first, stop, generation, thetas, steps, dropout_rows)


def _read_steps(path: Path, f: DescribedFile, steps_json: Sequence[Mapping[str, Any]],
                manifest: Mapping[str, Any], first: int) -> tuple[list[dict], list[StepRecord]]:
    """θ_{t+1} and step t for every step described, each checked like an in-memory trajectory's."""
    names = manifest["parameter_names"]
    shapes = {n: tuple(manifest["shapes"][n]) for n in names}
    dtypes = {n: dtype_from_name(manifest["dtypes"][n], str(path)) for n in names}
    rule = rule_by_name(manifest["optimizer"])
    num_groups = max(manifest["group_of"].values()) + 1
    thetas, steps = [], []
    for k, s in enumerate(steps_json):
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
    return thetas, steps


def write_shard(directory: Path, first: int, steps: Sequence[StepRecord],
                thetas: Sequence[Mapping[str, torch.Tensor]], generation: int,
                dropout_rows: Mapping[str, Any] | None = None) -> tuple[int, int]:
    """Write steps first … first + len(steps) − 1 and their θ_{t+1} as one shard; returns its size and CRC-32.
    ``dropout_rows``: a run with recorded dropout, per step of the shard (``str(t)``) the ids of each micro-batch in
    row order (what replays its masks, with the seed in the manifest), kept in the shard's description so that the
    shard carries them wherever it goes (recovery adopting it, a truncation cutting it)."""
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
    if dropout_rows:
        description["dropout_rows"] = {str(t): rows for t, rows in dropout_rows.items()}
    return write_file(directory / shard_name(first, stop), tensors, description)


def read_shard_header(path: Path) -> dict:
    """A shard's JSON description, read from its header alone (a few kB; no tensor is read)."""
    d = read_description(path)
    if not isinstance(d, dict) or d.get("format") != SHARD_FORMAT or d.get("version") != DIRECTORY_VERSION:
        raise TrajectoryFileError(f"{path}: not a shard of this format version")
    return d
