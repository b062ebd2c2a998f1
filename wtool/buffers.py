"""Large arrays whose pages are already mapped: a tensor read, a transform's result, reused once nobody holds it.

A fresh array of tens of MiB costs the kernel a page fault (and zeroing) per page on its
first write; a numpy ufunc writing into it runs at about half the speed it reaches on pages
already mapped, and a read into it at a fraction of the page cache's speed; with `--jobs`,
threads that fault and unmap pages at once also wait for each other in the kernel. `empty`
hands out a view of a buffer used before for the same `role` when no array made from it is
alive any more: every view holds a reference to its buffer, so the buffer's reference count
says when the last one died (checked and taken under a lock, so two threads never take one
buffer). At most `KEEP` buffers are kept per role (an idle one costs at most the largest
array of that role), so the next tensor lands in the pages the previous one used.

>>> first = empty((1 << 20,), np.float32, "doc"); address = first.ctypes.data
>>> del first
>>> empty((1 << 20,), np.float32, "doc").ctypes.data == address   # the same pages again
True
"""

from __future__ import annotations

import math
import sys
import threading

import numpy as np

KEEP = 1  # buffers kept per role: at most one idle buffer, the size of the largest array
SMALL = 1 << 20  # smaller arrays come from numpy: malloc reuses their pages anyway

_pools: dict[str, list[np.ndarray]] = {}
_lock = threading.Lock()


def empty_like(array: np.ndarray, role: str = "output") -> np.ndarray:
    """An uninitialised C-contiguous array of `array`'s shape and dtype (see `empty`)."""
    return empty(array.shape, array.dtype, role)


def empty(shape: tuple[int, ...], dtype: np.dtype | type, role: str) -> np.ndarray:
    """An uninitialised C-contiguous array, in a recycled buffer of `role` when it is large."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    if size < SMALL:
        return np.empty(shape, dtype)
    with _lock:
        pool = _pools.setdefault(role, [])
        idle = None
        for index in range(len(pool)):  # indexing, not iterating: a loop variable would hold a reference
            if sys.getrefcount(pool[index]) == 2:  # held by the list and getrefcount's argument: unused
                if pool[index].nbytes >= size:
                    return pool[index][:size].view(dtype).reshape(shape)
                idle = index
        buffer = np.empty(size, np.uint8)
        if len(pool) >= KEEP:
            if idle is None:
                return buffer.view(dtype).reshape(shape)  # every kept buffer in use: this one is not kept
            del pool[idle]  # an unused one too small: replaced by the larger one
        pool.append(buffer)
        return buffer.view(dtype).reshape(shape)
