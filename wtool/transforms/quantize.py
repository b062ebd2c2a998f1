"""Min-max quantization: snap values to a b-bit grid, stored in the original dtype (fake
quantization) or in the compressed-tensors layouts that serving stacks load (`storage=packed`).

>>> q = Transform.create("quantize", {"bits": "2", "granularity": "tensor"})
>>> w = np.array([[0.0, 0.1, 0.9, 3.0]])
>>> q.apply(w, Context.of(w))
array([[0., 0., 1., 3.]])
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from wtool.compressed import (
    NVFP4_GROUP,
    PACK_BITS,
    IntGrid,
    Scheme,
    dequantize_int,
    fp8_params,
    fp8_quantize,
    module_of,
    nvfp4_decode,
    nvfp4_encode,
    pack_fp4,
    pack_int32,
    packed_width,
)
from wtool.dtypes import by_code
from wtool.errors import InputError, UsageError
from wtool.tensor import TensorInfo
from wtool.transforms._mixed import allocate
from wtool.transforms.base import Context, Group, Skip, Transform, param

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
    zero: str | None = param(None, "float: the seed formula (offset w_min, the default for fake storage); int: "
                             "the storable integer grid (asym: integer zero point, range widened to include 0; "
                             "the scale rounded to the tensor's dtype; implied by packed storage)",
                             choices=("float", "int"))
    sym_range: str = param("narrow", "sym grid: narrow (q in ±(2^(b-1)-1), scale absmax/(2^(b-1)-1)) or full "
                           "(q in [-2^(b-1), 2^(b-1)-1], scale absmax/(2^(b-1)-0.5), as compressed-tensors)",
                           choices=("narrow", "full"))
    type: str = param("int", "int: a b-bit integer grid; fp8: float8_e4m3fn values times a float32 scale; "
                      "nvfp4: float4_e2m1fn values, an fp8 scale per 16 and a float32 global scale",
                      choices=("int", "fp8", "nvfp4"))
    storage: str | None = param(None, "fake: values stored in the tensor's dtype (default for int); packed: "
                                "the compressed-tensors layout (pack-quantized for int, float-quantized, the "
                                "default, for fp8)", choices=("fake", "packed"))



class Quantize(Transform, name="quantize"):
    """Quantize to a b-bit min-max (asym) or absmax (sym) grid per tensor, channel or group; fake or packed."""

    Params = QuantizeParams
    formula = ("asym: w_q = round((w - min)/(max - min)·(2^b - 1))·(max - min)/(2^b - 1) + min;  "
               "sym: s = absmax/(2^(b-1) - 1), w_q = round(w/s)·s  (round half to even);  "
               "zero=int: s = (max' - min')/(2^b - 1) with [min', max'] ∋ 0, z = round(-2^(b-1) - min'/s), "
               "w_q = (clamp(round(w/s) + z) - z)·s;  fp8: s = absmax/448, w_q = e4m3(w/s)·s")
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
        if p.bits == "auto" and (p.type != "int" or p.storage == "packed"):
            raise UsageError("quantize: bits=auto fakes quantization with int grids; it cannot store packed or fp8")
        if p.bits == "auto":
            return
        if p.type == "nvfp4":
            if p.granularity != "auto" or p.group_size not in (16, 128) or p.bits != 8 or p.scheme != "asym" \
                    or p.zero or p.sym_range != "narrow":
                raise UsageError("quantize: type=nvfp4 is symmetric in groups of 16 (group_size=16 at most); "
                                 "it takes no bits, scheme, zero, sym_range or granularity")
            return
        if p.type == "fp8":
            if self.granularity() == "group" or p.bits != 8 or p.scheme != "asym" or p.zero or p.sym_range != "narrow":
                raise UsageError("quantize: type=fp8 is symmetric with one float32 scale per tensor or channel; "
                                 "it takes no bits, scheme, zero, sym_range or granularity=group")
            return
        if p.zero == "float" and p.sym_range == "full":
            raise UsageError("quantize: sym_range=full is an integer grid; it cannot take zero=float")
        if p.scheme == "asym" and p.sym_range != "narrow":
            raise UsageError("quantize: sym_range= applies to scheme=sym only")
        if not self.packed:
            return
        if p.zero == "float":
            raise UsageError("quantize: storage=packed needs an integer zero point (zero=int), "
                             "the seed's float offset cannot be stored")
        if p.bits not in PACK_BITS:
            raise UsageError(f"quantize: storage=packed supports bits {', '.join(map(str, PACK_BITS))}, not {p.bits}")
        if p.granularity == "group" and p.remainder == "ok":
            raise UsageError("quantize: storage=packed needs whole groups (remainder=error)")

    def fit(self, tensors: Iterable[tuple[TensorInfo, Callable[[], np.ndarray]]]) -> dict[str, Quantize]:
        """bits=auto: each tensor's grid, chosen among `AUTO_CHOICES` (see `_mixed.allocate`)."""
        candidates = [Quantize(replace(self.params, bits=bits, scheme=scheme, granularity="group",
                                       group_size=size, remainder="ok", avg_bits=None))
                      for bits, scheme, size in AUTO_CHOICES]
        return allocate(list(tensors), candidates, self.params.avg_bits)

    @property
    def packed(self) -> bool:
        p = self.params
        return p.storage == "packed" or (p.storage is None and p.type != "int")

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

    def grid(self) -> IntGrid | None:
        """The integer grid, or None for the seed's float-offset formula."""
        p = self.params
        if p.type != "int" or (p.zero != "int" and not self.packed and p.sym_range == "narrow"):
            return None
        return IntGrid(p.bits, p.scheme == "sym", full=p.sym_range == "full")

    # ---- the default rule and the stored layout
    def skip(self, info: TensorInfo) -> Skip | None:
        reason = super().skip(info)
        if not self.packed:
            return reason
        if reason is not None:  # an include cannot lift it: a packed layout needs a 2-D weight
            return Skip(reason.reason, hard=True)
        if info.ndim != 2 or module_of(info.name) is None:
            return Skip("storage=packed stores 2-D module weights named P.weight", hard=True)
        return None

    def scheme_for(self) -> Scheme:
        p = self.params
        if p.type == "nvfp4":
            return Scheme("nvfp4-pack-quantized", 4, "float", True, "tensor_group", NVFP4_GROUP)
        if p.type == "fp8":
            return Scheme("float-quantized", 8, "float", True, self.granularity())
        return Scheme("pack-quantized", p.bits, "int", p.scheme == "sym", self.granularity(),
                      p.group_size if self.granularity() == "group" else None)

    def split(self, info: TensorInfo) -> Group | None:
        if not self.packed:
            return None
        p = self.params
        name, (out, cols) = info.name, info.shape
        if p.type == "nvfp4":
            if cols % NVFP4_GROUP:
                raise UsageError(f"quantize: tensor {name!r}: {cols} columns are not a multiple of 16 (nvfp4)")
            outputs = (TensorInfo(name + "_packed", "U8", (out, cols // 2)),
                       TensorInfo(name + "_scale", "F8_E4M3", (out, cols // NVFP4_GROUP)),
                       TensorInfo(name + "_global_scale", "F32", (1,)))
            return Group((name,), outputs, note=f"{name} stored as {self.scheme_for().label()}",
                         data=self.scheme_for())
        if self.granularity() == "group" and cols % p.group_size:
            raise UsageError(f"quantize: tensor {name!r}: {cols} columns are not divisible by "
                             f"group_size={p.group_size}; packed groups must be whole (or use granularity=channel)")
        per_row = self._scales_per_row(cols)
        scale_shape = (out, per_row) if per_row else (1,)
        if p.type == "fp8":
            outputs = (TensorInfo(name, "F8_E4M3", info.shape), TensorInfo(name + "_scale", "F32", scale_shape))
        else:
            outputs = (TensorInfo(name + "_packed", "I32", (out, packed_width(cols, p.bits))),
                       TensorInfo(name + "_scale", info.dtype, scale_shape))
            if p.scheme == "asym":
                zero_shape = (packed_width(out, p.bits), per_row) if per_row else (1,)
                outputs += (TensorInfo(name + "_zero_point", "I32" if per_row else "I8", zero_shape),)
            outputs += (TensorInfo(name + "_shape", "I64", (2,)),)
        return Group((name,), outputs, note=f"{name} stored as {self.scheme_for().label()}",
                     data=self.scheme_for())

    # ---- the math
    def apply(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        p = self.params
        if p.bits == "auto":
            return ctx.state[ctx.name].apply(array, ctx)
        if p.type == "nvfp4":  # one global scale: the tensor is quantized whole
            if array.shape[-1] % NVFP4_GROUP:
                raise InputError(f"tensor {ctx.name!r}: last axis {array.shape[-1]} is not a "
                                 f"multiple of {NVFP4_GROUP} (nvfp4 groups)")
            values = nvfp4_decode(*nvfp4_encode(array.reshape(-1, array.shape[-1])))
            return values.reshape(array.shape).astype(array.dtype)
        if p.type == "fp8" or self.grid() is not None:  # the grids packed storage can hold
            if array.size == 0:
                return array.copy()
            out = np.empty_like(array)
            for index, groups in self._groups(array, ctx):
                out[index] = self._snap_stored(groups, by_code(ctx.info.dtype).numpy).reshape(out[index].shape)
            return out
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
        if full == width:  # whole groups: snapped straight into the result (over the input the step owns)
            return self._snap(rows.reshape(-1, p.group_size), in_place=ctx.owned).reshape(array.shape)
        out = np.empty_like(rows)
        if full:
            out[:, :full] = self._snap(rows[:, :full].reshape(-1, p.group_size)).reshape(rows.shape[0], full)
        out[:, full:] = self._snap(rows[:, full:])
        return out.reshape(array.shape)

    def problem(self, info: TensorInfo) -> str | None:
        p = self.params
        if p.granularity != "group" or p.remainder == "ok" or not info.shape or not info.shape[-1] % p.group_size:
            return None
        width = info.shape[-1]
        return (f"last axis {width} is not divisible by group_size={p.group_size}; pass remainder=ok to "
                f"quantize the tail group of {width % p.group_size} on its own")

    def apply_split(self, array: np.ndarray, ctx: Context) -> dict[str, np.ndarray]:
        """The pieces of the packed layout (see `split`), by name."""
        return self._encode(array, ctx, decode=False)[0]

    def apply_split_decoded(self, array: np.ndarray, ctx: Context) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """The pieces, and the weight they decode to in the tensor's dtype, from the integer
        (or fp8/fp4) values before packing: the same numbers a reader unpacks."""
        return self._encode(array, ctx, decode=True)

    def _encode(self, array: np.ndarray, ctx: Context, decode: bool) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        p = self.params
        name, (out, cols) = ctx.name, array.shape
        dtype = ctx.info.dtype_info.numpy
        if p.type == "nvfp4":
            values, scale, global_scale = nvfp4_encode(array)
            decoded = nvfp4_decode(values, scale, global_scale).astype(dtype) if decode else None
            return ({name + "_packed": pack_fp4(values), name + "_scale": scale,
                     name + "_global_scale": global_scale}, decoded)
        per_row = self._scales_per_row(cols)
        groups = array.reshape(out * per_row, -1) if per_row else array.reshape(1, -1)
        scale_shape = (out, per_row) if per_row else (1,)
        grid = self.grid()
        if grid is None:  # fp8
            scale = fp8_params(groups)
            values = fp8_quantize(groups, scale)
            decoded = dequantize_int(values, scale, None, dtype).reshape(array.shape) if decode else None
            return {name: values.reshape(array.shape), name + "_scale": scale.reshape(scale_shape)}, decoded
        scale, zero = grid.params(groups, dtype)
        q, decoded = grid.quantize(groups, scale, zero, dtype if decode else None)
        decoded = None if decoded is None else decoded.reshape(array.shape)
        pieces = {name + "_packed": pack_int32(q.reshape(out, cols), p.bits), name + "_scale": scale.reshape(scale_shape)}
        if zero is not None:
            pieces[name + "_zero_point"] = (pack_int32(zero.reshape(out, per_row).T, p.bits).T if per_row
                                            else zero.astype(np.int8))
        pieces[name + "_shape"] = np.array([out, cols], dtype=np.int64)
        return pieces, decoded

    def _scales_per_row(self, cols: int) -> int:
        """Scales per output row of a packed weight: 0 for one per tensor."""
        return {"tensor": 0, "channel": 1, "group": cols // self.params.group_size}[self.granularity()]

    def _groups(self, array: np.ndarray, ctx: Context | None) -> Iterator[tuple[Any, np.ndarray]]:
        """(index into the tensor, 2-D rows that each get one grid) pairs covering `array`."""
        p = self.params
        granularity = self.granularity()
        if granularity == "tensor" or (granularity == "channel" and array.ndim < 2):
            yield ..., array.reshape(1, -1)
            return
        if granularity == "channel":
            yield ..., array.reshape(array.shape[0], -1)
            return
        rows = array.reshape(-1, array.shape[-1])
        width = rows.shape[1]
        full = width - width % p.group_size
        if full != width and p.remainder == "error" and p.granularity == "group":
            name = ctx.name if ctx else "?"
            raise InputError(f"tensor {name!r}: last axis {width} is not divisible by group_size={p.group_size}; "
                             f"pass remainder=ok to quantize the tail group of {width - full} on its own")
        if full:
            yield (..., slice(0, full)), rows[:, :full].reshape(-1, p.group_size)
        if full != width:
            yield (..., slice(full, width)), rows[:, full:]

    def _snap_stored(self, groups: np.ndarray, scale_dtype: np.dtype) -> np.ndarray:
        """Quantize each row of a 2-D array on its own grid; values in the array's dtype."""
        if self.params.type == "fp8":
            scale = fp8_params(groups)
            return (fp8_quantize(groups, scale).astype(np.float32) * scale[:, None]).astype(groups.dtype)
        grid = self.grid()
        if grid is not None:
            scale, zero = grid.params(groups, scale_dtype)
            return grid.quantize(groups, scale, zero, groups.dtype)[1]

    def _snap(self, groups: np.ndarray, in_place: bool = False) -> np.ndarray:
        """Quantize each row of a 2-D array on its own grid, into a new array or, `in_place`,
        over `groups` itself (no second copy of the tensor)."""
        levels = 2 ** self.params.bits - 1
        out = groups if in_place else np.empty_like(groups)
        step = max(1, _BLOCK // max(groups.shape[1], 1))
        spread = np.empty_like(groups[:step])
        for start in range(0, groups.shape[0], step):  # blocks of rows small enough to stay in cache
            block = groups[start:start + step]
            self._snap_block(block, out[start:start + step], spread[:block.shape[0]], levels)
        return out

    def _snap_block(self, groups: np.ndarray, work: np.ndarray, spread: np.ndarray, levels: int) -> None:
        """Quantize rows of `groups` into `work`, which may be `groups` itself. Per-row figures
        are spread to the block's shape first (`spread`, also the scratch of the row ranges):
        whole-block arithmetic is several times faster than broadcasting."""
        if self.params.scheme == "sym":
            half = 2 ** (self.params.bits - 1) - 1
            scale = _row_absmax(groups, spread) / half
            constant = scale == 0
            kept = groups[constant.reshape(-1)]  # rows left as they are: a copy, as `work` may be `groups`
            scale[constant] = 1
            np.copyto(spread, scale)
            np.divide(groups, spread, out=work)
            np.round(work, out=work)
            work *= spread
        else:
            low, high = _row_extremes(groups, spread)
            span = high - low
            constant = span == 0
            kept = groups[constant.reshape(-1)]
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
        if kept.size:
            work[constant.reshape(-1)] = kept


def _row_absmax(rows: np.ndarray, scratch: np.ndarray) -> np.ndarray:
    """max |w| of each row, as a column. Without the sign bit, float bits order like the
    magnitudes (NaN above inf), and numpy reduces integer rows several times faster than float ones."""
    bits, _ = _int_types(rows.dtype)
    magnitudes = np.bitwise_and(rows.view(bits), np.iinfo(bits).max >> 1, out=scratch.view(bits))
    return _per_row(np.maximum, magnitudes).view(rows.dtype)


def _row_extremes(rows: np.ndarray, scratch: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """min and max of each row, as columns, through integer keys ordered like the floats
    (negative values get their magnitude bits flipped; the map is its own inverse)."""
    _, signed = _int_types(rows.dtype)
    keys = _order_keys(rows.view(signed), scratch.view(signed))
    low, high = _per_row(np.minimum, keys), _per_row(np.maximum, keys)
    return _order_keys(low, low).view(rows.dtype), _order_keys(high, high).view(rows.dtype)


def _per_row(reduce: np.ufunc, rows: np.ndarray) -> np.ndarray:
    """`reduce` over each row, as a column: `reduceat` over the flat rows runs ~10% faster than
    `reduce(axis=1)` on short rows such as quantization groups (same values)."""
    if not rows.size:
        return reduce.reduce(rows, axis=1, keepdims=True)
    flat = rows.reshape(-1)
    return reduce.reduceat(flat, np.arange(0, flat.size, rows.shape[1])).reshape(-1, 1)


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
