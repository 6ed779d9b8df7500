"""torch.func building blocks: per-sample gradients and test feature maps (MATH.md §1, §11).

* per-sample gradients g_{t,i} = w_{t,i} ∇_θ ℓ_i(θ_t):  vmap(grad(ℓ), in_dims over samples)
* Jacobian of the target at one node, J(x; θ) = ∂_θ f(x; θ):  vmap(jacrev(f), in_dims over test inputs)
* directional derivatives J(x; θ) v for several tangents v:  vmap over tangents of jvp(f)
* per-sample loss derivatives ⟨∇ℓ_i(θ), v⟩ for several tangents v:  vmap over tangents of jvp(ℓ_1..ℓ_B)

The model is written once as a per-example function (``functional_call`` on ``x.unsqueeze(0)``)
and lifted; frozen parameters and buffers are closed over as constants.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call, grad, jacrev, jvp, vmap

from .errors import ExplaindError, TrajectoryMismatchError
from .integrations.batches import (DROPOUT_KEY, StructuredBatch, collate_padded, is_causal_model,
                                   per_sample_attention_mask)
from .integrations.forward import DropoutRecord, ReplayMode

__all__ = ["FunctionalModel", "TrainingData"]

Params = dict[str, torch.Tensor]


class _Captured(Exception):
    """Carries a submodule's output out of the forward pass (the rest of the model is not run)."""

    def __init__(self, value):
        super().__init__()
        self.value = value


