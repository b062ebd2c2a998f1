"""Compressed layouts against hand-worked golden vectors (no torch): packing, grids, a group matrix.

Every expected number below was worked out by hand from the compressed-tensors layout
(value + 2^(b-1), first column in the lowest bits) and written as a literal.
"""

from __future__ import annotations

import json

import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file

import wtool
from wtool.errors import InputError
from wtool.compressed import DecompressedReader, dequantize, find_layouts, pack_int32, unpack_int32
from wtool.errors import UsageError
from wtool.io import open_checkpoint
from wtool.tensor import TensorInfo
from wtool.transforms import Context, Transform


def words(*hex_values: int) -> np.ndarray:
    return np.array(hex_values, dtype=np.uint32).view(np.int32)


@pytest.mark.parametrize(("bits", "row", "expected"), [
    (4, [-8, -7, -6, -5, -4, -3, -2, -1], [1985229328]),       # 0x76543210, from the issue
    (4, [1, 2, 3, 4], [52137]),                                   # 0xCBA9, zero-padded
    (8, [-128, -1, 0, 127], list(words(0xFF807F00))),
    (8, [5, -3, 0, 0, 1], list(words(0x80807D85, 0x00000081))),
    (2, [-2, -1, 0, 1], [0xE4]),
    (2, [1] * 17, list(words(0xFFFFFFFF, 0x00000003))),
])
def test_pack_golden(bits, row, expected):
    packed = pack_int32(np.array([row], dtype=np.int8), bits)
    assert packed.dtype == np.int32
    assert packed.tolist() == [expected]
    assert unpack_int32(packed, bits, len(row)).tolist() == [row]


def test_unpack_reads_the_lowest_value():
    """q = -8 is stored as 0: the unpacked value must be -8, not 8."""
    assert unpack_int32(words(0x00000000).reshape(1, 1), 4, 8).tolist() == [[-8] * 8]


# A 2×8 weight, groups of 4, scales chosen as powers of two so every division is exact.
MATRIX = np.array([[0.0, 1.25, -3.75, 3.75, 7.5, -7.5, 1.0, -2.5],
                   [1.0, 2.0, 3.0, 3.75, -15.0, 0.0, 5.0, 15.0]], dtype=np.float32)
SYM_FULL = {  # scale = absmax/7.5, q in [-8, 7], ties to even
    "scale": [[0.5, 1.0], [0.5, 2.0]],
    "q": [[0, 2, -8, 7, 7, -8, 1, -2], [2, 4, 6, 7, -8, 0, 2, 7]],
    "packed": words(0x690FF0A8, 0xFA80FECA).reshape(2, 1),
    "values": [[0.0, 1.0, -4.0, 3.5, 7.0, -8.0, 1.0, -2.0], [1.0, 2.0, 3.0, 3.5, -16.0, 0.0, 4.0, 14.0]],
}


def split(options: dict, w: np.ndarray, dtype: str = "F32", name: str = "m.weight") -> dict[str, np.ndarray]:
    quantize = Transform.create("quantize", options)
    return quantize.apply_split(w, Context(TensorInfo(name, dtype, w.shape)))


def test_group_matrix_sym_full_golden():
    options = {"bits": 4, "scheme": "sym", "sym_range": "full", "granularity": "group", "group_size": 4,
               "storage": "packed"}
    pieces = split(options, MATRIX)
    assert sorted(pieces) == ["m.weight_packed", "m.weight_scale", "m.weight_shape"]
    assert pieces["m.weight_packed"].tolist() == SYM_FULL["packed"].tolist()
    assert pieces["m.weight_scale"].tolist() == SYM_FULL["scale"]
    assert pieces["m.weight_shape"].tolist() == [2, 8]
    fake = dict(options, storage="fake")
    out = Transform.create("quantize", fake).apply(MATRIX, Context(TensorInfo("m.weight", "F32", MATRIX.shape)))
    assert out.tolist() == SYM_FULL["values"]


