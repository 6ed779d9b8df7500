"""The record-time checks of :class:`~explaind_math.TrajectoryRecorder`: everything that would make a
recorded step unreadable, or its decomposition silently wrong, is refused at the step, before it happens.

* the sample ids and weights given to ``record_batch`` (1-D integers, finite weights; a repeated id,
  as sampling with replacement gives, is merged into one unit whose weight is the sum);
* the param groups (``optimizer.add_param_group`` mid-run is refused at the next step, which does not
  happen; the steps before stay readable);
* the state the forward reads besides the trained parameters (:class:`ForwardState`): buffers,
  non-persistent buffers, frozen parameters, and plain scalar attributes of the modules (a
  temperature), recorded once and compared at every step;
* the optimizer state between steps (:class:`OptimizerStateWatch`): a ``load_state_dict`` or a zeroed
  moment between two steps is refused, naming the parameter and the state;
* modules whose samples interact or that draw random numbers: :mod:`explaind_math.recording_probe`.
"""

from __future__ import annotations

import numbers
import operator
from typing import Any, Iterable, Mapping, NamedTuple, Sequence

import torch
from torch import nn

from .errors import NonFiniteError, RecordingError, StochasticTrainingError
from .recording_copies import FlatCopy, cpu_copy, cpu_scalars, on_cpu, stacked_scalars
from .trajectory import all_finite, weights_for

__all__ = [
    "ForwardState",
    "ModuleTree",
    "OptimizerStateWatch",
    "batch_ids",
    "batch_weights",
    "check_param_groups",
    "check_recording_options",
    "cpu_copy",
    "on_cpu",
]


# ---------------------------------------------------------------------- record_batch's arguments
def batch_ids(ids: Any) -> list[int]:
    """The sample ids of ``record_batch`` as Python ints: a 1-D integer tensor/array or a sequence of ints.
    Anything else (shape (B, 1), floats, bools, strings) is a :class:`RecordingError` naming ``ids``."""
    if hasattr(ids, "shape") and hasattr(ids, "dtype"):  # a tensor or a numpy array
        t = torch.as_tensor(ids)
        if t.dim() != 1:
            raise RecordingError(
                f"record_batch: ids must be a 1-D sequence of sample ids, got a tensor of shape {tuple(t.shape)}"
                + ("; pass ids.reshape(-1)" if t.dim() > 1 and t.numel() == t.shape[0] else "")
            )
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise RecordingError(f"record_batch: ids must be integers, got a tensor of dtype {t.dtype}")
        return [int(i) for i in t.tolist()]
    if isinstance(ids, (str, bytes, Mapping)) or not isinstance(ids, Iterable):
        raise RecordingError(f"record_batch: ids must be a 1-D sequence of sample ids, got {type(ids).__name__}")
    out = []
    for k, i in enumerate(ids):
        if isinstance(i, torch.Tensor) and i.dim() == 0 and not (i.is_floating_point() or i.dtype == torch.bool):
            i = int(i)
        if isinstance(i, bool) or not isinstance(i, numbers.Integral):
            raise RecordingError(
                f"record_batch: ids must be integers; ids[{k}] is {i!r} ({type(i).__name__})"
            )
        out.append(int(i))
    return out


def batch_weights(ids: Sequence[int], weights: Any, reduction: str) -> torch.Tensor:
    """w_{t,i} of one ``record_batch`` call (float64), refused when not finite."""
    if weights is not None:
        w = torch.as_tensor(weights, dtype=torch.float64)
        if w.dim() > 1 and w.numel() != w.shape[0]:
            raise RecordingError(f"record_batch: weights must be 1-D (one per id), got shape {tuple(w.shape)}")
    w = weights_for(ids, weights, reduction)
    if not all_finite(w):
        bad = [k for k, v in enumerate(w.tolist()) if v != v or v in (float("inf"), float("-inf"))]
        raise NonFiniteError(f"record_batch: weights at positions {bad[:8]} are NaN or Inf")
    return w


