"""init: torch's fans and gains (from the committed fixtures/torch_fans.json), the variance of
each scheme within sampling error, and draws that depend only on seed and tensor name."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from wtool.errors import UsageError
from wtool.tensor import TensorInfo
from wtool.transforms import Context, Transform
from wtool.transforms.init import calculate_gain, fans

TORCH = json.loads((Path(__file__).parents[2] / "fixtures" / "torch_fans.json").read_text())


def draw(options, shape=(512, 256), name="w", dtype=np.float32, code="F32"):
    step = Transform.create("init", options)
    return step.apply(np.zeros(shape, dtype), Context(TensorInfo(name, code, tuple(shape))))


@pytest.mark.parametrize("row", TORCH["fans"], ids=lambda r: "x".join(map(str, r["shape"])))
def test_fans_match_torch(row):
    assert fans(tuple(row["shape"])) == (row["fan_in"], row["fan_out"])


@pytest.mark.parametrize("row", TORCH["gains"], ids=lambda r: f"{r['nonlinearity']}-{r.get('negative_slope')}")
def test_gains_match_torch(row):
    assert calculate_gain(row["nonlinearity"], row.get("negative_slope")) == pytest.approx(row["gain"], rel=1e-12)
    options = {"nonlinearity": row["nonlinearity"]}
    if row.get("negative_slope") is not None:
        options["negative_slope"] = row["negative_slope"]
    assert Transform.create("init", options).gain == pytest.approx(row["gain"], rel=1e-12)


@pytest.mark.parametrize("row", TORCH["draws"], ids=lambda r: r["function"] + str(r["kwargs"]))
def test_spread_matches_torch_draws(row):
    """Our formula's std agrees with the std of torch's own draw (524288 samples: ~0.1% error)."""
    step = Transform.create("init", row["options"])
    assert step.std(tuple(row["shape"])) == pytest.approx(row["std"], rel=0.01)
    ours = draw(row["options"], row["shape"])
    assert float(ours.std()) == pytest.approx(row["std"], rel=0.01)
    if row["options"].get("dist") == "uniform":  # same support: ±√3·std
        assert float(np.abs(ours).max()) == pytest.approx(row["absmax"], rel=0.001)


def test_fans_need_two_dims():
    with pytest.raises(UsageError, match="at least 2 dimensions"):
        fans((5,))


CASES = [
    ({}, lambda fi, fo: 2 / (fi + fo)),
    ({"scheme": "glorot", "gain": 3.0}, lambda fi, fo: 9 * 2 / (fi + fo)),
    ({"scheme": "xavier", "nonlinearity": "tanh"}, lambda fi, fo: (5 / 3) ** 2 * 2 / (fi + fo)),
    ({"scheme": "he"}, lambda fi, fo: 2 / fi),
    ({"scheme": "kaiming", "mode": "fan_out"}, lambda fi, fo: 2 / fo),
    ({"scheme": "he", "nonlinearity": "leaky_relu"}, lambda fi, fo: 2 / (1 + 0.01 ** 2) / fi),
    ({"scheme": "he", "nonlinearity": "leaky_relu", "negative_slope": 0.3, "mode": "fan_out"},
     lambda fi, fo: 2 / (1 + 0.09) / fo),
    ({"scheme": "he", "gain": 0.5}, lambda fi, fo: 0.25 / fi),
    ({"scheme": "he", "nonlinearity": "selu"}, lambda fi, fo: 0.5625 / fi),
]


@pytest.mark.parametrize("dist", ["normal", "uniform"])
@pytest.mark.parametrize("shape", [(384, 256), (64, 32, 3, 3), (96, 40, 5)], ids=str)
@pytest.mark.parametrize("options,variance", CASES, ids=lambda c: str(c) if isinstance(c, dict) else "")
def test_sample_moments_match_the_formula(options, variance, shape, dist):
    fan_in, fan_out = fans(shape)
    want = variance(fan_in, fan_out)
    values = draw(options | {"dist": dist}, shape).astype(np.float64).ravel()
    n = values.size
    # kurtosis 3 (normal) or 1.8 (uniform): the sample variance's relative error is sqrt((κ-1)/n)
    kurtosis = 3.0 if dist == "normal" else 1.8
    assert abs(values.mean()) < 6 * math.sqrt(want / n)
    assert values.var() == pytest.approx(want, rel=6 * math.sqrt((kurtosis - 1) / n))
    if dist == "uniform":
        bound = math.sqrt(3 * want)
        assert np.abs(values).max() <= bound * (1 + 1e-6)
        assert np.abs(values).max() > 0.99 * bound


def test_defaults_are_xavier_normal_gain_one():
    step = Transform.create("init", {})
    assert step.scheme == "xavier" and step.gain == 1.0
    assert step.std((300, 100)) == pytest.approx(math.sqrt(2 / 400))
    he = Transform.create("init", {"scheme": "he"})
    assert he.gain == pytest.approx(math.sqrt(2)) and he.std((300, 100)) == pytest.approx(math.sqrt(2 / 100))


def test_aliases_draw_identical_values():
    assert np.array_equal(draw({"scheme": "glorot"}), draw({"scheme": "xavier"}))
    assert np.array_equal(draw({"scheme": "kaiming"}), draw({"scheme": "he"}))


def test_same_seed_same_bytes_other_seed_other_values():
    a = draw({"scheme": "he", "seed": 7}, name="layers.0.weight")
    b = draw({"scheme": "he", "seed": 7}, name="layers.0.weight")
    assert a.tobytes() == b.tobytes()
    assert not np.array_equal(a, draw({"scheme": "he", "seed": 8}, name="layers.0.weight"))
    assert not np.array_equal(a, draw({"scheme": "he", "seed": 7}, name="layers.1.weight"))


def test_values_do_not_depend_on_order_or_other_tensors():
    step = Transform.create("init", {"seed": 3})
    shapes = {"a.weight": (8, 4), "b.weight": (16, 8), "c.weight": (4, 4, 3)}

    def run(names):
        return {n: step.apply(np.zeros(shapes[n], np.float32), Context(TensorInfo(n, "F32", shapes[n])))
                for n in names}

    alone = run(["b.weight"])
    forward = run(["a.weight", "b.weight", "c.weight"])
    backward = run(["c.weight", "b.weight", "a.weight"])
    assert alone["b.weight"].tobytes() == forward["b.weight"].tobytes() == backward["b.weight"].tobytes()
    for name in shapes:
        assert forward[name].tobytes() == backward[name].tobytes()


def test_input_values_are_ignored_and_not_mutated():
    weights = np.full((32, 16), np.nan, np.float32)
    out = Transform.create("init", {"seed": 1}).apply(weights, Context(TensorInfo("w", "BF16", (32, 16))))
    assert np.isnan(weights).all()
    assert np.isfinite(out).all() and out.dtype == np.float32 and out.shape == (32, 16)
    assert np.array_equal(out, draw({"seed": 1}, (32, 16)))


def test_init_float64_stays_float64():
    out = draw({"scheme": "he"}, (64, 64), dtype=np.float64, code="F64")
    assert out.dtype == np.float64


def test_value_fills_any_float_tensor():
    step = Transform.create("init", {"value": "0.25"})
    for shape in [(3,), (), (2, 3, 4)]:
        out = step.apply(np.full(shape, np.nan, np.float32), Context(TensorInfo("b", "F32", shape)))
        assert out.shape == shape and out.dtype == np.float32 and np.all(out == 0.25)


def test_skip_rules():
    scheme, fill = Transform.create("init", {}), Transform.create("init", {"value": 1.0})
    assert scheme.skip(TensorInfo("w", "BF16", (4, 4))) is None
    one_d = scheme.skip(TensorInfo("b", "F32", (4,)))
    assert one_d.hard and "value=" in one_d.reason
    soft = fill.skip(TensorInfo("b", "F32", (4,)))
    assert soft is not None and not soft.hard
    assert fill.skip(TensorInfo("w", "F16", (4, 4))) is None
    assert scheme.skip(TensorInfo("ids", "I64", (4, 4))).hard


def test_one_d_without_value_is_refused_by_apply():
    step = Transform.create("init", {})
    with pytest.raises(UsageError, match="'norm.weight'.*value="):
        step.apply(np.zeros(8, np.float32), Context(TensorInfo("norm.weight", "F32", (8,))))


def test_zero_size_tensor():
    assert draw({}, (0, 4)).shape == (0, 4)


@pytest.mark.parametrize("options,message", [
    ({"value": 0.0, "scheme": "he"}, "value=0.0 fills a constant; it takes no scheme"),
    ({"value": 1.0, "dist": "uniform", "gain": 2.0}, "no dist, gain"),
    ({"gain": 2.0, "nonlinearity": "relu"}, "gain or nonlinearity, not both"),
    ({"negative_slope": 0.2}, "negative_slope applies only to nonlinearity=leaky_relu"),
    ({"nonlinearity": "relu", "negative_slope": 0.2}, "negative_slope applies only"),
    ({"mode": "fan_out"}, "mode is a He"),
    ({"scheme": "glorot", "mode": "fan_in"}, "mode is a He"),
    ({"scheme": "lecun"}, "expected one of"),
    ({"dist": "gaussian"}, "expected one of"),
    ({"nonlinearity": "gelu"}, "expected one of"),
    ({"gain": 0}, "must be > 0"),
    ({"seed": -1}, "must be >= 0"),
    ({"sheme": "he"}, "did you mean 'scheme'"),
])
def test_init_bad_options(options, message):
    with pytest.raises(UsageError, match=message):
        Transform.create("init", options)


def test_example_spec_parses():
    from wtool.transforms.init import Init

    name, _, options = Init.example.partition(":")
    step = Transform.create(name, dict(kv.split("=") for kv in options.split(",")))
    assert step.scheme == "he"
