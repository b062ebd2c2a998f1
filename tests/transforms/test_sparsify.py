"""sparsify against a stable full sort (the test's reference) rather than wtool's partition/radix select."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from wtool.errors import UsageError
from wtool.tensor import TensorInfo
from wtool.transforms import Context, Transform


def ctx(array, name="w", state=None):
    return Context(TensorInfo(name, "F64" if array.dtype == np.float64 else "F32", array.shape), state)


def reference_fraction(arrays: list[np.ndarray], fraction: float) -> list[np.ndarray]:
    """Zero the round(f·n) smallest magnitudes over all arrays; ties: earlier tensor, lower index first."""
    flat = np.concatenate([np.abs(a.astype(np.float64)).reshape(-1) for a in arrays])
    count = round(fraction * flat.size)
    order = sorted(range(flat.size), key=lambda i: (flat[i], i))
    zero = np.zeros(flat.size, bool)
    zero[order[:count]] = True
    out, start = [], 0
    for a in arrays:
        mask = zero[start:start + a.size].reshape(a.shape)
        out.append(np.where(mask, 0, a))
        start += a.size
    return out


@pytest.mark.parametrize("shape", [(10,), (16, 9), (3, 4, 2, 2), (0, 3), (1, 1)])
@pytest.mark.parametrize("fraction", [0.0, 0.3, 0.5, 0.77, 1.0])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_fraction_per_tensor(shape, fraction, dtype):
    rng = np.random.default_rng(3)
    w = rng.normal(size=shape).astype(dtype)
    out = Transform.create("sparsify", {"fraction": fraction}).apply(w, ctx(w))
    np.testing.assert_array_equal(out, reference_fraction([w], fraction)[0])


def test_ties_are_broken_by_index():
    w = np.array([[0.5, 0.1, -0.1, 0.1, 2.0, 0.1]], np.float32)
    out = Transform.create("sparsify", {"fraction": 0.5}).apply(w, ctx(w))
    np.testing.assert_array_equal(out, np.array([[0.5, 0, 0, 0, 2.0, 0.1]], np.float32))


def test_threshold_keeps_magnitudes_at_or_above():
    w = np.array([[0.1, -0.5, 0.49, 0.5, -2]], np.float32)
    out = Transform.create("sparsify", {"threshold": 0.5}).apply(w, ctx(w))
    np.testing.assert_array_equal(out, [[0, -0.5, 0, 0.5, -2]])


def test_global_scope_uses_one_threshold_across_tensors():
    rng = np.random.default_rng(4)
    arrays = {"a": rng.normal(0, 1, (40, 30)).astype(np.float32),
              "b": rng.normal(0, 0.1, (25, 8)).astype(np.float32),
              "c": np.round(rng.normal(0, 1, (9, 9)), 1).astype(np.float32)}  # many ties
    arrays["b"][:3] = 0.0
    for fraction in (0.1, 0.5, 0.9):
        sparsify = Transform.create("sparsify", {"fraction": fraction, "scope": "global"})
        infos = [(TensorInfo(k, "F32", v.shape), (lambda v=v: v)) for k, v in arrays.items()]
        state = sparsify.fit(infos)
        got = [sparsify.apply(v, ctx(v, k, state)) for k, v in arrays.items()]
        expected = reference_fraction(list(arrays.values()), fraction)
        for g, e in zip(got, expected):
            np.testing.assert_array_equal(g, e)


def test_global_scope_with_float64_tensors():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(30, 7))
    b = rng.normal(size=(5, 5)).astype(np.float32)
    sparsify = Transform.create("sparsify", {"fraction": 0.4, "scope": "global"})
    state = sparsify.fit([(TensorInfo("a", "F64", a.shape), lambda: a), (TensorInfo("b", "F32", b.shape), lambda: b)])
    zeros = int((sparsify.apply(a, ctx(a, "a", state)) == 0).sum() + (sparsify.apply(b, ctx(b, "b", state)) == 0).sum())
    assert zeros == round(0.4 * (a.size + b.size))


def reference_nm(w: np.ndarray, keep: int, group: int) -> np.ndarray:
    out = w.reshape(-1, group).copy()
    for row in out:
        ranked = sorted(range(group), key=lambda i: (-abs(row[i]), i))
        row[ranked[keep:]] = 0
    return out.reshape(w.shape)


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "2:8", "8:8"])
@pytest.mark.parametrize("shape", [(8, 16), (2, 3, 24)])
def test_n_m(pattern, shape):
    keep, group = map(int, pattern.split(":"))
    w = np.random.default_rng(6).normal(size=shape).astype(np.float32)
    out = Transform.create("sparsify", {"nm": pattern}).apply(w, ctx(w))
    np.testing.assert_array_equal(out, reference_nm(w, keep, group))


def test_n_m_needs_divisible_last_axis():
    w = np.ones((4, 6), np.float32)
    with pytest.raises(UsageError, match=r"'w'.*not divisible by M=4"):
        Transform.create("sparsify", {"nm": "2:4"}).apply(w, ctx(w))


@pytest.mark.parametrize("options, message", [
    ({}, "exactly one"), ({"fraction": 0.5, "threshold": 1}, "exactly one"), ({"nm": "4:2"}, "0 < N <= M"),
    ({"nm": "two:four"}, "N:M"), ({"threshold": 0.1, "scope": "global"}, "needs fraction"), ({"fraction": 1.5}, "<= 1"),
])
def test_sparsify_bad_options(options, message):
    with pytest.raises(UsageError, match=message):
        Transform.create("sparsify", options)


@settings(max_examples=80, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=10),
                  elements=st.floats(-4, 4, width=32) | st.sampled_from([0.0, 1.0, -1.0])),
       st.floats(0, 1))
def test_exact_zero_count(w, fraction):
    out = Transform.create("sparsify", {"fraction": fraction}).apply(w, ctx(w))
    # zeros are the smallest magnitudes, so existing zeros count towards the target
    assert int((out == 0).sum()) == max(round(fraction * w.size), int((w == 0).sum()))
    np.testing.assert_array_equal(out, reference_fraction([w], fraction)[0])


@pytest.mark.parametrize("chunk", [3, 1 << 17])
def test_threshold_zeroes_nan_keeps_inf_and_signed_zeros(monkeypatch, chunk):
    from wtool.transforms import sparsify

    monkeypatch.setattr(sparsify, "CHUNK", chunk)
    w = np.array([[np.nan, np.inf, -np.inf, -0.0, 0.3, -0.5, 0.5, -0.2]], np.float32)
    out = Transform.create("sparsify", {"threshold": 0.5}).apply(w, ctx(w))
    expected = np.where(np.abs(w) >= 0.5, w, np.float32(0))
    assert out.tobytes() == expected.tobytes()
    zero = Transform.create("sparsify", {"threshold": 0}).apply(w, ctx(w))
    assert zero[0, 0] == 0 and np.signbit(zero[0, 3])  # NaN fails |w| >= 0; -0.0 passes and stays -0.0


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(width=32, allow_nan=False, allow_infinity=False)),
       st.integers(0, 299), st.sampled_from([-1, 0, 1]))
def test_knee_counts_float32_squares_below_the_mean_exactly(w, pick, step):
    """|w| < t counts exactly the w² < mean of float64 squares, at the boundary too: means
    right at a square and one float64 step either side of it."""
    from wtool.transforms.sparsify import _count_below_root

    squares = w.astype(np.float64) ** 2
    mean = float(squares[pick % w.size])
    mean = float(np.nextafter(mean, np.inf * step)) if step else mean
    if mean <= 0:
        mean = 1e-30
    assert _count_below_root(w, mean) == int(np.count_nonzero(squares < mean))


def test_energy_figures_of_float32_and_float64_weights_agree():
    from wtool.transforms.sparsify import energy_figures

    w = np.random.default_rng(3).normal(size=(37, 41)).astype(np.float32)
    out = Transform.create("sparsify", {"threshold": "0.5"}).apply(w, Context.of(w))
    narrow, wide = energy_figures(w, out), energy_figures(w.astype(np.float64), out.astype(np.float64))
    assert narrow == wide and 0 < narrow["energy_kept"] < 1 and 0.6 < narrow["knee"] < 0.75


@pytest.mark.parametrize("size", [5, 1 << 17, (1 << 17) + 3])
def test_threshold_figures_taken_with_the_zeros_are_the_separate_ones(monkeypatch, size):
    from wtool.transforms import sparsify

    monkeypatch.setattr(sparsify, "CHUNK", 1 << 12)
    w = np.random.default_rng(size).normal(size=size).astype(np.float32)
    w[::7] = 0.0
    ctx = Context.of(w)
    out = Transform.create("sparsify", {"threshold": "0.4"}).apply(w, ctx)
    assert ctx.extras == sparsify.energy_figures(w, out)
    assert 0 < ctx.extras["energy_kept"] < 1


@pytest.mark.parametrize("params", [{"threshold": "0.4"}, {"fraction": "0.3"}, {"nm": "2:4"}])
def test_without_statistics_the_energy_is_not_taken_and_the_zeros_are_the_same(monkeypatch, params):
    """A run without statistics (--no-stats) skips the energy figures' passes of squares."""
    from wtool.transforms import sparsify

    w = np.random.default_rng(5).normal(size=(64, 48)).astype(np.float32)
    transform = Transform.create("sparsify", params)
    measured, bare = Context.of(w), Context.of(w, measure=False)
    expected = transform.apply(w, measured)
    monkeypatch.setattr(sparsify, "energy_figures", lambda *args: pytest.fail("energy taken"))
    monkeypatch.setattr(sparsify, "_squares", lambda *args: pytest.fail("squares taken"))
    assert transform.apply(w, bare).tobytes() == expected.tobytes()
    assert "energy_kept" in measured.extras and bare.extras == {}


