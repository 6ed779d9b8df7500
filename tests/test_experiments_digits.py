"""explaind_math.experiments.digits and .metrics: the data split, the two CNNs, the recorded training
loop (decomposed exactly: Theorem 3.1 and Corollary 3.2 on real CNNs) and the §10 measures."""

import math

import pytest
import torch

import explaind_math as em
from explaind_math.errors import ExplaindError
from explaind_math.experiments import digits, metrics

pytest.importorskip("sklearn")

#: README "Tolerances": smooth models, 8 Gauss–Legendre nodes, float64
SMOOTH_TOLERANCE = 1e-9


# ---------------------------------------------------------------------------------------------- data
def test_split_shapes_range_and_types():
    data = digits.load_digits_data(num_train=200, num_test=50, num_heldout=30, seed=3)
    assert data.train_x.shape == (200, 1, 8, 8) and data.test_x.shape == (50, 1, 8, 8)
    assert data.heldout_x.shape == (30, 1, 8, 8)
    for x in (data.train_x, data.test_x, data.heldout_x):
        assert x.dtype == torch.float64 and float(x.min()) >= 0.0 and float(x.max()) <= 1.0
    assert float(data.train_x.max()) == 1.0  # scaled by the data set's maximum pixel value 16
    for y in (data.train_y, data.test_y, data.heldout_y):
        assert y.dtype == torch.long and int(y.min()) >= 0 and int(y.max()) < digits.NUM_CLASSES
    assert data.to(torch.float32).train_x.dtype == torch.float32


def test_split_is_deterministic_disjoint_and_seeded():
    a = digits.load_digits_data(num_test=100, num_heldout=100, seed=0)
    b = digits.load_digits_data(num_test=100, num_heldout=100, seed=0)
    c = digits.load_digits_data(num_test=100, num_heldout=100, seed=1)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.indices["test"], c.indices["test"])
    ids = torch.cat([a.indices["train"], a.indices["test"], a.indices["heldout"]])
    assert ids.numel() == 1797 and ids.unique().numel() == 1797  # a partition of the whole data set
    from sklearn.datasets import load_digits

    bunch = load_digits()
    assert torch.equal(a.test_y, torch.as_tensor(bunch.target)[a.indices["test"]])
    assert torch.allclose(a.test_x[:, 0], torch.as_tensor(bunch.images)[a.indices["test"]] / 16)


def test_split_sizes_are_checked():
    with pytest.raises(ExplaindError, match="num_train"):
        digits.load_digits_data(num_train=1700, num_test=200)
    with pytest.raises(ExplaindError, match="num_heldout"):
        digits.load_digits_data(num_heldout=-1)


# ---------------------------------------------------------------------------------------------- models
@pytest.mark.parametrize("model_class", [digits.SmallCNN, digits.SmallResidualCNN])
def test_models_batched_and_single_inputs(model_class):
    model = digits.make_model(model_class, seed=0)
    x = digits.load_digits_data(num_train=10, num_test=4).test_x
    out = model(x)
    assert out.shape == (4, digits.NUM_CLASSES) and out.dtype == torch.float64
    assert torch.allclose(model(x[1]), out[1], atol=1e-14)  # one sample without a batch axis
    assert any(n.startswith(model_class.output_layer) for n, _ in model.named_parameters())


def test_make_model_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = digits.make_model(digits.SmallCNN, seed=5)
    after = torch.rand(3)
    b = digits.make_model(digits.SmallCNN, seed=5)
    c = digits.make_model(digits.SmallCNN, seed=6)
    assert torch.equal(before, after)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))
    assert not torch.equal(a.conv1.weight, c.conv1.weight)


def test_unknown_activation_is_refused():
    with pytest.raises(ExplaindError, match="activation"):
        digits.SmallCNN(activation="swish")


# ---------------------------------------------------------------------------------------------- training
def _small_data():
    return digits.load_digits_data(num_train=96, num_test=12, seed=0)


def test_training_records_every_step_with_its_batch():
    data = _small_data()
    run = digits.train_digits(digits.make_model(digits.SmallCNN, seed=0, channels=(4, 4), hidden=8), data,
                              steps=7, batch_size=40, seed=0)
    model, trajectory, data_out = run
    assert data_out is run.data and model is run.model
    assert trajectory.num_steps == 7 and len(run.train_losses) == 7 and run.steps_per_epoch == 3
    sizes = [len(s.sample_ids) for s in trajectory.steps]
    assert sizes == [40, 40, 16, 40, 40, 16, 40]  # epochs of 96 samples, the short last batch kept
    epoch = sorted(u for s in trajectory.steps[:3] for u in s.sample_ids)
    assert epoch == list(range(96))  # one epoch visits every training sample once
    assert trajectory.optimizer == "adamw"
    for n, p in model.named_parameters():  # the returned model is θ_N
        assert torch.equal(p.detach(), trajectory.parameters[-1][n])


