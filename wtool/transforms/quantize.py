"""Min-max fake quantization: snap values to a b-bit grid, stored in the original dtype.

>>> q = Transform.create("quantize", {"bits": "2", "granularity": "tensor"})
>>> w = np.array([[0.0, 0.1, 0.9, 3.0]])
>>> q.apply(w, Context.of(w))
array([[0., 0., 1., 3.]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace

import numpy as np

from wtool.errors import UsageError
from wtool.tensor import TensorInfo
from wtool.transforms._mixed import allocate
from wtool.transforms.base import Context, Transform, param

#: Bits stored per grid: a float16 scale, plus a float16 offset (the min) for asym.
GRID_BITS = {"sym": 16, "asym": 32}
#: What bits=auto chooses from, per tensor: (bits, scheme, group size).
AUTO_CHOICES = tuple((bits, scheme, size) for bits in (2, 3, 4, 5, 6, 8) for scheme in ("asym", "sym")
                     for size in (32, 64, 128))


@dataclass(frozen=True)
class QuantizeParams:
    bits: int | str = param(8, "bits per weight: 2^bits grid levels; auto: bits, scheme and group size chosen per "
                            "tensor to meet avg_bits (a fit pass over the selected tensors)", low=2, high=8,
                            fit_when="auto")
    avg_bits: float | None = param(None, "with bits=auto: the most grid bits per weight on average over the selected "
                                   "tensors, float16 scales and offsets counted", low=2.0, high=9.0)
    scheme: str = param("asym", "asym: min-max grid; sym: zero-centred grid, scale = absmax/(2^(b-1)-1)",
                        choices=("asym", "sym"))
    granularity: str = param("auto", "one grid per tensor, per output row (axis 0), or per group; auto: group "
                             "(with a short tail group allowed) when bits <= 4, as 4-bit outliers destroy per-channel "
                             "grids, else channel", choices=("auto", "tensor", "channel", "group"))
    group_size: int = param(128, "weights per group, consecutive along the last axis", low=1)
    remainder: str = param("error", "last axis not divisible by group_size with granularity=group: error, or ok "
                           "(short tail group; always ok for auto)",
                           choices=("error", "ok"))


class Quantize(Transform, name="quantize"):
    """Fake-quantize to a b-bit min-max (asym) or absmax (sym) grid per tensor, channel or group."""

    Params = QuantizeParams
    formula = ("asym: w_q = round((w - min)/(max - min)·(2^b - 1))·(max - min)/(2^b - 1) + min;  "
               "sym: s = absmax/(2^(b-1) - 1), w_q = round(w/s)·s  (round half to even)")
    spreads_nonfinite = True
    example = "quantize:bits=4,granularity=group,group_size=128"

    def check(self) -> None:
        p = self.params
        if isinstance(p.bits, str) and p.bits != "auto":
            raise UsageError(f"quantize: parameter bits={p.bits!r}: expected an int in [2, 8] or auto")
        if (p.bits == "auto") != (p.avg_bits is not None):
            raise UsageError("quantize: bits=auto and avg_bits=B go together (e.g. bits=auto,avg_bits=4.3)")
        defaults = QuantizeParams()
        if p.bits == "auto" and (p.granularity, p.scheme, p.group_size) != \
                (defaults.granularity, defaults.scheme, defaults.group_size):
            raise UsageError("quantize: bits=auto chooses granularity, scheme and group size per tensor; leave them out")

    def fit(self, tensors: Iterable[tuple[TensorInfo, Callable[[], np.ndarray]]]) -> dict[str, Quantize]:
        """bits=auto: each tensor's grid, chosen among `AUTO_CHOICES` (see `_mixed.allocate`)."""
        candidates = [Quantize(replace(self.params, bits=bits, scheme=scheme, granularity="group",
                                       group_size=size, remainder="ok", avg_bits=None))
                      for bits, scheme, size in AUTO_CHOICES]
        return allocate(list(tensors), candidates, self.params.avg_bits)

    def granularity(self) -> str:
        """The granularity in force: `auto` is group for bits <= 4, else channel."""
        p = self.params
        if p.granularity != "auto":
            return p.granularity
        return "group" if p.bits <= 4 else "channel"

    def bits_per_weight(self, shape: tuple[int, ...]) -> float:
        """Grid bits per weight with each grid's float16 scale (and asym's float16 offset) counted:
        4-bit asym groups of 128 cost 4 + 32/128 = 4.25."""
        numel = math.prod(shape)
        if not numel:
            return float(self.params.bits)
        granularity = self.granularity()
        if granularity == "tensor" or len(shape) < 2:
            grids = 1
        elif granularity == "channel":
            grids = shape[0]
        else:
            grids = numel // shape[-1] * math.ceil(shape[-1] / self.params.group_size)
        return self.params.bits + grids * GRID_BITS[self.params.scheme] / numel

    def label(self) -> str:
        """The grid in words, e.g. '4-bit asym group 128'."""
        granularity = self.granularity()
        size = f" {self.params.group_size}" if granularity == "group" else ""
        return f"{self.params.bits}-bit {self.params.scheme} {granularity}{size}"

    def apply(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        p = self.params
        if p.bits == "auto":
            return ctx.state[ctx.name].apply(array, ctx)
        granularity = self.granularity()
        ctx.extras["grid"] = self.label()
        ctx.extras["bits_per_weight"] = self.bits_per_weight(array.shape)
        if array.size == 0:
            return array.copy()
        if granularity in ("tensor", "channel"):
            whole = granularity == "tensor" or array.ndim < 2
            grids = array.reshape(1, -1) if whole else array.reshape(array.shape[0], -1)
            if p.bits <= 4:
                ctx.extras.update(crowding(grids, p.bits, p.scheme))
            return self._snap(grids).reshape(array.shape)
        rows = array.reshape(-1, array.shape[-1])
        width = rows.shape[1]
        full = width - width % p.group_size
        problem = self.problem(TensorInfo(ctx.name, "F32", array.shape))
        if problem:
            raise UsageError(f"tensor {ctx.name!r}: {problem}")
        out = np.empty_like(rows)
        if full:
            head = rows[:, :full].reshape(-1, p.group_size)
            out[:, :full] = self._snap(head).reshape(rows.shape[0], full)
        if full != width:
            out[:, full:] = self._snap(rows[:, full:])
        return out.reshape(array.shape)

    def problem(self, info: TensorInfo) -> str | None:
        p = self.params
        if p.granularity != "group" or p.remainder == "ok" or not info.shape or not info.shape[-1] % p.group_size:
            return None
        width = info.shape[-1]
        return (f"last axis {width} is not divisible by group_size={p.group_size}; pass remainder=ok to "
                f"quantize the tail group of {width % p.group_size} on its own")

    def _snap(self, groups: np.ndarray) -> np.ndarray:
        """Quantize each row of a 2-D array on its own grid."""
        levels = 2 ** self.params.bits - 1
        # One working array, updated in place: peak memory is one extra copy of the tensor.
        out = np.empty_like(groups)
        step = max(1, _BLOCK // max(groups.shape[1], 1))
        spread = np.empty_like(groups[:step])
        for start in range(0, groups.shape[0], step):  # blocks of rows small enough to stay in cache
            block = groups[start:start + step]
            self._snap_block(block, out[start:start + step], spread[:block.shape[0]], levels)
        return out

    def _snap_block(self, groups: np.ndarray, work: np.ndarray, spread: np.ndarray, levels: int) -> None:
        """Quantize rows of `groups` into `work`. Per-row figures are spread to the block's
        shape first (`spread`): whole-block arithmetic is several times faster than broadcasting."""
        if self.params.scheme == "sym":
            half = 2 ** (self.params.bits - 1) - 1
            scale = _row_absmax(groups, work) / half
            constant = scale == 0
            scale[constant] = 1
            np.copyto(spread, scale)
            np.divide(groups, spread, out=work)
            np.round(work, out=work)
            work *= spread
        else:
            low, high = _row_extremes(groups, work)
            span = high - low
            constant = span == 0
            span[constant] = 1
            np.copyto(spread, low)
            np.subtract(groups, spread, out=work)
            np.copyto(spread, span)
            work /= spread
            work *= levels
            np.round(work, out=work)
            work *= spread
            work /= levels
            np.copyto(spread, low)
            work += spread
        rows = constant.reshape(-1)
        if rows.any():
            work[rows] = groups[rows]


def _row_absmax(rows: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """max |w| of each row, as a column. Without the sign bit, float bits order like the
    magnitudes (NaN above inf), and numpy reduces integer rows several times faster than float ones."""
    bits, _ = _int_types(rows.dtype)
    magnitudes = np.bitwise_and(rows.view(bits), np.iinfo(bits).max >> 1, out=scratch.view(bits))
    return magnitudes.max(axis=1, keepdims=True).view(rows.dtype)


def _row_extremes(rows: np.ndarray, scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """min and max of each row, as columns, through integer keys ordered like the floats
    (negative values get their magnitude bits flipped; the map is its own inverse)."""
    _, signed = _int_types(rows.dtype)
    keys = _order_keys(rows.view(signed), scratch.view(signed))
    low, high = keys.min(axis=1, keepdims=True), keys.max(axis=1, keepdims=True)
    return _order_keys(low, low).view(rows.dtype), _order_keys(high, high).view(rows.dtype)


def _order_keys(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    flip = np.right_shift(bits, bits.dtype.itemsize * 8 - 1)  # -1 for negative values, 0 otherwise
    np.bitwise_and(flip, np.iinfo(bits.dtype).max, out=flip)
    return np.bitwise_xor(bits, flip, out=out)


def _int_types(dtype: np.dtype) -> tuple[type, type]:
    return (np.uint64, np.int64) if dtype.itemsize == 8 else (np.uint32, np.int32)


_BLOCK = 1 << 16  # values per block of rows in `_snap`


def crowding(grids: np.ndarray, bits: int, scheme: str) -> dict[str, float]:
    """How few levels the bulk of a grid's values get when outliers set its range: for the row
    of `grids` where ±3σ spans the fewest grid steps, that count (`bulk_levels`) and its
    absmax/σ (`outlier_ratio`), σ = 1.4826·MAD so that the outliers do not inflate it. A
    Gaussian row of 4-bit asym keeps ~13 of 16 levels; a row whose range a 175σ outlier sets
    keeps 1, and the rest of the row is flattened."""
    centre = np.median(grids, axis=1, keepdims=True)
    sigma = 1.4826 * np.median(np.abs(grids - centre), axis=1).astype(np.float64)
    top = np.abs(grids).max(axis=1).astype(np.float64)
    if scheme == "sym":
        step = top / (2 ** (bits - 1) - 1)
    else:
        step = (grids.max(axis=1).astype(np.float64) - grids.min(axis=1)) / (2 ** bits - 1)
    live = (sigma > 0) & (step > 0)
    if not live.any():
        return {}
    levels = np.minimum(np.ceil(6 * sigma[live] / step[live]), 2 ** bits)
    worst = int(levels.argmin())
    return {"bulk_levels": int(levels[worst]), "outlier_ratio": float(top[live][worst] / sigma[live][worst])}
