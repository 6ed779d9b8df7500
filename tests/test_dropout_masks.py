"""The recorded-dropout masks are the documented counter-based hash, entry by entry (explaind_math.integrations.forward):

    keep = hash32(hash32((key + (k + 1)·GOLDEN) mod 2³²) XOR (Σ_d c_d · coordinate_d mod 2³²)) < (1 − p)·2³²

evaluated here in plain Python integers. A trajectory stores only the seed and the ids, so the formula is the file
format: a change to it (even a faster one) would replay different masks for every file already written.
"""

from __future__ import annotations

import itertools

import torch

from explaind_math.integrations import forward

M32 = 0xFFFFFFFF


def _hash32(x: int) -> int:
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & M32
    return (x >> 16) ^ x


def _reference_keep(key: int, call: int, coordinates: tuple[int, ...], p: float) -> bool:
    coord = (0x27D4EB2D, 0x165667B1, 0x61C88647, 0x2545F491, 0x3C6EF372, 0x1B873593, 0x7FEB352D)
    base = _hash32((key + (call + 1) * 0x9E3779B1) & M32)
    lin = sum(c * coord[d % len(coord)] for d, c in enumerate(coordinates)) & M32
    return _hash32(base ^ lin) < min(int(round((1.0 - p) * 2 ** 32)), 2 ** 32)


def test_masks_follow_the_documented_formula_entry_by_entry():
    keys = torch.tensor([forward.row_key(7, 3, 1, r) for r in range(3)])
    for shape, call, p in [((5,), 0, 0.1), ((2, 3, 4), 4, 0.5), ((3, 7), 11, 0.9)]:
        mask = forward._mask(keys, call, shape, p, torch.float64, "cpu")
        assert mask.shape == (3, *shape)
        for r in range(3):
            for c in itertools.product(*(range(s) for s in shape)):
                expected = 1.0 / (1.0 - p) if _reference_keep(int(keys[r]), call, c, p) else 0.0
                assert float(mask[(r, *c)]) == expected, (shape, call, r, c)


def test_an_entry_does_not_depend_on_the_padded_length():
    keys = torch.tensor([forward.row_key(0, 0, 0, 0)])
    short = forward._mask(keys, 2, (4, 6), 0.3, torch.float32, "cpu")
    long = forward._mask(keys, 2, (9, 6), 0.3, torch.float32, "cpu")
    assert torch.equal(long[:, :4], short)


def test_a_left_padded_rank_is_refused_on_every_rank_at_the_gather():
    """Under DDP the refusal of left padding with recorded dropout is made after the step's gather, from every
    rank's flags, so all ranks refuse the step alike (no rank is left waiting in a collective)."""
    import pytest

    from explaind_math.errors import RecordingError
    from explaind_math.integrations.watch import ForwardWatch

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.5))
    watch = ForwardWatch(model, dropout=True, seed=0)
    for flags in ([False, True], [True, False]):
        with pytest.raises(RecordingError, match=rf"rank {flags.index(True)}\).*padded on the left"):
            watch.merge_ranks([([4], [[0, 1, 2, 3]], flags[0]), ([4], [[4, 5, 6, 7]], flags[1])])
    watch.merge_ranks([([4], [[0, 1, 2, 3]], False), ([4], [[4, 5, 6, 7]], False)])
    watch.close()


def test_the_recorders_int32_masks_are_the_int64_formulas_bits():
    """RecordMode draws its masks with the in-place int32 form (_mask_int32); replay uses _mask. Both must give the
    same bits for every key, call, p, shape (odd sizes: the scalar tails of vectorised kernels) and dtype."""
    import random

    rng = random.Random(0)
    assert forward._fast_masks_agree("cpu")
    for _ in range(200):
        keys = [rng.getrandbits(32) for _ in range(rng.randint(1, 9))] + [0, M32]
        shape = tuple(rng.randint(1, 17) for _ in range(rng.randint(1, 4)))
        p = rng.choice([1e-12, 1e-4, 0.1, 0.3333, 0.5, 0.9])
        dtype = rng.choice([torch.float16, torch.bfloat16, torch.float32, torch.float64])
        call = rng.randint(0, 40)
        expected = forward._mask(torch.tensor(keys), call, shape, p, dtype, "cpu")
        halves = torch.tensor(forward._row_halves(keys, call), dtype=torch.int32).reshape(-1, *([1] * len(shape)))
        got = forward._mask_int32(halves, forward._coordinate_halves(shape, "cpu"), p, dtype)
        assert got.dtype == dtype and got.shape == expected.shape
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[expected.element_size()]
        assert torch.equal(got.reshape(-1).view(bits), expected.reshape(-1).view(bits)), (shape, call, p, dtype)


