"""Forward passes that the decomposition can replay exactly: dropout and attention.

Dropout masks are not drawn from torch's generator but from a counter-based hash: the mask entry at
coordinates c of the k-th dropout call of the forward pass of step t, micro-batch m, batch row r is

    keep = hash32(key(seed, t, m, r), k, c) < (1 − p) · 2³²,   mask = keep / (1 − p),

so the recording keeps only integers (the seed, per step the ids of each micro-batch in row order, the
p of each call): the masks cost no memory and replay bit-identically on any device, at any padded
length (an entry depends on its coordinates, not on the tensor's shape), and inside ``vmap`` (the
per-sample key is an input like the sample). Recording masks instead would cost B·(dropout elements)/8
bytes per step — for GPT-2 small at B = 8, L = 512 about 110 MB per step — and tie replay to the padding
of the recorded batch.

``scaled_dot_product_attention`` is computed as softmax(q kᵀ·scale + mask) v in plain tensor operations
(its attention dropout then is one of the dropout calls): this is what makes attention dropout exact, and
under ``vmap`` it avoids SDPA's missing batching rule (a per-sample loop, measured 10-100× slower).

How a recorded forward's dropout calls reach the recording: a :class:`DropoutRoute` (the names
``torch.nn.functional.dropout`` and ``scaled_dot_product_attention``, which ``nn.Dropout`` and Hugging Face
attention call), and the torch-function mode :class:`RecordMode`, which sees a dropout function under any name
but costs every tensor operation of the forward a Python call. The recorder uses both until one forward shows
that the mode saw nothing the route did not, then the route alone (see
:class:`~explaind_math.integrations.watch.ForwardWatch`). The decomposition's :class:`ReplayMode` is a mode.
"""

from __future__ import annotations

import collections
import functools
import math
import threading
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..errors import RecordingError

__all__ = ["CoordinateCache", "DropoutRecord", "DropoutRoute", "ORIGINAL_DROPOUT", "ORIGINAL_SDPA", "ReplayMode",
           "RecordMode", "row_key", "hash32", "attention_math", "autocast_in_use"]

_M32 = 0xFFFFFFFF
_MIX = 0x45D9F3B
_GOLDEN = 0x9E3779B1
_COORD = (0x27D4EB2D, 0x165667B1, 0x61C88647, 0x2545F491, 0x3C6EF372, 0x1B873593, 0x7FEB352D)


def hash32(x):
    """A 32-bit integer mix (Python int or int64 tensor with values in [0, 2³²))."""
    x = ((x >> 16) ^ x) * _MIX & _M32
    x = ((x >> 16) ^ x) * _MIX & _M32
    return (x >> 16) ^ x


def row_key(seed: int, step: int, micro_batch: int, row: int) -> int:
    """The key of batch row ``row`` of micro-batch ``micro_batch`` of step ``step``."""
    h = hash32(seed & _M32)
    for value in (step, micro_batch, row):
        h = hash32((h ^ value) & _M32)
    return h


@functools.lru_cache(maxsize=256)
def _axis_term(size: int, d: int, ndim: int, device: torch.device) -> torch.Tensor:
    """(c_d · coordinate) mod 2³² along axis d of an ndim-axis row, shaped to broadcast (a few KB per entry)."""
    view = [1] * ndim
    view[d] = size
    return (torch.arange(size, device=device, dtype=torch.int64) * _COORD[d % len(_COORD)] & _M32).reshape(view)


def _coordinates(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """(Σ_d c_d · coordinate_d) mod 2³² over a row of shape ``shape``: the part of every mask entry's hash that
    depends on its coordinates only (the per-axis terms are cached; their sum is formed per call)."""
    lin = torch.zeros((), dtype=torch.int64, device=device)
    for d, size in enumerate(shape):
        lin = lin + _axis_term(int(size), d, len(shape), device)
    return lin & _M32


def _mask(keys: torch.Tensor, call: int, shape: Sequence[int], p: float, dtype, device) -> torch.Tensor:
    """mask/(1 − p) for rows with ``keys`` (shape (R,)) and per-row shape ``shape``: (R, *shape)."""
    base = hash32((keys.to(device=device, dtype=torch.int64) + (call + 1) * _GOLDEN) & _M32)
    h = base.reshape(-1, *([1] * len(shape)))
    h = hash32(h ^ _coordinates(tuple(int(v) for v in shape), torch.device(device)))  # both < 2³²: so is h
    threshold = min(int(round((1.0 - p) * 2 ** 32)), 2 ** 32)
    return (h < threshold).to(dtype) * (1.0 / (1.0 - p))


def _int32_bits(x):
    """A value in [0, 2³²) (Python int or int64 tensor) as the int32 with the same 32 bits."""
    if isinstance(x, int):
        return x - (1 << 32) if x >= 1 << 31 else x
    return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)


