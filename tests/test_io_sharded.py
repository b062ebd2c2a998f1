"""Hugging Face sharded folders: split, index, validation of the index against the shards."""

from __future__ import annotations

import errno
import json
import os
import re

import numpy as np
import pytest
from corpus import (  # noqa: F401 (skip_fsync is an autouse fixture)
    ALL_CODES,
    OLD_SAFETENSORS,
    SHAPES,
    infos_for,
    listing,
    load,
    same_bits,
    sample,
    save,
    skip_fsync,
    write,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import save_file

import wtool.io.atomic
import wtool.io.sharded
from wtool.errors import InputError, OutputError, UsageError
from wtool.io import create_writer, open_checkpoint
from wtool.io.sharded import INDEX_NAME, plan_shards
from wtool.tensor import TensorInfo


def index_of(folder):
    return json.loads((folder / INDEX_NAME).read_text())


def shard_tensors(path):
    with safe_open(str(path), framework="numpy") as opened:
        return set(opened.keys())


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("code", ALL_CODES)
def test_sharded_round_trip_is_bit_exact(tmp_path, code, shape):
    arrays = {f"layer.{i}": sample(code, shape, seed=i) for i in range(3)}
    folder = save(tmp_path / "out", arrays, {"format": "pt"}, max_shard_size=max(1, 2 * sample(code, shape).nbytes))
    with open_checkpoint(folder) as reader:
        assert reader.format == "sharded" and reader.path == folder and reader.metadata == {"format": "pt"}
        assert reader.tensors == [TensorInfo(name, code, shape) for name in arrays]
        assert reader.files[0] == folder / INDEX_NAME
        for name, expected in arrays.items():
            assert same_bits(reader.read(name), expected)


@pytest.mark.parametrize("limit", [1, 100, 399, 400, 401, 1000, 10**9])
def test_split_respects_max_shard_size(tmp_path, limit):
    sizes = [100, 300, 50, 50, 400, 1, 0, 120]
    arrays = {f"t{i}": np.zeros(size, np.uint8) for i, size in enumerate(sizes)}
    folder = save(tmp_path / "out", arrays, {"k": "v"}, max_shard_size=limit)
    index = index_of(folder)
    assert index["metadata"] == {"total_size": sum(sizes)}
    assert list(index["weight_map"]) == list(arrays)  # tensor order
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-{n:05d}-of-{len(shards):05d}.safetensors" for n in range(1, len(shards) + 1)]
    assert sorted(path.name for path in folder.iterdir()) == sorted([*shards, INDEX_NAME, ".wtool-files.json"])
    for shard in shards:
        members = [name for name, value in index["weight_map"].items() if value == shard]
        assert shard_tensors(folder / shard) == set(members)
        size = sum(arrays[name].nbytes for name in members)
        assert size <= limit or len(members) == 1 or size - arrays[members[0]].nbytes == 0
        with safe_open(str(folder / shard), framework="numpy") as opened:
            assert opened.metadata() == {"k": "v"}
    # greedy: no shard could have taken the first tensor of the next one
    for this, following in zip(shards, shards[1:]):
        used = sum(arrays[name].nbytes for name, value in index["weight_map"].items() if value == this)
        first_next = next(name for name, value in index["weight_map"].items() if value == following)
        assert used + arrays[first_next].nbytes > limit
    assert load(folder)[0].keys() == arrays.keys()


def test_plan_shards():
    infos = [TensorInfo(name, "U8", (size,)) for name, size in zip("abcdef", [5, 5, 20, 1, 0, 9])]
    assert [[info.name for info in shard] for shard in plan_shards(infos, 10)] == [["a", "b"], ["c"], ["d", "e", "f"]]
    assert [[info.name for info in shard] for shard in plan_shards(infos, 9)] == [
        ["a"], ["b"], ["c"], ["d", "e"], ["f"]]
    assert [len(shard) for shard in plan_shards(infos, None)] == [6]
    assert plan_shards([], 10) == []


def test_no_limit_writes_one_shard_with_an_index(tmp_path):
    folder = save(tmp_path / "out", {"a": np.zeros(3), "b": np.ones(2)})
    assert index_of(folder)["weight_map"] == {"a": "model-00001-of-00001.safetensors",
                                              "b": "model-00001-of-00001.safetensors"}


def test_max_shard_size_accepts_text(tmp_path):
    folder = save(tmp_path / "out", {"a": np.zeros(300, np.uint8), "b": np.zeros(300, np.uint8)},
                  max_shard_size="0.5KB")
    assert len(set(index_of(folder)["weight_map"].values())) == 2
    with pytest.raises(UsageError, match="invalid max shard size"):
        create_writer(tmp_path / "other", [], {}, max_shard_size=0)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.lists(st.tuples(st.sampled_from(ALL_CODES), st.lists(st.integers(0, 5), max_size=3).map(tuple)),
                      min_size=1, max_size=6),
       limit=st.integers(1, 200))
