"""Steps kept by their gradient (explaind_math.rerun): a recording with ``rerun_optimizer=True`` presents the same
numbers, bit for bit, as one that keeps every step in full, in any order of reading; a step the rerun does not
reproduce is kept in full; an edit between steps is still refused at the step."""

import random

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import explaind_math as em
from explaind_math import rerun as rerun_module
from explaind_math.errors import RecordingError
from explaind_math.testing import strategies as es
from explaind_math.testing.comparisons import assert_same_trajectory, backward, forward
from explaind_math.testing.residuals import REPLAY_RTOL, SMOOTH_RTOL, check_certificate

VERIFIES = "recording"


def shuffled(n):
    order = list(range(n))
    random.Random(n).shuffle(order)
    return order


@pytest.mark.parametrize("rule", sorted(em.optimizers.RULES))
@es.property_settings()
@given(data=st.data())
def test_steps_kept_by_their_gradient_are_rebuilt_bit_for_bit(rule, data, device):
    """Every rule, with groups, schedulers and frozen parameters: the rerun trajectory equals the full one in every
    number, read forwards, backwards and shuffled; on the CPU every step is kept by its gradient (the rerun
    reproduced it; every RESTART_INTERVAL-th is kept in full); the decomposition of the rerun trajectory is exact."""
    spec = data.draw(es.training_runs(families=es.SMOOTH_FAMILIES, rules=(rule,)), label="spec")
    full = es.train_and_record(spec, device=device)
    kept = es.train_and_record(spec, device=device, rerun_optimizer=True)
    info = kept.trajectory.metadata["optimizer_rerun"]
    if device.type == "cpu":
        n = kept.trajectory.num_steps
        assert info["steps_kept_by_gradient"] == n - n // rerun_module.RESTART_INTERVAL, info
        assert isinstance(kept.trajectory, rerun_module.RerunTrajectory)
    for order in (forward, backward, shuffled):
        assert_same_trajectory(full.trajectory, kept.trajectory, order)
    result = es.decompose(kept, replay_rtol=REPLAY_RTOL)
    check_certificate(kept, result, SMOOTH_RTOL)


def small_run(rerun_optimizer: bool, steps: int = 20, edit=None, optimizer=None):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    opt = (optimizer or (lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1)))(model)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 3, 0.7)
    recorder = em.TrajectoryRecorder(model, opt, rerun_optimizer=rerun_optimizer)
    x = torch.randn(12, 3, dtype=torch.float64)
    y = torch.randn(12, 2, dtype=torch.float64)
    for t in range(steps):
        ids = [(5 * t + k) % 12 for k in range(4)]
        opt.zero_grad()
        ((model(x[ids]) - y[ids]) ** 2).sum(1).mean().backward()
        recorder.record_batch(ids)
        if edit is not None and t == 3:
            edit(model, opt)
        opt.step()
        scheduler.step()
    return recorder.trajectory()


def test_reading_in_any_order_reruns_each_segment_about_once(monkeypatch):
    """With a step kept in full every 4 steps, θ_t of a 20-step run is at most 3 reruns from a kept one; a backward
    pass reruns each segment once (the cache holds a segment)."""
    monkeypatch.setattr(rerun_module, "RESTART_INTERVAL", 4)
    full, kept = small_run(False), small_run(True)
    assert kept.metadata["optimizer_rerun"]["steps_kept_in_full"] == 5  # steps 3, 7, 11, 15, 19
    for order in (backward, shuffled, forward):
        assert_same_trajectory(full, kept, order)
    fresh = small_run(True)
    for t in backward(len(fresh.parameters)):
        fresh.parameters[t]
    assert fresh.reruns == 15  # the 15 steps kept by their gradient, each rerun once


