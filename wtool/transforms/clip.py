"""Clipping: bound every weight to [-c, c] (or [min, max]).

>>> w = np.array([-3.0, 0.5, 2.0])
>>> Transform.create("clip", {"c": "1.5"}).apply(w, Context.of(w))
array([-1.5,  0.5,  1.5])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wtool.errors import UsageError
from wtool.transforms._rank import magnitude_percentile
from wtool.transforms.base import Context, Transform, param


@dataclass(frozen=True)
class ClipParams:
    c: float | None = param(None, "symmetric bound: clip to [-c, c]", low=0.0)
    min: float | None = param(None, "lower bound (with or without max)")
    max: float | None = param(None, "upper bound (with or without min)")
    percentile: float | None = param(None, "c = this percentile of |w| per tensor (numpy linear interpolation)",
                                     low=0.0, high=100.0, spreads_nonfinite=True)
    sigma: float | None = param(None, "c = sigma · std(w) per tensor (population std)", low=0.0,
                                spreads_nonfinite=True)


class Clip(Transform, name="clip"):
    """Clip weights to [-c, c]; c fixed, a percentile of |w|, or k standard deviations."""

    Params = ClipParams
    formula = "w' = min(max(w, -c), c)"
    example = "clip:percentile=99.9"

    def check(self) -> None:
        p = self.params
        modes = [name for name, given in (("c", p.c is not None),
                                          ("min/max", p.min is not None or p.max is not None),
                                          ("percentile", p.percentile is not None),
                                          ("sigma", p.sigma is not None)) if given]
        if len(modes) != 1:
            raise UsageError(f"clip: give exactly one of c, min/max, percentile, sigma (got {', '.join(modes) or 'none'})")
        if p.min is not None and p.max is not None and p.min > p.max:
            raise UsageError(f"clip: min={p.min} is greater than max={p.max}")

    def bounds(self, array: np.ndarray) -> tuple[float | None, float | None]:
        """The (low, high) interval for this tensor."""
        p = self.params
        if p.c is not None:
            return -p.c, p.c
        if p.percentile is not None:
            c = magnitude_percentile(array, p.percentile)
            return -c, c
        if p.sigma is not None:
            c = p.sigma * float(np.std(array, dtype=np.float64))
            return -c, c
        return p.min, p.max

    def apply(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        if array.size == 0:
            return array.copy()
        low, high = self.bounds(array)
        with np.errstate(over="ignore"):  # bounds beyond the dtype's range become ±inf, as numpy casts them
            low, high = (None if v is None else array.dtype.type(v) for v in (low, high))
        # scalars of the array's dtype take numpy's fast path; pages already mapped double its speed
        return np.clip(array, low, high, out=ctx.output(array))
