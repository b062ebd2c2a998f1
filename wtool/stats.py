"""Per-tensor statistics and error metrics: pure numpy, chunked, sums accumulated in float64.

Floats of 16 bits or fewer (bfloat16, float16, float8) have at most 65536 distinct values:
their statistics and histograms come, exactly, from one count of their bit patterns
(one bincount per chunk, no conversion). Other tensors are read once in chunks of CHUNK
elements (small enough to stay in cache), each converted once into reused per-thread
buffers; sums and sums of squares are taken in float64 over exact float64 copies of the
values. `compare` takes a tensor before and after a pipeline: both sides' statistics, the
error metrics and both histograms, with one pass over the pair for the error. No BLAS call
is made (a BLAS dot starts threads of its own that fight `--jobs` for the cores) but in the
statistics process, where BLAS runs one thread (`use_blas_dot`).

>>> tensor_stats(np.array([[0.0, -2.0], [3.0, 1.0]], dtype=np.float32))["absmax"]
3.0
"""

from __future__ import annotations

import functools
import math
import threading
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from operator import itemgetter
from typing import Any, TypeVar

import numpy as np

from wtool.dtypes import convert_into

CHUNK = 1 << 17  # elements per chunk: small enough for the cache, large enough that Python overhead stays small
BINS = 32

STAT_KEYS = ("numel", "min", "max", "mean", "std", "absmax", "l2", "sparsity", "nan", "inf")

_local = threading.local()


def _buffer(slot: str, dtype: type, size: int | None = None) -> np.ndarray:
    """This thread's reused work array for `slot` and `dtype`: `size` (default CHUNK) elements."""
    size = CHUNK if size is None else size
    cache = _local.__dict__.setdefault("buffers", {})
    array = cache.get((slot, dtype))
    if array is None or array.size < size or array.size < CHUNK:
        array = cache[slot, dtype] = np.empty(max(size, CHUNK), dtype)
    return array[:size]


def _compute_dtype(dtype: np.dtype) -> type:
    """float32 for floats of 32 bits or fewer (bfloat16, float8, float16), float64 otherwise."""
    is_float = dtype.kind == "f" or dtype.kind == "V"  # ml_dtypes' bfloat16/float8 report kind "V"
    return np.float32 if is_float and dtype.itemsize <= 4 else np.float64


def _values(part: np.ndarray, slot: str) -> np.ndarray:
    """`part` in its compute dtype: the input itself when it already is, else a reused buffer."""
    target = _compute_dtype(part.dtype)
    if part.dtype == target:
        return part
    return convert_into(part, _buffer(slot, target, part.size))


@dataclass
class _Finite:
    """One chunk's finite values with their range, and how many NaN/Inf were left out."""

    values: np.ndarray
    low: float
    high: float
    nan: int = 0
    inf: int = 0

    @property
    def dropped(self) -> bool:
        return bool(self.nan or self.inf)


def _finite(values: np.ndarray) -> _Finite:
    """The finite values of a chunk (in compute dtype); min/max propagate NaN/Inf, so clean
    chunks cost no mask."""
    low, high = float(values.min()), float(values.max())
    if math.isfinite(low) and math.isfinite(high):
        return _Finite(values, low, high)
    keep = np.isfinite(values)
    nans = int(np.count_nonzero(np.isnan(values)))
    values = values[keep]
    low, high = (float(values.min()), float(values.max())) if values.size else (math.inf, -math.inf)
    return _Finite(values, low, high, nans, keep.size - values.size - nans)


def _wide(values: np.ndarray, slot: str) -> np.ndarray:
    """A float64 copy of `values` in a reused buffer, free to be overwritten."""
    return convert_into(values, _buffer(slot, np.float64, values.size))


_blas_dot = False  # see use_blas_dot


def use_blas_dot() -> None:
    """Take Σx² with a BLAS dot from now on, in this process: ~5× faster than a multiply and a
    sum, the same to float64 rounding. Only for a process whose BLAS runs on one thread (the
    statistics process, `wtool.measure`): elsewhere its threads would fight `--jobs` for the cores."""
    global _blas_dot
    _blas_dot = True