def test_sharded_round_trip_property(tmp_path, specs, limit):
    arrays = {f"{i}/../w{i}": sample(code, shape, seed=i) for i, (code, shape) in enumerate(specs)}
    loaded, _ = load(save(tmp_path / "prop", arrays, max_shard_size=limit, force=True))
    assert list(loaded) == list(arrays)
    assert all(same_bits(loaded[name], array) for name, array in arrays.items())


# -- reading folders written by others ------------------------------------------------------------

def make_folder(folder, shards: dict[str, dict[str, np.ndarray]], weight_map=None, metadata=None):
    """A transformers-style folder: each shard saved by the safetensors library, a sorted index."""
    folder.mkdir(exist_ok=True)
    for shard, arrays in shards.items():
        save_file(arrays, str(folder / shard), metadata=metadata)
    if weight_map is None:
        weight_map = dict(sorted((name, shard) for shard, arrays in shards.items() for name in arrays))
    index = {"metadata": {"total_size": 1}, "weight_map": weight_map}
    write(folder / INDEX_NAME, json.dumps(index).encode())
    return folder


SHARDS = {"model-00002-of-00002.safetensors": {"z.head": np.arange(4, dtype=np.float32)},
          "model-00001-of-00002.safetensors": {"b.embed": np.ones((2, 2), np.float16), "a.norm": np.zeros(3)}}


def test_reads_a_transformers_folder_in_shard_name_order(tmp_path):
    folder = make_folder(tmp_path / "hf", SHARDS, metadata={"format": "pt"})
    for given_path in (folder, folder / INDEX_NAME):
        with open_checkpoint(given_path) as reader:
            assert reader.path == given_path and reader.metadata == {"format": "pt"}
            names = [info.name for info in reader.tensors]
            assert names[-1] == "z.head" and set(names[:2]) == {"a.norm", "b.embed"}
            assert [path.name for path in reader.files] == [INDEX_NAME, *sorted(SHARDS)]
            assert np.array_equal(reader.read("z.head"), np.arange(4, dtype=np.float32))


def test_hub_cache_symlinks_are_followed(tmp_path):
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    save_file({"w": np.ones(2, np.float32)}, str(blobs / "abc123"))
    snapshot = tmp_path / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "model-00001-of-00001.safetensors").symlink_to("../../blobs/abc123")
    write(snapshot / INDEX_NAME, json.dumps({"weight_map": {"w": "model-00001-of-00001.safetensors"}}).encode())
    with open_checkpoint(snapshot) as reader:
        assert reader.read("w").tolist() == [1, 1]


def _outside(folder):
    save_file({"w": np.zeros(1)}, str(folder.parent / "outside.safetensors"))
    return {"w": "../outside.safetensors"}