class FunctionalModel:
    """The model as a pure function of the trained parameters θ (a dict name → tensor).

    ``output(θ, x)`` is f(x; θ) for one example (batch dimension removed). ``target(θ, x, label)`` is
    the quantity decomposed, flattened to a vector in R^O: the output f, or the output of the
    submodule named ``activation`` (Corollary 3.3 ii), optionally post-composed with ``h(value,
    label)`` (Corollary 3.3 i); ``label`` is the test input's label (or a placeholder).
    """

    def __init__(
        self,
        model: nn.Module,
        trained_names: Sequence[str],
        *,
        dtype: torch.dtype,
        device: torch.device,
        h: Callable[[torch.Tensor, Any], torch.Tensor] | None = None,
        activation: str | None = None,
        name_map: Mapping[str, str] | None = None,
        output: Callable[[Any], torch.Tensor] | None = None,
        dropout: Mapping[str, Any] | None = None,
    ):
        self.model = model
        self.trained_names = list(trained_names)
        # trajectory name → the model's own name (they differ by a wrapper's prefix, integrations.names)
        self._model_name = dict(name_map) if name_map is not None else {n: n for n in self.trained_names}
        trained = set(self._model_name.values())
        cast = lambda t: (t.detach().to(device=device, dtype=dtype) if t.is_floating_point() else t.detach().to(device))
        self.constants: Params = {n: cast(p) for n, p in model.named_parameters() if n not in trained}
        self._select = output
        self.dropout = DropoutRecord(dropout) if dropout else None
        config = getattr(model, "config", None)
        self._hugging_face = config is not None and hasattr(config, "_attn_implementation")
        self._causal = is_causal_model(model) if self._hugging_face else False
        attention = getattr(config, "_attn_implementation", None) if self._hugging_face else None
        if attention not in (None, "eager", "sdpa"):
            warnings.warn(f"attention implementation {attention!r}: its kernels have no vmap batching rule, so per-sample "
                          "gradients and Jacobians fall back to a per-sample loop (slow); set "
                          "model.set_attn_implementation('eager') or 'sdpa' before decomposing (same function)")
        self.constants.update({n: cast(b) for n, b in model.named_buffers()})
        self.dtype, self.device = dtype, device
        self._h = h
        self._activation_module = None
        if activation is not None:
            modules = dict(model.named_modules())
            if activation not in modules or activation == "":
                raise ExplaindError(
                    f"the model has no submodule named {activation!r}; submodules: "
                    f"{[n for n in modules if n][:40]}"
                )
            self._activation_module = modules[activation]

    def output(self, params: Mapping[str, torch.Tensor], x: Any) -> torch.Tensor:
        """f(x; θ) for one sample: a tensor input, or a :class:`StructuredBatch` row of named inputs (passed
        as keyword arguments; a 1-D ``attention_mask`` becomes the model's 4-D mask first). The output is the
        model's tensor, the ``.logits`` of a ``ModelOutput``, or ``output(model_output)`` when given. A
        sample carrying a dropout key (a training sample of a dropout run) sees its recorded masks."""
        named = {**self.constants, **{self._model_name[n]: v for n, v in params.items()}}
        key = None
        if isinstance(x, StructuredBatch) and DROPOUT_KEY in x:
            key, x = x[DROPOUT_KEY], x.without(DROPOUT_KEY)
            x = x["__input__"] if "__input__" in x else x
        if key is not None:
            mode = ReplayMode(key, self.dropout.calls)
        else:
            mode = ReplayMode() if self._hugging_face else contextlib.nullcontext()
        with mode:
            if isinstance(x, Mapping):
                out = functional_call(self.model, named, (), self._keyword_inputs(x))
            else:
                out = functional_call(self.model, named, (x.unsqueeze(0),))
        return self._selected(out).squeeze(0)

    def _keyword_inputs(self, x: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        inputs = {n: v.unsqueeze(0) for n, v in x.items()}
        mask = x.get("attention_mask")
        if self._hugging_face and mask is not None and mask.dim() == 1:
            inputs["attention_mask"] = per_sample_attention_mask(mask, self._causal, self.dtype)
        return inputs

    def _selected(self, out: Any) -> torch.Tensor:
        if self._select is not None:
            out = self._select(out)
        elif not isinstance(out, torch.Tensor) and isinstance(getattr(out, "logits", None), torch.Tensor):
            out = out.logits
        if not isinstance(out, torch.Tensor):
            raise ExplaindError(
                f"the model returns a {type(out).__name__}, not a tensor or an output with .logits; say which "
                "tensor is f with explaind_math.integrations.SelectOutput(model, lambda out: ...)")
        return out

    def with_dropout_keys(self, xs: Any, step: int, ids: Sequence[int]) -> Any:
        """The training inputs of ``ids`` at ``step`` with their dropout keys attached (unchanged for a run
        without dropout), so that :meth:`per_sample_gradients` replays the masks each sample saw."""
        if self.dropout is None:
            return xs
        keys = self.dropout.keys(step, ids).to(self.device)
        if isinstance(xs, StructuredBatch):
            return xs.with_entry(DROPOUT_KEY, keys)
        return StructuredBatch({"__input__": xs, DROPOUT_KEY: keys})

    def _activation(self, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        def capture(module, inputs, output):
            raise _Captured(output)

        handle = self._activation_module.register_forward_hook(capture)
        try:
            self.output(params, x)
        except _Captured as captured:
            value = captured.value
        else:
            raise ExplaindError("the selected submodule was not called by the model's forward pass")
        finally:
            handle.remove()
        if not isinstance(value, torch.Tensor):
            raise ExplaindError("the selected submodule returns a tuple; select a submodule that returns a tensor")
        return value.squeeze(0)

    def target(self, params: Mapping[str, torch.Tensor], x: torch.Tensor, label: Any = None) -> torch.Tensor:
        value = self.output(params, x) if self._activation_module is None else self._activation(params, x)
        if self._h is not None:
            value = self._h(value, label)
        return value.reshape(-1)

    # -- batched evaluations (labels: one per test input, or a placeholder tensor) ----------
    def target_values(self, params: Params, xs: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
        """F(θ) ∈ R^{X×O}: the target on every test input."""
        return vmap(self.target, in_dims=(None, 0, 0), chunk_size=chunk_size)(params, xs, labels)

    def jacobian(self, params: Params, xs: torch.Tensor, labels: torch.Tensor, chunk_size: int | None = None,
                 wrt: Sequence[str] | None = None) -> Params:
        """∂_θ target(x; θ) per test input: name → (X, O, *shape), for the parameters ``wrt`` (default: all
        of ``params``; the others are held fixed, so their Jacobian is never formed)."""
        if wrt is None or set(wrt) == set(params):
            return vmap(jacrev(self.target), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, xs, labels)
        fixed = {n: v for n, v in params.items() if n not in set(wrt)}

        def target_of(sub: Params, x: torch.Tensor, label: Any) -> torch.Tensor:
            return self.target({**fixed, **sub}, x, label)

        sub = {n: params[n] for n in wrt}
        return vmap(jacrev(target_of), in_dims=(None, 0, 0), chunk_size=chunk_size)(sub, xs, labels)

    def jacobians_at(self, points: Params, xs: torch.Tensor, labels: torch.Tensor,
                     wrt: Sequence[str] | None = None) -> Params:
        """:meth:`jacobian` at k parameter points in one vmapped call: ``points`` holds every parameter
        stacked on a leading axis of length k; returns name → (k, X, O, *shape) for the parameters ``wrt``.
        One call for k points costs less than k calls (the quadrature nodes of a step, MATH.md §11)."""
        return vmap(lambda p: self.jacobian(p, xs, labels, wrt=wrt))(points)

    def directional(self, params: Params, xs: torch.Tensor, labels: torch.Tensor, tangents: Params,
                    chunk_size: int | None = None, tangent_chunk_size: int | None = None) -> torch.Tensor:
        """J(x; θ) v_k for tangents stacked on a leading axis K: (K, X, O) by forward-mode AD. Parameters
        missing from ``tangents`` have tangent 0 (they are held fixed)."""
        fixed = {n: v for n, v in params.items() if n not in tangents}
        moving = {n: params[n] for n in tangents}

        def one(tangent: Params) -> torch.Tensor:
            return jvp(lambda p: self.target_values({**fixed, **p}, xs, labels, chunk_size), (moving,), (tangent,))[1]

        return vmap(one, chunk_size=tangent_chunk_size)(tangents)

    def supports_forward_ad(self, params: Params, x: torch.Tensor, label: Any) -> tuple[bool, str]:
        """Whether forward-mode AD (``torch.func.jvp``) runs through the target, tried on one input; and if
        not, PyTorch's reason (some kernels, e.g. CPU flash attention, implement reverse mode only)."""
        tangent = {n: torch.zeros_like(v) for n, v in params.items()}
        try:
            jvp(lambda p: self.target(p, x, label), (params,), (tangent,))
        except (NotImplementedError, RuntimeError) as error:
            return False, str(error).splitlines()[0]
        return True, ""

    def directional_by_jacobian(self, params: Params, xs: torch.Tensor, labels: torch.Tensor,
                                tangents: Params) -> torch.Tensor:
        """J(x; θ) v_k (K, X, O) from the Jacobian, for targets without forward-mode AD (same numbers as
        :meth:`directional`, at the cost of one reverse pass per output)."""
        J = self.jacobian(params, xs, labels, wrt=list(tangents))
        return sum(torch.einsum("xoj,kj->kxo", J[n].reshape(*J[n].shape[:2], -1), v.reshape(v.shape[0], -1))
                   for n, v in tangents.items())

    def per_sample_gradients(
        self,
        params: Params,
        loss_fn: Callable[[torch.Tensor, Any], torch.Tensor],
        xs: torch.Tensor,
        ys: Any,
        *,
        vectorize: bool = True,
        chunk_size: int | None = None,
    ) -> Params:
        """∇_θ ℓ_i(θ) for every sample of a batch: name → (B, *shape), unweighted."""
        if vectorize:
            return vmap(grad(self._checked_loss(loss_fn)), in_dims=(None, 0, 0), chunk_size=chunk_size)(params, xs, ys)
        loss_one = self._checked_loss(loss_fn)
        rows = [grad(loss_one)(params, xs[i], _index(ys, i)) for i in range(xs.shape[0])]
        return {n: torch.stack([r[n] for r in rows]) for n in params}

    def per_sample_loss_jvp(self, params: Params, loss_fn: Callable[[torch.Tensor, Any], torch.Tensor], xs: Any,
                            ys: Any, tangents: Params, *, vectorize: bool = True,
                            tangent_chunk_size: int | None = None) -> torch.Tensor:
        """⟨∇_θ ℓ_i(θ), v_k⟩ for every sample i of a batch and every tangent v_k (stacked on a leading axis K):
        (K, B), unweighted. One forward-mode JVP of the vector (ℓ_1(θ), …, ℓ_B(θ)) per tangent, batched over the
        tangents with vmap: the per-sample gradients (B · D numbers) are never formed. Parameters missing from
        ``tangents`` are held fixed. ``vectorize=False``: the samples and the tangents in loops."""
        loss_one = self._checked_loss(loss_fn)
        fixed = {n: v for n, v in params.items() if n not in tangents}
        moving = {n: params[n] for n in tangents}

        def losses(p: Params) -> torch.Tensor:
            full = {**fixed, **p}
            if vectorize:
                return vmap(loss_one, in_dims=(None, 0, 0))(full, xs, ys)
            return torch.stack([loss_one(full, xs[i], _index(ys, i)) for i in range(xs.shape[0])])

        def one(tangent: Params) -> torch.Tensor:
            return jvp(losses, (moving,), (tangent,))[1]

        if vectorize:
            return vmap(one, chunk_size=tangent_chunk_size)(tangents)
        K = next(iter(tangents.values())).shape[0]
        return torch.stack([one({n: v[k] for n, v in tangents.items()}) for k in range(K)])

    def group_gradients(self, params: Params, loss_fn: Callable[[torch.Tensor, Any], torch.Tensor], xs: torch.Tensor,
                        ys: Any, group_weights: torch.Tensor) -> Params:
        """Σ_i W[k, i] ∇_θ ℓ_i(θ) for every row k of ``group_weights`` (K, B): one gradient of a weighted
        batch loss per group (Corollary F.2: a partition needs only its groups' sums, not every sample's)."""
        loss_one = self._checked_loss(loss_fn)

        def weighted(p: Params, w: torch.Tensor) -> torch.Tensor:
            return (vmap(loss_one, in_dims=(None, 0, 0))(p, xs, ys) * w).sum()

        return vmap(grad(weighted), in_dims=(None, 0))(params, group_weights)

    def _checked_loss(self, loss_fn):
        def loss_one(p: Params, x: torch.Tensor, y: Any) -> torch.Tensor:
            value = loss_fn(self.output(p, x), y)
            if not isinstance(value, torch.Tensor) or value.numel() != 1:
                raise ExplaindError(
                    "loss_fn(output, target) must return the loss of ONE sample as a scalar tensor; got "
                    f"{'shape ' + str(tuple(value.shape)) if isinstance(value, torch.Tensor) else type(value).__name__}"
                )
            return value.reshape(())

        return loss_one


def _index(ys: Any, i: int) -> Any:
    return ys[i]


class TrainingData:
    """Access to training samples by id: a tuple ``(X, Y)`` of tensors indexed by id, a dict of tensors
    indexed by id whose ``labels`` entry is Y (``input_ids``, ``attention_mask``, …: the model's keyword
    inputs), ``(dict, Y)``, or any object with ``__getitem__(id)`` returning ``(x, y)`` or a dict sample
    (a ``torch.utils.data.Dataset``, a list; variable-length dict samples are padded on the right,
    labels with −100). A dataset wrapped by :func:`explaind_math.integrations.with_sample_ids` is
    unwrapped."""

    def __init__(self, data: Any, *, dtype: torch.dtype, device: torch.device, label_key: str = "labels"):
        data = getattr(data, "explaind_base_dataset", data)
        if isinstance(data, Mapping) and label_key in data and all(isinstance(v, torch.Tensor) for v in data.values()):
            data = ({n: v for n, v in data.items() if n != label_key}, data[label_key])
        if isinstance(data, (tuple, list)) and len(data) == 2 and isinstance(data[0], Mapping):
            data = (StructuredBatch(data[0]), data[1])
        self.data, self.dtype, self.device, self.label_key = data, dtype, device, label_key
        self._tensors = isinstance(data, (tuple, list)) and len(data) == 2 and all(
            isinstance(d, (torch.Tensor, StructuredBatch)) for d in data
        )
        if self._tensors and data[0].shape[0] != data[1].shape[0]:
            raise TrajectoryMismatchError(
                f"training data: {data[0].shape[0]} inputs but {data[1].shape[0]} targets"
            )

    def _cast(self, t):
        if isinstance(t, StructuredBatch):
            return t.to(self.device, self.dtype)
        t = t.to(self.device)
        return t.to(self.dtype) if t.is_floating_point() else t

    def fetch(self, ids: Sequence[int]) -> tuple[Any, torch.Tensor]:
        if self._tensors:
            X, Y = self.data
            bad = [i for i in ids if not 0 <= i < X.shape[0]]
            if bad:
                raise TrajectoryMismatchError(
                    f"sample ids {bad[:5]} are not in the training data ({X.shape[0]} samples, ids 0..{X.shape[0] - 1})"
                )
            index = torch.as_tensor(list(ids), dtype=torch.long, device=X.device if isinstance(X, torch.Tensor) else None)
            return self._cast(X[index]), self._cast(Y[index])
        items = []
        for i in ids:
            if i < 0 and not isinstance(self.data, Mapping):  # a list would give its last sample for id -1
                raise TrajectoryMismatchError(f"sample id {i} is negative; ids index the training data from 0")
            try:
                items.append(self.data[i])
            except (KeyError, IndexError):
                raise TrajectoryMismatchError(f"sample id {i} is not in the training data") from None
        if all(isinstance(item, Mapping) for item in items):
            if any(self.label_key not in item for item in items):
                raise TrajectoryMismatchError(f"a dict training sample has no {self.label_key!r} entry (its target)")
            batch = collate_padded(items)
            y = batch.pop(self.label_key)
            return self._cast(StructuredBatch(batch)), self._cast(y)
        xs, ys = [], []
        for i, item in zip(ids, items):
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise TrajectoryMismatchError(
                    f"training sample {i} is a {type(item).__name__}{' of length ' + str(len(item)) if isinstance(item, (tuple, list)) else ''}; "
                    "the training data must give (x, y) or a dict with a labels entry per id (pass the dataset "
                    "itself, not one that also returns ids)")
            xs.append(torch.as_tensor(item[0]))
            ys.append(torch.as_tensor(item[1]))
        return self._cast(torch.stack(xs)), self._cast(torch.stack(ys))
