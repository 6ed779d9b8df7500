"""scikit-learn's digits data set, two small CNNs and a recorded training loop (paper Table 1, §4.1,
Appendix E.1, scaled to a CPU).

The paper trains a four-layer CNN on 5120 MNIST images (AdamW) and a ResNet-9 on CIFAR-2 (SGD with
momentum). Here the same two kinds of model are trained on the 1797 8×8 digit images that ship with
scikit-learn (``sklearn.datasets.load_digits``: bundled, nothing is downloaded):

- :class:`SmallCNN` — two convolution blocks and two fully connected layers, like the paper's MNIST CNN;
- :class:`SmallResidualCNN` — a convolution stem and two residual blocks, like a (very) small ResNet.

Both use a smooth activation (GELU by default, or tanh) and average pooling instead of the paper's
ReLU and max pooling. The reason is the quadrature of the test feature map (MATH.md §1):
Φ_t(x) = ∫_0^1 ∂_θ f(x; θ_t + α Δθ_t) dα is computed with n nodes, and Gauss–Legendre converges
exponentially in n only when f is smooth (analytic) in α along the step. With ReLU or max pooling, f is
only piecewise polynomial along the step — ∂_α f jumps where a pre-activation crosses 0 or the
maximum of a pooling window changes — so fixed rules converge slowly (see README "Tolerances") and
the exactness of the decomposition could not be certified to 1e-9 with 8 nodes. Pass
``activation="relu"`` to get the paper's non-smooth kind (then use ``adaptive`` quadrature).
Smoothness gives exponential convergence, not a fixed number of nodes: the rate depends on how far
the complex singularities of tanh/GELU(a + α b) lie from [0, 1], i.e. on how much a step moves the
pre-activations. Large steps (SGD + momentum at lr 0.2 on :class:`SmallResidualCNN`,
``examples/table1_revisited.py``) left GL(8) at a relative residual of 4e-2 where adaptive GL(8)
certified 1e-12; the residual is always computed, so this is visible.

Every model here is deterministic (no BatchNorm, no dropout), as the decomposition requires.

    data = load_digits_data(seed=0)
    run = train_digits(SmallCNN(), data, optimizer_factory=lambda p: torch.optim.AdamW(p, lr=1e-2),
                       steps=60, batch_size=64, seed=0)
    model, trajectory, data = run
    result = em.decompose_adamw_training(model, trajectory, digits_loss, data.train, data.test_x,
                                         dtype=torch.float64)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ExplaindError
from ..recording import TrajectoryRecorder
from ..trajectory import Trajectory

__all__ = [
    "NUM_CLASSES",
    "DigitsData",
    "load_digits_data",
    "SmallCNN",
    "SmallResidualCNN",
    "make_model",
    "digits_loss",
    "DigitsRun",
    "train_digits",
    "default_adamw",
    "default_sgd_momentum",
]

#: the ten digit classes
NUM_CLASSES = 10
#: pixel values of the digits data set are integers 0..16
_MAX_PIXEL = 16.0


@dataclass
class DigitsData:
    """A deterministic three-way split of the digits data set, images (N, 1, 8, 8) in [0, 1], labels long.

    ``train_x``/``train_y`` are indexed by sample id (the ids recorded in the trajectory);
    ``test_x``/``test_y`` are the test inputs x of the decomposition; ``heldout_x``/``heldout_y`` are a
    further split that neither training nor the decomposition touches (used e.g. to evaluate pruned
    models on inputs other than those their importance scores were computed on). ``heldout_x`` may be
    empty. ``indices[split]`` are the positions of a split's samples in ``sklearn.datasets.load_digits()``.
    """

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    heldout_x: torch.Tensor
    heldout_y: torch.Tensor
    seed: int = 0
    indices: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def train(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(X, Y) indexed by sample id, the ``train_data`` argument of the theorem functions."""
        return self.train_x, self.train_y

    @property
    def num_train(self) -> int:
        return int(self.train_x.shape[0])

    def to(self, dtype: torch.dtype) -> "DigitsData":
        """The same split with images in ``dtype`` (labels stay long)."""
        return DigitsData(self.train_x.to(dtype), self.train_y, self.test_x.to(dtype), self.test_y,
                          self.heldout_x.to(dtype), self.heldout_y, self.seed, self.indices)


