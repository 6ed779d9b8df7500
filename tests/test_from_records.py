"""Trajectory.from_records: a run recorded by other code (plain lists and dicts) decomposes exactly
as the recorder's trajectory of the same run does, and incomplete records get errors naming what
is missing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em
from explaind_math.errors import NonFiniteError, TrajectoryMismatchError, UnsupportedOptimizerError

DT = torch.float64
N = 24
STEPS = 4



def _ce(out, y):
    return F.cross_entropy(out, y)


def _run(opt_name, device, *, resumed=False):
    """Train with the recorder attached AND keep our own plain records of the same run, the way other
    training code would: parameter dicts, id lists, param_groups dicts, optimizer state entries."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(N, 4, generator=g, dtype=DT).to(device)
    Y = torch.randint(0, 3, (N,), generator=g).to(device)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).to(device=device, dtype=DT)
    groups = [{"params": model[0].parameters()}, {"params": model[2].parameters(), "lr": 0.02, "weight_decay": 0.1}]
    if opt_name == "adamw":
        opt = torch.optim.AdamW(groups, lr=0.05, betas=(0.8, 0.9))
    elif opt_name == "adamw-amsgrad":
        opt = torch.optim.AdamW(groups, lr=0.05, betas=(0.9, 0.5), amsgrad=True)
    else:
        opt = torch.optim.SGD(groups, lr=0.1, momentum=0.9, dampening=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 2, 0.5)
    if resumed:
        for _ in range(2):
            opt.zero_grad()
            _ce(model(X[:6]), Y[:6]).backward()
            opt.step()
    names = {p: n for n, p in model.named_parameters()}
    records = {
        "parameters": [{n: p.detach().cpu().clone() for n, p in model.named_parameters()}],
        "batches": [], "hyperparameters": [], "states": [], "updated": [],
        "param_groups": {names[p]: gi for gi, grp in enumerate(opt.param_groups) for p in grp["params"]},
        "initial_state": {
            names[p]: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()
                       if k in ("step", "exp_avg", "momentum_buffer")}
            for p, st in opt.state.items()
        },
    }
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(STEPS):
        ids = sorted(torch.randperm(N, generator=g)[: 5 if t < STEPS - 1 else 3].tolist())
        opt.zero_grad()
        _ce(model(X[ids]), Y[ids]).backward()
        rec.record_batch(ids)
        records["batches"].append(ids)
        records["hyperparameters"].append([{k: v for k, v in grp.items() if k != "params"} for grp in opt.param_groups])
        records["updated"].append([n for n, p in model.named_parameters() if p.grad is not None])
        opt.step()
        sched.step()
        records["parameters"].append({n: p.detach().cpu().clone() for n, p in model.named_parameters()})
        records["states"].append({
            names[p]: {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in st.items()
                       if k in ("step", "exp_avg_sq", "max_exp_avg_sq")}
            for p, st in opt.state.items()
        })
    return model, X, Y, rec.trajectory(), records


def _from(records, optimizer, **overrides):
    kw = dict(
        optimizer=optimizer,
        parameters=records["parameters"],
        batches=records["batches"],
        hyperparameters=records["hyperparameters"],
        param_groups=records["param_groups"],
        states=records["states"],
        updated=records["updated"],
        initial_state=records["initial_state"] or None,
    )
    kw.update(overrides)
    return em.Trajectory.from_records(**kw)


def _decompose(model, traj, X, Y):
    fn = em.decompose_adamw_training if traj.optimizer == "adamw" else em.decompose_sgd_momentum_training
    return fn(model, traj, _ce, (X, Y), X[:3], keep=("step", "param", "unit"))


def _assert_same_decomposition(a, b):
    """a from records without gradients, b from the recorder (gradients recorded): the same tensors, except
    that b also has the recorded gradients' rounding as a pseudo-unit, which moves its step residuals by it."""
    for field in ("kernel", "regularization", "f_initial", "f_final"):
        assert torch.equal(getattr(a, field), getattr(b, field)), field
    assert a.gradient_rounding is None and b.gradient_rounding is not None
    rounding = b.gradient_rounding.sum(dim=tuple(range(1, b.gradient_rounding.dim() - 2)))  # per step (S, X, O)
    assert float(rounding.abs().max()) <= 1e-13
    assert torch.allclose(a.step_residuals, b.step_residuals + rounding, rtol=0, atol=1e-15)
    assert (a.carried_state is None) == (b.carried_state is None)
    if a.carried_state is not None:
        assert torch.equal(a.carried_state, b.carried_state)
    assert a.units == b.units and a.param_labels == b.param_labels
    assert a.relative_residual <= 1e-9 and a.max_replay_error <= 1e-10, a.summary()


