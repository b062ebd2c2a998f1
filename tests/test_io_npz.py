"""npz reading and writing: numpy interop, the __wtool__ member, hostile archives."""

from __future__ import annotations

import errno
import json
import os
import zipfile

import ml_dtypes
import numpy as np
import pytest
from corpus import (  # noqa: F401 (skip_fsync is an autouse fixture)
    ALL_CODES,
    HOSTILE_NPZ,
    OLD_NPZ,
    SHAPES,
    assert_refused,
    every_bit_pattern,
    infos_for,
    listing,
    load,
    npy_bytes,
    same_bits,
    sample,
    save,
    skip_fsync,
    write,
    zip_bytes,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import wtool.io.atomic
from wtool.dtypes import DTYPES
from wtool.errors import InputError, OutputError, UsageError
from wtool.io import create_writer, open_checkpoint
from wtool.tensor import TensorInfo

CARRIED = {"BF16": np.uint16, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8}


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("code", ALL_CODES)
def test_npz_round_trip_is_bit_exact(tmp_path, code, shape):
    arrays = {"first": sample(code, shape), "second": sample(code, shape, seed=1)}
    path = save(tmp_path / "out.npz", arrays, {"k": "v"})
    with open_checkpoint(path) as reader:
        assert reader.format == "npz" and reader.metadata == {"k": "v"} and reader.files == [path]
        assert reader.tensors == [TensorInfo(name, code, shape) for name in arrays]
        for name, expected in arrays.items():
            got = reader.read(name)
            assert same_bits(got, expected) and got.flags.c_contiguous


@pytest.mark.parametrize("code", [code for code in ALL_CODES if DTYPES[code].is_float])
def test_npz_every_special_value_survives(tmp_path, code):
    values = every_bit_pattern(code)
    loaded, _ = load(save(tmp_path / "out.npz", {"x": values}))
    assert same_bits(loaded["x"], values)


@pytest.mark.parametrize("code", ALL_CODES)
def test_numpy_loads_our_output_without_pickle(tmp_path, code):
    array = sample(code, (3, 4))
    path = save(tmp_path / "out.npz", {"w": array, "s": sample(code, ())}, {"source": "test"})
    with np.load(path, allow_pickle=False) as loaded:
        got = loaded["w"]
        if code in CARRIED:  # bit patterns in the unsigned integer of the same width
            assert got.dtype == CARRIED[code] and got.tobytes() == array.tobytes()
            record = json.loads(str(loaded["__wtool__"][()]))
            assert record == {"dtypes": {"w": code, "s": code}, "metadata": {"source": "test"}}
        else:
            assert same_bits(got, array)
        assert loaded["s"].shape == ()


def test_plain_output_has_no_wtool_member(tmp_path):
    path = save(tmp_path / "out.npz", {"w": np.zeros(2, np.float32)})
    with np.load(path, allow_pickle=False) as loaded:
        assert loaded.files == ["w"]
    with zipfile.ZipFile(path) as archive:
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())


def test_output_is_reproducible(tmp_path):
    arrays = {"w": sample("BF16", (5,)), "b": sample("I8", (3,))}
    first = save(tmp_path / "a.npz", arrays, {"k": "v"})
    second = save(tmp_path / "b.npz", arrays, {"k": "v"})
    assert first.read_bytes() == second.read_bytes()


@pytest.mark.parametrize("compressed", [False, True], ids=["savez", "savez_compressed"])
def test_reads_numpy_archives(tmp_path, compressed):
    base = np.arange(24, dtype=np.float32).reshape(2, 3, 4)
    arrays = {
        "fortran": np.asfortranarray(base),
        "big_endian": base.astype(">f4"),
        "big_fortran": np.asfortranarray(base.astype(">i8")),
        "scalar": np.array(3.5),
        "empty": np.zeros((0, 5), np.int16),
        "mask": np.array([True, False, True]),
        "bytes": np.arange(7, dtype=np.uint8),
    }
    path = tmp_path / "plain.npz"
    (np.savez_compressed if compressed else np.savez)(path, **arrays)
    with open_checkpoint(path) as reader:
        assert [info.name for info in reader.tensors] == list(arrays)
        assert reader.metadata == {}
        for name, expected in arrays.items():
            got = reader.read(name)
            assert got.flags.c_contiguous and got.dtype.byteorder in "=|<", name
            assert got.dtype == expected.dtype.newbyteorder("=") and np.array_equal(got, expected), name
        assert reader.info("big_endian").dtype == "F32" and reader.info("big_fortran").dtype == "I64"


@pytest.mark.parametrize("name", ["../x", "a/b", "/abs", "ünï code", "x" * 10_000, "w.npy"])
def test_odd_names_round_trip(tmp_path, name):
    arrays = {name: np.arange(3, dtype=np.int32), "plain": np.ones(1, ml_dtypes.bfloat16)}
    loaded, _ = load(save(tmp_path / "out.npz", arrays))
    assert list(loaded) == list(arrays)
    assert all(same_bits(loaded[key], value) for key, value in arrays.items())


