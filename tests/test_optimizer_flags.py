"""Every flag of torch.optim.AdamW, Adam and SGD is handled exactly or refused naming it (DESIGN.md).

"Handled exactly" means: a real training run of the user's unmodified optimizer, recorded by
TrajectoryRecorder, decomposes with relative residual ≤ 1e-9 and replay error ≤ 1e-10 (float64).
For flags that change the mathematics, the test also checks that the flag really changed the run (so
a library that ignored it could not pass) and that decomposing with the recorded value perturbed is
refused by the replay check.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import explaind_math as em
from explaind_math.errors import ReplayMismatchError, UnsupportedOptimizerError

DT = torch.float64
RESIDUAL_TOL = 1e-9
REPLAY_TOL = 1e-10
STEPS = 5


def _data(device, n=24, d=4, classes=3):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=g, dtype=DT)
    Y = torch.randint(0, classes, (n,), generator=g)
    return X.to(device), Y.to(device)


def _model(device, outputs=3):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, outputs)).to(device=device, dtype=DT)


def _loss(out, y):
    return F.cross_entropy(out, y)


def _train(model, opt, X, Y, *, steps=STEPS, scheduler=None, step_context=None, recorder=True):
    rec = em.TrajectoryRecorder(model, opt) if recorder else None
    n = X.shape[0]
    for t in range(steps):
        ids = torch.arange(5 * t, 5 * t + 5) % n
        opt.zero_grad()
        _loss(model(X[ids]), Y[ids]).backward()
        if rec is not None:
            rec.record_batch(ids)
        if step_context is not None:
            with step_context():
                opt.step()
        else:
            opt.step()
        if scheduler is not None:
            scheduler.step()
    return rec


def _decompose(model, traj, X, Y, **kw):
    fn = em.decompose_adamw_training if traj.optimizer == "adamw" else em.decompose_sgd_momentum_training
    return fn(model, traj, _loss, (X, Y), X[:3], keep=("step",), **kw)


def _assert_exact(result):
    assert result.relative_residual <= RESIDUAL_TOL, result.summary()
    assert result.max_replay_error <= REPLAY_TOL, result.summary()


def _final_params(model):
    return torch.cat([p.detach().reshape(-1).cpu() for p in model.parameters()])


def _baseline(cls, device):
    X, Y = _data(device)
    model = _model(device)
    base = {"lr": 0.05} if cls is not torch.optim.SGD else {"lr": 0.1}
    _train(model, cls(model.parameters(), **base), X, Y, recorder=False)
    return _final_params(model)


# (optimizer class, constructor kwargs, whether the flag changes the mathematics of the run)
ADAM_CASES = {
    "adamw-plain": (torch.optim.AdamW, dict(lr=0.05), False),
    "adamw-lr-tensor": (torch.optim.AdamW, dict(lr=torch.tensor(0.03, dtype=DT)), True),
    "adamw-lr-tensor-foreach-off": (torch.optim.AdamW, dict(lr=torch.tensor(0.03, dtype=DT), foreach=False), True),
    "adamw-betas": (torch.optim.AdamW, dict(lr=0.05, betas=(0.7, 0.9)), True),
    # foreach=False: torch refuses Tensor betas on its foreach path (the default on CUDA) unless capturable
    "adamw-betas-tensor": (torch.optim.AdamW, dict(lr=0.05, betas=(torch.tensor(0.7, dtype=DT), torch.tensor(0.9, dtype=DT)), foreach=False), True),
    "adamw-beta1-zero": (torch.optim.AdamW, dict(lr=0.05, betas=(0.0, 0.9)), True),
    "adamw-eps": (torch.optim.AdamW, dict(lr=0.05, eps=1e-1), True),
    "adamw-weight-decay": (torch.optim.AdamW, dict(lr=0.05, weight_decay=0.5), True),
    "adamw-no-weight-decay": (torch.optim.AdamW, dict(lr=0.05, weight_decay=0.0), True),
    "adamw-amsgrad": (torch.optim.AdamW, dict(lr=0.05, betas=(0.9, 0.5), amsgrad=True), True),
    "adamw-maximize": (torch.optim.AdamW, dict(lr=0.05, maximize=True), True),
    "adamw-foreach-on": (torch.optim.AdamW, dict(lr=0.05, foreach=True), False),
    "adamw-foreach-off": (torch.optim.AdamW, dict(lr=0.05, foreach=False), False),
    "adamw-fused": (torch.optim.AdamW, dict(lr=0.05, fused=True), False),
    "adamw-fused-amsgrad-maximize": (torch.optim.AdamW, dict(lr=0.05, fused=True, amsgrad=True, maximize=True), True),
    "adam-plain": (torch.optim.Adam, dict(lr=0.05), False),
    "adam-coupled-decay": (torch.optim.Adam, dict(lr=0.05, weight_decay=0.3), True),
    "adam-decoupled-decay": (torch.optim.Adam, dict(lr=0.05, weight_decay=0.3, decoupled_weight_decay=True), True),
    "adam-coupled-amsgrad-maximize": (torch.optim.Adam, dict(lr=0.05, weight_decay=0.3, amsgrad=True, maximize=True, betas=(0.8, 0.5)), True),
    "adam-fused-coupled": (torch.optim.Adam, dict(lr=0.05, weight_decay=0.3, fused=True), True),
    "adam-lr-tensor-betas-tensor": (torch.optim.Adam, dict(lr=torch.tensor(0.02, dtype=DT), betas=(torch.tensor(0.8, dtype=DT), torch.tensor(0.95, dtype=DT)), foreach=False), True),
}

SGD_CASES = {
    "sgd-plain": (torch.optim.SGD, dict(lr=0.1), False),
    "sgd-lr-tensor": (torch.optim.SGD, dict(lr=torch.tensor(0.07, dtype=DT)), True),
    "sgd-momentum": (torch.optim.SGD, dict(lr=0.1, momentum=0.9), True),
    "sgd-dampening": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, dampening=0.4), True),
    "sgd-weight-decay": (torch.optim.SGD, dict(lr=0.1, momentum=0.5, weight_decay=0.2), True),
    "sgd-weight-decay-tensor": (torch.optim.SGD, dict(lr=0.1, momentum=0.5, weight_decay=torch.tensor(0.2, dtype=DT)), True),
    "sgd-weight-decay-no-momentum": (torch.optim.SGD, dict(lr=0.1, weight_decay=0.2), True),
    "sgd-nesterov": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1), True),
    "sgd-maximize": (torch.optim.SGD, dict(lr=0.1, momentum=0.7, dampening=0.2, weight_decay=0.1, maximize=True), True),
    "sgd-foreach-on": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, foreach=True), True),
    "sgd-foreach-off": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, foreach=False), True),
    "sgd-fused": (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, fused=True), True),
}

CASES = {**ADAM_CASES, **SGD_CASES}


@pytest.mark.parametrize("case", sorted(CASES))
def test_flag_is_decomposed_exactly(case, device):
    cls, kwargs, changes_maths = CASES[case]
    if kwargs.get("fused") and device.type == "cpu" and not _fused_runs_on_cpu(cls):
        pytest.skip(f"{cls.__name__}(fused=True) does not run on CPU float64 in torch {torch.__version__}")
    X, Y = _data(device)
    model = _model(device)
    opt = cls(model.parameters(), **kwargs)
    rec = _train(model, opt, X, Y)
    traj = rec.trajectory()
    assert traj.optimizer == ("sgd" if cls is torch.optim.SGD else "adamw")
    assert traj.num_steps == STEPS
    _assert_exact(_decompose(model, traj, X, Y))
    if changes_maths:  # the flag is not a no-op here, so ignoring it would break the replay check
        assert not torch.allclose(_final_params(model), _baseline(cls, device), rtol=0, atol=1e-6)


def _fused_runs_on_cpu(cls) -> bool:
    p = nn.Parameter(torch.zeros(2, dtype=DT))
    p.grad = torch.ones(2, dtype=DT)
    try:
        cls([p], lr=0.1, fused=True).step()
    except (RuntimeError, AssertionError, NotImplementedError):
        return False
    return True


def test_amsgrad_run_really_uses_the_running_maximum(device):
    """The amsgrad case above is only a test of amsgrad if max v_t differs from v_t somewhere."""
    X, Y = _data(device)
    model = _model(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.9, 0.5), amsgrad=True)
    differs = False
    rec = em.TrajectoryRecorder(model, opt)
    for t in range(STEPS):
        ids = torch.arange(5 * t, 5 * t + 5) % X.shape[0]
        opt.zero_grad()
        _loss(model(X[ids]), Y[ids]).backward()
        rec.record_batch(ids)
        opt.step()
        st = opt.state[model[0].weight]
        differs |= not torch.equal(st["exp_avg_sq"], st["max_exp_avg_sq"])
    assert differs
    traj = rec.trajectory()
    assert set(traj.steps[-1].state["0.weight"]) >= {"step", "max_exp_avg_sq"}
    _assert_exact(_decompose(model, traj, X, Y))


@pytest.fixture
def float64_default():
    """Adam's ``state['step']`` takes torch's default dtype; float64 lets capturable/differentiable be exact."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def test_differentiable_flag(device, float64_default):
    """differentiable=True only keeps autograd on inside step(). torch cannot step leaf nn.Parameters that
    way outside inference mode; inside torch.inference_mode() it runs, and the run is exact."""
    for cls, kwargs in [
        (torch.optim.AdamW, dict(lr=0.05, amsgrad=True)),
        (torch.optim.Adam, dict(lr=0.05, weight_decay=0.2, maximize=True)),
        (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1)),
    ]:
        X, Y = _data(device)
        model = _model(device)
        opt = cls(model.parameters(), differentiable=True, **kwargs)
        rec = _train(model, opt, X, Y, step_context=torch.inference_mode)
        _assert_exact(_decompose(model, rec.trajectory(), X, Y))