def test_training_is_deterministic():
    data = _small_data()
    runs = [digits.train_digits(digits.make_model(digits.SmallCNN, seed=1, channels=(4, 4), hidden=8), data,
                                steps=4, batch_size=32, seed=2) for _ in range(2)]
    assert runs[0].train_losses == runs[1].train_losses


def test_training_arguments_are_checked():
    data = _small_data()
    with pytest.raises(ExplaindError, match="batch_size"):
        digits.train_digits(None, data, steps=2, batch_size=500)
    with pytest.raises(ExplaindError, match="steps"):
        digits.train_digits(None, data, steps=0)


@pytest.mark.parametrize(
    "model_class, optimizer_factory, decompose",
    [
        (digits.SmallCNN, digits.default_adamw, em.decompose_adamw_training),
        (digits.SmallResidualCNN, digits.default_sgd_momentum, em.decompose_sgd_momentum_training),
    ],
)
def test_recorded_cnn_runs_decompose_exactly(model_class, optimizer_factory, decompose):
    """Theorem 3.1 (AdamW) and Corollary 3.2 (SGD + momentum) on the two CNNs: with smooth activations
    and average pooling, 8 Gauss–Legendre nodes reach the README's smooth-model tolerance."""
    data = _small_data()
    kwargs = {"channels": (4, 4), "hidden": 8} if model_class is digits.SmallCNN else {"channels": 4}
    run = digits.train_digits(digits.make_model(model_class, seed=0, **kwargs), data,
                              optimizer_factory=optimizer_factory, steps=6, batch_size=32, seed=0)
    result = decompose(run.model, run.trajectory, digits.digits_loss, data.train, data.test_x,
                       quadrature=em.gauss_legendre(8), keep=("test", "output"), dtype=torch.float64)
    scores = metrics.reconstruction_metrics(result)
    assert scores["relative_residual"] <= SMOOTH_TOLERANCE
    assert scores["epk_accuracy"] == 1.0 and abs(scores["kl"]) < 1e-12
    assert torch.allclose(result.f_final, run.model(data.test_x).detach(), atol=1e-12)


def test_adamw_training_lowers_the_loss():
    """AdamW at the default step size on the default CNN: the mean loss of the last 5 of 40 steps is
    below that of the first 5 (a training loop that does not train would fail this)."""
    data = digits.load_digits_data(num_train=400, num_test=10, seed=0)
    run = digits.train_digits(digits.make_model(digits.SmallCNN, seed=0), data, steps=40, batch_size=64)
    first, last = sum(run.train_losses[:5]) / 5, sum(run.train_losses[-5:]) / 5
    assert last < 0.8 * first
    assert metrics.accuracy(run.model(data.train_x).detach(), data.train_y) > 0.5


# ---------------------------------------------------------------------------------------------- metrics
def test_epk_accuracy_and_accuracy_count_argmax_agreements():
    model = torch.tensor([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 5.0], [0.0, 0.0, 1.0]])
    recon = torch.tensor([[1.5, 1.0, 0.0], [4.0, 3.0, 1.0], [1.0, 0.0, 2.0], [0.0, 2.0, 1.0]])
    assert metrics.epk_accuracy(recon, model) == 0.5
    assert metrics.epk_accuracy(model, model) == 1.0
    assert metrics.accuracy(model, torch.tensor([0, 1, 0, 2])) == 0.75


def test_kl_divergence_matches_the_formula_and_its_direction():
    p_logits = torch.tensor([[math.log(0.75), math.log(0.25)]], dtype=torch.float64)
    q_logits = torch.tensor([[math.log(0.5), math.log(0.5)]], dtype=torch.float64)
    expected_pq = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    expected_qp = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    assert metrics.kl_divergence(p_logits, q_logits) == pytest.approx(expected_pq, rel=1e-14)
    assert metrics.kl_divergence(q_logits, p_logits) == pytest.approx(expected_qp, rel=1e-14)
    # averaged over test inputs, invariant to a constant shift of the logits, zero for equal distributions
    both_p = torch.cat([p_logits, p_logits + 7.0])
    both_q = torch.cat([q_logits, q_logits - 3.0])
    assert metrics.kl_divergence(both_p, both_q) == pytest.approx(expected_pq, rel=1e-13)
    assert metrics.kl_divergence(both_p, both_p + 2.5) == pytest.approx(0.0, abs=1e-15)


def test_metrics_refuse_bad_input():
    good = torch.zeros(3, 4)
    with pytest.raises(ExplaindError, match="shape"):
        metrics.epk_accuracy(torch.zeros(3, 5), good)
    with pytest.raises(ExplaindError, match="NaN"):
        metrics.kl_divergence(good, torch.full((3, 4), float("nan")))
    with pytest.raises(ExplaindError, match="labels"):
        metrics.accuracy(good, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ExplaindError, match="shape"):
        metrics.kl_divergence(torch.zeros(4), torch.zeros(4))
