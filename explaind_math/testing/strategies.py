"""Hypothesis strategies for property tests of exact decompositions (Theorem 3.1, Corollary 3.2).

Everything here runs a REAL training loop: the user's unmodified ``torch.optim`` optimizer, an LR
scheduler, and :class:`explaind_math.TrajectoryRecorder` on the optimizer's step hooks. The
strategies only draw *specifications* (plain dataclasses with a readable ``repr``, so a failing
example prints as something you can paste into ``@example``); the tensors are made from a seed
drawn by Hypothesis with ``torch.Generator``, so every example is reproducible on any device.

Three kinds of specification, combined by :func:`training_runs`:

* :class:`ModelSpec` — tiny models (D ≲ 300 parameters), built in float64 by :meth:`ModelSpec.build`:
  MLPs with tanh / GELU / ReLU (:func:`mlp_models`), a small CNN on 1×6×6 inputs (:func:`cnn_models`),
  a single-head or ``nn.MultiheadAttention`` self-attention block over 2–3 tokens of dimension 4 with
  mean pooling (:func:`attention_models`), and deep linear networks of L layers (:func:`deep_linear_models`).
  The loss decides the head: ``"cross_entropy"`` trains raw logits with ``F.cross_entropy``,
  ``"nll"`` puts a log-softmax head on the model, ``"mse"`` is a regression.
* :class:`OptimizerSpec` — ``torch.optim.AdamW``; ``torch.optim.Adam`` with coupled (L2) or decoupled
  weight decay; ``torch.optim.SGD`` with momentum (0 included), dampening, Nesterov, weight decay,
  ``maximize``; 1–3 parameter groups with their own lr and weight decay; ``LambdaLR``, ``StepLR`` or
  ``OneCycleLR`` (which also cycles β1 / the momentum). See :func:`adamw_optimizers`,
  :func:`sgd_optimizers`, :func:`optimizers`.
* :class:`TrainingSchedule` — N steps with unequal batch sizes (a short last batch), sample weights
  (mean, sum, or random positive: the training loss is then Σ_i w_i ℓ_i and the weights go to
  ``recorder.record_batch(ids, weights=w)``), and optionally one parameter that receives no gradient
  at some steps (``requires_grad=False`` and ``zero_grad(set_to_none=True)``, so PyTorch skips it).
  See :func:`training_schedules`.

:func:`train_and_record` runs the loop and returns a :class:`TrainedRun` (model, trajectory, data,
per-sample loss, test inputs, and the live model's outputs before and after training);
:func:`decompose` calls the theorem that matches the optimizer.

Example (an extension author testing a new model family; ``device`` is the fixture of the
repository's ``conftest.py``, hence :func:`property_settings`)::

    from hypothesis import given
    from explaind_math.testing import strategies as es
    from explaind_math.testing.residuals import SMOOTH_RTOL, check_certificate

    @es.property_settings()
    @given(spec=es.training_runs(families=("mlp-tanh",), optimizer_kinds=("adamw",)))
    def test_exact(spec, device):
        run = es.train_and_record(spec, device=device)
        check_certificate(run, es.decompose(run, replay_rtol=1e-10), SMOOTH_RTOL)

The regime is that of ordinary training: learning rates and weightings are drawn so that steps stay
moderate (:func:`stabilize`), because "8 Gauss–Legendre nodes reach 1e-9" is a statement about
smooth functions on segments of moderate length — a diverging run (SGD ascent on an MSE loss) makes
steps of size 10 on which any fixed rule fails, which says nothing about the theorems.

Numerical caveats worth knowing when writing new model families:

* Adam divides by sqrt(v) + ε, so a coordinate whose gradient is zero *mathematically* but a rounding
  error numerically (the key bias of an attention layer: softmax ignores a constant shift of the
  scores) gets an update of size lr · roundoff / ε, which no replay reproduces to better than
  ~1e-10–1e-9 relative. The attention models here therefore have no key bias.
* ``F.avg_pool2d`` in float64 on CPU costs milliseconds per call; the CNN pools with a reshape.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from torch import nn

import explaind_math as em

__all__ = [
    # families
    "SMOOTH_FAMILIES",
    "ALL_FAMILIES",
    "LOSSES",
    "THEOREM_OF_OPTIMIZER",
    # specifications
    "ModelSpec",
    "LossSpec",
    "OptimizerSpec",
    "ScheduleSpec",
    "TrainingSchedule",
    "RunSpec",
    "TrainedRun",
    # strategies
    "seeds",
    "mlp_models",
    "cnn_models",
    "attention_models",
    "deep_linear_models",
    "models",
    "adamw_optimizers",
    "sgd_optimizers",
    "optimizers",
    "lr_schedules",
    "training_schedules",
    "training_runs",
    "stabilize",
    # running
    "property_settings",
    "make_data",
    "train_and_record",
    "decompose",
    "model_outputs",
]

#: model families whose output is smooth (analytic) in θ: 8 Gauss–Legendre nodes are exact to rounding
SMOOTH_FAMILIES = ("mlp-tanh", "mlp-gelu", "cnn", "attention")
#: the per-sample losses (see :class:`LossSpec`)
LOSSES = ("cross_entropy", "nll", "mse")
#: every family the strategies can build
ALL_FAMILIES = (*SMOOTH_FAMILIES, "mlp-relu", "deep-linear")
#: the theorem that decomposes a run of each optimizer kind (the label stored in the result)
THEOREM_OF_OPTIMIZER = {
    "adamw": "Theorem 3.1 (AdamW)",
    "adam": "Theorem 3.1 (AdamW)",
    "sgd": "Corollary 3.2 (SGD with momentum)",
}

#: activations by name; all but "relu" are analytic (nn.Softplus is not: it switches to x above 20)
_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "tanh": nn.Tanh,
    "gelu": nn.GELU,  # the exact (erf) GELU
    "sigmoid": nn.Sigmoid,
    "relu": nn.ReLU,
}


# =====================================================================================================
# losses
# =====================================================================================================
@dataclass(frozen=True)
class LossSpec:
    """A per-sample loss ℓ_i = L(f(x_i; θ), y_i) in two forms that must agree.

    ``per_sample(output, y)`` takes ONE sample's output (no batch axis) and returns a scalar: it is the
    ``loss_fn`` handed to the decomposition. ``batched(outputs, ys)`` is what the training loop uses
    (``reduction="none"``), so the test also checks that PyTorch's batched loss equals Σ of per-sample ones.

    kind: ``"cross_entropy"`` (``F.cross_entropy`` on raw, unnormalized logits), ``"nll"``
    (``F.nll_loss`` after a log-softmax head) or ``"mse"`` (½‖f − y‖², a regression).
    """

    kind: str

    def per_sample(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.kind == "cross_entropy":
            return F.cross_entropy(output, y)
        if self.kind == "nll":
            return F.nll_loss(output, y)
        if self.kind == "mse":
            return 0.5 * ((output - y) ** 2).sum()
        raise ValueError(f"unknown loss kind {self.kind!r}")

    def batched(self, outputs: torch.Tensor, ys: torch.Tensor) -> torch.Tensor:
        if self.kind == "cross_entropy":
            return F.cross_entropy(outputs, ys, reduction="none")
        if self.kind == "nll":
            return F.nll_loss(outputs, ys, reduction="none")
        if self.kind == "mse":
            return 0.5 * ((outputs - ys) ** 2).sum(-1)
        raise ValueError(f"unknown loss kind {self.kind!r}")

    @property
    def classification(self) -> bool:
        return self.kind in ("cross_entropy", "nll")

    def __call__(self, output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.per_sample(output, y)


# =====================================================================================================
# models
# =====================================================================================================
class _Head(nn.Module):
    """Log-softmax over the last axis: the head of models trained with ``loss="nll"``."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return F.log_softmax(z, dim=-1)


