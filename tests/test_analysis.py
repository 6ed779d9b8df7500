"""explaind_math.analysis on small recorded AdamW runs (float64, CPU): accumulations, importance,
similarity and kernel matrices, exports."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

import explaind_math as em
from explaind_math import analysis
from explaind_math.testing.small_runs import blob_loss, recorded_blob_run

STEPS = 6
ALL_AXES = ("step", "param", "test", "unit", "output")


_loss = blob_loss


@pytest.fixture(scope="module")
def run():
    model, trajectory, (X, Y), X_test = recorded_blob_run(seed=1, num_test=5, steps=STEPS)

    def decompose(**options):
        options.setdefault("quadrature", em.gauss_legendre(4))
        return em.decompose_adamw_training(model, trajectory, _loss, (X, Y), X_test, dtype=torch.float64, **options)

    return {
        "decompose": decompose,
        "names": [n for n, _ in model.named_parameters()],
        "full": decompose(keep=ALL_AXES, params="tensor"),
        "coordinate": decompose(keep=ALL_AXES, params="coordinate"),
        "module": decompose(keep=("step", "param", "test", "output"), params="module"),
        "bare": decompose(keep=("test", "output")),
    }


def close(a, b, tol=1e-12):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64), rtol=0, atol=tol)


# ------------------------------------------------------------------------------ accumulated influence
def test_accumulation_over_all_axes_is_the_sum_of_the_kernel(run):
    r = run["full"]
    assert r.max_residual < 1e-9
    everything = analysis.accumulated_influence(r, keep=())
    assert everything.axes == () and close(everything.values, r.kernel.sum())
    per_prediction = analysis.accumulated_influence(r)
    assert per_prediction.axes == ("test", "output") and close(per_prediction.values, r.kernel_sum())
    # f(θ_0) + Σ_U I + Ψ + Ξ ("total") is the certified reconstruction, so it matches f(θ_N)
    total = analysis.accumulated_influence(r, source="total")
    assert close(r.f_initial + total.values, r.f_final, 1e-9)


def test_parameter_groups_partition_the_sum(run):
    r = run["full"]
    by_layer = analysis.accumulated_influence(r, ("param", "test", "output"), groups="layer")
    assert by_layer.coords["param"] == ["0", "2"]
    assert close(by_layer.values.sum(0), r.kernel_sum())
    by_tensor = analysis.accumulated_influence(r, ("param", "test", "output"))
    assert by_tensor.coords["param"] == run["names"]
    assert close(by_layer.values[0], by_tensor.values[0] + by_tensor.values[1])
    assert close(by_layer.values[1], by_tensor.values[2] + by_tensor.values[3])
    mapping = {"0.weight": "weights", "2.weight": "weights", "0.bias": "biases", "2.bias": "biases"}
    by_kind = analysis.accumulated_influence(r, ("param",), groups=mapping)
    assert by_kind.coords["param"] == ["weights", "biases"]
    assert close(by_kind.values, by_tensor.values.sum((1, 2))[[0, 1]] + by_tensor.values.sum((1, 2))[[2, 3]])
    # selecting one group restricts J and leaves the rest out
    only_first = analysis.accumulated_influence(r, (), groups="layer", params="0")
    assert close(only_first.values, by_layer.values[0].sum())


def test_per_coordinate_result_groups_into_tensors_modules_and_layers(run):
    coordinate, tensor = run["coordinate"], run["full"]
    regrouped = analysis.accumulated_influence(coordinate, ("param", "test", "output"), groups="tensor")
    assert regrouped.coords["param"] == run["names"]
    assert close(regrouped.values, analysis.accumulated_influence(tensor, ("param", "test", "output")).values, 1e-11)
    modules = analysis.accumulated_influence(coordinate, ("param",), groups="module")
    assert modules.coords["param"] == ["0", "2"]
    assert close(modules.values, analysis.accumulated_influence(run["module"], ("param",)).values, 1e-11)
    # a user mapping may be keyed by tensor names for a per-coordinate result
    grouped = analysis.accumulated_influence(coordinate, ("param",), groups={n: "one" for n in run["names"]})
    assert close(grouped.values, coordinate.kernel.sum(), 1e-11)


def test_step_windows_add_up_to_the_total(run):
    r = run["full"]
    windows = analysis.accumulated_influence(r, ("step", "test", "output"), steps=[(0, 2), (2, 5), (5, STEPS)])
    assert windows.coords["step"] == ["0:2", "2:5", "5:6"]
    assert close(windows.values.sum(0), r.kernel_sum())
    assert close(windows.values[1], r.kernel[2:5].sum((0, 1, 3)))
    sliced = analysis.accumulated_influence(r, ("test", "output"), steps=slice(2, 5))
    assert close(sliced.values, windows.values[1])
    listed = analysis.accumulated_influence(r, ("step",), steps=[4, 1])
    assert listed.coords["step"] == [4, 1] and close(listed.values, r.kernel[[4, 1]].sum((1, 2, 3, 4)))


def test_unit_test_and_output_selections(run):
    r = run["full"]
    ids = [r.units[3], r.units[0]]
    acc = analysis.accumulated_influence(r, ("unit",), units=ids, tests=[1, 4], outputs=2)
    assert acc.coords["unit"] == ids
    assert close(acc.values, r.kernel[:, :, [1, 4]][..., [3, 0], :][..., 2].sum((0, 1, 2)))


# ------------------------------------------------------------------------------ importance
def test_importance_takes_absolute_values_per_prediction(run):
    r = run["full"]
    imp = analysis.accumulated_importance(r)
    assert close(imp.values, r.kernel_sum().abs().sum())
    assert imp.values >= analysis.accumulated_influence(r, ()).values.abs()
    per_param = analysis.accumulated_importance(r, ("param",))  # the pruning score of §4.1
    assert close(per_param.values, r.kernel.sum((0, 3)).abs().sum((1, 2)))
    per_sample = analysis.accumulated_importance(r, absolute_over=ALL_AXES)
    assert close(per_sample.values, r.kernel.abs().sum())
    reg = analysis.accumulated_regularization_importance(r, ("step",))
    assert close(reg.values, r.regularization.sum(1).abs().sum((1, 2)))


def test_regularization_analogues_and_relative_influence(run):
    r = run["full"]
    psi = analysis.accumulated_regularization_influence(r)
    assert close(psi.values, r.regularization_sum())
    assert psi.values.abs().max() > 0  # weight decay 0.1: Ψ is not trivially zero
    keep = ("step", "param")
    imp_kernel = analysis.accumulated_importance(r, keep, groups="layer").values
    imp_reg = analysis.accumulated_regularization_importance(r, keep, groups="layer").values
    assert close(imp_reg, r.regularization.reshape(STEPS, 2, 2, *r.regularization.shape[2:]).sum(2).abs().sum((2, 3)))
    difference = analysis.relative_regularization_influence(r, keep, groups="layer")
    assert close(difference.values, imp_reg - imp_kernel)
    ratio = analysis.relative_regularization_influence(r, keep, groups="layer", form="ratio")
    assert ratio.axes == keep and ratio.coords["param"] == ["0", "2"]
    assert close(ratio.values, imp_reg / (imp_kernel + imp_reg))
    assert bool(((ratio.values >= 0) & (ratio.values <= 1)).all())


# ------------------------------------------------------------------------------ similarity and kernel matrices
def test_similarity_matrix_is_the_cosine_of_the_flattened_influences(run):
    r = run["full"]
    sim = analysis.similarity_matrix(r, groups="layer", params="2", steps=slice(2, 6))
    values = sim.values
    assert sim.axes == ("test", "other_test") and values.shape == (5, 5)
    assert close(values, values.T) and close(values.diagonal(), torch.ones(5))
    # direct: the layer-"2" tensors (summed into one group), steps 2..5, every unit and output
    block = r.kernel[2:6, 2:4].sum(1)  # (step, test, unit, output)
    vectors = block.permute(1, 0, 2, 3).reshape(5, -1).numpy()
    unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    assert np.allclose(values.numpy(), unit @ unit.T, atol=1e-12)
    summed = analysis.similarity_matrix(r, sum_over=("step", "param", "unit"))
    direct = torch.nn.functional.normalize(r.kernel.sum((0, 1, 3)), dim=1)
    assert close(summed.values, direct @ direct.T)


def test_test_train_kernel_sums_to_the_kernel(run):
    r = run["full"]
    matrix = analysis.test_train_kernel(r, groups="layer", params="0", steps=slice(1, 4))
    assert matrix.axes == ("test", "unit") and matrix.coords["unit"] == list(r.units)
    same_selection = analysis.accumulated_influence(r, ("test",), groups="layer", params="0", steps=slice(1, 4))
    assert close(matrix.values.sum(1), same_selection.values)
    layers = analysis.test_train_kernel(r, groups="layer").values
    assert close(layers, r.kernel_sum(("test", "unit")))
    per_window = analysis.test_train_kernel(r, steps=[(0, 3), (3, STEPS)])
    assert per_window.axes == ("step", "test", "unit")
    assert close(per_window.values.sum((0, 2)), r.kernel_sum(("test",)))


# ------------------------------------------------------------------------------ errors
def test_clear_errors_for_axes_the_result_did_not_keep(run):
    bare, full, module = run["bare"], run["full"], run["module"]
    with pytest.raises(ValueError, match="cannot keep axes \\['unit'\\]"):
        analysis.accumulated_influence(bare, ("unit",))
    with pytest.raises(ValueError, match="summed the 'param' axis"):
        analysis.accumulated_influence(bare, (), groups="layer")
    with pytest.raises(ValueError, match="summed the 'step' axis"):
        analysis.accumulated_influence(bare, (), steps=slice(0, 2))
    with pytest.raises(ValueError, match="no unit axis"):
        analysis.accumulated_regularization_influence(full, ("unit",))
    with pytest.raises(ValueError, match="keep 'step'"):
        analysis.accumulated_influence(full, (), steps=[(0, 2), (2, 4)])
    with pytest.raises(ValueError, match="not parameter tensors"):
        analysis.accumulated_influence(module, ("param",), groups="tensor", parameter_names=run["names"])
    with pytest.raises(ValueError, match="does not assign"):
        analysis.accumulated_influence(full, ("param",), groups={"0.weight": "a"})
    with pytest.raises(ValueError, match="not among"):
        analysis.accumulated_influence(full, (), groups="layer", params="decoder")
    with pytest.raises(ValueError, match="source must be one of"):
        analysis.accumulated_influence(full, source="kernels")


def test_layer_names():
    assert analysis.layer_of("encoder.layers.3.attn.in_proj_weight") == "encoder.layers.3"
    assert analysis.layer_of("0.weight") == "0"
    assert analysis.layer_of("decoder.weight") == "decoder"
    assert analysis.layer_of("pos_embedding") == "pos_embedding"


# ------------------------------------------------------------------------------ exports
def test_pandas_long_format_round_trips(run):
    r = run["full"]
    acc = analysis.accumulated_influence(r, ("step", "param", "unit"), groups="layer", steps=[(0, 3), (3, STEPS)])
    frame = analysis.to_pandas(acc)
    assert list(frame.columns) == ["step", "param", "unit", "value"]
    assert len(frame) == acc.values.numel()
    back = frame.set_index(["step", "param", "unit"])["value"].unstack("unit")
    row = back.loc[("3:6", "2")]
    assert np.allclose(row.loc[list(r.units)].to_numpy(), acc.numpy()[1, 1], atol=0, rtol=0)
    whole = analysis.to_pandas(r)  # the full kernel tensor, one row per (t, j, x, i, o)
    assert list(whole.columns) == [*ALL_AXES, "value"] and len(whole) == r.kernel.numel()
    assert np.isclose(whole["value"].sum(), float(r.kernel.sum()), atol=1e-12)
    one = whole[(whole.step == 2) & (whole.param == "2.weight") & (whole.test == 1) & (whole.unit == r.units[5]) & (whole.output == 0)]
    assert float(one["value"].iloc[0]) == float(r.kernel[2, 2, 1, 5, 0])


def test_xarray_export_has_named_dims_and_coordinates(run):
    r = run["full"]
    array = analysis.to_xarray(r)
    assert array.dims == ALL_AXES
    assert list(array.coords["step"].values) == list(r.steps)
    assert list(array.coords["param"].values) == run["names"]
    assert list(array.coords["unit"].values) == list(r.units)
    assert list(array.coords["test"].values) == list(range(5)) and list(array.coords["output"].values) == [0, 1, 2]
    assert array.attrs["max_residual"] == r.max_residual
    picked = array.sel(step=3, param="0.bias", unit=r.units[2], test=4, output=1)
    assert float(picked) == float(r.kernel[3, 1, 4, 2, 1])
    assert np.allclose(array.sum(["step", "param", "unit"]).values, r.kernel_sum().numpy(), atol=1e-12)
    psi = analysis.to_xarray(r, source="regularization")
    assert psi.dims == ("step", "param", "test", "output")
    sim = analysis.to_xarray(analysis.similarity_matrix(r))
    assert sim.dims == ("test", "other_test")
    numpy = analysis.to_numpy(analysis.accumulated_influence(r, ("param", "test"), groups="layer"))
    assert numpy["axes"] == ("param", "test") and list(numpy["param"]) == ["0", "2"]
    assert np.allclose(numpy["values"], r.kernel.reshape(STEPS, 2, 2, 5, -1, 3).sum((0, 2, 4, 5)).numpy(), atol=1e-12)


def test_missing_optional_dependency_names_the_extra(run, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    monkeypatch.setitem(sys.modules, "xarray", None)
    with pytest.raises(ImportError, match=r"explaind_math\[analysis\]"):
        analysis.to_pandas(run["full"])
    with pytest.raises(ImportError, match=r"explaind_math\[analysis\]"):
        analysis.to_xarray(run["full"])


def test_importing_the_library_does_not_import_the_optional_packages():
    code = ("import sys, explaind_math; from explaind_math import analysis, plots; "
            "print(sorted(m for m in ('matplotlib', 'pandas', 'xarray') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ quadrature fidelity
def test_quadrature_fidelity_improves_with_gauss_legendre_nodes(run):
    fidelity = analysis.quadrature_fidelity(lambda q: run["decompose"](quadrature=q, keep=("test", "output")),
                                            nodes=(1, 2, 4))
    gauss, midpoint = fidelity["gauss_legendre"], fidelity["midpoint"]
    assert gauss[1] == pytest.approx(midpoint[1], rel=1e-9)  # both place one node at α = 1/2
    assert gauss[4] < gauss[2] < gauss[1] and gauss[4] < 1e-9
    assert gauss[4] < midpoint[4]
