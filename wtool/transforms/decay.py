"""One decoupled weight-decay step, optionally with gradients and toward an anchor checkpoint.

w' = w - lr * (g + wd * (w - w_ref)): plain decay shrinks by (1 - lr*wd); with `grads` it is
one SGD step with decoupled decay (AdamW's form, without Adam's moments); with `anchor` the
weights are pulled toward a reference model instead of zero (L2-SP).

>>> import numpy as np
>>> from wtool.transforms import Context, Transform
>>> step = Transform.create("decay", {"lr": "0.5", "wd": "0.2"})
>>> step.apply(np.array([1.0, -2.0], np.float32), Context.of(np.zeros(2, np.float32), "b"))
array([ 0.9, -1.8], dtype=float32)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from wtool.errors import InputError, UsageError
from wtool.transforms.base import Context, Transform, param


@dataclass(frozen=True)
class DecayParams:
    lr: float = param(help="learning rate η (> 0)", low=0.0, low_open=True)
    wd: float = param(0.0, "weight decay λ: w shrinks by lr*wd toward 0 (or toward anchor)", low=0.0)
    grads: str | None = param(None, "checkpoint holding gradients under the same names", kind="checkpoint")
    anchor: str | None = param(None, "reference checkpoint to decay toward (L2-SP) instead of 0",
                               kind="checkpoint")
    missing: str = param("error", "a tensor absent from grads/anchor: error, or zero (no gradient; "
                         "plain decay toward 0)", choices=("error", "zero"))


class Decay(Transform, name="decay"):
    """One decoupled weight-decay step w -= lr·(g + wd·(w - w_ref)), with optional gradients.

    Without `grads` the step is w·(1 - lr·wd). `grads` and `anchor` name checkpoints (any
    supported format) streamed alongside the input, never loaded whole. A selected tensor
    that one of them lacks is an error unless `missing=zero`; a shape mismatch is always an
    error. Applies to every float tensor, biases and norms included.
    """

    Params = DecayParams
    formula = "w' = w - lr·(g + wd·(w - w_ref)); g = 0 without grads, w_ref = 0 without anchor"
    applies_to: ClassVar[str] = "float tensors of any ndim"
    min_ndim = 0
    example = "decay:lr=0.1,wd=0.01"

    def check(self) -> None:
        p = self.params
        if p.grads is None and p.wd == 0:
            raise UsageError("decay: with wd=0 and no grads the step changes nothing; "
                             "give wd > 0 or grads=PATH")
        if p.anchor is not None and p.wd == 0:
            raise UsageError("decay: anchor pulls with strength lr*wd; give wd > 0")

    def _companion(self, role: str, array: np.ndarray, ctx: Context) -> np.ndarray | None:
        path = self.companion_paths()[role]
        other = ctx.companions.get(role)
        if other is None:
            if self.params.missing == "zero":
                return None
            raise InputError(f"decay: tensor {ctx.name!r} has no {_NOUN[role]} in {path} "
                             f"(missing=zero treats it as zero)")
        if other.shape != array.shape:
            raise InputError(f"decay: tensor {ctx.name!r} has shape {list(array.shape)} but its "
                             f"{_NOUN[role]} in {path} has shape {list(other.shape)}")
        return other

    def apply(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        p = self.params
        shrink = p.lr * p.wd
        out = np.multiply(array, array.dtype.type(1.0 - shrink), out=ctx.output(array))
        if p.anchor is not None:
            reference = self._companion("anchor", array, ctx)
            if reference is not None:
                out += array.dtype.type(shrink) * reference.astype(array.dtype, copy=False)
        if p.grads is not None:
            gradient = self._companion("grads", array, ctx)
            if gradient is not None:
                out -= array.dtype.type(p.lr) * gradient.astype(array.dtype, copy=False)
        return out


_NOUN = {"grads": "gradient", "anchor": "anchor tensor"}