# ---------------------------------------------------------------------------------------------
# equivalence with the recorder


@pytest.mark.parametrize("opt_name", ["adamw", "adamw-amsgrad", "sgd"])
def test_from_records_equals_the_recorder(opt_name, device):
    model, X, Y, recorded, records = _run(opt_name, device)
    optimizer = "sgd" if opt_name == "sgd" else "adamw"
    rebuilt = _from(records, optimizer, states=None if optimizer == "sgd" else records["states"])
    assert rebuilt.parameter_names == recorded.parameter_names
    assert rebuilt.group_of == recorded.group_of
    for a, b in zip(rebuilt.steps, recorded.steps):
        assert a.sample_ids == b.sample_ids and torch.equal(a.weights, b.weights)
        assert a.hyperparameters == b.hyperparameters
    _assert_same_decomposition(_decompose(model, rebuilt, X, Y), _decompose(model, recorded, X, Y))


@pytest.mark.parametrize("opt_name", ["adamw", "sgd"])
def test_from_records_with_carried_state(opt_name, device):
    model, X, Y, recorded, records = _run(opt_name, device, resumed=True)
    assert records["initial_state"]
    rebuilt = _from(records, "sgd" if opt_name == "sgd" else "adamw")
    a, b = _decompose(model, rebuilt, X, Y), _decompose(model, recorded, X, Y)
    assert a.carried_state is not None
    _assert_same_decomposition(a, b)


def test_plain_python_lists_and_defaults(device):
    """Parameters as nested lists of Python floats, ids as lists, and per-group hyper-parameter dicts
    that leave out what has torch's default (nesterov, maximize)."""
    model, X, Y, recorded, records = _run("sgd", device)
    plain_params = [{n: v.tolist() for n, v in snap.items()} for snap in records["parameters"]]
    plain_hyper = [[{"lr": grp["lr"], "momentum": 0.9, "dampening": 0.1, "weight_decay": grp["weight_decay"]}
                    for grp in step] for step in records["hyperparameters"]]
    rebuilt = em.Trajectory.from_records(
        optimizer="sgd",
        parameters=plain_params,
        batches=[list(b) for b in records["batches"]],
        hyperparameters=plain_hyper,
        param_groups=records["param_groups"],
    )
    assert rebuilt.dtype == torch.float64  # Python floats are doubles: never rounded to float32
    _assert_same_decomposition(_decompose(model, rebuilt, X, Y), _decompose(model, recorded, X, Y))


def test_hyperparameters_in_the_stored_form(device):
    """A trajectory's own normalized hyper-parameters (beta1/beta2 spelled out) are accepted back."""
    model, X, Y, recorded, records = _run("adamw", device)
    rebuilt = _from(records, "adamw", hyperparameters=[s.hyperparameters for s in recorded.steps])
    _assert_same_decomposition(_decompose(model, rebuilt, X, Y), _decompose(model, recorded, X, Y))


def test_explicit_weights_and_sum_reduction(device):
    model, X, Y, recorded, records = _run("sgd", device)
    with_weights = [(ids, [1 / len(ids)] * len(ids)) for ids in records["batches"]]
    rebuilt = _from(records, "sgd", batches=with_weights, states=None)
    _assert_same_decomposition(_decompose(model, rebuilt, X, Y), _decompose(model, recorded, X, Y))
    summed = _from(records, "sgd", states=None, reduction="sum")
    assert summed.steps[0].weights.tolist() == [1.0] * 5
    with pytest.raises(em.ReplayMismatchError, match="step 0, parameter"):
        _decompose(model, summed, X, Y)  # the run used mean losses: the replay notices


