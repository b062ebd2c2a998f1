"""`wtool new`: specs in TOML and JSON, the repeat form, dtypes and fills, errors that name the
spec file and entry, and output written one tensor at a time."""

from __future__ import annotations

import json
import math
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

import wtool.new
from wtool.errors import InputError, UsageError
from wtool.io import open_checkpoint
from wtool.new import new_checkpoint, read_spec

SPEC = """
[defaults]
scheme = "he"
seed = 0

[metadata]
format = "pt"
origin = "wtool new"

[[tensors]]
name = "embed.weight"
shape = [64, 32]
dtype = "bfloat16"
scheme = "xavier"

[[tensors]]
name = "layers.{i}.conv.weight"
count = 3
shape = [16, 8, 3, 3]

[[tensors]]
name = "layers.{i}.norm.weight"
count = 3
shape = [16]
value = 1.0

[[tensors]]
name = "layers.{i}.conv.bias"
count = 3
shape = [16]

[[tensors]]
name = "position_ids"
shape = [1, 5]
dtype = "int64"
value = 7

[[tensors]]
name = "mask"
shape = [2, 2]
dtype = "bool"
"""


def write(tmp_path: Path, text: str, name: str = "spec.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def read_all(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    with open_checkpoint(path) as reader:
        return ({t.name: reader.read(t.name) for t in reader.tensors}, reader.metadata,
                [t.name for t in reader.tensors])


def test_builds_the_checkpoint_the_spec_describes(tmp_path):
    out = tmp_path / "model.safetensors"
    infos = new_checkpoint(write(tmp_path, SPEC), out)
    names = ["embed.weight", *[f"layers.{i}.conv.weight" for i in range(3)],
             *[f"layers.{i}.norm.weight" for i in range(3)], *[f"layers.{i}.conv.bias" for i in range(3)],
             "position_ids", "mask"]
    assert [i.name for i in infos] == names
    tensors, metadata, order = read_all(out)
    assert order == names
    assert metadata == {"format": "pt", "origin": "wtool new"}
    embed = tensors["embed.weight"]
    assert embed.dtype == ml_dtypes.bfloat16 and embed.shape == (64, 32)
    assert float(embed.astype(np.float64).std()) == pytest.approx(math.sqrt(2 / 96), rel=0.1)
    conv = tensors["layers.0.conv.weight"]
    assert conv.dtype == np.float32 and conv.shape == (16, 8, 3, 3)
    assert float(conv.std()) == pytest.approx(math.sqrt(2 / 72), rel=0.1)  # he, fan_in = 8·3·3
    assert not np.array_equal(conv, tensors["layers.1.conv.weight"])  # the name seeds each copy
    assert np.all(tensors["layers.2.norm.weight"] == 1.0)
    assert np.all(tensors["layers.1.conv.bias"] == 0.0)  # 1-D default: zeros
    assert tensors["position_ids"].dtype == np.int64 and np.all(tensors["position_ids"] == 7)
    assert tensors["mask"].dtype == np.bool_ and not tensors["mask"].any()


def test_json_spec_is_the_same(tmp_path):
    spec = {"defaults": {"scheme": "he", "seed": 0}, "metadata": {"format": "pt", "origin": "wtool new"},
            "tensors": [{"name": "embed.weight", "shape": [64, 32], "dtype": "bfloat16", "scheme": "xavier"},
                        {"name": "layers.{i}.conv.weight", "count": 3, "shape": [16, 8, 3, 3]},
                        {"name": "layers.{i}.norm.weight", "count": 3, "shape": [16], "value": 1.0},
                        {"name": "layers.{i}.conv.bias", "count": 3, "shape": [16]},
                        {"name": "position_ids", "shape": [1, 5], "dtype": "int64", "value": 7},
                        {"name": "mask", "shape": [2, 2], "dtype": "bool"}]}
    new_checkpoint(write(tmp_path, SPEC), tmp_path / "a.safetensors")
    new_checkpoint(write(tmp_path, json.dumps(spec), "spec.json"), tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()


def test_same_spec_same_bytes_and_values_independent_of_other_entries(tmp_path):
    new_checkpoint(write(tmp_path, SPEC), tmp_path / "a.safetensors")
    new_checkpoint(write(tmp_path, SPEC), tmp_path / "b.safetensors")
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    more = SPEC.replace("[[tensors]]", '[[tensors]]\nname = "extra.weight"\nshape = [9, 9]\n\n[[tensors]]', 1)
    new_checkpoint(write(tmp_path, more, "more.toml"), tmp_path / "c.safetensors")
    a, _, _ = read_all(tmp_path / "a.safetensors")
    c, _, _ = read_all(tmp_path / "c.safetensors")
    assert "extra.weight" in c
    for name, value in a.items():
        assert value.tobytes() == c[name].tobytes()


def test_every_float_dtype(tmp_path):
    lines = [f'[[tensors]]\nname = "w.{d}"\nshape = [32, 16]\ndtype = "{d}"\n'
             for d in ["float64", "float32", "float16", "bfloat16", "float8_e4m3fn", "float8_e5m2"]]
    new_checkpoint(write(tmp_path, "\n".join(lines)), tmp_path / "out.safetensors")
    tensors, _, _ = read_all(tmp_path / "out.safetensors")
    for name, value in tensors.items():
        assert str(value.dtype) == name.split(".", 1)[1]
        assert np.isfinite(value.astype(np.float32)).all() and value.astype(np.float32).std() > 0.05


def test_integer_fills_and_defaults_dtype(tmp_path):
    spec = """
[defaults]
dtype = "float16"
[[tensors]]
name = "w"
shape = [4, 4]
[[tensors]]
name = "u8"
shape = [3]
dtype = "uint8"
value = 255
[[tensors]]
name = "flags"
shape = [2]
dtype = "bool"
value = true
[[tensors]]
name = "scalar"
shape = []
"""
    new_checkpoint(write(tmp_path, spec), tmp_path / "out.npz")
    tensors, _, _ = read_all(tmp_path / "out.npz")
    assert tensors["w"].dtype == np.float16
    assert tensors["u8"].tolist() == [255, 255, 255]
    assert tensors["flags"].tolist() == [True, True]
    assert tensors["scalar"].shape == () and tensors["scalar"] == 0


def test_defaults_value_and_scheme_override_each_other(tmp_path):
    spec = """
[defaults]
value = 0.5
[[tensors]]
name = "filled"
shape = [3, 3]
[[tensors]]
name = "drawn"
shape = [64, 64]
scheme = "he"
"""
    _, plan = read_spec(write(tmp_path, spec))
    assert plan[0].init.params.value == 0.5
    assert plan[1].init.params.value is None and plan[1].init.scheme == "he"
    spec = '[defaults]\nscheme = "he"\ndist = "uniform"\n[[tensors]]\nname = "c"\nshape = [2, 2]\nvalue = 3.0\n'
    _, plan = read_spec(write(tmp_path, spec))
    assert plan[0].init.params.value == 3.0 and plan[0].init.params.dist is None


def test_sharded_output(tmp_path):
    spec = '[[tensors]]\nname = "layers.{i}.weight"\ncount = 6\nshape = [64, 64]\n'
    new_checkpoint(write(tmp_path, spec), tmp_path / "sharded", max_shard_size=40_000)
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 1
    tensors, _, _ = read_all(tmp_path / "sharded")
    assert sorted(tensors) == [f"layers.{i}.weight" for i in range(6)]


def test_existing_output_needs_force(tmp_path):
    spec = write(tmp_path, '[[tensors]]\nname = "w"\nshape = [2, 2]\n')
    new_checkpoint(spec, tmp_path / "out.safetensors")
    with pytest.raises(UsageError):
        new_checkpoint(spec, tmp_path / "out.safetensors")
    new_checkpoint(spec, tmp_path / "out.safetensors", force=True)


def test_streams_one_tensor_at_a_time(tmp_path, monkeypatch):
    """Each tensor is generated right before it is written, never all up front."""
    events = []
    generate = wtool.new._generate

    def recording_generate(item):
        events.append(("generate", item.info.name))
        return generate(item)

    class RecordingWriter:
        def __init__(self, path, tensors, metadata, **options):
            self.names = [t.name for t in tensors]

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def write(self, name, array):
            events.append(("write", name))

    monkeypatch.setattr(wtool.new, "_generate", recording_generate)
    monkeypatch.setattr(wtool.new, "create_writer", RecordingWriter)
    new_checkpoint(write(tmp_path, SPEC), tmp_path / "out.safetensors")
    assert [kind for kind, _ in events] == ["generate", "write"] * (len(events) // 2)
    assert events[0] == ("generate", "embed.weight") and events[1] == ("write", "embed.weight")


BAD = [
    ("", "no tensors"),
    ('[[tensors]]\nname = "w"\nshape = [2, 2]\n[other]\nx = 1\n', "unknown top-level key 'other'"),
    ("[[tensors]]\nshape = [2]\n", r"tensors\[0\]: needs a name"),
    ('[[tensors]]\nname = "w"\n', r"tensors\[0\] \('w'\): shape must be a list of non-negative integers"),
    ('[[tensors]]\nname = "w"\nshape = [2, -1]\n', r"tensors\[0\] \('w'\): shape must be"),
    ('[[tensors]]\nname = "w"\nshape = [2.5]\n', "shape must be"),
    ('[[tensors]]\nname = "w"\nshape = [2]\ndtype = "float128"\n', r"tensors\[0\] \('w'\): unknown dtype 'float128'"),
    ('[[tensors]]\nname = "w"\nshape = [2, 2]\ndtype = 32\n', "dtype must be a string"),
    ('[[tensors]]\nname = "w"\ncount = 3\nshape = [2]\n', r"count=3 needs \{i\} in the name"),
    ('[[tensors]]\nname = "w{i}"\ncount = 0\nshape = [2]\n', "count must be an integer from 1"),
    ('[[tensors]]\nname = "w"\nshape = [2]\n[[tensors]]\nname = "w"\nshape = [3]\n',
     r"tensors\[1\]: name 'w' is already used by tensors\[0\]"),
    ('[[tensors]]\nname = "l.{i}"\ncount = 2\nshape = [2]\n[[tensors]]\nname = "l.1"\nshape = [2]\n',
     r"name 'l.1' is already used"),
    ('[[tensors]]\nname = "w"\nshape = [2, 2]\nschema = "he"\n', r"tensors\[0\] \('w'\): init: unknown parameter 'schema'"),
    ('[[tensors]]\nname = "w"\nshape = [2, 2]\nscheme = "he"\nvalue = 1.0\n', r"\('w'\): init: value=1.0 fills a constant"),
    ('[[tensors]]\nname = "w"\nshape = [2, 2]\ngain = "big"\n', r"\('w'\): init: parameter gain"),
    ('[[tensors]]\nname = "b"\nshape = [8]\nscheme = "he"\n', r"\('b'\): a 1-D tensor has no fan_in/fan_out"),
    ('[[tensors]]\nname = "ids"\nshape = [8]\ndtype = "int32"\nscheme = "he"\n', r"\('ids'\): init options \(scheme\) need a float dtype"),
    ('[[tensors]]\nname = "ids"\nshape = [8]\ndtype = "int8"\nvalue = 300\n', r"value 300 does not fit int8"),
    ('[[tensors]]\nname = "ids"\nshape = [8]\ndtype = "int8"\nvalue = 1.5\n', "must be an integer"),
    ('[[tensors]]\nname = "m"\nshape = [8]\ndtype = "bool"\nvalue = 2\n', "bool tensor must be true, false"),
    ('[defaults]\nschem = "he"\n[[tensors]]\nname = "w"\nshape = [2, 2]\n', r"\[defaults\]: unknown option 'schem'"),
    ('[metadata]\nversion = 3\n[[tensors]]\nname = "w"\nshape = [2]\n', r"\[metadata\] must map names to strings"),
    ('[[tensors]]\nname = "a\\u0001b"\nshape = [2]\n', "control character"),
    ("tensors = [", "invalid TOML"),
]


@pytest.mark.parametrize("text,message", BAD, ids=[m for _, m in BAD])
def test_bad_specs_name_the_file_and_entry(tmp_path, text, message):
    spec = write(tmp_path, text)
    with pytest.raises(InputError, match=message) as caught:
        new_checkpoint(spec, tmp_path / "out.safetensors")
    assert str(caught.value).startswith(str(spec))
    assert caught.value.exit_code == 3
    assert not (tmp_path / "out.safetensors").exists()


def test_missing_spec_and_bad_json(tmp_path):
    with pytest.raises(InputError, match="no such spec file"):
        new_checkpoint(tmp_path / "nope.toml", tmp_path / "out.safetensors")
    with pytest.raises(InputError, match="invalid JSON"):
        new_checkpoint(write(tmp_path, "{", "spec.json"), tmp_path / "out.safetensors")
    with pytest.raises(InputError, match="expected a table"):
        new_checkpoint(write(tmp_path, "[1, 2]", "spec.json"), tmp_path / "out.safetensors")