def test_capturable_flag(device, float64_default):
    if device.type == "cpu":
        pytest.skip(f"torch {torch.__version__} runs capturable=True only with parameters on an accelerator")
    for cls in (torch.optim.AdamW, torch.optim.Adam):
        X, Y = _data(device)
        model = _model(device)
        opt = cls(model.parameters(), lr=0.05, weight_decay=0.1, capturable=True, amsgrad=True)
        rec = _train(model, opt, X, Y)
        _assert_exact(_decompose(model, rec.trajectory(), X, Y))


@pytest.mark.parametrize("flag", ["differentiable", "capturable"])
def test_float32_step_count_with_float64_parameters_is_refused(flag, device):
    """Under capturable/differentiable torch computes Adam's bias corrections in the dtype of
    state['step'] (float32 by default): float64 parameters then move by float32-rounded amounts."""
    assert torch.get_default_dtype() == torch.float32
    model = _model(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, **{flag: True})
    with pytest.raises(UnsupportedOptimizerError, match=rf"{flag}=True.*torch.set_default_dtype"):
        em.TrajectoryRecorder(model, opt)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, differentiable=True)  # SGD has no step count
    em.TrajectoryRecorder(model, sgd).close()


@pytest.mark.parametrize("flag", ["lr", "betas"])
def test_float32_tensor_lr_or_betas_with_float64_parameters(flag, device):
    """A float32 tensor lr or β makes torch round Adam's step size to float32: refused, naming it;
    the fused kernel computes in the parameters' dtype, so there the same tensor is exact."""
    value = torch.tensor(0.03) if flag == "lr" else (torch.tensor(0.8), torch.tensor(0.9))
    kwargs = {"lr": 0.05, flag: value}
    model = _model(device)
    with pytest.raises(UnsupportedOptimizerError, match=rf"{flag}(\[0\])?=tensor.*float32"):
        em.TrajectoryRecorder(model, torch.optim.AdamW(model.parameters(), **kwargs))
    if not _fused_runs_on_cpu(torch.optim.AdamW) and device.type == "cpu":
        pytest.skip("fused AdamW does not run on CPU here")
    X, Y = _data(device)
    opt = torch.optim.AdamW(model.parameters(), fused=True, **kwargs)
    rec = _train(model, opt, X, Y)
    _assert_exact(_decompose(model, rec.trajectory(), X, Y))


