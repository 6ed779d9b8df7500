"""The recorder's copies of a step's tensors, laid out flat.

Every ``optimizer.step()`` the recorder copies θ_{t+1}, the ``.grad`` and the optimizer state it records to the
CPU, checks that they are finite, and before the next step checks that θ and the state were not changed in
between. Tensor by tensor that is a Python call per tensor and per check, which on a small model (a 2-layer
GPT-2 has 28 parameter tensors) costs more than the training step's own arithmetic. A :class:`FlatCopy` of a
small total holds the copies in one CPU buffer per (device, dtype): one ``flatten_dense_tensors`` (one transfer
from an accelerator) copies them, one sum settles that all are finite (a NaN or ±Inf entry makes the sum NaN or
±Inf; only a non-finite sum, which overflow can also give, is looked at tensor by tensor), one ``torch.equal``
that a list of tensors still holds the copied values; the per-tensor views the trajectory holds are made when
they are first read. A large total is copied tensor by tensor, where calls cost little against memory traffic.
Everything is exact: the copies hold the tensors' own values, bit for bit.

The parameters and the optimizer state are the same tensors step after step, updated in place. For them a copy made
with ``live_views=True`` keeps numpy views of the live tensors' memory (:class:`LiveViews`), shared along the
``like`` chain, and gathers and compares through them: one ``numpy.concatenate`` in C instead of a torch view and
copy per tensor (for 28 tensors a third of the time in a warm loop; inside the Trainer, where the forward and
backward pushed the data out of the cache, 10–20% less). The views are used only while every tensor keeps the
address, dtype, shape and strides they were made with and has no lazy negation (read each time: a ``p.data = …``
or an in-place resize between steps makes new ones), so they always read the tensor's own memory in its layout.
"""

from __future__ import annotations

import cmath
import math
from typing import Any, Sequence

import numpy as np
import torch

from .trajectory import all_finite, first_non_finite

__all__ = ["FlatCopy", "LiveViews", "cpu_copy", "cpu_scalars", "on_cpu", "stacked_scalars", "step_counts"]


def cpu_copy(t: torch.Tensor) -> torch.Tensor:
    """A detached copy of ``t`` on the CPU (one copy, from any device)."""
    return t.detach().clone() if t.device.type == "cpu" else t.detach().cpu()


def on_cpu(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself on the CPU (no copy), else a CPU copy: for comparisons."""
    return t if t.device.type == "cpu" else t.detach().cpu()


#: above this many elements in all, copies and comparisons go tensor by tensor: a gathered buffer is slower to form
#: there, and the one a comparison gathers (past glibc's mmap threshold, 128 KiB) would be new pages every step
GATHERED_COMPARISON_LIMIT = 1 << 15

_CPU = torch.device("cpu")


class LiveViews:
    """Flat numpy views of a list of CPU tensors of one dtype, each contiguous, over the tensors' own memory (by
    address: the views neither hold the storages nor mark them unresizable, as ``Tensor.numpy()`` would), with a
    scratch buffer for comparisons. Every use reads each tensor's address, dtype, shape and strides first and makes
    the views again when one differs, and uses none while a tensor carries a lazy negation or conjugation, so a view
    only ever reads memory the tensor holds at that moment, in its layout."""

    __slots__ = ("_key", "arrays", "dtypes", "shapes", "scratch")

    def __init__(self):
        self._key: list | None = None
        self.arrays: list[np.ndarray] | None = None  # None: the tensors have no such views (not CPU, bf16, strided)
        self.dtypes: tuple = ()
        self.shapes: tuple = ()
        self.scratch: np.ndarray | None = None

    def of(self, tensors: Sequence[Any]) -> list[np.ndarray] | None:
        """The views of ``tensors`` (None: they have none)."""
        try:
            key = [(t.data_ptr(), t.dtype, t.shape, t.stride()) for t in tensors]
        except (AttributeError, RuntimeError, TypeError):  # not a tensor; a sparse one
            return None
        if key != self._key:
            self._key, self.arrays = key, _flat_host_arrays(tensors)
            self.dtypes, self.shapes = tuple(k[1] for k in key), tuple(k[2] for k in key)
            self.scratch = np.empty(sum(a.size for a in self.arrays), self.arrays[0].dtype) if self.arrays else None
        if self.arrays is None or any(map(torch.Tensor.is_neg, tensors)) or any(map(torch.Tensor.is_conj, tensors)):
            return None  # (a lazy negation, `p.data = p.data._neg_view()`, keeps address and layout)
        return self.arrays


#: the dtypes numpy reads as they are in memory
_NUMPY_DTYPES = {torch.float16: np.float16, torch.float32: np.float32, torch.float64: np.float64,
                 torch.complex64: np.complex64, torch.complex128: np.complex128, torch.int8: np.int8,
                 torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64, torch.uint8: np.uint8,
                 torch.bool: np.bool_}


class _Memory:
    """``numel`` elements of ``dtype`` at address ``pointer``, read only, as numpy's array interface describes them."""

    __slots__ = ("__array_interface__",)

    def __init__(self, pointer: int, numel: int, dtype: np.dtype):
        self.__array_interface__ = {"data": (pointer, True), "shape": (numel,), "typestr": dtype.str, "version": 3}