def test_unsorted_ids_give_the_same_influences(device):
    model, X, Y, recorded, records = _run("adamw", device)
    shuffled = [list(reversed(ids)) for ids in records["batches"]]
    a = _decompose(model, _from(records, "adamw", batches=shuffled), X, Y)
    b = _decompose(model, recorded, X, Y)
    assert a.units == b.units
    assert torch.allclose(a.kernel, b.kernel, rtol=0, atol=1e-14)
    assert a.relative_residual <= 1e-9


# ---------------------------------------------------------------------------------------------
# incomplete or inconsistent records


@pytest.fixture
def adamw_records(device):
    return _run("adamw", device)[4]


@pytest.mark.parametrize("field", ["exp_avg_sq", "step"])
def test_missing_state_field_is_named(field, adamw_records):
    states = [{n: dict(st) for n, st in step.items()} for step in adamw_records["states"]]
    del states[2]["2.weight"][field]
    with pytest.raises(TrajectoryMismatchError, match=rf"step 2: parameter '2.weight' .*'{field}'"):
        _from(adamw_records, "adamw", states=states)


def test_amsgrad_without_its_state_is_named(adamw_records):
    hyper = [[dict(g, amsgrad=True) for g in step] for step in adamw_records["hyperparameters"]]
    with pytest.raises(TrajectoryMismatchError, match=r"step 0: parameter '0.weight' lacks optimizer state 'max_exp_avg_sq'"):
        _from(adamw_records, "adamw", hyperparameters=hyper)


def test_adamw_without_states(adamw_records):
    with pytest.raises(TrajectoryMismatchError, match=r"step 0: parameter '0.weight' has no recorded 'step' count"):
        _from(adamw_records, "adamw", states=None)


@pytest.mark.parametrize("delta", [-1, +1])
def test_wrong_number_of_snapshots(delta, adamw_records):
    params = adamw_records["parameters"]
    params = params[:-1] if delta < 0 else params + [params[-1]]
    with pytest.raises(TrajectoryMismatchError, match=rf"{STEPS} steps need {STEPS + 1} parameter snapshots.*got {STEPS + 1 + delta}"):
        _from(adamw_records, "adamw", parameters=params)


def test_no_snapshots(adamw_records):
    with pytest.raises(TrajectoryMismatchError, match="snapshots"):
        _from(adamw_records, "adamw", parameters=[], batches=[], hyperparameters=[], states=[], updated=[])


@pytest.mark.parametrize("field", ["hyperparameters", "states", "updated"])
def test_per_step_lists_of_the_wrong_length(field, adamw_records):
    with pytest.raises(TrajectoryMismatchError, match=rf"{STEPS} batches .* {STEPS - 1} entries in {field}"):
        _from(adamw_records, "adamw", **{field: adamw_records[field][:-1]})


def test_snapshot_missing_a_parameter(adamw_records):
    params = [dict(p) for p in adamw_records["parameters"]]
    del params[3]["2.bias"]
    with pytest.raises(TrajectoryMismatchError, match=r"θ_3 has parameters \['2.bias'\]"):
        _from(adamw_records, "adamw", parameters=params)


def test_snapshot_with_a_wrong_shape(adamw_records):
    params = [dict(p) for p in adamw_records["parameters"]]
    params[1]["0.bias"] = torch.zeros(7, dtype=DT)
    with pytest.raises(TrajectoryMismatchError, match=r"θ_1\['0.bias'\] has shape \(7,\)"):
        _from(adamw_records, "adamw", parameters=params)


def test_state_with_a_wrong_shape(adamw_records):
    states = [{n: dict(st) for n, st in step.items()} for step in adamw_records["states"]]
    states[1]["0.weight"]["exp_avg_sq"] = torch.ones(3, dtype=DT)
    with pytest.raises(TrajectoryMismatchError, match=r"step 1: state 'exp_avg_sq' of '0.weight' has shape \(3,\)"):
        _from(adamw_records, "adamw", states=states)


def test_non_finite_snapshot(adamw_records):
    params = [dict(p) for p in adamw_records["parameters"]]
    params[2]["0.weight"] = params[2]["0.weight"].clone()
    params[2]["0.weight"][0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match=r"θ_2\['0.weight'\]"):
        _from(adamw_records, "adamw", parameters=params)


