"""What every layer agrees a tensor is, before its bytes are read, and where they are.

>>> TensorInfo("lm_head.weight", "BF16", (32000, 4096)).nbytes
262144000
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from wtool.dtypes import DType, by_code
from wtool.errors import InputError


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


class Stored:
    """A tensor as stored in its input file, not read: where its bytes are (`file`, `offset`),
    `read` for whoever needs its values and `copy`, which copies its bytes to the end of an
    output file and says how many it copied (kernel to kernel: fewer, 0 included, when the
    kernel cannot). A run that only copies a tensor writes it so (`Writer.write`): its bytes
    never pass through the run.

    >>> from wtool.io import open_checkpoint
    >>> with open_checkpoint("fixtures/tiny-llama.safetensors") as reader:
    ...     stored = reader.stored("model.norm.weight")
    ...     stored.where, stored.nbytes, stored.read().nbytes
    ("fixtures/tiny-llama.safetensors: tensor 'model.norm.weight'", 128, 128)
    """

    def __init__(self, info: TensorInfo, file: Path, offset: int, read: Callable[[], np.ndarray],
                 copy: Callable[[BinaryIO], int], where: str) -> None:
        self.info, self.file, self.offset, self.read, self.copy = info, file, offset, read, copy
        self.where = where  # the file and tensor, as errors name them

    @property
    def dtype(self) -> np.dtype:
        return self.info.dtype_info.numpy

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.info.shape)

    @property
    def nbytes(self) -> int:
        return self.info.nbytes

    def __repr__(self) -> str:
        return f"<Stored {self.where} at {self.offset}>"


def values(tensor: np.ndarray | Stored) -> np.ndarray:
    """A tensor's values: an array as it is, a stored tensor read from its file."""
    return tensor.read() if isinstance(tensor, Stored) else tensor


def read_exactly(descriptor: int, buffer: memoryview, offset: int, where: str) -> None:
    """Fill `buffer` with the bytes at `offset` through pread, which sees a file that shrank as a
    short read (a memory map would die of SIGBUS); that is InputError, naming `where`."""
    done = 0
    while done < len(buffer):
        try:
            if hasattr(os, "preadv"):
                count = os.preadv(descriptor, [buffer[done:]], offset + done)
            else:
                data = os.pread(descriptor, len(buffer) - done, offset + done)
                count = len(data)
                buffer[done:done + count] = data
        except OSError as exc:
            raise InputError(f"{where}: cannot read: {exc.strerror or exc}") from None
        if count == 0:
            raise InputError(f"{where}: changed during the run (the file shrank while it was read); "
                             f"nothing was written")
        done += count
