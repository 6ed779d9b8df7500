"""Modular addition and the one-layer Transformer of the paper's Appendix E.2, scaled down for a CPU.

The task (Power et al. 2022; Nanda et al. 2023; the paper's Section 5): every pair (a, b) with
a, b ∈ {0, …, p − 1} is one sample, written as the token sequence [a, b, =] with '=' the token p
(vocabulary p + 1), labelled c = (a + b) mod p. Sample id a·p + b indexes :func:`modular_addition_data`.

The model (:class:`ModularAdditionTransformer`) follows Appendix E.2: a token embedding, one encoder
layer as in Vaswani et al. (multi-head self-attention and a two-layer MLP, each with a residual
connection), and a linear decoder from the last position ('=') to the p residues. Choices, and why:

* Positional encoding: none by default, as in the paper's Appendix E.2 ("input embedding without
  positional encoding"); a + b is symmetric in a and b, and the '=' position is told apart by its own
  token, so attention needs no positions. ``positional="learned"`` adds a learned (3, d) table as in
  Nanda et al. (2023).
* Normalisation: post-LN (LayerNorm after each residual sum, Vaswani et al.) by default;
  ``norm="none"`` gives Nanda et al.'s LayerNorm-free variant.
* Activation: GELU by default. Along a step θ_t + α Δθ_t a ReLU network is only piecewise polynomial
  in α (∂_α f jumps where a pre-activation crosses 0), so fixed quadrature rules converge slowly and
  the adaptive rule bisects every kink (README, "Tolerances"); GELU is smooth and Gauss–Legendre
  converges exponentially. ``activation="relu"`` reproduces Nanda et al.'s choice.
* Attention is written out (q, k: the paper's "attention encoder"; v, o: its "attention decoder") so
  that torch.func vmaps it without a fallback. The key projection has no bias: softmax is invariant to
  it, so its gradient is 0 up to rounding and the decomposition's gradient-sum check would reject it.

With the defaults and ``ModularAdditionTransformer(p, d, heads, width)`` the parameters are created in
the same order, named the same, and the forward pass is the same as the model of
``benchmarks/bench_scaling.py``, so that script can import this one.

:func:`train_full_batch` trains it with ``torch.optim.AdamW`` on full batches (Appendix E.2: fixed
learning rate, weight decay, betas (0.9, 0.98)) and records the run with
:class:`~explaind_math.TrajectoryRecorder`.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ExplaindError
from ..recording import TrajectoryRecorder
from ..trajectory import Trajectory

__all__ = [
    "ModularAdditionTransformer",
    "PaperModularAdditionTransformer",
    "paper_token_data",
    "TrainingRun",
    "modular_addition_data",
    "train_test_split",
    "sample_id",
    "paper_layers",
    "PAPER_LAYER_ORDER",
    "per_sample_loss",
    "accuracy",
    "train_full_batch",
]


# ------------------------------------------------------------------------------------------- data
def _check_modulus(p: int) -> None:
    if not isinstance(p, int) or isinstance(p, bool) or p < 2:
        raise ExplaindError(f"the modulus p must be an integer ≥ 2, got {p!r}")


def modular_addition_data(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All p² samples: tokens (p², 3) = [a, b, p] (p is the '=' token) and labels (p²,) = (a + b) mod p.

    Sample id a·p + b is row a·p + b (:func:`sample_id`)."""
    _check_modulus(p)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    tokens = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    return tokens, (a + b) % p


def sample_id(a, b, p: int):
    """The id (row of :func:`modular_addition_data`) of the pair (a, b): a·p + b."""
    return a * p + b


