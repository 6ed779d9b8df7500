"""torch.compile with its default backend (inductor), dropout on: the recorder sees the compiled model's training
forwards (its dropout calls draw the recorded masks inside the compiled graph), names parameters as the model does,
and the run decomposes exactly. Skipped where inductor has no C++ compiler to build its CPU kernels."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

import explaind_math as em
from explaind_math.integrations import DataLoaderWithIds


def _inductor_builds() -> bool:
    """Whether inductor can build a CPU kernel here (a C++ compiler and its headers)."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return False
    try:
        torch.compile(lambda x: torch.tanh(x) * 2)(torch.ones(3))
        return True
    except Exception:  # BackendCompilerFailed and friends: no working toolchain
        return False


def test_inductor_compiled_run_with_dropout_decomposes_exactly():
    if not _inductor_builds():
        pytest.skip("inductor cannot build CPU kernels here (no working C++ toolchain)")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(24, 4, generator=g, dtype=torch.float64)
    dataset = list(zip(X, (X[:, 0] > 0).long()))
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Dropout(0.2),
                              torch.nn.Linear(8, 3)).double()
    compiled = torch.compile(net)  # the default backend
    optimizer = torch.optim.AdamW(compiled.parameters(), lr=0.01)
    recorder = em.TrajectoryRecorder(compiled, optimizer)
    for ids, (x, y) in DataLoaderWithIds(dataset, batch_size=8):
        optimizer.zero_grad()
        F.cross_entropy(compiled(x), y).backward()
        recorder.record_batch(ids)
        optimizer.step()
    recorder.close()
    trajectory = recorder.trajectory()
    assert trajectory.parameter_names == [n for n, _ in net.named_parameters()]  # no "_orig_mod."
    assert trajectory.metadata["dropout"]["calls"] == [0.2]
    net.eval()
    result = em.decompose_adamw_training(compiled, trajectory, loss_fn=F.cross_entropy, train_data=dataset,
                                         test_inputs=X[:2], dtype=torch.float64)
    assert result.relative_residual <= 1e-9, result.summary()
