"""cast: rounding like the target dtype, refusal of out-of-range values, saturation."""

import ml_dtypes
import numpy as np
import pytest

from wtool.errors import InputError
from wtool.tensor import TensorInfo
from wtool.transforms import Context, Transform

TARGETS = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float8_e4m3fn": ml_dtypes.float8_e4m3fn,
           "float8_e5m2": ml_dtypes.float8_e5m2, "float32": np.float32}


def ctx(array):
    return Context(TensorInfo("layer.w", "F32", array.shape))


@pytest.mark.parametrize("target", TARGETS)
def test_values_round_like_the_target(target):
    w = np.random.default_rng(0).normal(0, 3, (16, 16)).astype(np.float32)
    out = Transform.create("cast", {"dtype": target}).apply(w, ctx(w))
    expected = w.astype(TARGETS[target]).astype(np.float32)
    np.testing.assert_array_equal(out, expected)


@pytest.mark.parametrize("target, big", [("float16", 70000.0), ("float8_e4m3fn", 500.0), ("float8_e5m2", 60000.0)])
def test_out_of_range_is_an_error_unless_saturate(target, big):
    w = np.array([[1.0, big, -big]], np.float32)
    with pytest.raises(InputError, match=r"'layer.w': 2 value\(s\) outside"):
        Transform.create("cast", {"dtype": target}).apply(w, ctx(w))
    out = Transform.create("cast", {"dtype": target, "saturate": "true"}).apply(w, ctx(w))
    limit = float(ml_dtypes.finfo(TARGETS[target]).max)
    np.testing.assert_array_equal(out, [[1.0, limit, -limit]])


def test_inf_into_a_dtype_without_inf():
    w = np.array([[np.inf, 1.0]], np.float32)
    with pytest.raises(InputError, match="outside"):
        Transform.create("cast", {"dtype": "float8_e4m3fn"}).apply(w, ctx(w))
    out = Transform.create("cast", {"dtype": "bfloat16"}).apply(w, ctx(w))  # bf16 has inf
    assert np.isinf(out[0, 0])


def test_output_dtype_and_int_tensors_are_never_cast():
    cast = Transform.create("cast", {"dtype": "bf16" if False else "bfloat16"})
    assert cast.output_dtype("F32") == "BF16"
    assert cast.skip(TensorInfo("ids", "I64", (3,))).hard
    assert cast.skip(TensorInfo("bias", "F32", (3,))) is None
