"""Weight standardization: zero mean and unit variance per output slice.

>>> from wtool.transforms import Context, Transform
>>> w = np.array([[1.0, 3.0], [2.0, 2.0]])
>>> out = Transform.create("standardize", {"eps": "0"}).apply(w, Context.of(w))
>>> out[0]
array([-1.,  1.])
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from wtool.transforms._layout import AlongDim, normalize_dim, other_axes
from wtool.transforms.base import Context, param


@dataclass(frozen=True)
class StandardizeParams:
    dim: int | None = param(0, "axis with one mean/variance per slice (0: per output channel); "
                               "none: over the whole tensor")
    eps: float = param(1e-5, "added to the variance before the square root", low=0.0)


class Standardize(AlongDim, name="standardize"):
    """Standardize each slice along `dim` to mean 0 and variance σ²/(σ²+ε) (weight standardization)."""

    Params = StandardizeParams
    formula = "ŵ = (w − μ)/√(σ² + ε), μ and σ² (population) over every axis except dim"
    applies_to = "float tensors with ndim >= 2 that have axis `dim`"
    example = "standardize:dim=0,eps=1e-5"
    spreads_nonfinite = True

    def apply(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        axes = other_axes(array.ndim, normalize_dim(self.params.dim, array.ndim))
        wide = array.astype(np.float64)
        mean = wide.mean(axis=axes, keepdims=True)
        centered = wide - mean
        variance = np.mean(np.square(centered), axis=axes, keepdims=True)
        denominator = np.sqrt(variance + self.params.eps)
        out = np.divide(centered, denominator, out=np.zeros_like(centered), where=denominator > 0)
        return out.astype(array.dtype, copy=False)
