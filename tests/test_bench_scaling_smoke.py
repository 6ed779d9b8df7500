"""Smoke test of benchmarks/bench_scaling.py: its pieces run on the smallest configuration.

Only structural facts are asserted (rows, columns, keys) and the certificate of the exact rule;
nothing about time.
"""

import math
import sys
from pathlib import Path

import pytest
import torch
from explaind_math.testing.scripts import load_script

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_scaling.py"


@pytest.fixture(scope="module")
def bench():
    try:
        yield load_script(SCRIPT, "bench_scaling")
    finally:
        sys.modules.pop("bench_scaling", None)


def test_fidelity_and_overhead_tables_on_the_smallest_transformer(bench):
    run = bench.prepare_run(bench.SMOKE_TRANSFORMER, torch.float64)
    rows = bench.fidelity_rows(run, repeats=1)
    labels = [r.label for r in rows]
    assert labels[:4] == ["gauss_legendre(2)", "gauss_legendre(3)", "gauss_legendre(4)", "gauss_legendre(8)"]
    assert labels[4].startswith("adaptive_GL(")  # hp-adaptive, nodes chosen by JVP probes
    assert [lab.split(",")[0] for lab in labels[5:7]] == ["adaptive(GL(2)", "adaptive(GL(4)"]
    assert labels[7:] == ["midpoint(10)", "midpoint(100)", bench.ONE_NODE_PER_CALL, bench.DEFAULT_RULE]
    steps = run.trajectory.num_steps
    fixed = [r.nodes for r in rows if not r.label.startswith(("adaptive", bench.DEFAULT_RULE))]
    assert fixed == [n * steps for n in (2, 3, 4, 8, 10, 100, 100)]
    # nodes batched into one vmapped call or one call per node: the same numbers up to rounding
    batched, one_per_call = rows[-3], rows[-2]
    assert batched.node_chunk > 1 and one_per_call.node_chunk == 1
    assert abs(batched.relative_residual - one_per_call.relative_residual) <= 1e-12
    # the exact rule on a smooth model in float64: certified to 1e-9 relative
    assert rows[3].relative_residual <= 1e-9
    assert all(r.relative_residual <= bench.TARGET_RESIDUAL for r in rows if r.label.startswith("adaptive"))
    assert all(math.isfinite(r.seconds) and r.seconds > 0 for r in rows)

    table = bench.format_fidelity(rows, run).splitlines()
    assert len(table) == 1 + len(rows)
    assert [line.split()[0] for line in table[1:]] == [lab.split()[0] for lab in labels]
    assert "midpoint(100)" in bench.fidelity_verdict(rows, torch.float64)

    overhead = bench.overhead_rows(run, rows, ("gauss_legendre(8)", "adaptive"))
    assert [o[0] for o in overhead] == [labels[3], labels[4], labels[5], labels[6]]
    assert len(bench.format_overhead(overhead).splitlines()) == 1 + len(overhead)


def test_scaling_worker_and_table_on_the_smallest_mlp(bench):
    result = bench.scaling_worker(bench.SMOKE_MLP, repeats=1)
    assert set(result) == {"seconds", "peak_delta_mb", "relative_residual", "num_params", "units"}
    assert result["relative_residual"] <= 1e-9
    assert result["num_params"] == sum(p.numel() for p in bench.mlp_case(bench.SMOKE_MLP, torch.float64)[0].parameters())
    assert result["units"] == bench.SMOKE_MLP.n_train
    configs = bench.scaling_configs(bench.SMOKE_MLP, factors=(2, 4))
    assert [label for label, _ in configs] == ["base", "N×2", "N×4", "D×2", "D×4", "M×2", "M×4", "X×2", "X×4"]
    table = bench.format_scaling([(label, cfg, result) for label, cfg in configs]).splitlines()
    assert len(table) == 1 + len(configs)