def test_adamw_group_with_coupled_decay(device):
    """AdamW reads decoupled_weight_decay per group; a group that turns it off decays through the moments."""
    X, Y = _data(device)
    model = _model(device)
    opt = torch.optim.AdamW(
        [{"params": model[0].parameters(), "decoupled_weight_decay": False, "weight_decay": 0.4},
         {"params": model[2].parameters(), "weight_decay": 0.4, "lr": 0.02}],
        lr=0.05,
    )
    rec = _train(model, opt, X, Y)
    traj = rec.trajectory()
    assert [h["decoupled_weight_decay"] for h in traj.steps[0].hyperparameters] == [False, True]
    _assert_exact(_decompose(model, traj, X, Y))


# ---------------------------------------------------------------------------------------------
# the library reads every value it records: perturb one and the replay check refuses


PERTURB = {
    "adamw": ("lr", "beta1", "beta2", "eps", "weight_decay", "maximize", "decoupled_weight_decay"),
    "sgd": ("lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize"),
}


def _perturbed(value):
    if isinstance(value, bool):
        return not value
    return value * 0.5 if value else 0.1


@pytest.mark.parametrize(
    "optimizer,key", [(o, k) for o, keys in PERTURB.items() for k in keys]
)
def test_every_recorded_value_is_used(optimizer, key, device):
    X, Y = _data(device)
    model = _model(device)
    if optimizer == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.8, 0.9), eps=1e-3, weight_decay=0.3)
    else:  # Nesterov needs dampening 0, so the nesterov case runs undamped
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1,
                              dampening=0.0 if key == "nesterov" else 0.3)
    rec = _train(model, opt, X, Y)
    traj = rec.trajectory()
    _assert_exact(_decompose(model, traj, X, Y))
    t = 2
    for hyper in traj.steps[t].hyperparameters:
        hyper[key] = _perturbed(hyper[key])
    with pytest.raises(ReplayMismatchError, match=rf"step {t}, parameter '"):
        _decompose(model, traj, X, Y)