def _flat_host_arrays(tensors: Sequence[torch.Tensor]) -> list[np.ndarray] | None:
    """A 1-d numpy view of each tensor's memory (None unless all are contiguous, strided, plain CPU tensors of one
    dtype numpy has, together within :data:`GATHERED_COMPARISON_LIMIT` elements, where copies are gathered)."""
    if not tensors or sum(t.numel() for t in tensors) > GATHERED_COMPARISON_LIMIT:
        return None
    dtype = _NUMPY_DTYPES.get(tensors[0].dtype)
    if dtype is None:  # bfloat16, quantized
        return None
    dtype = np.dtype(dtype)
    arrays = []
    for t in tensors:
        if (type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type != "cpu" or t.dtype != tensors[0].dtype
                or t.layout != torch.strided or not t.is_contiguous() or (t.numel() and not t.data_ptr())):
            return None
        arrays.append(np.asarray(_Memory(t.data_ptr(), t.numel(), dtype)) if t.numel() else np.empty(0, dtype))
    return arrays


class FlatCopy:
    """CPU copies of ``tensors`` (all ``torch.Tensor``): up to :data:`GATHERED_COMPARISON_LIMIT` elements in one
    buffer per (device, dtype) group, gathered in one call per group (``flatten_dense_tensors``: the concatenation
    of the flattened tensors, formed in C++); above it, a copy per tensor."""

    __slots__ = ("shapes", "dtypes", "_groups", "_buffers", "_views", "_live", "_host")

    def __init__(self, tensors: Sequence[torch.Tensor], like: "FlatCopy | None" = None, live_views: bool = False):
        """``like``: an earlier copy (the last step's); when it has the same layout, this one shares its shapes, dtypes
        and groups, so that a step keeps no new Python objects for them (a memory-mode record keeps every step's
        copies, and what they keep the garbage collector traverses again and again). ``live_views``: ``tensors``
        are long-lived tensors updated in place (θ, the optimizer state): gather them, and compare with them,
        through :class:`LiveViews` (shared with ``like``'s)."""
        live = like._live if like is not None else None
        live = self._live = (live if live is not None else LiveViews()) if live_views else None
        arrays = live.of(tensors) if live is not None else None
        if arrays is not None:  # their layout, read with the views
            shapes, dtypes = live.shapes, live.dtypes
        else:
            shapes, dtypes = tuple(t.shape for t in tensors), tuple(t.dtype for t in tensors)
        if like is not None and like.shapes == shapes and like.dtypes == dtypes:
            shapes, dtypes = like.shapes, like.dtypes
        else:
            like = None
        self.shapes, self.dtypes = shapes, dtypes
        self._buffers: tuple[torch.Tensor, ...] = ()
        self._views: list[torch.Tensor] | None = None
        self._host: np.ndarray | None = None  # the one buffer as numpy has it (_host_buffer)
        if arrays is None and sum(s.numel() for s in shapes) > GATHERED_COMPARISON_LIMIT:  # (views: within it)
            # large: a copy per tensor (a gathered one is slower to form there, and calls cost little)
            self._groups = ()
            self._views = [cpu_copy(t) for t in tensors]
            return
        if arrays is not None:  # one dtype, on the CPU: one group, gathered by numpy
            key = (_CPU, dtypes[0])
            same = like is not None and len(like._groups) == 1 and like._groups[0][0] == key
            self._groups = like._groups if same else ((key, range(len(tensors))),)
            self._host = np.concatenate(arrays)
            self._buffers = (torch.from_numpy(self._host),)
        elif dtypes and dtypes.count(dtypes[0]) == len(dtypes):
            try:  # one dtype, and (unless this raises) one device: one group
                flat = _gathered(tensors, copy=True)
                key = (flat.device, dtypes[0])
                same = like is not None and len(like._groups) == 1 and like._groups[0][0] == key
                self._groups = like._groups if same else ((key, range(len(tensors))),)
                self._buffers = (on_cpu(flat),)
            except RuntimeError:
                self._buffers = ()
        if not self._buffers:
            self._groups = _groups(dtypes, [t.device for t in tensors])
            self._buffers = tuple(on_cpu(_gathered([tensors[i] for i in indices], copy=True))
                                  for _, indices in self._groups)

    @classmethod
    def over(cls, tensors: Sequence[torch.Tensor]) -> "FlatCopy":
        """The CPU ``tensors`` themselves in the place of a copy (no copy; they must not change while it is used):
        the rerun's θ_{t+1}, equal to the live one bit for bit, against which the next step compares."""
        copy = cls.__new__(cls)
        copy.shapes, copy.dtypes = tuple(t.shape for t in tensors), tuple(t.dtype for t in tensors)
        copy._groups, copy._buffers, copy._views, copy._live, copy._host = (), (), list(tensors), None, None
        return copy

    def refill(self, tensors: Sequence[torch.Tensor]) -> "FlatCopy":
        """This copy written again with ``tensors`` when they have its dtypes and shapes (its buffers reused: no new
        memory; only for a copy whose views were handed to nobody), else a new copy."""
        arrays = self._live_arrays(tensors)
        if arrays is not None:
            np.concatenate(arrays, out=self._host_buffer())
            return self
        if len(tensors) == len(self.shapes) and len(self._groups) <= 1 and _same_layout(tensors, self):
            try:
                with torch.no_grad():
                    torch._foreach_copy_(self.views(), list(tensors))
                return self
            except RuntimeError:
                pass
        return FlatCopy(tensors, like=self, live_views=self._live is not None)

    def _live_arrays(self, tensors: Sequence[Any]) -> list[np.ndarray] | None:
        """The live views of ``tensors`` when this copy has them and they have its layout, in one buffer (None: the
        torch path)."""
        live = self._live
        if live is None or len(self._groups) != 1 or live.of(tensors) is None:
            return None
        return live.arrays if (live.dtypes, live.shapes) == (self.dtypes, self.shapes) else None

    def _host_buffer(self) -> np.ndarray:
        """The one buffer as a numpy array (kept once made)."""
        if self._host is None:
            self._host = self._buffers[0].numpy()
        return self._host

    def views(self) -> list[torch.Tensor]:
        """The copy of each tensor (views of the buffers; made once, when first asked for)."""
        if self._views is None:
            views: list[Any] = [None] * len(self.shapes)
            for (_, indices), buffer in zip(self._groups, self._buffers):
                parts = buffer.split([self.shapes[i].numel() for i in indices])
                for i, part in zip(indices, parts):
                    views[i] = part.view(self.shapes[i])
            self._views = views
        return self._views

    def first_non_finite(self) -> int | None:
        """The position of the first copied tensor with a NaN or ±Inf entry (None: all finite)."""
        if not self._groups and self._views:  # a copy per tensor
            return first_non_finite(self._views)
        bad = []
        for (_, indices), buffer in zip(self._groups, self._buffers):
            if (buffer.is_floating_point() or buffer.is_complex()) and not _finite(buffer.sum().item()):
                views = self.views()
                bad += [i for i in indices if not all_finite(views[i])]
        return min(bad, default=None)

    def first_difference(self, tensors: Sequence[Any]) -> int | None:
        """The position of the first of ``tensors`` that is not a tensor of its copy's shape and dtype holding its
        values exactly (None: all hold them)."""
        arrays = self._live_arrays(tensors)
        if arrays is not None:
            if np.array_equal(np.concatenate(arrays, out=self._live.scratch), self._host_buffer()):
                return None
        elif len(tensors) == len(self.shapes) and len(self._groups) <= 1 and _same_layout(tensors, self):
            try:  # a tensor on another device than the rest raises: then one by one
                if self._buffers:
                    if torch.equal(on_cpu(_gathered(tensors, copy=False)), self._buffers[0]):
                        return None
                elif all(map(torch.equal, tensors, self.views())):
                    return None
            except RuntimeError:
                pass
        for i, (t, copy) in enumerate(zip(tensors, self.views())):
            if not (isinstance(t, torch.Tensor) and t.shape == copy.shape and t.dtype == copy.dtype
                    and torch.equal(on_cpu(t), copy)):
                return i
        return None if len(tensors) == len(self.shapes) else min(len(tensors), len(self.shapes))


