"""Keeping a step by its gradient: θ_{t+1} and the optimizer state rebuilt by rerunning the user's optimizer.

A recorded step needs θ_{t+1}, the optimizer state the rule reads (AdamW's v_t) and the ``.grad`` the step saw
(MATH.md §0; the gradient-sum check). The first two follow from θ_t, the state before the step and the third:
they are what ``optimizer.step()`` computes from them. With ``TrajectoryRecorder(..., rerun_optimizer=True)``
the recorder keeps the ``.grad`` only, and checks at every step that a second instance of the user's optimizer
class (:class:`OptimizerRerun`: same class, same param-group settings, on CPU copies of the parameters), given
θ_t, the state and the recorded ``.grad``, produces θ_{t+1} and every state entry bit for bit. A step that is not
reproduced so (an optimizer on an accelerator, whose arithmetic the CPU does not repeat; a step given extra
arguments; an optimizer whose class cannot be built from its param groups) is kept in full, as without the
option, and the rerun restarts from it; after three such steps in a row the rerun is given up. Every
:data:`RESTART_INTERVAL` steps a step is kept in full too, so that any θ_t is at most that many reruns away.

:class:`RerunTrajectory` is the :class:`~explaind_math.Trajectory` of such a recording: ``parameters[t]`` and
``steps[t].state`` of a step kept by its gradient are rebuilt on demand by the same rerun, from the last step
kept in full, and the last :data:`RESTART_INTERVAL` rebuilt are cached (a pass in either direction reruns each
step about once; where a segment of that many steps exceeds :data:`CACHE_BYTES`, a backward pass reruns a
segment's steps up to :data:`RESTART_INTERVAL`/2 times each). Reruns run on the CPU, under the default dtype of the
recording, outside inference mode, whatever the reader's settings. The numbers are those the optimizer computed,
bit for bit, checked when they were recorded.

Why: the memory a recording keeps is the cost that grows with the run. On the 4-layer GPT-2 of
``benchmarks/bench_hf.py`` a step keeps 9.6 MB (θ_{t+1}, ``.grad``, v_t); by its gradient it keeps 3.2 MB.
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from .recording_copies import GATHERED_COMPARISON_LIMIT, FlatCopy, cpu_copy, on_cpu
from .trajectory import OnDemandSequence, StepRecord, Trajectory

__all__ = ["RESTART_INTERVAL", "RERUN_ABOVE", "OptimizerRerun", "RecordedRerun", "RerunTrajectory", "rerun_pays_off"]

#: a step kept in full at least every this many steps: the reruns needed for any θ_t, and the steps cached
RESTART_INTERVAL = 32
#: ``rerun_optimizer="auto"`` reruns above this many trained elements: where the recorder's copies are made tensor by
#: tensor (:data:`~explaind_math.recording_copies.GATHERED_COMPARISON_LIMIT`) and the memory they keep costs more
#: than a rerun. Below it one gathered copy is cheaper: the 2-layer GPT-2 of ``benchmarks/bench_hf.py`` (28k
#: elements) records at 1.26x its Trainer step with copies, 1.50x with the rerun; the 4-layer one (0.8M) at 1.38x
#: with copies, 1.19x with the rerun (medians of 5 interleaved runs).
RERUN_ABOVE = GATHERED_COMPARISON_LIMIT
#: the rebuilt trajectory caches at most this many bytes of rebuilt steps (and at least two steps)
CACHE_BYTES = 1 << 29
#: reruns that missed in a row before the recorder stops trying (keeps every step in full from then on)
MISSES_BEFORE_GIVING_UP = 3


def rerun_pays_off(params: Sequence[tuple[str, torch.Tensor, int]]) -> bool:
    """``rerun_optimizer="auto"``: the trained parameters are on the CPU and hold more than :data:`RERUN_ABOVE`
    elements."""
    return (all(p.device.type == "cpu" for _, p, _ in params)
            and sum(p.numel() for _, p, _ in params) > RERUN_ABOVE)


def _copied(value: Any) -> Any:
    """A value of an optimizer's state or param group, tensors (also inside tuples and lists: betas) as CPU copies."""
    if isinstance(value, torch.Tensor):
        return cpu_copy(value)
    if isinstance(value, (tuple, list)):
        return type(value)(_copied(v) for v in value)
    return value


