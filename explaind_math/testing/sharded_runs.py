"""A small, deterministic recorded training run for the trajectory-directory tests, which can crash at a
chosen moment (``os._exit``: no clean-up, no ``finally``) and be resumed from its directory.

Run as a script (the crash tests start it in a subprocess)::

    python -m explaind_math.testing.sharded_runs --optimizer adamw --steps 8 \\
        --run DIRECTORY:STEPS_PER_SHARD:CRASH [--run ...]

Each ``--run`` records into its directory in a forked child (POSIX only) that crashes where told; the script
exits with status 0 when every child ended by its crash (exit status 17), 1 otherwise.

Crash points (step K counts from 0):

* ``after-step:K``       — right after optimizer step K (steps not yet in a shard are lost);
* ``before-manifest:K``  — after the shard holding step K is renamed into place, before the manifest
  that lists it is written;
* ``mid-shard:K``        — while the shard holding step K is being written: a half-written temporary
  file is left behind.

The run: a Linear–BatchNorm(eval, frozen statistics: buffers)–Tanh–Linear model in float64, two param
groups with their own learning rates and weight decay, a StepLR schedule, weighted batches of unequal
sizes; AdamW with amsgrad or SGD with Nesterov momentum.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

from ..storage import format as storage_format, recover_trajectory_directory, writer as storage_writer
from ..recording import TrajectoryRecorder

CRASH_EXIT_CODE = 17
NUM_SAMPLES = 24
DT = torch.float64


def make_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(NUM_SAMPLES, 4, generator=g, dtype=DT)
    Y = torch.randint(0, 3, (NUM_SAMPLES,), generator=g)
    return X, Y


def two_group_model_and_optimizer(kind: str, device=None):
    """Linear → BatchNorm (frozen statistics, a buffer) → Tanh → Linear in float64, with two parameter
    groups and AdamW (amsgrad) or SGD (Nesterov) over them; freshly seeded: the same every time."""
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.BatchNorm1d(5), nn.Tanh(), nn.Linear(5, 3)).to(device=device, dtype=DT)
    with torch.no_grad():
        model[1].running_mean.uniform_(-0.5, 0.5)
    model.eval()
    groups = [{"params": list(model[0].parameters()) + list(model[1].parameters())},
              {"params": model[3].parameters(), "lr": 0.02, "weight_decay": 0.05}]
    if kind == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=0.05, betas=(0.9, 0.5), amsgrad=True)
    elif kind == "sgd":
        optimizer = torch.optim.SGD(groups, lr=0.1, momentum=0.9, nesterov=True)
    else:
        raise ValueError(f"unknown optimizer {kind!r}")
    return model, optimizer


def make_training(kind: str):
    """Model, optimizer and scheduler, freshly seeded: the same every time."""
    model, optimizer = two_group_model_and_optimizer(kind)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 3, 0.5)
    return model, optimizer, scheduler


def batch(t: int):
    """Step t's sample ids and weights w_{t,i} (unequal batch sizes, explicit weights)."""
    size = 5 if t % 4 else 3
    ids = (torch.arange(size) + 5 * t) % NUM_SAMPLES
    weights = torch.linspace(0.5, 1.5, size, dtype=DT)
    return ids, weights


def train_step(model, optimizer, scheduler, X, Y, t: int, recorder=None) -> None:
    ids, w = batch(t)
    optimizer.zero_grad()
    (F.cross_entropy(model(X[ids]), Y[ids], reduction="none") * w).sum().backward()
    if recorder is not None:
        recorder.record_batch(ids, weights=w)
    optimizer.step()
    scheduler.step()


def record(kind: str, steps: int, directory=None, *, steps_per_shard: int = 1, resume: bool = False,
           crash: str | None = None, background: bool = False):
    """Train ``steps`` steps with a recorder (in memory, or into ``directory``); returns
    (model, trajectory, X, Y). ``resume``: recover the directory, replay the steps it holds without a
    recorder (the user's checkpoint, recomputed), then record the rest into it."""
    X, Y = make_data()
    model, optimizer, scheduler = make_training(kind)
    start = 0
    if resume:
        start = recover_trajectory_directory(directory)
        for t in range(start):
            train_step(model, optimizer, scheduler, X, Y, t)
    if crash is not None:
        _arm_crash(crash)
    recorder = TrajectoryRecorder(model, optimizer, directory=directory, steps_per_shard=steps_per_shard,
                                  write_in_background=background)
    with recorder:
        for t in range(start, steps):
            train_step(model, optimizer, scheduler, X, Y, t, recorder)
            if crash == f"after-step:{t}":
                os._exit(CRASH_EXIT_CODE)
        trajectory = recorder.trajectory(metadata={"run": kind})
    return model, trajectory, X, Y


