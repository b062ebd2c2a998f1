"""Statistics against plain-Python float64 formulas, over every dtype, with NaN/Inf and empties."""

import math

import ml_dtypes
import numpy as np
import pytest
from corpus import ALL_CODES, sample
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from wtool import stats
from wtool.dtypes import DTYPES


def reference(values: list[float]) -> dict:
    finite = [v for v in values if math.isfinite(v)]
    n = len(finite)
    mean = sum(finite) / n if n else None
    return {
        "numel": len(values),
        "min": min(finite) if n else None, "max": max(finite) if n else None,
        "mean": mean,
        "std": math.sqrt(sum((v - mean) ** 2 for v in finite) / n) if n else None,
        "absmax": max(abs(v) for v in finite) if n else None,
        "l2": math.sqrt(sum(v * v for v in finite)),
        "sparsity": sum(v == 0 for v in values) / len(values) if values else None,
        "nan": sum(math.isnan(v) for v in values), "inf": sum(math.isinf(v) for v in values),
    }


def close(a, b):
    if a is None or b is None:
        return a is b
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize("code", ALL_CODES)
@pytest.mark.parametrize("shape", [(0,), (1,), (5, 7), (2, 3, 4)])
def test_stats_of_every_dtype(code, shape):
    array = sample(code, shape, seed=7, bits=False)
    got = stats.tensor_stats(array)
    expected = reference([float(v) for v in array.reshape(-1)])
    assert set(got) == set(stats.STAT_KEYS)
    for key in stats.STAT_KEYS:
        assert close(got[key], expected[key]), (key, got[key], expected[key])


def test_nonfinite_values_are_counted_not_averaged():
    array = np.array([1.0, np.nan, np.inf, -np.inf, 3.0], np.float32)
    got = stats.tensor_stats(array)
    assert got["nan"] == 1 and got["inf"] == 2 and got["mean"] == 2.0 and got["max"] == 3.0


def test_chunking_does_not_change_results(monkeypatch):
    array = np.random.default_rng(0).normal(size=10_001).astype(ml_dtypes.bfloat16)
    whole = stats.tensor_stats(array)
    monkeypatch.setattr(stats, "CHUNK", 64)
    chunked = stats.tensor_stats(array)
    for key in stats.STAT_KEYS:
        assert close(whole[key], chunked[key]) or math.isclose(whole[key], chunked[key], rel_tol=1e-12)


def test_error_metrics_against_formulas():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(20, 5))
    b = a + rng.normal(0, 0.1, size=a.shape)
    got = stats.error_metrics(a, b)
    diff = (b - a).reshape(-1)
    assert math.isclose(got["mse"], float(np.mean(diff ** 2)), rel_tol=1e-12)
    assert math.isclose(got["max_abs"], float(np.max(np.abs(diff))), rel_tol=1e-12)
    assert math.isclose(got["rel_l2"], float(np.linalg.norm(diff) / np.linalg.norm(a)), rel_tol=1e-12)
    assert math.isclose(got["sqnr_db"], 10 * math.log10(np.sum(a ** 2) / np.sum(diff ** 2)), rel_tol=1e-12)
    cos = float(np.dot(a.ravel(), b.ravel()) / np.linalg.norm(a) / np.linalg.norm(b))
    assert math.isclose(stats.cosine(a, b), cos, rel_tol=1e-12)


def test_identical_tensors_have_zero_error_and_no_sqnr():
    a = np.arange(6, dtype=np.float32)
    assert stats.error_metrics(a, a) == {"mse": 0.0, "max_abs": 0.0, "rel_l2": 0.0, "sqnr_db": None}


@settings(max_examples=50, deadline=None)
@given(hnp.arrays(np.float32, hnp.array_shapes(max_dims=3, max_side=6), elements=st.floats(-1e4, 1e4, width=32)))
def test_stats_are_consistent(array):
    got = stats.tensor_stats(array)
    if array.size:
        assert got["min"] <= got["mean"] + 1e-6 * max(1, abs(got["mean"])) and got["mean"] <= got["max"] + 1e-3
        assert got["absmax"] == max(abs(got["min"]), abs(got["max"]))
        assert math.isclose(got["l2"], float(np.sqrt(np.sum(array.astype(np.float64) ** 2))), rel_tol=1e-9)


