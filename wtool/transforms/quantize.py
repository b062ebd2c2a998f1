"""Min-max fake quantization: snap values to a b-bit grid, stored in the original dtype.

>>> q = Transform.create("quantize", {"bits": "2", "granularity": "tensor"})
>>> q.apply(np.array([[0.0, 0.1, 0.9, 3.0]]), None)
array([[0., 0., 1., 3.]])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wtool.errors import UsageError
from wtool.tensor import TensorInfo
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
        problem = self.problem(TensorInfo(ctx.name if ctx else "?", "F32", array.shape))
        if problem:
            raise UsageError(f"tensor {ctx.name if ctx else '?'!r}: {problem}")
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
        if self.params.scheme == "sym":
            half = 2 ** (self.params.bits - 1) - 1
            scale = np.abs(groups).max(axis=1, keepdims=True) / half
            constant = scale == 0
            scale[constant] = 1
            work = groups / scale
            np.round(work, out=work)
            work *= scale
        else:
            low = groups.min(axis=1, keepdims=True)
            span = groups.max(axis=1, keepdims=True) - low
            constant = span == 0
            span[constant] = 1
            work = groups - low
            work /= span
            work *= levels
            np.round(work, out=work)
            work *= span
            work /= levels
            work += low
        rows = constant.reshape(-1)
        work[rows] = groups[rows]
        return work
