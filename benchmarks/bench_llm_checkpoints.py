"""Toward LLMs: Remark F.3 (checkpoints only) on a GPT-style byte-level language model of ≥ 10M parameters.

What is built and measured (MATH.md §8, Remark F.3; issue 7, "Toward LLMs"):

* The model: a decoder-only Transformer written here with torch.nn — token and learned position
  embeddings, ``n_layers`` pre-LN blocks (LayerNorm → causal multi-head self-attention → residual;
  LayerNorm → MLP d → 4d → d with GELU → residual), a final LayerNorm and an UNTIED linear head to the
  256 byte values (no bias). No dropout, no BatchNorm. The query/key/value projection has no bias: the
  key bias has gradient 0 up to rounding (softmax is invariant to it), which would only make the
  library's per-tensor gradient-sum check compare rounding noise with rounding noise. Full mode:
  d_model 384, 6 layers, 6 heads, context 64 bytes: 10,861,824 trained parameters (printed).
* The data, without any download: a byte-level corpus (vocabulary 256) made of the source files of a
  fixed list of Python standard-library modules, read at run time through ``inspect.getsourcefile``
  (so the bytes depend on the Python version; where no source is found, the module is skipped, and if
  none is found the corpus falls back to a synthetic, seeded byte sequence — the run says which). The
  corpus is cut into non-overlapping windows of ``seq_len + 1`` bytes: input = the first ``seq_len``
  bytes, target = the next-byte sequence. The first windows are the training set, the last
  ``test_batch`` windows (disjoint, from the end of the corpus) the held-out batch.
* Training: ``torch.optim.AdamW`` in float32 on shuffled mini-batches of ``train_batch`` sequences
  (loss: mean token cross-entropy over the batch, i.e. the mean over sequences of each sequence's mean
  token cross-entropy, so w_{t,i} = 1/|B_t|), a linear learning-rate warm-up (LambdaLR). Before the
  steps listed in ``checkpoint_steps`` the optimizer is snapshotted with ``checkpoint_from_optimizer``
  and the checkpoint (θ, m, v, k, group values) is saved to disk with the batch that step used.
* Per checkpoint, in a FRESH subprocess that only loads the checkpoint file (checkpoint-only mode: no
  trajectory): ``decompose_from_checkpoints`` simulates that AdamW step on the batch and decomposes the
  change of the held-out loss, h(f(x; θ)) = mean token cross-entropy of sequence x
  (``h=targets.per_sample_loss(loss_fn)``, ``test_labels`` = the held-out next bytes), kept per layer
  (``params`` = name → "embed" | "block.k" | "head") and per training sequence of the batch
  (``keep=("param", "test", "unit", "output")``). Quadrature: ``adaptive(gauss_legendre(4), 1e-8)``
  (4 nodes when the update is tame, bisected where it is not; ``--tol 0`` for the fixed rule
  ``gauss_legendre(--nodes)``). The batch is the one training took from that checkpoint, so the
  simulated update is the real one: the column "sim−live" is max |h(f(x; θ_after)) simulated − the live
  model's after its real step|. Every checkpoint in float32; in float64 the first (``--float64 first``,
  the default), all or none.
* Reported per checkpoint and dtype: wall time of the call (after a warm-up on one sequence, one test
  input and one node, in the same process); peak memory — CPU: peak resident set size during warm-up and
  call minus the RSS before them (VmHWM reset through /proc/self/clear_refs); CUDA:
  torch.cuda.max_memory_allocated minus memory_allocated before them; the certified residual
  max |f(θ_after) − reconstruction| (absolute and relative to 1 + |Δf|); the replay error; and the share
  of the time spent in per-sample gradients (vmap∘grad over the batch), in Jacobians of the target at
  the quadrature nodes (vmap∘jacrev over the held-out batch), in JVPs (the adaptive rule's probes along
  Δθ_t, or the JVP contraction path), in forward evaluations of the target, and in the contraction
  Φ_t · update_t per layer and sequence; "other" is the remainder (the copy of the model, the simulated
  AdamW step and its recording, the AdamW table's per-unit buffer arithmetic, the quadrature sum, the
  replay check). The shares come from timers wrapped around those five library functions during the call
  (torch.cuda.synchronize around each on CUDA).
  The first float32 call also runs under cProfile: its functions with the most own time are printed.
* CPU memory and glibc: with the default allocator, memory freed by the warm-up or by earlier tensors
  is partly reused from the heap, so the RSS peak is an approximation of the peak of live tensors (on
  the full model it read about 10–15 % above it). ``--mmap-every-block`` runs the workers with
  MALLOC_MMAP_THRESHOLD_=128 KiB (as bench_scaling.py's memory runs do): every block above 128 KiB is
  then mapped and unmapped by itself and the RSS follows the live tensors, but each fresh block is
  page-faulted in, which roughly doubled the times here — use it for memory, not for time.
* Then, per checkpoint, the decomposition itself (float32): the held-out batch's mean loss change split
  into the batch's sequences (kernel), the first-moment unit (carried_state: the stored exp_avg) and
  weight decay, per layer.

The tensor sizes that bound memory are printed too: D (parameters), B·D (per-sample gradients, the
per-unit buffers and updates of the AdamW table), X·D (the Jacobian of the held-out batch at one node,
and its running quadrature sum), in the dtype of the run.

Run (CPU: --threads intra-op threads, default 2 — on a loaded machine use 1: two OpenMP threads on two
busy cores ran up to 6× slower than one here; nothing is asserted about time):

    python benchmarks/bench_llm_checkpoints.py                  # full: ≥ 10M parameters, 3 checkpoints
    python benchmarks/bench_llm_checkpoints.py --quick          # ~1M parameters, 1 checkpoint, < 1 min
    python benchmarks/bench_llm_checkpoints.py --device cuda --float64 all    # the same on a GPU
    python benchmarks/bench_llm_checkpoints.py --device cuda --d-model 768 --layers 12 --heads 12 --float64 none

Times on a shared machine are preliminary.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import gc
import importlib
import inspect
import json
import math
import os
import platform
import pstats
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em
import explaind_math.engine.contract as em_contract
import explaind_math.engine.context as em_context
from explaind_math.features import FunctionalModel

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scaling import _proc_status_kb, _reset_peak_rss  # noqa: E402  (peak-RSS helpers of the same suite)

KEEP = ("param", "test", "unit", "output")
VOCAB = 256  # bytes

#: standard-library modules whose source files make the corpus (those without a source file are skipped)
CORPUS_MODULES = (
    "argparse", "textwrap", "difflib", "inspect", "dataclasses", "string", "heapq", "bisect",
    "fractions", "statistics", "calendar", "json.decoder", "json.encoder", "functools", "shlex",
)


# --------------------------------------------------------------------------- configuration
@dataclass(frozen=True)
class LLMConfig:
    d_model: int = 384
    n_layers: int = 6
    n_heads: int = 6
    seq_len: int = 64
    train_batch: int = 8  # B: sequences per training step, the units of each decomposed update
    test_batch: int = 8  # X: held-out sequences whose losses are decomposed
    train_steps: int = 40
    checkpoint_steps: tuple = (10, 20, 30)  # checkpoints taken before these steps
    warmup_steps: int = 10
    lr: float = 5e-4
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    nodes: int = 4  # Gauss–Legendre nodes per update (the base rule when tol is set)
    tol: float | None = 1e-8  # adaptive(gauss_legendre(nodes), tol); None: the fixed rule gauss_legendre(nodes)
    float64: str = "first"  # which checkpoints are also decomposed in float64: "none", "first" or "all"
    corpus_bytes: int = 200_000  # at most this many bytes of the corpus are used
    seed: int = 0


FULL = LLMConfig()
QUICK = LLMConfig(d_model=128, n_layers=5, n_heads=4, seq_len=64, train_batch=4, test_batch=4, train_steps=6,
                  checkpoint_steps=(5,), warmup_steps=2, corpus_bytes=40_000, float64="all")
SMOKE = LLMConfig(d_model=32, n_layers=2, n_heads=4, seq_len=16, train_batch=3, test_batch=2, train_steps=3,
                  checkpoint_steps=(2,), warmup_steps=1, corpus_bytes=4_000, float64="all")


# --------------------------------------------------------------------------- the model
class CausalSelfAttention(nn.Module):
    """Multi-head self-attention with a causal mask, written out (no fused kernel) so that torch.func
    vmaps it: softmax(q kᵀ / √d_head + mask) v per head, then an output projection."""

    def __init__(self, d_model: int, n_heads: int, seq_len: int):
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not a multiple of n_heads {n_heads}")
        self.n_heads = n_heads
        self.qkv = nn.Linear(d_model, 3 * d_model, bias=False)
        self.proj = nn.Linear(d_model, d_model)
        self.register_buffer("causal", torch.ones(seq_len, seq_len, dtype=torch.bool).tril(), persistent=False)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        b, s, d = h.shape
        dh = d // self.n_heads
        q, k, v = (z.reshape(b, s, self.n_heads, dh).transpose(1, 2) for z in self.qkv(h).split(d, dim=-1))
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(dh)
        scores = scores.masked_fill(~self.causal[:s, :s], float("-inf"))
        mixed = (torch.softmax(scores, dim=-1) @ v).transpose(1, 2).reshape(b, s, d)
        return self.proj(mixed)


class Block(nn.Module):
    """Pre-LN Transformer block: h + attn(LN(h)), then h + MLP(LN(h)) with MLP = Linear∘GELU∘Linear (4×)."""

    def __init__(self, d_model: int, n_heads: int, seq_len: int):
        super().__init__()
        self.ln1 = nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, seq_len)
        self.ln2 = nn.LayerNorm(d_model)
        self.fc = nn.Linear(d_model, 4 * d_model)
        self.out = nn.Linear(4 * d_model, d_model)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.attn(self.ln1(h))
        return h + self.out(F.gelu(self.fc(self.ln2(h))))


class ByteGPT(nn.Module):
    """GPT-style decoder-only language model over bytes: (B, T) int64 → (B, T, 256) next-byte logits.
    Token and position embeddings, pre-LN blocks, final LayerNorm, untied head without bias."""

    def __init__(self, cfg: LLMConfig):
        super().__init__()
        self.tok_emb = nn.Embedding(VOCAB, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.seq_len, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg.d_model, cfg.n_heads, cfg.seq_len) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, VOCAB, bias=False)
        for name, p in self.named_parameters():  # GPT-2's initialisation scale
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device)
        h = self.tok_emb(tokens) + self.pos_emb(positions)
        for block in self.blocks:
            h = block(h)
        return self.lm_head(self.ln_f(h))


def layer_of(name: str) -> str:
    """The layer a parameter belongs to: "embed" (token and position embeddings), "block.k", "head"
    (final LayerNorm and output projection)."""
    if name.startswith(("tok_emb.", "pos_emb.")):
        return "embed"
    if name.startswith("blocks."):
        return "block." + name.split(".")[1]
    return "head"


def layer_map(model: nn.Module) -> dict[str, str]:
    return {n: layer_of(n) for n, _ in model.named_parameters()}


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def loss_fn(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One sequence's loss ℓ_i: the mean next-byte cross-entropy over its positions, out (T, 256), y (T,)."""
    return F.cross_entropy(out, y)


