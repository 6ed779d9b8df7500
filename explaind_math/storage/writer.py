"""Writing a trajectory directory as training runs: :class:`TrajectoryShardWriter` appends steps one
shard at a time (initial.safetensors with the first, then each shard, then the manifest that lists it;
all atomic), optionally from a background thread; :func:`write_directory` writes a whole trajectory."""

from __future__ import annotations

import json
import os
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from ..errors import ExplaindError, RecordingError, TrajectoryFileError
from ..trajectory import StepRecord, Trajectory
from .format import dtype_name, write_file
from .manifest import DIRECTORY_FORMAT, DIRECTORY_VERSION, INITIAL_FORMAT, INITIAL_NAME, write_manifest
from .reader import ShardedTrajectory
from .records import encode_state
from .recovery import DirectoryLock, recover_locked
from .shard import write_shard

__all__ = ["TrajectoryShardWriter", "write_directory"]


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

    ``metadata_source``: when set, a callable whose mapping is written as the trajectory's metadata with every
    manifest (read when a shard is handed over, in the caller's thread). ``dropout_rows_source``: when set, a
    callable of (first, stop) whose mapping (``str(t)`` → rows) goes into that shard's description
    (:func:`~explaind_math.storage.shard.write_shard`): the recorded dropout's rows, which grow with the steps,
    stay with their shard, and a manifest stays small.
    """

    def __init__(self, directory: str | os.PathLike, *, steps_per_shard: int = 1, background: bool = False):
        if int(steps_per_shard) < 1:
            raise ExplaindError(f"steps_per_shard must be a positive integer, got {steps_per_shard!r}")
        self.directory = Path(directory)
        self.steps_per_shard = int(steps_per_shard)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = DirectoryLock(self.directory)
        try:
            self.manifest = recover_locked(self.directory)
        except BaseException:
            self._lock.release()
            raise
        self._initial: tuple[dict, dict] | None = None  # (tensors, description) until the first flush
        self._started = self.manifest is not None
        self._submitted = self.manifest["num_steps"] if self.manifest is not None else 0
        self._pending: list[tuple[StepRecord, dict]] = []
        self._failure: BaseException | None = None
        self.closed = False
        self.metadata_source: Callable[[], Mapping[str, Any]] | None = None
        self.dropout_rows_source: Callable[[int, int], Mapping[str, Any]] | None = None
        self._submitted_metadata = self.manifest["metadata"] if self.manifest is not None else None
        self._queue = None
        if background:
            import queue
            import threading

            self._queue = queue.Queue(maxsize=1)
            self._thread = threading.Thread(target=self._work, name=f"explaind_math shards {self.directory.name}",
                                            daemon=True)
            self._thread.start()
            # at interpreter exit, let the shard being written finish (a daemon thread killed inside a write can
            # abort the process); the steps not yet handed over are not written, the directory stays consistent
            self._stop_once = weakref.finalize(self, _stop_worker, self._queue, self._thread)

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
            "dtypes": {n: dtype_name(theta_0[n].dtype) for n in names},
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
                write_manifest(self.directory, self.manifest)
        self._submitted_metadata = metadata

    def flush(self) -> None:
        """Write the pending steps as one shard, then the manifest that lists it (with ``background``:
        hand them to the writer thread, waiting while it still has a shard queued)."""
        self._check_usable()
        metadata = None
        if self.metadata_source is not None and self._started:
            metadata = json.loads(json.dumps(dict(self.metadata_source())))  # JSON-able, and a copy
            if metadata == self._submitted_metadata:
                metadata = None  # (unchanged: the manifest keeps it)
        if self._initial is None and not self._pending and metadata is None:
            return
        stop = self._submitted + len(self._pending)
        rows = self.dropout_rows_source(self._submitted, stop) if self.dropout_rows_source and self._pending else None
        job = (self._initial, self._submitted, [s for s, _ in self._pending], [th for _, th in self._pending],
               metadata, rows)
        if metadata is not None:
            self._submitted_metadata = metadata
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
        initial, first, steps, thetas, metadata, rows = job
        manifest = self.manifest
        if initial is not None:
            tensors, description = initial
            if metadata is not None:
                description = {**description, "metadata": metadata}
            size, crc = write_file(self.directory / INITIAL_NAME, tensors,
                                   {"format": INITIAL_FORMAT, "version": DIRECTORY_VERSION, **description,
                                    "generation": 0})
            manifest = {
                "format": DIRECTORY_FORMAT, "version": DIRECTORY_VERSION, **description, "generation": 0,
                "num_steps": 0, "initial": [INITIAL_NAME, size, crc], "shards": [],
            }
        if steps:
            if first != manifest["num_steps"]:
                raise RecordingError(f"{self.directory}: shard of step {first} after {manifest['num_steps']} steps")
            size, crc = write_shard(self.directory, first, steps, thetas, manifest["generation"], rows)
            stop = first + len(steps)
            manifest = {**manifest, "shards": [*manifest["shards"], [first, stop, size, crc]], "num_steps": stop}
        if metadata is not None:
            manifest = {**manifest, "metadata": metadata}
        write_manifest(self.directory, manifest)
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
        if self._queue is not None:
            self._stop_once()  # runs once: at close, abandon or interpreter exit, whichever comes first


def _stop_worker(jobs, thread) -> None:
    """Stop a writer thread after the jobs queued before this call."""
    if thread.is_alive():
        jobs.put(None)
        thread.join()


def write_directory(trajectory: Trajectory, directory: str | os.PathLike, *,
                    steps_per_shard: int = 1) -> ShardedTrajectory:
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