class SmallCNN(nn.Module):
    """Conv2d(1 → c, 3×3) → activation → 2×2 mean pooling → flatten → Linear(4c → O) on 1×6×6 inputs.

    The pooling is written as a reshape and a mean: ``F.avg_pool2d`` in float64 on CPU costs ~8 ms per
    call in torch 2.x, which would dominate a test that evaluates the model thousands of times.
    """

    def __init__(self, channels: int, num_outputs: int, activation: str, bias: bool, dtype: torch.dtype):
        super().__init__()
        self.conv = nn.Conv2d(1, channels, 3, bias=bias, dtype=dtype)
        self.act = _ACTIVATIONS[activation]()
        self.fc = nn.Linear(4 * channels, num_outputs, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.conv(x))  # (B, c, 4, 4)
        pooled = h.unflatten(-1, (2, 2)).unflatten(-3, (2, 2)).mean(dim=(-3, -1))  # (B, c, 2, 2)
        return self.fc(pooled.flatten(1))


class TinySelfAttention(nn.Module):
    """Self-attention over T tokens of dimension d, a residual connection, mean pooling, Linear(d → O).

    ``implementation="single"``: one head written out (q, k, v projections, softmax(q kᵀ / √d) v, an
    output projection); ``"multihead"``: ``nn.MultiheadAttention(d, heads, dropout=0)``. Neither has a
    key bias (see the module docstring: its gradient is exactly zero in exact arithmetic).
    ``need_weights=True`` keeps ``nn.MultiheadAttention`` on its explicit-softmax path, which
    ``torch.func.vmap`` batches natively (its fused SDPA kernel falls back to a slow loop).
    """

    def __init__(self, dim: int, heads: int, num_outputs: int, implementation: str, dtype: torch.dtype):
        super().__init__()
        self.implementation = implementation
        if implementation == "single":
            self.q = nn.Linear(dim, dim, dtype=dtype)
            self.k = nn.Linear(dim, dim, bias=False, dtype=dtype)
            self.v = nn.Linear(dim, dim, dtype=dtype)
            self.o = nn.Linear(dim, dim, dtype=dtype)
        elif implementation == "multihead":
            self.mha = nn.MultiheadAttention(dim, heads, dropout=0.0, bias=False, batch_first=True, dtype=dtype)
        else:
            raise ValueError(f"unknown attention implementation {implementation!r}")
        self.fc = nn.Linear(dim, num_outputs, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: (B, T, d)
        if self.implementation == "single":
            q, k, v = self.q(x), self.k(x), self.v(x)
            scores = q @ k.transpose(-1, -2) / math.sqrt(x.shape[-1])
            mixed = self.o(torch.softmax(scores, dim=-1) @ v)
        else:
            mixed, _ = self.mha(x, x, x, need_weights=True)
        return self.fc((x + mixed).mean(dim=-2))


@dataclass(frozen=True)
class ModelSpec:
    """A tiny model, built deterministically from a seed in float64 (or any dtype) on any device.

    family: one of :data:`ALL_FAMILIES`; ``hidden``: the hidden widths (MLP), ``(channels,)`` (CNN),
    ``(dim, heads)`` (attention) or ``(width,) * (L − 1)`` (deep linear, L layers); ``loss`` decides the
    head (a log-softmax for ``"nll"``); ``init_scale`` multiplies the default U(±1/√fan_in) init.
    """

    family: str
    input_shape: tuple[int, ...]
    num_outputs: int
    hidden: tuple[int, ...]
    loss: str = "cross_entropy"
    activation: str | None = None
    bias: bool = True
    attention: str = "single"
    init_scale: float = 1.0

    @property
    def smooth(self) -> bool:
        """Whether f(x; θ) is analytic in θ (so Gauss–Legendre converges exponentially)."""
        return self.family != "mlp-relu" and self.activation != "relu"

    @property
    def num_layers(self) -> int:
        """L, the number of weight matrices multiplied (deep linear: f is a polynomial of degree L in θ)."""
        if self.family == "deep-linear":
            return len(self.hidden) + 1
        raise ValueError("num_layers is defined for the deep-linear family only")

    @property
    def loss_spec(self) -> LossSpec:
        return LossSpec(self.loss)

    def _body(self, dtype: torch.dtype) -> nn.Module:
        fam = self.family
        if fam.startswith("mlp-") or fam == "deep-linear":
            layers: list[nn.Module] = []
            width = self.input_shape[0]
            for h in self.hidden:
                layers.append(nn.Linear(width, h, bias=self.bias, dtype=dtype))
                if fam != "deep-linear":
                    layers.append(_ACTIVATIONS[self.activation]())
                width = h
            layers.append(nn.Linear(width, self.num_outputs, bias=self.bias, dtype=dtype))
            return nn.Sequential(*layers)
        if fam == "cnn":
            return SmallCNN(self.hidden[0], self.num_outputs, self.activation, self.bias, dtype)
        if fam == "attention":
            dim, heads = self.hidden
            return TinySelfAttention(dim, heads, self.num_outputs, self.attention, dtype)
        raise ValueError(f"unknown model family {fam!r}; families: {ALL_FAMILIES}")

    def build(self, *, seed: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> nn.Module:
        """The model with parameters drawn from ``torch.Generator().manual_seed(seed)`` (no global RNG)."""
        body = self._body(dtype)
        model = nn.Sequential(body, _Head()) if self.loss == "nll" else body
        _reinit(model, torch.Generator().manual_seed(int(seed)), self.init_scale)
        return model.to(device)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self._body(torch.float64).parameters())


def _reinit(model: nn.Module, generator: torch.Generator, scale: float) -> None:
    """U(−s/√fan_in, s/√fan_in) for every parameter, from ``generator``; biases use their weight's fan-in."""
    with torch.no_grad():
        for module in model.modules():
            own = list(module.named_parameters(recurse=False))
            matrices = [p for _, p in own if p.dim() >= 2]
            default_fan_in = matrices[0][0].numel() if matrices else None
            for _, p in own:
                fan_in = p[0].numel() if p.dim() >= 2 else (default_fan_in or p.numel())
                bound = scale / math.sqrt(fan_in)
                values = torch.empty(p.shape, dtype=torch.float64).uniform_(-bound, bound, generator=generator)
                p.copy_(values.to(p.dtype))


def seeds() -> st.SearchStrategy[int]:
    """Seeds for ``torch.Generator``: data, initialization and batch order of one example."""
    return st.integers(min_value=0, max_value=2**31 - 1)


def _losses(losses: Sequence[str]) -> st.SearchStrategy[str]:
    return st.sampled_from(tuple(losses))


@st.composite
def mlp_models(draw, activations: Sequence[str] = ("tanh", "gelu"), losses: Sequence[str] = LOSSES):
    """MLPs with 1–2 hidden layers of width 2–8 on 2–5 inputs, 1–3 outputs (D ≤ ~120)."""
    activation = draw(st.sampled_from(tuple(activations)))
    loss = draw(_losses(losses))
    outputs = draw(st.integers(2 if loss != "mse" else 1, 3))
    return ModelSpec(
        family=f"mlp-{activation}",
        input_shape=(draw(st.integers(2, 5)),),
        num_outputs=outputs,
        hidden=tuple(draw(st.lists(st.integers(2, 8), min_size=1, max_size=2))),
        loss=loss,
        activation=activation,
        bias=draw(st.booleans()),
        init_scale=draw(st.sampled_from((1.0, 2.0))),
    )


@st.composite
def cnn_models(draw, activations: Sequence[str] = ("tanh", "gelu", "sigmoid"), losses: Sequence[str] = LOSSES):
    """Conv2d(1 → 1..3, 3×3) on 1×6×6 inputs, a smooth activation, pooling, a linear head (D ≤ ~70)."""
    loss = draw(_losses(losses))
    return ModelSpec(
        family="cnn",
        input_shape=(1, 6, 6),
        num_outputs=draw(st.integers(2 if loss != "mse" else 1, 3)),
        hidden=(draw(st.integers(1, 3)),),
        loss=loss,
        activation=draw(st.sampled_from(tuple(activations))),
        bias=draw(st.booleans()),
        init_scale=draw(st.sampled_from((1.0, 2.0))),
    )


@st.composite
def attention_models(draw, implementations: Sequence[str] = ("single", "multihead"), losses: Sequence[str] = LOSSES):
    """Self-attention over 2–3 tokens of dimension 4 (1 or 2 heads), mean pooling, a linear head; the
    log-softmax head (``loss="nll"``) or raw logits (``"cross_entropy"``). D ≤ ~100."""
    loss = draw(_losses(losses))
    implementation = draw(st.sampled_from(tuple(implementations)))
    heads = draw(st.sampled_from((1, 2))) if implementation == "multihead" else 1
    return ModelSpec(
        family="attention",
        input_shape=(draw(st.integers(2, 3)), 4),
        num_outputs=draw(st.integers(2 if loss != "mse" else 1, 3)),
        hidden=(4, heads),
        loss=loss,
        attention=implementation,
        init_scale=draw(st.sampled_from((1.0, 2.0))),
    )


@st.composite
def deep_linear_models(draw, layers: st.SearchStrategy[int] | None = None,
                       losses: Sequence[str] = ("mse", "cross_entropy")):
    """Deep linear networks of L = 1..6 layers (no activations), width 2–3, biases optional.

    f(x; θ) is a polynomial of degree L in θ, so along a segment ∂_α f has degree L − 1 and
    ``gauss_legendre(ceil(L / 2))`` integrates it exactly. ``init_scale`` 1–1.5 keeps the products O(1)
    (U(±√3/√fan_in) would preserve the variance exactly).
    """
    L = draw(layers if layers is not None else st.integers(1, 6))
    width = draw(st.integers(2, 3))
    loss = draw(_losses(losses))
    return ModelSpec(
        family="deep-linear",
        input_shape=(width,),
        num_outputs=draw(st.integers(2 if loss != "mse" else 1, 2)),
        hidden=(width,) * (L - 1),
        loss=loss,
        bias=draw(st.booleans()),
        init_scale=draw(st.sampled_from((1.0, 1.5))),
    )


def models(families: Sequence[str] = SMOOTH_FAMILIES, losses: Sequence[str] = LOSSES) -> st.SearchStrategy[ModelSpec]:
    """One of the named families (see :data:`ALL_FAMILIES`) with one of the named losses."""
    options = []
    for fam in families:
        if fam.startswith("mlp-"):
            options.append(mlp_models(activations=(fam[4:],), losses=losses))
        elif fam == "cnn":
            options.append(cnn_models(losses=losses))
        elif fam == "attention":
            options.append(attention_models(losses=losses))
        elif fam == "deep-linear":
            options.append(deep_linear_models(losses=[l for l in losses if l != "nll"] or ["mse"]))
        else:
            raise ValueError(f"unknown model family {fam!r}; families: {ALL_FAMILIES}")
    return st.one_of(*options)


# =====================================================================================================
# optimizers and schedules
# =====================================================================================================
@dataclass(frozen=True)
class ScheduleSpec:
    """An LR scheduler stepped once after every ``optimizer.step()``.

    kind: ``"none"``; ``"lambda"`` (``LambdaLR``, lr · gamma^t); ``"step"`` (``StepLR(step_size, gamma)``);
    ``"onecycle"`` (``OneCycleLR``, which also cycles Adam's β1 or SGD's momentum between 0.85 and 0.95).
    """

    kind: str = "none"
    gamma: float = 1.0
    step_size: int = 1

    def build(self, optimizer: torch.optim.Optimizer, num_steps: int):
        if self.kind == "none":
            return None
        if self.kind == "lambda":
            gamma = self.gamma
            return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: gamma**t)
        if self.kind == "step":
            return torch.optim.lr_scheduler.StepLR(optimizer, step_size=self.step_size, gamma=self.gamma)
        if self.kind == "onecycle":
            max_lr = [g["lr"] for g in optimizer.param_groups]
            return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr, total_steps=num_steps + 1)
        raise ValueError(f"unknown schedule kind {self.kind!r}")