# ---------------------------------------------------------------------- param groups
def check_recording_options(gradient_rescaling: bool, record_gradients: bool, rerun_optimizer: bool | str,
                            directory: Any) -> None:
    """Refuse recorder options that need one another, naming the one missing."""
    if gradient_rescaling and not record_gradients:
        raise RecordingError("gradient_rescaling=True needs record_gradients=True (c_t is read off the gradients)")
    if not (isinstance(rerun_optimizer, bool) or rerun_optimizer == "auto"):
        raise RecordingError(f"rerun_optimizer must be True, False or 'auto', got {rerun_optimizer!r}")
    if rerun_optimizer is True and (directory is not None or not record_gradients):
        raise RecordingError("rerun_optimizer=True keeps a step by its recorded .grad, in memory: it needs "
                             "record_gradients=True and no directory (a directory is written step by step)")


def check_param_groups(optimizer: torch.optim.Optimizer, recorded: Sequence[tuple[str, torch.Tensor, int]],
                       where: str) -> None:
    """The optimizer's param groups must hold exactly the parameters recorded, in the recorded groups:
    a group added by ``optimizer.add_param_group`` (or a parameter moved) is refused before the step."""
    groups = optimizer.param_groups
    expected = max((gi for _, _, gi in recorded), default=-1) + 1
    now = {id(p): gi for gi, g in enumerate(groups) for p in g["params"]}
    moved = [n for n, p, gi in recorded if now.get(id(p)) != gi]
    if len(groups) != expected or len(now) != len(recorded) or moved:
        raise RecordingError(
            f"{where}: the optimizer now has {len(groups)} param groups holding {len(now)} parameters; recording "
            f"started with {expected} groups holding {len(recorded)}"
            + (f" (parameters {moved[:5]} left their group)" if moved else "")
            + ". optimizer.add_param_group mid-run is not supported: this step did not happen (model and "
            "optimizer are as before it) and the steps before it are kept (recorder.trajectory()); to train the "
            "new parameters, start a new recorder (a new trajectory) with the optimizer as it is now"
        )


# ---------------------------------------------------------------------- state the forward reads
_SCALAR_TYPES = (bool, int, float, str, type(None))


def _module_scalars(module: nn.Module) -> dict[str, Any]:
    """One module's own public scalar attributes (numbers, strings, None), e.g. a softmax temperature."""
    out = {key: value for key, value in vars(module).items()  # the name first: most of a module's are private
           if key[:1] != "_" and (type(value) in _SCALAR_TYPES or isinstance(value, (numbers.Number, str)))}
    out.pop("training", None)
    return out


def _plain_attributes(model: nn.Module, modules: Sequence[tuple[str, nn.Module]] | None = None) -> dict[str, Any]:
    """Scalar attributes of every module, named ``prefix.key``."""
    out = {}
    for prefix, module in (model.named_modules() if modules is None else modules):
        for key, value in _module_scalars(module).items():
            out[f"{prefix}.{key}" if prefix else key] = value
    return out


def _named_buffers(modules: Sequence[tuple[str, nn.Module]]) -> dict[str, torch.Tensor]:
    """``dict(model.named_buffers())`` from the model's ``named_modules()`` list (a buffer shared by two modules
    is named once, by the first), without walking the module tree again."""
    out, seen = {}, set()
    for prefix, module in modules:
        for name, b in module._buffers.items():
            if b is None or id(b) in seen:
                continue
            seen.add(id(b))
            out[f"{prefix}.{name}" if prefix else name] = b
    return out


_CHECKED_KINDS = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd, nn.MultiheadAttention)


class ModuleTree:
    """``list(model.named_modules())``, walked again only when the tree changed: each module's class and children
    (names, and the objects by identity) are compared with those the last walk saw, a dict per module, instead of the
    recursive walk, whose generators and prefix strings cost more than a small model's checks themselves. A tree with
    a module whose class overrides ``named_modules`` (it may list modules outside ``_modules``) is walked every time.
    Read only: callers iterate."""

    def __init__(self, model: nn.Module):
        self.model = model
        self._walk()

    def _walk(self) -> None:
        self._named = list(self.model.named_modules())
        self._children = [(module, type(module), tuple(module._modules), tuple(module._modules.values()))
                          for _, module in self._named]
        self._walk_always = any(kind.named_modules is not nn.Module.named_modules for _, kind, _, _ in self._children)
        self._batch_or_random = [(name, module) for name, module in self._named if isinstance(module, _CHECKED_KINDS)]

    def _unchanged(self) -> bool:
        for module, kind, names, children in self._children:
            now = module._modules
            if type(module) is not kind or len(now) != len(names):
                return False
            if names and (tuple(now) != names or any(a is not b for a, b in zip(now.values(), children))):
                return False
        return True

    def named_modules(self) -> list[tuple[str, nn.Module]]:
        """The model's ``named_modules()`` now."""
        if self._walk_always or not self._unchanged():
            self._walk()
        return self._named

    def named_batch_or_random(self) -> list[tuple[str, nn.Module]]:
        """Of the modules of the last :meth:`named_modules`, the BatchNorm, dropout and ``MultiheadAttention``
        ones: all that :func:`~explaind_math.recording.check_deterministic_modules` and
        :func:`~explaind_math.recording_probe.check_batch_coupled_modules` refuse."""
        return self._batch_or_random


