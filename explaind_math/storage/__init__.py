"""Trajectories on disk (the data of MATH.md §0): one safetensors file (:mod:`.single_file`), or, for
trajectories larger than memory, a directory of shards written as training runs and read
memory-mapped. Nothing is ever unpickled.

Layout of a trajectory directory::

    run/
      manifest.json                         the trajectory's description and its finished shards
      initial.safetensors                   θ_0, the optimizer state before step 0, the model buffers
      steps-00000000-00000004.safetensors   steps 0..3: θ_1..θ_4, weights w_{t,i}, optimizer state, gradients
      steps-00000004-00000008.safetensors   steps 4..7
      .lock                                 held (flock) while a recorder writes here

Every file is written atomically (a temporary ``.<name>.<random>.tmp`` in the directory, fsync, rename,
fsync of the directory), the manifest last: it lists exactly the finished shards, with each one's size
and CRC-32, so a crash at any moment leaves a readable trajectory of the steps finished before it.

Modules: :mod:`.format` (headers, atomic writes, checksums), :mod:`.records` (step records as JSON and
tensors), :mod:`.single_file`, :mod:`.manifest`, :mod:`.shard`, :mod:`.recovery` (lock, crash
recovery, truncation), :mod:`.writer`, :mod:`.reader` (:class:`ShardedTrajectory`). Importing this
package registers :func:`save_file`, :func:`write_directory` and :func:`load_trajectory` as
:meth:`Trajectory.save`, :meth:`Trajectory.save_directory` and :meth:`Trajectory.load`.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..trajectory import Trajectory, register_files
from .format import file_crc32
from .manifest import DIRECTORY_FORMAT, DIRECTORY_VERSION, MANIFEST_NAME
from .reader import ShardedTrajectory
from .recovery import (RecoveryWarning, UnlistedShardWarning, recover_trajectory_directory,
                       truncate_trajectory_directory)
from .single_file import FORMAT_NAME, FORMAT_VERSION, load_file, save_file
from .writer import TrajectoryShardWriter, write_directory

__all__ = [
    "ShardedTrajectory",
    "TrajectoryShardWriter",
    "load_file",
    "load_trajectory",
    "recover_trajectory_directory",
    "save_file",
    "truncate_trajectory_directory",
    "write_directory",
    "file_crc32",
    "DIRECTORY_FORMAT",
    "DIRECTORY_VERSION",
    "FORMAT_NAME",
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "RecoveryWarning",
    "UnlistedShardWarning",
]


def load_trajectory(path: str | os.PathLike, cls: type[Trajectory] = Trajectory) -> Trajectory:
    """A file written by :func:`save_file` as a ``cls``, or a directory opened as a
    :class:`ShardedTrajectory` (when ``cls`` is :class:`Trajectory`); see :meth:`Trajectory.load`."""
    if Path(path).is_dir() and cls is Trajectory:
        return ShardedTrajectory(path)
    return load_file(path, cls)


register_files(save=save_file, save_directory=write_directory, load=load_trajectory)