def load_digits_data(*, num_train: int | None = None, num_test: int = 360, num_heldout: int = 0,
                     seed: int = 0, dtype: torch.dtype = torch.float64) -> DigitsData:
    """Load scikit-learn's digits (1797 images of 8×8 pixels, values 0..16) and split them.

    The images are divided by 16 (so in [0, 1]) and shaped (N, 1, 8, 8). One permutation drawn from a
    ``torch.Generator`` seeded with ``seed`` orders the samples; the first ``num_test`` become the test
    split, the next ``num_heldout`` the held-out split, and the next ``num_train`` (default: all the
    rest) the training split. The split depends only on ``seed`` and the three sizes.
    """
    try:
        from sklearn.datasets import load_digits
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set needs scikit-learn: pip install 'explaind_math[experiments]'") from exc
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float64).unsqueeze(1) / _MAX_PIXEL
    labels = torch.as_tensor(bunch.target, dtype=torch.long)
    total = int(labels.shape[0])
    for name, value in (("num_test", num_test), ("num_heldout", num_heldout)):
        if value < 0:
            raise ExplaindError(f"{name} must be >= 0, got {value}")
    available = total - num_test - num_heldout
    if num_train is None:
        num_train = available
    if num_train < 1 or num_train > available:
        raise ExplaindError(
            f"num_train={num_train} does not fit: the digits data set has {total} samples and "
            f"num_test + num_heldout = {num_test + num_heldout}, so at most {available} remain for training"
        )
    order = torch.randperm(total, generator=torch.Generator().manual_seed(seed))
    test, rest = order[:num_test], order[num_test:]
    heldout, rest = rest[:num_heldout], rest[num_heldout:]
    train = rest[:num_train]
    return DigitsData(images[train].to(dtype), labels[train], images[test].to(dtype), labels[test],
                      images[heldout].to(dtype), labels[heldout], seed,
                      {"train": train, "test": test, "heldout": heldout})


def _activation(name: str) -> nn.Module:
    activations = {"gelu": nn.GELU, "tanh": nn.Tanh, "relu": nn.ReLU}
    if name not in activations:
        raise ExplaindError(f"unknown activation {name!r}; choose one of {sorted(activations)}")
    return activations[name]()


class SmallCNN(nn.Module):
    """Two convolution blocks and two fully connected layers (the paper's MNIST CNN, Appendix E.1,
    scaled to 8×8 digits):

        conv 3×3 (1 → c1) → act → avgpool 2   (8×8 → 4×4)
        conv 3×3 (c1 → c2) → act → avgpool 2  (4×4 → 2×2)
        flatten → linear (4·c2 → hidden) → act → linear (hidden → 10)   (``output``, the logits)

    The activation is smooth (GELU) and the pooling is averaging so that f is analytic along every
    training step and Gauss–Legendre quadrature converges exponentially (module docstring).
    """

    #: parameter-name prefixes of the output layer (never pruned, paper §4.1)
    output_layer = ("output.",)

    def __init__(self, channels: tuple[int, int] = (8, 16), hidden: int = 32, activation: str = "gelu"):
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.fc = nn.Linear(4 * c2, hidden)
        self.output = nn.Linear(hidden, NUM_CLASSES)
        self.act1, self.act2, self.act3 = _activation(activation), _activation(activation), _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.avg_pool2d(self.act1(self.conv1(x)), 2)
        x = F.avg_pool2d(self.act2(self.conv2(x)), 2)
        x = self.act3(self.fc(x.flatten(-3)))
        return self.output(x)


class _ResidualBlock(nn.Module):
    """x + conv(act(conv(x))), both convolutions 3×3 with padding 1 (shape-preserving)."""

    def __init__(self, channels: int, activation: str):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.act = _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(self.act(self.conv1(x)))


class SmallResidualCNN(nn.Module):
    """A convolution stem and two residual blocks (a ResNet-9 of the paper's CIFAR-2 row, scaled down):

        conv 3×3 (1 → c) → act → block → act → avgpool 2 (8×8 → 4×4) → block → act → avgpool 2 (4×4 → 2×2)
        → flatten → linear (4·c → 10)   (``output``, the logits)

    with block(x) = x + conv(act(conv(x))). Smooth activation and average pooling, as :class:`SmallCNN`; the
    default is tanh, not GELU: with GELU (slope 1/2 at 0) this net barely left chance level in 45 steps of
    SGD + momentum on the digits at any step size tried (0.02–0.5), with tanh it reaches ≈ 0.8 test accuracy.
    """

    output_layer = ("output.",)

    def __init__(self, channels: int = 8, activation: str = "tanh"):
        super().__init__()
        self.stem = nn.Conv2d(1, channels, 3, padding=1)
        self.block1 = _ResidualBlock(channels, activation)
        self.block2 = _ResidualBlock(channels, activation)
        self.output = nn.Linear(4 * channels, NUM_CLASSES)
        self.act1, self.act2, self.act3 = _activation(activation), _activation(activation), _activation(activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.stem(x))
        x = F.avg_pool2d(self.act2(self.block1(x)), 2)
        x = F.avg_pool2d(self.act3(self.block2(x)), 2)
        return self.output(x.flatten(-3))