def _finite(total: complex | float) -> bool:
    """Whether a sum read back (a Python number) is finite."""
    return cmath.isfinite(total) if isinstance(total, complex) else math.isfinite(total)


def _gathered(tensors: Sequence[torch.Tensor], copy: bool) -> torch.Tensor:
    """The tensors (one dtype and device) flattened and concatenated, detached; ``copy``: never a view of one of
    them (one tensor alone is flattened without a copy)."""
    with torch.no_grad():
        if len(tensors) == 1:
            flat = tensors[0].detach().reshape(-1)
            return flat.clone() if copy else flat
        return torch._C._nn.flatten_dense_tensors(list(tensors)) if tensors else torch.empty(0)


def _same_layout(tensors: Sequence[Any], copy: FlatCopy) -> bool:
    """Whether ``tensors`` are tensors of the copy's dtypes and shapes."""
    try:
        return tuple(t.dtype for t in tensors) == copy.dtypes and tuple(t.shape for t in tensors) == copy.shapes
    except AttributeError:  # not a tensor
        return False


def _groups(dtypes: Sequence, devices: Sequence) -> tuple[tuple[tuple, tuple[int, ...]], ...]:
    """The positions of the tensors of each (device, dtype), in order of first appearance."""
    if not dtypes:
        return ()
    if dtypes.count(dtypes[0]) == len(dtypes) and devices.count(devices[0]) == len(devices):
        return (((devices[0], dtypes[0]), range(len(dtypes))),)
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(zip(devices, dtypes)):
        groups.setdefault(key, []).append(i)
    return tuple((key, tuple(indices)) for key, indices in groups.items())


