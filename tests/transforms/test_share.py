"""share: at most k values, each weight on its nearest centroid, centroids the means of their
clusters (a Lloyd fixed point), and an error no worse than textbook Lloyd from the same start."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from wtool.errors import UsageError
from wtool.tensor import TensorInfo
from wtool.transforms import Context, Transform
from wtool.transforms.share import _initial, _map_to_centroids, _midpoints, _order_keys


def share(x, name="w", **options):
    ctx = Context(TensorInfo(name, "F64" if x.dtype == np.float64 else "F32", x.shape))
    out = Transform.create("share", options).apply(x, ctx)
    return out, ctx.extras


def nearest(x, c):
    """Index of the nearest centroid; a tie (up to rounding) goes to the lower-valued one."""
    order = np.argsort(c, kind="stable")
    distance = np.abs(x[:, None] - c[order][None, :])
    return order[np.argmax(distance <= distance.min(axis=1, keepdims=True) * (1 + 1e-12), axis=1)]


def reference_lloyd(x, centroids, max_iter=100_000):
    """Textbook Lloyd in float64: argmin over every centroid, means, and (as scikit-learn)
    each empty cluster moved onto the point farthest from its old centroid (of equally far
    points, the lowest; never a cluster's last value). Returns the MSE."""
    x = x.astype(np.float64).ravel()
    c = np.array(centroids, np.float64)
    labels = None
    for _ in range(max_iter):
        new = nearest(x, c)
        if labels is not None and np.array_equal(new, labels):
            break
        labels = new
        counts = np.bincount(labels, minlength=c.size).astype(np.float64)
        sums = np.bincount(labels, weights=x, minlength=c.size)
        old = c.copy()
        filled = counts > 0
        c[filled] = sums[filled] / counts[filled]
        empty = np.flatnonzero(~filled)
        if empty.size:
            taken: set[float] = set()
            for i in np.lexsort((x, -np.abs(x - old[labels]))):
                if len(taken) == empty.size:
                    break
                if x[i] in taken:  # a value moves with all its copies
                    continue
                copies = x == x[i]
                j = labels[i]
                if counts[j] == copies.sum():  # a cluster keeps its last value
                    continue
                sums[j] -= x[copies].sum()
                counts[j] -= copies.sum()
                if counts[j]:
                    c[j] = sums[j] / counts[j]
                c[empty[len(taken)]] = x[i]
                taken.add(x[i])
            labels = None
    final = c[nearest(x, c)]
    return float(np.mean((x - final) ** 2))


def assert_lloyd_fixed_point(x, y, k):
    """≤ k values; every weight on its nearest output value; each value the mean of its weights."""
    x64, y64 = x.astype(np.float64).ravel(), y.astype(np.float64).ravel()
    finite = np.isfinite(x64)
    x64, y64 = x64[finite], y64[finite]
    values, inverse = np.unique(y64, return_inverse=True)
    assert values.size <= k
    slack = 4 * np.spacing(np.abs(values).max().astype(y.dtype)) + 1e-300
    nearest = np.abs(x64[:, None] - values[None, :]).min(axis=1)
    assert np.all(np.abs(x64 - y64) <= nearest + slack)
    means = np.bincount(inverse, weights=x64) / np.bincount(inverse)
    assert np.all(np.abs(means - values) <= slack)


def samples():
    rng = np.random.default_rng(42)
    return {
        "normal": (rng.normal(size=(64, 48)) * 0.02).astype(np.float32),
        "student-t": rng.standard_t(2, size=(40, 50)).astype(np.float32),
        "duplicates": rng.choice(rng.normal(size=37), size=(50, 40)).astype(np.float32),
        "bimodal": np.concatenate([rng.normal(size=1000), 8 + 0.01 * rng.normal(size=1000)]).astype(np.float32)
        .reshape(40, 50),
        "conv": rng.normal(size=(8, 4, 3, 3)).astype(np.float32),
    }


@pytest.mark.parametrize("init", ["linear", "density", "random"])
@pytest.mark.parametrize("k", [1, 2, 5, 16, 33])
@pytest.mark.parametrize("name", list(samples()))
def test_lloyd_fixed_point(name, k, init):
    x = samples()[name]
    y, extras = share(x, clusters=k, init=init)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_lloyd_fixed_point(x, y, k)
    assert extras["converged"]
    distinct = np.unique(x).size
    # more distinct values than clusters: no cluster is lost, thanks to relocation
    assert extras["distinct"] == np.unique(y).size == min(k, distinct)
    assert extras["mse"] == pytest.approx(np.mean((y.astype(np.float64) - x) ** 2), rel=1e-6, abs=1e-30)


@pytest.mark.parametrize("k", [2, 3, 8, 16, 40])
@pytest.mark.parametrize("name", list(samples()))
def test_plain_mode_is_textbook_lloyd(name, k):
    """accelerate=false walks scikit-learn's path: same start, same relocation, same error."""
    x = samples()[name]
    _, extras = share(x, clusters=k, accelerate=False)
    if np.unique(x).size <= k:  # already shared: left alone
        assert extras["mse"] == 0.0
        return
    assert extras["mse"] == pytest.approx(reference_lloyd(x, np.linspace(x.min(), x.max(), k)), rel=1e-6)


def test_accelerated_no_worse_than_textbook_lloyd():
    ratios = []
    for seed in range(40):
        rng = np.random.default_rng(seed)
        n, k = int(rng.integers(50, 1500)), int(rng.integers(2, 30))
        x = [rng.normal(size=n), rng.standard_t(2, size=n), rng.integers(0, 40, n) * 0.1,
             np.concatenate([rng.normal(size=n), 5 + 0.1 * rng.normal(size=n)])][seed % 4]
        x = x.astype(np.float32).reshape(1, -1)
        if np.unique(x).size <= k:
            continue
        _, extras = share(x, clusters=k)
        ratios.append(extras["mse"] / reference_lloyd(x, np.linspace(x.min(), x.max(), k)))
    assert max(ratios) <= 1.01
    assert np.exp(np.mean(np.log(ratios))) <= 1.0 + 1e-9


def test_small_example():
    x = np.array([[0.0, 0.1, 0.9], [1.0, 2.0, 2.2]], np.float32)
    y, extras = share(x, clusters=3)
    np.testing.assert_allclose(y, [[0.05, 0.05, 0.95], [0.95, 2.1, 2.1]], rtol=1e-6)
    assert extras["distinct"] == 3 and extras["iterations"] >= 1


def test_empty_clusters_are_relocated_not_lost():
    # linear start 0, 3.4, 6.8, 10.2: the middle two clusters start empty
    x = np.array([[0.0, 0.1, 0.2, 10.0, 10.1, 10.2]], np.float32)
    y, extras = share(x, clusters=4, accelerate=False)
    assert extras["distinct"] == 4
    assert_lloyd_fixed_point(x, y, 4)
    assert extras["mse"] == pytest.approx(reference_lloyd(x, np.linspace(0, 10.2, 4)), rel=1e-6)


def test_heavy_duplicates_keep_all_clusters():
    x = np.repeat(np.arange(10, dtype=np.float32), [500, 1, 1, 1, 1, 1, 1, 1, 1, 500]).reshape(1, -1)
    for init in ["linear", "density", "random"]:
        y, extras = share(x, clusters=5, init=init)
        assert extras["distinct"] == 5
        assert_lloyd_fixed_point(x, y, 5)


def test_at_most_k_distinct_values_is_left_alone():
    x = np.repeat(np.array([-1.5, 0.0, 2.25], np.float32), 7).reshape(3, 7)
    for k in (3, 4, 256):
        y, extras = share(x, clusters=k)
        assert y.tobytes() == x.tobytes() and y is not x
        assert extras == {"distinct": 3, "mse": 0.0, "iterations": 0, "converged": True}


def test_bits_means_two_to_the_bits():
    x = samples()["normal"]
    y, extras = share(x, bits=2)
    assert extras["distinct"] == 4
    assert Transform.create("share", {}).k == 16
    assert Transform.create("share", {"bits": 8}).k == 256


@pytest.mark.parametrize("options,message", [
    ({"clusters": 4, "bits": 2}, "clusters or bits, not both"),
    ({"clusters": 0}, "must be >= 1"),
    ({"bits": 0}, "must be >= 1"),
    ({"init": "kmeans++"}, "expected one of linear, density, random"),
    ({"iters": 0}, "must be >= 1"),
])
def test_share_bad_options(options, message):
    with pytest.raises(UsageError, match=message):
        Transform.create("share", options)


def test_random_init_depends_on_seed_and_name_only():
    x = samples()["student-t"]
    a, _ = share(x, name="a", clusters=12, init="random", seed=3)
    assert a.tobytes() == share(x, name="a", clusters=12, init="random", seed=3)[0].tobytes()
    data = np.sort(x.ravel())

    def start(name, seed):
        return _initial(data, 12, "random", Context(TensorInfo(name, "F32", x.shape)).rng(seed))

    first = start("a", 3)
    assert np.array_equal(first, start("a", 3))
    assert np.unique(first).size == 12 and np.isin(first, data).all()  # k distinct data values
    assert not np.array_equal(first, start("a", 4))
    assert not np.array_equal(first, start("b", 3))


def test_linear_and_density_starts():
    data = np.sort(samples()["normal"].ravel())
    rng = np.random.default_rng(0)
    linear = _initial(data, 5, "linear", rng)
    np.testing.assert_allclose(linear, np.linspace(data[0], data[-1], 5))
    density = _initial(data, 4, "density", rng)  # the CDF at 1/8, 3/8, 5/8, 7/8
    np.testing.assert_allclose(density, data[(np.array([0.125, 0.375, 0.625, 0.875]) * data.size).astype(int)])


def test_nonfinite_values_stay_in_place():
    x = np.array([[np.nan, 1, 2, 3, 4, 5, np.inf, -np.inf, 100, 101]], np.float32)
    y, extras = share(x, clusters=2)
    assert np.isnan(y[0, 0]) and y[0, 6] == np.inf and y[0, 7] == -np.inf
    np.testing.assert_allclose(y[0, [1, 2, 3, 4, 5, 8, 9]], [3, 3, 3, 3, 3, 100.5, 100.5])
    assert extras["distinct"] == 2


def test_share_float64_stays_float64():
    x = np.random.default_rng(1).normal(size=(30, 30))
    y, extras = share(x, clusters=7)
    assert y.dtype == np.float64
    assert_lloyd_fixed_point(x, y, 7)


def test_input_not_mutated_and_declares_spreading():
    x = samples()["normal"]
    before = x.copy()
    share(x, clusters=8)
    assert np.array_equal(x, before)
    assert Transform.create("share", {}).spreads_nonfinite


def test_signed_zeros_and_denormals():
    x = np.array([[-0.0, 0.0, 1e-45, -1e-45, 1, -1, 2, -2]], np.float32)
    y, _ = share(x, clusters=3)
    assert_lloyd_fixed_point(x, y, 3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_table_mapping_equals_binary_search(dtype):
    """Above 2^20 values the mapping goes through a bucket table: same answer as a search per value."""
    rng = np.random.default_rng(5)
    x = (rng.standard_t(3, size=1_200_000) * 0.05).astype(dtype)
    x[:4] = [0.0, -0.0, 1e-40, -1e-40]
    centroids = np.sort(rng.choice(x, 63, replace=False).astype(np.float64))
    centroids[10] = centroids[11]  # a repeated centroid and a midpoint that is a data value
    x[4] = _midpoints(centroids, x.dtype)[20]
    outputs = np.arange(63, dtype=dtype)
    got = _map_to_centroids(x, centroids, outputs)
    want = np.searchsorted(_midpoints(centroids, x.dtype), x, side="left")
    assert np.array_equal(got, outputs[want])
    assert np.array_equal(np.argsort(_order_keys(x[2:1000]), kind="stable"), np.argsort(x[2:1000], kind="stable"))


def test_large_tensor_through_the_table_path():
    x = (np.random.default_rng(9).normal(size=(1100, 1000)) * 0.02).astype(np.float32)
    x[3, 3] = np.nan
    y, extras = share(x, clusters=64)
    assert np.isnan(y[3, 3]) and extras["distinct"] == 64 and extras["converged"]
    sample = np.random.default_rng(0).choice(x.size, 5000, replace=False)
    values = np.unique(y[np.isfinite(y)])
    xs, ys = x.ravel()[sample].astype(np.float64), y.ravel()[sample].astype(np.float64)
    keep = np.isfinite(xs)
    nearest = np.abs(xs[keep, None] - values[None, :]).min(axis=1)
    assert np.all(np.abs(xs[keep] - ys[keep]) <= nearest + 1e-8)


small_floats = hnp.arrays(
    np.float32, hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=12),
    elements=st.one_of(st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.5, 3.0]),
                       st.floats(-100, 100, width=32, allow_subnormal=True)))


