"""Per-tensor statistics and error metrics: pure numpy, chunked, accumulated in float64.

Chunking keeps the float64 working copy small, so statistics of a 1 GiB tensor cost
a few MiB beyond the tensor itself.

>>> tensor_stats(np.array([[0.0, -2.0], [3.0, 1.0]], dtype=np.float32))["absmax"]
3.0
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

CHUNK = 1 << 20  # elements per float64 chunk (8 MiB)

STAT_KEYS = ("numel", "min", "max", "mean", "std", "absmax", "l2", "sparsity", "nan", "inf")
ERROR_KEYS = ("mse", "max_abs", "rel_l2", "sqnr_db")


F = TypeVar("F", bound=Callable[..., Any])


def quiet_nan(function: F) -> F:
    """Run `function` with numpy's "invalid value" warning off: casting a signalling NaN (a
    legal bit pattern, counted in the statistics) raises it, and it would only be noise."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(invalid="ignore"):
            return function(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _chunks(flat: np.ndarray):
    for start in range(0, flat.size, CHUNK):
        yield flat[start:start + CHUNK]


class SumOfSquares:
    """Σx² kept as scale²·Σ(x/scale)², as LAPACK's dnrm2 does, so finite float64 values up to
    1e308 never overflow; the scale only moves off 1 for values beyond 1e150.

    >>> acc = SumOfSquares(); acc.add(np.array([3e200, 4e200])); acc.root()
    5e+200
    """

    SAFE = 1e150

    def __init__(self) -> None:
        self.scale, self.total = 1.0, 0.0

    def add(self, values: np.ndarray, top: float | None = None) -> None:
        if not values.size:
            return
        top = float(np.max(np.abs(values))) if top is None else top
        if top > self.SAFE and top > self.scale:
            self.total *= (self.scale / top) ** 2
            self.scale = top
        scaled = values if self.scale == 1.0 else values / self.scale
        self.total += float(np.dot(scaled, scaled))

    def root(self) -> float:
        return self.scale * math.sqrt(self.total)

    def value(self) -> float:
        """Σx² itself (inf when it exceeds float64, which `_finite` reports as None)."""
        return math.inf if self.root() > 1e154 else self.root() ** 2


def _finite(value: float) -> float | None:
    """JSON has no NaN/Inf: non-finite figures become None (null)."""
    return float(value) if math.isfinite(value) else None


@quiet_nan
def tensor_stats(array: np.ndarray) -> dict[str, Any]:
    """numel, min, max, mean, std (population), absmax, l2, sparsity (exact zeros), nan, inf.

    Float statistics ignore NaN/Inf (counted separately); bool and int tensors get the same
    keys computed on their values. Figures that do not exist (empty tensor) are None.

    One pass, each chunk converted to float64 once. Deviations are summed around the first
    value (a shifted-data variance: its rounding grows with (mean − shift)²/variance, which
    is small when the shift is any value of the tensor), so no second pass is needed.
    """
    flat = np.asarray(array).reshape(-1)
    is_float = flat.dtype.kind not in "iub"  # ml_dtypes' bfloat16/float8 report kind "V"
    count = zeros = nan = inf = 0
    low, high = math.inf, -math.inf
    shift: float | None = None
    shifted_total = 0.0
    deviations, squares = SumOfSquares(), SumOfSquares()
    for part in _chunks(flat):
        values = part.astype(np.float64)
        if is_float:
            finite = np.isfinite(values)
            if not finite.all():
                bad = values[~finite]
                nans = int(np.count_nonzero(np.isnan(bad)))
                nan, inf = nan + nans, inf + bad.size - nans
                values = values[finite]
        if not values.size:
            continue
        zeros += int(np.count_nonzero(values == 0))
        smallest, largest = float(values.min()), float(values.max())
        low, high = min(low, smallest), max(high, largest)
        top = max(abs(smallest), abs(largest))
        squares.add(values, top=top)
        shift = float(values[0]) if shift is None else shift
        values -= shift
        shifted_total += float(values.sum())
        deviations.add(values, top=top + abs(shift))
        count += values.size
    numel = int(flat.size)
    mean = shift + shifted_total / count if count else math.nan
    if count:  # std² = mean of squared deviations from the shift − (mean − shift)²
        spread, offset = deviations.root() / math.sqrt(count), abs(shifted_total / count)
        std = math.sqrt(max(spread - offset, 0.0)) * math.sqrt(spread + offset)
    absmax = max(abs(low), abs(high)) if count else 0.0
    return {
        "numel": numel,
        "min": _finite(low), "max": _finite(high),
        "mean": _finite(mean),
        "std": _finite(std) if count else None,
        "absmax": _finite(absmax) if count else None,
        "l2": _finite(squares.root()),
        "sparsity": zeros / numel if numel else None,
        "nan": nan, "inf": inf,
    }


@quiet_nan
def error_metrics(before: np.ndarray, after: np.ndarray) -> dict[str, float | None]:
    """What a pipeline did to one tensor: mse, max_abs, rel_l2 = ‖b−a‖/‖a‖, sqnr_db = 10·log10(‖a‖²/‖b−a‖²).

    An unchanged tensor has mse 0 and sqnr None (infinite). Elements that were not finite
    before are left out (the report counts them); a finite value turned non-finite makes
    the error infinite (None in JSON). Shapes must match.
    """
    difference, reference = SumOfSquares(), SumOfSquares()
    max_abs, broken = 0.0, False
    a_flat, b_flat = np.asarray(before).reshape(-1), np.asarray(after).reshape(-1)
    for start in range(0, a_flat.size, CHUNK):
        ref = a_flat[start:start + CHUNK].astype(np.float64)
        delta = b_flat[start:start + CHUNK].astype(np.float64)
        keep = np.isfinite(ref)
        if not keep.all():
            ref, delta = ref[keep], delta[keep]
        if not ref.size:
            continue
        with np.errstate(invalid="ignore", over="ignore"):
            delta -= ref
        finite = np.isfinite(delta)
        if not finite.all():
            broken = True
            delta = delta[finite]
        if delta.size:
            largest = max(-float(delta.min()), float(delta.max()))
            max_abs = max(max_abs, largest)
            difference.add(delta, top=largest)
        reference.add(ref, top=max(-float(ref.min()), float(ref.max())))
    if broken:
        return {"mse": None, "max_abs": None, "rel_l2": None, "sqnr_db": None}
    numel = a_flat.size
    error, size = difference.root(), reference.root()
    mse = difference.value() / numel if numel else 0.0
    rel = error / size if size > 0 else (0.0 if error == 0 else math.inf)
    sqnr = 20 * math.log10(size / error) if error > 0 and size > 0 else None
    return {"mse": _finite(mse), "max_abs": _finite(max_abs), "rel_l2": _finite(rel), "sqnr_db": sqnr}


@quiet_nan
def cosine(before: np.ndarray, after: np.ndarray) -> float | None:
    """Cosine similarity of the two tensors flattened (None when either is all zeros).

    Both are scaled by their largest magnitude first, so huge float64 values cannot overflow.
    """
    a_flat, b_flat = np.asarray(before).reshape(-1), np.asarray(after).reshape(-1)
    chunks = range(0, a_flat.size, CHUNK)
    a_top = max((float(np.max(np.abs(a_flat[i:i + CHUNK].astype(np.float64)))) for i in chunks), default=0.0)
    b_top = max((float(np.max(np.abs(b_flat[i:i + CHUNK].astype(np.float64)))) for i in chunks), default=0.0)
    if not (0 < a_top < math.inf and 0 < b_top < math.inf):  # all zeros, or NaN/Inf present
        return None
    dot = na = nb = 0.0
    for start in chunks:
        x = a_flat[start:start + CHUNK].astype(np.float64) / a_top
        y = b_flat[start:start + CHUNK].astype(np.float64) / b_top
        dot += float(x @ y)
        na += float(x @ x)
        nb += float(y @ y)
    return _finite(dot / math.sqrt(na * nb))


@quiet_nan
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
        finite = np.isfinite(values)
        if not finite.all():
            values = values[finite]
        values -= low
        values *= scale
        index = values.astype(np.intp)
        np.clip(index, 0, bins - 1, out=index)  # the maximum falls in the last bin, as in np.histogram
        counts += np.bincount(index, minlength=bins)
    return counts.tolist()
