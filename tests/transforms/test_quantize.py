"""quantize against the min-max formula evaluated group by group in float64 in the test."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from wtool.errors import UsageError
from wtool.tensor import TensorInfo
from wtool.transforms import Context, Transform


def ctx(array, name="w"):
    return Context(TensorInfo(name, "F32", array.shape))


def reference_group(values: list[float], bits: int, scheme: str) -> list[float]:
    """The formula of the issue, one group at a time, in float64 Python arithmetic."""
    if scheme == "asym":
        low, high = min(values), max(values)
        if high == low:
            return list(values)
        levels = 2 ** bits - 1
        step = (high - low) / levels
        return [round((v - low) / (high - low) * levels) * step + low for v in values]
    absmax = max(abs(v) for v in values)
    if absmax == 0:
        return list(values)
    scale = absmax / (2 ** (bits - 1) - 1)
    return [round(v / scale) * scale for v in values]


def reference(w: np.ndarray, bits: int, scheme: str, granularity: str, group_size: int) -> np.ndarray:
    flat = w.astype(np.float64)
    if granularity == "tensor" or (granularity == "channel" and w.ndim < 2):
        groups = [list(flat.reshape(-1))]
        return np.array(reference_group(groups[0], bits, scheme)).reshape(w.shape)
    if granularity == "channel":
        rows = flat.reshape(w.shape[0], -1)
        return np.array([reference_group(list(r), bits, scheme) for r in rows]).reshape(w.shape)
    rows = flat.reshape(-1, w.shape[-1])
    out = []
    for r in rows:
        q = []
        for start in range(0, len(r), group_size):
            q.extend(reference_group(list(r[start:start + group_size]), bits, scheme))
        out.append(q)
    return np.array(out).reshape(w.shape)


@pytest.mark.parametrize("shape", [(5,), (8, 16), (6, 20), (4, 2, 3, 8), (1, 1), (3, 256)])
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("scheme", ["asym", "sym"])
@pytest.mark.parametrize("granularity", ["tensor", "channel", "group"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_quantize_matches_formula(shape, bits, scheme, granularity, dtype):
    rng = np.random.default_rng(bits)
    w = rng.normal(size=shape).astype(dtype)
    options = {"bits": bits, "scheme": scheme, "granularity": granularity, "group_size": 8, "remainder": "ok"}
    out = Transform.create("quantize", options).apply(w, ctx(w))
    expected = reference(w, bits, scheme, granularity, 8)
    tolerance = 1e-12 if dtype == np.float64 else 2e-6
    np.testing.assert_allclose(out, expected, rtol=tolerance, atol=tolerance * np.abs(w).max())
    assert out.dtype == w.dtype and out.shape == w.shape


def test_group_remainder_is_an_error_naming_the_tensor():
    w = np.ones((2, 10), np.float32)
    with pytest.raises(UsageError, match=r"'layer.weight'.*10.*group_size=4.*remainder=ok"):
        Transform.create("quantize", {"granularity": "group", "group_size": 4}).apply(w, ctx(w, "layer.weight"))


def test_constant_groups_do_not_divide_by_zero():
    w = np.full((4, 8), 0.3, np.float32)
    w[0] = 0
    for scheme in ("asym", "sym"):
        with np.errstate(all="raise"):
            out = Transform.create("quantize", {"scheme": scheme}).apply(w, ctx(w))
        np.testing.assert_array_equal(out, w)


def test_empty_tensor():
    w = np.zeros((0, 4), np.float32)
    assert Transform.create("quantize", {}).apply(w, ctx(w)).shape == (0, 4)


@pytest.mark.parametrize("options", [{"bits": 1}, {"bits": 9}, {"group_size": 0}, {"scheme": "nf4"},
                                     {"granularity": "row"}])
def test_quantize_bad_options(options):
    with pytest.raises(UsageError):
        Transform.create("quantize", options)


@settings(max_examples=80, deadline=None)
@given(hnp.arrays(np.float32, st.tuples(st.integers(1, 6), st.integers(1, 24)),
                  elements=st.floats(-100, 100, width=32)),
       st.integers(2, 8), st.sampled_from(["asym", "sym"]), st.sampled_from([1, 3, 8]))
def test_at_most_2_to_the_b_values_per_group_and_error_within_half_step(w, bits, scheme, group_size):
    out = Transform.create("quantize", {"bits": bits, "scheme": scheme, "granularity": "group",
                                        "group_size": group_size, "remainder": "ok"}).apply(w, ctx(w))
    for r_in, r_out in zip(w, out):
        for start in range(0, len(r_in), group_size):
            g_in = r_in[start:start + group_size].astype(np.float64)
            g_out = r_out[start:start + group_size].astype(np.float64)
            assert len(np.unique(g_out)) <= 2 ** bits
            if scheme == "asym":
                scale = (g_in.max() - g_in.min()) / (2 ** bits - 1)
            else:
                scale = np.abs(g_in).max() / (2 ** (bits - 1) - 1)
            assert np.all(np.abs(g_out - g_in) <= scale / 2 + 1e-5 * max(np.abs(g_in).max(), 1e-30))


@pytest.mark.parametrize("scheme", ["asym", "sym"])
@pytest.mark.parametrize("granularity", ["channel", "group"])
def test_blocks_of_rows_give_the_same_bytes_as_one_block(monkeypatch, scheme, granularity):
    from wtool.transforms import quantize

    w = np.random.default_rng(3).normal(size=(37, 64)).astype(np.float32)
    w[5, :16] = 0.25  # a constant group inside a later block
    step = Transform.create("quantize", {"bits": 3, "scheme": scheme, "granularity": granularity, "group_size": 16})
    whole = step.apply(w, ctx(w))
    monkeypatch.setattr(quantize, "_BLOCK", 40)  # blocks of 2 groups of 16, or 1 row
    blocked = step.apply(w, ctx(w))
    assert blocked.tobytes() == whole.tobytes()
    np.testing.assert_allclose(blocked, reference(w, 3, scheme, granularity, 16), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bits, expected", [(2, "group"), (4, "group"), (5, "channel"), (8, "channel")])
def test_default_granularity_is_group_128_at_4_bits_and_below(bits, expected):
    """A per-channel 4-bit grid lets one outlier flatten its whole row; the default avoids it."""
    rng = np.random.default_rng(bits)
    w = rng.normal(size=(6, 300)).astype(np.float32)  # 300 = 2 groups of 128 + a tail of 44
    w[2, 7] = 40.0
    out = Transform.create("quantize", {"bits": bits}).apply(w, ctx(w))
    np.testing.assert_allclose(out, reference(w, bits, "asym", expected, 128), rtol=2e-6, atol=1e-4)


def test_explicit_group_granularity_still_refuses_a_tail():
    w = np.ones((2, 300), np.float32)
    with pytest.raises(UsageError, match="remainder=ok"):
        Transform.create("quantize", {"bits": 4, "granularity": "group"}).apply(w, ctx(w))
