"""decay, share and init end to end on sharded bfloat16 checkpoints (companions streamed by name)."""

from __future__ import annotations

import ml_dtypes
import numpy as np

from wtool import Pipeline, open_checkpoint, run
from wtool.io import create_writer
from wtool.selection import Selector
from wtool.tensor import TensorInfo

BF16 = ml_dtypes.bfloat16


def sharded(folder, tensors):
    infos = [TensorInfo(n, "BF16", a.shape) for n, a in tensors.items()]
    with create_writer(folder, infos, {}, max_shard_size=1) as writer:
        for n, a in tensors.items():
            writer.write(n, a)
    return folder


def read(path):
    with open_checkpoint(path) as reader:
        return {t.name: np.array(reader.read(t.name)) for t in reader.tensors}


def model(seed=0):
    rng = np.random.default_rng(seed)
    return {"a.weight": rng.normal(size=(16, 8)).astype(BF16), "a.bias": rng.normal(size=16).astype(BF16),
            "b.weight": rng.normal(size=(4, 2, 3, 3)).astype(BF16)}


def test_decay_with_sharded_grads_and_anchor(tmp_path):
    weights = model(0)
    grads = {k: v for k, v in model(1).items() if k != "a.bias"}
    anchor = model(2)
    source = sharded(tmp_path / "w", weights)
    sharded(tmp_path / "g", grads)
    sharded(tmp_path / "ref", anchor)
    lr, wd = 0.1, 0.5
    spec = f"decay:lr={lr},wd={wd},grads={tmp_path / 'g'},missing=zero"
    run(Pipeline.from_specs([spec]), source, tmp_path / "out")
    result = read(tmp_path / "out")
    for name, w in weights.items():
        w32 = w.astype(np.float32)
        g = grads[name].astype(np.float32) if name in grads else 0.0
        expected = w32.astype(np.float64) - lr * (np.asarray(g, np.float64) + wd * w32.astype(np.float64))
        # computed in float32 then stored as bf16: within one bf16 rounding step (2^-8 relative)
        np.testing.assert_allclose(result[name].astype(np.float64), expected, rtol=2 ** -8, atol=1e-6)
        assert result[name].dtype == BF16
    run(Pipeline.from_specs([f"decay:lr={lr},wd={wd},anchor={tmp_path / 'ref'}"]), source, tmp_path / "l2sp")
    result = read(tmp_path / "l2sp")
    for name, w in weights.items():
        w32, ref = w.astype(np.float32), anchor[name].astype(np.float32)
        np.testing.assert_allclose(result[name].astype(np.float32),
                                   (w32 - lr * wd * (w32 - ref)).astype(BF16).astype(np.float32), rtol=1e-2, atol=1e-2)


def test_share_on_a_sharded_bf16_checkpoint(tmp_path):
    source = sharded(tmp_path / "w", model(0))
    report = run(Pipeline.from_specs(["share:clusters=4"]), source, tmp_path / "out")
    result = read(tmp_path / "out")
    for name in ("a.weight", "b.weight"):
        assert len(np.unique(result[name])) <= 4
        record = next(r for r in report.tensors if r.name == name)
        assert record.extras["share.distinct"] <= 4
    np.testing.assert_array_equal(result["a.bias"], model(0)["a.bias"])  # 1-D: skipped by default


def test_init_is_independent_of_order_and_selection(tmp_path):
    weights = model(0)
    source = sharded(tmp_path / "w", weights)
    reversed_source = sharded(tmp_path / "r", dict(reversed(list(weights.items()))))
    run(Pipeline.from_specs(["init:scheme=he,seed=3"]), source, tmp_path / "one")
    run(Pipeline.from_specs(["init:scheme=he,seed=3"]), reversed_source, tmp_path / "two")
    run(Pipeline.from_specs(["init:scheme=he,seed=3"], selector=Selector(("b.*",))), source, tmp_path / "three")
    one, two, three = read(tmp_path / "one"), read(tmp_path / "two"), read(tmp_path / "three")
    assert one["b.weight"].tobytes() == two["b.weight"].tobytes() == three["b.weight"].tobytes()
    assert one["a.weight"].tobytes() == two["a.weight"].tobytes()
    assert three["a.weight"].tobytes() == weights["a.weight"].tobytes()
    assert one["b.weight"].dtype == BF16
    std = float(np.std(one["a.weight"].astype(np.float64)))
    assert 0.5 * np.sqrt(2 / 8) < std < 1.5 * np.sqrt(2 / 8)  # He: Var = 2/fan_in