def _half_round(x):
    """(x >> 16) ^ x of a value in [0, 2³²): the first half of hash32's first round. Logical shifts distribute
    over XOR, so for x = b ^ c it is half(b) ^ half(c): a row's part and a coordinate's part, formed apart."""
    return (x >> 16) ^ x


def _mask_int32(halves: torch.Tensor, coordinate_halves: torch.Tensor, p: float, dtype) -> torch.Tensor:
    """:func:`_mask` computed in int32 (two's-complement wrap-around is arithmetic mod 2³²; a logical shift is
    the arithmetic one with the sign bits cleared), in place, from the rows' half rounds (R, 1, …) and the
    coordinates' (shape): the same bits at half the memory traffic and about half the operations of the int64
    form. The recorder draws its masks with it (:class:`RecordMode`); replay, under vmap, uses :func:`_mask`;
    :func:`_fast_masks_agree` checks that the two agree on a device before it is used there."""
    return _mixed_and_thresholded(halves ^ coordinate_halves, p, dtype)


def _mixed_and_thresholded(h: torch.Tensor, p: float, dtype) -> torch.Tensor:
    """The rest of :func:`_mask_int32` after h = row half ^ coordinate half, in place on the int32 tensor ``h`` (of
    any shape: the masks of several calls with one p and dtype, laid out in one buffer, are formed in one pass)."""
    h.mul_(_MIX)  # hash32's first round: ((x >> 16) ^ x) · MIX mod 2³²
    t = h >> 16
    h.bitwise_xor_(t.bitwise_and_(0xFFFF)).mul_(_MIX)  # second round
    t = h >> 16
    h.bitwise_xor_(t.bitwise_and_(0xFFFF))  # (x >> 16) ^ x: the hash, as int32 bits
    threshold = min(int(round((1.0 - p) * 2 ** 32)), 2 ** 32)
    if threshold >= 2 ** 32:  # every entry kept (threshold − 2³¹ is past int32)
        return torch.ones(h.shape, dtype=dtype, device=h.device).mul_(1.0 / (1.0 - p))
    # unsigned h < threshold  <=>  (h XOR 2³¹) < threshold − 2³¹ as signed int32
    keep = h.bitwise_xor_(-(1 << 31)) < threshold - (1 << 31)
    return keep.to(dtype).mul_(1.0 / (1.0 - p))  # _mask's (keep).to(dtype) · 1/(1 − p) (where() is slower on CPU)


def _row_halves(keys: Sequence[int], call: int) -> list[int]:
    """Per row key, the int32 bits of _half_round(hash32((key + (call + 1)·GOLDEN) mod 2³²)) (Python ints)."""
    offset = (call + 1) * _GOLDEN
    return [_int32_bits(_half_round(hash32((int(k) + offset) & _M32))) for k in keys]


def _row_halves_table(keys: Sequence[int], calls: Sequence[int]) -> torch.Tensor:
    """:func:`_row_halves` of every call of ``calls`` (rows) and key (columns), as an int32 tensor: the same
    formula on numpy uint64 arrays (every intermediate below 2⁶⁰, so no wrap-around), a few array operations for
    all of them instead of a Python hash per row and call (the Python formula while torch.compile traces: it would
    trace numpy into tensor operations that uint64 lacks)."""
    if torch.compiler.is_compiling():
        return torch.tensor([_row_halves(keys, call) for call in calls], dtype=torch.int32)
    x = (np.asarray(keys, dtype=np.uint64)[None, :]
         + (np.asarray(calls, dtype=np.uint64)[:, None] + np.uint64(1)) * np.uint64(_GOLDEN)) & np.uint64(_M32)
    return torch.from_numpy(_half_round(hash32(x)).astype(np.uint32).view(np.int32))


