"""Folding transforms end to end through files: sharded checkpoints with companions in different
shards, float32 and bfloat16, against torch's own folded weights (fixtures/reference/)."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import load_file

from wtool import Pipeline, open_checkpoint, run
from wtool.io import create_writer
from wtool.tensor import TensorInfo

REFERENCE = Path(__file__).parents[2] / "fixtures" / "reference"
MANIFEST = json.loads((REFERENCE / "manifest.json").read_text())["cases"]
OPS = {"weight_norm": "fold-weight-norm", "spectral_norm": "fold-spectral-norm", "prune": "fold-prune"}
CASES = [case for case in MANIFEST if any(case.startswith(prefix) for prefix in OPS)]


def spec_for(case: str) -> str:
    op = next(op for prefix, op in OPS.items() if case.startswith(prefix))
    dim = MANIFEST[case].get("dim")
    return f"{op}:dim={dim}" if dim is not None and op == "fold-spectral-norm" else op


def one_tensor_per_shard(tensors: dict[str, np.ndarray], folder: Path, dtype=None) -> Path:
    """Write a sharded folder where every tensor sits in its own shard, in reversed order."""
    names = list(tensors)[::-1]
    arrays = {n: tensors[n].astype(dtype) if dtype and tensors[n].dtype == np.float32 else tensors[n] for n in names}
    code = {np.dtype(np.float32): "F32", np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.int64): "I64"}
    infos = [TensorInfo(n, code[arrays[n].dtype], arrays[n].shape) for n in names]
    with create_writer(folder, infos, {"format": "pt"}, max_shard_size=1) as writer:
        for n in names:
            writer.write(n, arrays[n])
    return folder


def read(path: Path) -> dict[str, np.ndarray]:
    with open_checkpoint(path) as reader:
        return {t.name: np.array(reader.read(t.name)) for t in reader.tensors}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_fold_through_a_sharded_checkpoint(case, dtype, tmp_path):
    state = load_file(REFERENCE / f"{case}.safetensors")
    expected = {k.removeprefix("folded."): v for k, v in load_file(REFERENCE / f"{case}.expected.safetensors").items()
                if k.startswith("folded.")}
    source = one_tensor_per_shard(state, tmp_path / "in", dtype)
    assert len(list(source.glob("*.safetensors"))) == len(state) > 1
    report = run(Pipeline.from_specs([spec_for(case)]), source, tmp_path / "out", max_shard_size=10_000)
    result = read(tmp_path / "out")
    for name, want in expected.items():
        got = result[name]
        assert got.dtype == np.dtype(dtype), name
        tolerance = 1e-5 if dtype == np.float32 else 2e-2
        np.testing.assert_allclose(got.astype(np.float32), want, rtol=tolerance,
                                   atol=tolerance * float(np.abs(want).max()))
    consumed = {n for g in report.groups for n in g.dropped}
    assert not consumed & set(result), "dropped companions must not reach the output"
    assert set(report.dropped) == consumed


def test_fold_bn_through_a_bf16_sharded_resnet_block(tmp_path):
    state = load_file(REFERENCE / "batch_norm_resnet_block.safetensors")
    eps = MANIFEST["batch_norm_resnet_block"]["eps"]
    source = one_tensor_per_shard(state, tmp_path / "in", ml_dtypes.bfloat16)
    report = run(Pipeline.from_specs(["fold-bn"]), source, tmp_path / "out")
    result = read(tmp_path / "out")
    assert not any(".bn" in n or "downsample.1" in n for n in result)
    assert {g.note.split()[0] for g in report.groups} >= {"layer1.0.conv1", "layer1.0.conv2", "layer1.0.downsample.0"}
    stored = {k: v.astype(ml_dtypes.bfloat16).astype(np.float64) for k, v in state.items() if v.dtype == np.float32}
    for conv, bn in (("layer1.0.conv1", "layer1.0.bn1"), ("layer1.0.downsample.0", "layer1.0.downsample.1")):
        scale = stored[f"{bn}.weight"] / np.sqrt(stored[f"{bn}.running_var"] + eps)
        weight = stored[f"{conv}.weight"] * scale[:, None, None, None]
        bias = stored.get(f"{conv}.bias", 0.0) - stored[f"{bn}.running_mean"]
        bias = bias * scale + stored[f"{bn}.bias"]
        np.testing.assert_allclose(result[f"{conv}.weight"].astype(np.float64), weight, rtol=1e-2, atol=1e-2)
        np.testing.assert_allclose(result[f"{conv}.bias"].astype(np.float64), bias, rtol=1e-2, atol=1e-2)
        assert result[f"{conv}.bias"].dtype == ml_dtypes.bfloat16


@pytest.mark.parametrize("spec", ["weight-norm:norm=2.0", "spectral-norm:target=1.5", "standardize"])
def test_slice_transforms_through_a_bf16_sharded_checkpoint(spec, tmp_path):
    rng = np.random.default_rng(0)
    state = {"conv.weight": rng.normal(size=(6, 3, 3, 3)).astype(np.float32),
             "fc.weight": rng.normal(size=(10, 12)).astype(np.float32), "fc.bias": rng.normal(size=10).astype(np.float32)}
    source = one_tensor_per_shard(state, tmp_path / "in", ml_dtypes.bfloat16)
    report = run(Pipeline.from_specs([spec]), source, tmp_path / "out", max_shard_size=1000)
    result = read(tmp_path / "out")
    assert result["fc.bias"].tobytes() == state["fc.bias"].astype(ml_dtypes.bfloat16).tobytes()  # 1-D: skipped
    for name in ("conv.weight", "fc.weight"):
        w = result[name].astype(np.float64)
        assert result[name].dtype == ml_dtypes.bfloat16
        rows = w.reshape(w.shape[0], -1)
        if spec.startswith("weight-norm"):
            np.testing.assert_allclose(np.linalg.norm(rows, axis=1), 2.0, rtol=2e-2)
        elif spec.startswith("spectral-norm"):
            np.testing.assert_allclose(np.linalg.svd(rows, compute_uv=False)[0], 1.5, rtol=2e-2)
            record = next(r for r in report.tensors if r.name == name)
            assert record.extras["spectral-norm.sigma_after"] == pytest.approx(1.5, rel=1e-4)
        else:
            np.testing.assert_allclose(rows.mean(axis=1), 0, atol=2e-2)
            np.testing.assert_allclose(rows.std(axis=1), 1, rtol=2e-2)
