"""The modular-addition data set, the Appendix E.2 Transformer and its recorded full-batch AdamW run."""

import pytest
import torch

import explaind_math as em
from explaind_math.errors import ExplaindError
from explaind_math.experiments import modular_addition as ma


def test_data_covers_every_pair_once_with_the_sum_mod_p_as_label():
    p = 7
    tokens, labels = ma.modular_addition_data(p)
    assert tokens.shape == (p * p, 3) and labels.shape == (p * p,)
    assert tokens.dtype == torch.long and labels.dtype == torch.long
    assert (tokens[:, 2] == p).all()  # '=' is token p
    pairs = {(int(a), int(b)) for a, b in tokens[:, :2]}
    assert pairs == {(a, b) for a in range(p) for b in range(p)}
    for row in range(p * p):
        a, b = int(tokens[row, 0]), int(tokens[row, 1])
        assert row == ma.sample_id(a, b, p)
        assert int(labels[row]) == (a + b) % p


@pytest.mark.parametrize("symmetric", [True, False])
def test_split_is_seeded_disjoint_and_sized_by_the_fraction(symmetric):
    p = 11
    train, test = ma.train_test_split(p, 0.3, seed=5, symmetric=symmetric)
    assert set(train.tolist()).isdisjoint(test.tolist())
    assert set(train.tolist()) | set(test.tolist()) == set(range(p * p))
    assert torch.equal(train, train.sort().values) and torch.equal(test, test.sort().values)
    if symmetric:  # unordered pairs {a, b}, each in both orders on one side
        def unordered(ids):
            return {(min(int(i) // p, int(i) % p), max(int(i) // p, int(i) % p)) for i in ids}
        assert len(unordered(train)) == round(0.3 * p * (p + 1) / 2)
        for i in train.tolist():
            assert ma.sample_id(i % p, i // p, p) in set(train.tolist())  # (b, a) is with (a, b)
    else:
        assert train.numel() == round(0.3 * p * p)
    torch.manual_seed(123)  # the global random state must not matter
    again_train, again_test = ma.train_test_split(p, 0.3, seed=5, symmetric=symmetric)
    assert torch.equal(train, again_train) and torch.equal(test, again_test)
    other, _ = ma.train_test_split(p, 0.3, seed=6, symmetric=symmetric)
    assert not torch.equal(train, other)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5])
def test_split_refuses_fractions_outside_the_open_unit_interval(fraction):
    with pytest.raises(ExplaindError, match="train_fraction"):
        ma.train_test_split(5, fraction)


@pytest.mark.parametrize("options", [{"activation": "tanh"}, {"positional": "sinusoidal"}, {"norm": "pre"},
                                     {"d_model": 10, "heads": 4}])
def test_model_refuses_unknown_options_by_name(options):
    with pytest.raises(ExplaindError):
        ma.ModularAdditionTransformer(5, **{"d_model": 8, "heads": 2, "mlp_width": 8, **options})


@pytest.mark.parametrize("options", [{}, {"activation": "relu"}, {"positional": "learned"}, {"norm": "none"}])
def test_model_maps_token_sequences_to_p_logits_read_from_the_last_position(options):
    p = 5
    torch.manual_seed(0)
    model = ma.ModularAdditionTransformer(p, 8, 2, 16, **options).double()
    tokens, _ = ma.modular_addition_data(p)
    out = model(tokens)
    assert out.shape == (p * p, p) and out.dtype == torch.float64
    assert torch.allclose(model(tokens[3]), out[3], atol=1e-14)  # one unbatched sequence
    layers = ma.paper_layers(model)
    assert set(layers) == {n for n, _ in model.named_parameters()}
    assert set(layers.values()) <= set(ma.PAPER_LAYER_ORDER)
    if "positional" not in options:
        # no positional encoding: the model only sees the multiset {a, b}, so f(a, b) = f(b, a)
        swapped = tokens[:, [1, 0, 2]]
        assert torch.allclose(model(swapped), out, atol=1e-12)


def test_full_batch_training_learns_and_records_every_step():
    p = 5
    tokens, labels = ma.modular_addition_data(p)
    train, test = ma.train_test_split(p, 0.6, seed=0)
    torch.manual_seed(0)
    model = ma.ModularAdditionTransformer(p, 16, 2, 32)
    run = ma.train_full_batch(model, tokens, labels, train, test, steps=150, lr=1e-2, weight_decay=0.1, eval_every=50)
    assert run.trajectory.num_steps == 150
    assert [h[0] for h in run.history] == [0, 50, 100, 150]
    # full-batch AdamW on 15 pairs: the training loss falls (memorization is not asserted: one seed of three
    # stalls at 13/15 in a local minimum)
    assert run.history[-1][1] < 0.5 * run.history[0][1]
    assert run.history[-1][2] > run.history[0][2]
    for step in run.trajectory.steps:  # full batch: every step uses every training id with weight 1/|train|
        assert sorted(step.sample_ids) == train.tolist()
        assert torch.allclose(step.weights.double(), torch.full((len(train),), 1 / len(train), dtype=torch.float64))


def test_stop_at_test_accuracy_ends_training_after_the_extra_steps():
    p = 5
    tokens, labels = ma.modular_addition_data(p)
    train, _ = ma.train_test_split(p, 0.6, seed=0)
    torch.manual_seed(0)
    model = ma.ModularAdditionTransformer(p, 8, 2, 8)
    # the training ids as "test" ids: reaching test accuracy 0 is immediate, so the run stops at step 1 + 3
    run = ma.train_full_batch(model, tokens, labels, train, train, steps=50, eval_every=1,
                              stop_at_test_accuracy=0.0, extra_steps_after_stop=3, record=False)
    assert run.history[-1][0] == 4 and run.trajectory is None
    assert run.first_step_reaching(0.0) == 0


def test_a_two_step_recorded_run_decomposes_with_a_tiny_residual():
    """Theorem 3.1 on the Transformer, two full-batch AdamW steps, float64, GL(8), one row per paper
    layer: the smooth-model tolerance of the README ('Tolerances'), 1e-9 · (1 + |Δf|)."""
    p = 5
    tokens, labels = ma.modular_addition_data(p)
    train, test = ma.train_test_split(p, 0.5, seed=1)
    torch.manual_seed(0)
    model = ma.ModularAdditionTransformer(p, 8, 2, 16).double()
    run = ma.train_full_batch(model, tokens, labels, train, test, steps=2, lr=1e-2, record_gradients=True)
    X_test = tokens[ma.sample_id(torch.arange(p), 0, p)]  # all a, b = 0
    result = em.decompose_adamw_training(
        model, run.trajectory, ma.per_sample_loss, (tokens, labels), X_test,
        quadrature=em.gauss_legendre(8), keep=("step", "param", "test", "output"),
        params=ma.paper_layers(model), dtype=torch.float64,
    )
    assert result.kernel.shape == (2, len(set(ma.paper_layers(model).values())), p, p)
    change = (result.f_final - result.f_initial).abs().max()
    assert change > 1e-3  # the steps moved the outputs: the identity is not trivially met
    assert result.max_residual <= 1e-9 * (1 + change)
    with torch.no_grad():
        assert torch.allclose(result.f_final, model(X_test), atol=1e-12)