HOSTILE = [
    ("index-not-json", lambda folder: "{oops", r"index is not valid JSON"),
    ("index-not-object", lambda folder: [], r"index must be a JSON object, not list"),
    ("no-weight-map", lambda folder: {"metadata": {}}, r"index has no 'weight_map'"),
    ("weight-map-not-object", lambda folder: {"weight_map": ["a"]}, r"'weight_map' must be an object, not list"),
    ("duplicate-key", lambda folder: '{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}',
     r"index has the key 'w' twice"),
    ("leaves-folder", lambda folder: {"weight_map": _outside(folder)},
     r"tensor 'w': shard '\.\./outside\.safetensors' leaves the folder"),
    ("subdir-dotdot", lambda folder: {"weight_map": {"w": "sub/../../x.safetensors"}},
     r"tensor 'w': shard .* leaves the folder"),
    ("absolute", lambda folder: {"weight_map": {"w": "/etc/passwd.safetensors"}},
     r"tensor 'w': shard '/etc/passwd\.safetensors' must be a relative path"),
    ("backslash", lambda folder: {"weight_map": {"w": "..\\x.safetensors"}},
     r"tensor 'w': shard .* must be a relative path"),
    ("drive", lambda folder: {"weight_map": {"w": "C:x.safetensors"}},
     r"tensor 'w': shard 'C:x\.safetensors' must be a relative path"),
    ("not-safetensors", lambda folder: {"weight_map": {"w": "pytorch_model.bin"}},
     r"tensor 'w': shard 'pytorch_model\.bin' is not a \.safetensors file"),
    ("shard-not-string", lambda folder: {"weight_map": {"w": 3}}, r"tensor 'w': shard '3' is not a string"),
    ("missing-shard", lambda folder: {"weight_map": {"w": "model-00009-of-00009.safetensors"}},
     r"shard 'model-00009-of-00009\.safetensors' \(holding tensor 'w'\) does not exist"),
    ("wrong-shard", lambda folder: {"weight_map": {"a.norm": "model-00002-of-00002.safetensors",
                                                   "b.embed": "model-00001-of-00002.safetensors",
                                                   "z.head": "model-00002-of-00002.safetensors"}},
     r"tensor 'a\.norm' is stored in 'model-00001-of-00002\.safetensors' but the index maps it to "
     r"'model-00002-of-00002\.safetensors'"),
    ("not-listed", lambda folder: {"weight_map": {"a.norm": "model-00001-of-00002.safetensors",
                                                  "z.head": "model-00002-of-00002.safetensors"}},
     r"tensor 'b\.embed' is stored in 'model-00001-of-00002\.safetensors' but the index does not list it"),
]


@pytest.mark.parametrize("index,pattern", [case[1:] for case in HOSTILE], ids=[case[0] for case in HOSTILE])
def test_hostile_index_is_refused(tmp_path, monkeypatch, index, pattern):
    folder = make_folder(tmp_path / "hf", SHARDS)
    document = index(folder)
    write(folder / INDEX_NAME, (document if isinstance(document, str) else json.dumps(document)).encode())
    opened = []
    real = wtool.io.sharded.SafetensorsReader
    monkeypatch.setattr(wtool.io.sharded, "SafetensorsReader", lambda file: opened.append(file) or real(file))
    before = listing(tmp_path)
    with pytest.raises(InputError, match=rf"^{re.escape(str(folder / INDEX_NAME))}: {pattern}") as caught:
        open_checkpoint(folder)
    assert "\n" not in str(caught.value)
    assert all(path.parent == folder for path in opened)  # nothing outside the folder was ever opened
    assert listing(tmp_path) == before


def test_tensor_in_two_shards(tmp_path):
    folder = make_folder(tmp_path / "hf", {"model-00001-of-00002.safetensors": {"w": np.zeros(1)},
                                           "model-00002-of-00002.safetensors": {"w": np.ones(1), "v": np.ones(1)}},
                         weight_map={"w": "model-00001-of-00002.safetensors", "v": "model-00002-of-00002.safetensors"})
    with pytest.raises(InputError, match=r"tensor 'w' is stored in both 'model-00001-of-00002\.safetensors' "
                                         r"and 'model-00002-of-00002\.safetensors'"):
        open_checkpoint(folder)


