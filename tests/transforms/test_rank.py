"""The radix select against sorting, and the percentile it serves against np.percentile, to the bit."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from wtool.transforms import _rank
from wtool.transforms.sparsify import Sparsify
from wtool.transforms.base import Context


@contextlib.contextmanager
def small_slices(chunk: int = 7):
    """Every tensor takes the select path, in slices of `chunk` elements (several a tensor)."""
    saved = _rank.SMALL, _rank.CHUNK
    _rank.SMALL, _rank.CHUNK = 0, chunk
    try:
        yield
    finally:
        _rank.SMALL, _rank.CHUNK = saved


def _weights(dtype: type) -> st.SearchStrategy[np.ndarray]:
    """Finite weights with what trips a select: repeats, ±0, subnormals, huge magnitudes."""
    special = [0.0, -0.0, 1e-40 if dtype == np.float32 else 1e-310, 3e38 if dtype == np.float32 else 1e300, 0.5, -0.5]
    values = st.one_of(st.sampled_from(special), st.floats(-1e3, 1e3, width=32 if dtype == np.float32 else 64))
    return arrays(dtype, st.integers(1, 300), elements=values)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_select_finds_the_rank_of_a_sort(dtype, data):
    weights = data.draw(_weights(dtype))
    rank = data.draw(st.integers(1, weights.size))
    wide = dtype == np.float64
    with small_slices():
        key, below = _rank.select(_rank.chunked_keys(weights, wide), rank, 64 if wide else 32)
    ordered = np.sort(np.abs(weights))
    assert _rank.key_value(key, dtype) == ordered[rank - 1]
    assert below == int(np.count_nonzero(ordered < ordered[rank - 1]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_magnitude_percentile_is_numpys_to_the_bit(dtype, data):
    weights = data.draw(_weights(dtype))
    q = data.draw(st.one_of(st.sampled_from([0.0, 100.0, 50.0, 99.9, 0.1, 99.99]), st.floats(0, 100)))
    with small_slices():
        found = _rank.magnitude_percentile(weights, q)
    expected = float(np.percentile(np.abs(weights), q))
    assert np.float64(found).tobytes() == np.float64(expected).tobytes(), (found, expected)


@pytest.mark.parametrize("q", [99.9, 50.0, 12.345])
def test_magnitude_percentile_on_a_tensor_of_millions_takes_the_select_path(q, monkeypatch):
    """The real sizes, with no patching: the select path runs (np.percentile is called on two
    values only) and agrees with np.percentile on the whole tensor."""
    weights = (np.random.default_rng(3).standard_normal((1024, 1024)) * 0.02).astype(np.float32)
    expected = float(np.percentile(np.abs(weights), q))
    sizes: list[int] = []
    real = np.percentile

    def percentile(a, *args, **kwargs):
        sizes.append(np.asarray(a).size)
        return real(a, *args, **kwargs)

    monkeypatch.setattr(_rank.np, "percentile", percentile)
    assert _rank.magnitude_percentile(weights, q) == expected
    assert sizes == [2]


@settings(max_examples=100, deadline=None)
@given(data=st.data())
def test_sparsify_fraction_zeroes_the_smallest_in_flat_order_across_slices(data):
    """Per-tensor fraction through the select, slices of 7: the round(f·n) smallest |w| are
    zeroed, ties broken by the lowest index (a stable sort says which)."""
    weights = data.draw(_weights(np.float32))
    fraction = data.draw(st.floats(0, 1))
    with small_slices():
        out = Sparsify.create("sparsify", {"fraction": str(fraction)}).apply(weights, Context.of(weights))
    target = round(fraction * weights.size)
    zeroed = np.argsort(np.abs(weights), kind="stable")[:target]
    expected = weights.copy()
    expected[zeroed] = 0.0
    assert out.tobytes() == expected.tobytes()
