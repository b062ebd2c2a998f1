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
A role can be `share`d: its buffers are then shared memory (a Linux memfd each) that the
statistics process maps (`wtool.measure`), and two are kept, one for that process to read.

>>> first = empty((1 << 20,), np.float32, "doc"); address = first.ctypes.data
>>> del first
>>> empty((1 << 20,), np.float32, "doc").ctypes.data == address   # the same pages again
True
"""

from __future__ import annotations

import itertools
import math
import mmap
import os
import sys
import threading
import weakref
from dataclasses import dataclass

import numpy as np

KEEP = 1  # buffers kept per role: at most one idle buffer, the size of the largest array
SMALL = 1 << 20  # smaller arrays come from numpy: malloc reuses their pages anyway

_pools: dict[str, list[np.ndarray]] = {}
_lock = threading.Lock()
_shared_roles: dict[str, int] = {}  # role -> buffers kept, while its buffers are shared memory (`share`)


@dataclass(frozen=True)
class SharedFile:
    """Where a shared buffer lives: its memfd (open while the buffer is), its size and a serial
    number no other buffer of this process gets."""

    fd: int
    size: int
    serial: int


_shared: dict[int, SharedFile] = {}  # address of a shared buffer's first byte -> its file
_serials = itertools.count(1)


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
        buffer = _shared_buffer(size) if role in _shared_roles else np.empty(size, np.uint8)
        if len(pool) >= _shared_roles.get(role, KEEP):
            if idle is None:
                return buffer.view(dtype).reshape(shape)  # every kept buffer in use: this one is not kept
            del pool[idle]  # an unused one too small: replaced by the larger one
        pool.append(buffer)
        return buffer.view(dtype).reshape(shape)


def share(role: str, keep: int = 2) -> None:
    """From now on, large buffers of `role` are shared memory, one Linux memfd each, that another
    process can map (`shared_file`), and `keep` of them are kept: while that process reads one,
    the next tensor uses another. The buffers kept so far are forgotten (their arrays stay valid)."""
    with _lock:
        _shared_roles[role] = keep
        _pools.pop(role, None)


def unshare(role: str) -> None:
    """Back to private buffers for `role`; the shared ones are freed once nothing holds them."""
    with _lock:
        _shared_roles.pop(role, None)
        _pools.pop(role, None)


def shared_file(array: np.ndarray) -> tuple[SharedFile, int] | None:
    """The shared buffer `array` lies in and the offset of its first byte there, else None."""
    base = array
    while isinstance(base, np.ndarray) and base.base is not None and isinstance(base.base, np.ndarray):
        base = base.base
    found = _shared.get(base.__array_interface__["data"][0]) if isinstance(base, np.ndarray) else None
    if found is None:
        return None
    return found, array.__array_interface__["data"][0] - base.__array_interface__["data"][0]


def alive(serial: int) -> bool:
    """Whether the shared buffer of this serial number still exists."""
    return any(file.serial == serial for file in list(_shared.values()))


def _shared_buffer(size: int) -> np.ndarray:
    """A buffer in a new memfd; a private one when the kernel will not make it (the pair then
    goes through the statistics process's own slot)."""
    try:
        fd = os.memfd_create("wtool-buffer")
    except OSError:
        return np.empty(size, np.uint8)
    try:
        os.ftruncate(fd, size)
        buffer = np.frombuffer(mmap.mmap(fd, size), np.uint8)
    except OSError:
        os.close(fd)
        return np.empty(size, np.uint8)
    address = buffer.__array_interface__["data"][0]
    _shared[address] = file = SharedFile(fd, size, next(_serials))
    weakref.finalize(buffer, _release, address, file)
    return buffer


def _release(address: int, file: SharedFile) -> None:
    if _shared.get(address) is file:
        del _shared[address]
    os.close(file.fd)
