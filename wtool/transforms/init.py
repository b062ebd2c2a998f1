"""Re-initialize tensors: Xavier/Glorot or He/Kaiming draws, or a constant fill.

Fans and gains follow torch.nn.init, so a checkpoint re-initialized here is distributed as
one freshly built by torch; the draws themselves come from `ctx.rng(seed)`, which depends
only on the seed and the tensor's name.

>>> import numpy as np
>>> from wtool.transforms import Context, Transform
>>> step = Transform.create("init", {"scheme": "he", "seed": 1})
>>> zeros = np.zeros((512, 256), np.float32)
>>> w = step.apply(zeros, Context.of(zeros, "fc.weight"))
>>> round(float(w.std()), 3), round((2 / 256) ** 0.5, 3)
(0.088, 0.088)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from wtool.errors import UsageError
from wtool.tensor import TensorInfo
from wtool.transforms.base import Context, Skip, Transform, param

SCHEMES = {"xavier": "xavier", "glorot": "xavier", "he": "he", "kaiming": "he"}
#: torch.nn.init.calculate_gain; leaky_relu depends on its slope and is computed.
GAINS = {"linear": 1.0, "conv1d": 1.0, "conv2d": 1.0, "conv3d": 1.0, "conv_transpose1d": 1.0,
         "conv_transpose2d": 1.0, "conv_transpose3d": 1.0, "sigmoid": 1.0, "tanh": 5.0 / 3,
         "relu": math.sqrt(2.0), "selu": 0.75}
NONLINEARITIES = (*GAINS, "leaky_relu")
DEFAULT_SLOPE = 0.01
#: Options that choose a random scheme; none of them may be given together with `value`.
SCHEME_OPTIONS = ("scheme", "dist", "mode", "gain", "nonlinearity", "negative_slope")


def calculate_gain(nonlinearity: str, negative_slope: float | None = None) -> float:
    """The recommended gain for a nonlinearity, as torch.nn.init.calculate_gain.

    >>> calculate_gain("leaky_relu", 0.2) == (2 / (1 + 0.2 ** 2)) ** 0.5
    True
    """
    if nonlinearity == "leaky_relu":
        slope = DEFAULT_SLOPE if negative_slope is None else negative_slope
        return math.sqrt(2.0 / (1 + slope ** 2))
    if nonlinearity not in GAINS:
        raise UsageError(f"init: unknown nonlinearity {nonlinearity!r}; expected one of "
                         f"{', '.join(NONLINEARITIES)}")
    return GAINS[nonlinearity]


def fans(shape: tuple[int, ...]) -> tuple[int, int]:
    """(fan_in, fan_out) of a weight shaped (out, in, *kernel), as torch computes them.

    >>> fans((64, 3, 7, 7))
    (147, 3136)
    """
    if len(shape) < 2:
        raise UsageError(f"init: fan_in and fan_out need at least 2 dimensions, shape is {list(shape)}")
    receptive = math.prod(shape[2:])
    return shape[1] * receptive, shape[0] * receptive


@dataclass(frozen=True)
class InitParams:
    scheme: str | None = param(None, "xavier (alias glorot; default) or he (alias kaiming)",
                               choices=tuple(SCHEMES))
    dist: str | None = param(None, "normal (default) or uniform with the same variance",
                             choices=("normal", "uniform"))
    mode: str | None = param(None, "He only: keep the variance over fan_in (default) or fan_out",
                             choices=("fan_in", "fan_out"))
    gain: float | None = param(None, "scale of the std (xavier default 1; he default from nonlinearity)",
                               low=0.0, low_open=True)
    nonlinearity: str | None = param(None, "take the gain torch recommends for this activation "
                                     "(he default relu)", choices=NONLINEARITIES)
    negative_slope: float | None = param(None, f"slope of leaky_relu (default {DEFAULT_SLOPE})")
    value: float | None = param(None, "fill with this constant instead (any float tensor; needed for 1-D)")
    seed: int = param(0, "seed of the draws, mixed with each tensor's name", low=0)


class Init(Transform, name="init"):
    """Re-initialize weights: Xavier/He draws with torch's fans and gains, or a constant.

    Xavier: Var = gain² · 2 / (fan_in + fan_out). He: Var = gain² / fan, fan = fan_in or
    fan_out. `dist=uniform` draws from [-√3·std, √3·std]. Fans as torch: a weight shaped
    (out, in, *kernel) has fan_in = in·∏kernel and fan_out = out·∏kernel. The input's
    values are ignored, only its shape and dtype count; the draws depend only on `seed`
    and the tensor's name, so they do not change with tensor order or selection.
    """

    Params = InitParams
    formula = "w' ~ N(0, std²) | U(±√3·std); std = gain·√(2/(fan_in+fan_out)) (xavier) | gain/√fan (he); or w' = value"
    applies_to: ClassVar[str] = "float tensors with ndim >= 2 (1-D and 0-D only with value=)"
    example = "init:scheme=he,nonlinearity=relu,seed=0"

    def check(self) -> None:
        p = self.params
        if p.value is not None:
            given = [name for name in SCHEME_OPTIONS if getattr(p, name) is not None]
            if given:
                raise UsageError(f"init: value={p.value} fills a constant; it takes no "
                                 f"{', '.join(given)} (those choose a random draw)")
            return
        if p.gain is not None and p.nonlinearity is not None:
            raise UsageError("init: give gain or nonlinearity, not both")
        if p.negative_slope is not None and p.nonlinearity != "leaky_relu":
            raise UsageError("init: negative_slope applies only to nonlinearity=leaky_relu")
        if p.mode is not None and self.scheme == "xavier":
            raise UsageError("init: mode is a He (kaiming) option; xavier uses both fans")

    @property
    def scheme(self) -> str:
        return SCHEMES[self.params.scheme or "xavier"]

    @property
    def gain(self) -> float:
        p = self.params
        if p.gain is not None:
            return p.gain
        default = "relu" if self.scheme == "he" else "linear"
        return calculate_gain(p.nonlinearity or default, p.negative_slope)

    def std(self, shape: tuple[int, ...]) -> float:
        """The standard deviation of the draw for a weight of `shape`."""
        fan_in, fan_out = fans(shape)
        if self.scheme == "xavier":
            return self.gain * math.sqrt(2.0 / (fan_in + fan_out))
        fan = fan_out if self.params.mode == "fan_out" else fan_in
        return self.gain / math.sqrt(fan)

    def skip(self, info: TensorInfo) -> Skip | None:
        reason = super().skip(info)
        if reason is not None and not reason.hard and self.params.value is None:
            return Skip(f"{info.ndim}-D tensor has no fan_in/fan_out: give value= to fill it", hard=True)
        return reason

    def apply(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        p = self.params
        if p.value is not None:
            return np.full(array.shape, p.value, dtype=array.dtype)
        if array.size == 0:
            return np.empty(array.shape, dtype=array.dtype)
        try:
            std = self.std(array.shape)
        except UsageError as error:
            raise UsageError(f"{error} (tensor {ctx.name!r}); use value= for it") from None
        rng = ctx.rng(p.seed)
        # numpy draws float32 and float64 (the compute dtypes) natively
        dtype = array.dtype if array.dtype in (np.float32, np.float64) else np.dtype(np.float32)
        if p.dist == "uniform":
            bound = math.sqrt(3.0) * std
            out = rng.random(array.shape, dtype=dtype)
            out *= 2 * bound
            out -= bound
        else:
            out = rng.standard_normal(array.shape, dtype=dtype)
            out *= std
        return out.astype(array.dtype, copy=False)
