"""The project's parity definition (the GPU-correctness issue): statistics, the pass rule, and stage diagnosis.

E16 (the engine as served) passes against R (the fp32 reference, reference.py) when each of mean, p99 and max of
|E16 - R| in uint8 levels is at most max(2 x the same statistic of |P16 - R|, 2 levels), P16 being diffusers' own
pipeline in the engine's dtype. Nothing here rounds a NaN away: non-finite input raises NonFiniteError.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .reference import NonFiniteError, assert_finite

STATS = ("mean", "p99", "max")
FLOOR_LEVELS = 2.0  # below this, a difference is rounding noise whatever P16 does
FACTOR = 2.0


def _stack(frames: np.ndarray | Sequence[np.ndarray], name: str) -> np.ndarray:
    arr = np.stack([np.asarray(f) for f in frames]) if not isinstance(frames, np.ndarray) else frames
    if arr.dtype.kind == "f":
        assert_finite(name, arr)
    elif arr.dtype.kind not in "ui":
        raise TypeError(f"{name}: frames must be uint8 levels (or finite floats in levels), got {arr.dtype}")
    return arr.astype(np.float64)


def parity_stats(ours: np.ndarray | Sequence[np.ndarray], ref: np.ndarray | Sequence[np.ndarray]) -> dict:
    """{mean, p99, max} of |ours - ref| over all pixels of all frames, in uint8 levels (0..255 in, 0..255 out)."""
    a, b = _stack(ours, "ours"), _stack(ref, "reference")
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {a.shape} vs {b.shape}")
    d = np.abs(a - b)
    return {"mean": round(float(d.mean()), 4), "p99": float(np.percentile(d, 99)), "max": float(d.max()),
            "frames": int(a.shape[0]) if a.ndim == 4 else 1}


def parity_verdict(e16_vs_r: Mapping[str, float], p16_vs_r: Mapping[str, float]) -> dict:
    """Each statistic of |E16-R| at most max(2 x that of |P16-R|, 2 levels): {pass, limits, failed: [names]}."""
    limits, failed = {}, []
    for key in STATS:
        e, p = float(e16_vs_r[key]), float(p16_vs_r[key])
        if not (np.isfinite(e) and np.isfinite(p)):
            raise NonFiniteError(f"parity statistic {key} is not finite: engine {e}, pipeline {p}")
        limits[key] = max(FACTOR * p, FLOOR_LEVELS)
        if e > limits[key]:
            failed.append(key)
    return {"pass": not failed, "limits": limits, "failed": failed}


def relative_error(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| in float64 (0 for equal tensors)."""
    a, b = ours.double(), ref.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def compare_traces(
    ours: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], threshold: float = 1e-3
) -> dict:
    """Stage by stage (Engine.trace order), relative error ||a - b|| / ||b||; every stage must be finite.

    Returns {stages: {name: rel_error}, first_over: the first stage whose error exceeds threshold (or None),
    threshold}. Raises NonFiniteError naming the first non-finite stage, KeyError if the traces' stages differ.
    """
    if list(ours) != list(ref):
        raise KeyError(f"traces have different stages: {list(ours)} vs {list(ref)}")
    stages, first = {}, None
    for name in ours:
        assert_finite(f"stage {name!r} (ours)", ours[name])
        assert_finite(f"stage {name!r} (reference)", ref[name])
        rel = relative_error(ours[name], ref[name])
        stages[name] = rel
        if first is None and rel > threshold:
            first = name
    return {"stages": stages, "first_over": first, "threshold": threshold}
