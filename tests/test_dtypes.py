"""dtypes: the conversion helpers against ml_dtypes' own casts."""

import ml_dtypes
import numpy as np
import pytest

from wtool.dtypes import convert, convert_into


def test_bfloat16_bit_shift_matches_ml_dtypes_for_every_bit_pattern():
    every = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(ml_dtypes.bfloat16)
    got = convert_into(every, np.empty(every.size, np.float32))
    expected = every.astype(np.float32)
    nan = np.isnan(expected)
    assert np.array_equal(np.isnan(got), nan)
    assert got[~nan].tobytes() == expected[~nan].tobytes()  # -0.0, subnormals and infinities included
    assert np.array_equal(got.view(np.uint32) >> 16, every.view(np.uint16))  # NaN payloads kept


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.bfloat16])
def test_convert_keeps_shape_and_values(dtype):
    values = np.random.default_rng(0).normal(size=(3, 5)).astype(dtype)
    got = convert(values.T, np.dtype(np.float32))  # a non-contiguous view
    assert got.shape == (5, 3) and np.array_equal(got, values.T.astype(np.float32))


def test_convert_returns_the_array_itself_when_it_has_the_dtype():
    values = np.ones(4, np.float32)
    assert convert(values, np.dtype(np.float32)) is values