def test_masks_formed_together_for_calls_alike_are_those_formed_alone():
    """RecordMode forms in one computation the masks of the calls that the last forward made alike (same rows, row
    shape, p, dtype); each must be the replay formula's mask for its own call, also when a call differs from the
    prediction (another shape, another p) or the forward makes more or fewer calls than the last one."""
    keys = torch.tensor([forward.row_key(7, 3, 0, r) for r in range(5)])
    cache = forward.CoordinateCache()
    forwards = [
        [((6, 4), 0.1), ((2, 6, 6), 0.1), ((6, 4), 0.1), ((6, 4), 0.1), ((6, 4), 0.0)],
        [((9, 4), 0.1), ((2, 9, 9), 0.1), ((9, 4), 0.1), ((9, 4), 0.1), ((9, 4), 0.1)],  # longer rows
        [((9, 4), 0.1), ((2, 9, 9), 0.1), ((9, 4), 0.3), ((8, 4), 0.1), ((9, 4), 0.1), ((9, 4), 0.1)],  # mispredicted
        [((9, 4), 0.1)],
    ]
    g = torch.Generator().manual_seed(0)
    for calls in forwards:
        mode = forward.RecordMode(lambda size: keys[:size], cache)
        for k, (shape, p) in enumerate(calls):
            x = torch.randn(5, *shape, generator=g)
            got = mode.dropout(x, p, True)
            expected = x if p == 0 else x * forward._mask(keys, k, shape, p, x.dtype, "cpu")
            assert torch.equal(got.view(torch.int32), expected.view(torch.int32)), (calls, k)
        assert mode.calls == [p for _, p in calls]


def test_the_masks_of_a_forward_alike_the_last_are_formed_in_one_pass(monkeypatch):
    """After one forward, the next one with longer padded rows forms every mask at its first call: the later calls'
    shapes are predicted from the last forward's ((6, 4) -> (9, 4) makes (2, 6, 6) -> (2, 9, 9)), all hashed and
    thresholded in one pass; each call then uses the mask formed for its shape."""
    passes = []
    original = forward._mixed_and_thresholded
    monkeypatch.setattr(forward, "_mixed_and_thresholded",
                        lambda h, p, dtype: passes.append(h.numel()) or original(h, p, dtype))
    keys = torch.tensor([forward.row_key(7, 3, 0, r) for r in range(5)])
    cache = forward.CoordinateCache()
    g = torch.Generator().manual_seed(1)
    for length in (6, 9):
        passes.clear()
        mode = forward.RecordMode(lambda size: keys[:size], cache)
        shapes = [(length, 4), (2, length, length), (length, 4), (2, length, length)]
        for k, shape in enumerate(shapes):
            x = torch.randn(5, *shape, generator=g)
            expected = x * forward._mask(keys, k, shape, 0.1, x.dtype, "cpu")
            assert torch.equal(mode.dropout(x, 0.1, True).view(torch.int32), expected.view(torch.int32))
        # the first forward learns the calls (a pass per call), the second forms all four in one pass
        assert passes == ([5 * length * 4, 5 * 2 * length * length] * 2 if length == 6
                          else [5 * (2 * length * 4 + 2 * 2 * length * length)])


def test_a_predicted_row_shape_maps_each_length_one_to_one():
    assert forward._predicted_row((20, 32), (23, 32), (4, 20, 20)) == (4, 23, 23)
    assert forward._predicted_row((20, 32), (20, 32), (4, 20, 20)) == (4, 20, 20)
    assert forward._predicted_row((32, 32), (23, 32), (4, 32, 32)) is None  # 32 -> 23 and 32 -> 32: ambiguous
    assert forward._predicted_row((20, 32), (23,), (4, 20, 20)) is None


def test_the_row_halves_table_is_the_row_halves_of_every_call():
    """The recorder forms the row halves of all calls of a mask computation in one numpy table; every row of it
    must be _row_halves (the Python formula) of its call, for keys across [0, 2³²) and calls far apart."""
    import random

    rng = random.Random(1)
    keys = [0, M32, 1 << 31, (1 << 31) - 1] + [rng.getrandbits(32) for _ in range(12)]
    calls = [0, 1, 2, 7, 40, 999, 123456]
    table = forward._row_halves_table(keys, calls)
    assert table.dtype == torch.int32 and table.shape == (len(calls), len(keys))
    for row, call in zip(table.tolist(), calls):
        assert row == forward._row_halves(keys, call)