def _coordinate_halves(shape: tuple[int, ...], device) -> torch.Tensor:
    """_half_round of :func:`_coordinates` as int32 bits (shape ``shape``)."""
    return _int32_bits(_half_round(_coordinates(shape, torch.device(device))))


_FAST_MASKS: dict[str, bool] = {}
_FAST_MASKS_OF_DEVICE: dict = {}  # the answer per device as given (a dropout call asks with its tensor's device)


def _fast_masks_agree(device) -> bool:
    """Whether :func:`_mask_int32` gives :func:`_mask`'s bits on this device type (checked once per type, on
    shapes whose sizes are not multiples of a vector width, so that the scalar tails are covered too)."""
    known = _FAST_MASKS_OF_DEVICE.get(device)
    if known is not None:
        return known
    kind = torch.device(device).type
    if kind not in _FAST_MASKS:
        keys = [row_key(12345, 6, 1, r) for r in range(3)] + [0, _M32]
        agree = True
        for shape, call, p in (((7, 13), 0, 0.1), ((3, 5, 11), 4, 0.5), ((37,), 9, 0.9)):
            expected = _mask(torch.tensor(keys), call, shape, p, torch.float32, device)
            halves = torch.tensor(_row_halves(keys, call), dtype=torch.int32, device=device)
            got = _mask_int32(halves.reshape(-1, *([1] * len(shape))), _coordinate_halves(shape, device), p,
                              torch.float32)
            agree = agree and torch.equal(got, expected)
        _FAST_MASKS[kind] = agree
    _FAST_MASKS_OF_DEVICE[device] = _FAST_MASKS[kind]
    return _FAST_MASKS[kind]


def attention_math(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, dropout=None):
    """``F.scaled_dot_product_attention`` as softmax(q kᵀ·scale + mask) v; ``dropout(weights)`` applies the
    attention dropout (None: none)."""
    L, S = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scores = (query @ key.transpose(-2, -1)) * scale
    lowest = torch.finfo(scores.dtype).min
    if is_causal:
        allowed = torch.ones(L, S, dtype=torch.bool, device=scores.device).tril(diagonal=S - L)
        scores = scores.masked_fill(~allowed, lowest)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, lowest) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = torch.softmax(scores, dim=-1)
    if dropout is not None:
        weights = dropout(weights)
    return weights @ value


def _sdpa_arguments(args, kwargs) -> dict:
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = dict(zip(names, args))
    bound.update(kwargs)
    return bound


def _dropout_arguments(args, kwargs) -> tuple[torch.Tensor, float, bool]:
    bound = dict(zip(("input", "p", "training", "inplace"), args))
    bound.update(kwargs)
    return bound["input"], float(bound.get("p", 0.5)), bool(bound.get("training", True))