def _arm_crash(crash: str) -> None:
    where, _, k = crash.partition(":")
    k = int(k)
    if where == "before-manifest":
        real = storage_writer.write_manifest

        def write_manifest(directory, manifest):
            if manifest["num_steps"] > k:
                os._exit(CRASH_EXIT_CODE)
            real(directory, manifest)

        storage_writer.write_manifest = write_manifest  # the writer's commits
    elif where == "mid-shard":
        real_save = storage_format.save_safetensors

        def save(tensors, filename, description):
            real_save(tensors, filename, description)
            if description.get("stop_step", 0) > k:
                with open(filename, "r+b") as fh:
                    fh.truncate(os.path.getsize(filename) // 2)
                os._exit(CRASH_EXIT_CODE)

        storage_format.save_safetensors = save  # every file of a directory (storage.format.write_file)
    elif where != "after-step":
        raise ValueError(f"unknown crash point {crash!r}")


def assert_trajectories_identical(a, b) -> None:
    """Every field of two trajectories equal: tensors bit for bit (dtype and shape too), JSON exactly."""

    def tensor(x, y, what):
        assert isinstance(y, torch.Tensor), what
        assert x.dtype == y.dtype and x.shape == y.shape, what
        assert torch.equal(x, y), what

    def state(x, y, what):
        assert x.keys() == y.keys(), what
        for n in x:
            assert x[n].keys() == y[n].keys(), (what, n)
            for k, v in x[n].items():
                if k == "step":
                    assert isinstance(y[n][k], int) and y[n][k] == v, (what, n)
                else:
                    tensor(v, y[n][k], (what, n, k))

    assert a.optimizer == b.optimizer
    assert a.parameter_names == b.parameter_names
    assert a.group_of == b.group_of
    assert a.metadata == b.metadata
    assert a.shapes() == b.shapes() and a.dtype == b.dtype and a.sample_ids() == b.sample_ids()
    assert a.buffers.keys() == b.buffers.keys()
    for n in a.buffers:
        tensor(a.buffers[n], b.buffers[n], ("buffer", n))
    assert len(a.parameters) == len(b.parameters)
    for t, (sa, sb) in enumerate(zip(a.parameters, b.parameters)):
        assert set(sa) == set(sb), t
        for n in sa:
            tensor(sa[n], sb[n], ("theta", t, n))
    state(a.initial_state, b.initial_state, "initial state")
    assert a.num_steps == b.num_steps
    for t, (x, y) in enumerate(zip(a.steps, b.steps)):
        assert x.sample_ids == y.sample_ids, t
        tensor(x.weights, y.weights, ("weights", t))
        assert x.hyperparameters == y.hyperparameters, t
        assert x.updated == y.updated, t
        state(x.state, y.state, ("state", t))
        assert (x.gradient is None) == (y.gradient is None), t
        if x.gradient is not None:
            assert x.gradient.keys() == y.gradient.keys()
            for n in x.gradient:
                tensor(x.gradient[n], y.gradient[n], ("gradient", t, n))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "sgd"])
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--run", action="append", required=True,
                        help="DIRECTORY:STEPS_PER_SHARD:CRASH, or DIRECTORY:STEPS_PER_SHARD:background:CRASH")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    import safetensors.torch  # noqa: F401  (imported once, before forking)

    record(args.optimizer, 2)  # warm up (first-call costs of torch.optim and autograd) once, before forking
    failed = []
    for spec in args.run:
        directory, k, crash = spec.split(":", 2)
        background = crash.startswith("background:")
        crash = crash.removeprefix("background:")

        def run(directory=directory, k=k, crash=crash, background=background):
            record(args.optimizer, args.steps, directory, steps_per_shard=int(k), crash=crash, background=background)
            os._exit(0)  # the crash did not happen

        pid = os.fork()  # one interpreter start for all runs (single-threaded, so fork is safe)
        if pid == 0:
            try:
                run()
            finally:
                os._exit(1)
        status = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        if status != CRASH_EXIT_CODE:
            failed.append(f"{spec}: exit status {status}")
    if failed:
        print("\n".join(failed), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
