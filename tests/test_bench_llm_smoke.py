"""Smoke test of benchmarks/bench_llm_checkpoints.py (Remark F.3 on a GPT-style byte LM), tiny config.

Asserted: the certificate of each decomposed checkpoint update (float32 and float64), that the simulated
update is the real one training took, that the per-layer split adds up to the loss change, the shape of
the printed table (one row per checkpoint and dtype), and the sizes of the full and quick models.
Nothing about time.
"""

import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from explaind_math.testing.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_llm_checkpoints.py"


@pytest.fixture(scope="module")
def bench():
    try:
        yield load_script(SCRIPT, "bench_llm_checkpoints")
    finally:
        sys.modules.pop("bench_llm_checkpoints", None)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module (CI machines are small and shared), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def smoke_run(bench):
    cfg = replace(bench.SMOKE, train_steps=4, checkpoint_steps=(1, 3))  # two checkpoints, float64 for both
    rows, text = bench.run_benchmark(cfg, torch.device("cpu"), threads=1, subprocesses=False, profile=True,
                                     echo=lambda line: None)
    return cfg, rows, text


def table_lines(text: str, section: str) -> list[str]:
    """The lines of a printed table: from the line after the section's title to the next blank line."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(section))
    end = next(i for i in range(start + 1, len(lines)) if not lines[i].strip())
    return lines[start + 1 : end]


def test_every_checkpoint_update_is_certified(bench, smoke_run):
    cfg, rows, _ = smoke_run
    assert [(r["step"], r["dtype"]) for r in rows] == [(1, "float32"), (1, "float64"), (3, "float32"), (3, "float64")]
    eps32 = torch.finfo(torch.float32).eps
    for r in rows:
        assert r["num_params"] == sum(p.numel() for p in bench.ByteGPT(cfg).parameters())
        assert r["units"] == len(set(r["per_layer"]["units"])) and r["tests"] == cfg.test_batch
        if r["dtype"] == "float64":
            # adaptive(GL(4), tol) accepts a segment only when its residual is ≤ tol (× its length)
            assert r["relative_residual"] <= cfg.tol
            assert r["replay_error"] <= 1e-8  # the float64 replay tolerance
        else:
            # float32: the adaptive rule stops at the rounding noise 64 ε (1 + |f|) of the losses (|f| ≤ 10)
            assert r["relative_residual"] <= 64 * eps32 * 11
            assert r["replay_error"] <= 1e-3  # within the float32 replay check (1e-4 plus a rounding bound)
        # the simulated update is the real step training took from that checkpoint: equal up to float32
        # rounding of the loss (the float64 run starts from the same float32 checkpoint)
        assert r["initial_vs_live"] <= 1e-5
        assert r["sim_vs_live"] <= 1e-5
        # the per-layer split adds up to the mean loss change, up to the certified residual
        pl = r["per_layer"]
        total = sum(pl["kernel"]) + sum(pl["carried_state"]) + sum(pl["decay"])
        assert abs(total - (r["loss_after"] - r["loss_before"])) <= r["max_residual"] + 1e-6
        assert sum(pl["per_unit"]) == pytest.approx(sum(pl["kernel"]), abs=1e-6)
        assert pl["labels"] == ["embed", "block.0", "block.1", "head"]
        assert r["nodes"] >= cfg.nodes and r["seconds"] > 0


def test_printed_table_has_one_row_per_checkpoint_and_dtype(bench, smoke_run):
    cfg, rows, text = smoke_run
    table = table_lines(text, "[1]")
    assert table[0].split()[:3] == ["ckpt", "dtype", "params"]
    body = table[1:]
    assert len(body) == len(bench.decomposition_plan(cfg)) == len(rows)
    assert [(int(line.split()[0]), line.split()[1]) for line in body] == [(r["step"], r["dtype"]) for r in rows]
    for step in cfg.checkpoint_steps:
        assert [line.split()[1] for line in body if int(line.split()[0]) == step] == ["float32", "float64"]
    # the profile of the first float32 call, and the per-layer split of every float32 row
    assert len(table_lines(text, "[3]")) > 2
    split = [line for line in text.splitlines() if line.startswith("  checkpoint ")]
    assert [int(line.split()[1]) for line in split] == list(cfg.checkpoint_steps)


def test_checkpoint_only_worker_in_a_fresh_process(bench, tmp_path):
    """The default path: the checkpoint goes to disk and a fresh process decomposes it."""
    cfg = replace(bench.SMOKE, float64="none")
    data = bench.make_data(cfg)
    model = bench.build_model(cfg, torch.device("cpu"))
    [entry], _ = bench.train_with_checkpoints(cfg, model, data, torch.device("cpu"))
    path = tmp_path / "checkpoint.pt"
    bench.save_entry(entry, path)
    row = bench.run_worker_subprocess(cfg, path, "float32", torch.device("cpu"), threads=1, profile=True)
    assert row["step"] == cfg.checkpoint_steps[0] and row["dtype"] == "float32"
    assert row["relative_residual"] <= 64 * torch.finfo(torch.float32).eps * 11
    assert row["sim_vs_live"] <= 1e-5
    assert row["profile"] and row["peak_mb"] >= 0


def test_model_sizes_and_layer_grouping(bench):
    full = bench.ByteGPT(bench.FULL)
    assert bench.num_params(full) >= 10_000_000  # issue 7: at least 10M parameters
    assert 0.8e6 <= bench.num_params(bench.ByteGPT(bench.QUICK)) <= 1.5e6  # about 1M
    layers = set(bench.layer_map(full).values())
    assert layers == {"embed", "head", *(f"block.{k}" for k in range(bench.FULL.n_layers))}
    assert not any(isinstance(m, (torch.nn.Dropout, torch.nn.modules.batchnorm._BatchNorm)) for m in full.modules())
    assert full.lm_head.weight.data_ptr() != full.tok_emb.weight.data_ptr()  # untied


def test_bad_float64_choice_is_refused(bench):
    with pytest.raises(ValueError, match="float64"):
        bench.decomposition_plan(replace(bench.SMOKE, float64="some"))