def train_test_split(p: int, train_fraction: float, seed: int = 0, *,
                     symmetric: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random split of the p² sample ids: (train ids, test ids), each sorted.

    ``symmetric=True`` (default) splits the p(p + 1)/2 unordered pairs {a, b}: round(train_fraction ·
    p(p + 1)/2) of them go to training with both orders (a, b) and (b, a). Without positional encoding the
    model sees [a, b, =] and [b, a, =] as the same input, so an ordered split would put copies of training
    inputs into the test set (with train fraction 1/2 about half the test set: a test accuracy near 0.5
    before any generalization). ``symmetric=False`` splits the ordered pairs: round(train_fraction · p²).
    Either way at least one pair goes to each side, and the same arguments always give the same split,
    independent of the global random state."""
    _check_modulus(p)
    if not 0.0 < float(train_fraction) < 1.0:
        raise ExplaindError(f"train_fraction must lie strictly between 0 and 1, got {train_fraction!r}")
    generator = torch.Generator().manual_seed(int(seed))
    if not symmetric:
        total = p * p
        n_train = min(max(1, round(float(train_fraction) * total)), total - 1)
        order = torch.randperm(total, generator=generator)
        return order[:n_train].sort().values, order[n_train:].sort().values
    a, b = torch.triu_indices(p, p)  # a ≤ b: each unordered pair once
    total = a.numel()
    n_train = min(max(1, round(float(train_fraction) * total)), total - 1)
    order = torch.randperm(total, generator=generator)

    def both_orders(chosen: torch.Tensor) -> torch.Tensor:
        ids = torch.cat([sample_id(a[chosen], b[chosen], p), sample_id(b[chosen], a[chosen], p)])
        return ids.unique()  # sorted; a diagonal pair (a, a) once

    return both_orders(order[:n_train]), both_orders(order[n_train:])


# ------------------------------------------------------------------------------------------- model
class ModularAdditionTransformer(nn.Module):
    """One encoder layer over [a, b, =] and a linear decoder from the last position (Appendix E.2).

        h₀ = E[tokens] (+ P)                          embedding (p + 1 tokens), optional positions P
        h₁ = N₁(h₀ + O · MultiHeadAttention(Q h₀, K h₀, V h₀))
        h₂ = N₂(h₁ + W₂ σ(W₁ h₁ + b₁) + b₂)          σ = GELU (default) or ReLU
        f(x) = D h₂[last] + d                         logits over the p residues

    N₁, N₂ are LayerNorms (``norm="post"``) or the identity (``norm="none"``).

    Args:
        p: the modulus (vocabulary p + 1, outputs p).
        d_model: width of the residual stream; a multiple of ``heads``.
        heads: attention heads, each of width d_model / heads.
        mlp_width: width of the MLP's hidden layer (the paper: 512; Nanda et al.: 4 · d_model).
        activation: ``"gelu"`` (smooth: Gauss–Legendre converges) or ``"relu"``.
        positional: ``"none"`` (the paper) or ``"learned"`` (Nanda et al.).
        norm: ``"post"`` (LayerNorm after each residual sum) or ``"none"``.
    """

    def __init__(self, p: int, d_model: int = 32, heads: int = 4, mlp_width: int = 64, *,
                 activation: str = "gelu", positional: str = "none", norm: str = "post"):
        super().__init__()
        _check_modulus(p)
        if heads < 1 or d_model < 1 or d_model % heads:
            raise ExplaindError(f"d_model ({d_model}) must be a positive multiple of the number of heads ({heads})")
        if mlp_width < 1:
            raise ExplaindError(f"mlp_width must be positive, got {mlp_width}")
        if activation not in ("gelu", "relu"):
            raise ExplaindError(f"activation must be 'gelu' or 'relu', got {activation!r}")
        if positional not in ("none", "learned"):
            raise ExplaindError(f"positional must be 'none' or 'learned', got {positional!r}")
        if norm not in ("post", "none"):
            raise ExplaindError(f"norm must be 'post' or 'none', got {norm!r}")
        self.p, self.heads, self.activation, self.norm = p, heads, activation, norm
        # creation order and names as in benchmarks/bench_scaling.py (same initial values for a seed)
        self.embed = nn.Embedding(p + 1, d_model)
        self.q, self.v, self.o = nn.Linear(d_model, d_model), nn.Linear(d_model, d_model), nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model, bias=False)  # no key bias: softmax ignores it (module docstring)
        self.norm1 = nn.LayerNorm(d_model) if norm == "post" else nn.Identity()
        self.linear1 = nn.Linear(d_model, mlp_width)
        self.linear2 = nn.Linear(mlp_width, d_model)
        self.norm2 = nn.LayerNorm(d_model) if norm == "post" else nn.Identity()
        self.decoder = nn.Linear(d_model, p)
        if positional == "learned":
            self.position = nn.Parameter(torch.randn(3, d_model) / math.sqrt(d_model))
        else:
            self.register_parameter("position", None)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, p) for tokens (B, 3); a single sequence (3,) gives (p,)."""
        single = tokens.dim() == 1
        if single:
            tokens = tokens.unsqueeze(0)
        h = self.embed(tokens)  # (B, S, d)
        if self.position is not None:
            h = h + self.position[: h.shape[1]]
        b, s, d = h.shape
        dh = d // self.heads

        def split(z):
            return z.reshape(b, s, self.heads, dh).transpose(1, 2)  # (B, heads, S, dh)

        q, k, v = split(self.q(h)), split(self.k(h)), split(self.v(h))
        attention = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dh), dim=-1)
        mixed = (attention @ v).transpose(1, 2).reshape(b, s, d)
        h = self.norm1(h + self.o(mixed))
        act = F.gelu if self.activation == "gelu" else F.relu
        h = self.norm2(h + self.linear2(act(self.linear1(h))))
        out = self.decoder(h[:, -1])
        return out[0] if single else out