class SumOfSquares:
    """Σx and Σx² kept as scale·Σ(x/scale) and scale²·Σ(x/scale)², as LAPACK's dnrm2 keeps its
    scale, so finite float64 values up to 1e308 never overflow; the scale only moves off 1
    for values beyond 1e150 (float64 tensors).

    >>> acc = SumOfSquares(); acc.add(np.array([3e200, 4e200]), top=4e200); round(acc.root() / 1e200, 12)
    5.0
    """

    SAFE = 1e150

    def __init__(self) -> None:
        self.scale, self.first, self.total = 1.0, 0.0, 0.0

    def add(self, values: np.ndarray, top: float, *, first: bool = False) -> None:
        """Add a float64 work buffer (overwritten) whose largest magnitude is `top`; with
        `first`, Σx too."""
        if top > self.SAFE and top > self.scale:
            ratio = self.scale / top
            self.first, self.total, self.scale = self.first * ratio, self.total * ratio * ratio, top
        if self.scale != 1.0:
            np.divide(values, self.scale, out=values)
        if first:
            self.first += float(np.add.reduce(values))
        if _blas_dot:
            self.total += float(np.dot(values, values))
            return
        np.multiply(values, values, out=values)
        self.total += float(np.add.reduce(values))

    def root(self) -> float:
        return self.scale * math.sqrt(self.total)

    def value(self) -> float:
        """Σx² itself (inf when it exceeds float64, which `_json_float` reports as None)."""
        return math.inf if self.root() > 1e154 else self.root() ** 2


class _Moments:
    """Running statistics of one tensor, chunk by chunk.

    Deviations d = x − shift are summed (Σd, Σd²) around the mean of the first chunk, a
    shifted-data variance: its rounding grows with (mean − shift)²/variance, small when the
    shift is near the mean, so no second pass is needed. Σx² follows exactly from
    Σd² + 2·shift·Σd + n·shift².
    """

    def __init__(self, numel: int) -> None:
        self.numel, self.count, self.zeros, self.nan, self.inf = numel, 0, 0, 0, 0
        self.low, self.high = math.inf, -math.inf
        self.shift: float | None = None
        self.sums = SumOfSquares()

    def take(self, values: np.ndarray) -> _Finite:
        """Count a chunk's zeros, NaN/Inf and range (`values` in compute dtype); return its
        finite values for `add`."""
        chunk = _finite(values)
        self.nan, self.inf = self.nan + chunk.nan, self.inf + chunk.inf
        if chunk.values.size:
            zero = np.equal(chunk.values, 0, out=_buffer("zero", np.bool_, chunk.values.size))
            self.zeros += int(np.count_nonzero(zero))
            self.low, self.high = min(self.low, chunk.low), max(self.high, chunk.high)
        return chunk

    def add(self, wide: np.ndarray, chunk: _Finite) -> None:
        """Sum the chunk's deviations; `wide` holds its finite values in float64 and is overwritten."""
        if not wide.size:
            return
        if self.shift is None:
            mean = float(np.add.reduce(wide)) / wide.size
            self.shift = mean if math.isfinite(mean) else 0.0
        np.subtract(wide, self.shift, out=wide)
        self.sums.add(wide, max(abs(chunk.low), abs(chunk.high)) + abs(self.shift), first=True)
        self.count += wide.size

    def result(self) -> dict[str, Any]:
        count, numel = self.count, self.numel
        figures: dict[str, Any] = {"numel": numel, "min": None, "max": None, "mean": None, "std": None,
                                   "absmax": None, "l2": 0.0, "sparsity": self.zeros / numel if numel else None,
                                   "nan": self.nan, "inf": self.inf}
        if not count:
            return figures
        scale, shift = self.sums.scale, self.shift or 0.0
        offset = scale * self.sums.first / count  # mean − shift
        spread = scale * math.sqrt(self.sums.total / count)  # root mean square of the deviations
        ratio = shift / scale
        squares = self.sums.total + 2 * ratio * self.sums.first + count * ratio * ratio
        figures.update(min=_json_float(self.low), max=_json_float(self.high), mean=_json_float(shift + offset),
                       std=_json_float(math.sqrt(max(spread - abs(offset), 0.0)) * math.sqrt(spread + abs(offset))),
                       absmax=_json_float(max(abs(self.low), abs(self.high))),
                       l2=_json_float(scale * math.sqrt(max(squares, 0.0))))
        return figures