@settings(max_examples=150, deadline=None)
@given(x=small_floats, k=st.integers(1, 9), init=st.sampled_from(["linear", "density", "random"]),
       accelerate=st.booleans())
def test_properties(x, k, init, accelerate):
    before = x.copy()
    y, extras = share(x, clusters=k, init=init, accelerate=accelerate)
    assert np.array_equal(x, before, equal_nan=True)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_lloyd_fixed_point(x, y, k)
    assert extras["distinct"] == min(k, np.unique(x).size)


@settings(max_examples=60, deadline=None)
@given(x=small_floats, k=st.integers(2, 7))
def test_plain_mode_matches_reference_property(x, k):
    # nudge the distinct values apart irregularly (copies stay copies, order stays): with small
    # integers a value can sit exactly halfway between two means, and which side rounding puts
    # it on is not part of the contract
    values, inverse = np.unique(x, return_inverse=True)
    if values.size <= k:
        return
    x = (values + np.float32(np.sqrt(2) * 1e-3) * np.arange(values.size, dtype=np.float32))[inverse]
    _, extras = share(x, clusters=k, accelerate=False)
    want = reference_lloyd(x, np.linspace(float(x.min()), float(x.max()), k))
    assert extras["mse"] == pytest.approx(want, rel=1e-5, abs=1e-12)


@pytest.mark.stress
def test_4096_square_into_256_clusters_converges():
    # its speed is measured by benchmarks/bench_share.py, never asserted in a test
    x = (np.random.default_rng(0).standard_normal((4096, 4096), dtype=np.float32) * 0.02)
    y, extras = share(x, clusters=256)
    assert extras["converged"] and extras["distinct"] == 256


@pytest.mark.parametrize("accelerate", [True, False])
def test_tiny_values_beside_large_ones_still_reach_a_fixed_point(accelerate):
    # found by hypothesis: 0, 1.2e-38 and 3.8e-34 drown in running sums that include -1 and 3
    x = np.array([3.0, 0.75, 2.0, 1.0, -1.0, 3.7811656e-34, 0.5, 1.1754944e-38, 0, 0, 0, 0], np.float32)
    y, extras = share(x, clusters=8, init="linear", accelerate=accelerate)
    assert extras["converged"] and extras["distinct"] == 8
    assert_lloyd_fixed_point(x, y, 8)
