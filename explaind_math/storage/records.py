"""Step records and optimizer state as JSON plus tensors, under the tensor keys shared by both file
forms: ``weights/<t>``, ``state/<t>/<name>/<key>``, ``grad/<t>/<name>`` (and ``initial/<name>/<key>``
for the state before step 0)."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..trajectory import StepRecord

__all__ = ["decode_state", "decode_step", "encode_state", "encode_step"]


def encode_step(t: int, step: StepRecord, tensors: dict[str, torch.Tensor]) -> dict:
    """Step t's description as JSON; its tensors go into ``tensors`` under ``weights/t``,
    ``state/t/<name>/<key>`` and ``grad/t/<name>`` (the keys of both file forms)."""
    tensors[f"weights/{t}"] = step.weights
    counts, keys = encode_state(step.state, f"state/{t}", tensors)
    has_gradient = step.gradient is not None
    if has_gradient:
        for n, g in step.gradient.items():
            tensors[f"grad/{t}/{n}"] = g
    encoded = {
        "units": [int(i) for i in step.sample_ids],
        "hyperparameters": step.hyperparameters,
        "updated": list(step.updated),
        "step_counts": counts,
        "state_keys": keys,
        "gradient": sorted(step.gradient) if has_gradient else None,
    }
    if step.batch_calls is not None:  # only for several record_batch calls (older files have no key)
        encoded["batch_calls"] = [[int(i) for i in call] for call in step.batch_calls]
    return encoded


def decode_step(t: int, s: Mapping[str, Any], get) -> StepRecord:
    """Inverse of :func:`encode_step`; ``get(key)`` returns the stored tensor."""
    state = decode_state(s["step_counts"], s["state_keys"], f"state/{t}", get)
    gradient = None
    if s["gradient"] is not None:
        gradient = {n: get(f"grad/{t}/{n}") for n in s["gradient"]}
    return StepRecord(
        [int(i) for i in s["units"]], get(f"weights/{t}"), s["hyperparameters"],
        list(s["updated"]), state, gradient,
        None if s.get("batch_calls") is None else [[int(i) for i in call] for call in s["batch_calls"]],
    )


def encode_state(state: Mapping[str, Mapping[str, Any]], prefix: str, tensors: dict[str, torch.Tensor]):
    """Optimizer state per parameter: ``step`` counts as JSON ints, tensors under ``prefix/<name>/<key>``."""
    counts, keys = {}, {}
    for n, st in state.items():
        keys[n] = sorted(k for k in st if k != "step")
        for k, v in st.items():
            if k == "step":
                counts[n] = int(v)
            else:
                tensors[f"{prefix}/{n}/{k}"] = v
    return counts, keys


def decode_state(counts: Mapping[str, int], keys: Mapping[str, Sequence[str]], prefix: str, get) -> dict:
    """Inverse of :func:`encode_state`; ``get(key)`` returns the stored tensor."""
    state = {n: {k: get(f"{prefix}/{n}/{k}") for k in ks} for n, ks in keys.items()}
    for n, c in counts.items():
        state.setdefault(n, {})["step"] = int(c)
    return state
