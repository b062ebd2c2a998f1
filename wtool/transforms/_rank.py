"""Order statistics of magnitudes, exact, without sorting: a radix select over float bit patterns.

The bit pattern of |w| orders like |w| itself (IEEE floats without their sign), so the k-th
smallest magnitude is the k-th smallest unsigned integer key. `select` finds it 16 bits a
pass: a count of each 16-bit digit (`bincount`), then only the keys that share the digits
found so far. It reads its keys through a function it calls once a pass, so a pass holds a
cache-sized slice of one tensor (`chunked_keys`) or one tensor of many (the global sparsity
fit), never a copy of all of them; on a 4096² float32 tensor it took 54 ms where numpy's
partition took 83 ms and `np.percentile` 142 ms, with no 64 MiB key array beside the tensor.

>>> w = np.array([0.5, -2.0, 0.25, 1.0], np.float32)
>>> key, below = select(chunked_keys(w), 3, 32)   # the 3rd smallest |w|, and how many are smaller
>>> float(key_value(key, np.float32)), below
(1.0, 2)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator

import numpy as np

DIGIT = 16  # bits resolved a pass
CHUNK = 1 << 17  # elements of one tensor per slice
SMALL = 1 << 16  # `magnitude_percentile` leaves smaller tensors to np.percentile: a select costs passes


def magnitude_keys(array: np.ndarray, wide: bool, out: np.ndarray | None = None) -> np.ndarray:
    """|w| as unsigned integers ordered like the magnitudes: uint64 from float64 when `wide`,
    else uint32 from float32 (into `out` when given: a float buffer of that width, at least the
    array's size)."""
    flat = np.asarray(array).reshape(-1)
    if out is None:
        magnitudes = np.abs(flat.astype(np.float64 if wide else np.float32, copy=False))
    else:  # |w| of a float32 tensor in a float64 buffer: the cast is exact
        magnitudes = np.abs(flat, out=out[:flat.size])
    return magnitudes.view(np.uint64 if wide else np.uint32)


def chunked_keys(array: np.ndarray, wide: bool = False) -> Callable[[], Iterator[np.ndarray]]:
    """The magnitude keys of `array`, one slice of CHUNK elements at a time, in one reused
    buffer: what `select` reads, a pass at a time."""
    flat = np.asarray(array).reshape(-1)
    buffer = np.empty(min(flat.size, CHUNK), np.float64 if wide else np.float32)

    def slices() -> Iterator[np.ndarray]:
        for start in range(0, flat.size, CHUNK):
            yield magnitude_keys(flat[start:start + CHUNK], wide, buffer)
    return slices


def select(keys: Callable[[], Iterable[np.ndarray]], rank: int, bits: int) -> tuple[int, int]:
    """The `rank`-th smallest key (1-based) among those `keys()` yields, and how many keys are
    smaller than it. `keys` is called once a pass (`bits` / 16 passes) and must yield the same
    keys each time; `rank` is between 1 and their number."""
    prefix, below = 0, 0
    for shift in range(bits - DIGIT, -1, -DIGIT):
        counts = np.zeros(1 << DIGIT, dtype=np.int64)
        for part in keys():
            if shift + DIGIT < bits:
                part = part[(part >> (shift + DIGIT)) == prefix]
            digits = ((part >> shift) & ((1 << DIGIT) - 1)).astype(np.intp)
            counts += np.bincount(digits, minlength=1 << DIGIT)
        running = np.cumsum(counts)
        digit = int(np.searchsorted(running, rank - below, side="left"))
        below += int(running[digit - 1]) if digit else 0
        prefix = (prefix << DIGIT) | digit
    return prefix, below


def key_value(key: int, dtype: type) -> np.floating:
    """The magnitude a key stands for, in its float dtype (float32 for 32-bit keys)."""
    bits = np.uint64 if np.dtype(dtype).itemsize == 8 else np.uint32
    return np.array([key], bits).view(dtype)[0]


def magnitude_percentile(array: np.ndarray, q: float) -> float:
    """`float(np.percentile(np.abs(array), q))` to the bit (numpy's default, linear
    interpolation), without the copy and partition of the whole tensor.

    numpy takes the order statistics of 0-based ranks ⌊g⌋ and ⌊g⌋ + 1, g = (n − 1)·q/100,
    and interpolates between them with weight γ = g − ⌊g⌋. Here `select` finds the two, and
    np.percentile itself interpolates: on the pair [a, b] at 100·γ its weight is γ again
    whenever (100·γ)/100 is γ exactly, which is checked (when it is not, or the tensor is
    small or not float32/float64, the whole tensor goes to np.percentile).

    >>> w = np.linspace(-1, 1, 1 << 17, dtype=np.float32)
    >>> magnitude_percentile(w, 99.9) == float(np.percentile(np.abs(w), 99.9))
    True
    """
    flat = np.asarray(array).reshape(-1)
    index = (flat.size - 1) * (q / 100)
    low = math.floor(index) if flat.size else 0
    weight = (index - low) * 100
    if flat.size < SMALL or flat.dtype not in (np.float32, np.float64) or weight / 100 != index - low:
        return float(np.percentile(np.abs(flat), q))
    wide = flat.dtype == np.float64
    keys, bits = chunked_keys(flat, wide), 64 if wide else 32
    below = key_value(select(keys, low + 1, bits)[0], flat.dtype)
    above = below if low + 1 == flat.size else key_value(select(keys, low + 2, bits)[0], flat.dtype)
    return float(np.percentile(np.array([below, above]), weight))
