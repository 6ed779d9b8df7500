"""The recorder's view of the training forward passes: dropout recorded for replay, autocast refused.

One :class:`ForwardWatch` per :class:`~explaind_math.TrajectoryRecorder`. Its hooks on the model's root
module see every training forward (grad enabled, model in training mode): under autocast the forward is
refused (mixed precision, see :func:`refuse_autocast`); with dropout recorded, the forward runs inside a
:class:`~explaind_math.integrations.forward.RecordMode`, whose masks are keyed by (step, micro-batch,
row), and ``record_batch`` must then be called once per forward with the ids in the batch's row order.
"""

from __future__ import annotations

import json
import secrets
from typing import Mapping, Sequence

import torch
from torch import nn

from ..errors import RecordingError
from .forward import CoordinateCache, DropoutRoute, RecordMode, autocast_in_use, row_key

__all__ = ["ForwardWatch", "has_active_dropout", "refuse_autocast", "is_left_padded", "left_padding_refusal"]


def has_active_dropout(model: nn.Module) -> bool:
    """Whether some ``nn.Dropout`` (or a module with a ``dropout``/``attention_dropout`` probability, as
    Hugging Face attention modules have) is in training mode with p > 0."""
    for module in model.modules():
        if not module.training:
            continue
        if isinstance(module, nn.Dropout) and module.p > 0:
            return True
        for attribute in ("attention_dropout", "dropout"):
            value = getattr(module, attribute, None)
            if isinstance(value, float) and value > 0:
                return True
    return False


def refuse_autocast(where: str) -> None:
    """Mixed precision is refused, not decomposed: the recorded ``.grad`` is a bf16/fp16 computation, and
    the per-sample reconstruction at float32/64 differs from it by the rounding of the low precision
    (relative 1e-3 to 1e-2), far above the gradient-sum check's tolerance. Keeping that difference as a
    "precision" pseudo-unit would also absorb any real mismatch (a wrong weight, a missed sample) and so
    void the check that certifies the decomposition."""
    active = autocast_in_use()
    if active:
        raise RecordingError(
            f"{where}: mixed precision ({active}) is active in a recorded training forward pass; the "
            "decomposition is exact only for gradients computed in the precision of the parameters, and a "
            "bf16/fp16 gradient differs from its exact per-sample sum by its rounding. Train the recorded "
            "run without autocast (float32, or bfloat16 parameters without autocast)")


def is_left_padded(mask) -> bool:
    """Whether some row of a 2-D attention mask starts with padding (and is not padding only)."""
    if not (isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] > 1):
        return False
    first = mask[:, 0]
    if bool(first.all()):  # no row starts with padding (right padding, or none): one reduction
        return False
    return bool(((first == 0) & (mask.sum(-1) > 0)).any())


def left_padding_refusal(where: str) -> RecordingError:
    """Recorded dropout keys a mask entry by its coordinates in the padded batch; a sequence padded on the left
    sits at other coordinates than unpadded, where the decomposition replays it, so its masks would differ."""
    return RecordingError(
        f"{where}: a training batch is padded on the left (attention_mask starts with 0) while dropout is "
        "recorded; its masks are keyed by each entry's coordinates, which left padding shifts, so they could not "
        "be replayed on the unpadded sequences. Pad on the right (collate_padded's default) for a dropout run; "
        "left padding (LeftPadded) is exact without dropout")