def _json_float(value: float) -> float | None:
    """JSON has no NaN/Inf: non-finite figures become None (null)."""
    return float(value) if math.isfinite(value) else None


F = TypeVar("F", bound=Callable[..., Any])


def quiet_nan(function: F) -> F:
    """Run `function` with numpy's "invalid value" warning off: casting a signalling NaN (a
    legal bit pattern, counted in the statistics) raises it, and it would only be noise."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        with np.errstate(invalid="ignore"):
            return function(*args, **kwargs)

    return wrapper


def _chunks(size: int) -> range:
    return range(0, size, CHUNK)


def _flat(array: np.ndarray) -> np.ndarray:
    return np.asarray(array).reshape(-1)


@quiet_nan
def tensor_stats(array: np.ndarray) -> dict[str, Any]:
    """numel, min, max, mean, std (population), absmax, l2, sparsity (exact zeros), nan, inf.

    Float statistics ignore NaN/Inf (counted separately); bool and int tensors get the same
    keys computed on their values. Figures that do not exist (empty tensor) are None.
    """
    return _side(_flat(array)).result()


def _side(flat: np.ndarray) -> _Patterns | _Moments:
    """The statistics of a whole tensor: bit-pattern counts for narrow floats, else one chunked pass."""
    if _countable(flat.dtype):
        return _Patterns(flat)
    side = _Moments(flat.size)
    for start in _chunks(flat.size):
        chunk = side.take(_values(flat[start:start + CHUNK], "a"))
        side.add(_wide(chunk.values, "wa"), chunk)
    return side


def _countable(dtype: np.dtype) -> bool:
    """Floats of 16 bits or fewer: few enough distinct values to count each bit pattern."""
    return _compute_dtype(dtype) == np.float32 and dtype.itemsize <= 2


@functools.cache
def _every_value(dtype: np.dtype) -> np.ndarray:
    """Every value of a 16-bit-or-narrower dtype, indexed by its bit pattern, in float64."""
    patterns = np.arange(1 << (8 * dtype.itemsize), dtype=np.uint32).astype(f"u{dtype.itemsize}")
    with np.errstate(invalid="ignore"):
        return patterns.view(dtype).astype(np.float64)


class _Patterns:
    """Statistics of a narrow float tensor from the counts of its bit patterns.

    Counting costs one bincount per chunk and no conversion; the figures then come from the
    table of the dtype's values weighted by the counts: the mean, a two-pass variance and
    the sums exact to float64 rounding, and a histogram of any range (`histogram`).
    """

    CHUNK = 1 << 18  # bincount's own buffers and result stay a few MiB

    def __init__(self, flat: np.ndarray) -> None:
        counts = np.zeros(1 << (8 * flat.dtype.itemsize), dtype=np.int64)
        raw = flat.view(f"u{flat.dtype.itemsize}")
        for start in range(0, raw.size, self.CHUNK):
            counts += np.bincount(raw[start:start + self.CHUNK], minlength=counts.size)
        values = _every_value(flat.dtype)
        finite = np.isfinite(values)
        self.numel, self.nan = flat.size, int(counts[np.isnan(values)].sum())
        self.inf = int(counts[np.isinf(values)].sum())
        present = finite & (counts > 0)
        self.values, self.weights = values[present], counts[present]
        self.low = float(self.values.min()) if self.values.size else math.inf
        self.high = float(self.values.max()) if self.values.size else -math.inf

    def result(self) -> dict[str, Any]:
        count, numel = int(self.weights.sum()), self.numel
        figures: dict[str, Any] = {"numel": numel, "min": None, "max": None, "mean": None, "std": None,
                                   "absmax": None, "l2": 0.0, "nan": self.nan, "inf": self.inf,
                                   "sparsity": int(self.weights[self.values == 0].sum()) / numel if numel else None}
        if not count:
            return figures
        weighted = self.weights * self.values  # exact: a count times a value of at most 11 significant bits
        mean = float(np.add.reduce(weighted)) / count
        deviations = self.values - mean
        variance = float(np.add.reduce(self.weights * deviations * deviations)) / count
        figures.update(min=self.low, max=self.high, mean=mean, std=math.sqrt(variance),
                       absmax=max(abs(self.low), abs(self.high)),
                       l2=math.sqrt(float(np.add.reduce(weighted * self.values))))
        return figures

    def histogram(self, binning: _Binning) -> np.ndarray:
        counts = np.bincount(binning.index(self.values, "ia"), weights=self.weights, minlength=binning.bins)
        return counts.astype(np.int64)  # float64 weights count exactly up to 2^53


class _Binning:
    """Equal bins over [low, high] (a maximum falls in the last bin, as in np.histogram)."""

    def __init__(self, low: float, high: float, bins: int) -> None:
        if high <= low:
            high = low + 1.0
        self.low, self.bins, self.scale = low, bins, bins / (high - low)

    def index(self, wide: np.ndarray, slot: str) -> np.ndarray:
        """Bin numbers of float64 values, computed in float64 like np.histogram's (in a reused buffer)."""
        work = _buffer("wd", np.float64, wide.size)
        np.subtract(wide, self.low, out=work)
        np.multiply(work, self.scale, out=work)
        index = _buffer(slot, np.int32, wide.size)
        np.copyto(index, work, casting="unsafe")  # truncation: values are >= 0
        return np.clip(index, 0, self.bins - 1, out=index)

    def count(self, wide: np.ndarray) -> np.ndarray:
        return np.bincount(self.index(wide, "ia"), minlength=self.bins)


