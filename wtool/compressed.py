"""Compressed checkpoint layouts: the math to write them and a reader that sees through them.

The layouts, all keyed on a weight's name `P.weight`:

- **pack-quantized** (compressed-tensors): `P.weight_packed` I32 [out, ceil(in·b/32)] holding
  q + 2^(b−1), first column in the lowest bits; `P.weight_scale` in the weight's float dtype,
  shape (1,) / (out, 1) / (out, groups); `P.weight_zero_point` only when asymmetric (I32 packed
  the same way along dim 0, [ceil(out·b/32), groups]; a plain int for one scale per tensor);
  `P.weight_shape` I64 [out, in]. Weight = (q − zp)·scale.
- **int-quantized** (compressed-tensors' W8A8, read only): `P.weight` as integers (int8), a float
  `P.weight_scale` as above and `P.weight_zero_point` of the scale's shape when asymmetric.
- **float-quantized**: `P.weight` F8_E4M3 and a float32 `P.weight_scale` (out, 1) or (1,).
- **nvfp4-pack-quantized**: `P.weight_packed` U8 [out, in/2], two FP4 E2M1 values per byte (the
  even column in the low nibble); `P.weight_scale` F8_E4M3 [out, in/16]; `P.weight_global_scale`
  F32 (1,). Weight = fp4·(scale/global_scale).
- **codebook** (wtool's own): `P.weight_indices` U8 (U16 when k > 256) and `P.weight_codebook`
  (k,) in the weight's dtype. Weight = codebook[indices].

>>> pack_int32(np.array([[-8, -7, -6, -5, -4, -3, -2, -1]], dtype=np.int8), 4)
array([[1985229328]], dtype=int32)
>>> unpack_int32(np.array([[52137]], dtype=np.int32), 4, 4)
array([[1, 2, 3, 4]], dtype=int8)
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from wtool.buffers import empty
from wtool.errors import InputError
from wtool.io.base import Reader
from wtool.tensor import Stored, TensorInfo

PACK_BITS = (2, 4, 8)
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448
FP4_MAX = 6.0  # largest float4_e2m1fn
NVFP4_GROUP = 16
QUANTIZATION_CONFIG = "quantization_config"


# ------------------------------------------------------------------ packing

def pack_int32(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack signed `bits`-bit integers [rows, cols] along the last axis into int32 words.

    Each value is stored as q + 2^(bits−1), the first column in the lowest bits; a short last
    word is padded with zero bits (compressed-tensors' `pack_to_int32`).
    """
    if bits not in PACK_BITS:
        raise ValueError(f"packing supports {PACK_BITS} bits, not {bits}")
    per_word, per_byte = 32 // bits, 8 // bits
    rows, cols = q.shape
    width = -(-cols // per_word) * per_word  # values per row, padding included
    # q + 2^(b-1) as bytes (two's complement wraps the same way), then 8/b of them per byte; the
    # host is little-endian (wtool.dtypes), so four bytes in a row are one word, lowest first.
    # The 8/b bytes that make one byte are read as one wider integer w (byte k at bit 8k):
    # w | w >> (8−b) | w >> 2(8−b) ... puts byte k's b bits at bit k·b of the lowest byte, which
    # the cast to uint8 keeps (whole rows at once: no strided lanes). Rows go in blocks that
    # stay in the CPU cache.
    raw = (q if q.dtype == np.int8 else q.astype(np.int8)).view(np.uint8)
    out = np.empty((rows, width // per_byte), dtype=np.uint8)
    step = max(1, _BLOCK // max(width, 1))
    unsigned = np.zeros((min(step, rows), width), dtype=np.uint8)  # the padding columns stay 0
    lanes = np.empty((min(step, rows), width // per_byte), dtype=f"<u{per_byte}")
    gathered = np.empty_like(lanes)
    for start in range(0, rows, step):
        count = min(step, rows - start)
        values, target = unsigned[:count], out[start:start + count]
        np.add(raw[start:start + count], np.uint8(1 << (bits - 1)), out=values[:, :cols])
        if bits == 8:
            target[...] = values
            continue
        wide, work = values.view(lanes.dtype), gathered[:count]
        np.copyto(work, wide)
        for lane in range(1, per_byte):
            work |= np.right_shift(wide, lane * (8 - bits), out=lanes[:count])
        np.copyto(target, work, casting="unsafe")  # the lowest byte of each
    return out.view(np.int32)


def unpack_int32(packed: np.ndarray, bits: int, cols: int) -> np.ndarray:
    """The inverse of `pack_int32`: int8 values [rows, cols] (the padding dropped)."""
    if bits not in PACK_BITS:
        raise ValueError(f"packing supports {PACK_BITS} bits, not {bits}")
    stored = np.ascontiguousarray(packed).view(np.uint8)  # little-endian: each word's bytes, lowest first
    per_byte = 8 // bits
    unsigned = np.empty((stored.shape[0], stored.shape[1] * per_byte), dtype=np.uint8)
    for lane in range(per_byte):
        unsigned[:, lane::per_byte] = (stored >> np.uint8(lane * bits)) & np.uint8((1 << bits) - 1)
    values = unsigned[:, :cols] - np.uint8(1 << (bits - 1))  # wraps to the two's complement of q
    return values.view(np.int8)


def packed_width(cols: int, bits: int) -> int:
    """int32 words per row of `cols` packed `bits`-bit values."""
    return -(-cols * bits // 32)


# ------------------------------------------------------------------ integer grids

@dataclass(frozen=True)
class IntGrid:
    """A signed b-bit integer grid: q in [qmin, qmax], value = (q − zero)·scale.

    `symmetric`: zero = 0 and scale = absmax/divisor with divisor 2^(b−1) − 1 (`full=False`,
    q in [−(2^(b−1)−1), 2^(b−1)−1]) or 2^(b−1) − ½ (`full=True`, compressed-tensors' choice,
    q in [−2^(b−1), 2^(b−1)−1]). Asymmetric: the range [min, max] is first widened to include
    0, scale = (max − min)/(2^b − 1) and zero = round(qmin − min/scale), an integer.
    """

    bits: int
    symmetric: bool
    full: bool = False

    @property
    def qmin(self) -> int:
        return -(1 << (self.bits - 1)) + (1 if self.symmetric and not self.full else 0)

    @property
    def qmax(self) -> int:
        return (1 << (self.bits - 1)) - 1

    def params(self, groups: np.ndarray, scale_dtype: np.dtype) -> tuple[np.ndarray, np.ndarray | None]:
        """Scale (rounded to `scale_dtype`, then float32) and integer zero point (or None) per row."""
        if self.symmetric:
            divisor = (1 << (self.bits - 1)) - (0.5 if self.full else 1.0)
            raw = row_absmax(groups) / np.float32(divisor)
        else:
            low, high = row_extremes(groups)
            low = np.minimum(low, 0)
            raw = (np.maximum(high, 0) - low) / np.float32((1 << self.bits) - 1)
        scale = np.asarray(raw, dtype=np.float32).astype(scale_dtype).astype(np.float32)
        scale[~(scale > 0)] = 1  # an all-zero row (or a scale that underflowed): any scale stores it
        if self.symmetric:
            return scale, None
        zero = np.clip(np.round(self.qmin - low / scale), self.qmin, self.qmax)
        return scale, zero.astype(np.int32)

    def quantize(self, groups: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
                 decoded: np.dtype | type | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """q = clamp(round(w/scale + zero)) as int8, one scale (and zero) per row; half to even.
        With `decoded`, also (q − zero)·scale stored as that dtype, from the same cache block
        (what `dequantize_int` gives)."""
        out = empty(groups.shape, np.int8, "codes")  # pages mapped by the last tensor's (wtool.buffers)
        values = None if decoded is None else empty(groups.shape, decoded, "decoded")
        for rows, cols in _blocks(groups.shape):
            work = groups[rows, cols] / scale[rows, None]
            if zero is not None:
                work += zero[rows, None]
            np.round(work, out=work)
            np.clip(work, self.qmin, self.qmax, out=work)
            out[rows, cols] = work
            if values is not None:
                if zero is not None:
                    work -= zero[rows, None].astype(np.float32)
                work += np.float32(0)  # -0.0 (a negative value rounded to 0) is +0.0 as an integer
                work *= scale[rows, None]
                values[rows, cols] = work
        return out, values


def row_absmax(rows: np.ndarray) -> np.ndarray:
    """max |w| of each row of a float32 array. Without the sign bit, float bits order like the
    magnitudes (NaN above inf), and numpy reduces integer rows faster than float ones."""
    bits = rows.view(np.uint32)
    out = np.empty(rows.shape[0], dtype=np.uint32)
    scratch = np.empty(min(_BLOCK, rows.size), dtype=np.uint32)
    for block, _ in _blocks(rows.shape, whole_rows=True):
        part = bits[block]
        magnitudes = np.bitwise_and(part, np.uint32(0x7FFFFFFF), out=scratch[:part.size].reshape(part.shape))
        magnitudes.max(axis=1, out=out[block])
    return out.view(np.float32)


def row_extremes(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """min and max of each row of a float32 array, through integer keys ordered like the floats
    (a negative value's magnitude bits flipped; the map is its own inverse)."""
    bits = rows.view(np.int32)
    low, high = np.empty(rows.shape[0], dtype=np.int32), np.empty(rows.shape[0], dtype=np.int32)
    scratch = np.empty(min(_BLOCK, rows.size), dtype=np.int32)
    for block, _ in _blocks(rows.shape, whole_rows=True):
        part = bits[block]
        keys = _order_keys(part, scratch[:part.size].reshape(part.shape))
        keys.min(axis=1, out=low[block])
        keys.max(axis=1, out=high[block])
    return _order_keys(low, low).view(np.float32), _order_keys(high, high).view(np.float32)


def _order_keys(bits: np.ndarray, out: np.ndarray) -> np.ndarray:
    flip = np.right_shift(bits, 31)  # -1 for negative values, 0 otherwise
    np.bitwise_and(flip, np.int32(0x7FFFFFFF), out=flip)
    return np.bitwise_xor(bits, flip, out=out)


_BLOCK = 1 << 18  # values per block: 1 MiB float32 working copies stay in the L2 cache, few enough calls to share the GIL


def _blocks(shape: tuple[int, int], whole_rows: bool = False) -> Iterator[tuple[slice, slice]]:
    """(row slice, column slice) blocks of about _BLOCK values covering a rows × values array
    (`whole_rows`: never a part of a row, however long)."""
    rows, width = shape
    if width >= _BLOCK and not whole_rows:
        for row in range(rows):
            for start in range(0, width, _BLOCK):
                yield slice(row, row + 1), slice(start, start + _BLOCK)
        return
    step = max(1, _BLOCK // max(width, 1))
    for start in range(0, rows, step):
        yield slice(start, start + step), slice(None)


def dequantize_int(q: np.ndarray, scale: np.ndarray, zero: np.ndarray | None,
                   dtype: np.dtype | type = np.float32) -> np.ndarray:
    """(q − zero)·scale computed in float32, one scale per row of `q` (rows × values), stored
    as `dtype`: rounded once from float32, as a reader that decodes and then casts gets it.

    >>> dequantize_int(np.array([[-8, 7]], np.int8), np.array([0.5], np.float32), None, ml_dtypes.bfloat16)
    array([[-4, 3.5]], dtype=bfloat16)
    """
    out = np.empty(q.shape, dtype=dtype)
    buffer = None if out.dtype == np.float32 else np.empty(min(_BLOCK, q.size), dtype=np.float32)
    for rows, cols in _blocks(q.shape):
        block = q[rows, cols]
        work = out[rows, cols] if buffer is None else buffer[:block.size].reshape(block.shape)
        work[...] = block
        if zero is not None:
            work -= zero[rows, None].astype(np.float32)
        work *= scale[rows, None].astype(np.float32)
        if buffer is not None:
            out[rows, cols] = work
    return out


def fp8_params(rows: np.ndarray) -> np.ndarray:
    """float32 scale per row so that absmax maps to E4M3's largest finite value (448)."""
    scale = (np.abs(rows).max(axis=1) / np.float32(FP8_MAX)).astype(np.float32)
    scale[~(scale > 0)] = 1
    return scale


def fp8_quantize(rows: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """rows/scale rounded to float8_e4m3fn (saturating at ±448)."""
    return np.clip(rows / scale[:, None], -FP8_MAX, FP8_MAX).astype(ml_dtypes.float8_e4m3fn)


def nvfp4_encode(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """FP4 values [out, in], FP8 scales [out, in/16] and the float32 global scale (1,) of NVFP4.

    global = 448·6/absmax(tensor) puts the largest group scale at FP8's top; each group's scale
    is fp8(absmax(group)/6·global) (0 becomes 0.125, E4M3's epsilon, as compressed-tensors does),
    and values are w/(scale/global) rounded to E2M1, half to even, saturating at ±6.
    """
    out, cols = weight.shape
    groups = weight.reshape(-1, NVFP4_GROUP)
    absmax = np.maximum(groups.max(axis=1), -groups.min(axis=1))
    top = float(absmax.max()) if absmax.size else 0.0
    global_scale = np.array([FP8_MAX * FP4_MAX / top if top > 0 else 1.0], dtype=np.float32)
    raw = np.minimum(absmax / np.float32(FP4_MAX) * global_scale[0], np.float32(FP8_MAX))
    scale = raw.astype(ml_dtypes.float8_e4m3fn)
    scale[scale.astype(np.float32) == 0] = 0.125
    effective = scale.astype(np.float32) / global_scale[0]
    values = np.empty(groups.shape, dtype=ml_dtypes.float4_e2m1fn)
    for rows, _ in _blocks(groups.shape):
        work = groups[rows] / effective[rows, None]
        np.clip(work, -FP4_MAX, FP4_MAX, out=work)
        values[rows] = work.astype(ml_dtypes.float4_e2m1fn)
    return values.reshape(out, cols), scale.reshape(out, cols // NVFP4_GROUP), global_scale


def nvfp4_decode(values: np.ndarray, scale: np.ndarray, global_scale: np.ndarray) -> np.ndarray:
    """fp4·(scale/global) in float32, one scale per 16 values of a row."""
    effective = scale.astype(np.float32).reshape(-1) / global_scale.astype(np.float32).reshape(())
    groups = values.reshape(-1, NVFP4_GROUP)
    return dequantize_int(groups, effective, None).reshape(values.shape)


def pack_fp4(values: np.ndarray) -> np.ndarray:
    """Two float4_e2m1fn values per byte, the even column in the low nibble (E2M1 bits as is)."""
    nibbles = values.view(np.uint8) & np.uint8(0x0F)
    return nibbles[:, 0::2] | (nibbles[:, 1::2] << np.uint8(4))


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
    """The inverse of `pack_fp4`: float4_e2m1fn [rows, 2·bytes]."""
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = packed & np.uint8(0x0F)
    out[:, 1::2] = packed >> np.uint8(4)
    return out.view(ml_dtypes.float4_e2m1fn)


# ------------------------------------------------------------------ schemes and config.json

@dataclass(frozen=True)
class Scheme:
    """How one weight is stored: the `weights` entry of a compressed-tensors config group."""

    format: str            # pack-quantized | float-quantized | codebook
    num_bits: int
    type: str              # int | float
    symmetric: bool
    strategy: str          # tensor | channel | group
    group_size: int | None = None

    def weights(self) -> dict[str, object]:
        weights = {"num_bits": self.num_bits, "type": self.type, "symmetric": self.symmetric,
                   "strategy": self.strategy, "group_size": self.group_size, "dynamic": False,
                   "actorder": None, "block_structure": None, "observer": "minmax"}
        if self.format == "nvfp4-pack-quantized":
            weights["scale_dtype"] = "torch.float8_e4m3fn"
        return weights

    def label(self) -> str:
        if self.format == "codebook":
            return f"codebook, {self.num_bits}-bit indices"
        if self.format == "int-quantized":
            grain = f"group {self.group_size}" if self.strategy == "group" else self.strategy
            return f"int{self.num_bits} {'sym' if self.symmetric else 'asym'} {grain}, unpacked"
        if self.format == "nvfp4-pack-quantized":
            return f"nvfp4 group {self.group_size}"
        kind = "fp8" if self.type == "float" else f"int{self.num_bits}"
        grain = f"group {self.group_size}" if self.strategy == "group" else self.strategy
        return f"{kind} {'sym' if self.symmetric else 'asym'} {grain}"


def module_of(weight: str) -> str | None:
    """`P.weight` -> `P`, the module a loader matches a config group's targets against."""
    return weight[: -len(".weight")] if weight.endswith(".weight") and len(weight) > len(".weight") else None


def quantization_config(stored: Mapping[str, Scheme], ignore: Iterable[str] = ()) -> dict[str, object] | None:
    """The compressed-tensors `quantization_config` for weights stored as `stored` (name -> scheme).

    Each distinct scheme is one config group whose targets are the exact module names;
    codebooks have no compressed-tensors equivalent and are left out.
    """
    groups: dict[Scheme, list[str]] = {}
    for name, scheme in stored.items():
        module = module_of(name)
        if module is not None and scheme.format != "codebook":
            groups.setdefault(scheme, []).append(module)
    if not groups:
        return None
    formats = {scheme.format for scheme in groups}
    config_groups = {
        f"group_{index}": {"targets": targets, "weights": scheme.weights(), "input_activations": None,
                           "output_activations": None, "format": scheme.format}
        for index, (scheme, targets) in enumerate(groups.items())
    }
    return {"quant_method": "compressed-tensors", "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed", "config_groups": config_groups, "ignore": sorted(ignore),
            "kv_cache_scheme": None, "sparsity_config": {}}


# ------------------------------------------------------------------ reading layouts back

@dataclass(frozen=True)
class Layout:
    """One logical weight found in a checkpoint, stored as several tensors."""

    name: str
    scheme: Scheme
    shape: tuple[int, ...]
    dtype: str                    # the float dtype it decompresses to by default
    pieces: tuple[TensorInfo, ...]

    @property
    def stored_bytes(self) -> int:
        return sum(p.nbytes for p in self.pieces)

    @property
    def bits_per_weight(self) -> float:
        numel = int(np.prod(self.shape, dtype=np.int64))
        return self.stored_bytes * 8 / numel if numel else 0.0

    def piece(self, suffix: str) -> TensorInfo | None:
        return next((p for p in self.pieces if p.name == self.name + suffix), None)


def declared_config(reader: Reader) -> dict[str, object] | None:
    """The `quantization_config` of config.json beside the checkpoint, else of its metadata."""
    config = (reader.config() or {}).get(QUANTIZATION_CONFIG)
    if config is None and QUANTIZATION_CONFIG in reader.metadata:
        try:
            config = json.loads(reader.metadata[QUANTIZATION_CONFIG])
        except ValueError:
            raise InputError(f"{reader.path}: metadata {QUANTIZATION_CONFIG} is not JSON") from None
    return config if isinstance(config, dict) else None


def declared_bits(config: Mapping[str, object] | None, module: str | None) -> int | None:
    """`num_bits` of the config group whose targets name `module` (exactly or by `re:`), else
    of the only bit width the config declares; None when it says nothing."""
    groups = [g for g in ((config or {}).get("config_groups") or {}).values()
              if isinstance(g, dict) and isinstance(g.get("weights"), dict)]
    for group in groups:
        for target in group.get("targets") or ():
            if isinstance(target, str) and module is not None and (
                    target == module or (target.startswith("re:") and re.match(target[3:], module))):
                return group["weights"].get("num_bits")
    widths = {g["weights"].get("num_bits") for g in groups}
    return widths.pop() if len(widths) == 1 else None


def find_layouts(reader: Reader) -> list[Layout]:
    """Every compressed weight in `reader`, recognised by names, dtypes and shapes.

    Reads only the tiny `P.weight_shape` tensors; group size and symmetry come from the
    shapes, the bit width from the `quantization_config` where the packed width alone could
    mean two (rows shorter than 32/bits values), so files without a config are read too.
    """
    infos = {t.name: t for t in reader.tensors}
    config = declared_config(reader)
    layouts = []
    for info in reader.tensors:
        if info.name.endswith("_packed") and info.dtype == "I32":
            layouts.append(_packed_layout(reader, infos, info.name[: -len("_packed")], config))
        elif info.name.endswith("_packed") and info.dtype == "U8":
            layouts.append(_nvfp4_layout(infos, info.name[: -len("_packed")]))
        elif info.dtype == "F8_E4M3" and info.name + "_scale" in infos \
                and infos[info.name + "_scale"].dtype_info.is_float:
            layouts.append(_fp8_layout(infos, info))
        elif info.dtype_info.numpy.kind in "iu" and info.name + "_scale" in infos \
                and infos[info.name + "_scale"].dtype_info.is_float:
            layouts.extend(filter(None, [_int_layout(infos, info)]))
        elif info.name.endswith("_indices") and info.name[: -len("_indices")] + "_codebook" in infos:
            layouts.append(_codebook_layout(infos, info.name[: -len("_indices")]))
    return layouts


def _need(infos: Mapping[str, TensorInfo], name: str, where: str) -> TensorInfo:
    if name not in infos:
        raise InputError(f"{where}: packed weight without {name!r}")
    return infos[name]


def _packed_layout(reader: Reader, infos: Mapping[str, TensorInfo], name: str,
                   config: Mapping[str, object] | None) -> Layout:
    where = f"{reader.path}: tensor {name + '_packed'!r}"
    packed = infos[name + "_packed"]
    scale = _need(infos, name + "_scale", where)
    shape_info = _need(infos, name + "_shape", where)
    zero = infos.get(name + "_zero_point")
    if packed.ndim != 2 or shape_info.numel != 2 or shape_info.dtype_info.numpy.kind not in "iu" \
            or not scale.dtype_info.is_float:
        raise InputError(f"{where}: expected packed [out, words], a float scale and a 2-element weight_shape")
    out, cols = (int(v) for v in reader.read(shape_info.name).reshape(-1))
    fitting = [b for b in PACK_BITS if packed_width(cols, b) == packed.shape[1]]
    bits = declared_bits(config, module_of(name))
    if len(fitting) > 1 and bits is None:
        raise InputError(f"{where}: {packed.shape[1]} words per row of {cols} values could be "
                         f"{' or '.join(map(str, fitting))} bits and no {QUANTIZATION_CONFIG} says which")
    bits = bits if bits in fitting else (fitting[0] if len(fitting) == 1 else None)
    if out != packed.shape[0] or bits is None:
        raise InputError(f"{where}: shape {list(packed.shape)} cannot hold weight_shape [{out}, {cols}] "
                         f"at {'/'.join(map(str, PACK_BITS))} bits")
    strategy, group_size = _strategy(scale, out, cols, where)
    pieces = tuple(p for p in (packed, scale, zero, shape_info) if p is not None)
    return Layout(name, Scheme("pack-quantized", bits, "int", zero is None, strategy, group_size),
                  (out, cols), scale.dtype, pieces)


def _nvfp4_layout(infos: Mapping[str, TensorInfo], name: str) -> Layout:
    packed = infos[name + "_packed"]
    scale = _need(infos, name + "_scale", f"tensor {name + '_packed'!r}")
    global_scale = _need(infos, name + "_global_scale", f"tensor {name + '_packed'!r}")
    out, cols = packed.shape[0], packed.shape[1] * 2 if packed.ndim == 2 else 0
    if packed.ndim != 2 or scale.dtype != "F8_E4M3" or scale.shape != (out, cols // NVFP4_GROUP) \
            or cols % NVFP4_GROUP or global_scale.numel != 1:
        raise InputError(f"tensor {name + '_packed'!r}: an nvfp4 weight needs U8 [out, in/2], an F8_E4M3 "
                         f"scale [out, in/16] and a one-value global scale")
    return Layout(name, Scheme("nvfp4-pack-quantized", 4, "float", True, "tensor_group", NVFP4_GROUP),
                  (out, cols), "BF16", (packed, scale, global_scale))


def _fp8_layout(infos: Mapping[str, TensorInfo], weight: TensorInfo) -> Layout:
    scale = infos[weight.name + "_scale"]
    strategy = "tensor" if scale.numel == 1 else "channel"
    if strategy == "channel" and (weight.ndim != 2 or scale.numel != weight.shape[0]):
        raise InputError(f"tensor {weight.name + '_scale'!r}: shape {list(scale.shape)} is neither per tensor nor "
                         f"per output channel of {list(weight.shape)}")
    return Layout(weight.name, Scheme("float-quantized", 8, "float", True, strategy), weight.shape,
                  scale.dtype, (weight, scale))


def _int_layout(infos: Mapping[str, TensorInfo], weight: TensorInfo) -> Layout | None:
    """compressed-tensors' int-quantized layout: `P.weight` as integers (int8 for W8A8), a float
    `P.weight_scale` per tensor, row or group, and `P.weight_zero_point` of the scale's shape
    when asymmetric. Weight = (q − zp)·scale. None when the shapes do not fit it."""
    scale, zero = infos[weight.name + "_scale"], infos.get(weight.name + "_zero_point")
    if weight.ndim != 2 or (zero is not None and (zero.numel != scale.numel or zero.dtype_info.numpy.kind not in "iuf")):
        return None
    out, cols = weight.shape
    try:
        strategy, group_size = _strategy(scale, out, cols, "")
    except InputError:
        return None
    pieces = tuple(p for p in (weight, scale, zero) if p is not None)
    return Layout(weight.name, Scheme("int-quantized", weight.dtype_info.itemsize * 8, "int", zero is None,
                                      strategy, group_size), weight.shape, scale.dtype, pieces)


def _strategy(scale: TensorInfo, out: int, cols: int, where: str) -> tuple[str, int | None]:
    """tensor, channel or group (with its size) from the shape of a [out, cols] weight's scale."""
    if scale.ndim < 2 and scale.numel == 1:
        return "tensor", None
    if scale.ndim == 2 and scale.shape == (out, 1):
        return "channel", None
    if scale.ndim == 2 and scale.shape[0] == out and scale.shape[1] and cols % scale.shape[1] == 0:
        return "group", cols // scale.shape[1]
    raise InputError(f"{where}: scale shape {list(scale.shape)} fits no strategy for [{out}, {cols}]")


def _codebook_layout(infos: Mapping[str, TensorInfo], name: str) -> Layout:
    indices, codebook = infos[name + "_indices"], infos[name + "_codebook"]
    if indices.dtype not in ("U8", "U16") or codebook.ndim != 1 or not codebook.dtype_info.is_float:
        raise InputError(f"tensor {name + '_indices'!r}: a codebook needs U8/U16 indices and a 1-D float codebook")
    bits = 8 if indices.dtype == "U8" else 16
    return Layout(name, Scheme("codebook", bits, "float", False, "tensor"), indices.shape, codebook.dtype,
                  (indices, codebook))


def dequantize(layout: Layout, read: Callable[[str], np.ndarray]) -> np.ndarray:
    """The weight a layout stores, in float32; `read(name)` returns a stored tensor."""
    scheme = layout.scheme
    name = layout.name
    if scheme.format == "codebook":
        codebook = read(name + "_codebook").astype(np.float32)
        indices = read(name + "_indices")
        if indices.size and int(indices.max()) >= codebook.size:
            raise InputError(f"tensor {name + '_indices'!r}: index {int(indices.max())} past the "
                             f"codebook of {codebook.size}")
        return codebook[indices]
    if scheme.format == "nvfp4-pack-quantized":
        return nvfp4_decode(unpack_fp4(read(name + "_packed")), read(name + "_scale"), read(name + "_global_scale"))
    scale = read(name + "_scale").astype(np.float32)
    if scheme.format == "float-quantized":
        weight = read(name).astype(np.float32)
        return weight * (scale.reshape(-1, 1) if scale.size > 1 else scale.reshape(()))
    out, cols = layout.shape
    packed = scheme.format == "pack-quantized"
    q = unpack_int32(read(name + "_packed"), scheme.num_bits, cols) if packed else read(name)
    zero = None
    if not scheme.symmetric:
        stored = read(name + "_zero_point")
        if packed and stored.dtype == np.int32 and scheme.strategy != "tensor":
            zero = unpack_int32(np.ascontiguousarray(stored.T), scheme.num_bits, out).T
        else:
            zero = stored
    groups = scale.size // out if scheme.strategy != "tensor" else 1
    rows = q.reshape(out * groups, -1) if scheme.strategy != "tensor" else q.reshape(1, -1)
    flat_zero = None if zero is None else np.broadcast_to(zero.reshape(-1), (rows.shape[0],))
    flat_scale = np.broadcast_to(scale.reshape(-1), (rows.shape[0],))
    return dequantize_int(rows, flat_scale, flat_zero).reshape(out, cols)


class DecompressedReader(Reader):
    """A checkpoint as its dense weights: each layout is one float tensor, its pieces hidden.

    Tensors that belong to no layout pass through unchanged, but for the integer tensors named in
    `as_float`, read as float32 values. `dtype` (a safetensors code) is the dtype of every
    decompressed weight; None keeps each scale's dtype.
    """

    def __init__(self, inner: Reader, dtype: str | None = None, as_float: Iterable[str] = ()) -> None:
        self.inner = inner
        self.layouts = {layout.name: layout for layout in find_layouts(inner)}
        self.as_float = set(as_float)
        hidden = {p.name for layout in self.layouts.values() for p in layout.pieces}
        first = {layout.pieces[0].name: layout for layout in self.layouts.values()}
        tensors: list[TensorInfo] = []
        for info in inner.tensors:
            owner = first.get(info.name)
            if owner is not None:
                tensors.append(TensorInfo(owner.name, dtype or owner.dtype, owner.shape))
            elif info.name in self.as_float:
                tensors.append(TensorInfo(info.name, "F32", info.shape))
            elif info.name not in hidden:
                tensors.append(info)
        metadata = {k: v for k, v in inner.metadata.items() if k != QUANTIZATION_CONFIG}
        super().__init__(inner.path, tensors, metadata, list(inner.files), inner.stamps)
        self.format = inner.format

    def _read(self, info: TensorInfo) -> np.ndarray:
        layout = self.layouts.get(info.name)
        if layout is None:
            array = self.inner.read(info.name)
            return array.astype(np.float32) if info.name in self.as_float else array
        return dequantize(layout, self.inner.read).astype(info.dtype_info.numpy)

    def stored(self, name: str) -> Stored | None:
        self.info(name)  # a layout's pieces are not this reader's tensors
        return None if name in self.layouts or name in self.as_float else self.inner.stored(name)

    def config(self) -> dict[str, object] | None:
        return self.inner.config()

    def close(self) -> None:
        self.inner.close()


def without_quantization_config(config: Mapping[str, object]) -> dict[str, object]:
    """config.json's content minus its `quantization_config` (what decompress writes)."""
    return {k: v for k, v in config.items() if k != QUANTIZATION_CONFIG}


def config_json(config: Mapping[str, object]) -> bytes:
    """config.json as transformers writes it (indent 2, sorted keys), as bytes."""
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode("utf-8")