class CoordinateCache:
    """The coordinate halves (:func:`_coordinate_halves`) of the dropout inputs' row shapes, kept across the
    forwards of a run (a model's dropout calls see a few shapes per padded length), least recently used first
    out once they hold more than ``max_bytes``. Read only: the masks are formed in new tensors."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes, self._bytes = int(max_bytes), 0
        self._entries: collections.OrderedDict[tuple, torch.Tensor] = collections.OrderedDict()
        #: per dropout call of the last recorded forward, its (rows, row shape, p, dtype, device) (None: p = 0): a
        #: forward forms the masks of the calls that the last one made alike in one computation (see RecordMode)
        self.last_forward: list[tuple | None] = []

    def get(self, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        where = (shape, device)
        found = self._entries.get(where)
        if found is not None:
            self._entries.move_to_end(where)
            return found
        found = _coordinate_halves(shape, device)
        self._entries[where] = found
        self._bytes += found.numel() * found.element_size()
        while self._bytes > self.max_bytes and len(self._entries) > 1:
            _, dropped = self._entries.popitem(last=False)
            self._bytes -= dropped.numel() * dropped.element_size()
        return found


def _predicted_row(before: tuple, now: tuple, other_before: tuple) -> tuple | None:
    """The row shape a later dropout call will likely have, from the shapes this call and that one had in the last
    forward: each length of this call's last shape replaced by its length now (a padded length, changed from batch
    to batch), as in ``(20, 32) -> (23, 32)`` makes ``(4, 20, 20) -> (4, 23, 23)``; None when the lengths do not map
    one to one. Only a prediction: a mask formed ahead is used only by a call with the shape it was formed for."""
    if len(before) != len(now):
        return None
    lengths: dict[int, int] = {}
    for a, b in zip(before, now):
        if lengths.setdefault(a, b) != b:
            return None
    return tuple(lengths.get(d, d) for d in other_before)


class RecordMode(TorchFunctionMode):
    """Active during one recorded training forward: every ``F.dropout`` (so every ``nn.Dropout``) and
    every SDPA call with dropout draws its mask from the hash of the rows' keys; ``calls`` collects the
    p of each call (0 for an inactive one, which replay must count too). ``coordinates``: a
    :class:`CoordinateCache` shared by the forwards of a run (default: one for this forward)."""

    def __init__(self, keys_of_rows, coordinates: CoordinateCache | None = None):
        super().__init__()
        self._keys_of_rows = keys_of_rows  # batch size → (B,) int64 keys (the batch size is seen at the call)
        self.calls: list[float] = []
        self.batch_size: int | None = None
        self._keys: dict[int, list[int]] = {}  # batch size → the keys as Python ints
        self._coordinates = CoordinateCache() if coordinates is None else coordinates
        self.intercepted = 0  # dropout and SDPA calls seen as the torch-function mode (not through a DropoutRoute)
        # the calls of this forward, (rows, row shape, p, dtype, device) each, and the last forward's: masks formed
        # ahead for later calls, each with the signature it was formed for (used only by a call that has it)
        self._previous, self._signature = self._coordinates.last_forward, []
        self._coordinates.last_forward = self._signature
        self._ready: dict[int, tuple[tuple, torch.Tensor]] = {}

    def _apply(self, x: torch.Tensor, p: float) -> torch.Tensor:
        call = len(self.calls)
        self.calls.append(p)
        if p == 0.0:
            self._signature.append(None)
            return x
        if self.batch_size is None:
            self.batch_size = x.shape[0]
        elif x.shape[0] != self.batch_size:
            raise RecordingError(
                f"dropout call {call} has a leading axis of {x.shape[0]}, earlier ones {self.batch_size}: "
                "recorded dropout needs the batch axis first in every dropout input")
        size, device = x.shape[0], x.device
        signature = (size, x.shape[1:], p, x.dtype, device)  # a torch.Size is a tuple of ints
        self._signature.append(signature)
        if not _fast_masks_agree(device):
            return x * _mask(self._keys_of_rows(size), call, x.shape[1:], p, x.dtype, device)
        ready = self._ready.pop(call, None)
        if ready is not None and ready[0] == signature:
            return x * ready[1]
        if size not in self._keys:
            self._keys[size] = self._keys_of_rows(size).tolist()
        return x * self._masks_from(call, signature)

    def _masks_from(self, call: int, signature: tuple) -> torch.Tensor:
        """The mask of ``call``, formed together with those of the later calls that the last forward made with the
        batch size, p, dtype and device it made ``call`` with, their row shapes predicted by :func:`_predicted_row`
        (kept for them, each with the signature it was formed for; a call whose signature differs from it forms its
        own): the calls of one row shape from one row-by-coordinate XOR each, all of them hashed and thresholded in
        one pass over one buffer. Each mask is the same function of (row keys, call, row shape, p) as when formed
        alone: bit for bit the same."""
        size, shape, p, dtype, device = signature
        previous = self._previous
        by_shape: dict[tuple, list[int]] = {shape: [call]}
        if call < len(previous) and previous[call] is not None:
            before = previous[call]
            for j in range(call + 1, len(previous)):
                other = previous[j]
                if other is not None and other[0] == before[0] and other[2:] == before[2:]:
                    row = _predicted_row(before[1], shape, other[1])
                    if row is not None:
                        by_shape.setdefault(row, []).append(j)
        counts = [len(calls) * size * math.prod(row) for row, calls in by_shape.items()]
        flat = torch.empty(sum(counts), dtype=torch.int32, device=device)
        blocks, offset = [], 0
        for (row, calls), count in zip(by_shape.items(), counts):
            halves = _row_halves_table(self._keys[size], calls).to(device)
            block = flat[offset:offset + count].view(len(calls), size, *row)
            torch.bitwise_xor(halves.view(len(calls), size, *([1] * len(row))), self._coordinates.get(row, device),
                              out=block)
            blocks.append((row, calls, offset, count))
            offset += count
        masks = _mixed_and_thresholded(flat, p, dtype)
        first = None
        for row, calls, offset, count in blocks:
            for j, mask in zip(calls, masks[offset:offset + count].view(len(calls), size, *row)):
                if j == call:
                    first = mask
                else:
                    self._ready[j] = ((size, row, p, dtype, device), mask)
        return first

    def dropout(self, x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
        """An ``F.dropout(x, p, training)`` call of the recorded forward."""
        return self._apply(x, p if training else 0.0)

    def attention(self, args, kwargs) -> torch.Tensor:
        """A ``scaled_dot_product_attention`` call of the recorded forward: torch's own without dropout, else in
        plain tensor operations with the recorded mask on its weights."""
        bound = _sdpa_arguments(args, kwargs)
        p = float(bound.pop("dropout_p", 0.0) or 0.0)
        if p == 0.0:
            self.calls.append(0.0)
            return ORIGINAL_SDPA(**bound)
        return attention_math(**bound, dropout=lambda w: self._apply(w, p))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_dropout(func):
            self.intercepted += 1
            return self.dropout(*_dropout_arguments(args, kwargs))
        if _is_sdpa(func):
            self.intercepted += 1
            return self.attention(args, kwargs)
        return func(*args, **kwargs)


# ---------------------------------------------------------------------- the route: dropout without the mode
#: torch's own functions, as imported before any route is installed
ORIGINAL_DROPOUT = F.dropout
ORIGINAL_SDPA = F.scaled_dot_product_attention
_ROUTE = threading.local()  # .recording: the RecordMode of this thread's recorded forward (None: none)
_ROUTE_LOCK = threading.Lock()
_ROUTES_OPEN = [0]


def _routed_dropout(input, p=0.5, training=True, inplace=False):
    """``torch.nn.functional.dropout`` while a route is installed: the recorded mask in this thread's recorded
    forward, torch's own dropout anywhere else."""
    recording = getattr(_ROUTE, "recording", None)
    if recording is None:
        return ORIGINAL_DROPOUT(input, p, training, inplace)
    return recording.dropout(input, float(p), bool(training))