@pytest.mark.parametrize("chunk", [3, 7, 1 << 17])
@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_fraction_zeroes_chunk_by_chunk_as_a_stable_sort_says(monkeypatch, chunk, scope):
    """The zeros are made a few values at a time (the ties to drop may sit in several chunks);
    NaN is the largest magnitude, so it stays, and every dropped value is +0.0."""
    import wtool.transforms.sparsify as sparsify

    monkeypatch.setattr(sparsify, "CHUNK", chunk)
    w = np.array([0.3, -0.1, 0.1, np.nan, -0.0, 0.1, 2.0, -0.1, 0.1, 0.3, np.inf, 0.1, -5.0], np.float32)
    step = Transform.create("sparsify", {"fraction": 0.5, "scope": scope})
    state = step.fit([(ctx(w).info, lambda: w)]) if scope == "global" else None
    out = step.apply(w, ctx(w, state=state))
    finite = np.where(np.isnan(w), np.inf, w)  # the reference ranks NaN above everything
    expected = reference_fraction([finite], 0.5)[0]
    expected[np.isnan(w)] = np.nan
    np.testing.assert_array_equal(out, expected)
    dropped = (out == 0) & (w != 0)
    assert dropped.sum() + 1 == round(0.5 * w.size) and not np.signbit(out[dropped]).any()
