"""Min-max fake quantization: snap values to a b-bit grid, stored in the original dtype.

>>> q = Transform.create("quantize", {"bits": "2", "granularity": "tensor"})
>>> q.apply(np.array([[0.0, 0.1, 0.9, 3.0]]), None)
array([[0., 0., 1., 3.]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wtool.errors import InputError
from wtool.transforms.base import Context, Transform, param


@dataclass(frozen=True)
class QuantizeParams:
    bits: int = param(8, "bits per weight: 2^bits grid levels", low=2, high=8)
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

    def granularity(self) -> str:
        """The granularity in force: `auto` is group for bits <= 4, else channel."""
        p = self.params
        if p.granularity != "auto":
            return p.granularity
        return "group" if p.bits <= 4 else "channel"

    def apply(self, array: np.ndarray, ctx: Context | None) -> np.ndarray:
        p = self.params
        granularity = self.granularity()
        if array.size == 0:
            return array.copy()
        if granularity == "tensor" or (granularity == "channel" and array.ndim < 2):
            return self._snap(array.reshape(1, -1)).reshape(array.shape)
        if granularity == "channel":
            return self._snap(array.reshape(array.shape[0], -1)).reshape(array.shape)
        rows = array.reshape(-1, array.shape[-1])
        width = rows.shape[1]
        full = width - width % p.group_size
        if full != width and p.remainder == "error" and p.granularity == "group":
            name = ctx.name if ctx else "?"
            raise InputError(f"tensor {name!r}: last axis {width} is not divisible by group_size={p.group_size}; "
                             f"pass remainder=ok to quantize the tail group of {width - full} on its own")
        out = np.empty_like(rows)
        if full:
            head = rows[:, :full].reshape(-1, p.group_size)
            out[:, :full] = self._snap(head).reshape(rows.shape[0], full)
        if full != width:
            out[:, full:] = self._snap(rows[:, full:])
        return out.reshape(array.shape)

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