def _routed_sdpa(*args, **kwargs):
    """``torch.nn.functional.scaled_dot_product_attention`` while a route is installed (as :func:`_routed_dropout`)."""
    recording = getattr(_ROUTE, "recording", None)
    if recording is None:
        return ORIGINAL_SDPA(*args, **kwargs)
    return recording.attention(args, kwargs)


def _is_dropout(func) -> bool:
    """Whether a mode's ``func`` is ``F.dropout``: torch's own, or the routed one (while a route is installed,
    torch's own dropout passes its module's global, the routed function, to the mode)."""
    return func is ORIGINAL_DROPOUT or func is _routed_dropout


def _is_sdpa(func) -> bool:
    """Whether a mode's ``func`` is ``scaled_dot_product_attention`` (torch's own or the routed one)."""
    return func is ORIGINAL_SDPA or func is _routed_sdpa


class DropoutRoute:
    """For one recorded forward: ``torch.nn.functional.dropout`` and ``scaled_dot_product_attention`` (the names
    ``nn.Dropout`` and Hugging Face's attention call them by) lead to ``recording`` without a torch-function mode,
    whose Python hook every tensor operation of the forward pays (1.8 ms of a 6.4 ms forward and backward of a
    2-layer GPT-2). The names are restored when the last open route closes; other threads, and this one outside
    the forward, get torch's own functions through them. A call through another name (``from
    torch.nn.functional import dropout`` before recording, ``torch.dropout``) does not come here:
    :class:`~explaind_math.integrations.watch.ForwardWatch` takes a route alone only once a forward run under
    :class:`RecordMode` as well showed that the mode saw no call the route did not, and refuses a step whose
    routed forward still drew random numbers."""

    def __init__(self, recording: RecordMode):
        self.recording = recording
        self._outer = None

    def __enter__(self) -> "DropoutRoute":
        with _ROUTE_LOCK:
            _ROUTES_OPEN[0] += 1
            if _ROUTES_OPEN[0] == 1:
                F.dropout, F.scaled_dot_product_attention = _routed_dropout, _routed_sdpa
        self._outer = getattr(_ROUTE, "recording", None)
        _ROUTE.recording = self.recording
        return self

    def __exit__(self, *exc) -> None:
        _ROUTE.recording = self._outer
        with _ROUTE_LOCK:
            _ROUTES_OPEN[0] -= 1
            if _ROUTES_OPEN[0] == 0:
                F.dropout, F.scaled_dot_product_attention = ORIGINAL_DROPOUT, ORIGINAL_SDPA


