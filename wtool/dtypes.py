"""The one map between safetensors dtype codes, numpy/ml_dtypes dtypes and byte sizes.

numpy has no bfloat16 or float8; ml_dtypes supplies them as real numpy dtypes.

>>> by_code("BF16").numpy
dtype(bfloat16)
>>> by_numpy(np.dtype("float32")).code
'F32'
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from wtool.buffers import empty
from wtool.errors import UsageError

if sys.byteorder != "little":  # native dtypes below are the little-endian file layout
    raise ImportError("wtool supports little-endian hosts only")


@dataclass(frozen=True)
class DType:
    """One storage dtype: its safetensors code, numpy dtype and the name users type."""

    code: str
    numpy: np.dtype
    user_name: str

    @property
    def itemsize(self) -> int:
        return self.numpy.itemsize

    @property
    def is_float(self) -> bool:
        return self.numpy.kind == "f" or self.code in {"BF16", "F8_E4M3", "F8_E5M2"}

    @property
    def compute(self) -> np.dtype:
        """Transforms compute in float32, except that float64 stays float64."""
        return np.dtype(np.float64) if self.code == "F64" else np.dtype(np.float32)


_ALL = [
    DType("F64", np.dtype(np.float64), "float64"),
    DType("F32", np.dtype(np.float32), "float32"),
    DType("F16", np.dtype(np.float16), "float16"),
    DType("BF16", np.dtype(ml_dtypes.bfloat16), "bfloat16"),
    DType("F8_E4M3", np.dtype(ml_dtypes.float8_e4m3fn), "float8_e4m3fn"),
    DType("F8_E5M2", np.dtype(ml_dtypes.float8_e5m2), "float8_e5m2"),
    DType("I64", np.dtype(np.int64), "int64"),
    DType("I32", np.dtype(np.int32), "int32"),
    DType("I16", np.dtype(np.int16), "int16"),
    DType("I8", np.dtype(np.int8), "int8"),
    DType("U64", np.dtype(np.uint64), "uint64"),
    DType("U32", np.dtype(np.uint32), "uint32"),
    DType("U16", np.dtype(np.uint16), "uint16"),
    DType("U8", np.dtype(np.uint8), "uint8"),
    DType("BOOL", np.dtype(np.bool_), "bool"),
]
DTYPES: dict[str, DType] = {d.code: d for d in _ALL}
_BY_NUMPY = {d.numpy: d for d in _ALL}
_BY_USER_NAME = {d.user_name: d for d in _ALL}


def by_code(code: str) -> DType:
    """The dtype for a safetensors code; KeyError for unknown codes (readers turn that into InputError)."""
    return DTYPES[code]


def by_numpy(dtype: np.dtype) -> DType:
    """The dtype for a numpy dtype, byte order ignored; KeyError when safetensors cannot store it."""
    return _BY_NUMPY[np.dtype(dtype).newbyteorder("=")]


def by_user_name(name: str) -> DType:
    """Resolve what a user typed (`bfloat16`, `bf16`, `F16`...) for a `cast` step."""
    key = name.strip()
    aliases = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32",
               "float": "float32", "fp64": "float64", "double": "float64",
               "fp8_e4m3": "float8_e4m3fn", "float8_e4m3": "float8_e4m3fn", "fp8_e5m2": "float8_e5m2"}
    key = aliases.get(key.lower(), key)
    if key in _BY_USER_NAME:
        return _BY_USER_NAME[key]
    if key.upper() in DTYPES:
        return DTYPES[key.upper()]
    raise UsageError(f"unknown dtype {name!r}; expected one of {', '.join(_BY_USER_NAME)}")


def to_storage(array: np.ndarray, dtype: DType) -> np.ndarray:
    """Return `array` as `dtype`, C-contiguous and little-endian: the only form writers accept.

    safetensors' numpy writer copies raw memory, so a transposed, reversed-stride or
    big-endian array would otherwise be written as the wrong bytes. A conversion goes into the
    pages of the last tensor stored (`convert_into`: twice as fast as astype for bfloat16).
    """
    array = np.asarray(array)
    if array.dtype == dtype.numpy:
        return np.ascontiguousarray(array).reshape(array.shape)  # ascontiguousarray makes 0-d 1-d
    return convert_into(array, empty(array.shape, dtype.numpy, "stored"))


def convert_into(array: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Convert `array` into the buffer `out` (same shape; exact when `out` is a wider float) and return `out`.

    A cast into a buffer the caller reuses skips the page faults of a fresh array: ml_dtypes'
    bfloat16 -> float32 cast then runs at 12-14 G values/s in cache, faster than the
    equivalent 16-bit shift of the bits in numpy, and releases the GIL.

    >>> convert_into(np.array([1.5, -2.0], ml_dtypes.bfloat16), np.empty(2, np.float32))
    array([ 1.5, -2. ], dtype=float32)
    """
    np.copyto(out, array, casting="unsafe")
    return out


def convert(array: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """`array` as `dtype`: itself when it already is, else a new array (see `convert_into`;
    empty + copyto is twice as fast as astype for bfloat16), in the pages the last conversion
    used once no array holds them (`wtool.buffers`): a step's bfloat16 input becomes float32
    without page faults, never through float64."""
    array = np.asarray(array)
    if array.dtype == dtype:
        return array
    return convert_into(array, empty(array.shape, dtype, "convert"))