def test_a_step_the_rerun_does_not_reproduce_is_kept_in_full(monkeypatch):
    """A rerun that comes out differently (here: one whose step is perturbed at some calls) leaves those steps kept
    in full, the rerun restarting from them; three misses in a row give it up, named in the metadata. The numbers
    are those of the full recording either way."""
    calls = {"n": 0}
    step = rerun_module.OptimizerRerun.step

    def sometimes_off(self, gradients, settings):
        step(self, gradients, settings)
        calls["n"] += 1
        if calls["n"] in (2, 5, 9, 10, 11):
            with torch.no_grad():
                self.theta[0].add_(1e-12)

    monkeypatch.setattr(rerun_module.OptimizerRerun, "step", sometimes_off)
    full, kept = small_run(False), small_run(True)
    info = kept.metadata["optimizer_rerun"]
    assert info["steps_kept_by_gradient"] == 6 and "3 steps in a row" in info["given_up"], info
    monkeypatch.setattr(rerun_module.OptimizerRerun, "step", step)  # the rebuilt trajectory's own rerun is exact
    assert_same_trajectory(full, kept, shuffled)


def test_an_optimizer_that_cannot_be_rebuilt_keeps_every_step(monkeypatch):
    def refuse(self, *args, **kwargs):
        raise TypeError("needs a closure factory")

    monkeypatch.setattr(rerun_module.OptimizerRerun, "__init__", refuse)
    kept = small_run(True, steps=5)
    assert type(kept) is em.Trajectory
    assert "cannot be built (TypeError: needs a closure factory)" in kept.metadata["optimizer_rerun"]["given_up"]
    assert_same_trajectory(small_run(False, steps=5), kept, forward)