@dataclass(frozen=True)
class OptimizerSpec:
    """A torch.optim optimizer with parameter groups and a scheduler, built for a given model.

    kind: ``"adamw"`` (``torch.optim.AdamW``), ``"adam"`` (``torch.optim.Adam``, with
    ``decoupled_weight_decay`` as given in ``options``) or ``"sgd"``. ``options`` are the constructor's
    keyword arguments (``lr``, ``betas``, ``momentum``, …); ``groups`` holds per-group overrides as
    ``(lr factor, weight decay or None)``; parameter k (in ``model.named_parameters()`` order) goes to
    group ``assignment[k % len(assignment)] % len(groups)``, and empty groups are dropped.
    """

    kind: str
    options: tuple[tuple[str, Any], ...]
    groups: tuple[tuple[float, float | None], ...] = ((1.0, None),)
    assignment: tuple[int, ...] = (0,)
    schedule: ScheduleSpec = field(default_factory=ScheduleSpec)

    @property
    def theorem(self) -> str:
        return THEOREM_OF_OPTIMIZER[self.kind]

    @property
    def opts(self) -> dict[str, Any]:
        return dict(self.options)

    def param_groups(self, model: nn.Module) -> list[dict]:
        params = list(model.parameters())
        members: list[list[torch.Tensor]] = [[] for _ in self.groups]
        for k, p in enumerate(params):
            members[self.assignment[k % len(self.assignment)] % len(self.groups)].append(p)
        base_lr = self.opts["lr"]
        out = []
        for (factor, wd), ps in zip(self.groups, members):
            if not ps:
                continue
            group: dict[str, Any] = {"params": ps, "lr": base_lr * factor}
            if wd is not None:
                group["weight_decay"] = wd
            out.append(group)
        return out

    def build(self, model: nn.Module, num_steps: int):
        """(optimizer, scheduler or None) for ``model``: the unmodified torch classes."""
        cls = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}[self.kind]
        optimizer = cls(self.param_groups(model), **self.opts)
        return optimizer, self.schedule.build(optimizer, num_steps)