# --------------------------------------------------------------------------- the data
def stdlib_corpus(max_bytes: int, seed: int) -> tuple[bytes, str]:
    """The concatenated source files of CORPUS_MODULES (at most max_bytes), and a description; a seeded
    synthetic byte sequence (printable ASCII with a repeated-word structure) if no source file exists."""
    parts, used = [], []
    for name in CORPUS_MODULES:
        try:
            path = inspect.getsourcefile(importlib.import_module(name))
        except (ImportError, TypeError):
            path = None
        if path and Path(path).is_file():
            parts.append(Path(path).read_bytes())
            used.append(name)
        if sum(len(p) for p in parts) >= max_bytes:
            break
    if parts:
        text = b"".join(parts)[:max_bytes]
        return text, f"source of stdlib modules {', '.join(used)} (Python {platform.python_version()}), {len(text):,} bytes"
    g = torch.Generator().manual_seed(seed)
    words = [bytes(torch.randint(97, 123, (int(k),), generator=g).tolist()) for k in torch.randint(2, 9, (200,), generator=g)]
    picks = torch.randint(0, len(words), (max_bytes // 4,), generator=g).tolist()
    text = b" ".join(words[k] for k in picks)[:max_bytes]
    return text, f"SYNTHETIC (no stdlib source files found): seeded words, {len(text):,} bytes"


@dataclass
class Data:
    X: torch.Tensor  # (M, T) int64 training inputs
    Y: torch.Tensor  # (M, T) int64 next bytes
    X_test: torch.Tensor  # (X, T) held-out inputs
    Y_test: torch.Tensor  # (X, T)
    description: str


def make_data(cfg: LLMConfig) -> Data:
    text, description = stdlib_corpus(cfg.corpus_bytes, cfg.seed)
    window = cfg.seq_len + 1
    count = len(text) // window
    if count < cfg.test_batch + cfg.train_batch:
        raise ValueError(f"the corpus has {count} windows of {window} bytes; need at least "
                         f"{cfg.test_batch + cfg.train_batch}")
    windows = torch.tensor(list(text[: count * window]), dtype=torch.long).reshape(count, window)
    train, held_out = windows[: count - cfg.test_batch], windows[count - cfg.test_batch:]
    return Data(train[:, :-1].contiguous(), train[:, 1:].contiguous(), held_out[:, :-1].contiguous(),
                held_out[:, 1:].contiguous(), f"{description}; {train.shape[0]} training and "
                f"{held_out.shape[0]} held-out sequences of {cfg.seq_len} bytes")


def build_model(cfg: LLMConfig, device: torch.device) -> ByteGPT:
    torch.manual_seed(cfg.seed)
    model = ByteGPT(cfg).to(device)
    model.eval()  # no dropout or BatchNorm anyway; eval() makes the recorder's module check trivial
    return model


# --------------------------------------------------------------------------- training with checkpoints
def held_out_losses(model: nn.Module, data: Data, device: torch.device) -> torch.Tensor:
    """h(f(x; θ)) per held-out sequence (its mean token cross-entropy), float64 on the CPU."""
    with torch.no_grad():
        logits = model(data.X_test.to(device))
        losses = F.cross_entropy(logits.transpose(1, 2), data.Y_test.to(device), reduction="none").mean(1)
    return losses.double().cpu()


def train_with_checkpoints(cfg: LLMConfig, model: nn.Module, data: Data, device: torch.device) -> tuple[list[dict], float]:
    """Train with AdamW; before each step in cfg.checkpoint_steps take checkpoint_from_optimizer and keep
    the batch that step uses, and the live held-out losses before and after the step. Returns the
    entries and the training time (checkpointing and evaluation excluded)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay)
    warmup = max(cfg.warmup_steps, 1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda t: min(1.0, (t + 1) / warmup))
    g = torch.Generator().manual_seed(cfg.seed + 1)
    order: list[int] = []
    entries, seconds = [], 0.0
    for t in range(cfg.train_steps):
        if len(order) < cfg.train_batch:
            order = torch.randperm(data.X.shape[0], generator=g).tolist()
        ids, order = order[: cfg.train_batch], order[cfg.train_batch:]
        entry = None
        if t in cfg.checkpoint_steps:
            entry = {"step": t, "batch": ids, "checkpoint": dict(em.checkpoint_from_optimizer(model, optimizer)),
                     "live_before": held_out_losses(model, data, device)}
        _sync(device)
        t0 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        logits = model(data.X[ids].to(device))
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), data.Y[ids].to(device).reshape(-1))
        loss.backward()
        optimizer.step()
        scheduler.step()
        _sync(device)
        seconds += time.perf_counter() - t0
        if entry is not None:
            entry["live_after"] = held_out_losses(model, data, device)
            entry["train_loss"] = float(loss.detach())
            entries.append(entry)
    return entries, seconds


# --------------------------------------------------------------------------- measuring one checkpoint
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory of a block above what was in use just before it, in MiB: on CUDA
    max_memory_allocated − memory_allocated before; on the CPU the peak RSS (VmHWM, reset on entry)
    − the RSS on entry. ``method`` says which (or that neither is available)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self.before_mb, self.method = device, float("nan"), float("nan"), ""

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before_mb = torch.cuda.memory_allocated(self.device) / 2**20
            self.method = "torch.cuda.max_memory_allocated − allocated before"
        elif _reset_peak_rss() and _proc_status_kb("VmRSS") is not None:
            self.before_mb = _proc_status_kb("VmRSS") / 1024
            self.method = "peak RSS (VmHWM, reset) − RSS before"
        else:
            self.method = "unavailable (no /proc/self/clear_refs)"
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self.before_mb
        elif self.method.startswith("peak RSS"):
            self.peak_mb = max(_proc_status_kb("VmHWM") / 1024 - self.before_mb, 0.0)
        return False


#: the library functions whose time is reported as a share of the call
PROFILED = {
    "per-sample grads": (FunctionalModel, "per_sample_gradients"),
    "Jacobians": (FunctionalModel, "jacobian"),
    "JVPs": (em_contract, "directional"),  # adaptive rules' probes along Δθ_t, and the JVP path
    "forward": (em_context.DecompositionContext, "target_values"),
    "contraction": (em_contract, "contract_tensor"),
}


@contextlib.contextmanager
def timed_library_calls(device: torch.device):
    """Wrap the PROFILED functions with timers (synchronizing CUDA around each) for the block; yields the
    dict label → seconds. None of them calls another, so nothing is counted twice."""
    seconds = {label: 0.0 for label in PROFILED}
    saved = {}

    def wrap(label, fn):
        def timed(*args, **kwargs):
            _sync(device)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                _sync(device)
                seconds[label] += time.perf_counter() - t0

        return timed

    for label, (owner, attr) in PROFILED.items():
        saved[label] = getattr(owner, attr)
        setattr(owner, attr, wrap(label, saved[label]))
    try:
        yield seconds
    finally:
        for label, (owner, attr) in PROFILED.items():
            setattr(owner, attr, saved[label])


def quadrature_of(cfg: LLMConfig):
    base = em.gauss_legendre(cfg.nodes)
    return base if cfg.tol is None else em.adaptive(base, cfg.tol)


def top_functions(profile: cProfile.Profile, seconds: float, count: int = 12) -> list[dict]:
    """The functions with the most own time (cProfile tottime) during the call, each with its caller that
    contributed most of it (for built-ins such as torch.isfinite, where they are called from)."""
    stats = pstats.Stats(profile).stats
    rows = []
    for (path, line, name), (_, calls, own, cumulative, callers) in stats.items():
        caller = max(callers.items(), key=lambda kv: kv[1][2], default=None)
        where = ""
        if caller is not None:
            (cpath, cline, cname), _ = caller
            where = f"{Path(cpath).name}:{cline} {cname}"
        label = name if path == "~" else f"{Path(path).name}:{line} {name}"
        rows.append({"function": label, "calls": calls, "seconds": own, "share": own / seconds, "caller": where})
    return sorted(rows, key=lambda r: -r["seconds"])[:count]


def _max_abs_difference(ours: torch.Tensor, live: torch.Tensor) -> float:
    """max |ours − live| over the held-out sequences (NaN when the held-out batch is not the one training saw)."""
    ours = ours.double().cpu()
    return float((ours - live).abs().max()) if ours.shape == live.shape else float("nan")


def decompose_checkpoint(model: nn.Module, entry: dict, data: Data, cfg: LLMConfig, dtype: torch.dtype,
                         device: torch.device, *, warm_up: bool = True, profile: bool = False) -> tuple[dict, em.Influence]:
    """decompose_from_checkpoints on one checkpoint: the held-out batch's per-sequence loss, per layer and
    per training sequence of the batch. Returns the measured row and the result.

    Time: the call alone (after a warm-up on one sequence, one test input and one node, which takes the
    first-call costs of torch.func and the allocator). Memory: the peak during warm-up and call above what
    was in use before the warm-up (the warm-up's own peak is a small fraction of the call's)."""
    checkpoint = em.AdamWCheckpoint(entry["checkpoint"])
    options = dict(h=em.targets.per_sample_loss(loss_fn), keep=KEEP, params=layer_map(model), dtype=dtype)
    train_data = (data.X, data.Y)
    profiler = cProfile.Profile() if profile else None
    with PeakMemory(device) as memory:
        if warm_up:
            em.decompose_from_checkpoints(model, [checkpoint], [entry["batch"][:1]], loss_fn, train_data,
                                          data.X_test[:1], test_labels=data.Y_test[:1],
                                          quadrature=em.gauss_legendre(1), **options)
        with timed_library_calls(device) as parts:
            _sync(device)
            if profiler is not None:
                profiler.enable()
            t0 = time.perf_counter()
            [result] = em.decompose_from_checkpoints(model, [checkpoint], [entry["batch"]], loss_fn, train_data,
                                                     data.X_test, test_labels=data.Y_test,
                                                     quadrature=quadrature_of(cfg), **options)
            _sync(device)
            seconds = time.perf_counter() - t0
            if profiler is not None:
                profiler.disable()
    D = num_params(model)
    itemsize = torch.finfo(dtype).bits // 8
    X = int(data.X_test.shape[0])

    def per_layer_of(tensor_sum) -> list[float]:  # mean over the held-out batch: the batch loss is their mean
        return (tensor_sum(("param", "test")).sum(1) / X).double().cpu().tolist()

    row = {
        "step": entry["step"], "dtype": str(dtype).replace("torch.", ""), "device": str(device),
        "num_params": D, "units": len(result.units), "tests": X, "quadrature": result.quadrature,
        "nodes": sum(result.nodes_per_step), "seconds": seconds, "peak_mb": memory.peak_mb,
        "before_mb": memory.before_mb, "memory_method": memory.method,
        "max_residual": result.max_residual, "relative_residual": result.relative_residual,
        "replay_error": result.max_replay_error,
        "sim_vs_live": _max_abs_difference(result.f_final[:, 0], entry["live_after"]),
        "initial_vs_live": _max_abs_difference(result.f_initial[:, 0], entry["live_before"]),
        "loss_before": float(result.f_initial.mean()), "loss_after": float(result.f_final.mean()),
        "parts": dict(parts),
        "sizes_mb": {"D": D * itemsize / 2**20, "B·D": len(result.units) * D * itemsize / 2**20,
                     "X·D": X * D * itemsize / 2**20},
        "per_layer": {
            "labels": list(result.param_labels),
            "kernel": per_layer_of(result.kernel_sum),
            "carried_state": per_layer_of(result.carried_state_sum),
            "decay": per_layer_of(result.regularization_sum),
            "per_unit": (result.kernel_sum(("unit",)) / X).double().cpu().tolist(),
            "units": list(result.units),
        },
        "profile": top_functions(profiler, seconds) if profiler is not None else None,
    }
    return row, result


# --------------------------------------------------------------------------- subprocess worker
def save_entry(entry: dict, path: Path) -> None:
    torch.save(entry, path)


def load_entry(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def worker(cfg: LLMConfig, path: Path, dtype_name: str, device_name: str, *, warm_up: bool = True,
           profile: bool = False) -> dict:
    """Checkpoint-only mode in a fresh process: rebuild the architecture and the data, load the checkpoint
    file (the model's own initial weights are overwritten by the checkpoint's), decompose."""
    device = torch.device(device_name)
    data = make_data(cfg)
    model = build_model(cfg, device)
    entry = load_entry(path)
    row, _ = decompose_checkpoint(model, entry, data, cfg, getattr(torch, dtype_name), device, warm_up=warm_up,
                                  profile=profile)
    return row


def run_worker_subprocess(cfg: LLMConfig, path: Path, dtype_name: str, device: torch.device, threads: int, *,
                          profile: bool = False, mmap_every_block: bool = False) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--threads", str(threads), "--device", str(device),
           "--worker", str(path), "--worker-dtype", dtype_name, "--worker-config", json.dumps(asdict(cfg))]
    if profile:
        cmd.append("--worker-profile")
    env = dict(os.environ)
    if mmap_every_block:  # RSS follows the live tensors, at the price of a page fault per fresh block
        env["MALLOC_MMAP_THRESHOLD_"] = str(128 * 1024)
    done = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    if done.returncode != 0:
        raise RuntimeError(f"decomposition worker failed (checkpoint {path.name}, {dtype_name}):\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def config_from_json(text: str) -> LLMConfig:
    values = json.loads(text)
    for key in ("checkpoint_steps", "betas"):
        values[key] = tuple(values[key])
    return LLMConfig(**values)


def decomposition_plan(cfg: LLMConfig) -> list[tuple[int, str]]:
    """(checkpoint index, dtype) in order: float32 for every checkpoint, float64 as cfg.float64 says."""
    if cfg.float64 not in ("none", "first", "all"):
        raise ValueError(f"float64 must be 'none', 'first' or 'all', got {cfg.float64!r}")
    plan = []
    for k in range(len(cfg.checkpoint_steps)):
        plan.append((k, "float32"))
        if cfg.float64 == "all" or (cfg.float64 == "first" and k == 0):
            plan.append((k, "float64"))
    return plan


# --------------------------------------------------------------------------- tables
def format_rows(rows: list[dict]) -> str:
    """One line per (checkpoint, dtype)."""
    out = [f"  {'ckpt':>4s} {'dtype':7s} {'params D':>11s} {'B':>3s} {'X':>3s} {'nodes':>5s} {'time (s)':>9s} "
           f"{'peak Δ MB':>10s} {'max |r|':>9s} {'rel r':>9s} {'replay':>8s} {'sim−live':>9s} "
           f"{'psg %':>6s} {'jac %':>6s} {'jvp %':>6s} {'fwd %':>6s} {'contr %':>7s} {'other %':>7s}"]
    for r in rows:
        total = r["seconds"]
        share = {k: 100 * v / total for k, v in r["parts"].items()}
        other = 100 - sum(share.values())
        out.append(f"  {r['step']:4d} {r['dtype']:7s} {r['num_params']:11,d} {r['units']:3d} {r['tests']:3d} "
                   f"{r['nodes']:5d} {total:9.2f} {r['peak_mb']:10.1f} {r['max_residual']:9.2e} "
                   f"{r['relative_residual']:9.2e} {r['replay_error']:8.1e} {r['sim_vs_live']:9.2e} "
                   f"{share['per-sample grads']:6.1f} {share['Jacobians']:6.1f} {share['JVPs']:6.1f} {share['forward']:6.1f} "
                   f"{share['contraction']:7.1f} {other:7.1f}")
    return "\n".join(out)


def format_layers(row: dict) -> str:
    """Per layer: the mean held-out loss change carried by the batch's sequences, the first moment, decay."""
    pl = row["per_layer"]
    out = [f"  checkpoint {row['step']} ({row['dtype']}): mean held-out loss {row['loss_before']:.6f} → "
           f"{row['loss_after']:.6f} (Δ {row['loss_after'] - row['loss_before']:+.3e})",
           f"    {'layer':8s} {'batch seqs':>12s} {'1st moment':>12s} {'decay':>12s} {'total':>12s}"]
    for k, label in enumerate(pl["labels"]):
        total = pl["kernel"][k] + pl["carried_state"][k] + pl["decay"][k]
        out.append(f"    {label:8s} {pl['kernel'][k]:+12.3e} {pl['carried_state'][k]:+12.3e} {pl['decay'][k]:+12.3e} "
                   f"{total:+12.3e}")
    sums = [sum(pl[key]) for key in ("kernel", "carried_state", "decay")]
    out.append(f"    {'all':8s} {sums[0]:+12.3e} {sums[1]:+12.3e} {sums[2]:+12.3e} {sum(sums):+12.3e}")
    units = ", ".join(f"{u}: {v:+.2e}" for u, v in zip(pl["units"], pl["per_unit"]))
    out.append(f"    per training sequence (all layers): {units}")
    return "\n".join(out)


def format_sizes(row: dict) -> str:
    s = row["sizes_mb"]
    return (f"  {row['dtype']}: D = {s['D']:.1f} MB, B·D = {s['B·D']:.1f} MB, X·D = {s['X·D']:.1f} MB; "
            f"peak Δ {row['peak_mb']:.1f} MB = {row['peak_mb'] / s['B·D']:.1f} × B·D = "
            f"{row['peak_mb'] / s['D']:.0f} × D (B = {row['units']}, X = {row['tests']})")


def format_profile(row: dict) -> str:
    out = [f"    {'own time (s)':>12s} {'share':>6s} {'calls':>6s}  function  ← caller with most of it"]
    for p in row["profile"]:
        out.append(f"    {p['seconds']:12.2f} {100 * p['share']:5.1f}% {p['calls']:6d}  {p['function']}  ← {p['caller']}")
    return "\n".join(out)


def machine_line(device: torch.device, threads: int) -> str:
    line = (f"machine: {platform.machine()} {platform.system()}, {os.cpu_count()} CPUs, python "
            f"{platform.python_version()}, torch {torch.__version__}, torch.set_num_threads({threads})")
    if device.type == "cuda":
        line += f", GPU {torch.cuda.get_device_name(device)}"
    if hasattr(os, "getloadavg"):
        line += f"; load average {os.getloadavg()[0]:.1f} (a load above the CPU count slows every timing here)"
    return line


def run_benchmark(cfg: LLMConfig, device: torch.device, *, threads: int = 2, subprocesses: bool = True,
                  profile: bool = True, mmap_every_block: bool = False, echo=print) -> tuple[list[dict], str]:
    """Train, checkpoint, decompose every checkpoint (float32, and float64 as cfg.float64 says); the first
    float32 decomposition runs under cProfile when ``profile``. Returns the rows and the printed text."""
    lines: list[str] = []

    def say(text: str = "") -> None:
        lines.append(text)
        echo(text)

    data = make_data(cfg)
    model = build_model(cfg, device)
    D = num_params(model)
    say(f"model: GPT-style byte LM, d_model {cfg.d_model}, {cfg.n_layers} pre-LN blocks, {cfg.n_heads} heads, "
        f"MLP {4 * cfg.d_model} (GELU), context {cfg.seq_len}, untied embeddings, no dropout: {D:,} trained parameters")
    say(f"data: {data.description}")
    entries, train_seconds = train_with_checkpoints(cfg, model, data, device)
    say(f"training: {cfg.train_steps} AdamW steps (float32, batches of {cfg.train_batch} sequences, lr {cfg.lr}, "
        f"betas {cfg.betas}, weight decay {cfg.weight_decay}, linear warm-up {cfg.warmup_steps} steps) in "
        f"{train_seconds:.2f} s ({train_seconds / cfg.train_steps:.3f} s/step); train loss at the checkpoints "
        f"{', '.join(format(e['train_loss'], '.3f') for e in entries)}; checkpoints before steps {list(cfg.checkpoint_steps)}")
    quad = quadrature_of(cfg).describe()
    say(f"decomposed per checkpoint: the mean-token cross-entropy of each of {cfg.test_batch} held-out sequences "
        f"after one simulated AdamW update, per layer ({len(set(layer_map(model).values()))} layers) and per "
        f"training sequence, quadrature {quad}, keep={KEEP}; "
        f"{'one fresh subprocess per checkpoint and dtype' if subprocesses else 'in this process'}"
        f"{', MALLOC_MMAP_THRESHOLD_=128 KiB' if subprocesses and mmap_every_block else ''}")
    rows = []
    profiled = False
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for entry in entries:
            paths.append(Path(tmp) / f"checkpoint_{entry['step']}.pt")
            save_entry(entry, paths[-1])
        for k, dtype_name in decomposition_plan(cfg):
            this_profile = profile and not profiled and dtype_name == "float32"
            profiled = profiled or this_profile
            if subprocesses:
                row = run_worker_subprocess(cfg, paths[k], dtype_name, device, threads, profile=this_profile,
                                            mmap_every_block=mmap_every_block)
            else:
                row, _ = decompose_checkpoint(model, load_entry(paths[k]), data, cfg, getattr(torch, dtype_name),
                                              device, profile=this_profile)
            rows.append(row)
    say("")
    say(f"[1] per checkpoint: one simulated AdamW update decomposed (Remark F.3). peak Δ = {rows[0]['memory_method']}; "
        "nodes = quadrature nodes evaluated; rel r = max |r| / (1 + |Δf|); replay = max |Σ_u update(u) − Δθ| / max |Δθ|; "
        "sim−live = |simulated − real| held-out loss after the step; psg/jac/jvp/fwd/contr/other = share of the time in "
        "per-sample gradients / Jacobians at the nodes / JVPs / forward evaluations / contraction Φ·update / the rest")
    say(format_rows(rows))
    say("")
    say("[2] memory against the tensor sizes D (parameters), B·D (per-sample gradients; per-unit buffers and updates), "
        "X·D (the held-out batch's Jacobian at one node; its quadrature sum)")
    for dtype_name in dict.fromkeys(r["dtype"] for r in rows):
        say(format_sizes(next(r for r in rows if r["dtype"] == dtype_name)))
    profiled_rows = [r for r in rows if r["profile"]]
    if profiled_rows:
        r = profiled_rows[0]
        say("")
        say(f"[3] profile of checkpoint {r['step']} ({r['dtype']}, {r['seconds']:.2f} s, under cProfile): own time "
            "per function, largest first")
        say(format_profile(r))
    say("")
    say("[4] the decomposition: change of the mean held-out loss over the update, per layer (float32)")
    for row in rows:
        if row["dtype"] == "float32":
            say(format_layers(row))
    return rows, "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="~1M parameters, 1 checkpoint (under a minute on 2 cores)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads on the CPU (default 2)")
    parser.add_argument("--nodes", type=int, default=None, help="Gauss–Legendre nodes (the adaptive rule's base; default 4)")
    parser.add_argument("--tol", type=float, default=None,
                        help="adaptive quadrature tolerance (default 1e-8); 0 for the fixed rule gauss_legendre(nodes)")
    parser.add_argument("--float64", choices=["none", "first", "all"], default=None,
                        help="checkpoints also decomposed in float64 (default: first; quick: all)")
    parser.add_argument("--d-model", type=int, default=None, help="model width (full: 384)")
    parser.add_argument("--layers", type=int, default=None, help="number of blocks (full: 6)")
    parser.add_argument("--heads", type=int, default=None, help="attention heads (full: 6)")
    parser.add_argument("--seq-len", type=int, default=None, help="context length in bytes (full: 64)")
    parser.add_argument("--train-batch", type=int, default=None, help="B: sequences per training step (full: 8)")
    parser.add_argument("--test-batch", type=int, default=None, help="X: held-out sequences (full: 8)")
    parser.add_argument("--no-profile", action="store_true", help="do not run the first float32 call under cProfile")
    parser.add_argument("--mmap-every-block", action="store_true",
                        help="workers run with MALLOC_MMAP_THRESHOLD_=128 KiB: the RSS follows the live tensors "
                             "(closer peak memory), but every fresh block is page-faulted in (slower on the CPU)")
    parser.add_argument("--in-process", action="store_true",
                        help="decompose in this process (peak memory then depends on what earlier calls left)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-dtype", default="float32", help=argparse.SUPPRESS)
    parser.add_argument("--worker-config", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker-profile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False")
    if args.worker is not None:
        row = worker(config_from_json(args.worker_config), Path(args.worker), args.worker_dtype, str(device),
                     profile=args.worker_profile)
        print(json.dumps(row))
        return 0
    cfg = QUICK if args.quick else FULL
    if args.nodes is not None:
        cfg = replace(cfg, nodes=args.nodes)
    if args.tol is not None:
        cfg = replace(cfg, tol=args.tol or None)
    if args.float64 is not None:
        cfg = replace(cfg, float64=args.float64)
    sizes = {"d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads, "seq_len": args.seq_len,
             "train_batch": args.train_batch, "test_batch": args.test_batch}
    cfg = replace(cfg, **{k: v for k, v in sizes.items() if v is not None})
    t0 = time.perf_counter()
    print(machine_line(device, args.threads))
    print(f"mode: {'quick' if args.quick else 'full'} (times are preliminary on a shared machine; nothing is asserted)")
    run_benchmark(cfg, device, threads=args.threads, subprocesses=not args.in_process, profile=not args.no_profile,
                  mmap_every_block=args.mmap_every_block)
    print(f"\ntotal wall time {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