class ForwardState:
    """What the forward reads besides the trained parameters, recorded once: buffers (persistent or
    not), frozen parameters (not in the optimizer) and plain scalar module attributes."""

    def __init__(self, model: nn.Module, trained: Iterable[torch.Tensor], *, attributes: bool = True):
        trained_ids = {id(p) for p in trained}
        self.tree = ModuleTree(model)  # the module list of every step's checks
        modules = self.tree.named_modules()
        self.tensors = {n: cpu_copy(b) for n, b in _named_buffers(modules).items()}  # named as check() names them
        self.frozen = [n for n, p in model.named_parameters() if id(p) not in trained_ids]
        for n, p in model.named_parameters():
            if id(p) not in trained_ids:
                self.tensors[n] = cpu_copy(p)
        self.check_attributes = attributes
        self.attributes = _plain_attributes(model, modules) if attributes else {}
        # per module, its own scalar attributes: compared module by module while the module tree is the one
        # recorded (the flat, named comparison only when it changed or an attribute differs)
        self._per_module = [(module, _module_scalars(module)) for _, module in modules] if attributes else []
        self._signature = _attribute_signature(modules) if attributes else None

    def check(self, model: nn.Module, where: str, modules: Sequence[tuple[str, nn.Module]] | None = None) -> None:
        """Raise naming the first buffer, frozen parameter or attribute that differs from the recorded one
        (``modules``: ``list(model.named_modules())``, when the caller has it)."""
        modules = list(model.named_modules()) if modules is None else modules
        current = _named_buffers(modules)
        if self.frozen:
            current.update({n: p for n, p in model.named_parameters() if n in self.frozen})
        if current.keys() != self.tensors.keys():
            n = sorted(set(current) ^ set(self.tensors))[0]
            raise StochasticTrainingError(f"{where}: buffer or frozen parameter {n!r} appeared or disappeared "
                                          "since recording started")
        for n, b in current.items():
            if not torch.equal(on_cpu(b), self.tensors[n]):
                if n in self.frozen:
                    raise RecordingError(
                        f"{where}: frozen parameter {n!r} (not in the optimizer) changed since recording started; "
                        "the decomposition needs everything outside the optimizer fixed: put it in the optimizer "
                        "(lr 0 keeps it fixed) or do not edit it"
                    )
                raise StochasticTrainingError(
                    f"{where}: buffer {n!r} changed during training (a BatchNorm running statistic?); "
                    "the decomposition needs a model whose buffers stay fixed"
                )
        if self.check_attributes and not self._same_attributes(modules):
            self._raise_changed_attribute(model, modules, where)

    def _same_attributes(self, modules: Sequence[tuple[str, nn.Module]]) -> bool:
        if _same_signature(modules, self._signature):
            return True
        if len(modules) != len(self._per_module):
            return False
        same = all(module is recorded and _module_scalars(module) == attributes
                   for (_, module), (recorded, attributes) in zip(modules, self._per_module))
        if same:  # only something the attributes compared do not depend on changed: the signature from now on
            self._signature = _attribute_signature(modules)
        return same

    def _raise_changed_attribute(self, model: nn.Module, modules, where: str) -> None:
        now = _plain_attributes(model, modules)
        for key in sorted(set(now) | set(self.attributes)):
            if now.get(key, "<absent>") != self.attributes.get(key, "<absent>"):
                raise RecordingError(
                    f"{where}: module attribute {key!r} changed from {self.attributes.get(key, '<absent>')!r} to "
                    f"{now.get(key, '<absent>')!r} since recording started; the forward must stay the same function "
                    "of θ during training (check_modules=False skips this check, for an attribute the forward does "
                    "not read)"
                )
        # the same named attributes in a rebuilt module tree: what is compared from now on
        self._per_module = [(module, _module_scalars(module)) for _, module in modules]
        self._signature = _attribute_signature(modules)