@pytest.mark.parametrize("bins", [1, 7, 32])
def test_histogram_matches_numpy(bins):
    values = np.random.default_rng(2).normal(size=5000).astype(np.float32)
    values[:3] = [np.nan, np.inf, values.max()]
    low, high = float(np.nanmin(values[np.isfinite(values)])), float(values[np.isfinite(values)].max())
    expected = np.histogram(values[np.isfinite(values)].astype(np.float64), bins=bins, range=(low, high))[0]
    assert stats.histogram(values, low, high, bins) == expected.tolist()


@pytest.mark.parametrize("blas", [False, True], ids=["sums", "blas-dot"])
def test_huge_float64_values_do_not_overflow(monkeypatch, blas):
    monkeypatch.setattr(stats, "_blas_dot", blas)
    values = np.array([1e200, -1e200, 3.0, 2e300])
    got = stats.tensor_stats(values)
    exact = [float(v) for v in values]
    mean = sum(v / 4 for v in exact)
    assert math.isclose(got["mean"], mean, rel_tol=1e-12)
    assert math.isclose(got["l2"], math.sqrt(sum((v / 2e300) ** 2 for v in exact)) * 2e300, rel_tol=1e-12)
    assert math.isclose(got["std"], math.sqrt(sum(((v - mean) / 2e300) ** 2 for v in exact) / 4) * 2e300, rel_tol=1e-12)
    scaled = values * 0.5
    err = stats.error_metrics(values, scaled)
    assert math.isclose(err["rel_l2"], 0.5, rel_tol=1e-12) and math.isclose(err["sqnr_db"], 20 * math.log10(2))
    assert err["mse"] is None  # ~1e600 does not fit in float64: reported as infinite
    assert math.isclose(stats.cosine(values, scaled), 1.0, rel_tol=1e-12)


def test_a_value_turned_non_finite_makes_the_error_infinite():
    err = stats.error_metrics(np.array([1.0, 2.0]), np.array([1.0, np.inf]))
    assert err == {"mse": None, "max_abs": None, "rel_l2": None, "sqnr_db": None}


def test_std_of_values_far_from_zero_is_accurate(monkeypatch):
    values = 1e6 + np.random.default_rng(3).normal(size=50_000)
    monkeypatch.setattr(stats, "CHUNK", 4096)  # many chunks, one shift
    got = stats.tensor_stats(values)
    exact = [float(v) for v in values]
    mean = math.fsum(exact) / len(exact)
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in exact) / len(exact))
    assert math.isclose(got["mean"], mean, rel_tol=1e-13)
    assert math.isclose(got["std"], std, rel_tol=1e-9)


def _pair(code, seed):
    dtype = DTYPES[code].numpy
    before = sample(code, (40, 50), seed=seed, bits=False)
    after = (before.astype(np.float64) * 0.9 + 0.01).astype(dtype) if code != "BOOL" else ~before
    if np.dtype(dtype).kind not in "iub":
        before.reshape(-1)[[3, 700]] = [np.nan, np.inf]  # non-finite before, and in the same chunk after
        after.reshape(-1)[[3, 1900]] = [np.nan, -np.inf]
    return before, after


@pytest.mark.parametrize("code", ALL_CODES)
@pytest.mark.parametrize("chunk", [64, 1 << 16])
@pytest.mark.parametrize("blas", [False, True], ids=["sums", "blas-dot"])  # True: as the statistics process
def test_compare_matches_the_separate_functions(monkeypatch, code, chunk, blas):
    monkeypatch.setattr(stats, "CHUNK", chunk)
    monkeypatch.setattr(stats, "_blas_dot", blas)
    before, after = _pair(code, seed=4)
    got = stats.compare(before, after)
    for side, array in ((got.before, before), (got.after, after)):
        expected = reference([float(v) for v in array.reshape(-1)])
        for key in stats.STAT_KEYS:
            assert close(side[key], expected[key]), (key, side[key], expected[key])
    assert not got.same_bytes
    keep = np.isfinite(before.astype(np.float64).reshape(-1))
    a, b = before.astype(np.float64).reshape(-1)[keep], after.astype(np.float64).reshape(-1)[keep]
    if not np.isfinite(b).all():
        assert got.error == {"mse": None, "max_abs": None, "rel_l2": None, "sqnr_db": None}
    else:
        assert math.isclose(got.error["mse"], float(np.mean((b - a) ** 2)) * a.size / before.size, rel_tol=1e-9)
        assert math.isclose(got.error["max_abs"], float(np.max(np.abs(b - a))), rel_tol=1e-12)
    low, high = got.histogram["low"], got.histogram["high"]
    assert got.histogram["before"] == stats.histogram(before, low, high)
    assert got.histogram["after"] == stats.histogram(after, low, high)
    for array in (before, after):
        finite = array.astype(np.float64)[np.isfinite(array.astype(np.float64))]
        assert low <= finite.min() and finite.max() <= high


