"""What every layer agrees a tensor is, before its bytes are read.

>>> TensorInfo("lm_head.weight", "BF16", (32000, 4096)).nbytes
262144000
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from wtool.dtypes import DType, by_code


@dataclass(frozen=True, slots=True)
class TensorInfo:
    """Name, safetensors dtype code and shape of one tensor."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def dtype_info(self) -> DType:
        return by_code(self.dtype)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype_info.itemsize

    @property
    def ndim(self) -> int:
        return len(self.shape)