# ---------------------------------------------------------------------------------------------
# refusals


def test_unknown_group_key_is_refused_at_construction(device):
    model = _model(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    opt.param_groups[0]["gradient_centralization"] = True
    with pytest.raises(UnsupportedOptimizerError, match="gradient_centralization"):
        em.TrajectoryRecorder(model, opt)


def test_unknown_group_key_is_refused_at_the_step_and_the_step_does_not_happen(device):
    X, Y = _data(device)
    model = _model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    rec = _train(model, opt, X, Y, steps=2)
    opt.param_groups[0]["lookahead_k"] = 5
    before = _final_params(model)
    opt.zero_grad()
    _loss(model(X[:5]), Y[:5]).backward()
    rec.record_batch(range(5))
    with pytest.raises(UnsupportedOptimizerError, match="lookahead_k"):
        opt.step()
    assert torch.equal(_final_params(model), before)
    assert rec.trajectory().num_steps == 2


@pytest.mark.parametrize("cls", [torch.optim.AdamW, torch.optim.Adam, torch.optim.SGD])
def test_scheduler_bookkeeping_keys_are_accepted(cls, device):
    X, Y = _data(device)
    model = _model(device)
    opt = cls(model.parameters(), lr=0.05, **({"momentum": 0.9} if cls is torch.optim.SGD else {}))
    for g in opt.param_groups:
        g.update(initial_lr=0.05, max_lr=0.1, min_lr=1e-4, base_lr=0.01, base_momentum=0.85, max_momentum=0.95)
    rec = _train(model, opt, X, Y)
    _assert_exact(_decompose(model, rec.trajectory(), X, Y))


@pytest.mark.parametrize(
    "cls,make",
    [
        # OneCycleLR cycles β1 of Adam and the momentum of SGD: both vary step by step
        # (stopped mid-cycle: at OneCycle's final lr of max_lr/25e4, |Δθ| is so small that θ_{t+1} − θ_t
        # itself carries a relative rounding error above the 1e-10 asked of the replay)
        (torch.optim.AdamW, lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.1, total_steps=2 * STEPS)),
        (torch.optim.SGD, lambda o: torch.optim.lr_scheduler.OneCycleLR(o, max_lr=0.2, total_steps=2 * STEPS)),
        (torch.optim.SGD, lambda o: torch.optim.lr_scheduler.CyclicLR(o, 0.01, 0.2, step_size_up=2)),
        (torch.optim.Adam, lambda o: torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(o, 2)),
        (torch.optim.AdamW, lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.3)),
    ],
)
def test_real_schedulers_are_exact(cls, make, device):
    X, Y = _data(device)
    model = _model(device)
    opt = cls(model.parameters(), lr=0.05, **({"momentum": 0.9} if cls is torch.optim.SGD else {}))
    sched = make(opt)
    rec = _train(model, opt, X, Y, scheduler=sched)
    traj = rec.trajectory()
    lrs = {h["lr"] for s in traj.steps for h in s.hyperparameters}
    assert len(lrs) > 1  # the schedule really varied the learning rate
    _assert_exact(_decompose(model, traj, X, Y))


def test_named_parameters_optimizer_is_accepted(device):
    """torch 2.13 accepts named parameters; the group then carries a 'param_names' list."""
    X, Y = _data(device)
    model = _model(device)
    opt = torch.optim.AdamW(model.named_parameters(), lr=0.05)
    assert "param_names" in opt.param_groups[0]
    rec = _train(model, opt, X, Y)
    _assert_exact(_decompose(model, rec.trajectory(), X, Y))