def lr_schedules(kinds: Sequence[str] = ("none", "lambda", "step", "onecycle")) -> st.SearchStrategy[ScheduleSpec]:
    """LambdaLR (lr · γ^t, γ ∈ {0.5, 0.8, 1.1}), StepLR (γ ∈ {0.1, 0.5}, step size 1–3), OneCycleLR
    (its defaults: warm-up from max_lr/25, annealing to max_lr/2.5e5), or no scheduler."""
    options = []
    if "none" in kinds:
        options.append(st.just(ScheduleSpec("none")))
    if "lambda" in kinds:
        options.append(st.builds(ScheduleSpec, st.just("lambda"), st.sampled_from((0.5, 0.8, 1.1))))
    if "step" in kinds:
        options.append(st.builds(ScheduleSpec, st.just("step"), st.sampled_from((0.1, 0.5)), st.integers(1, 3)))
    if "onecycle" in kinds:
        options.append(st.just(ScheduleSpec("onecycle")))
    return st.one_of(*options)


def _param_group_layout(draw) -> tuple[tuple[tuple[float, float | None], ...], tuple[int, ...]]:
    n_groups = draw(st.integers(1, 3))
    groups = tuple(
        (draw(st.sampled_from((1.0, 0.5, 2.0))), draw(st.one_of(st.none(), st.just(0.0), st.floats(1e-3, 0.3))))
        for _ in range(n_groups)
    )
    assignment = tuple(draw(st.lists(st.integers(0, n_groups - 1), min_size=1, max_size=6)))
    return groups, assignment


