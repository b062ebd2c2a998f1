"""Cast: change a tensor's storage dtype, refusing silent overflow.

>>> Transform.create("cast", {"dtype": "bfloat16"}).output_dtype("F32")
'BF16'
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np

from wtool.dtypes import by_user_name
from wtool.errors import InputError
from wtool.transforms.base import Context, Transform, param

FLOAT_TARGETS = ("float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2")


@dataclass(frozen=True)
class CastParams:
    dtype: str = param(help="target storage dtype", choices=FLOAT_TARGETS)
    saturate: bool = param(False, "clamp values beyond the target's finite range (and ±inf) to ±max instead of failing")


class Cast(Transform, name="cast"):
    """Store float tensors in another float dtype; out-of-range values fail unless saturate=true."""

    Params = CastParams
    formula = "w' = round_to_dtype(w); |w| > finfo(dtype).max is an error (saturate: clamp to ±max)"
    applies_to = "float tensors of any shape"
    min_ndim = 0
    example = "cast:dtype=bfloat16"

    def output_dtype(self, dtype: str) -> str:
        return by_user_name(self.params.dtype).code

    def apply(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        target = by_user_name(self.params.dtype).numpy
        limit = float(ml_dtypes.finfo(target).max)
        if self.params.saturate:
            array = np.clip(array, -limit, limit)
        else:
            # NaN is representable everywhere; ±inf only where the target has an inf.
            has_inf = bool(np.isinf(np.array(np.inf, dtype=np.float64).astype(target)))
            finite = np.isfinite(array)
            over = int(np.count_nonzero(finite & (np.abs(array) > limit)))
            over += 0 if has_inf else int(np.count_nonzero(np.isinf(array)))
            if over:
                raise InputError(f"tensor {ctx.name!r}: {over} value(s) outside {self.params.dtype}'s range "
                                 f"±{limit:g}; pass saturate=true to clamp them")
        with np.errstate(invalid="ignore"):  # a signalling NaN stays a NaN; no warning for it
            stored = array.astype(target)
        ctx.extras.update(flushed(array, stored))
        return stored.astype(array.dtype)


def flushed(before: np.ndarray, stored: np.ndarray) -> dict[str, int]:
    """Non-zero values the target dtype turned into zeros (`flushed_to_zero`) or into subnormals
    (`subnormal`, with fewer significant bits than the dtype's normal numbers)."""
    smallest = float(ml_dtypes.finfo(stored.dtype).smallest_normal)
    magnitude = np.abs(stored.astype(np.float32))
    nonzero = before != 0
    return {"flushed_to_zero": int(np.count_nonzero(nonzero & (magnitude == 0))),
            "subnormal": int(np.count_nonzero((magnitude > 0) & (magnitude < smallest)))}
