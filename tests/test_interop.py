"""wtool's output loads in the libraries people use: safetensors' torch API, transformers, compressed-tensors.

Optional: skipped unless torch is installed (transformers and compressed-tensors each skip their own
tests). Run them in the reference venv:

    PYTHONPATH=. .venv-ref/bin/python -m pytest -q tests/test_interop.py

Every check compares against what torch/transformers compute themselves, never against wtool's reader.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from safetensors import safe_open
from typer.testing import CliRunner

import wtool
from wtool.cli import app
from wtool.tensor import TensorInfo

runner = CliRunner()

#: safetensors code -> (numpy dtype wtool is given, torch dtype torch must report); written out here,
#: not taken from wtool.dtypes, so a wrong entry there shows up as a mismatch.
DTYPES = {
    "F64": (np.float64, torch.float64), "F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
    "BF16": (ml_dtypes.bfloat16, torch.bfloat16),
    "F8_E4M3": (ml_dtypes.float8_e4m3fn, torch.float8_e4m3fn), "F8_E5M2": (ml_dtypes.float8_e5m2, torch.float8_e5m2),
    "I64": (np.int64, torch.int64), "I32": (np.int32, torch.int32), "I16": (np.int16, torch.int16),
    "I8": (np.int8, torch.int8), "U64": (np.uint64, torch.uint64), "U32": (np.uint32, torch.uint32),
    "U16": (np.uint16, torch.uint16), "U8": (np.uint8, torch.uint8), "BOOL": (np.bool_, torch.bool),
}


def invoke(*args: object) -> None:
    result = runner.invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output


def random_bits(dtype: np.dtype, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Every bit pattern is fair game (NaN payloads, -0, subnormals), except BOOL which must be 0/1."""
    dtype = np.dtype(dtype)
    if dtype == np.bool_:
        return rng.random(shape) < 0.5
    raw = rng.integers(0, 256, size=(*shape, dtype.itemsize), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def torch_bytes(tensor) -> bytes:
    return tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def load_torch(path: Path) -> tuple[dict, list[dict[str, str]]]:
    """All tensors of a .safetensors file or a sharded folder through safetensors.torch, plus each file's metadata."""
    if path.is_dir():
        index = json.loads((path / "model.safetensors.index.json").read_text())
        files = sorted({path / shard for shard in index["weight_map"].values()})
        assert set(p.name for p in path.glob("*.safetensors")) == {f.name for f in files}
    else:
        files = [path]
    tensors, metadata = {}, []
    for file in files:
        loaded = safetensors_torch.load_file(file)
        assert not set(loaded) & set(tensors), f"{file}: a tensor appears in two shards"
        tensors.update(loaded)
        with safe_open(file, "pt") as handle:
            metadata.append(handle.metadata())
    return tensors, metadata


# --- safetensors.torch ------------------------------------------------------------------------------


def test_torch_reads_every_dtype_wtool_writes_bit_exact(tmp_path):
    rng = np.random.default_rng(0)
    shapes = [(3, 5), (7,), (), (0, 4)]
    arrays = {f"{code}.{i}": random_bits(np.dtype(DTYPES[code][0]), shape, rng)
              for code in DTYPES for i, shape in enumerate(shapes)}
    infos = [TensorInfo(name, name.split(".")[0], array.shape) for name, array in arrays.items()]
    out = tmp_path / "all.safetensors"
    with wtool.create_writer(out, infos, {"note": "x"}) as writer:
        for info in infos:
            writer.write(info.name, arrays[info.name])
    loaded, (metadata,) = load_torch(out)
    assert set(loaded) == set(arrays)
    for name, array in arrays.items():
        tensor = loaded[name]
        assert tensor.dtype == DTYPES[name.split(".")[0]][1], name
        assert tuple(tensor.shape) == array.shape, name
        assert torch_bytes(tensor) == array.tobytes(), name
    assert metadata["note"] == "x"


@pytest.mark.parametrize("output", ["copy.safetensors", "copy_folder"])
def test_a_file_torch_wrote_round_trips_through_wtool_bit_exact(tmp_path, output):
    generator = torch.Generator().manual_seed(0)
    source = {}
    for code, (_, dtype) in DTYPES.items():
        if dtype == torch.bool:
            source[code] = torch.randint(0, 2, (4, 6), generator=generator).bool()
        else:
            raw = torch.randint(0, 256, (4, 6 * dtype.itemsize), dtype=torch.uint8, generator=generator)
            source[code] = raw.view(dtype)
    src = tmp_path / "torch.safetensors"
    safetensors_torch.save_file(source, src)          # no metadata: wtool must add format: pt
    out = tmp_path / output
    shard = {"max_shard_size": 200} if output.endswith("folder") else {}
    wtool.run(wtool.Pipeline(), src, out, **shard)
    loaded, metadata = load_torch(out)
    assert set(loaded) == set(source)
    for name, tensor in source.items():
        assert loaded[name].dtype == tensor.dtype and loaded[name].shape == tensor.shape, name
        assert torch_bytes(loaded[name]) == torch_bytes(tensor), name
    if shard:
        assert len(metadata) > 1
    for meta in metadata:
        assert meta["format"] == "pt"
        assert json.loads(meta["wtool"])["steps"] == []


# --- transformers -----------------------------------------------------------------------------------

INPUT_IDS = torch.tensor([[1, 17, 42, 99, 3, 64, 127, 5, 8, 77, 12, 0, 31, 90, 2, 55],
                          [7, 7, 7, 120, 33, 18, 61, 94, 100, 4, 2, 9, 44, 80, 15, 126]])


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers")


def make_llama(transformers, folder: Path, dtype) -> None:
    """A tiny seeded Llama with non-trivial norm gains (fresh ones would make fold-norm a no-op)."""
    config = transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=128, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      tie_word_embeddings=False, initializer_range=0.1)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("norm.weight"):
                parameter.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("*.safetensors"))) > 1, "the source should be sharded"