@quiet_nan
def histogram(array: np.ndarray, low: float, high: float, bins: int = BINS) -> list[int]:
    """Counts of the finite values in `bins` equal bins over [low, high], chunked like the stats.

    Before and after histograms of one tensor share (low, high) so they can be compared.
    """
    counts = np.zeros(bins, dtype=np.int64)
    if not (math.isfinite(low) and math.isfinite(high)):
        return counts.tolist()
    binning = _Binning(low, high, bins)
    flat = _flat(array)
    if _countable(flat.dtype):
        return _Patterns(flat).histogram(binning).tolist()
    for start in _chunks(flat.size):
        counts += binning.count(_wide(_finite(_values(flat[start:start + CHUNK], "a")).values, "wa"))
    return counts.tolist()


@dataclass
class Comparison:
    """A tensor before and after a pipeline: both sides' statistics, the error, the histograms."""

    before: dict[str, Any]
    after: dict[str, Any]
    error: dict[str, float | None]
    histogram: dict[str, Any] | None
    same_bytes: bool


class _Error:
    """Running Σ(b − a)² and max |b − a| over the elements finite before."""

    def __init__(self) -> None:
        self.squares, self.max_abs, self.broken = SumOfSquares(), 0.0, False

    def add(self, delta: np.ndarray) -> bool:
        """Add one chunk's b − a (float64 work buffer, overwritten); False, adding nothing,
        when it holds NaN/Inf (the caller then separates what was not finite before)."""
        if not delta.size:
            return True
        top = max(-float(delta.min()), float(delta.max()))
        if not math.isfinite(top):
            return False
        self.max_abs = max(self.max_abs, top)
        self.squares.add(delta, top)
        return True

    def add_masked(self, before: np.ndarray, after: np.ndarray) -> None:
        """The slow path (float64 chunks): b − a over the elements finite before; any other NaN/Inf
        breaks the error."""
        keep = np.isfinite(before)
        if not self.add(after[keep] - before[keep]):
            self.broken = True

    def result(self, reference: float | None, numel: int) -> dict[str, float | None]:
        if self.broken:
            return {"mse": None, "max_abs": None, "rel_l2": None, "sqnr_db": None}
        error, size = self.squares.root(), reference or 0.0
        mse = self.squares.value() / numel if numel else 0.0
        rel = error / size if size > 0 else (0.0 if error == 0 else math.inf)
        sqnr = 20 * math.log10(size / error) if error > 0 and size > 0 else None
        return {"mse": _json_float(mse), "max_abs": _json_float(self.max_abs), "rel_l2": _json_float(rel),
                "sqnr_db": sqnr}