@pytest.mark.parametrize(
    "cls", [torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.ASGD]
)
def test_other_optimizers_are_refused(cls, device):
    from explaind_math.optimizers import RULES

    supported = sorted(c.__name__ for rule in RULES.values() for c in rule.optimizer_classes)
    if cls.__name__ in supported:  # a rule for it has been enrolled since: then it is not refused
        pytest.skip(f"{cls.__name__} has an enrolled rule")
    model = _model(device)
    opt = cls(model.parameters(), lr=0.01)
    with pytest.raises(UnsupportedOptimizerError) as info:
        em.TrajectoryRecorder(model, opt)
    message = str(info.value)
    assert f"{cls.__name__} is not supported" in message
    assert {"AdamW", "Adam", "SGD"} <= set(supported)
    for name in supported:
        assert f"'{name}'" in message


def test_subclass_of_adamw_is_refused(device):
    class ScaledAdamW(torch.optim.AdamW):
        """A subclass may change the mathematics, so it is matched by exact type."""

    model = _model(device)
    with pytest.raises(UnsupportedOptimizerError, match="ScaledAdamW"):
        em.TrajectoryRecorder(model, ScaledAdamW(model.parameters(), lr=0.01))


def test_rprop_is_refused_with_the_reason(device):
    model = _model(device)
    with pytest.raises(UnsupportedOptimizerError, match=r"Rprop.*sign of the gradient.*not linear"):
        em.TrajectoryRecorder(model, torch.optim.Rprop(model.parameters(), lr=0.01))


def test_sign_based_optimizer_is_refused_with_the_reason(device):
    class Lion(torch.optim.Optimizer):
        def __init__(self, params, lr=1e-4):
            super().__init__(params, {"lr": lr})

        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    if p.grad is not None:
                        p.data.add_(p.grad.sign(), alpha=-g["lr"])

    model = _model(device)
    with pytest.raises(UnsupportedOptimizerError, match=r"Lion.*not linear in the gradients"):
        em.TrajectoryRecorder(model, Lion(model.parameters()))


def test_invalid_nesterov_set_after_construction_is_refused(device):
    """torch checks nesterov only in the constructor; the recorder re-checks every group it reads."""
    model = _model(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True)
    opt.param_groups[0]["dampening"] = 0.5
    with pytest.raises(UnsupportedOptimizerError, match="nesterov"):
        em.TrajectoryRecorder(model, opt)
    # momentum 0 (a warm-up): torch runs plain SGD, Nesterov or not, so it is exact and accepted (issue 17)
    opt.param_groups[0].update(dampening=0.5, momentum=0.0)
    em.TrajectoryRecorder(model, opt).close()


def test_beta1_of_one_is_refused_naming_betas(device):
    model = _model(device)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    opt.param_groups[0]["betas"] = (1.0, 0.999)
    with pytest.raises(UnsupportedOptimizerError, match=r"betas"):
        em.TrajectoryRecorder(model, opt)


def test_complex_parameters_are_refused(device):
    model = nn.Linear(2, 2).to(device=device, dtype=torch.complex128)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05)
    with pytest.raises(em.RecordingError, match="complex"):
        em.TrajectoryRecorder(model, opt)


def test_every_constructor_flag_is_covered():
    """If a future torch adds a constructor flag, this test fails until it is handled or refused above."""
    import inspect

    covered = {
        torch.optim.AdamW: {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                            "differentiable", "fused"},
        torch.optim.Adam: {"lr", "betas", "eps", "weight_decay", "amsgrad", "maximize", "foreach", "capturable",
                           "differentiable", "fused", "decoupled_weight_decay"},
        torch.optim.SGD: {"lr", "momentum", "dampening", "weight_decay", "nesterov", "maximize", "foreach",
                          "differentiable", "fused"},
    }
    for cls, flags in covered.items():
        params = set(inspect.signature(cls.__init__).parameters) - {"self", "params"}
        assert params <= flags, (cls.__name__, sorted(params - flags))
        p = nn.Parameter(torch.zeros(1, dtype=DT))
        group_keys = set(cls([p], lr=0.1).param_groups[0]) - {"params"}
        assert group_keys <= flags | {"decoupled_weight_decay"}, (cls.__name__, sorted(group_keys - flags))