@st.composite
def adamw_optimizers(
    draw,
    kinds: Sequence[str] = ("adamw", "adam"),
    schedules: st.SearchStrategy[ScheduleSpec] | None = None,
    coupled: bool | None = None,
    weight_decay: st.SearchStrategy[float] | None = None,
    lr: st.SearchStrategy[float] | None = None,
):
    """AdamW, or Adam with ``decoupled_weight_decay`` False (coupled L2: λθ enters both moments) or True.

    lr 1e-3..0.02, β1 ∈ {0} ∪ [0.5, 0.95], β2 ∈ [0.9, 0.999], ε ∈ {1e-8, 1e-6, 1e-3, 0.1}, weight
    decay 0 or in [1e-3, 0.3], ``amsgrad`` and ``maximize`` on or off, 1–3 groups, a scheduler.
    ``coupled`` forces Adam with coupled decay (True) or decoupled decay (False); ``weight_decay`` and
    ``lr`` replace those strategies.

    Why lr ≤ 0.02: Adam moves EVERY coordinate by up to ~lr per step whatever the gradient's size; at
    lr 0.1 (with a growing LambdaLR) a step of ~0.1 in each of ~90 coordinates moved an attention
    block's log-probabilities by units, and 8 Gauss–Legendre nodes left 4e-7 on it (16 nodes: 4e-14).
    """
    kind = draw(st.sampled_from(tuple(kinds)))
    options: dict[str, Any] = {
        "lr": draw(lr if lr is not None else st.floats(1e-3, 0.02)),
        "betas": (draw(st.one_of(st.just(0.0), st.floats(0.5, 0.95))), draw(st.floats(0.9, 0.999))),
        "eps": draw(st.sampled_from((1e-8, 1e-6, 1e-3, 0.1))),
        "weight_decay": draw(weight_decay if weight_decay is not None
                             else st.one_of(st.just(0.0), st.floats(1e-3, 0.3))),
        "amsgrad": draw(st.booleans()),
        "maximize": draw(st.booleans()),
    }
    if kind == "adam":
        options["decoupled_weight_decay"] = (not coupled) if coupled is not None else draw(st.booleans())
    groups, assignment = _param_group_layout(draw)
    schedule = draw(schedules if schedules is not None else lr_schedules())
    return OptimizerSpec(kind, tuple(options.items()), groups, assignment, schedule)


