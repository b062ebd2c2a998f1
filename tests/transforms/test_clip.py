"""clip against the formula computed independently (sorting for percentiles, float64 math)."""

import math

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from wtool.errors import UsageError
from wtool.tensor import TensorInfo
from wtool.transforms import Context, Transform

SHAPES = [(7,), (16, 33), (4, 3, 3, 3), (0, 5), (1, 1)]


def ctx(array):
    return Context(TensorInfo("w", "F32", array.shape))


def reference_percentile(values: np.ndarray, q: float) -> float:
    """Linear interpolation between order statistics, written out (numpy's default method)."""
    ordered = sorted(abs(float(v)) for v in values.reshape(-1))
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (rank - low) * (ordered[high] - ordered[low])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("options", [{"c": "0.5"}, {"percentile": "90"}, {"sigma": "1.5"},
                                     {"min": "-0.2", "max": "0.7"}, {"min": "0"}, {"max": "0.1"}])
def test_clip_matches_formula(shape, dtype, options):
    rng = np.random.default_rng(1)
    w = rng.normal(size=shape).astype(dtype)
    out = Transform.create("clip", options).apply(w, ctx(w))
    if w.size == 0:
        assert out.shape == w.shape
        return
    if "c" in options:
        low, high = -0.5, 0.5
    elif "percentile" in options:
        c = reference_percentile(w, 90.0)
        low, high = -c, c
    elif "sigma" in options:
        values = w.astype(np.float64).reshape(-1)
        c = 1.5 * math.sqrt(sum((v - values.mean()) ** 2 for v in values) / values.size)
        low, high = -c, c
    else:
        low = float(options.get("min", "-inf"))
        high = float(options.get("max", "inf"))
    expected = [min(max(float(v), low), high) for v in w.reshape(-1)]
    np.testing.assert_allclose(out.reshape(-1), np.array(expected), rtol=1e-6, atol=1e-7)
    assert out.dtype == w.dtype


@pytest.mark.parametrize("options, message", [
    ({}, "exactly one"), ({"c": "1", "percentile": "99"}, "exactly one"), ({"min": "2", "max": "1"}, "greater"),
    ({"c": "-1"}, ">= 0"), ({"percentile": "101"}, "<= 100"), ({"c": "abc"}, "expected float"),
    ({"c": "nan"}, "finite"),
])
def test_clip_rejects_bad_options(options, message):
    with pytest.raises(UsageError, match=message):
        Transform.create("clip", options)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=8),
                  elements=st.floats(-1e6, 1e6, width=32)),
       st.floats(0, 100))
def test_clip_bounds_hold(w, percentile):
    out = Transform.create("clip", {"percentile": percentile}).apply(w, ctx(w))
    c = np.percentile(np.abs(w), percentile)
    assert np.all(np.abs(out) <= c * (1 + 1e-6) + 1e-30)
    inside = np.abs(w) <= c
    np.testing.assert_array_equal(out[inside], w[inside])


def test_clip_does_not_mutate_and_keeps_bf16_values_representable():
    w = np.linspace(-2, 2, 64, dtype=np.float32).astype(ml_dtypes.bfloat16).astype(np.float32).reshape(8, 8)
    before = w.copy()
    out = Transform.create("clip", {"c": "1"}).apply(w, ctx(w))
    np.testing.assert_array_equal(w, before)
    # every value is an input or the bound, so storing back in bf16 rounds nothing
    np.testing.assert_array_equal(out, np.clip(before, -1, 1))
    np.testing.assert_array_equal(out.astype(ml_dtypes.bfloat16).astype(np.float32), out)
    assert (np.abs(out) == 1).sum() == (np.abs(before) >= 1).sum() > 0