@quiet_nan
def compare(before: np.ndarray, after: np.ndarray, bins: int = BINS) -> Comparison:
    """Statistics of both tensors, the error metrics and both histograms.

    Narrow-float sides are counted by bit pattern; the error (and the statistics of other
    sides) come from one chunked pass over the pair. The histograms share the range of both
    tensors' finite values (for chunked sides a min/max scan finds it first) and are None
    when neither has a finite value or `bins` is 0. Shapes must match.
    """
    a_flat, b_flat = _flat(before), _flat(after)
    if a_flat.size != b_flat.size:
        raise ValueError(f"compare: {a_flat.size} elements before, {b_flat.size} after")
    flats = (a_flat, b_flat)
    sides: list[_Patterns | _Moments] = [_Patterns(f) if _countable(f.dtype) else _Moments(f.size) for f in flats]
    low, high = _shared_range(flats, sides) if bins else (math.inf, -math.inf)
    binning = _Binning(low, high, bins) if math.isfinite(low) and math.isfinite(high) else None
    counts = [np.zeros(bins, dtype=np.int64) for _ in flats]
    same, error = a_flat.dtype == b_flat.dtype, _Error()
    with np.errstate(invalid="ignore", over="ignore"):  # inf - inf, huge - -huge: sorted out by _Error
        for start in _chunks(a_flat.size):
            same = _compare_chunk(start, flats, sides, binning, counts, error, same)
    for side, count in zip(sides, counts):
        if binning and isinstance(side, _Patterns):
            count += side.histogram(binning)
    before_stats, after_stats = sides[0].result(), sides[1].result()
    histograms = None if binning is None else {"low": low, "high": high,
                                                "before": counts[0].tolist(), "after": counts[1].tolist()}
    return Comparison(before_stats, after_stats, error.result(before_stats["l2"], a_flat.size), histograms, same)


def _compare_chunk(start: int, flats: Sequence[np.ndarray], sides: Sequence[_Patterns | _Moments],
                   binning: _Binning | None, counts: Sequence[np.ndarray], error: _Error, same: bool) -> bool:
    """One chunk of `compare`'s pass over the pair; whether the bytes are still the same."""
    parts = [f[start:start + CHUNK] for f in flats]
    values = [part if isinstance(side, _Patterns) else _values(part, slot)  # counted sides go straight to float64
              for part, side, slot in zip(parts, sides, "ab")]
    wides = [_wide(value, slot) for value, slot in zip(values, ("wa", "wb"))]
    if not error.add(np.subtract(wides[1], wides[0], out=_buffer("wd", np.float64, wides[0].size))):
        error.add_masked(wides[0], wides[1])
    for side, value, wide, count in zip(sides, values, wides, counts):
        if isinstance(side, _Moments):
            chunk = side.take(value)
            if chunk.dropped:
                wide = _wide(chunk.values, "wf")
            if binning:
                count += binning.count(wide)
            side.add(wide, chunk)
    return same and _same_chunk(*parts)


def _shared_range(flats: Sequence[np.ndarray], sides: Sequence[_Patterns | _Moments]) -> tuple[float, float]:
    """The range of both tensors' finite values (a min/max scan for chunked sides)."""
    low, high = math.inf, -math.inf
    for flat, side in zip(flats, sides):
        if isinstance(side, _Patterns):
            low, high = min(low, side.low), max(high, side.high)
            continue
        for start in _chunks(flat.size):
            chunk = _finite(_values(flat[start:start + CHUNK], "a"))
            low, high = min(low, chunk.low), max(high, chunk.high)
    return low, high


def _same_chunk(a_part: np.ndarray, b_part: np.ndarray) -> bool:
    """Bitwise equality of two chunks of one dtype, compared as unsigned integers of its width."""
    width = a_part.dtype.itemsize
    raw = f"u{width}" if width in (1, 2, 4, 8) else np.uint8
    return bool(np.array_equal(a_part.view(raw), b_part.view(raw)))


def same_bytes(before: np.ndarray, after: np.ndarray) -> bool:
    """Whether two arrays hold the same dtype, shape and bytes (NaN payloads and -0.0 included)."""
    if before.dtype != after.dtype or before.shape != after.shape:
        return False
    a_flat, b_flat = _flat(before), _flat(after)
    return all(_same_chunk(a_flat[i:i + CHUNK], b_flat[i:i + CHUNK]) for i in _chunks(a_flat.size))