@st.composite
def sgd_optimizers(
    draw,
    schedules: st.SearchStrategy[ScheduleSpec] | None = None,
    momentum: st.SearchStrategy[float] | None = None,
    nesterov: bool | None = None,
    lr: st.SearchStrategy[float] | None = None,
):
    """torch.optim.SGD: lr 1e-3..0.01, momentum 0 or 0.1..0.95, dampening 0 or 0.1..0.9, Nesterov (only
    with momentum > 0 and dampening 0, as PyTorch requires), weight decay 0 or 1e-3..0.3, ``maximize``.
    ``nesterov=True`` forces Nesterov, ``False`` forbids it; ``momentum`` and ``lr`` replace those
    strategies.

    Why lr ≤ 0.01: one MSE sample far from its target has a large gradient; at lr 0.044 a single-sample
    step moved a GELU MLP by 0.5 per coordinate and 8 nodes left 7e-8 (at lr 0.01: 5e-16).
    """
    mu = draw(momentum if momentum is not None else st.one_of(st.just(0.0), st.floats(0.1, 0.95)))
    use_nesterov = nesterov if nesterov is not None else (mu > 0 and draw(st.booleans()))
    if use_nesterov and mu <= 0:
        mu = 0.9
    dampening = 0.0 if use_nesterov else draw(st.one_of(st.just(0.0), st.floats(0.1, 0.9)))
    options: dict[str, Any] = {
        "lr": draw(lr if lr is not None else st.floats(1e-3, 0.01)),
        "momentum": mu,
        "dampening": dampening,
        "nesterov": use_nesterov,
        "weight_decay": draw(st.one_of(st.just(0.0), st.floats(1e-3, 0.3))),
        "maximize": draw(st.booleans()),
    }
    groups, assignment = _param_group_layout(draw)
    kinds = ("none", "lambda", "step", "onecycle") if mu > 0 else ("none", "lambda", "step")
    schedule = draw(schedules if schedules is not None else lr_schedules(kinds))
    if schedule.kind == "onecycle" and mu == 0:  # OneCycleLR would switch a momentum-free SGD to momentum
        schedule = ScheduleSpec("none")
    return OptimizerSpec("sgd", tuple(options.items()), groups, assignment, schedule)


def optimizers(kinds: Sequence[str] = ("adamw", "adam", "sgd")) -> st.SearchStrategy[OptimizerSpec]:
    """Any of the named optimizer kinds with random settings."""
    options = []
    adam_kinds = tuple(k for k in kinds if k in ("adamw", "adam"))
    if adam_kinds:
        options.append(adamw_optimizers(kinds=adam_kinds))
    if "sgd" in kinds:
        options.append(sgd_optimizers())
    return st.one_of(*options)


# =====================================================================================================
# training schedules
# =====================================================================================================
@dataclass(frozen=True)
class TrainingSchedule:
    """What the loop does: one batch size per step, the weighting, and which steps freeze a parameter.

    Batches are consecutive chunks of random permutations of the ``num_samples`` ids (a new permutation
    whenever one is used up, so ids repeat across steps and momentum carries them). ``weighting``:
    ``"mean"`` (w = 1/|B_t|, the recorder's default), ``"sum"`` (w = 1) or ``"random"`` (w_i ~ U(0.1, 2) / |B_t|,
    passed to ``record_batch(ids, weights=w)``). At steps where ``frozen[t]`` is true, parameter
    ``frozen_param % num_parameter_tensors`` has ``requires_grad=False``, so its ``.grad`` stays None
    after ``zero_grad(set_to_none=True)`` and PyTorch skips it entirely at that step.
    """

    num_samples: int
    batch_sizes: tuple[int, ...]
    weighting: str = "mean"
    frozen_param: int = 0
    frozen: tuple[bool, ...] = ()

    @property
    def num_steps(self) -> int:
        return len(self.batch_sizes)


