"""Per-tensor statistics and error metrics: pure numpy, chunked, accumulated in float64.

Chunking keeps the float64 working copy small, so statistics of a 1 GiB tensor cost
a few MiB beyond the tensor itself.

>>> tensor_stats(np.array([[0.0, -2.0], [3.0, 1.0]], dtype=np.float32))["absmax"]
3.0
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

CHUNK = 1 << 20  # elements per float64 chunk (8 MiB)

STAT_KEYS = ("numel", "min", "max", "mean", "std", "absmax", "l2", "sparsity", "nan", "inf")
ERROR_KEYS = ("mse", "max_abs", "rel_l2", "sqnr_db")


def _chunks(flat: np.ndarray):
    for start in range(0, flat.size, CHUNK):
        yield flat[start:start + CHUNK]


def _finite(value: float) -> float | None:
    """JSON has no NaN/Inf: non-finite figures become None (null)."""
    return float(value) if math.isfinite(value) else None


def tensor_stats(array: np.ndarray) -> dict[str, Any]:
    """numel, min, max, mean, std (population), absmax, l2, sparsity (exact zeros), nan, inf.

    Float statistics ignore NaN/Inf (counted separately); bool and int tensors get the same
    keys computed on their values. Figures that do not exist (empty tensor) are None.
    """
    flat = np.asarray(array).reshape(-1)
    is_float = flat.dtype.kind not in "iub"  # ml_dtypes' bfloat16/float8 report kind "V"
    sumsq = total = sq = 0.0
    zeros = nan = inf = 0
    low, high = math.inf, -math.inf
    finite_n = 0
    for part in _chunks(flat):
        values = part.astype(np.float64)
        if is_float:
            finite = np.isfinite(values)
            nan += int(np.isnan(values).sum())
            inf += int(np.isinf(values).sum())
            if not finite.all():
                values = values[finite]
        zeros += int(np.count_nonzero(values == 0))
        if values.size:
            finite_n += values.size
            total += float(values.sum())
            low = min(low, float(values.min()))
            high = max(high, float(values.max()))
    mean = total / finite_n if finite_n else math.nan
    for part in _chunks(flat):
        values = part.astype(np.float64)
        if is_float:
            values = values[np.isfinite(values)]
        sq += float(np.square(values - mean).sum()) if values.size else 0.0
        sumsq += float(np.square(values).sum()) if values.size else 0.0
    numel = int(flat.size)
    return {
        "numel": numel,
        "min": _finite(low), "max": _finite(high),
        "mean": _finite(mean),
        "std": _finite(math.sqrt(sq / finite_n)) if finite_n else None,
        "absmax": _finite(max(abs(low), abs(high))) if finite_n else None,
        "l2": _finite(math.sqrt(sumsq)),
        "sparsity": zeros / numel if numel else None,
        "nan": nan, "inf": inf,
    }


def error_metrics(before: np.ndarray, after: np.ndarray) -> dict[str, float | None]:
    """What a pipeline did to one tensor: mse, max_abs, rel_l2 = ‖a−b‖/‖b‖, sqnr_db = 10·log10(‖b‖²/‖a−b‖²).

    An unchanged tensor has mse 0 and sqnr None (infinite). Elements that were not finite
    before are left out (the report counts them); a finite value turned non-finite makes
    the error infinite (None in JSON). Shapes must match.
    """
    diff_sq = ref_sq = max_abs = 0.0
    a_flat, b_flat = np.asarray(before).reshape(-1), np.asarray(after).reshape(-1)
    for start in range(0, a_flat.size, CHUNK):
        ref = a_flat[start:start + CHUNK].astype(np.float64)
        new = b_flat[start:start + CHUNK].astype(np.float64)
        keep = np.isfinite(ref)
        ref, new = ref[keep], new[keep]
        with np.errstate(invalid="ignore", over="ignore"):
            delta = new - ref
            diff_sq += float(np.square(delta).sum())
        ref_sq += float(np.square(ref).sum())
        if delta.size:
            largest = float(np.abs(delta).max())
            max_abs = largest if math.isnan(largest) or largest > max_abs else max_abs
    numel = a_flat.size
    mse = diff_sq / numel if numel else 0.0
    rel = math.sqrt(diff_sq) / math.sqrt(ref_sq) if ref_sq > 0 else (0.0 if diff_sq == 0 else math.inf)
    sqnr = 10 * math.log10(ref_sq / diff_sq) if diff_sq > 0 and ref_sq > 0 else None
    return {"mse": _finite(mse), "max_abs": _finite(max_abs), "rel_l2": _finite(rel), "sqnr_db": sqnr}


def cosine(before: np.ndarray, after: np.ndarray) -> float | None:
    """Cosine similarity of the two tensors flattened (None when either is all zeros)."""
    dot = na = nb = 0.0
    a_flat, b_flat = np.asarray(before).reshape(-1), np.asarray(after).reshape(-1)
    for start in range(0, a_flat.size, CHUNK):
        x = a_flat[start:start + CHUNK].astype(np.float64)
        y = b_flat[start:start + CHUNK].astype(np.float64)
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    if na == 0 or nb == 0:
        return None
    return _finite(dot / math.sqrt(na * nb))


def histogram(array: np.ndarray, low: float, high: float, bins: int = 32) -> list[int]:
    """Counts of the finite values in `bins` equal bins over [low, high], chunked like the stats.

    Before and after histograms of one tensor share (low, high) so they can be compared.
    """
    counts = np.zeros(bins, dtype=np.int64)
    if not (math.isfinite(low) and math.isfinite(high)):
        return counts.tolist()
    if high <= low:
        high = low + 1.0
    flat = np.asarray(array).reshape(-1)
    scale = bins / (high - low)
    for part in _chunks(flat):
        values = part.astype(np.float64)
        values = values[np.isfinite(values)]
        index = ((values - low) * scale).astype(np.intp)
        np.clip(index, 0, bins - 1, out=index)  # the maximum falls in the last bin, as in np.histogram
        counts += np.bincount(index, minlength=bins)
    return counts.tolist()