def _is_scalar(value: Any) -> bool:
    return type(value) in _SCALAR_TYPES or isinstance(value, (numbers.Number, str))


def _attribute_signature(modules: Sequence[tuple[str, nn.Module]]) -> tuple:
    """What a quick check of the modules' scalar attributes compares: the list of modules given, the modules, the
    ``__dict__`` of each, the keys of each in order, and each public attribute with its type, value and whether it is a
    scalar."""
    mods = [module for _, module in modules]
    dicts = list(map(vars, mods))
    items = [(d, key, type(value), value, _is_scalar(value)) for d in dicts
             for key, value in d.items() if key[:1] != "_" and key != "training"]
    return modules, mods, dicts, list(map(tuple, dicts)), items


def _same_signature(modules: Sequence[tuple[str, nn.Module]], signature) -> bool:
    """Whether the modules are those of ``signature`` with the same ``__dict__`` (the object, and its keys), every
    public attribute of the same type, the scalars equal and the others the same objects: then every module's
    :func:`_module_scalars` is the one recorded (False says nothing: the full comparison decides)."""
    if signature is None:
        return False
    named, mods, dicts, keys, items = signature
    if modules is not named and (len(modules) != len(mods)
                                 or any(module is not recorded for (_, module), recorded in zip(modules, mods))):
        return False  # (the very list the signature was made from: a ModuleTree's, unchanged)
    if not all(map(operator.is_, map(vars, mods), dicts)) or list(map(tuple, dicts)) != keys:
        return False
    return all(type(now := d[key]) is kind and (now is value or (scalar and now == value))
               for d, key, kind, value, scalar in items)


# ---------------------------------------------------------------------- optimizer state between steps
def compared_by_copy(v: torch.Tensor) -> bool:
    """A state tensor on the CPU is compared with a copy; elsewhere by its fingerprint."""
    return v.device.type == "cpu"


def _device_fingerprints(tensors: Sequence[torch.Tensor]) -> list[tuple[float, float]]:
    """(Σv, Σv²) in float64 of every tensor, formed on its device and read back in one transfer."""
    if not tensors:
        return []
    sums = [torch.stack([v.detach().double().sum(), v.detach().double().square().sum()]).cpu() for v in tensors]
    return [tuple(x.tolist()) for x in torch.stack(sums)]


_NO_STATE: Mapping[str, Any] = {}  # (read only)