@pytest.fixture(scope="module")
def llama_dir(transformers, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("llama") / "model"
    make_llama(transformers, folder, torch.float32)
    return folder


def load_model(transformers, folder: Path, dtype=torch.float32):
    """Load through transformers, refusing any missing, unexpected or mismatched key."""
    model, info = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info.get(kind), f"{folder}: {kind}: {info[kind]}"
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model.float()(INPUT_IDS).logits


def with_config(source: Path, output: Path) -> Path:
    """A loadable folder for `output` (a folder or one file); wtool does not copy config.json itself."""
    folder = output if output.is_dir() else output.parent / (output.stem + "_model")
    if not output.is_dir():
        folder.mkdir()
        shutil.move(output, folder / "model.safetensors")
    shutil.copy(source / "config.json", folder / "config.json")
    return folder


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm())


def test_sharded_copy_loads_in_transformers_with_identical_logits(transformers, llama_dir, tmp_path):
    out = tmp_path / "copy"
    invoke("apply", llama_dir, out, "--max-shard-size", "200KB")
    assert len(list(out.glob("*.safetensors"))) > 1
    expected = logits(load_model(transformers, llama_dir))
    assert torch.equal(logits(load_model(transformers, with_config(llama_dir, out))), expected)


def test_single_file_copy_loads_in_transformers_with_identical_logits(transformers, llama_dir, tmp_path):
    out = tmp_path / "copy.safetensors"
    invoke("apply", f"{llama_dir}/", out)
    expected = logits(load_model(transformers, llama_dir))
    assert torch.equal(logits(load_model(transformers, with_config(llama_dir, out))), expected)