@st.composite
def training_schedules(draw, min_steps: int = 2, max_steps: int = 6, max_samples: int = 24, freeze: bool | None = None):
    """N = min_steps..max_steps steps over M ≤ ``max_samples`` samples, unequal batch sizes ending with a
    short batch, a weighting, and (unless ``freeze=False``) sometimes a parameter without gradient."""
    m = draw(st.integers(4, max_samples))
    n = draw(st.integers(min_steps, max_steps))
    full = draw(st.integers(2, min(m, 8)))
    sizes = [draw(st.one_of(st.just(full), st.integers(1, full))) for _ in range(n - 1)]
    sizes.append(draw(st.integers(1, max(1, full - 1))))  # a last, short batch
    weighting = draw(st.sampled_from(("mean", "sum", "random")))
    do_freeze = draw(st.booleans()) if freeze is None else freeze
    frozen = tuple(draw(st.lists(st.booleans(), min_size=n, max_size=n))) if do_freeze else ()
    if do_freeze and not any(frozen):
        frozen = (True,) + frozen[1:]
    return TrainingSchedule(m, tuple(sizes), weighting, draw(st.integers(0, 7)), frozen)


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one example: model, optimizer, schedule, seed, number of test inputs."""

    model: ModelSpec
    optimizer: OptimizerSpec
    schedule: TrainingSchedule
    seed: int
    num_test: int = 3

    @property
    def theorem(self) -> str:
        return self.optimizer.theorem

    def train(self, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float64) -> "TrainedRun":
        return train_and_record(self, device=device, dtype=dtype)


@st.composite
def training_runs(
    draw,
    families: Sequence[str] = SMOOTH_FAMILIES,
    optimizers_: st.SearchStrategy[OptimizerSpec] | None = None,
    optimizer_kinds: Sequence[str] = ("adamw", "adam", "sgd"),
    losses: Sequence[str] = LOSSES,
    model_strategy: st.SearchStrategy[ModelSpec] | None = None,
    schedule_strategy: st.SearchStrategy[TrainingSchedule] | None = None,
    num_test: st.SearchStrategy[int] | None = None,
):
    """A :class:`RunSpec`: a model from ``families`` (or ``model_strategy``), an optimizer of
    ``optimizer_kinds`` (or ``optimizers_``), a training schedule (``schedule_strategy``), a seed and
    2–4 test inputs (``num_test``). The optimizer is passed through :func:`stabilize`."""
    model = draw(model_strategy if model_strategy is not None else models(families, losses))
    optimizer = draw(optimizers_ if optimizers_ is not None else optimizers(optimizer_kinds))
    schedule = draw(schedule_strategy if schedule_strategy is not None else training_schedules())
    tests = draw(num_test if num_test is not None else st.integers(2, 4))
    return RunSpec(model, stabilize(model, optimizer, schedule), schedule, draw(seeds()), tests)


def stabilize(model: ModelSpec, optimizer: OptimizerSpec, schedule: TrainingSchedule) -> OptimizerSpec:
    """Keep a drawn run in the regime where training is well behaved, which the exactness tests assume.

    * ``maximize=True`` on the MSE loss is gradient ASCENT on a quadratic: it diverges geometrically, so
      it is turned off there (it stays on for cross-entropy, whose gradient is bounded in the logits).
    * SGD's step is lr · Σ_i w_i ∇ℓ_i: with ``weighting="sum"`` (w = 1) the lr is divided by the largest
      batch, and for a deep linear network of L layers (gradients grow like |W|^(L−1)) by 2^(L−2).
    Adam's steps are ~lr per coordinate whatever the gradient scale, so only the first rule applies.
    """
    options = dict(optimizer.options)
    if model.loss == "mse" and options.get("maximize"):
        options["maximize"] = False
    if optimizer.kind == "sgd":
        if schedule.weighting == "sum":
            options["lr"] = options["lr"] / max(schedule.batch_sizes)
        if model.family == "deep-linear" and model.num_layers > 2:
            options["lr"] = options["lr"] / 2 ** (model.num_layers - 2)
    return dataclasses.replace(optimizer, options=tuple(options.items()))


# =====================================================================================================
# the training loop
# =====================================================================================================
def property_settings(**overrides) -> settings:
    """Hypothesis settings for a property that takes pytest's function-scoped ``device`` fixture.

    Inherits the loaded profile (``max_examples``, ``derandomize``, ``deadline`` …) and adds
    ``HealthCheck.function_scoped_fixture`` to the suppressed checks: the fixture is a plain
    ``torch.device``, identical for every example, so sharing it across examples is safe.
    """
    suppressed = tuple(dict.fromkeys((*settings.default.suppress_health_check, HealthCheck.function_scoped_fixture,
                                      *overrides.pop("suppress_health_check", ()))))
    return settings(suppress_health_check=suppressed, **overrides)


@dataclass
class TrainedRun:
    """A finished, recorded training run.

    ``f_before`` / ``f_after`` are the LIVE model's outputs on ``test_inputs`` (one batched forward
    pass) before the first and after the last ``optimizer.step()``: the decomposition's f(x; θ_0) and
    f(x; θ_N), recomputed from the trajectory, must equal them.
    """

    model: nn.Module
    trajectory: em.Trajectory
    train_data: tuple[torch.Tensor, torch.Tensor]
    loss_fn: Callable[[torch.Tensor, Any], torch.Tensor]
    test_inputs: torch.Tensor
    f_before: torch.Tensor
    f_after: torch.Tensor
    optimizer: torch.optim.Optimizer
    scheduler: Any
    theorem: str
    spec: RunSpec | None = None

    @property
    def family(self) -> str:
        """The model family, as used to report residuals (attention: with its implementation)."""
        if self.spec is None:
            return type(self.model).__name__
        model = self.spec.model
        return f"attention-{model.attention}" if model.family == "attention" else model.family


def make_data(spec: ModelSpec, num_samples: int, num_test: int, seed: int, dtype: torch.dtype = torch.float64):
    """(X, Y, X_test) from ``torch.Generator().manual_seed(seed)``: standard normal inputs, class labels
    (classification) or standard normal targets (regression)."""
    g = torch.Generator().manual_seed(int(seed) ^ 0x5EED)
    X = torch.randn((num_samples, *spec.input_shape), generator=g, dtype=torch.float64)
    if spec.loss_spec.classification:
        Y = torch.randint(0, spec.num_outputs, (num_samples,), generator=g)
    else:
        Y = torch.randn((num_samples, spec.num_outputs), generator=g, dtype=torch.float64).to(dtype)
    X_test = torch.randn((num_test, *spec.input_shape), generator=g, dtype=torch.float64)
    return X.to(dtype), Y, X_test.to(dtype)


def model_outputs(model: nn.Module, inputs: torch.Tensor) -> torch.Tensor:
    """The live model's outputs on a batch, flattened per input to (X, O), without autograd."""
    with torch.no_grad():
        return model(inputs).reshape(inputs.shape[0], -1).detach().clone()


def _batches(schedule: TrainingSchedule, generator: torch.Generator) -> list[list[int]]:
    """Consecutive chunks of random permutations of the ids, each batch without repeats."""
    queue: list[int] = []
    out = []
    for size in schedule.batch_sizes:
        if not 1 <= size <= schedule.num_samples:
            raise ValueError(f"batch size {size} is not in 1..{schedule.num_samples}")
        batch: list[int] = []
        deferred: list[int] = []
        while len(batch) < size:
            if not queue:
                queue = torch.randperm(schedule.num_samples, generator=generator).tolist()
            i = queue.pop(0)
            (deferred if i in batch else batch).append(i)
        queue = deferred + queue
        out.append(batch)
    return out