def test_the_option_needs_the_gradients_and_memory(tmp_path):
    model = nn.Linear(2, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(RecordingError, match="record_gradients=True and no directory"):
        em.TrajectoryRecorder(model, opt, rerun_optimizer=True, record_gradients=False)
    with pytest.raises(RecordingError, match="record_gradients=True and no directory"):
        em.TrajectoryRecorder(model, opt, rerun_optimizer=True, directory=tmp_path / "run")


def edit_weight(model, opt):
    model[0].weight.data[0, 0] += 1e-3  # outside optimizer.step(), not seen by autograd's version counter


def edit_state(model, opt):
    opt.state[model[0].weight]["exp_avg"].mul_(2)


@pytest.mark.parametrize("edit, match", [(edit_weight, "parameter '0.weight' changed between optimizer steps 2 and 3"),
                                         (edit_state, "the optimizer state 'exp_avg' of parameter '0.weight'")])
def test_an_edit_between_steps_is_refused_at_the_step(edit, match):
    """The next step compares θ and the state with the rerun's (equal to the live ones after the step) exactly as
    it compares them with copies without the option."""
    with pytest.raises(RecordingError, match=match):
        small_run(True, edit=edit)


def test_a_saved_rerun_trajectory_reads_back_as_the_full_one(tmp_path):
    full, kept = small_run(False), small_run(True)
    assert_same_trajectory(full, em.Trajectory.load(kept.save(tmp_path / "run.safetensors")), forward)
    assert_same_trajectory(full, kept.save_directory(tmp_path / "dir", steps_per_shard=3), backward)


def test_auto_reruns_above_the_size_where_copies_cost_less():
    """rerun_optimizer="auto" (the default): a model above RERUN_ABOVE trained elements on the CPU keeps its steps
    by their gradients; a smaller one (one gathered copy per step) and a directory recording keep them in full."""
    def record(width, **options):
        torch.manual_seed(0)
        model = nn.Linear(width, width)
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        recorder = em.TrajectoryRecorder(model, opt, **options)
        for t in range(3):
            opt.zero_grad()
            model(torch.randn(2, width)).pow(2).sum().backward()
            recorder.record_batch([2 * t, 2 * t + 1])
            opt.step()
        return recorder.trajectory()

    assert 200 * 201 > rerun_module.RERUN_ABOVE > 20 * 21
    large = record(200)
    assert isinstance(large, rerun_module.RerunTrajectory)
    assert large.metadata["optimizer_rerun"]["steps_kept_by_gradient"] == 3
    assert "optimizer_rerun" not in record(20).metadata
    assert "optimizer_rerun" not in record(200, record_gradients=False).metadata
    with pytest.raises(RecordingError, match="rerun_optimizer must be True, False or 'auto'"):
        record(20, rerun_optimizer="yes")


def test_a_step_refused_after_it_ran_leaves_the_rerun_at_the_last_step_kept():
    """A step whose θ_{t+1} comes out Inf is refused after it ran (the earlier steps kept); the rerun has not moved,
    so the next step, from the θ and state the refused step left, is refused as a change between steps, with the
    message a recording without the option gives."""
    def record(rerun_optimizer):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        recorder = em.TrajectoryRecorder(model, opt, rerun_optimizer=rerun_optimizer)
        x = torch.randn(6, 3, dtype=torch.float64)

        def step(t):
            opt.zero_grad()
            model(x[[t % 6]]).pow(2).sum().backward()
            recorder.record_batch([t % 6])
            opt.step()

        for t in range(3):
            step(t)
        opt.param_groups[0]["lr"] = float("inf")
        with pytest.raises(em.errors.NonFiniteError, match="step 3: parameter .* became NaN or Inf"):
            step(3)
        opt.param_groups[0]["lr"] = 0.1
        with pytest.raises(RecordingError, match="step 3: .* changed") as refused:
            step(4)
        return recorder.trajectory(), str(refused.value)

    (full, message), (kept, rerun_message) = record(False), record(True)
    assert rerun_message == message
    assert kept.num_steps == 3 and kept.metadata["optimizer_rerun"]["steps_kept_by_gradient"] == 3
    assert_same_trajectory(full, kept, backward)


def test_the_rebuild_does_not_depend_on_the_readers_torch_settings():
    """Rebuilt θ equal the full recording's when read under another default dtype (NAdam makes its μ-product in the
    default dtype), inside inference mode and then outside it."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        nadam = lambda m: torch.optim.NAdam(m.parameters(), lr=1e-2)  # noqa: E731
        full, kept = small_run(False, optimizer=nadam), small_run(True, optimizer=nadam)
    finally:
        torch.set_default_dtype(before)
    torch.set_default_dtype(torch.float32)
    try:
        with torch.inference_mode():
            kept.parameters[5]
        assert_same_trajectory(full, kept, shuffled)
    finally:
        torch.set_default_dtype(before)


def test_tensor_settings_are_copied_per_step():
    """Betas given as tensors and changed in place between steps (a schedule of β2): each step reruns with its own."""
    def run(rerun_optimizer):
        torch.manual_seed(0)
        model = nn.Linear(3, 2).double()
        betas = (torch.tensor(0.9, dtype=torch.float64), torch.tensor(0.99, dtype=torch.float64))
        opt = torch.optim.Adam(model.parameters(), lr=1e-2, betas=betas)
        recorder = em.TrajectoryRecorder(model, opt, rerun_optimizer=rerun_optimizer)
        for t in range(4):
            opt.zero_grad()
            model(torch.ones(1, 3, dtype=torch.float64) * t).pow(2).sum().backward()
            recorder.record_batch([t])
            opt.step()
            betas[1].fill_(0.99 - 0.1 * (t + 1))
        return recorder.trajectory()

    kept = run(True)
    assert kept.metadata["optimizer_rerun"]["steps_kept_by_gradient"] == 4
    assert_same_trajectory(run(False), kept, backward)


@pytest.mark.parametrize("value", [1, "yes"])
def test_an_option_value_other_than_true_false_or_auto_is_refused(value):
    with pytest.raises(RecordingError, match="rerun_optimizer must be True, False or 'auto'"):
        em.TrajectoryRecorder(nn.Linear(2, 1), torch.optim.SGD(nn.Linear(2, 1).parameters(), lr=0.1),
                              rerun_optimizer=value)