def test_missing_hyperparameter_is_named(adamw_records):
    hyper = [[{k: v for k, v in g.items() if k != "lr"} for g in step] for step in adamw_records["hyperparameters"]]
    with pytest.raises(TrajectoryMismatchError, match=r"step 0: the hyper-parameters of param group 0 lack 'lr'"):
        _from(adamw_records, "adamw", hyperparameters=hyper)
    hyper = [[{k: v for k, v in g.items() if k != "weight_decay"} for g in step] for step in adamw_records["hyperparameters"]]
    with pytest.raises(TrajectoryMismatchError, match="lack 'weight_decay'"):  # Adam's 0 and AdamW's 0.01 differ
        _from(adamw_records, "adamw", hyperparameters=hyper)


def test_unknown_hyperparameter_is_refused(adamw_records):
    hyper = [[dict(g, lookahead=5) for g in step] for step in adamw_records["hyperparameters"]]
    with pytest.raises(UnsupportedOptimizerError, match="lookahead"):
        _from(adamw_records, "adamw", hyperparameters=hyper)


def test_group_count_mismatch(adamw_records):
    one_group = [step[:1] for step in adamw_records["hyperparameters"]]
    with pytest.raises(TrajectoryMismatchError, match=r"step 0: hyper-parameters for 1 param groups, the parameters use 2"):
        _from(adamw_records, "adamw", hyperparameters=one_group)


def test_parameter_without_a_group(adamw_records):
    groups = dict(adamw_records["param_groups"])
    del groups["2.bias"]
    with pytest.raises(TrajectoryMismatchError, match=r"parameters without a param group: \['2.bias'\]"):
        _from(adamw_records, "adamw", param_groups=groups)


def test_unknown_updated_name(adamw_records):
    updated = [list(u) for u in adamw_records["updated"]]
    updated[1].append("3.weight")
    with pytest.raises(TrajectoryMismatchError, match=r"step 1: updated parameters \['3.weight'\]"):
        _from(adamw_records, "adamw", updated=updated)


def test_duplicate_id_in_a_batch(adamw_records):
    batches = [list(b) for b in adamw_records["batches"]]
    batches[0][1] = batches[0][0]
    with pytest.raises(TrajectoryMismatchError, match="step 0: a sample id appears twice"):
        _from(adamw_records, "adamw", batches=batches)


def test_weights_of_the_wrong_length(adamw_records):
    batches = [(list(b), [0.5, 0.5]) for b in adamw_records["batches"]]
    with pytest.raises(TrajectoryMismatchError, match="5 sample ids but 2 weights"):
        _from(adamw_records, "adamw", batches=batches)


def test_unknown_optimizer_name(adamw_records):
    with pytest.raises(UnsupportedOptimizerError, match=r"no optimizer rule named 'adafactor'; known rules: \[.*'adamw'.*'sgd'\]"):
        _from(adamw_records, "adafactor")
    with pytest.raises(UnsupportedOptimizerError, match=r"'lion'.*sign of a momentum"):
        _from(adamw_records, "lion")


def test_options_of_another_optimizer_are_refused(adamw_records):
    """AdamW hyper-parameters handed to the RMSprop rule name the unknown options."""
    with pytest.raises(UnsupportedOptimizerError, match=r"rmsprop: parameter-group option\(s\) \['amsgrad', 'betas'"):
        _from(adamw_records, "rmsprop")


def test_a_pair_of_scalar_ids_is_a_batch_not_ids_and_weights():
    """(3, 4) or (tensor(3), tensor(4)) is a batch of two ids; ([3, 4], [w3, w4]) gives weights."""
    snaps = [{"w": torch.tensor([1.0, 2.0], dtype=DT)}, {"w": torch.tensor([0.5, 1.0], dtype=DT)}]
    for batch in [(3, 4), (torch.tensor(3), torch.tensor(4)), [3, 4], torch.tensor([3, 4])]:
        traj = em.Trajectory.from_records(optimizer="sgd", parameters=snaps, batches=[batch], hyperparameters=[{"lr": 0.1}])
        assert traj.steps[0].sample_ids == [3, 4] and traj.steps[0].weights.tolist() == [0.5, 0.5]
    traj = em.Trajectory.from_records(
        optimizer="sgd", parameters=snaps, batches=[(torch.tensor([3, 4]), [0.25, 0.75])], hyperparameters=[{"lr": 0.1}]
    )
    assert traj.steps[0].sample_ids == [3, 4] and traj.steps[0].weights.tolist() == [0.25, 0.75]
