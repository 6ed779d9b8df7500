"""Model and loss specifications for the property tests, and the strategies that draw them: tiny MLPs,
a CNN, self-attention blocks and deep linear networks (D ≲ 300), built in float64 from a seed."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

__all__ = [
    "SMOOTH_FAMILIES",
    "ALL_FAMILIES",
    "LOSSES",
    "LossSpec",
    "ModelSpec",
    "SmallCNN",
    "TinySelfAttention",
    "mlp_models",
    "cnn_models",
    "attention_models",
    "deep_linear_models",
    "models",
]

#: model families whose output is smooth (analytic) in θ: 8 Gauss–Legendre nodes are exact to rounding
SMOOTH_FAMILIES = ("mlp-tanh", "mlp-gelu", "cnn", "attention")
#: the per-sample losses (see :class:`LossSpec`)
LOSSES = ("cross_entropy", "nll", "mse")
#: every family the strategies can build
ALL_FAMILIES = (*SMOOTH_FAMILIES, "mlp-relu", "deep-linear")

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

