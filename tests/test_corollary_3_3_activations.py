"""Corollary 3.3 (ii): decompositions of an intermediate activation a(x; θ) (MATH.md §6).

    Φ^a_t(x) = ∫_0^1 ∂_θ a(x; θ_t(α)) dα,     a(x; θ_N) = a(x; θ_0) + Σ I^a + Σ Ψ^a

Properties on random runs of the real torch optimizer of every registered rule (recorded by
``TrajectoryRecorder``):

* hidden layers of tanh/GELU MLPs (any submodule but the whole model) and the q/k/v/output projections
  of a self-attention block, with ``select=`` picking one token: the reconstruction is exact
  (|residual| ≤ 1e-9·(1 + |change|)), and ``f_initial`` / ``f_final`` equal the activation captured by
  a forward hook on the live model before / after training;
* parameters the activation does not depend on (found independently with autograd on the live model:
  ``allow_unused`` gives None) have influence exactly 0.0: kernel, regularization and per_parameter;
* an unknown module name raises ExplaindError listing the model's submodules.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import explaind_math as em
from explaind_math.testing import strategies as es
from explaind_math.testing.residuals import RESIDUALS, assert_exact, report_residual

RTOL = 1e-9
LIVE_RTOL = 1e-12
THEOREM = "corollary_3_3"  # the row of `python -m explaind_math verify`

SETTINGS = es.property_settings()  # the profile, plus the device fixture shared across examples


def live_activation(model: nn.Module, module: str, inputs: torch.Tensor) -> torch.Tensor:
    """The named submodule's output on a batch, captured by a forward hook on the live model."""
    captured = []
    handle = dict(model.named_modules())[module].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        with torch.no_grad():
            model(inputs)
    finally:
        handle.remove()
    assert len(captured) == 1
    return captured[0].detach().clone()


def unused_parameters(model: nn.Module, module: str, inputs: torch.Tensor) -> set[str]:
    """Parameters the activation does not depend on at all (autograd: no path from them to it)."""
    captured = []
    handle = dict(model.named_modules())[module].register_forward_hook(lambda m, i, o: captured.append(o))
    try:
        model(inputs)
    finally:
        handle.remove()
    names, params = zip(*model.named_parameters())
    grads = torch.autograd.grad(captured[0].sum(), params, allow_unused=True)
    return {n for n, g in zip(names, grads) if g is None}


def check_zero_influence(result: em.Influence, unused: set[str], moved: set[str] | None = None) -> None:
    """Exactly zero influence of the parameters after (or beside) the activation; some other is nonzero
    (when one of the parameters it depends on moved at all: ``moved``, default all)."""
    assert set(result.param_labels) >= unused
    p_k = result.kernel_axes.index("param")
    p_r = result.regularization_axes.index("param")
    per_parameter = result.per_parameter()
    for name in unused:
        j = result.param_labels.index(name)
        assert torch.all(result.kernel.select(p_k, j) == 0.0), name
        assert torch.all(result.regularization.select(p_r, j) == 0.0), name
        assert per_parameter[name] == 0.0, name
    used = [n for n in result.param_labels if n not in unused]
    assert used, "the activation depends on no trained parameter"
    if moved is not None and not moved.intersection(used):
        return  # e.g. the only layer before the activation was frozen on every step: nothing to attribute
    assert any(result.kernel.select(p_k, result.param_labels.index(n)).abs().max() > 0 for n in used)


def check_activation_result(spec: es.RunSpec, run: es.TrainedRun, result: em.Influence, module: str,
                            select=None) -> float:
    """Exactness, agreement with the live model's activation before/after training, zero influence."""
    before_model = spec.model.build(seed=spec.seed, device=run.test_inputs.device)  # θ_0, same init
    expected = []
    for model in (before_model, run.model):
        a = live_activation(model, module, run.test_inputs)
        a = a if select is None else torch.stack([select(a[k]) for k in range(a.shape[0])])
        expected.append(a.reshape(a.shape[0], -1))
    assert result.f_initial.shape == expected[0].shape
    assert float(((result.f_initial - expected[0]).abs() / (1 + expected[0].abs())).max()) <= LIVE_RTOL
    assert float(((result.f_final - expected[1]).abs() / (1 + expected[1].abs())).max()) <= LIVE_RTOL
    assert "Corollary 3.3 (ii)" in result.theorem and module in result.theorem
    rel = assert_exact(result, RTOL, what=f"activation {module!r}")
    first, last = run.trajectory.parameters[0], run.trajectory.parameters[-1]
    moved = {n for n in first if not torch.equal(first[n], last[n])}
    check_zero_influence(result, unused_parameters(run.model, module, run.test_inputs), moved)
    return rel