class OptimizerStateWatch:
    """The optimizer state after each step, compared before the next: the state may only change inside
    ``optimizer.step()``. The state tensors on the CPU are compared exactly with copies taken after the step (the
    step's record, :class:`~explaind_math.recording_copies.FlatCopy`, for those it records; the watch's own, in a
    buffer written again every step, for the others: Adam's first moment, which the decomposition unrolls instead of
    recording); those on an accelerator by their fingerprints (Σv, Σv²), read back in one transfer (no D-sized copy
    per step); scalars (the step count) by value. Entries are kept as slots (parameter index, key)."""

    def __init__(self):
        self._params: list[tuple[str, torch.Tensor]] | None = None  # the parameters of the last step taken
        self._keys: list[tuple] = []  # per parameter, its state's keys in their order
        self._recorded: tuple[list, FlatCopy] | None = None  # slots compared with the step's record
        self._own: tuple[list, FlatCopy] | None = None  # slots compared with the watch's own copy
        self._scalars: tuple[list, Any] = ([], [])  # slots, their values (a stacked tensor or a list)
        self._fingerprinted: list[tuple[int, str, tuple]] = []  # accelerator tensors: (parameter, key, (Σv, Σv²))
        self._layout: tuple[list, list, list] | None = None  # the last step's slots: copied, scalar, on a device
        self._plan: tuple | None = None  # (copied slots, recorded slots, a record given, own slots, split)
        self._group_ids: list | None = None  # the ids in each param group when check_param_groups last passed
        self._grouped: Sequence | None = None  # the recorded parameters it passed with
        self._entries: tuple | None = None  # the layout of entries_after_step, kept while it stays the same

    def record(self, optimizer, params, recorded_slots: Sequence[tuple[int, str]] = (),
               recorded: FlatCopy | None = None, states: Sequence[Mapping] | None = None) -> None:
        """Take the state after a step; ``recorded``: the step's copies of the state tensors at ``recorded_slots``
        (parameter index, key), compared with them before the next step; the other CPU state tensors are copied
        by the watch. With the keys of the last step, their slots are taken as they were then. ``states``: each
        parameter's ``optimizer.state`` entry, when the caller has read them after the step."""
        if states is None:
            states = [optimizer.state.get(p, _NO_STATE) for _, p, _ in params]
        keys = [tuple(st) for st in states]
        if not (keys == self._keys and self._layout is not None and self._take(states, *self._layout, recorded_slots,
                                                                                 recorded)):
            self._layout = _classify(states)
            self._take(states, *self._layout, recorded_slots, recorded, strict=True)
        self._params = [(name, p) for name, p, _ in params]
        self._keys = keys

    def _take(self, states, copied, scalars, on_device, recorded_slots, recorded, strict: bool = False) -> bool:
        """Take the state at the given slots; False (nothing taken) when a value no longer fits its slot's kind."""
        try:
            plan = self._plan  # the split of the copied slots, kept while the slots stay those of the last step
            given = recorded is not None
            if plan is None or plan[0] is not copied or plan[1] != recorded_slots or plan[2] != given:
                skip = set(recorded_slots)
                split = given and bool(skip) and skip <= set(copied)
                mine = [slot for slot in copied if slot not in skip] if split else copied
                plan = self._plan = (copied, list(recorded_slots), given, mine, split)
            _, kept_slots, _, mine, split = plan
            kept_recorded = (kept_slots, recorded) if split else None
            old = self._own[1] if self._own is not None else None  # compared before this step: written again
            tensors = [states[i][k] for i, k in mine]
            own = (mine, FlatCopy(tensors, live_views=True) if old is None else old.refill(tensors)) if mine else None
            values = _scalar_values([states[i][k] for i, k in scalars], strict)
            device_tensors = [states[i][k] for i, k in on_device]
            if not strict and not all(isinstance(v, torch.Tensor) and v.dim() > 0 and not compared_by_copy(v)
                                      for v in device_tensors):
                return False
        except (AttributeError, TypeError, RuntimeError, ValueError):
            if strict:
                raise
            return False
        if values is None:
            return False
        fingerprints = _device_fingerprints(device_tensors)
        self._recorded, self._own, self._scalars = kept_recorded, own, (scalars, values)
        self._fingerprinted = [(i, k, f) for (i, k), f in zip(on_device, fingerprints)]
        return True

    def forget(self) -> None:
        self._params = None

    def entries_after_step(self, optimizer, params, updated: Sequence[str], keys_of_group: Sequence[tuple]):
        """After a step: each parameter's ``optimizer.state`` entry (``params``: the recorder's (name, tensor, group)),
        and of the ``updated`` parameters the names with a step count, those counts, the slots (parameter index,
        key) of the state the step records with their (name, key) and their tensors. The layout is made again only
        when ``updated`` (the list object), the keys recorded or any state's keys differ from the last step's."""
        states = [optimizer.state.get(p, _NO_STATE) for _, p, _ in params]
        keys, layout = list(map(tuple, states)), self._entries
        if layout is None or layout[0] is not updated or layout[1] != keys_of_group or layout[2] != keys:
            chosen, counted, slots = set(updated), [], []
            for index, ((name, _, group), st) in enumerate(zip(params, states)):
                if name in chosen:
                    counted += [(name, index)] if "step" in st else []
                    slots += [(index, key) for key in keys_of_group[group]]
            names = [(params[index][0], key) for index, key in slots]
            layout = self._entries = (updated, list(keys_of_group), keys, [n for n, _ in counted],
                                      [i for _, i in counted], slots, names)
        _, _, _, counted, counted_at, slots, names = layout
        return (states, counted, [states[i]["step"] for i in counted_at], slots, names,
                [states[i][k] for i, k in slots])

    def check_param_groups(self, optimizer, recorded: Sequence[tuple[str, torch.Tensor, int]], where: str) -> None:
        """:func:`check_param_groups`, skipped while every group holds the very tensors (by ``id``: the recorded
        parameters are alive, so an ``id`` seen is theirs) it held when the check last passed."""
        ids = [list(map(id, group["params"])) for group in optimizer.param_groups]
        if ids != self._group_ids or recorded is not self._grouped:
            check_param_groups(optimizer, recorded, where)
            self._group_ids, self._grouped = ids, recorded

    def check(self, optimizer, params, where: str) -> None:
        """Raise naming the first state entry (by parameter, then key) that differs from the one taken after the
        last step."""
        if self._params is None:
            return
        now = [optimizer.state.get(p, _NO_STATE) for _, p in self._params]
        changed = [] if list(map(tuple, now)) == self._keys else [  # keys added or removed (a new order: no change)
            (index, key) for index, (st, keys) in enumerate(zip(now, self._keys)) if tuple(st) != keys
            for key in set(st) ^ set(keys)]
        if not changed:
            for kept in (self._recorded, self._own):
                if kept is not None:
                    slots, copy = kept
                    bad = copy.first_difference([now[i][k] for i, k in slots])
                    if bad is not None:
                        changed.append(slots[bad])
            slots, values = self._scalars
            current = [now[i][k] for i, k in slots]
            if not _same_scalars(current, values):
                changed += [slot for slot, v, before in zip(slots, current, _scalar_list(values))
                            if (isinstance(v, torch.Tensor) and v.dim() > 0) or _scalar(v) != before]
            live = [(i, k, f) for i, k, f in self._fingerprinted
                    if isinstance(now[i][k], torch.Tensor) and now[i][k].dim() > 0]
            changed += [(i, k) for i, k, _ in self._fingerprinted
                        if not (isinstance(now[i][k], torch.Tensor) and now[i][k].dim() > 0)]
            fingerprints = _device_fingerprints([now[i][k] for i, k, _ in live])
            changed += [(i, k) for (i, k, before), after in zip(live, fingerprints) if before != after]
        if changed:
            index, key = min(changed, key=lambda c: (c[0], str(c[1])))
            name = self._params[index][0]
            raise RecordingError(
                f"{where}: the optimizer state {key!r} of parameter {name!r} changed since the last "
                "optimizer.step() (optimizer.load_state_dict, or a state edited by hand, mid-run?); the "
                "state may only change inside optimizer.step(). Restore it, or start a new recorder"
            )


