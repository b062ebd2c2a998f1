"""Output arrays whose pages are already mapped: a transform's result, reused once nobody holds it.

A fresh array of tens of MiB costs the kernel a page fault (and zeroing) per page on its
first write; a numpy ufunc writing into it runs at about half the speed it reaches on pages
already mapped (a numpy copy hides most of that cost). `empty_like` hands out a view of a
buffer this thread used before when no array made from it is alive any more: every view
holds a reference to its buffer, so the buffer's reference count says when the last one
died. Each thread keeps at most `KEEP` buffers (an idle one costs at most the largest
output), and the next tensor's output lands in the pages the previous one used.

>>> first = empty_like(np.zeros(4, np.float32)); address = first.ctypes.data
>>> del first
>>> empty_like(np.zeros(4, np.float32)).ctypes.data == address   # the same pages again
True
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

KEEP = 1  # buffers kept per thread: one idle buffer at most, the size of the largest output
SMALL = 1 << 20  # smaller arrays come from numpy: malloc reuses their pages anyway

_local = threading.local()


def empty_like(array: np.ndarray, dtype: np.dtype | type | None = None) -> np.ndarray:
    """An uninitialised C-contiguous array of `array`'s shape (and `dtype`, default its own)."""
    dtype = np.dtype(array.dtype if dtype is None else dtype)
    size = math.prod(array.shape) * dtype.itemsize
    if size < SMALL:
        return np.empty(array.shape, dtype)
    pool: list[np.ndarray] = _local.__dict__.setdefault("pool", [])
    for buffer in pool:  # (not enumerate: its cached tuple would hold one more reference)
        # held by the list, the loop variable and getrefcount's argument: no array uses it
        if sys.getrefcount(buffer) == 3 and buffer.nbytes >= size:
            return buffer[:size].view(dtype).reshape(array.shape)
    buffer = np.empty(size, np.uint8)
    free = [i for i, kept in enumerate(pool) if sys.getrefcount(kept) == 3]
    if len(pool) >= KEEP:
        if not free:
            return buffer.view(dtype).reshape(array.shape)  # all in use: this one is not kept
        del pool[free[0]]  # a free one too small for this size: replaced by the larger one
    pool.append(buffer)
    return buffer.view(dtype).reshape(array.shape)