def stacked_scalars(values: Sequence[Any]) -> torch.Tensor | None:
    """0-dim CPU tensors of one dtype (the step counts) stacked into one tensor, one read-back for all (None: they
    are not)."""
    try:
        stacked = torch.stack(list(values))
    except (TypeError, RuntimeError):
        return None
    if stacked.shape != (len(values),) or stacked.device.type != "cpu" or stacked.requires_grad:
        return None
    return stacked if all(v.dtype == stacked.dtype for v in values) else None


def cpu_scalars(values: Sequence[Any]) -> list | None:
    """The Python numbers of 0-dim CPU tensors (an ``item()`` each, a read of host memory: cheaper than stacking
    them), None when some value is not one."""
    try:
        if all(v.is_cpu and v.ndim == 0 for v in values):
            return [v.item() for v in values]
    except AttributeError:  # not a tensor
        pass
    return None


def step_counts(values: Sequence[Any]) -> list[int]:
    """``int`` of every step count (0-dim CPU tensors read one by one, others on a device read back in one
    ``tolist``; Python numbers as they are)."""
    read = cpu_scalars(values)
    if read is not None:
        return [int(v) for v in read]
    stacked = stacked_scalars(values) if values else None
    if stacked is not None:
        return [int(v) for v in stacked.tolist()]
    return [int(v.item() if hasattr(v, "item") else v) for v in values]