def _classify(states: Sequence[Mapping[str, Any]]) -> tuple[list, list, list]:
    """The slots (parameter index, key) of the state compared by a CPU copy, by value, and by fingerprint."""
    copied, scalars, on_device = [], [], []
    for index, st in enumerate(states):
        for k, v in st.items():
            if not isinstance(v, torch.Tensor) or v.dim() == 0:
                scalars.append((index, k))
            elif not compared_by_copy(v):
                on_device.append((index, k))
            else:
                copied.append((index, k))
    return copied, scalars, on_device


class _CpuScalars(NamedTuple):
    """0-dim CPU tensors as taken after a step: their dtypes and values."""
    dtypes: tuple
    values: list


def _cpu_scalars(values: Sequence[Any]) -> _CpuScalars | None:
    read = cpu_scalars(values)
    return None if read is None else _CpuScalars(tuple(v.dtype for v in values), read)


def _scalar_values(values: Sequence[Any], strict: bool = True) -> Any:
    """Scalars as taken after a step: 0-dim CPU tensors read one by one (:class:`_CpuScalars`), those on a device
    stacked into one tensor (one transfer), else a list of their values (None when not ``strict`` and they are not
    all 0-dim tensors: their slots are to be classified again)."""
    if not values:
        return []
    taken = _cpu_scalars(values)
    if taken is not None:
        return taken
    stacked = stacked_scalars(values)
    if stacked is not None:
        return stacked
    if not strict:
        return None
    return [_scalar(v) for v in values]


def _same_scalars(current: Sequence[Any], values: Any) -> bool:
    """Whether the scalars now are those taken (same dtypes and values; one comparison when both are stacked)."""
    if isinstance(values, _CpuScalars):
        now = _cpu_scalars(current)
        return now is not None and now == values
    if isinstance(values, torch.Tensor):
        stacked = stacked_scalars(current)
        return stacked is not None and stacked.dtype == values.dtype and torch.equal(stacked, values)
    return all(not (isinstance(v, torch.Tensor) and v.dim() > 0) and _scalar(v) == before
               for v, before in zip(current, values))


def _scalar_list(values: Any) -> list:
    if isinstance(values, _CpuScalars):
        return [float(v) for v in values.values]
    return [float(v) for v in values.tolist()] if isinstance(values, torch.Tensor) else list(values)


def _scalar(v: Any) -> Any:
    return float(v) if isinstance(v, (torch.Tensor, numbers.Number)) else repr(v)