def test_asym_int_zero_golden():
    """Range widened to include 0; zero = round(-8 - min/scale) is an integer."""
    w = np.array([[-1.5, 0.2, 2.6, 6.0], [1.0, 2.0, 3.0, 7.5]], dtype=np.float32)
    pieces = split({"bits": 4, "granularity": "channel", "storage": "packed"}, w)
    assert pieces["m.weight_scale"].tolist() == [[0.5], [0.5]]
    # zero points -5 and -8, stored +8 = 3 and 0, packed down dim 0 into one word
    assert pieces["m.weight_zero_point"].tolist() == [[3]]
    assert unpack_int32(pieces["m.weight_packed"], 4, 4).tolist() == [[-8, -5, 0, 7], [-6, -4, -2, 7]]
    out = Transform.create("quantize", {"bits": 4, "granularity": "channel", "zero": "int"}).apply(w, Context.of(w))
    assert out.tolist() == [[-1.5, 0.0, 2.5, 6.0], [1.0, 2.0, 3.0, 7.5]]


def test_fp8_golden():
    w = np.array([[448.0, -224.0, 1.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    pieces = split({"type": "fp8"}, w)
    assert pieces["m.weight_scale"].tolist() == [[1.0], [1.0]]
    assert pieces["m.weight"].dtype == ml_dtypes.float8_e4m3fn
    assert pieces["m.weight"].astype(np.float32).tolist() == [[448.0, -224.0, 1.0], [0.0, 0.0, 0.0]]


@pytest.mark.parametrize("options", [
    {"storage": "packed", "bits": 3}, {"storage": "packed", "zero": "float"},
    {"storage": "packed", "granularity": "group", "remainder": "ok"}, {"type": "fp8", "granularity": "group"},
    {"scheme": "sym", "zero": "float", "sym_range": "full"}, {"sym_range": "full"},
])
def test_packed_option_errors(options):
    with pytest.raises(UsageError):
        Transform.create("quantize", options)


DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}


@settings(max_examples=60, deadline=None)
@given(st.sampled_from([2, 4, 8]), st.sampled_from(["asym", "sym"]), st.sampled_from(["narrow", "full"]),
       st.sampled_from(["tensor", "channel", "group"]), st.sampled_from(sorted(DTYPES)),
       st.integers(1, 5), st.integers(1, 4), st.integers(0, 2 ** 32 - 1))
def test_fake_equals_what_the_packed_file_decodes_to(bits, scheme, sym_range, granularity, dtype, out, groups, seed):
    """The issue's contract: same parameters, fake and packed agree once rounded to the storage dtype."""
    rng = np.random.default_rng(seed)
    w = (rng.normal(size=(out, 8 * groups)) * rng.uniform(0.01, 100)).astype(DTYPES[dtype]).astype(np.float32)
    options = {"bits": bits, "scheme": scheme, "granularity": granularity, "group_size": 8, "zero": "int"}
    if scheme == "sym":
        options = dict(options, sym_range=sym_range)
    info = TensorInfo("m.weight", dtype, w.shape)
    fake = Transform.create("quantize", options).apply(w, Context(info)).astype(DTYPES[dtype])
    pieces = Transform.create("quantize", dict(options, storage="packed")).apply_split(w, Context(info))
    stored = {k: v.astype(DTYPES[dtype]) if k.endswith("_scale") else v for k, v in pieces.items()}
    infos = [TensorInfo(k, {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "int32": "I32", "int64": "I64",
                            "int8": "I8"}[str(v.dtype)], v.shape) for k, v in stored.items()]
    (layout,) = find_layouts(_FakeReader(infos, stored, bits))
    decoded = dequantize(layout, stored.__getitem__).astype(DTYPES[dtype])
    np.testing.assert_array_equal(fake.view(np.uint8), decoded.view(np.uint8))


class _FakeReader:
    """Just enough of a Reader for `find_layouts`."""

    def __init__(self, infos, arrays, bits):
        self.tensors, self.path, self._arrays = infos, "memory", arrays
        self.metadata = {"quantization_config": json.dumps(
            {"config_groups": {"g": {"targets": ["m"], "weights": {"num_bits": bits}}}})}

    def config(self):
        return None

    def read(self, name):
        return self._arrays[name]


def test_int4_group128_of_float16_is_at_most_027_of_the_bytes(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {f"layers.{i}.proj.weight": rng.normal(size=(256, 512)).astype(np.float16) for i in range(3)}
    save_file(tensors, tmp_path / "in.safetensors")
    wtool.run(wtool.Pipeline.from_specs(["quantize:bits=4,scheme=sym,granularity=group,group_size=128,"
                                         "storage=packed"]), tmp_path / "in.safetensors", tmp_path / "out.safetensors")
    dense = sum(t.nbytes for t in tensors.values())
    stored = (tmp_path / "out.safetensors").stat().st_size
    assert stored <= 0.27 * dense, stored / dense


def test_single_file_output_carries_the_config_in_metadata(llama, tmp_path):
    out = tmp_path / "out.safetensors"
    report = wtool.run(wtool.Pipeline.from_specs(["quantize:bits=4,granularity=group,group_size=8,storage=packed"]),
                       llama, out)
    with open_checkpoint(out) as reader:
        config = json.loads(reader.metadata["quantization_config"])
        names = [t.name for t in reader.tensors]
    assert "model.layers.0.mlp.up_proj.weight_zero_point" in names
    assert "model.layers.0.mlp.up_proj.weight" not in names
    (group,) = config["config_groups"].values()
    assert sorted(group["targets"]) == ["lm_head", "model.embed_tokens", "model.layers.0.mlp.up_proj",
                                        "model.layers.0.self_attn.q_proj"]
    assert group["weights"] == {**group["weights"], "num_bits": 4, "symmetric": False, "strategy": "group",
                                "group_size": 8, "type": "int"}
    assert any("metadata" in note for note in report.notes)


def test_two_schemes_are_two_config_groups_and_travel_in_config_json(tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "model"
    folder.mkdir()
    tensors = {"attn.q.weight": rng.normal(size=(8, 16)).astype(np.float16),
               "mlp.up.weight": rng.normal(size=(16, 16)).astype(np.float16),
               "mlp.up.bias": rng.normal(size=(16,)).astype(np.float16)}
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({"model_type": "toy"}))
    pipe = wtool.Pipeline.from_specs(["quantize:bits=8,scheme=sym,storage=packed,include=attn.*",
                                      "quantize:bits=4,scheme=sym,granularity=group,group_size=8,storage=packed,"
                                      "include=mlp.*"])
    wtool.run(pipe, folder, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "toy"
    groups = sorted(config["quantization_config"]["config_groups"].values(), key=lambda g: g["targets"])
    assert [(g["targets"], g["weights"]["num_bits"]) for g in groups] == [(["attn.q"], 8), (["mlp.up"], 4)]
    with open_checkpoint(tmp_path / "out") as reader:
        assert reader.info("mlp.up.weight_packed").shape == (16, 2)
        assert reader.info("attn.q.weight_packed").shape == (8, 4)
        assert reader.read("mlp.up.bias").tolist() == tensors["mlp.up.bias"].tolist()


def test_later_steps_leave_the_pieces_alone(llama, tmp_path):
    pipe = wtool.Pipeline.from_specs(["quantize:bits=4,granularity=group,group_size=8,storage=packed",
                                      "clip:c=0.1"], allow_empty=True)
    report = wtool.run(pipe, llama, tmp_path / "out.safetensors")
    assert any(s.name == "lm_head.weight_scale" and "compressed layout" in s.reason for s in report.skipped)


def test_decompressed_reader_sees_dense_weights(llama, tmp_path):
    out = tmp_path / "out.safetensors"
    wtool.run(wtool.Pipeline.from_specs(["quantize:bits=8,scheme=sym,storage=packed"]), llama, out)
    with open_checkpoint(llama) as original, DecompressedReader(open_checkpoint(out)) as dense:
        assert [t.name for t in dense.tensors] == [t.name for t in original.tensors]
        w = original.read("lm_head.weight")
        np.testing.assert_allclose(dense.read("lm_head.weight"), w, atol=np.abs(w).max() / 127)
        assert "quantization_config" not in dense.metadata


def test_decompressed_reader_hands_on_as_stored_only_what_it_passes_through(llama, tmp_path):
    """A dense weight decoded from its layout, or an integer read as float, is not stored as it is
    read; a tensor passed through is, as the inner reader stores it; a layout's piece is no tensor."""
    out = tmp_path / "out.safetensors"
    wtool.run(wtool.Pipeline.from_specs(["quantize:bits=8,scheme=sym,storage=packed"], allow_empty=True), llama, out)
    with DecompressedReader(open_checkpoint(out), as_float=["model.position_ids"]) as dense:
        passed = "model.layers.0.input_layernorm.weight"
        assert "lm_head.weight" in dense.layouts and passed not in dense.layouts
        assert dense.stored("lm_head.weight") is None and dense.stored("model.position_ids") is None
        stored = dense.stored(passed)
        assert stored.offset == dense.inner.stored(passed).offset
        assert stored.read().tobytes() == dense.read(passed).tobytes()
        with pytest.raises(InputError, match="no tensor 'lm_head.weight_packed'"):
            dense.stored("lm_head.weight_packed")


# ------------------------------------------------------------------ the CLI: inspect, decompress, refusals

from typer.testing import CliRunner

from wtool.cli import app


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.fixture
def packed_llama(llama, tmp_path):
    out = tmp_path / "packed.safetensors"
    result = invoke("apply", llama, out, "-t", "quantize:bits=4,granularity=group,group_size=8,storage=packed",
                    "--report", tmp_path / "r.json", "--markdown", tmp_path / "r.md", "--quiet")
    assert result.exit_code == 0, result.output
    return out


def test_apply_reports_one_row_per_compressed_weight(packed_llama, llama, tmp_path):
    """JSON, Markdown and table: `P.weight` with its dense statistics, the error of what the layout
    decodes to, and bytes dense → the sum of its pieces; never a row per piece."""
    data = json.loads((tmp_path / "r.json").read_text())
    names = [t["name"] for t in data["tensors"]]
    assert not any(n.endswith(("_packed", "_scale", "_zero_point", "_shape")) for n in names)
    row = next(t for t in data["tensors"] if t["name"] == "lm_head.weight")
    # 32×16 float32 = 2048 B -> packed 32×2 I32 (256) + scale 32×2 F32 (256) + zero 4×2 I32 (32) + shape 16
    assert (row["shape"], row["dtype"], row["bytes_before"], row["bytes_after"]) == ([32, 16], "F32", 2048, 560)
    assert row["extras"]["quantize.layout"] == "int4 asym group 8"
    assert row["extras"]["quantize.bits_per_weight"] == pytest.approx(560 * 8 / 512)
    with open_checkpoint(llama) as original, DecompressedReader(open_checkpoint(packed_llama)) as dense:
        w, decoded = original.read("lm_head.weight"), dense.read("lm_head.weight")
    assert row["before"]["absmax"] == pytest.approx(float(np.abs(w).max()))
    assert row["after"]["absmax"] == pytest.approx(float(np.abs(decoded).max()))
    assert row["error"]["rel_l2"] == pytest.approx(float(np.linalg.norm(decoded - w) / np.linalg.norm(w)), rel=1e-6)
    assert data["dropped"] == []
    assert data["totals"]["tensors"] == len(names)
    assert data["totals"]["bytes_out"] == packed_llama.stat().st_size - _header_bytes(packed_llama)
    group = next(g for g in data["groups"] if g["inputs"] == ["lm_head.weight"])
    assert (group["bytes_before"], group["bytes_after"], group["layout"]) == (2048, 560, "int4 asym group 8")
    markdown = (tmp_path / "r.md").read_text()
    assert "| `lm_head.weight` | 32×16 | F32 | quantize |" in markdown and "2.05 KB → 560 B |" in markdown
    assert "_packed" not in markdown
    table = invoke("apply", llama, tmp_path / "again.safetensors", "-t",
                   "quantize:bits=4,granularity=group,group_size=8,storage=packed", "--rows", 100)
    assert table.exit_code == 0, table.output
    plan = invoke("apply", llama, tmp_path / "plan.safetensors", "-t",
                  "quantize:bits=4,granularity=group,group_size=8,storage=packed", "--rows", 100, "--dry-run")
    assert plan.exit_code == 0, plan.output
    for output in (table.output, plan.output):
        rows = [line for line in output.splitlines() if line.startswith("│")]
        assert any("lm_head.weight " in line and "2.05 KB → 560 B" in line for line in rows), output
        assert not any(piece in line for line in rows for piece in ("weight_packed", "weight_scale", "weight_shape"))


@pytest.mark.parametrize("options", [["--dry-run"], ["--no-stats"], ["-j", "2"]])
@pytest.mark.parametrize(("spec", "bytes_after"), [
    ("quantize:bits=4,granularity=group,group_size=8,storage=packed", 560),
    ("quantize:type=fp8", 32 * 16 + 32 * 4),  # F8_E4M3 values + one F32 scale per row
])
def test_every_report_of_apply_has_one_row_per_compressed_weight(llama, tmp_path, options, spec, bytes_after):
    result = invoke("apply", llama, tmp_path / "out.safetensors", "-t", spec, "--report", tmp_path / "r.json",
                    "--quiet", *options)
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "r.json").read_text())
    rows = {t["name"]: t for t in data["tensors"]}
    assert not any(n.endswith(("_packed", "_scale", "_zero_point", "_shape")) for n in rows)
    row = rows["lm_head.weight"]
    assert (row["dtype"], row["shape"], row["bytes_before"], row["bytes_after"]) == ("F32", [32, 16], 2048, bytes_after)
    assert (row["error"] is None) == (options != ["-j", "2"])
    assert data["dropped"] == []  # stored as pieces, not dropped


def _header_bytes(path):
    with open(path, "rb") as handle:
        return 8 + int.from_bytes(handle.read(8), "little")


def test_inspect_shows_one_row_per_logical_weight(packed_llama):
    result = invoke("inspect", packed_llama, "--json", "-", "--quiet")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    row = next(t for t in data["tensors"] if t["name"] == "lm_head.weight")
    assert row["shape"] == [32, 16] and row["dtype"] == "F32"
    assert row["layout"]["scheme"] == "int4 asym group 8"
    assert row["layout"]["bits_per_weight"] == pytest.approx(560 * 8 / 512, abs=1e-4)
    assert row["layout"]["ratio"] == pytest.approx(2048 / 560, abs=1e-4)
    assert not any(t["name"].endswith("_packed") for t in data["tensors"])
    assert data["totals"]["bytes"] < data["totals"]["dense_bytes"]


def test_decompress_cli_writes_dense_weights(packed_llama, llama, tmp_path):
    out = tmp_path / "dense.safetensors"
    result = invoke("decompress", packed_llama, out, "--dtype", "float16", "--quiet")
    assert result.exit_code == 0, result.output
    with open_checkpoint(out) as dense, open_checkpoint(llama) as original:
        assert [t.name for t in dense.tensors] == [t.name for t in original.tensors]
        assert dense.info("model.layers.0.mlp.up_proj.weight").dtype == "F16"
        assert dense.info("model.layers.0.mlp.up_proj.bias").dtype == "BF16"  # untouched
        assert "quantization_config" not in dense.metadata
    assert invoke("decompress", packed_llama, tmp_path / "x.safetensors", "--dtype", "int8").exit_code == 2


def test_changing_a_compressed_weight_needs_allow_requantize(packed_llama, tmp_path):
    result = invoke("apply", packed_llama, tmp_path / "again.safetensors", "-t", "quantize:bits=8")
    assert result.exit_code == 2
    assert "lm_head.weight" in result.output and "--allow-requantize" in result.output
    result = invoke("apply", packed_llama, tmp_path / "again.safetensors", "-t", "quantize:bits=8", "--quiet",
                    "--allow-requantize")
    assert result.exit_code == 0, result.output
    with open_checkpoint(tmp_path / "again.safetensors") as again:
        assert again.info("lm_head.weight").dtype == "F32"


def test_codebook_golden(tmp_path):
    """Three distinct values for k = 4: the codebook holds them ascending, then one zero of padding."""
    w = np.array([[0.0, 0.0, 0.5], [0.5, 2.0, 2.0]], dtype=np.float32)
    pieces = Transform.create("share", {"clusters": 4, "storage": "codebook"}).apply_split(
        w, Context(TensorInfo("w", "F32", w.shape)))
    assert pieces["w_indices"].dtype == np.uint8
    assert pieces["w_indices"].tolist() == [[0, 0, 1], [1, 2, 2]]
    assert pieces["w_codebook"].tolist() == [0.0, 0.5, 2.0, 0.0]


def test_codebook_file_round_trip(tmp_path):
    w = np.array([[0.0, 0.1, 0.9], [1.0, 2.0, 2.2]], dtype=np.float16)
    save_file({"m.weight": w}, tmp_path / "in.safetensors")
    wtool.run(wtool.Pipeline.from_specs(["share:clusters=3,storage=codebook"]), tmp_path / "in.safetensors",
              tmp_path / "cb.safetensors")
    with open_checkpoint(tmp_path / "cb.safetensors") as reader:
        assert reader.read("m.weight_indices").tolist() == [[0, 0, 1], [1, 2, 2]]
        assert reader.read("m.weight_codebook").tolist() == np.array([0.05, 0.95, 2.1], np.float16).tolist()
        assert "quantization_config" not in reader.metadata  # no standard for codebooks
    result = invoke("inspect", tmp_path / "cb.safetensors", "--json", "-", "--quiet")
    (row,) = json.loads(result.output)["tensors"]
    assert (row["name"], row["layout"]["scheme"]) == ("m.weight", "codebook, 8-bit indices")
    wtool.decompress(tmp_path / "cb.safetensors", tmp_path / "dense.safetensors")
    with open_checkpoint(tmp_path / "dense.safetensors") as reader:
        assert reader.read("m.weight").tolist() == np.array([[0.05, 0.05, 0.95], [0.95, 2.1, 2.1]],
                                                            dtype=np.float16).tolist()


def test_nvfp4_golden():
    """absmax 6 makes every scale 1: the values are E2M1 roundings (half to even), bit patterns as is."""
    w = np.array([[0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.25, -0.75, 1.25, 2.5, 5, -6, 0.3, 3.5]], dtype=np.float32)
    pieces = split({"type": "nvfp4"}, w)
    assert pieces["m.weight_packed"].dtype == np.uint8
    assert pieces["m.weight_packed"].tolist() == [[0x10, 0x32, 0x54, 0x76, 0xA8, 0x42, 0xF6, 0x61]]
    assert pieces["m.weight_scale"].astype(np.float32).tolist() == [[448.0]]
    assert pieces["m.weight_global_scale"].tolist() == [448.0]
    fake = Transform.create("quantize", {"type": "nvfp4", "storage": "fake"}).apply(w, Context.of(w))
    assert fake.tolist() == [[0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -1, 1, 2, 4, -6, 0.5, 4]]


def test_nvfp4_file_reads_back(tmp_path):
    rng = np.random.default_rng(3)
    w = rng.normal(size=(8, 64)).astype(ml_dtypes.bfloat16)
    save_file({"m.weight": w}, tmp_path / "in.safetensors")
    wtool.run(wtool.Pipeline.from_specs(["quantize:type=nvfp4"]), tmp_path / "in.safetensors", tmp_path / "q.safetensors")
    wtool.run(wtool.Pipeline.from_specs(["quantize:type=nvfp4,storage=fake"]), tmp_path / "in.safetensors",
              tmp_path / "fake.safetensors")
    wtool.decompress(tmp_path / "q.safetensors", tmp_path / "dense.safetensors")
    with open_checkpoint(tmp_path / "dense.safetensors") as dense, open_checkpoint(tmp_path / "fake.safetensors") as fake:
        assert dense.info("m.weight").dtype == "BF16"
        assert dense.read("m.weight").tobytes() == fake.read("m.weight").tobytes()
    with open_checkpoint(tmp_path / "q.safetensors") as packed:
        config = json.loads(packed.metadata["quantization_config"])
    assert config["format"] == "nvfp4-pack-quantized"
    assert next(iter(config["config_groups"].values()))["weights"]["group_size"] == 16


# ------------------------------------------------------------------ integers that are quantized already

W8 = np.array([[-128, -3, 0, 5], [7, 127, -1, 2]], dtype=np.int8)


def write_int8(path, scale_shape=(2, 1)):
    """compressed-tensors' int-quantized W8A8 layout beside an int64 buffer, a bool mask and a float weight."""
    rng = np.random.default_rng(0)
    save_file({"fc.weight": W8, "fc.weight_scale": np.full(scale_shape, 0.5, dtype=np.float32),
               "codes.weight": np.arange(32, dtype=np.int8).reshape(4, 8),
               "embeddings.position_ids": np.arange(8, dtype=np.int64).reshape(1, 8),
               "attn.mask": np.ones((4, 4), dtype=bool),
               "out.weight": rng.standard_normal((4, 8)).astype(np.float32)}, str(path))
    return path


@pytest.mark.parametrize("scale_shape", [(2, 1), (1,)])
def test_an_integer_weight_with_a_scale_is_refused_unless_allow_requantize(tmp_path, scale_shape):
    source = write_int8(tmp_path / "w8.safetensors", scale_shape)
    result = invoke("apply", source, tmp_path / "out.safetensors", "-t", "quantize:bits=4")
    assert result.exit_code == 2
    message = " ".join(result.output.split())
    assert "'fc.weight'" in message and "int8 sym" in message and "--allow-requantize" in message
    result = invoke("apply", source, tmp_path / "out.safetensors", "-t", "quantize:bits=4,granularity=channel",
                    "--allow-requantize", "--report", tmp_path / "r.json", "--quiet")
    assert result.exit_code == 0, result.output
    with open_checkpoint(tmp_path / "out.safetensors") as out:
        assert "fc.weight_scale" not in out
        assert out.info("fc.weight").dtype == "F32"
        dense = W8.astype(np.float32) * 0.5  # the layout's weight, requantized to 4 bits per row
        np.testing.assert_allclose(out.read("fc.weight"), dense, atol=np.ptp(dense, axis=1).max() / 15)
        assert out.read("embeddings.position_ids").tolist() == [list(range(8))]
    skipped = {s["name"]: s["reason"] for s in json.loads((tmp_path / "r.json").read_text())["skipped"]}
    assert "not a float dtype" in skipped["embeddings.position_ids"] and "attn.mask" in skipped


def test_an_integer_weight_with_a_scale_reads_as_its_dense_weight(tmp_path):
    source = write_int8(tmp_path / "w8.safetensors")
    result = invoke("inspect", source, "--json", "-", "--quiet")
    assert result.exit_code == 0, result.output
    row = next(t for t in json.loads(result.output)["tensors"] if t["name"] == "fc.weight")
    assert (row["dtype"], row["layout"]["scheme"], row["min"], row["max"]) == ("F32", "int8 sym channel, unpacked",
                                                                              -64.0, 63.5)
    assert invoke("decompress", source, tmp_path / "dense.safetensors", "--quiet").exit_code == 0
    with open_checkpoint(tmp_path / "dense.safetensors") as dense:
        assert dense.read("fc.weight").tolist() == (W8.astype(np.float32) * 0.5).tolist()
        assert dense.info("codes.weight").dtype == "I8"


def test_quantize_naming_an_integer_tensor_is_refused_unless_allow_requantize(tmp_path):
    """Named exactly: refused, or read as float32 with the flag. A glob or the default rule over an
    integer tensor without a scale (position_ids) skips it and lists it."""
    source = write_int8(tmp_path / "w8.safetensors")
    for spec in ("quantize:bits=4,exclude=fc.*", "quantize:bits=4,include=*.weight,exclude=fc.*"):
        report = wtool.run(wtool.Pipeline.from_specs([spec]), source, tmp_path / "plain.safetensors", force=True)
        skipped = {s.name for s in report.skipped}
        assert "codes.weight" in skipped and ("embeddings.position_ids" in skipped) == ("include" not in spec)
        assert [r.name for r in report.tensors if r.changed] == ["out.weight"]
    for options in (["-t", "quantize:bits=4,include=codes.weight,include=out.weight"],
                    ["--include", "codes.weight", "--include", "out.weight", "-t", "quantize:bits=4"]):
        result = invoke("apply", source, tmp_path / "out.safetensors", *options, "--allow-empty")
        assert result.exit_code == 2, result.output
        message = " ".join(result.output.split())
        assert "'codes.weight'" in message and "I8" in message and "--allow-requantize" in message
    result = invoke("apply", source, tmp_path / "out.safetensors", "-t", "quantize:bits=2,include=codes.weight",
                    "--allow-requantize", "--quiet")
    assert result.exit_code == 0, result.output
    with open_checkpoint(tmp_path / "out.safetensors") as out:
        codes = out.read("codes.weight")
        assert out.info("codes.weight").dtype == "F32" and len(np.unique(codes)) <= 4 * 4  # 4 levels per row
        # --allow-requantize reads every layout as its dense weight: fc.weight, not selected, is written dense
        assert out.read("fc.weight").tolist() == (W8.astype(np.float32) * 0.5).tolist()


def test_a_packed_weights_record_is_complete_and_in_order_when_records_spill(llama, tmp_path, monkeypatch):
    """Its statistics run behind the next tensor; the record reaches the report (which may spill
    it to disk at once) only when complete, and in checkpoint order."""
    from wtool.report import Records

    monkeypatch.setattr(Records, "KEEP", 0)
    spec = "quantize:bits=4,granularity=group,group_size=8,storage=packed"
    report = wtool.run(wtool.Pipeline.from_specs([spec]), llama, tmp_path / "out.safetensors")
    with open_checkpoint(llama) as original:
        assert [r.name for r in report.tensors] == [t.name for t in original.tensors]
    packed = [r for r in report.tensors if "quantize.layout" in r.extras]
    assert len(packed) == len(report.groups) > 1
    assert all(r.error is not None and r.after is not None and r.histogram for r in packed)
    assert report.totals["worst"][0]["name"] in {r.name for r in packed}
