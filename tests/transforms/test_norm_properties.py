"""Invariants of weight-norm, spectral-norm and standardize, and the accuracy of spectral-norm's Lanczos."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from wtool.dtypes import by_numpy
from wtool.tensor import TensorInfo
from wtool.transforms import Context, Transform
from wtool.transforms.spectral_norm import lanczos_sigma

shapes = st.lists(st.integers(1, 6), min_size=2, max_size=4).map(tuple)


def context(array: np.ndarray, name: str = "layer.weight") -> Context:
    return Context(TensorInfo(name, by_numpy(array.dtype).code, array.shape))


def run(name: str, array: np.ndarray, options: dict | None = None, ctx: Context | None = None) -> np.ndarray:
    before = array.copy()
    out = Transform.create(name, options or {}).apply(array, ctx or context(array))
    np.testing.assert_array_equal(array, before, err_msg=f"{name} mutated its input")
    assert out.shape == array.shape and out.dtype == array.dtype
    return out


def exact_sigma(array: np.ndarray, dim: int = 0) -> float:
    matrix = np.moveaxis(array.astype(np.float64), dim, 0).reshape(array.shape[dim], -1)
    return float(np.linalg.svd(matrix, compute_uv=False)[0])


def with_spectrum(rows: int, cols: int, top: list[float], seed: int, dtype: type = np.float64) -> np.ndarray:
    """A rows×cols matrix whose largest singular values are `top`, the rest uniform below them."""
    rng = np.random.default_rng(seed)
    rank = min(rows, cols)
    left, _ = np.linalg.qr(rng.standard_normal((rows, rank)))
    right, _ = np.linalg.qr(rng.standard_normal((cols, rank)))
    rest = rng.uniform(0.0, 0.9 * min(top), rank - len(top))
    return ((left * np.concatenate([top, rest])) @ right.T).astype(dtype)


# ---------------------------------------------------------------- weight-norm

@settings(max_examples=40, deadline=None)
@given(shape=shapes, seed=st.integers(0, 2**32 - 1), norm=st.floats(0.01, 100.0), whole=st.booleans(),
       data=st.data())
def test_weight_norm_gives_every_slice_the_norm(shape, seed, norm, whole, data) -> None:
    array = np.random.default_rng(seed).standard_normal(shape)
    dim = None if whole else data.draw(st.integers(-len(shape), len(shape) - 1))
    out = run("weight-norm", array, {"dim": "none" if dim is None else str(dim), "norm": norm})
    axes = tuple(range(len(shape))) if dim is None else tuple(a for a in range(len(shape)) if a != dim % len(shape))
    np.testing.assert_allclose(np.sqrt(np.sum(out**2, axis=axes)), norm, rtol=1e-12)


def test_weight_norm_leaves_zero_slices_zero_and_skips_missing_axes() -> None:
    array = np.array([[0.0, 0.0], [3.0, 4.0]], dtype=np.float32)
    np.testing.assert_array_equal(run("weight-norm", array), np.array([[0, 0], [0.6, 0.8]], np.float32))
    transform = Transform.create("weight-norm", {"dim": "2"})
    skip = transform.skip(TensorInfo("w", "F32", (3, 4)))
    assert skip is not None and skip.hard and "out of range" in skip.reason
    assert transform.skip(TensorInfo("w", "F32", (3, 4, 5))) is None
    assert not Transform.create("weight-norm").skip(TensorInfo("b", "F32", (3,))).hard


# ---------------------------------------------------------------- standardize

@settings(max_examples=40, deadline=None)
@given(shape=shapes.filter(lambda s: np.prod(s[1:]) > 1), seed=st.integers(0, 2**32 - 1),
       eps=st.sampled_from([0.0, 1e-5, 0.1]), scale=st.floats(0.1, 10.0),
       dtype=st.sampled_from([np.float32, np.float64]))
def test_standardize_gives_mean_zero_and_shrunk_variance(shape, seed, eps, scale, dtype) -> None:
    array = (np.random.default_rng(seed).standard_normal(shape) * scale + 3.0).astype(dtype)
    out = run("standardize", array, {"eps": eps})
    axes = tuple(range(1, len(shape)))
    variance = array.astype(np.float64).var(axis=axes)
    tol = 1e-5 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(out.astype(np.float64).mean(axis=axes), 0.0, atol=tol)
    np.testing.assert_allclose(out.astype(np.float64).var(axis=axes), variance / (variance + eps), rtol=tol, atol=tol)


def test_standardize_whole_tensor() -> None:
    array = np.arange(12.0).reshape(3, 4)
    out = run("standardize", array, {"dim": "none", "eps": 0})
    assert abs(out.mean()) < 1e-12 and abs(out.var() - 1) < 1e-12


# ---------------------------------------------------------------- spectral-norm

@settings(max_examples=25, deadline=None)
@given(shape=st.lists(st.integers(1, 40), min_size=2, max_size=3).map(tuple), seed=st.integers(0, 2**32 - 1),
       target=st.floats(0.1, 10.0), method=st.sampled_from(["power", "svd"]))
def test_spectral_norm_hits_the_target(shape, seed, target, method) -> None:
    array = np.random.default_rng(seed).standard_normal(shape)
    ctx = context(array)
    out = run("spectral-norm", array, {"target": target, "method": method}, ctx)
    assert exact_sigma(out) == pytest.approx(target, rel=1e-6)
    assert ctx.extras["sigma_before"] == pytest.approx(exact_sigma(array), rel=1e-6)
    assert ctx.extras["sigma_after"] == pytest.approx(target, rel=1e-12)


def test_spectral_norm_clamp_only_scales_down() -> None:
    small = with_spectrum(40, 40, [0.5], seed=1)
    ctx = context(small)
    np.testing.assert_array_equal(run("spectral-norm", small, {"clamp": "true"}, ctx), small)
    assert ctx.extras["sigma_after"] == ctx.extras["sigma_before"] == pytest.approx(0.5)
    large = with_spectrum(40, 40, [3.0], seed=1)
    assert exact_sigma(run("spectral-norm", large, {"clamp": "true"})) == pytest.approx(1.0, rel=1e-6)


def test_spectral_norm_of_zero_and_nonfinite_tensors() -> None:
    zero = np.zeros((40, 40), np.float32)
    ctx = context(zero)
    np.testing.assert_array_equal(run("spectral-norm", zero, ctx=ctx), zero)
    assert ctx.extras["sigma_before"] == 0.0
    broken = with_spectrum(40, 40, [2.0], seed=3)
    broken[0, 0] = np.nan
    assert np.isnan(run("spectral-norm", broken)).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("rows", "cols"), [(120, 90), (90, 120), (300, 300)])
@pytest.mark.parametrize("top", [[1.0], [1.0, 1.0 - 1e-4], [1.0, *np.linspace(1.0 - 1e-4, 0.999, 20)]],
                         ids=["gap", "close", "cluster"])
def test_lanczos_agrees_with_svd_to_tol(dtype, rows, cols, top) -> None:
    matrix = with_spectrum(rows, cols, top, seed=rows + cols, dtype=dtype)
    exact = exact_sigma(matrix)
    found = lanczos_sigma(matrix, tol=1e-6, restarts=300, rng=np.random.default_rng(0))
    assert found is not None and abs(found - exact) / exact <= 1e-6


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("dim", [0, 1, 3])
def test_spectral_norm_power_matches_svd_on_conv_weights(dtype, dim) -> None:
    weight = np.random.default_rng(dim).standard_normal((48, 40, 3, 3)).astype(dtype)
    weight[0] *= 1 + 1e-4  # nudge so the top two singular values are distinct but close
    options = {"dim": str(dim), "target": "2.0"}
    by_power = run("spectral-norm", weight, {**options, "method": "power"})
    by_svd = run("spectral-norm", weight, {**options, "method": "svd"})
    np.testing.assert_allclose(by_power, by_svd, rtol=2e-6, atol=0)
    assert exact_sigma(by_power, dim) == pytest.approx(2.0, rel=2e-6)


def test_spectral_norm_falls_back_to_svd_when_lanczos_stops_early() -> None:
    matrix = with_spectrum(200, 200, [1.0, 1.0 - 1e-6], seed=5)
    ctx = context(matrix)
    out = run("spectral-norm", matrix, {"iters": "1", "tol": "1e-15"}, ctx)
    assert ctx.extras["sigma_method"].startswith("svd (Lanczos did not reach tol=1e-15 in 1 restarts)")
    assert exact_sigma(out) == pytest.approx(1.0, rel=1e-12)


def test_spectral_norm_is_deterministic_per_tensor_name() -> None:
    matrix = np.random.default_rng(9).standard_normal((64, 50)).astype(np.float32)
    first = run("spectral-norm", matrix, ctx=context(matrix, "a.weight"))
    again = run("spectral-norm", matrix, ctx=context(matrix, "a.weight"))
    np.testing.assert_array_equal(first, again)
