"""FlatCopy, the recorder's copies of a step's tensors: exact bit for bit, in both layouts (one gathered buffer for
small totals, a copy per tensor for large ones), with every change found and named by position."""

import pytest
import torch

from explaind_math import recording_copies
from explaind_math.recording_copies import GATHERED_COMPARISON_LIMIT, FlatCopy, LiveViews, step_counts

SMALL = [(3, 4), (4,), (), (2, 1, 3)]
LARGE = [(GATHERED_COMPARISON_LIMIT // 2 + 1,), (5, 7), (GATHERED_COMPARISON_LIMIT // 2,)]


def _tensors(shapes, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    out[0].view(-1)[0] = -0.0
    out[0].view(-1)[1] = torch.finfo(dtype).tiny / 4  # a subnormal: copied, not flushed
    return out


@pytest.mark.parametrize("shapes", [SMALL, LARGE], ids=["gathered", "per-tensor"])
def test_copies_are_the_tensors_bit_for_bit_and_independent_of_them(shapes):
    tensors = _tensors(shapes)
    copy = FlatCopy(tensors)
    views = copy.views()
    assert [v.shape for v in views] == [t.shape for t in tensors]
    for v, t in zip(views, tensors):
        assert torch.equal(v.view(torch.int32), t.view(torch.int32))  # the bits, -0.0 and subnormals included
    tensors[1].add_(1.0)
    assert not torch.equal(views[1], tensors[1])  # a copy, not a view of the source
    assert copy.first_difference(tensors) == 1


@pytest.mark.parametrize("shapes", [SMALL, LARGE], ids=["gathered", "per-tensor"])
@pytest.mark.parametrize("change", ["one-ulp", "dtype", "reshaped", "not-a-tensor"])
def test_first_difference_finds_the_changed_tensor(shapes, change):
    tensors = _tensors(shapes)
    copy = FlatCopy(tensors)
    assert copy.first_difference([t.clone() for t in tensors]) is None
    now = [t.clone() for t in tensors]
    k = 2 if len(shapes) > 2 else 1
    if change == "one-ulp":
        flat = now[k].view(-1)
        flat[-1] = torch.nextafter(flat[-1], torch.tensor(float("inf")))
    elif change == "dtype":
        now[k] = now[k].double()  # equal values: torch.equal alone would not see it
    elif change == "reshaped":
        now[0] = now[0].reshape(1, -1)  # the same values, in another shape
        k = 0
    else:
        now[k] = 1.0
    assert copy.first_difference(now) == k


@pytest.mark.parametrize("shapes", [SMALL, LARGE], ids=["gathered", "per-tensor"])
def test_first_non_finite_names_the_tensor_and_overflow_alone_is_not_refused(shapes):
    tensors = _tensors(shapes)
    assert FlatCopy(tensors).first_non_finite() is None
    huge = [torch.full(s, 3e38) for s in shapes]  # finite, but their sum overflows to inf
    assert FlatCopy(huge).first_non_finite() is None
    for bad in (float("nan"), float("-inf")):
        broken = [t.clone() for t in tensors]
        broken[-1].view(-1)[-1] = bad
        assert FlatCopy(broken).first_non_finite() == len(shapes) - 1


def test_several_dtypes_are_copied_in_groups_and_compared_exactly():
    tensors = [torch.randn(3), torch.randn(2, 2, dtype=torch.float64), torch.arange(4), torch.randn(5)]
    copy = FlatCopy(tensors)
    assert [v.dtype for v in copy.views()] == [t.dtype for t in tensors]
    assert all(torch.equal(v, t) for v, t in zip(copy.views(), tensors))
    assert copy.first_difference(tensors) is None
    now = [t.clone() for t in tensors]
    now[3][0] += 1
    assert copy.first_difference(now) == 3


@pytest.mark.parametrize("shapes", [SMALL, LARGE], ids=["gathered", "per-tensor"])
def test_refill_writes_the_same_buffers_again(shapes):
    copy = FlatCopy(_tensors(shapes, seed=1))
    buffers = [v.data_ptr() for v in copy.views()]
    later = _tensors(shapes, seed=2)
    again = copy.refill(later)
    assert again is copy and [v.data_ptr() for v in again.views()] == buffers
    assert again.first_difference(later) is None
    other = copy.refill(_tensors(SMALL + [(1,)]))  # another layout: a new copy
    assert other is not copy


def test_one_tensor_is_copied_not_viewed():
    t = torch.randn(4, 3)
    copy = FlatCopy([t])
    t.zero_()
    assert copy.first_difference([t]) == 0


def test_a_copy_like_an_earlier_one_shares_its_layout_and_not_its_values():
    tensors = _tensors(SMALL)
    first = FlatCopy(tensors)
    tensors[0].add_(1.0)
    second = FlatCopy(tensors, like=first)
    assert second.shapes is first.shapes and second.dtypes is first.dtypes and second._groups is first._groups
    assert first.first_difference(tensors) == 0 and second.first_difference(tensors) is None
    other = FlatCopy([t.double() for t in tensors], like=first)  # another layout: its own
    assert other.dtypes is not first.dtypes and other.dtypes == (torch.float64,) * len(SMALL)
    assert other.first_difference([t.double() for t in tensors]) is None


def test_a_memory_mode_recorder_keeps_few_python_objects_per_step():
    """Every step's copies stay in memory; what they keep as Python objects the garbage collector traverses at every
    full collection, so a step keeps a handful of objects, not a few per tensor (116 per step before the layout
    was shared, for this 28-tensor model: its shapes alone were 84)."""
    import gc
    from collections import Counter

    import explaind_math as em

    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(14)])  # 28 parameter tensors
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    recorder = em.TrajectoryRecorder(model, opt)
    x = torch.randn(8, 4)

    def steps(n):
        for _ in range(n):
            opt.zero_grad()
            recorder.record_batch(list(range(8)))
            model(x).pow(2).mean().backward()
            opt.step()

    steps(3)
    gc.collect()
    before = Counter(type(o).__name__ for o in gc.get_objects())
    steps(20)
    gc.collect()
    grown = Counter(type(o).__name__ for o in gc.get_objects()) - before
    assert sum(grown.values()) / 20 < 25, grown.most_common(8)
    assert grown["Size"] == 0, grown.most_common(8)
    assert recorder.trajectory().num_steps == 23


def _ulp_up(t: torch.Tensor) -> None:
    flat = t.data.view(-1)
    flat[-1] = torch.nextafter(flat[-1], torch.tensor(float("inf"), dtype=t.dtype))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_live_views_copy_and_compare_exactly_and_follow_the_tensors(dtype):
    """Copies made with ``live_views`` gather and compare through numpy views of the live tensors; the views are
    remade whenever a tensor's storage or layout changed (``p.data = …``), so they never read stale memory."""
    tensors = [t.requires_grad_() for t in _tensors(SMALL + [(3, 3)], dtype=dtype)]
    copy = FlatCopy(tensors, live_views=True)
    assert (copy._live.arrays is not None) == (dtype != torch.bfloat16)  # numpy has no bfloat16: torch's path
    for v, t in zip(copy.views(), tensors):
        assert v.dtype == t.dtype and torch.equal(v, t.detach())
    assert copy.first_difference(tensors) is None
    _ulp_up(tensors[3])
    assert copy.first_difference(tensors) == 3
    tensors[3].data = copy.views()[3].clone()  # new storage, the copied values: no change
    assert copy.first_difference(tensors) is None
    _ulp_up(tensors[3])  # an edit of the new storage is seen
    assert copy.first_difference(tensors) == 3
    after = FlatCopy(tensors, like=copy, live_views=True)  # a copy of the new storage
    assert after._live is copy._live and torch.equal(after.views()[3], tensors[3].detach())
    square = tensors[4]
    storage = square.data
    square.data = storage.as_strided((3, 3), (1, 3))  # transposed: the same memory and address, another layout
    assert after.first_difference(tensors) == 4
    square.data = storage
    assert after.first_difference(tensors) is None
    tensors[0].data = tensors[0].data.to(torch.float32 if dtype == torch.float64 else torch.float64)  # same values
    assert after.first_difference(tensors) == 0


def test_live_views_refill_reads_the_tensors_storage_now():
    tensors = _tensors(SMALL)
    own = FlatCopy(tensors, live_views=True)
    tensors[1].data = tensors[1].data + 1.0  # a new storage
    assert own.refill(tensors) is own and own.first_difference(tensors) is None
    assert torch.equal(own.views()[1], tensors[1])
    views = LiveViews()
    assert views.of([torch.zeros(3), torch.zeros(3, dtype=torch.float64)]) is None  # two dtypes: none
    assert views.of([torch.zeros(4)[::2]]) is None  # strided: none
    assert views.of([1.0]) is None


def test_a_recording_follows_parameters_given_new_storage_between_steps():
    """``p.data = p.data.clone()`` between steps changes no value: recording goes on, and θ_{t+1} is read from the
    new storage, which the optimizer updates."""
    import explaind_math as em

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    recorder = em.TrajectoryRecorder(model, opt)
    x = torch.randn(6, 3)
    live = []
    for step in range(4):
        if step == 2:
            for p in model.parameters():
                p.data = p.data.clone()
        opt.zero_grad()
        recorder.record_batch(list(range(6)))
        model(x).pow(2).mean().backward()
        opt.step()
        live.append({n: p.detach().clone() for n, p in model.named_parameters()})
    trajectory = recorder.trajectory()
    for t, theta in enumerate(live, start=1):
        assert all(torch.equal(trajectory.parameters[t][n], v) for n, v in theta.items()), t


def test_a_recording_leaves_the_storages_resizable_and_refuses_a_lazily_negated_parameter():
    """The views read the tensors' memory by address: the parameters' and the state's storages stay resizable (as
    code that frees parameter memory, ``untyped_storage().resize_(0)``, needs; ``Tensor.numpy()`` would have made
    them unresizable for good), and a parameter swapped for a lazy negation of its own memory (same address and
    layout, other values) is seen as changed."""
    import explaind_math as em
    from explaind_math.errors import RecordingError

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    recorder = em.TrajectoryRecorder(model, opt)
    x = torch.randn(6, 3)

    def step():
        opt.zero_grad()
        recorder.record_batch(list(range(6)))
        model(x).pow(2).mean().backward()
        opt.step()

    step()
    step()
    for p in model.parameters():
        for t in [p, *opt.state[p].values()]:
            t.untyped_storage().resize_(t.untyped_storage().nbytes())  # raises for a storage marked unresizable
    weight = model[0].weight
    weight.data = weight.data._neg_view()
    with pytest.raises(RecordingError, match=r"parameter '0.weight' changed between optimizer steps 1 and 2"):
        step()


def test_step_counts_read_tensors_and_numbers():
    assert step_counts([torch.tensor(3.0), torch.tensor(4.0)]) == [3, 4]
    assert step_counts([3, torch.tensor(5.0)]) == [3, 5]
    assert step_counts([]) == []


def test_the_module_names_its_public_parts():
    assert set(recording_copies.__all__) == {"FlatCopy", "LiveViews", "cpu_copy", "cpu_scalars", "on_cpu", "stacked_scalars",
                                             "step_counts"}