@quiet_nan
def error_metrics(before: np.ndarray, after: np.ndarray) -> dict[str, float | None]:
    """What a pipeline did to one tensor: mse, max_abs, rel_l2 = ‖b−a‖/‖a‖, sqnr_db = 10·log10(‖a‖²/‖b−a‖²).

    An unchanged tensor has mse 0 and sqnr None (infinite). Elements that were not finite
    before are left out (the report counts them); a finite value turned non-finite makes
    the error infinite (None in JSON). Shapes must match.
    """
    return compare(before, after, bins=0).error


@quiet_nan
def cosine(before: np.ndarray, after: np.ndarray) -> float | None:
    """Cosine similarity of the two tensors flattened (None when either is all zeros).

    Both are scaled by their largest magnitude first, so huge float64 values cannot overflow.
    """
    a_flat, b_flat = _flat(before), _flat(after)
    chunks = _chunks(a_flat.size)
    a_top = max((float(np.max(np.abs(a_flat[i:i + CHUNK].astype(np.float64)))) for i in chunks), default=0.0)
    b_top = max((float(np.max(np.abs(b_flat[i:i + CHUNK].astype(np.float64)))) for i in chunks), default=0.0)
    if not (0 < a_top < math.inf and 0 < b_top < math.inf):  # all zeros, or NaN/Inf present
        return None
    dot = na = nb = 0.0
    for start in chunks:
        x = a_flat[start:start + CHUNK].astype(np.float64) / a_top
        y = b_flat[start:start + CHUNK].astype(np.float64) / b_top
        dot += float(np.add.reduce(x * y))
        na += float(np.add.reduce(x * x))
        nb += float(np.add.reduce(y * y))
    return _json_float(dot / math.sqrt(na * nb))


def weighted_error(rows: Iterable[dict[str, Any]], worst: int = 5) -> dict[str, Any]:
    """Totals over changed tensors, each weighing by its parameter count: the relative noise
    power Σ nᵢ·rel_l2ᵢ² / Σ nᵢ as `weighted_rel_l2` (its square root) and `weighted_sqnr_db`
    (−20·log10 of it), and the `worst` tensors by rel_l2. A median hides the few tensors
    that break a model; these do not.

    Rows are {"name", "numel", "rel_l2", "sqnr_db"}; rel_l2 None is an infinite error, which
    makes both totals None. With no error at all, weighted_sqnr_db is None (infinite). The rows
    are read once and not kept (8 bytes each), so they may come from a generator.

    >>> totals = weighted_error([{"name": "a", "numel": 3, "rel_l2": 0.2, "sqnr_db": 14.0},
    ...                          {"name": "b", "numel": 1, "rel_l2": 0.0, "sqnr_db": None}])
    >>> round(totals["weighted_rel_l2"], 12)  # √(3·0.2² / 4)
    0.173205080757
    """
    count, infinite, terms = 0, False, array("d")
    ranked: list[tuple[float, int, dict[str, Any]]] = []  # (minus rel_l2, position, row): the worst so far
    for position, r in enumerate(rows):
        count += r["numel"]
        if r["rel_l2"] is None:
            infinite = True
        else:
            terms.append(r["numel"] * r["rel_l2"] ** 2)
        ranked.append((-(math.inf if r["rel_l2"] is None else r["rel_l2"]), position, r))
        if len(ranked) > 2 * worst + 64:
            ranked = sorted(ranked, key=itemgetter(0, 1))[:worst]
    top = [{"name": r["name"], "rel_l2": r["rel_l2"], "sqnr_db": r["sqnr_db"]}
           for *_, r in sorted(ranked, key=itemgetter(0, 1))[:worst]]
    if not count or infinite:
        return {"weighted_rel_l2": 0.0 if not count else None, "weighted_sqnr_db": None, "worst": top}
    power = math.fsum(terms) / count
    return {"weighted_rel_l2": math.sqrt(power),
            "weighted_sqnr_db": -10 * math.log10(power) if power > 0 else None, "worst": top}

