"""decay: the step against an independent float64 computation, with and without gradients and
an anchor; missing or misshapen companions; and one run through the pipeline with real files."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

import wtool
from wtool.errors import InputError, UsageError
from wtool.tensor import TensorInfo
from wtool.transforms import Context, Transform

RNG = np.random.default_rng(0)
W = RNG.normal(size=(6, 5)).astype(np.float32)
G = RNG.normal(size=(6, 5)).astype(np.float32)
REF = RNG.normal(size=(6, 5)).astype(np.float32)


def step(**options):
    return Transform.create("decay", {k: str(v) for k, v in options.items()})


def ctx(name="layer.weight", shape=(6, 5), code="F32", **companions):
    return Context(TensorInfo(name, code, shape), companions=companions)


def expected(w, lr, wd, g=None, ref=None):
    """w - lr * (g + wd * (w - ref)) in float64, written out independently of the transform."""
    w64 = w.astype(np.float64)
    g64 = np.zeros_like(w64) if g is None else g.astype(np.float64)
    r64 = np.zeros_like(w64) if ref is None else ref.astype(np.float64)
    return w64 - lr * (g64 + wd * (w64 - r64))


def close(out, want):
    """float32 result of a few roundings: within a handful of ulps of the exact value."""
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, want, rtol=4e-7, atol=4e-7 * np.abs(want).max())


def test_plain_decay_is_a_shrink():
    out = step(lr=0.1, wd=0.5).apply(W, ctx())
    close(out, expected(W, 0.1, 0.5))
    close(out, W.astype(np.float64) * (1 - 0.05))


def test_with_gradients():
    s = step(lr=0.01, wd=0.1, grads="g.safetensors")
    close(s.apply(W, ctx(grads=G)), expected(W, 0.01, 0.1, g=G))


def test_gradients_without_decay():
    close(step(lr=0.3, grads="g.npz").apply(W, ctx(grads=G)), expected(W, 0.3, 0.0, g=G))


def test_with_anchor():
    s = step(lr=0.2, wd=0.5, anchor="base.safetensors")
    out = s.apply(W, ctx(anchor=REF))
    close(out, expected(W, 0.2, 0.5, ref=REF))
    # pulled toward the anchor: every distance shrinks by exactly (1 - lr*wd)
    close(out - REF, (W.astype(np.float64) - REF) * 0.9)


def test_with_gradients_and_anchor():
    s = step(lr=0.05, wd=0.3, grads="g", anchor="a")
    close(s.apply(W, ctx(grads=G, anchor=REF)), expected(W, 0.05, 0.3, g=G, ref=REF))


def test_companion_paths_lists_only_given_ones():
    assert step(lr=1, wd=1).companion_paths() == {}
    assert step(lr=1, grads="g.safetensors").companion_paths() == {"grads": "g.safetensors"}
    assert step(lr=1, wd=1, grads="g", anchor="a").companion_paths() == {"grads": "g", "anchor": "a"}


def test_missing_gradient_is_an_error_naming_tensor_and_file():
    s = step(lr=0.1, wd=0.1, grads="runs/grads.safetensors")
    with pytest.raises(InputError, match=r"'layer.weight' has no gradient in runs/grads.safetensors"):
        s.apply(W, ctx(grads=None))
    with pytest.raises(InputError, match="no gradient"):  # role absent altogether: same rule
        s.apply(W, ctx())


def test_missing_zero_treats_gradient_as_zero():
    s = step(lr=0.1, wd=0.1, grads="g.safetensors", missing="zero")
    close(s.apply(W, ctx(grads=None)), expected(W, 0.1, 0.1))


def test_missing_anchor_same_rule():
    with pytest.raises(InputError, match="'layer.weight' has no anchor tensor in base.npz"):
        step(lr=0.1, wd=0.1, anchor="base.npz").apply(W, ctx(anchor=None))
    out = step(lr=0.1, wd=0.1, anchor="base.npz", missing="zero").apply(W, ctx(anchor=None))
    close(out, expected(W, 0.1, 0.1))


@pytest.mark.parametrize("role", ["grads", "anchor"])
def test_shape_mismatch_is_an_error_even_with_missing_zero(role):
    s = step(lr=0.1, wd=0.1, missing="zero", **{role: "other.safetensors"})
    with pytest.raises(InputError, match=r"'layer.weight' has shape \[6, 5\] but its .* in "
                                         r"other.safetensors has shape \[5, 6\]"):
        s.apply(W, ctx(**{role: G.T.copy()}))


def test_bf16_weights_and_gradients():
    """bf16 on disk, float32 in compute (as the pipeline passes them), bf16 again on output."""
    w16 = (RNG.normal(size=(64, 32)) * 0.02).astype(ml_dtypes.bfloat16)
    g16 = (RNG.normal(size=(64, 32)) * 0.001).astype(ml_dtypes.bfloat16)
    s = step(lr=1e-3, wd=0.1, grads="g")
    out = s.apply(w16.astype(np.float32), ctx(shape=(64, 32), code="BF16", grads=g16.astype(np.float32)))
    stored = out.astype(ml_dtypes.bfloat16)
    want = expected(w16.astype(np.float32), 1e-3, 0.1, g=g16.astype(np.float32)).astype(np.float32)
    close(out, want)
    # the same bf16 value, or one of its neighbours where the exact result sits on a rounding edge
    ulp = np.abs(want) * 2.0 ** -7
    assert np.all(np.abs(stored.astype(np.float32) - want) <= ulp)


def test_float64_stays_float64_and_exact():
    w = RNG.normal(size=(4, 4))
    out = step(lr=0.1, wd=0.2).apply(w, ctx(shape=(4, 4), code="F64"))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out, w * (1 - 0.02), rtol=1e-15)


def test_inputs_are_not_mutated():
    w, g, r = W.copy(), G.copy(), REF.copy()
    step(lr=0.1, wd=0.1, grads="g", anchor="a").apply(w, ctx(grads=g, anchor=r))
    assert np.array_equal(w, W) and np.array_equal(g, G) and np.array_equal(r, REF)


def test_applies_to_every_float_tensor():
    s = step(lr=0.1, wd=0.1)
    for shape in [(), (7,), (3, 4), (2, 3, 4, 5)]:
        assert s.skip(TensorInfo("t", "BF16", shape)) is None
    assert s.skip(TensorInfo("ids", "I64", (3,))).hard


@pytest.mark.parametrize("options,message", [
    ({"lr": 0.1}, "wd=0 and no grads the step changes nothing"),
    ({"lr": 0.1, "grads": "g", "anchor": "a"}, "anchor pulls with strength lr\\*wd; give wd > 0"),
    ({"wd": 0.1}, "missing required parameter 'lr'"),
    ({"lr": 0, "wd": 0.1}, "must be > 0"),
    ({"lr": 0.1, "wd": -1}, "must be >= 0"),
    ({"lr": 0.1, "wd": 0.1, "missing": "skip"}, "expected one of error, zero"),
])
def test_decay_bad_options(options, message):
    with pytest.raises(UsageError, match=message):
        step(**options)


def test_through_the_pipeline_with_companion_files(tmp_path):
    """The companions are really streamed: a safetensors input, npz gradients, safetensors anchor."""
    weights = {"a.weight": W, "a.bias": W[0].copy(), "b.weight": (W * 2).astype(ml_dtypes.bfloat16),
               "steps": np.arange(3, dtype=np.int64)}
    save_file(weights, tmp_path / "model.safetensors")
    np.savez(tmp_path / "grads.npz", **{"a.weight": G, "a.bias": G[0].copy(), "b.weight": G})
    save_file({"a.weight": REF, "a.bias": REF[0].copy(), "b.weight": REF.astype(ml_dtypes.bfloat16)},
              tmp_path / "base.safetensors")
    spec = f"decay:lr=0.1,wd=0.5,grads={tmp_path / 'grads.npz'},anchor={tmp_path / 'base.safetensors'}"
    pipe = wtool.Pipeline.from_specs([spec])
    wtool.run(pipe, tmp_path / "model.safetensors", tmp_path / "out.safetensors")
    with wtool.open_checkpoint(tmp_path / "out.safetensors") as out:
        close(out.read("a.weight"), expected(W, 0.1, 0.5, g=G, ref=REF))
        close(out.read("a.bias"), expected(W[0], 0.1, 0.5, g=G[0], ref=REF[0]))
        b = expected((W * 2).astype(ml_dtypes.bfloat16).astype(np.float32), 0.1, 0.5, g=G,
                     ref=REF.astype(ml_dtypes.bfloat16).astype(np.float32))
        assert np.all(np.abs(out.read("b.weight").astype(np.float64) - b) <= np.abs(b) * 2.0 ** -8)
        assert np.array_equal(out.read("steps"), np.arange(3))


def test_pipeline_names_the_tensor_missing_from_grads(tmp_path):
    save_file({"a.weight": W, "b.weight": W}, tmp_path / "model.safetensors")
    save_file({"a.weight": G}, tmp_path / "grads.safetensors")
    pipe = wtool.Pipeline.from_specs([f"decay:lr=0.1,grads={tmp_path / 'grads.safetensors'}"])
    with pytest.raises(InputError, match="'b.weight' has no gradient in .*grads.safetensors"):
        wtool.run(pipe, tmp_path / "model.safetensors", tmp_path / "out.safetensors")
