"""dtypes: the conversion helpers against ml_dtypes' own casts."""

import ml_dtypes
import numpy as np
import pytest

from wtool.dtypes import convert, convert_into


def test_bfloat16_widens_exactly_for_every_bit_pattern():
    """bfloat16 is the upper half of a float32: widening must be the 16-bit shift of the bits."""
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got = convert_into(every.view(ml_dtypes.bfloat16), np.empty(every.size, np.float32))
    assert np.array_equal(got.view(np.uint32), every.astype(np.uint32) << 16)  # NaN payloads, -0.0 included


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.bfloat16])
def test_convert_keeps_shape_and_values(dtype):
    values = np.random.default_rng(0).normal(size=(3, 5)).astype(dtype)
    got = convert(values.T, np.dtype(np.float32))  # a non-contiguous view
    assert got.shape == (5, 3) and np.array_equal(got, values.T.astype(np.float32))


def test_convert_returns_the_array_itself_when_it_has_the_dtype():
    values = np.ones(4, np.float32)
    assert convert(values, np.dtype(np.float32)) is values


def test_convert_reuses_the_pages_of_a_dead_result_and_never_widens_to_float64():
    import tracemalloc

    narrow = np.random.default_rng(0).normal(size=(1024, 1024)).astype(ml_dtypes.bfloat16)
    first = convert(narrow, np.dtype(np.float32))
    address, expected = first.ctypes.data, first.copy()
    second = convert(narrow[::-1].copy(), np.dtype(np.float32))  # the first is alive: other pages
    assert second.ctypes.data != address and np.array_equal(first, expected)
    del first, second
    tracemalloc.start()
    third = convert(narrow, np.dtype(np.float32))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert third.ctypes.data == address and np.array_equal(third, expected)
    assert peak < narrow.size * 2  # no float64 (8 bytes a value), not even a new float32 array