@pytest.mark.parametrize(("dtype", "tolerance"), [(torch.float32, 1e-5), (torch.bfloat16, 1.5e-2)])
def test_fold_norm_keeps_the_logits_of_the_real_model(transformers, tmp_path, dtype, tolerance):
    source = tmp_path / "model"
    make_llama(transformers, source, dtype)
    out = tmp_path / "folded"
    invoke("apply", source, out, "-t", "fold-norm")
    before = load_model(transformers, source, dtype)
    after = load_model(transformers, with_config(source, out), dtype)
    for name, parameter in after.named_parameters():
        if name.endswith("norm.weight"):
            assert torch.all(parameter == 1), f"{name} was not folded"
    folded = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj", "lm_head"]
    original = dict(before.named_parameters())
    for name, parameter in after.named_parameters():
        if any(f"{leaf}.weight" in name for leaf in folded):
            assert not torch.equal(parameter, original[name]), f"{name} did not take a gain"
        elif "norm" not in name:
            assert torch.equal(parameter, original[name]), f"{name} changed"
    expected = logits(before)
    assert rel_l2(expected, logits(after)) < tolerance


def test_channel_quantized_model_loads_and_stays_close(transformers, llama_dir, tmp_path):
    out = tmp_path / "q8"
    invoke("apply", llama_dir, out, "-t", "quantize:bits=8,granularity=channel")
    before = load_model(transformers, llama_dir)
    after = load_model(transformers, with_config(llama_dir, out))
    weight = after.model.layers[0].self_attn.q_proj.weight.detach()
    assert not torch.equal(weight, before.model.layers[0].self_attn.q_proj.weight)
    assert max(len(torch.unique(row)) for row in weight) <= 256
    assert torch.equal(after.model.norm.weight, before.model.norm.weight)  # 1-D: skipped by quantize
    a, b = logits(before).flatten(), logits(after).flatten()
    assert float(torch.nn.functional.cosine_similarity(a, b, dim=0)) > 0.999  # 2-bit per-tensor gives ~0.1


def test_output_metadata_is_what_transformers_needs(transformers, llama_dir, tmp_path):
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    state, _ = load_torch(llama_dir)
    safetensors_torch.save_file(state, stripped / "model.safetensors")     # no `format` key at all
    out = tmp_path / "out"
    invoke("apply", stripped, out, "--max-shard-size", "200KB", "-t", "clip:c=10")
    _, metadata = load_torch(out)
    for meta in metadata:
        assert meta["format"] == "pt"
        assert json.loads(meta["wtool"])["steps"][0]["op"] == "clip"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    sizes = sum(t.numel() * t.element_size() for t in load_torch(out)[0].values())
    assert index["metadata"]["total_size"] == sizes
    load_model(transformers, with_config(llama_dir, out))


# --- compressed-tensors -----------------------------------------------------------------------------


@pytest.mark.parametrize("output", ["out", "out.safetensors"])
def test_compressed_tensors_helpers_read_wtool_output(llama_dir, tmp_path, output):
    pytest.importorskip("compressed_tensors")
    from compressed_tensors.utils.safetensors_load import (
        get_safetensors_header, get_weight_mappings, load_tensors_from_inverse_weight_map)

    out = tmp_path / output
    invoke("apply", llama_dir, out, *(["--max-shard-size", "200KB"] if output == "out" else []))
    mapping = get_weight_mappings(str(out))
    source, _ = load_torch(llama_dir)
    assert set(mapping) == set(source)
    inverse: dict[str, list[str]] = {}
    for name, file in mapping.items():
        inverse.setdefault(file, []).append(name)
    for file in inverse:  # compressed-tensors parses headers by hand: check the layout it sees
        header = get_safetensors_header(file)
        header.pop("__metadata__", None)
        spans = sorted(entry["data_offsets"] for entry in header.values())
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        with open(file, "rb") as handle:
            (header_size,) = struct.unpack("<Q", handle.read(8))
        assert 8 + header_size + spans[-1][1] == Path(file).stat().st_size
    loaded = load_tensors_from_inverse_weight_map(inverse)
    assert set(loaded) == set(source)
    for name, tensor in source.items():
        assert torch.equal(loaded[name], tensor), name