class ReplayMode(TorchFunctionMode):
    """Active during the decomposition's evaluations: SDPA in plain tensor operations (vmap-friendly);
    with ``key`` (one sample's key, a scalar tensor) and ``calls`` (the recorded p per call), each
    dropout call applies that sample's recorded mask whatever the module's training flag (the
    per-sample gradients of a dropout run); without, dropout is what the model does (eval: identity)."""

    def __init__(self, key: torch.Tensor | None = None, calls: Sequence[float] | None = None):
        super().__init__()
        self._key, self._calls, self._count = key, calls, 0

    def _apply(self, x: torch.Tensor) -> torch.Tensor:
        k = self._count
        self._count += 1
        if k >= len(self._calls):
            raise RecordingError(f"the forward pass makes more dropout calls than the {len(self._calls)} recorded")
        p = self._calls[k]
        if p == 0.0:
            return x
        return x * _mask(self._key.reshape(1), k, x.shape[1:], p, x.dtype, x.device)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        replaying = self._key is not None
        if replaying and _is_dropout(func):
            return self._apply(_dropout_arguments(args, kwargs)[0])
        if _is_sdpa(func):
            bound = _sdpa_arguments(args, kwargs)
            p = float(bound.pop("dropout_p", 0.0) or 0.0)
            if replaying:
                return attention_math(**bound, dropout=self._apply)
            if p:
                raise RecordingError("scaled_dot_product_attention with dropout_p > 0 outside a replayed "
                                     "training forward: put the model in eval mode")
            return attention_math(**bound)
        return func(*args, **kwargs)


class DropoutRecord:
    """What a recorded run's dropout needs for replay (in ``trajectory.metadata["dropout"]``): the seed,
    the p of each dropout call of a forward pass, and per step the ids of each micro-batch in row order."""

    def __init__(self, record: dict):
        self.seed = int(record["seed"])
        self.calls = [float(p) for p in record["calls"]]
        self._key_of: dict[int, dict[int, int]] = {}
        for t, micro_batches in record["steps"].items():
            keys = {}
            for m, ids in enumerate(micro_batches):
                for r, i in enumerate(ids):
                    keys[int(i)] = row_key(self.seed, int(t), m, r)
            self._key_of[int(t)] = keys

    def keys(self, step: int, ids: Sequence[int]) -> torch.Tensor:
        """The key of every sample of ``ids`` at step ``step``."""
        keys = self._key_of.get(int(step))
        if keys is None or any(int(i) not in keys for i in ids):
            raise RecordingError(f"step {step}: the dropout record does not hold the masks of every sample")
        return torch.tensor([keys[int(i)] for i in ids], dtype=torch.int64)


def autocast_in_use() -> str | None:
    """The device type and dtype of an active autocast region (None if there is none)."""
    for device_type in ("cpu", "cuda", "mps", "xpu"):
        try:
            if torch.is_autocast_enabled(device_type):
                return f"{device_type} autocast to {torch.get_autocast_dtype(device_type)}"
        except (RuntimeError, TypeError):
            continue
    return None