@contextlib.contextmanager
def _as_recorded(dtype: torch.dtype):
    """The torch settings a rerun runs under, whatever the caller's: the default dtype of the recording (NAdam makes
    its μ-product in it), factories on the CPU, outside inference mode and autograd."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:  # torch.device as a context is a function mode that sees every op: entered only when it changes something
        with (torch.device("cpu") if torch.get_default_device().type != "cpu" else contextlib.nullcontext()), \
                torch.inference_mode(False), torch.no_grad():
            yield
    finally:
        torch.set_default_dtype(before)


def group_settings(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's settings (everything but ``params``), tensors copied: what the step read."""
    return [{k: _copied(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups]


def _same_value(a: Any, b: Any) -> bool:
    """Whether two state values are equal bit for bit (tensors: dtype, shape and every element; a NaN is never
    equal, so a match also proves there is none)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        return torch.equal(on_cpu(a), on_cpu(b))
    return type(a) is type(b) and a == b


class OptimizerRerun:
    """A second instance of the user's optimizer class on CPU tensors laid out as ``params`` (name, tensor, group):
    :meth:`load` sets θ and the state, :meth:`step` runs ``optimizer.step()`` on them with given gradients and
    param-group settings. Raises (TypeError, ValueError, …) when the class cannot be built from param groups."""

    def __init__(self, optimizer_type: type, settings: Sequence[dict], layout: Sequence[tuple[tuple, torch.dtype, int]],
                 default_dtype: torch.dtype):
        """``layout``: per parameter (shape, dtype, param group); ``default_dtype``: torch's when it was recorded."""
        self.default_dtype = default_dtype
        with _as_recorded(default_dtype):
            self.theta = [torch.empty(shape, dtype=dtype, device="cpu") for shape, dtype, _ in layout]
            groups = [{**values, "params": [self.theta[i] for i, (_, _, gi) in enumerate(layout) if gi == k]}
                      for k, values in enumerate(settings)]
            self._optimizer = optimizer_type(groups)

    def load(self, theta: Sequence[torch.Tensor], state: Sequence[dict]) -> None:
        """Set θ (copied in) and the optimizer state (per parameter, copied)."""
        with _as_recorded(self.default_dtype):
            for mine, value in zip(self.theta, theta):
                mine.copy_(value)
            self._optimizer.state.clear()
            for mine, entries in zip(self.theta, state):
                if entries:
                    self._optimizer.state[mine] = {k: _copied(v) for k, v in entries.items()}

    def step(self, gradients: Sequence[torch.Tensor | None], settings: Sequence[dict]) -> None:
        """One ``optimizer.step()`` with ``.grad`` = ``gradients`` (None: the parameter had none) and the groups'
        settings (the recorded learning rate of the step, …)."""
        for group, values in zip(self._optimizer.param_groups, settings):
            group.update(values)
        for mine, g in zip(self.theta, gradients):
            mine.grad = g
        try:
            with _as_recorded(self.default_dtype):
                self._optimizer.step()
        finally:
            for mine in self.theta:
                mine.grad = None

    def state(self, i: int) -> dict:
        """The state of parameter i (the rerun's own tensors: copy them to keep them)."""
        return self._optimizer.state.get(self.theta[i], {})

    def matches(self, params: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer) -> bool:
        """Whether θ and every state entry equal those of the live ``params`` and ``optimizer``, bit for bit."""
        for i, p in enumerate(params):
            if not _same_value(self.theta[i], p):
                return False
            live, mine = optimizer.state.get(p, {}), self.state(i)
            if live.keys() != mine.keys() or not all(_same_value(mine[k], v) for k, v in live.items()):
                return False
        return True


class RecordedRerun:
    """The recorder's rerun: which steps are kept by their gradient, the param-group settings of each step, and
    the restart points (θ_t and the whole optimizer state at t) the rebuilt trajectory starts from."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[tuple[str, torch.Tensor, int]],
                 theta_0: Sequence[torch.Tensor]):
        """Before step 0: θ_0 (``theta_0``: the recorder's copies) and the optimizer's state are the first restart."""
        self._params = params
        self._type, self._layout = type(optimizer), [(tuple(p.shape), p.dtype, gi) for _, p, gi in params]
        self._settings_0 = group_settings(optimizer)
        self._default_dtype = torch.get_default_dtype()
        self.settings: list[list[dict]] = []
        self.restarts: dict[int, tuple[list[torch.Tensor], list[dict]]] = {}
        self.given_up: str | None = None
        self._since_restart = 0
        self._misses = 0
        try:
            self.rerun: OptimizerRerun | None = self.new_rerun()
        except Exception as error:  # noqa: BLE001 - a class that needs more than param groups: keep every step
            self.rerun = None
            self.given_up = f"{type(optimizer).__name__}(param_groups) cannot be built ({type(error).__name__}: {error})"
        self.restart(0, theta_0, optimizer)

    def new_rerun(self) -> OptimizerRerun:
        """An :class:`OptimizerRerun` of this optimizer's class and layout (the rebuilt trajectory's own)."""
        return OptimizerRerun(self._type, self._settings_0, self._layout, self._default_dtype)

    def restart(self, t: int, theta: Sequence[torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
        """A restart point at θ_t (``theta``: copies the recorder keeps) with the live optimizer's state (copied)."""
        if self.given_up is not None:
            return
        state = [{k: _copied(v) for k, v in optimizer.state.get(p, {}).items()} for _, p, _ in self._params]
        self.restarts[t] = (list(theta), state)
        self.rerun.load(theta, state)
        self._since_restart = 0

    def after_step(self, optimizer: torch.optim.Optimizer, current: dict, extra_arguments: bool) -> bool:
        """After the live step t (``current``: the recorder's record of it, whose ``gradient`` is the ``.grad`` the
        step saw): rerun it; True when θ_{t+1} and the state came out bit for bit and no full step is due (the step
        is then kept by its gradient). False: the recorder keeps the step in full and calls :meth:`restart` at
        t + 1."""
        settings = group_settings(optimizer)
        self.settings.append(settings)
        if self.given_up is not None:
            return False
        reproduced = False
        if not extra_arguments and current["gradient"] is not None:
            views = dict(zip(current["updated"], current["gradient"].views()))
            gradients = [views.get(n) for n, _, _ in self._params]
            try:
                self.rerun.step(gradients, settings)
                reproduced = self.rerun.matches([p for _, p, _ in self._params], optimizer)
            except Exception:  # noqa: BLE001 - an optimizer the rerun cannot run: keep the step in full
                reproduced = False
        self._misses = 0 if reproduced else self._misses + 1
        if self._misses >= MISSES_BEFORE_GIVING_UP:
            self.given_up = (f"{MISSES_BEFORE_GIVING_UP} steps in a row were not reproduced bit for bit by a "
                             f"rerun of {type(optimizer).__name__} on the CPU (an optimizer on an accelerator, or "
                             "extra arguments to optimizer.step())")
            return False
        if reproduced and self._since_restart + 1 < RESTART_INTERVAL:
            self._since_restart += 1
            return True
        return False

    def state_reference(self, optimizer: torch.optim.Optimizer) -> tuple[list[tuple[int, str]], FlatCopy]:
        """The slots (parameter index, key) of the live optimizer's CPU state tensors and the rerun's tensors at them,
        equal bit for bit after a step it reproduced: what the state watch compares with before the next step, in
        place of copies of its own."""
        slots = [(i, k) for i, (_, p, _) in enumerate(self._params) for k, v in optimizer.state.get(p, {}).items()
                 if isinstance(v, torch.Tensor) and v.dim() > 0 and v.device.type == "cpu"]
        return slots, FlatCopy.over([self.rerun.state(i)[k] for i, k in slots])

    def metadata(self, num_steps: int, by_gradient: int) -> dict:
        """What the trajectory's ``metadata["optimizer_rerun"]`` says: ``by_gradient`` of ``num_steps`` kept so."""
        return {"steps_kept_by_gradient": by_gradient, "steps_kept_in_full": num_steps - by_gradient,
                "restart_interval": RESTART_INTERVAL, **({"given_up": self.given_up} if self.given_up else {})}


class RerunTrajectory(Trajectory):
    """A recorded :class:`~explaind_math.Trajectory` whose steps kept by their gradient are rebuilt on demand (see
    the module docstring). ``thetas[t]`` is θ_t when it was kept (θ_0 and after each step kept in full), else
    None; ``steps[t]`` is step t's record, its ``state`` holding only the step counts when it was kept by its
    gradient. ``reruns`` counts the optimizer steps rerun so far; the cache holds at most :data:`CACHE_BYTES` of
    rebuilt θ_t and state (at least two steps, at most :data:`RESTART_INTERVAL`)."""

    def __init__(self, *, optimizer: str, parameter_names: Sequence[str], group_of: dict, thetas: list,
                 steps: list[StepRecord], rerun: RecordedRerun, rule: Any, initial_state: dict,
                 buffers: dict, metadata: dict):
        self.optimizer = optimizer
        self.parameter_names = list(parameter_names)
        self.group_of = dict(group_of)
        self.initial_state = {k: dict(v) for k, v in initial_state.items()}
        self.buffers = dict(buffers)
        self.metadata = dict(metadata)
        self._thetas, self._records = thetas, list(steps)
        self._restarts = {t: r for t, r in rerun.restarts.items() if t < len(thetas)}
        self._settings = rerun.settings[:len(self._records)]
        self._optimizer_rerun = rerun.new_rerun()  # its own: the recorder's goes on with the run
        self._rule = rule  # its state_keys(hyper-parameters): the state entries a step record holds
        self._groups = [group_of[n] for n in self.parameter_names]
        self._cache: OrderedDict[int, tuple[list[torch.Tensor], list[dict]]] = OrderedDict()
        self._position: int | None = None  # where the rerun's own θ and state stand
        self.reruns = 0
        self._index = {n: i for i, n in enumerate(self.parameter_names)}
        self.parameters = OnDemandSequence(len(thetas), self._theta, "θ")
        self.steps = OnDemandSequence(len(self._records), self._step, "step")

    def sample_ids(self) -> list[int]:
        return sorted({i for record in self._records for i in record.sample_ids})  # no rerun needed

    def largest_batch(self) -> int:
        return max((len(record.sample_ids) for record in self._records), default=1)

    def _theta(self, t: int) -> dict[str, torch.Tensor]:
        kept = self._thetas[t]
        if kept is not None:
            return dict(kept)
        return dict(zip(self.parameter_names, self._rebuilt(t)[0]))

    def _step(self, t: int) -> StepRecord:
        record = self._records[t]
        if self._thetas[t + 1] is not None:
            return record
        state = self._rebuilt(t + 1)[1]
        full = {n: {**record.state.get(n, {}), **state[self._index[n]]} for n in record.updated}
        return StepRecord(record.sample_ids, record.weights, record.hyperparameters, record.updated, full,
                          record.gradient, record.batch_calls)

    def _rebuilt(self, t: int) -> tuple[list[torch.Tensor], list[dict]]:
        """θ_t and the optimizer state after step t − 1, rerun from the last restart point at or before t."""
        if t in self._cache:
            self._cache.move_to_end(t)
            return self._cache[t]
        start = max(r for r in self._restarts if r <= t)
        rerun = self._optimizer_rerun
        if self._position is None or not start <= self._position <= t:
            theta, state = self._restarts[start]
            rerun.load(theta, state)
            self._position = start
        while self._position < t:
            self._rerun_one()
        return self._cache[t]

    def _rerun_one(self) -> None:
        """Rerun step s = the rerun's position; cache θ_{s+1} and the state step s's record holds."""
        s, rerun = self._position, self._optimizer_rerun
        record = self._records[s]
        gradient = record.gradient or {}
        rerun.step([gradient.get(n) for n in self.parameter_names], self._settings[s])
        self.reruns += 1
        self._position = s + 1
        keys = [self._rule.state_keys(h) for h in record.hyperparameters]
        with _as_recorded(rerun.default_dtype):  # plain CPU tensors, whatever mode the caller reads in
            state = [{k: v.clone() for k, v in rerun.state(i).items() if k in keys[g]}
                     for i, g in enumerate(self._groups)]
            self._cache[s + 1] = ([v.clone() for v in rerun.theta], state)
        size = sum(v.nbytes for v in self._cache[s + 1][0]) + sum(v.nbytes for e in state for v in e.values())
        while len(self._cache) > max(2, min(RESTART_INTERVAL, CACHE_BYTES // max(size, 1))):
            self._cache.popitem(last=False)