def test_tensor_missing_from_its_shard(tmp_path):
    folder = make_folder(tmp_path / "hf", {"model-00001-of-00001.safetensors": {"w": np.zeros(1)}},
                         weight_map={"w": "model-00001-of-00001.safetensors", "v": "model-00001-of-00001.safetensors"})
    with pytest.raises(InputError, match=r"tensor 'v' is mapped to 'model-00001-of-00001\.safetensors', "
                                         r"which does not hold it"):
        open_checkpoint(folder)


def test_corrupt_shard_is_named(tmp_path):
    folder = make_folder(tmp_path / "hf", SHARDS)
    shard = folder / "model-00002-of-00002.safetensors"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(InputError, match=rf"^{re.escape(str(shard))}: tensor 'z\.head': data offsets"):
        open_checkpoint(folder)


def test_folder_with_a_single_file_is_read_as_safetensors(tmp_path):
    save_file({"w": np.zeros(2)}, str(tmp_path / "model.safetensors"))
    with open_checkpoint(tmp_path) as reader:
        assert reader.format == "safetensors" and reader.path == tmp_path


def test_empty_weight_map_is_an_empty_checkpoint(tmp_path):
    write(tmp_path / INDEX_NAME, b'{"weight_map": {}}')
    with open_checkpoint(tmp_path) as reader:
        assert reader.tensors == [] and reader.metadata == {}


# -- atomicity ------------------------------------------------------------------------------------

ARRAYS = {f"t{i}": np.full(100, i, np.float32) for i in range(4)}


def test_sharded_exception_mid_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with create_writer(tmp_path / "out", infos_for(ARRAYS), {}, max_shard_size=500) as writer:
            for name in ["t0", "t1", "t2"]:
                writer.write(name, ARRAYS[name])
            raise KeyboardInterrupt
    assert listing(tmp_path) == {}


def test_existing_folder_needs_force_and_is_replaced_whole(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    write(target / "stale.safetensors", OLD_SAFETENSORS)
    with pytest.raises(UsageError, match=r"out exists; pass --force to replace it"):
        create_writer(target, infos_for(ARRAYS), {})
    assert sorted(listing(tmp_path)) == ["out", "out/stale.safetensors"]
    save(target, ARRAYS, max_shard_size=800, force=True)
    assert sorted(path.name for path in target.iterdir()) == [
        ".wtool-files.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", INDEX_NAME]
    assert [path.name for path in tmp_path.iterdir()] == ["out"]  # no temporary or old folder left


def test_force_never_replaces_a_file_with_a_folder(tmp_path):
    target = write(tmp_path / "out", b"a file")
    with pytest.raises(UsageError, match=r"out is not a folder; --force replaces only a checkpoint wtool wrote"):
        save(target, ARRAYS, force=True)
    assert target.read_bytes() == b"a file" and len(listing(tmp_path)) == 1


def test_sharded_disk_full_is_an_output_error(tmp_path, monkeypatch):
    real = wtool.io.sharded.create_file
    written = []

    def full_after_first_shard(path):
        handle = real(path)
        written.append(path)
        if len(written) > 1:
            handle.write = lambda data: (_ for _ in ()).throw(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
        return handle

    monkeypatch.setattr(wtool.io.sharded, "create_file", full_after_first_shard)
    target = tmp_path / "out"
    target.mkdir()
    write(target / "model.safetensors", OLD_SAFETENSORS)
    with pytest.raises(OutputError, match=r"out/model-00002-of-00002\.safetensors: cannot write: No space left"):
        save(target, ARRAYS, max_shard_size=800, force=True)
    assert sorted(listing(tmp_path)) == ["out", "out/model.safetensors"]


def test_shard_spellings_are_normalized(tmp_path):
    folder = make_folder(tmp_path / "hf", {"a.safetensors": {"x": np.zeros(1), "y": np.ones(1)}},
                         weight_map={"x": "./a.safetensors", "y": "a.safetensors"})
    with open_checkpoint(folder) as reader:
        assert [info.name for info in reader.tensors] == ["x", "y"] and len(reader.files) == 2