def test_reserved_and_unrepresentable_names_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match=r"out\.npz: tensor name '__wtool__' is reserved"):
        create_writer(tmp_path / "out.npz", [TensorInfo("__wtool__", "F32", (1,))], {})
    with pytest.raises(UsageError, match=r"too long for a zip member name"):
        create_writer(tmp_path / "out.npz", [TensorInfo("x" * 70_000, "F32", (1,))], {})
    with pytest.raises(UsageError, match=r"--max-shard-size needs a folder output"):
        create_writer(tmp_path / "out.npz", [], {}, max_shard_size=5)
    assert listing(tmp_path) == {}


names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=12).filter(
    lambda name: name not in ("__wtool__", "__metadata__"))


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=st.dictionaries(names, st.tuples(st.sampled_from(ALL_CODES),
                                               st.lists(st.integers(0, 3), max_size=3).map(tuple)),
                             min_size=1, max_size=4),
       metadata=st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=2))
def test_npz_round_trip_property(tmp_path, specs, metadata):
    arrays = {name: sample(code, shape, seed=i) for i, (name, (code, shape)) in enumerate(specs.items())}
    loaded, found_metadata = load(save(tmp_path / "prop.npz", arrays, metadata, force=True))
    assert list(loaded) == list(arrays) and found_metadata == metadata
    assert all(same_bits(loaded[name], array) for name, array in arrays.items())


# -- hostile input ------------------------------------------------------------------------------

@pytest.mark.parametrize("build,pattern", [case[1:] for case in HOSTILE_NPZ], ids=[case[0] for case in HOSTILE_NPZ])
def test_hostile_archive_is_refused(tmp_path, build, pattern):
    assert_refused(build(tmp_path), pattern)


def test_bomb_is_refused_before_allocating(tmp_path, monkeypatch):
    from corpus import _bomb
    path = _bomb(tmp_path)
    monkeypatch.setattr(np, "empty", lambda *a, **k: pytest.fail("allocated"))
    with pytest.raises(InputError, match="zip bomb"):
        open_checkpoint(path)


def test_directory_entries_are_skipped(tmp_path):
    blob = zip_bytes([("sub/", b""), ("sub/w.npy", npy_bytes(np.arange(2, dtype=np.int8)))])
    with open_checkpoint(write(tmp_path / "x.npz", blob)) as reader:
        assert [info.name for info in reader.tensors] == ["sub/w"]


def test_wtool_member_with_same_dtype_is_accepted(tmp_path):
    record = np.array(json.dumps({"dtypes": {"w": "F32"}, "metadata": {"a": "b"}}))
    blob = zip_bytes([("w.npy", npy_bytes(np.ones(2, np.float32))), ("__wtool__.npy", npy_bytes(record))])
    with open_checkpoint(write(tmp_path / "x.npz", blob)) as reader:
        assert reader.info("w").dtype == "F32" and reader.metadata == {"a": "b"}


# -- atomicity ------------------------------------------------------------------------------------

ARRAYS = {"a": np.arange(1000, dtype=np.float32), "b": np.ones(10, ml_dtypes.bfloat16)}


def test_npz_exception_mid_write_leaves_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with create_writer(tmp_path / "out.npz", infos_for(ARRAYS), {}) as writer:
            writer.write("a", ARRAYS["a"])
            raise KeyboardInterrupt
    assert listing(tmp_path) == {}


def test_npz_existing_target_needs_force(tmp_path):
    target = write(tmp_path / "out.npz", OLD_NPZ)
    with pytest.raises(UsageError, match=r"out\.npz exists; pass --force"):
        save(target, ARRAYS)
    assert target.read_bytes() == OLD_NPZ
    save(target, ARRAYS, force=True)
    assert load(target)[0].keys() == ARRAYS.keys() and len(listing(tmp_path)) == 1


def test_npz_disk_full_is_an_output_error(tmp_path, monkeypatch):
    class FullDisk:
        def __init__(self, handle):
            self.handle, self.room = handle, 2000

        def write(self, data):
            self.room -= memoryview(data).nbytes
            if self.room < 0:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return self.handle.write(data)

        def __getattr__(self, name):
            return getattr(self.handle, name)

    real = wtool.io.atomic.create_file
    monkeypatch.setattr(wtool.io.atomic, "create_file", lambda path: FullDisk(real(path)))
    target = write(tmp_path / "out.npz", OLD_NPZ)
    with pytest.raises(OutputError, match=r"out\.npz: cannot write: No space left on device"):
        save(target, ARRAYS, force=True)
    assert target.read_bytes() == OLD_NPZ and len(listing(tmp_path)) == 1