# ---------------------------------------------------------------------------------------------------
# MLP hidden layers
# ---------------------------------------------------------------------------------------------------
MLP_RUNS = es.training_runs(model_strategy=es.mlp_models(activations=("tanh", "gelu")))  # every registered rule


@SETTINGS
@given(spec=MLP_RUNS, data=st.data())
def test_mlp_hidden_layer_activation_is_exact(spec, data, device):
    run = es.train_and_record(spec, device=device)
    # the hidden layers: every Linear layer and activation of the Sequential body before its last Linear
    body_prefix = "0." if spec.model.loss == "nll" else ""  # the log-softmax head wraps the body
    body = run.model[0] if spec.model.loss == "nll" else run.model
    modules = [body_prefix + str(k) for k in range(len(body) - 1)]
    module = data.draw(st.sampled_from(modules), label="module")

    result = em.decompose_activation(run.model, run.trajectory, run.loss_fn, run.train_data,
                                     run.test_inputs, module)
    rel = check_activation_result(spec, run, result, module)
    report_residual(THEOREM, f"(ii) {spec.model.family}, module {module}", rel)

    # structurally: every parameter of a later layer of the Sequential body contributes exactly zero
    index = int(module[len(body_prefix):].split(".")[0])
    later = [n for n in result.param_labels if int(n[len(body_prefix):].split(".")[0]) > index]
    per_parameter = result.per_parameter()
    assert all(per_parameter[n] == 0.0 for n in later)


# ---------------------------------------------------------------------------------------------------
# a submodule of a self-attention block, one token selected
# ---------------------------------------------------------------------------------------------------
ATTENTION_RUNS = es.training_runs(model_strategy=es.attention_models(implementations=("single",)))  # every rule


@SETTINGS
@given(spec=ATTENTION_RUNS, data=st.data())
def test_attention_submodule_activation_with_select_is_exact(spec, data, device):
    run = es.train_and_record(spec, device=device)
    prefix = "0." if spec.model.loss == "nll" else ""
    module = prefix + data.draw(st.sampled_from(("q", "k", "v", "o")), label="module")
    tokens = spec.model.input_shape[0]
    position = data.draw(st.integers(0, tokens - 1), label="position")
    select = lambda a: a[position]  # noqa: E731  (one token's vector, no batch axis)

    result = em.decompose_activation(run.model, run.trajectory, run.loss_fn, run.train_data,
                                     run.test_inputs, module, select=select)
    assert result.f_final.shape == (run.test_inputs.shape[0], spec.model.hidden[0])
    rel = check_activation_result(spec, run, result, module, select=select)
    report_residual(THEOREM, f"(ii) attention, module {module.split('.')[-1]}, token {position}", rel)
    # the classifier head comes after every projection: exactly zero
    assert result.per_parameter()[prefix + "fc.weight"] == 0.0
    assert result.per_parameter()[prefix + "fc.bias"] == 0.0


# ---------------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------------
def test_unknown_module_name_lists_the_modules(device):
    spec = es.RunSpec(
        model=es.ModelSpec(family="attention", input_shape=(3, 4), num_outputs=2, hidden=(4, 1)),
        optimizer=es.OptimizerSpec("adamw", (("lr", 0.01),)),
        schedule=es.TrainingSchedule(num_samples=6, batch_sizes=(3, 2)),
        seed=5,
    )
    run = es.train_and_record(spec, device=device)
    with pytest.raises(em.ExplaindError) as info:
        em.decompose_activation(run.model, run.trajectory, run.loss_fn, run.train_data, run.test_inputs,
                                "attention.not_a_module")
    message = str(info.value)
    assert "attention.not_a_module" in message
    for name, _ in run.model.named_modules():
        if name:
            assert repr(name) in message, f"{name!r} is not listed in: {message}"