def train_and_record(
    run: RunSpec | nn.Module,
    optimizer: OptimizerSpec | Callable[[nn.Module], Any] | None = None,
    schedule: TrainingSchedule | None = None,
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float64,
    seed: int = 0,
    data: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
    loss: LossSpec | None = None,
    record_gradients: bool = True,
) -> TrainedRun:
    """Train with the unmodified torch optimizer while :class:`~explaind_math.TrajectoryRecorder` records.

    Either pass a :class:`RunSpec` (everything is built from it), or your own ``nn.Module`` together with
    ``optimizer`` (an :class:`OptimizerSpec`, or a callable ``model -> optimizer`` or
    ``model -> (optimizer, scheduler)``), a :class:`TrainingSchedule`, ``data=(X, Y, X_test)`` and a
    :class:`LossSpec`. The loop, per step t::

        optimizer.zero_grad(set_to_none=True)
        (parameter frozen at t: requires_grad=False, so its .grad stays None)
        loss = Σ_{i∈B_t} w_{t,i} ℓ_i  (LossSpec.batched, reduction "none", then weighted)
        loss.backward(); recorder.record_batch(ids, weights=w); optimizer.step(); scheduler.step()

    Returns a :class:`TrainedRun` (the model is left on ``device`` with every parameter trainable).
    """
    spec: RunSpec | None = None
    if isinstance(run, RunSpec):
        spec = run
        model = spec.model.build(seed=spec.seed, device=device, dtype=dtype)
        optimizer, schedule, seed = spec.optimizer, spec.schedule, spec.seed
        X, Y, X_test = make_data(spec.model, spec.schedule.num_samples, spec.num_test, spec.seed, dtype)
        loss = spec.model.loss_spec
    else:
        model = run.to(device)
        if optimizer is None or schedule is None or data is None or loss is None:
            raise ValueError("train_and_record(model, ...) needs optimizer, schedule, data and loss")
        X, Y, X_test = data
    device = torch.device(device)
    X, Y, X_test = X.to(device), Y.to(device), X_test.to(device)
    generator = torch.Generator().manual_seed(int(seed) ^ 0xBA7C4)

    if isinstance(optimizer, OptimizerSpec):
        opt, scheduler = optimizer.build(model, schedule.num_steps)
        theorem = optimizer.theorem
    else:
        built = optimizer(model)
        opt, scheduler = built if isinstance(built, tuple) else (built, None)
        theorem = THEOREM_OF_OPTIMIZER["sgd" if isinstance(opt, torch.optim.SGD) else "adamw"]

    params = list(model.parameters())
    # freezing the only parameter tensor would leave nothing to train: then nothing is frozen
    frozen_tensor = params[schedule.frozen_param % len(params)] if schedule.frozen and len(params) > 1 else None
    f_before = model_outputs(model, X_test)
    recorder = em.TrajectoryRecorder(model, opt, record_gradients=record_gradients)
    try:
        for t, ids in enumerate(_batches(schedule, generator)):
            if schedule.weighting == "random":
                w = torch.empty(len(ids), dtype=torch.float64).uniform_(0.1, 2.0, generator=generator) / len(ids)
            elif schedule.weighting == "sum":
                w = torch.ones(len(ids), dtype=torch.float64)
            else:
                w = torch.full((len(ids),), 1.0 / len(ids), dtype=torch.float64)
            opt.zero_grad(set_to_none=True)
            if frozen_tensor is not None:
                frozen_tensor.requires_grad_(not schedule.frozen[t])
            index = torch.as_tensor(ids, device=device)
            losses = loss.batched(model(X[index]), Y[index])
            (losses * w.to(device=device, dtype=losses.dtype)).sum().backward()
            recorder.record_batch(ids, weights=w)
            opt.step()
            if scheduler is not None:
                scheduler.step()
    finally:
        recorder.close()
        for p in params:
            p.requires_grad_(True)
    return TrainedRun(
        model=model,
        trajectory=recorder.trajectory(),
        train_data=(X, Y),
        loss_fn=loss.per_sample,
        test_inputs=X_test,
        f_before=f_before,
        f_after=model_outputs(model, X_test),
        optimizer=opt,
        scheduler=scheduler,
        theorem=theorem,
        spec=spec,
    )


def decompose(run: TrainedRun, *, loss_fn: Callable | None = None, **kwargs) -> em.Influence:
    """Decompose the run with the theorem of its optimizer (Theorem 3.1 or Corollary 3.2).

    ``loss_fn`` replaces the run's per-sample loss (to check that a wrong one is refused); other keyword
    arguments (``quadrature``, ``keep``, ``params``, ``replay_rtol`` …) are passed on; ``device``
    defaults to the device the run trained on.
    """
    fn = em.decompose_sgd_momentum_training if run.trajectory.optimizer == "sgd" else em.decompose_adamw_training
    kwargs.setdefault("device", run.test_inputs.device)
    return fn(run.model, run.trajectory, loss_fn or run.loss_fn, run.train_data, run.test_inputs, **kwargs)