def make_model(model_class: Callable[..., nn.Module] = SmallCNN, *, seed: int = 0,
               dtype: torch.dtype = torch.float64, **kwargs) -> nn.Module:
    """``model_class(**kwargs)`` initialised from ``torch.manual_seed(seed)`` (without changing the
    caller's global random state) and cast to ``dtype``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_class(**kwargs)
    return model.to(dtype)


def digits_loss(out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """ℓ_i = cross-entropy of the raw logits f(x_i; θ) against the label y_i; works on one sample's
    output (shape (10,), y a 0-d tensor: the ``loss_fn`` of the theorem functions) and on a batch
    (mean over the batch: weights w_{t,i} = 1/|B_t|, the training loss)."""
    return F.cross_entropy(out, y)


def default_adamw(params) -> torch.optim.Optimizer:
    """AdamW as in the paper's CNN (Appendix E.1: torch defaults otherwise), with a step size for 8×8 digits."""
    return torch.optim.AdamW(params, lr=2e-2, weight_decay=1e-2)


def default_sgd_momentum(params) -> torch.optim.Optimizer:
    """SGD with momentum 0.9 and coupled weight decay (the paper's ResNet row, Appendix E.1)."""
    return torch.optim.SGD(params, lr=0.2, momentum=0.9, weight_decay=5e-4)


@dataclass
class DigitsRun:
    """A recorded training run; unpacks as ``model, trajectory, data = run``.

    ``train_losses[t]`` is the mini-batch loss L_t(θ_t) of step t, ``steps_per_epoch`` how many steps one
    pass over the training split takes at the chosen batch size.
    """

    model: nn.Module
    trajectory: Trajectory
    data: DigitsData
    train_losses: list[float] = field(default_factory=list)
    steps_per_epoch: int = 0

    def __iter__(self) -> Iterator:
        return iter((self.model, self.trajectory, self.data))


def train_digits(model: nn.Module | None = None, data: DigitsData | None = None, *,
                 optimizer_factory: Callable[..., torch.optim.Optimizer] = default_adamw,
                 scheduler_factory: Callable[[torch.optim.Optimizer], object] | None = None,
                 steps: int = 60, batch_size: int = 64, seed: int = 0,
                 dtype: torch.dtype = torch.float64, record_gradients: bool = True) -> DigitsRun:
    """Train ``model`` on ``data.train`` with a real torch.optim optimizer in mini-batches, recorded.

    Each epoch visits the training split in a random order (a ``torch.Generator`` seeded with ``seed``),
    in batches of ``batch_size`` (the last, shorter batch of an epoch is kept); training stops after
    ``steps`` optimizer steps. Every step is the plain loop of the README:

        optimizer.zero_grad(); digits_loss(model(x_B), y_B).backward()   # mean: w_{t,i} = 1/|B_t|
        recorder.record_batch(ids); optimizer.step(); scheduler.step()

    Args:
        model: the module to train (default: ``make_model(SmallCNN, seed=seed)``); cast to ``dtype``.
        data: the split (default: ``load_digits_data(seed=seed)``); cast to ``dtype``.
        optimizer_factory: parameters → optimizer (default :func:`default_adamw`).
        scheduler_factory: optimizer → LR scheduler stepped after every optimizer step, or None.
        steps: number of optimizer steps N. batch_size: |B_t| (at most the training split's size).
        dtype: float64 (default) for verification.

    Returns:
        :class:`DigitsRun` (model, trajectory, data, and the training losses).
    """
    if steps < 1:
        raise ExplaindError(f"steps must be >= 1, got {steps}")
    data = (data if data is not None else load_digits_data(seed=seed)).to(dtype)
    if not 1 <= batch_size <= data.num_train:
        raise ExplaindError(f"batch_size must be between 1 and the {data.num_train} training samples, got {batch_size}")
    model = (model if model is not None else make_model(SmallCNN, seed=seed)).to(dtype)
    model.train()
    optimizer = optimizer_factory(model.parameters())
    scheduler = scheduler_factory(optimizer) if scheduler_factory is not None else None
    generator = torch.Generator().manual_seed(seed)
    recorder = TrajectoryRecorder(model, optimizer, record_gradients=record_gradients)
    losses: list[float] = []
    order = torch.empty(0, dtype=torch.long)
    try:
        while len(losses) < steps:
            if order.numel() == 0:
                order = torch.randperm(data.num_train, generator=generator)
            ids, order = order[:batch_size], order[batch_size:]
            optimizer.zero_grad()
            loss = digits_loss(model(data.train_x[ids]), data.train_y[ids])
            loss.backward()
            recorder.record_batch(ids)
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(float(loss.detach()))
    finally:
        recorder.close()
    model.eval()
    steps_per_epoch = -(-data.num_train // batch_size)
    return DigitsRun(model, recorder.trajectory(metadata={"data": "sklearn digits", "seed": seed}), data,
                     losses, steps_per_epoch)
