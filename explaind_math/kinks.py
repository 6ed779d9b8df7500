"""The kinks of a piecewise-smooth model: switching functions z whose sign change is a breakpoint (MATH.md §13).

Along θ_t(α) = θ_t + α Δθ_t a model built from ReLU, LeakyReLU, ReLU6/hardtanh, clamp, abs, elementwise
max/min and max-pooling is smooth except at the α* where some *switching function* z(α) changes sign:
the pre-activation z of relu(z), z − lo and z − hi of clamp(z, lo, hi), a − b of maximum(a, b), x_i − x_j
within a max-pooling window or a small max/min reduction (relevant only when x_i, x_j are the window's top
two: the *gate* max(window) − max(x_i, x_j) is 0 then), a − b of a comparison a > b (the conditions of
``torch.where``).

:class:`KinkRecorder` finds them without touching the model's code: a ``TorchFunctionMode`` sees every
torch call of ``forward`` — functional (``F.relu``, ``torch.clamp``, ``torch.maximum``, ``x.relu()``) and
through modules alike, since ``nn.ReLU``, ``nn.LeakyReLU``, ``nn.Hardtanh``, ``nn.MaxPool2d`` … call their
functional form — and records each switching function as a tensor of the traced computation, so that
``vmap``/``jvp`` return z(α) and dz/dα. Calls it knows to be non-smooth but cannot bracket (``torch.sign``,
``round``, ``floor``, ``argmax`` …) are named in :attr:`KinkRecorder.suspects`, for the message when a step's
certified residual stays over tolerance.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["KinkRecorder", "KINK_OPERATIONS", "NON_SMOOTH_SUSPECTS"]

#: largest max-pooling window / reduction whose pairs x_i − x_j are recorded (k(k − 1)/2 switching functions)
MAX_PAIRWISE_WINDOW = 16

#: calls that are non-smooth (or discontinuous) along α and are not bracketed: named when a residual fails
NON_SMOOTH_SUSPECTS = frozenset({
    "sign", "sgn", "round", "floor", "ceil", "trunc", "fix", "frac", "heaviside", "argmax", "argmin", "sort",
    "argsort", "topk", "remainder", "fmod", "__mod__", "bucketize", "searchsorted", "median", "kthvalue", "mode",
    "where", "masked_fill", "masked_fill_", "nan_to_num", "apply", "max_pool3d", "adaptive_max_pool1d",
    "adaptive_max_pool2d", "adaptive_max_pool3d", "fractional_max_pool2d", "cummax", "cummin", "unique",
})


def _arg(args, kwargs, index: int, name: str, default=None):
    if len(args) > index:
        return args[index]
    return kwargs.get(name, default)


def _floating(x) -> bool:
    return isinstance(x, torch.Tensor) and x.is_floating_point()


def _shifted(x, *levels) -> list:
    """z − c for every level c given (scalar or tensor): the kinks of clamp/hardtanh/relu6 at c."""
    return [(x - c, None) for c in levels if c is not None]


def _pairs_along_last(windows: torch.Tensor) -> list:
    """x_i − x_j for every pair of a window (last axis), gated by max(window) − max(x_i, x_j)."""
    k = windows.shape[-1]
    if k < 2:
        return []
    i, j = zip(*itertools.combinations(range(k), 2))
    i, j = list(i), list(j)
    a, b = windows[..., i], windows[..., j]
    top = windows.max(dim=-1, keepdim=True).values
    return [(a - b, top - torch.maximum(a, b))]


def _reduction_pairs(x: torch.Tensor, dim, largest: bool) -> list | None:
    """Pairs of a max/min reduction (None: too large a window to record; a suspect then)."""
    windows = x.reshape(-1) if dim is None else x.movedim(dim, -1)
    if windows.shape[-1] > MAX_PAIRWISE_WINDOW:
        return None
    return _pairs_along_last(windows if largest else -windows)


def _pool_pairs(x: torch.Tensor, args, kwargs, dims: int) -> list | None:
    """Pairs within each max-pooling window (1-d and 2-d pooling; ceil_mode not supported)."""
    kernel = _arg(args, kwargs, 1, "kernel_size")
    stride = _arg(args, kwargs, 2, "stride") or kernel
    padding = _arg(args, kwargs, 3, "padding", 0)
    dilation = _arg(args, kwargs, 4, "dilation", 1)
    if _arg(args, kwargs, 5, "ceil_mode", False):
        return None
    tup = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v,) * dims
    kernel, stride, padding, dilation = tup(kernel), tup(stride), tup(padding), tup(dilation)
    if dims == 1:
        x = x.unsqueeze(-2)
        kernel, stride, padding, dilation = (1, *kernel), (1, *stride), (0, *padding), (1, *dilation)
    batched = x.dim() == 4
    x4 = x if batched else x.unsqueeze(0)
    if any(padding):
        x4 = F.pad(x4, (padding[1], padding[1], padding[0], padding[0]), value=float("-inf"))
    cols = F.unfold(x4, kernel, dilation=dilation, stride=stride)  # (N, C·k, L)
    k = kernel[0] * kernel[1]
    if k > MAX_PAIRWISE_WINDOW:
        return None
    windows = cols.reshape(cols.shape[0], -1, k, cols.shape[-1]).transpose(-1, -2)
    pairs = _pairs_along_last(windows)
    return [(torch.nan_to_num(z, nan=1.0, posinf=1.0, neginf=-1.0), torch.nan_to_num(g, nan=1.0, posinf=1.0))
            for z, g in pairs]


def _binary_or_reduction(args, kwargs, largest: bool) -> list | None:
    other = _arg(args, kwargs, 1, "other")
    if isinstance(other, torch.Tensor):
        return [(args[0] - other, None)]
    dim = other if isinstance(other, int) else kwargs.get("dim")
    return _reduction_pairs(args[0], dim, largest)


def _comparison(args, kwargs) -> list:
    other = _arg(args, kwargs, 1, "other")
    return [(args[0] - other, None)] if isinstance(other, (torch.Tensor, int, float)) else []


#: operation name → its switching functions [(z, gate or None)] from (args, kwargs); None: not recordable
KINK_OPERATIONS = {
    **{n: (lambda a, k: [(a[0], None)]) for n in ("relu", "relu_", "leaky_relu", "leaky_relu_", "elu", "elu_",
                                                 "celu", "selu", "rrelu", "prelu", "abs", "absolute", "__abs__")},
    "relu6": lambda a, k: _shifted(a[0], 0.0, 6.0),
    "hardtanh": lambda a, k: _shifted(a[0], _arg(a, k, 1, "min_val", -1.0), _arg(a, k, 2, "max_val", 1.0)),
    "hardtanh_": lambda a, k: _shifted(a[0], _arg(a, k, 1, "min_val", -1.0), _arg(a, k, 2, "max_val", 1.0)),
    "hardswish": lambda a, k: _shifted(a[0], -3.0, 3.0),
    "hardsigmoid": lambda a, k: _shifted(a[0], -3.0, 3.0),
    "hardshrink": lambda a, k: _shifted(a[0], -_arg(a, k, 1, "lambd", 0.5), _arg(a, k, 1, "lambd", 0.5)),
    "softshrink": lambda a, k: _shifted(a[0], -_arg(a, k, 1, "lambd", 0.5), _arg(a, k, 1, "lambd", 0.5)),
    "threshold": lambda a, k: _shifted(a[0], _arg(a, k, 1, "threshold")),
    **{n: (lambda a, k: _shifted(a[0], _arg(a, k, 1, "min"), _arg(a, k, 2, "max")))
       for n in ("clamp", "clamp_", "clip", "clip_")},
    "clamp_min": lambda a, k: _shifted(a[0], _arg(a, k, 1, "min")),
    "clamp_max": lambda a, k: _shifted(a[0], _arg(a, k, 1, "max")),
    **{n: (lambda a, k: [(a[0] - a[1], None)]) for n in ("maximum", "minimum", "fmax", "fmin")},
    "max": lambda a, k: _binary_or_reduction(a, k, True),
    "min": lambda a, k: _binary_or_reduction(a, k, False),
    "amax": lambda a, k: _reduction_pairs(a[0], _arg(a, k, 1, "dim"), True),
    "amin": lambda a, k: _reduction_pairs(a[0], _arg(a, k, 1, "dim"), False),
    "max_pool1d": lambda a, k: _pool_pairs(a[0], a, k, 1),
    "max_pool2d": lambda a, k: _pool_pairs(a[0], a, k, 2),
    "max_pool1d_with_indices": lambda a, k: _pool_pairs(a[0], a, k, 1),
    "max_pool2d_with_indices": lambda a, k: _pool_pairs(a[0], a, k, 2),
    **{n: (lambda a, k: _comparison(a, k)) for n in ("gt", "lt", "ge", "le", "greater", "less", "greater_equal",
                                                     "less_equal", "__gt__", "__lt__", "__ge__", "__le__")},
}


class KinkRecorder(TorchFunctionMode):
    """Records the switching functions of every kink called inside ``with KinkRecorder() as r:``.

    ``r.switching``: a list of (z, gate) tensors (gate None, or ≥ 0 with 0 where a root of z is a kink);
    ``r.suspects``: names of non-smooth calls it cannot bracket. Only floating-point switching functions are
    kept (integer comparisons, e.g. on token ids, do not move with α)."""

    def __init__(self):
        super().__init__()
        self.switching: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self.suspects: dict[str, int] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = getattr(func, "__name__", "")
        handler = KINK_OPERATIONS.get(name)
        if handler is not None and args and _floating(args[0]):
            recorded = handler(args, kwargs)
            if recorded is None:
                self.suspects[name] = self.suspects.get(name, 0) + 1
            else:
                self.switching.extend((z, g) for z, g in recorded if _floating(z))
        elif name in NON_SMOOTH_SUSPECTS:
            self.suspects[name] = self.suspects.get(name, 0) + 1
        return func(*args, **kwargs)

    def flat(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """All switching functions as one vector z and its gate (0 where a switching function is ungated);
        (None, None) when no kink was called."""
        if not self.switching:
            return None, None
        zs = [z.reshape(-1) for z, _ in self.switching]
        gates = [torch.zeros_like(z).reshape(-1) if g is None else g.reshape(-1) for z, g in self.switching]
        return torch.cat(zs), torch.cat(gates)
