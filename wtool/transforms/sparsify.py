"""Magnitude sparsification: zero the smallest weights by threshold, fraction or N:M pattern.

>>> w = np.array([[0.1, -0.7, 0.4, 2.0]])
>>> Transform.create("sparsify", {"threshold": "0.5"}).apply(w, Context.of(w))
array([[ 0. , -0.7,  0. ,  2. ]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from wtool.buffers import empty_like
from wtool.errors import UsageError
from wtool.tensor import TensorInfo
from wtool.transforms._rank import chunked_keys, magnitude_keys, select
from wtool.transforms.base import Context, Transform, param

CHUNK = 1 << 17  # elements per chunk of the threshold mask


@dataclass(frozen=True)
class SparsifyParams:
    threshold: float | None = param(None, "zero every |w| < threshold", low=0.0)
    fraction: float | None = param(None, "share of weights set to zero: exactly round(fraction·numel)",
                                   low=0.0, high=1.0, spreads_nonfinite=True)
    scope: str = param("tensor", "fraction per tensor, or one magnitude threshold across all selected tensors",
                       choices=("tensor", "global"), fit_when="global")
    nm: str | None = param(None, "N:M structured sparsity, e.g. 2:4 keeps the 2 largest of every 4 along the last axis",
                           spreads_nonfinite=True)


@dataclass(frozen=True)
class Cutoff:
    """Zero every key below `key`, plus the first `ties` elements equal to it (flat order).

    Keys are float64 bit patterns when `wide`, else float32 ones: all tensors of one global
    selection are ranked in the same precision.
    """

    key: int
    ties: int
    wide: bool = False


class Sparsify(Transform, name="sparsify"):
    """Zero the smallest-magnitude weights: below a threshold, a fraction (per tensor or global), or N:M."""

    Params = SparsifyParams
    formula = ("threshold: w' = w·[|w| >= τ];  fraction: zero the round(f·n) smallest |w| (ties: lowest index first);  "
               "nm=N:M: keep the N largest |w| in every M consecutive along the last axis")
    example = "sparsify:fraction=0.5"

    def check(self) -> None:
        p = self.params
        given = [k for k in ("threshold", "fraction", "nm") if getattr(p, k) is not None]
        if len(given) != 1:
            raise UsageError(f"sparsify: give exactly one of threshold, fraction, nm (got {', '.join(given) or 'none'})")
        if p.scope == "global" and p.fraction is None:
            raise UsageError("sparsify: scope=global needs fraction")
        if p.nm is not None:
            self.pattern()

    def pattern(self) -> tuple[int, int]:
        """(N, M) from the `nm` parameter."""
        text = self.params.nm or ""
        try:
            keep, group = (int(part) for part in text.split(":"))
        except ValueError:
            raise UsageError(f"sparsify: nm={text!r} must look like N:M, e.g. 2:4") from None
        if not 0 < keep <= group:
            raise UsageError(f"sparsify: nm={text!r} needs 0 < N <= M")
        return keep, group

    def fit(self, tensors: Iterable[tuple[TensorInfo, Callable[[], np.ndarray]]]) -> dict[str, Cutoff]:
        """One exact magnitude cutoff across every selected tensor, found by a radix select
        over the float bit patterns (16 bits per pass), so no pass holds more than one tensor."""
        tensors = list(tensors)
        wide = any(info.dtype == "F64" for info, _ in tensors)
        bits = 64 if wide else 32
        total = sum(info.numel for info, _ in tensors)
        target = round(self.params.fraction * total)
        if target == 0:
            return {}
        prefix, below = select(lambda: (magnitude_keys(load(), wide) for _, load in tensors), target, bits)
        ties_left = target - below
        cutoffs = {}
        for info, load in tensors:
            equal = int(np.count_nonzero(magnitude_keys(load(), wide) == prefix))
            take = min(equal, ties_left)
            ties_left -= take
            cutoffs[info.name] = Cutoff(prefix, take, wide)
        return cutoffs

    def apply(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        measure = ctx.measure and array.size > 0  # the energy figures: passes of squares of their own
        if self.params.threshold is not None and measure:  # the sums come with the zeros
            out, sums = _keep_at_least(array, self.params.threshold, energy=True)
            ctx.extras.update(energy_figures(array, out, sums))
            return out
        out = self._zero(array, ctx)
        if measure:
            ctx.extras.update(energy_figures(array, out))
        return out

    def _zero(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        p = self.params
        if array.size == 0:
            return array.copy()
        if p.threshold is not None:
            return _keep_at_least(array, p.threshold)
        if p.nm is not None:
            return self._nm(array, ctx)
        if p.scope == "global":
            cutoff = ctx.state.get(ctx.name) if ctx.state else None
            if cutoff is None:  # nothing to zero anywhere (fraction·numel rounds to 0)
                return array.copy()
            return _zero_below(array, cutoff)
        target = round(p.fraction * array.size)
        if target == 0:
            return array.copy()
        wide = array.dtype == np.float64
        key, below = select(chunked_keys(array, wide), target, 64 if wide else 32)  # no key array of the tensor
        return _zero_below(array, Cutoff(key, target - below, wide))

    def problem(self, info: TensorInfo) -> str | None:
        if self.params.nm is None or not info.shape:
            return None
        group = self.pattern()[1]
        if info.shape[-1] % group:
            return f"last axis {info.shape[-1]} is not divisible by M={group} (nm={self.params.nm})"
        return None

    def _nm(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        keep, group = self.pattern()
        problem = self.problem(TensorInfo(ctx.name, "F32", array.shape))
        if problem:
            raise UsageError(f"tensor {ctx.name!r}: {problem}")
        rows = array.reshape(-1, group)
        order = np.argsort(-np.abs(rows), axis=1, kind="stable")
        drop = np.zeros(rows.shape, dtype=bool)
        np.put_along_axis(drop, order[:, keep:], True, axis=1)
        return np.where(drop, np.zeros((), array.dtype), rows).reshape(array.shape)


def energy_figures(before: np.ndarray, after: np.ndarray,
                   sums: tuple[list[float], list[float]] | None = None) -> dict[str, float]:
    """`energy_kept` = ‖after‖²/‖before‖², and the `knee`: the share of weights with w² below the
    mean w². Zeroing weights up to the knee removes less than its share of the energy; past it,
    every further zero removes more than an average weight carries, so the energy drops sharply
    (for Gaussian weights the knee is 0.68, and zeroing 90 % removes 56 % of the energy).
    Squares are exact float64 ones, summed chunk by chunk in one reused buffer; float32 weights
    are counted against the knee without squaring them (|w| < t, t the least float32 with t² ≥ mean).
    `sums`, when given, are the per-chunk sums of squares of both tensors, taken while they
    were in cache (`_keep_at_least`)."""
    a_flat, b_flat = before.reshape(-1), after.reshape(-1)
    squares = np.empty(min(a_flat.size, CHUNK))

    def chunks(flat: np.ndarray) -> Iterator[np.ndarray]:
        for start in range(0, flat.size, CHUNK):
            yield _squares(flat[start:start + CHUNK], squares)

    before_sums, after_sums = sums or ([float(chunk.sum()) for chunk in chunks(a_flat)], None)
    total = sum(before_sums)
    if not (np.isfinite(total) and total > 0):
        return {"energy_kept": 1.0, "knee": 1.0}
    mean = total / a_flat.size
    kept = sum(after_sums if after_sums is not None else [float(chunk.sum()) for chunk in chunks(b_flat)])
    if a_flat.dtype == np.float32:
        below = _count_below_root(a_flat, mean)
    else:
        below = sum(int(np.count_nonzero(chunk < mean)) for chunk in chunks(a_flat))
    return {"energy_kept": kept / total, "knee": below / a_flat.size}


def _count_below_root(flat: np.ndarray, mean: float) -> int:
    """How many float32 values have w² < mean (squares exact in float64), as |w| < t with t the
    least float32 whose square is at least `mean`: w² grows with |w|, so both counts agree."""
    root = np.float32(math.sqrt(mean))
    while float(root) ** 2 < mean:
        root = np.nextafter(root, np.float32(np.inf))
    while root > 0 and float(np.nextafter(root, np.float32(0))) ** 2 >= mean:
        root = np.nextafter(root, np.float32(0))
    magnitudes = np.empty(min(flat.size, CHUNK), np.float32)
    less = np.empty(magnitudes.size, np.bool_)
    count = 0
    for start in range(0, flat.size, CHUNK):
        part = flat[start:start + CHUNK]
        np.abs(part, out=magnitudes[:part.size])
        count += int(np.count_nonzero(np.less(magnitudes[:part.size], root, out=less[:part.size])))
    return count


def _squares(part: np.ndarray, buffer: np.ndarray) -> np.ndarray:
    """Exact float64 squares of a chunk in `buffer`: a copy squared in place, twice as fast as
    np.square(dtype=float64)."""
    work = buffer[:part.size]
    np.copyto(work, part)
    return np.multiply(work, work, out=work)


def _keep_at_least(array: np.ndarray, threshold: float, energy: bool = False) -> Any:
    """w·[|w| >= τ], NaN and dropped values as +0.0: the bits times a boolean mask, chunk by chunk
    so the mask stays in cache; several times faster than np.where or a masked copy. With
    `energy`, also the sums of squares of each chunk before and after, as `energy_figures`
    takes them, while both chunks are in cache: (out, (before sums, after sums))."""
    bits = np.dtype(f"u{array.dtype.itemsize}")
    flat = np.ascontiguousarray(array).reshape(-1)
    out = empty_like(flat)
    mask = np.empty(min(flat.size, CHUNK), np.bool_)  # bits times bool: no cast of the mask to the bits' width
    squares = np.empty(min(flat.size, CHUNK)) if energy else None
    before_sums: list[float] = []
    after_sums: list[float] = []
    for start in range(0, flat.size, CHUNK):
        part, target = flat[start:start + CHUNK], out[start:start + CHUNK]
        keep = np.greater_equal(np.abs(part, out=target), threshold, out=mask[:part.size])  # NaN: 0
        np.multiply(part.view(bits), keep, out=target.view(bits))
        if squares is not None:  # the kept squares are the squares times the mask: the same numbers
            before_sums.append(float(_squares(part, squares).sum()))
            after_sums.append(float(np.multiply(squares[:part.size], keep, out=squares[:part.size]).sum()))
    out = out.reshape(array.shape)
    return (out, (before_sums, after_sums)) if energy else out


def _zero_below(array: np.ndarray, cutoff: Cutoff) -> np.ndarray:
    """`array` with the values `cutoff` drops set to +0.0 (NaN kept: its key is above any number),
    chunk by chunk: the keys and the mask stay in cache, the bits times the mask go to a
    recycled buffer (`wtool.buffers`), and no key array of the whole tensor is made."""
    bits = np.dtype(f"u{array.dtype.itemsize}")
    flat = np.ascontiguousarray(array).reshape(-1)
    out = empty_like(flat)
    magnitudes = np.empty(min(flat.size, CHUNK), np.float64 if cutoff.wide else np.float32)
    keep = np.empty(magnitudes.size, np.bool_)
    ties = cutoff.ties
    for start in range(0, flat.size, CHUNK):
        part, target = flat[start:start + CHUNK], out[start:start + CHUNK]
        keys = magnitude_keys(part, cutoff.wide, magnitudes)
        kept = np.greater_equal(keys, cutoff.key, out=keep[:part.size])
        if ties:  # the first `ties` keys equal to the cutoff, in flat order, go too
            equal = np.flatnonzero(keys == cutoff.key)[:ties]
            kept[equal] = False
            ties -= equal.size
        np.multiply(part.view(bits), kept, out=target.view(bits))
    return out.reshape(array.shape)