def test_compare_error_against_formulas_when_all_finite():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(300, 7)).astype(np.float32)
    b = (a + rng.normal(0, 0.1, size=a.shape)).astype(np.float32)
    got = stats.compare(a, b)
    diff = b.astype(np.float64) - a.astype(np.float64)
    assert math.isclose(got.error["mse"], float(np.mean(diff ** 2)), rel_tol=1e-12)
    assert math.isclose(got.error["rel_l2"], float(np.linalg.norm(diff) / np.linalg.norm(a.astype(np.float64))),
                        rel_tol=1e-12)
    values = np.concatenate([a.reshape(-1), b.reshape(-1)]).astype(np.float64)
    for side, array in (("before", a), ("after", b)):
        expected = np.histogram(array.astype(np.float64), bins=32, range=(values.min(), values.max()))[0]
        assert got.histogram[side] == expected.tolist()


def test_compare_tells_bytes_apart_that_compare_equal():
    a = np.array([0.0, 1.0, np.nan], np.float32)
    b = np.array([-0.0, 1.0, np.nan], np.float32)
    assert not stats.compare(a, b).same_bytes
    assert stats.compare(a, a.copy()).same_bytes
    assert stats.compare(a, a.copy()).error == {"mse": 0.0, "max_abs": 0.0, "rel_l2": 0.0, "sqnr_db": None}
    assert stats.compare(a.astype(np.float64), a).same_bytes is False  # another dtype is another storage


@pytest.mark.parametrize("dtype", [ml_dtypes.bfloat16, np.float16, ml_dtypes.float8_e4m3fn])
def test_counted_bit_patterns_give_the_statistics_of_the_chunked_pass(monkeypatch, dtype):
    monkeypatch.setattr(stats, "CHUNK", 1000)
    values = np.random.default_rng(6).normal(3, 2, size=12_345).astype(dtype)
    values[[5, 77]] = [np.nan, np.inf] if dtype != ml_dtypes.float8_e4m3fn else [np.nan, 0]
    counted, chunked = stats.tensor_stats(values), stats.tensor_stats(values.astype(np.float32))
    assert counted.keys() == chunked.keys()
    for key, value in counted.items():
        assert math.isclose(value, chunked[key], rel_tol=1e-12), key
    low, high = counted["min"], counted["max"] + 1
    assert stats.histogram(values, low, high) == stats.histogram(values.astype(np.float32), low, high)


def test_same_bytes_is_bitwise(monkeypatch):
    monkeypatch.setattr(stats, "CHUNK", 3)
    a = np.array([0.0, 1.0, np.nan, 2.0, 5.0], np.float32)
    assert stats.same_bytes(a, a.copy())
    assert not stats.same_bytes(a, np.where(a == 0, np.float32(-0.0), a))
    assert not stats.same_bytes(a, a.astype(np.float64)) and not stats.same_bytes(a, a.reshape(5, 1))
    last = a.copy()
    last[-1] = 6.0  # in the last, short chunk
    assert not stats.same_bytes(a, last)


def test_weighted_error_reads_its_rows_once_from_a_generator():
    rows = [{"name": f"t{i}", "numel": i + 1, "rel_l2": (i * 7 % 11) / 10, "sqnr_db": float(i)} for i in range(200)]
    rows[50]["rel_l2"] = rows[51]["rel_l2"] = 2.0  # a tie: the earlier row ranks first
    expected = stats.weighted_error(rows)
    assert stats.weighted_error(row for row in rows) == expected
    assert [w["name"] for w in expected["worst"]][:2] == ["t50", "t51"]
    assert stats.weighted_error(iter([])) == {"weighted_rel_l2": 0.0, "weighted_sqnr_db": None, "worst": []}