def _generator_states(model: nn.Module) -> list[torch.Tensor]:
    """The states of the random generators a forward of ``model`` can draw from: the CPU's, and each CUDA device's
    that holds a parameter (a native dropout advances them)."""
    states = [torch.random.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
        states += [torch.cuda.get_rng_state(d) for d in devices]
    return states


def _same_states(a: list[torch.Tensor] | None, b: list[torch.Tensor]) -> bool:
    return a is not None and len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


class ForwardWatch:
    """Hooks on ``model`` that watch its training forward passes (see the module docstring)."""

    def __init__(self, model: nn.Module, dropout: bool | str = "auto", seed: int | None = None):
        if dropout not in (True, False, "auto"):
            raise RecordingError(f"dropout must be True, False or 'auto', got {dropout!r}")
        self.records_dropout = has_active_dropout(model) if dropout == "auto" else bool(dropout)
        self.seed = secrets.randbits(31) if seed is None else int(seed)
        self._seed_given = seed is not None
        self.step = 0
        self.rank, self.world_size = 0, 1  # a DDP run: this rank's micro-batches get keys m·W + rank
        self.calls: list[float] | None = None
        self._forwards: list[int | None] = []  # per training forward of this step: its batch size (None: no mask)
        self._orders: list[list[int]] = []  # per record_batch call of this step: ids in row order
        self._left_padded = False  # a training forward of this step was padded on the left
        self._staged: list[list[int]] | None = None
        self._steps: dict[str, list[list[int]]] = {}
        self._in_manifest: dict[str, list[list[int]]] = {}  # resumed: the rows an older manifest held
        self._mode: RecordMode | None = None
        self._coordinates = CoordinateCache()  # shared by this run's forwards
        self._counted = False
        # dropout reaches the recording through a DropoutRoute; the torch-function mode as well until a recorded
        # forward under both showed every call coming through the route (then the route alone: the mode's hook
        # costs every tensor operation), and again for good after a routed forward drew random numbers
        self.route_alone = False
        self._route: DropoutRoute | None = None
        self._mode_entered = False
        self._rng_before: list[torch.Tensor] | None = None
        self._unseen_randomness = False  # a routed forward of this step drew random numbers: refused at the step
        self._handles = [model.register_forward_pre_hook(self._enter, with_kwargs=True),
                         model.register_forward_hook(self._exit, always_call=True)]

    # ------------------------------------------------------------------ hooks
    def _enter(self, module, args, kwargs):
        """A training forward: refuse autocast; with dropout, draw its masks from the keys of its rows. A
        forward without grad in training mode (the recorder's probe) gets fixed keys and is not counted."""
        if not module.training:
            return
        counted = torch.is_grad_enabled()
        if counted:
            refuse_autocast(f"step {self.step}")
        if not self.records_dropout or self._mode is not None:
            return
        if counted and is_left_padded(kwargs.get("attention_mask")):
            self._left_padded = True  # refused at the step, where every DDP rank learns it alike
        m = len(self._forwards) * self.world_size + self.rank
        m, step, seed = (m, self.step, self.seed) if counted else (-1, -1, self.seed)
        keys: dict[int, torch.Tensor] = {}  # per batch size, computed at the forward's first dropout call

        def keys_of_rows(size: int) -> torch.Tensor:
            if size not in keys:
                keys[size] = torch.tensor([row_key(seed, step, m, r) for r in range(size)])
            return keys[size]

        self._mode = RecordMode(keys_of_rows, self._coordinates)
        self._counted = counted
        self._route = DropoutRoute(self._mode).__enter__()
        self._mode_entered = not (self.route_alone and counted and self.world_size == 1)
        if self._mode_entered:
            self._mode.__enter__()
        else:
            self._rng_before = _generator_states(module)

    def _exit(self, module, args, output):
        mode, self._mode = self._mode, None
        if mode is None:
            return
        if self._mode_entered:
            mode.__exit__(None, None, None)
        self._route.__exit__(None, None, None)
        self._route = None
        if not self._counted:
            return
        if self._mode_entered:
            self.route_alone = mode.intercepted == 0  # the mode saw no call the route did not
        elif not _same_states(self._rng_before, _generator_states(module)):
            self._unseen_randomness, self.route_alone = True, False
        if self.calls is None:
            self.calls = list(mode.calls)
        elif mode.calls != self.calls:
            raise RecordingError(
                f"step {self.step}: this forward pass made dropout calls with p = {mode.calls}, the first one "
                f"{self.calls}; recorded dropout needs the same dropout calls in every training forward")
        self._forwards.append(mode.batch_size)

    # ------------------------------------------------------------------ the recorder's calls
    def batch(self, ids: Sequence[int]) -> None:
        if self.records_dropout:
            self._orders.append([int(i) for i in ids])

    def local_forwards(self) -> tuple[list[int | None], list[list[int]], bool]:
        """This rank's training forwards of the step (batch sizes), record_batch orders and whether one was padded
        on the left, for a DDP gather."""
        return list(self._forwards), list(self._orders), self._left_padded

    def merge_ranks(self, gathered: Sequence[tuple[list[int | None], list[list[int]], bool]]) -> None:
        """Every rank's forwards and orders (``local_forwards`` of rank r at position r), laid out by key index
        m·W + r, so that micro-batch m of rank r is entry m·W + r of the step's dropout record. Every rank gets
        the same lists, so every rank refuses a step alike (no rank waits for another in a collective)."""
        if not self.records_dropout:
            return
        padded = [r for r, (_, _, left) in enumerate(gathered) if left]
        if padded:
            self._forget()
            raise left_padding_refusal(f"step {self.step} (rank {padded[0]})")
        for r, (forwards, orders, _) in enumerate(gathered):
            if len(forwards) != len(orders):
                self._forget()
                raise RecordingError(
                    f"step {self.step}: rank {r} made {len(forwards)} training forward passes but {len(orders)} "
                    "record_batch calls; with dropout recorded, each rank calls record_batch once per forward pass")
        width = max((len(orders) for _, orders, _ in gathered), default=0)
        merged_forwards: list[int | None] = []
        merged_orders: list[list[int]] = []
        for m in range(width):
            for forwards, orders, _ in gathered:
                merged_forwards.append(forwards[m] if m < len(forwards) else None)
                merged_orders.append(orders[m] if m < len(orders) else [])
        self._forwards, self._orders = merged_forwards, merged_orders

    def before_step(self, step: int) -> None:
        """Check that every training forward of this step has its ids (refuses the step otherwise)."""
        forwards, orders, left_padded = self._forwards, self._orders, self._left_padded
        unseen_randomness = self._unseen_randomness
        self._forget()
        if not self.records_dropout:
            return
        where = f"step {step}"
        if unseen_randomness:
            raise RecordingError(
                f"{where}: a recorded training forward drew random numbers that the recorder did not see: dropout "
                "called by a name bound before recording (from torch.nn.functional import dropout), torch.dropout, or "
                "noise in the forward. This step is refused (the earlier ones are kept); from the next forward on, "
                "every tensor operation of the forward is watched (a torch-function mode), which sees a dropout "
                "function under any name. Noise must move into the data: each sample's transformed input is its own "
                "sample")
        if left_padded:
            raise left_padding_refusal(where)
        if len(forwards) != len(orders):
            raise RecordingError(
                f"{where}: {len(forwards)} training forward passes of the model but {len(orders)} record_batch "
                "calls; with dropout recorded, call record_batch once per forward pass, with the ids in the "
                "order of the batch's rows (explaind_math.integrations.DataLoaderWithIds gives them)")
        for m, (size, ids) in enumerate(zip(forwards, orders)):
            if size is not None and size != len(ids):
                raise RecordingError(f"{where}: micro-batch {m} has {size} rows but record_batch got {len(ids)} ids")
        flat = [i for ids in orders for i in ids]
        if len(set(flat)) != len(flat):
            raise RecordingError(f"{where}: with dropout, a sample appears in two micro-batches of one step "
                                 "(each saw its own masks); give each sample once per step")
        self._staged = orders

    def _forget(self) -> None:
        self._forwards, self._orders, self._staged, self._left_padded = [], [], None, False
        self._unseen_randomness = False

    def after_step(self, step: int) -> None:
        if self.records_dropout and self._staged is not None:
            self._steps[str(step)] = self._staged
        self._staged = None
        self.step = step + 1

    def continue_record(self, record: dict | None, steps: int, where: str, in_manifest: Mapping | None = None) -> None:
        """Resuming a trajectory of ``steps`` steps whose dropout record is ``record`` (None: recorded without
        dropout; ``in_manifest``: those of its steps whose rows its manifest holds, not a shard): go on with its
        seed, dropout calls and rows, so that the record keeps every step's masks. Refused when this run would record
        dropout and that one did not, or the other way round, when the record misses a step (its rows lost: a shard
        adopted after a crash before its manifest, by an older version), and when a ``dropout_seed`` given differs."""
        if steps == 0:
            return  # (no recorded step needs masks: this run's own dropout, seed and rows)
        if record is None:
            if self.records_dropout:
                raise RecordingError(
                    f"{where}: its {steps} steps have no dropout record (recorded without dropout, or the record was "
                    "lost), and this model has active dropout; resume with the dropout of the recorded run "
                    "(model.eval() of the dropout modules, or p=0)")
            return
        if not self.records_dropout:
            raise RecordingError(
                f"{where}: its steps were recorded with dropout (p = {record.get('calls')}), and this recorder "
                "records none (no active dropout in the model, or dropout=False): resume with the same dropout")
        if self._seed_given and int(record["seed"]) != self.seed:
            raise RecordingError(f"{where}: dropout_seed={self.seed} differs from the recorded run's seed "
                                 f"{record['seed']}; leave dropout_seed unset to continue with it")
        missing = [t for t in range(steps) if str(t) not in record["steps"]]
        if missing:
            raise RecordingError(
                f"{where}: its dropout record lacks the rows of step {missing[0]} (of {len(missing)} steps), so "
                f"their masks cannot be replayed; keep the steps before it with "
                f"explaind_math.storage.truncate_trajectory_directory(directory, {missing[0]}) and resume from a "
                "checkpoint of that step")
        self.seed = int(record["seed"])
        self.calls = [float(p) for p in record["calls"]]
        self._steps = {str(t): [list(map(int, ids)) for ids in record["steps"][str(t)]] for t in range(steps)}
        self._in_manifest = {t: rows for t, rows in self._steps.items() if in_manifest and t in in_manifest}

    def rows_of(self, first: int, stop: int) -> dict:
        """The rows of steps first … stop − 1 (``str(t)`` → ids of each micro-batch in row order) that have them."""
        return {str(t): self._steps[str(t)] for t in range(first, stop) if str(t) in self._steps}

    def manifest_record(self) -> dict:
        """The dropout record a trajectory directory's manifest holds (``{}`` without dropout): the seed and calls,
        and the rows only of steps resumed from a manifest that held them; the others are in their shards."""
        return self._record(self._in_manifest, steps_in_shards=True)

    def metadata(self) -> dict:
        """What goes into ``trajectory.metadata`` (``{}`` without dropout)."""
        return self._record(self._steps)

    def _record(self, steps: Mapping, **extra) -> dict:
        if not self.records_dropout:
            return {}
        return {"dropout": {"seed": self.seed, "calls": self.calls or [], "steps": dict(steps), **extra}}

    def recorded_bytes(self) -> int:
        """Bytes the dropout record takes (JSON in the trajectory's metadata)."""
        return len(json.dumps(self.metadata()))

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