class PaperModularAdditionTransformer(nn.Module):
    """The one-layer Transformer of the paper's code (issue 14): a ReLU model, as the paper trains it.

        h₀ = √d · E[tokens]                                tokens [a, P, b, P + 1], vocabulary P + 2
        h₁ = h₀ + Σ_heads O_k · SDPA(W_k h₀, W_k h₀, W_k h₀)   four heads of width d / heads; one
                                                           projection W_k per head serves as query,
                                                           key and value; per-head output maps O_k
        h₂ = h₁ + ReLU(W₂ ReLU(W₁ h₁ + b₁) + b₂)           MLP d → width → d, ReLU after each linear
        f(x) = log_softmax(D h₂[last])                     decoder without bias, P + 2 outputs

    No positional encoding, no layer norm. Along a step θ_t + α Δθ_t it is smooth (softmax attention)
    except where a pre-activation of either ReLU crosses 0: the case of MATH.md §13.
    """

    def __init__(self, p: int = 23, d_model: int = 32, heads: int = 4, mlp_width: int = 64):
        super().__init__()
        _check_modulus(p)
        if heads < 1 or d_model < 1 or d_model % heads:
            raise ExplaindError(f"d_model ({d_model}) must be a positive multiple of the number of heads ({heads})")
        self.p, self.d_model, self.heads = p, d_model, heads
        self.embed = nn.Embedding(p + 2, d_model)
        width = d_model // heads
        self.head_projections = nn.ModuleList(nn.Linear(d_model, width) for _ in range(heads))
        self.head_outputs = nn.ModuleList(nn.Linear(width, d_model) for _ in range(heads))
        self.linear1 = nn.Linear(d_model, mlp_width)
        self.linear2 = nn.Linear(mlp_width, d_model)
        self.decoder = nn.Linear(d_model, p + 2, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Log-probabilities (B, P + 2) at the last position for tokens (B, 4); (4,) gives (P + 2,)."""
        single = tokens.dim() == 1
        if single:
            tokens = tokens.unsqueeze(0)
        h = self.embed(tokens) * math.sqrt(self.d_model)
        attended = h
        for project, output in zip(self.head_projections, self.head_outputs):
            z = project(h)
            weights = torch.softmax(z @ z.transpose(-1, -2) / math.sqrt(z.shape[-1]), dim=-1)
            attended = attended + output(weights @ z)  # scaled dot-product attention, written out
        h = attended + F.relu(self.linear2(F.relu(self.linear1(attended))))
        out = F.log_softmax(self.decoder(h[:, -1]), dim=-1)
        return out[0] if single else out


def paper_token_data(p: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All p² samples as the paper's code writes them: tokens (p², 4) = [a, p, b, p + 1] ('+' is token p,
    '=' token p + 1) and labels (a + b) mod p; sample id a·p + b (:func:`sample_id`)."""
    _check_modulus(p)
    a, b = torch.meshgrid(torch.arange(p), torch.arange(p), indexing="ij")
    a, b = a.reshape(-1), b.reshape(-1)
    tokens = torch.stack([a, torch.full_like(a, p), b, torch.full_like(a, p + 1)], dim=1)
    return tokens, (a + b) % p


#: the paper's layer names (legend of its Figure 3a), in the order of the forward pass
PAPER_LAYER_ORDER = ("embedding", "attention encoder", "attention decoder", "linear 1", "linear 2", "decoder", "norms")

_LAYER_OF_MODULE = {
    "embed": "embedding", "position": "embedding",
    "q": "attention encoder", "k": "attention encoder",
    "v": "attention decoder", "o": "attention decoder",
    "linear1": "linear 1", "linear2": "linear 2",
    "norm1": "norms", "norm2": "norms",
    "decoder": "decoder",
    "head_projections": "attention encoder", "head_outputs": "attention decoder",
}


def paper_layers(model: ModularAdditionTransformer) -> dict[str, str]:
    """Parameter name → the paper's layer name (Appendix E.2 and its Figure 3a): "embedding" (token
    embedding and positions), "attention encoder" (q, k), "attention decoder" (v, o), "linear 1",
    "linear 2", "decoder", and "norms" (the LayerNorms' gains and biases, which the paper does not name).
    Pass it as ``params=`` to a theorem function to keep one parameter row per layer."""
    mapping = {}
    for name, _ in model.named_parameters():
        module = name.split(".", 1)[0]
        if module not in _LAYER_OF_MODULE:
            raise ExplaindError(f"parameter {name!r} belongs to no layer of the modular-addition Transformer")
        mapping[name] = _LAYER_OF_MODULE[module]
    return mapping


# ------------------------------------------------------------------------------------------- training
def per_sample_loss(out: torch.Tensor, y) -> torch.Tensor:
    """ℓ_i = cross-entropy of one sample's logits (p,) against its label; the training loss is the mean."""
    return F.cross_entropy(out, y)


@torch.no_grad()
def accuracy(model: nn.Module, tokens: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of samples whose argmax logit is the label."""
    if tokens.shape[0] == 0:
        return float("nan")
    return float((model(tokens).argmax(-1) == labels).double().mean())


@dataclass
class TrainingRun:
    """A finished (recorded) full-batch AdamW run.

    ``history`` holds one row per evaluation: (step, train loss, train accuracy, test accuracy), the
    step counting optimizer steps done before the evaluation (0: the initial model)."""

    model: nn.Module
    trajectory: Trajectory | None
    history: list[tuple[int, float, float, float]] = field(default_factory=list)
    seconds: float = 0.0

    def first_step_reaching(self, test_accuracy: float) -> int | None:
        """The first evaluated step at which test accuracy ≥ the given value (None: never)."""
        return next((s for s, _, _, acc in self.history if acc >= test_accuracy), None)


def train_full_batch(
    model: nn.Module,
    tokens: torch.Tensor,
    labels: torch.Tensor,
    train_ids: torch.Tensor | Sequence[int],
    test_ids: torch.Tensor | Sequence[int] | None = None,
    *,
    steps: int,
    lr: float = 1e-3,
    weight_decay: float = 1.0,
    betas: tuple[float, float] = (0.9, 0.98),
    record: bool = True,
    record_gradients: bool = False,
    eval_every: int = 10,
    stop_at_test_accuracy: float | None = None,
    extra_steps_after_stop: int = 0,
) -> TrainingRun:
    """Full-batch AdamW on the training ids (Appendix E.2), recorded step by step.

    Every step: ``zero_grad``; loss = mean over the training ids of :func:`per_sample_loss`; backward;
    ``recorder.record_batch(train_ids)`` (weights 1/|train|); ``optimizer.step()``. The unit ids are
    the sample ids, so decompose with ``train_data=(tokens, labels)`` (the whole table, indexed by id).

    Args:
        steps: the most optimizer steps to take.
        record: record with :class:`~explaind_math.TrajectoryRecorder` (θ_t and the AdamW state per
            step); ``record_gradients`` also stores each step's gradient (one more copy of θ per step,
            it lets the decomposition check the gradient sum).
        eval_every: evaluate train loss/accuracy and test accuracy every this many steps (and at the end).
        stop_at_test_accuracy: stop once test accuracy reaches this value, after
            ``extra_steps_after_stop`` more steps (the late "cleanup" phase).
    """
    train_ids = torch.as_tensor(train_ids, dtype=torch.long)
    test_ids = None if test_ids is None else torch.as_tensor(test_ids, dtype=torch.long)
    if steps < 1:
        raise ExplaindError(f"steps must be ≥ 1, got {steps}")
    if train_ids.numel() == 0:
        raise ExplaindError("train_full_batch needs at least one training id")
    if eval_every < 1:
        raise ExplaindError(f"eval_every must be ≥ 1, got {eval_every}")
    x_train, y_train = tokens[train_ids], labels[train_ids]
    has_test = test_ids is not None and test_ids.numel() > 0
    x_test, y_test = (tokens[test_ids], labels[test_ids]) if has_test else (None, None)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=betas, weight_decay=weight_decay)
    recorder = TrajectoryRecorder(model, optimizer, record_gradients=record_gradients) if record else None
    history: list[tuple[int, float, float, float]] = []

    def evaluate(step: int) -> None:
        with torch.no_grad():
            out = model(x_train)
            loss = float(F.cross_entropy(out, y_train))
            acc_train = float((out.argmax(-1) == y_train).double().mean())
        acc_test = accuracy(model, x_test, y_test) if has_test else float("nan")
        history.append((step, loss, acc_train, acc_test))

    start = time.perf_counter()
    evaluate(0)
    stop_after = None
    try:
        for step in range(1, steps + 1):
            optimizer.zero_grad()
            F.cross_entropy(model(x_train), y_train).backward()  # mean over the batch: w = 1/|train|
            if recorder is not None:
                recorder.record_batch(train_ids)
            optimizer.step()
            if step % eval_every == 0 or step == steps or step == stop_after:
                evaluate(step)
                if (stop_after is None and stop_at_test_accuracy is not None and has_test
                        and history[-1][3] >= stop_at_test_accuracy):
                    stop_after = step + extra_steps_after_stop
            if stop_after is not None and step >= stop_after:
                if history[-1][0] != step:
                    evaluate(step)
                break
    finally:
        if recorder is not None:
            recorder.close()
    seconds = time.perf_counter() - start
    return TrainingRun(model, recorder.trajectory() if recorder is not None else None, history, seconds)
