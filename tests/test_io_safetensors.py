"""safetensors reading and writing, plus what every format shares (dispatch, sizes, atomicity)."""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from corpus import (  # noqa: F401 (skip_fsync is an autouse fixture)
    ALL_CODES,
    HOSTILE_SAFETENSORS,
    OLD_SAFETENSORS,
    SHAPES,
    assert_refused,
    entry,
    every_bit_pattern,
    infos_for,
    listing,
    load,
    safetensors_bytes,
    same_bits,
    sample,
    save,
    skip_fsync,
    write,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

import wtool.io.atomic
import wtool.io.safetensors
import wtool.io.sharded
from wtool.dtypes import DTYPES
from wtool.errors import InputError, OutputError, UsageError
from wtool.io import (
    Reader,
    Writer,
    WriterMisuse,
    create_writer,
    open_checkpoint,
    parse_size,
)
from wtool.tensor import TensorInfo

F8 = {"F8_E4M3", "F8_E5M2"}
FLOATS = [code for code in ALL_CODES if DTYPES[code].is_float]


# -- round trips ------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("code", ALL_CODES)
def test_safetensors_round_trip_is_bit_exact(tmp_path, code, shape):
    arrays = {"first": sample(code, shape), "second": sample(code, shape, seed=1)}
    path = save(tmp_path / "out.safetensors", arrays, {"k": "v"})
    with open_checkpoint(path) as reader:
        assert reader.format == "safetensors"
        assert reader.tensors == [TensorInfo(name, code, shape) for name in arrays]
        for name, expected in arrays.items():
            got = reader.read(name)
            assert same_bits(got, expected)
            assert got.flags.c_contiguous and not got.flags.writeable
            assert got.dtype.byteorder in "=|<"


@pytest.mark.parametrize("code", FLOATS)
def test_safetensors_every_special_value_survives(tmp_path, code):
    """All NaN payloads, -0.0 and infinities of the small floats; chosen patterns of the wide ones."""
    values = every_bit_pattern(code)
    loaded, _ = load(save(tmp_path / "out.safetensors", {"x": values}))
    assert same_bits(loaded["x"], values)


def test_f8_data_bytes_match_input(tmp_path):
    values = every_bit_pattern("F8_E4M3").reshape(16, 16)
    path = save(tmp_path / "out.safetensors", {"a": values, "b": every_bit_pattern("F8_E5M2")})
    blob = path.read_bytes()
    header_size = struct.unpack("<Q", blob[:8])[0]
    data = blob[8 + header_size:]
    assert data == values.tobytes() + every_bit_pattern("F8_E5M2").tobytes()
    with safe_open(str(path), framework="numpy") as opened:
        assert sorted(opened.keys()) == ["a", "b"]


def test_metadata_and_order_preserved(tmp_path):
    arrays = {name: sample("F32", (2,), seed=i) for i, name in enumerate(["zeta", "alpha", "mid", "beta"])}
    metadata = {"format": "pt", "note": "line one\nline two", "ünï": "cödé"}
    path = save(tmp_path / "out.safetensors", arrays, metadata)
    with open_checkpoint(path) as reader:
        assert [info.name for info in reader.tensors] == list(arrays)
        assert reader.metadata == metadata
    header = json.loads(path.read_bytes()[8:8 + struct.unpack("<Q", path.read_bytes()[:8])[0]])
    assert list(header) == ["__metadata__", *arrays]


def test_header_is_padded_to_eight_bytes(tmp_path):
    path = save(tmp_path / "out.safetensors", {"w": np.zeros(3, np.uint8)})
    header_size = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert header_size % 8 == 0


@pytest.mark.parametrize("code", [code for code in ALL_CODES if code not in F8])
def test_safetensors_library_loads_our_output(tmp_path, code):
    arrays = {"a": sample(code, (3, 5)), "scalar": sample(code, ()), "empty": sample(code, (0, 2))}
    ours = save(tmp_path / "ours.safetensors", arrays, {"k": "v"})
    loaded = load_file(str(ours))
    for name, expected in arrays.items():
        assert same_bits(loaded[name], expected), name
    with safe_open(str(ours), framework="numpy") as opened:
        assert opened.metadata() == {"k": "v"}


@pytest.mark.parametrize("code", [code for code in ALL_CODES if code not in F8])
def test_we_read_what_the_safetensors_library_writes(tmp_path, code):
    arrays = {"b": sample(code, (4, 3)), "a": sample(code, ()), "c": sample(code, (0,))}
    theirs = tmp_path / "theirs.safetensors"
    save_file(arrays, str(theirs), metadata={"format": "np"})
    loaded, metadata = load(theirs)
    assert metadata == {"format": "np"}
    assert loaded.keys() == arrays.keys()
    for name, expected in arrays.items():
        assert same_bits(loaded[name], expected)
    # and tensor for tensor, our writer stores exactly the bytes the library stores
    ours = save(tmp_path / "ours.safetensors", arrays)
    with open_checkpoint(ours) as ours_reader, open_checkpoint(theirs) as their_reader:
        for name in arrays:
            assert ours_reader.read(name).tobytes() == their_reader.read(name).tobytes()


def test_reader_follows_header_order_not_offset_order(tmp_path):
    header = {"late": entry("U8", [2], 2, 4), "early": entry("U8", [2], 0, 2)}
    path = write(tmp_path / "x.safetensors", safetensors_bytes(header, b"\x01\x02\x03\x04"))
    with open_checkpoint(path) as reader:
        assert [info.name for info in reader.tensors] == ["late", "early"]
        assert reader.read("late").tolist() == [3, 4]


def test_null_metadata_and_unknown_entry_fields_are_accepted(tmp_path):
    """As in the safetensors library: `__metadata__: null` is no metadata; extra fields are ignored."""
    header = {"__metadata__": None, "w": {**entry("U8", [1], 0, 1), "future": 1}}
    with open_checkpoint(write(tmp_path / "x.safetensors", safetensors_bytes(header, b"\x07"))) as reader:
        assert reader.metadata == {} and reader.read("w").tolist() == [7]


names = st.one_of(
    st.sampled_from(["../x", "a/b", "/abs", "x" * 10_000, "model.layers.0.weight", "[red]w[/red]", "__wtool"]),
    st.text(st.characters(blacklist_categories=("Cc", "Cs")), min_size=1, max_size=20),
).filter(lambda name: name != "__metadata__")
tensor_specs = st.dictionaries(
    names, st.tuples(st.sampled_from(ALL_CODES), st.lists(st.integers(0, 4), max_size=4).map(tuple)),
    min_size=1, max_size=5)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(specs=tensor_specs, metadata=st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=3))
def test_safetensors_round_trip_property(tmp_path, specs, metadata):
    arrays = {name: sample(code, shape, seed=i) for i, (name, (code, shape)) in enumerate(specs.items())}
    path = save(tmp_path / "prop.safetensors", arrays, metadata, force=True)
    loaded, found_metadata = load(path)
    assert list(loaded) == list(arrays) and found_metadata == metadata
    assert all(same_bits(loaded[name], array) for name, array in arrays.items())


# -- reading views --------------------------------------------------------------------------

def test_read_is_a_read_only_copy_that_survives_close(tmp_path):
    path = save(tmp_path / "x.safetensors", {"w": np.arange(6, dtype=np.float32)})
    reader = open_checkpoint(path)
    array = reader.read("w")
    assert array.flags.owndata and not array.flags.writeable  # steps must not change their input
    reader.close()
    assert array.tolist() == [0, 1, 2, 3, 4, 5]
    reader.close()  # idempotent


def mapped_kib(path) -> int:
    """Resident KiB of this process's mappings of `path`, from /proc/self/smaps."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            first = line.split(maxsplit=1)[0]
            if not first.endswith(":"):  # a mapping's header line: address range ... path
                inside = line.rstrip().endswith(str(path))
            elif inside and first == "Rss:":
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux /proc")
def test_nothing_is_memory_mapped(tmp_path):
    """Tensors are read with pread: a map of a file another process truncates would die of SIGBUS."""
    arrays = {f"t{i}": np.full(2**18, i, np.float32) for i in range(4)}  # 1 MiB each
    path = save(tmp_path / "x.safetensors", arrays)
    with open_checkpoint(path) as reader:
        views = [reader.read(name) for name in arrays]
        assert mapped_kib(path) == 0
    assert [float(view.mean()) for view in views] == [0.0, 1.0, 2.0, 3.0]  # valid after close


def test_bool_bytes_other_than_zero_and_one_are_refused(tmp_path):
    path = write(tmp_path / "m.safetensors", safetensors_bytes({"mask": entry("BOOL", [3], 0, 3)}, b"\x00\x01\x02"))
    with open_checkpoint(path) as reader:
        assert reader.info("mask").dtype == "BOOL"
        with pytest.raises(InputError, match=r"m\.safetensors: tensor 'mask': BOOL data holds bytes other than 0 and"):
            reader.read("mask")


def test_unknown_tensor_is_an_input_error(tmp_path):
    with open_checkpoint(save(tmp_path / "x.safetensors", {"w": np.zeros(1)})) as reader:
        assert "w" in reader and "v" not in reader
        with pytest.raises(InputError, match=r"x\.safetensors: no tensor 'v'"):
            reader.info("v")
        with pytest.raises(InputError, match=r"no tensor 'v'"):
            reader.read("v")


# -- hostile input ------------------------------------------------------------------------------

@pytest.mark.parametrize("build,pattern", [case[1:] for case in HOSTILE_SAFETENSORS],
                         ids=[case[0] for case in HOSTILE_SAFETENSORS])
def test_hostile_file_is_refused(tmp_path, build, pattern):
    assert_refused(build(tmp_path), pattern)


def test_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    with pytest.raises(InputError, match=r"pipe\.safetensors: is not a regular file"):
        open_checkpoint(fifo)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.safetensors: no such file or folder"):
        open_checkpoint(tmp_path / "nope.safetensors")


# -- format dispatch ----------------------------------------------------------------------------

def test_dispatch_by_suffix_folder_and_content(tmp_path):
    arrays = {"w": np.arange(3, dtype=np.int16)}
    single = save(tmp_path / "model.safetensors", arrays)
    with open_checkpoint(tmp_path) as reader:  # a folder with just model.safetensors
        assert reader.format == "safetensors" and reader.path == tmp_path and reader.files == [single]
    renamed = tmp_path / "weights.data"
    renamed.write_bytes(single.read_bytes())
    with open_checkpoint(renamed) as reader:
        assert reader.format == "safetensors"
    np.savez(tmp_path / "arch.npz", **arrays)
    (tmp_path / "arch.npz").rename(tmp_path / "arch.bin2")
    with open_checkpoint(tmp_path / "arch.bin2") as reader:
        assert reader.format == "npz"


@pytest.mark.parametrize("name,pattern", [("model.bin", "pickle-based checkpoints are not read"),
                                          ("x.npy", "single .npy array is not a checkpoint"),
                                          ("notes.txt", "not a recognised checkpoint")])
def test_unsupported_files(tmp_path, name, pattern):
    write(tmp_path / name, b"some bytes here")
    with pytest.raises(InputError, match=rf"{name}: .*{pattern}"):
        open_checkpoint(tmp_path / name)


def test_empty_folder(tmp_path):
    with pytest.raises(InputError, match=r"folder holds no model\.safetensors\.index\.json"):
        open_checkpoint(tmp_path)


# -- parse_size -------------------------------------------------------------------------------

@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30),
                                           ("1.5GB", 1_500_000_000), ("123B", 123), (123, 123), ("10kb", 10_000),
                                           ("3 MiB", 3 * 2**20), ("5G", 5 * 10**9), ("1.5KiB", 1536)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "-5GB", "5XB", "1e9", "0", "0.1", "nan", "5 GB extra", True])
def test_parse_size_refuses(text):
    with pytest.raises(UsageError, match="invalid size"):
        parse_size(text)


@pytest.mark.parametrize("text", ["5", "123", " 2.5 "])
def test_parse_size_requires_a_unit(text):
    with pytest.raises(UsageError, match=r"needs a unit, e\.g\. 5GB"):
        parse_size(text)


# -- writer contract ---------------------------------------------------------------------------

def test_writer_checks_order_dtype_and_shape(tmp_path):
    infos = [TensorInfo("a", "F32", (2,)), TensorInfo("b", "BF16", ())]
    target = tmp_path / "x.safetensors"
    for name, array, pattern in [("b", np.zeros((), ml_dtypes.bfloat16), r"'b' written where 'a' was declared"),
                                 ("a", np.zeros(2, np.float64), r"'a' is F64 \[2\] but was declared F32 \[2\]"),
                                 ("a", np.zeros(3, np.float32), r"'a' is F32 \[3\] but was declared F32 \[2\]")]:
        with pytest.raises(WriterMisuse, match=pattern):
            with create_writer(target, infos, {}) as writer:
                writer.write(name, array)
        assert listing(tmp_path) == {}


def test_commit_with_missing_tensors_leaves_nothing(tmp_path):
    writer = create_writer(tmp_path / "x.safetensors", [TensorInfo("a", "U8", (1,)), TensorInfo("b", "U8", (1,))], {})
    writer.write("a", np.zeros(1, np.uint8))
    with pytest.raises(WriterMisuse, match=r"1 tensors not written, first 'b'"):
        writer.commit()
    assert listing(tmp_path) == {}
    writer.abort()  # idempotent after the failed commit


@pytest.mark.parametrize("damage, message", [
    (lambda data: data[:8] + data[8:].replace(b'"a"', b'"c"', 1), "written header differs"),
    (lambda data: data[:-1], "bytes, not the [0-9]+ its header declares"),
    (lambda data: data + b"\0", "bytes, not the [0-9]+ its header declares"),
])
@pytest.mark.parametrize("shard", [None, 6])
def test_a_file_that_does_not_read_back_as_written_is_never_committed(tmp_path, monkeypatch, damage, message,
                                                                       shard):
    """What reaches the disk is read back before the commit: the header byte for byte, the length."""
    real = wtool.io.atomic.finish_file

    def finish_then_damage(handle):
        path = os.readlink(f"/proc/self/fd/{handle.fileno()}")
        real(handle)
        with open(path, "rb") as file:
            data = file.read()
        with open(path, "wb") as file:
            file.write(damage(data))

    infos = [TensorInfo("a", "U8", (5,)), TensorInfo("b", "U8", (5,))]
    target = tmp_path / ("out" if shard else "x.safetensors")
    monkeypatch.setattr(wtool.io.atomic, "finish_file", finish_then_damage)
    monkeypatch.setattr(wtool.io.sharded, "finish_file", finish_then_damage)
    with pytest.raises(OutputError, match=message):
        with create_writer(target, infos, {}, max_shard_size=shard) as writer:
            writer.write("a", np.arange(5, dtype=np.uint8))
            writer.write("b", np.arange(5, dtype=np.uint8))
    assert listing(tmp_path) == {}


def test_writer_accepts_any_layout_and_byte_order(tmp_path):
    base = np.arange(12, dtype=np.float32).reshape(3, 4)
    arrays = {"transposed": base.T, "reversed": base[::-1], "big_endian": base.astype(">f4"), "scalar": np.float32(7)}
    infos = [TensorInfo(name, "F32", np.shape(array)) for name, array in arrays.items()]
    with create_writer(tmp_path / "x.safetensors", infos, {}) as writer:
        for name, array in arrays.items():
            writer.write(name, array)
    loaded, _ = load(tmp_path / "x.safetensors")
    for name, array in arrays.items():
        assert np.array_equal(loaded[name], np.asarray(array)) and loaded[name].dtype == np.float32


def test_output_names_are_checked_before_anything_is_created(tmp_path):
    for name in ["", "a\nb", "__metadata__"]:
        with pytest.raises(UsageError, match="x.safetensors"):
            create_writer(tmp_path / "x.safetensors", [TensorInfo(name, "U8", (1,))], {})
    with pytest.raises(UsageError, match="declared twice"):
        create_writer(tmp_path / "x.safetensors", [TensorInfo("a", "U8", (1,))] * 2, {})
    with pytest.raises(UsageError, match="--max-shard-size needs a folder output"):
        create_writer(tmp_path / "x.safetensors", [], {}, max_shard_size=10)
    assert listing(tmp_path) == {}


def test_empty_checkpoint_round_trips(tmp_path):
    path = save(tmp_path / "x.safetensors", {}, {"only": "metadata"})
    with open_checkpoint(path) as reader:
        assert reader.tensors == [] and reader.metadata == {"only": "metadata"}


def test_writer_and_reader_satisfy_the_interface(tmp_path):
    writer = create_writer(tmp_path / "x.safetensors", [], {})
    assert isinstance(writer, Writer)
    writer.commit()
    writer.commit()  # a second commit does nothing
    with open_checkpoint(tmp_path / "x.safetensors") as reader:
        assert isinstance(reader, Reader)


# -- atomicity ------------------------------------------------------------------------------------

ARRAYS = {"a": np.arange(1000, dtype=np.float32), "b": np.arange(10, dtype=np.int8)}


@pytest.mark.parametrize("interrupt", [RuntimeError("boom"), KeyboardInterrupt()], ids=["error", "ctrl-c"])
def test_safetensors_exception_mid_write_leaves_nothing(tmp_path, interrupt):
    with pytest.raises(type(interrupt)):
        with create_writer(tmp_path / "out.safetensors", infos_for(ARRAYS), {}) as writer:
            writer.write("a", ARRAYS["a"])
            assert len(listing(tmp_path)) == 1  # the hidden temporary
            raise interrupt
    assert listing(tmp_path) == {}


def test_safetensors_existing_target_needs_force(tmp_path):
    target = write(tmp_path / "out.safetensors", OLD_SAFETENSORS)
    with pytest.raises(UsageError, match=r"out\.safetensors exists; pass --force to replace it"):
        create_writer(target, infos_for(ARRAYS), {})
    assert target.read_bytes() == OLD_SAFETENSORS
    save(target, ARRAYS, force=True)
    loaded, _ = load(target)
    assert loaded.keys() == ARRAYS.keys()
    assert [path.name for path in tmp_path.iterdir()] == ["out.safetensors"]


def test_failed_write_with_force_keeps_the_old_target(tmp_path):
    target = write(tmp_path / "out.safetensors", OLD_SAFETENSORS)
    with pytest.raises(RuntimeError):
        with create_writer(target, infos_for(ARRAYS), {}, force=True) as writer:
            writer.write("a", ARRAYS["a"])
            raise RuntimeError
    assert target.read_bytes() == OLD_SAFETENSORS and len(listing(tmp_path)) == 1


def test_output_permissions_follow_the_umask(tmp_path):
    previous = os.umask(0o022)
    try:
        path = save(tmp_path / "out.safetensors", ARRAYS)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644


class FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes have been written."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        size = memoryview(data).nbytes
        if size > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= size
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)


@pytest.mark.parametrize("room", [0, 200, 3000], ids=["header", "first-tensor", "second-tensor"])
def test_safetensors_disk_full_is_an_output_error(tmp_path, monkeypatch, room):
    real = wtool.io.atomic.create_file
    monkeypatch.setattr(wtool.io.atomic, "create_file", lambda path: FullDisk(real(path), room))
    target = write(tmp_path / "out.safetensors", OLD_SAFETENSORS)
    with pytest.raises(OutputError, match=r"out\.safetensors: cannot write: No space left on device"):
        save(target, {"a": np.zeros(100, np.float32), "b": np.zeros(1000, np.float32)}, force=True)
    assert target.read_bytes() == OLD_SAFETENSORS and len(listing(tmp_path)) == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_unwritable_folder_is_an_output_error(tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    with pytest.raises(OutputError, match=r"out\.safetensors: cannot write: Permission denied"):
        save(folder / "out.safetensors", ARRAYS)


@pytest.mark.parametrize("target", ["out.safetensors", "out.npz", "out"])
def test_commit_fsyncs_file_and_folder(tmp_path, monkeypatch, target):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda descriptor: synced.append(os.readlink(f"/proc/self/fd/{descriptor}")))
    save(tmp_path / target, ARRAYS)
    assert str(tmp_path) in synced  # the rename is durable
    assert any(".wtool-tmp-" in path for path in synced)  # the data was flushed before the rename


# -- untouched tensors: copied file to file --------------------------------------------------

def _kernel(calls, mode):
    """os.copy_file_range as the kernel might behave: all of it, a little at a time then nothing
    (the file shrank), or not at all (EXDEV: another file system)."""
    real = os.copy_file_range

    def copy_file_range(source, target, count, offset_src=None, offset_dst=None):
        calls.append(count)
        if mode == "refuses":
            raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))
        if mode == "stops" and len(calls) > 2:
            return 0
        return real(source, target, count if mode == "all" else min(count, 100), offset_src, offset_dst)
    return copy_file_range


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="no copy_file_range")
@pytest.mark.parametrize("mode", ["all", "stops", "refuses"])
@pytest.mark.parametrize("target", ["out.safetensors", "out"])
@pytest.mark.parametrize("recycled", [False, True], ids=["own-array", "recycled-buffer"])
def test_arrays_as_read_are_copied_in_the_kernel_with_the_same_bytes(tmp_path, monkeypatch, mode, target,
                                                                     recycled):
    import wtool.buffers

    if recycled:  # large tensors are read into recycled buffers: every one here, too
        monkeypatch.setattr(wtool.buffers, "SMALL", 0)
    arrays = {"a": sample("BF16", (64, 33), seed=1), "b": sample("F32", (7, 5), seed=2),
              "c": sample("I8", (100,), seed=3)}
    source = save(tmp_path / "in.safetensors", arrays)
    calls: list[int] = []
    monkeypatch.setattr(os, "copy_file_range", _kernel(calls, mode))
    with open_checkpoint(source) as reader:
        save(tmp_path / target, {info.name: reader.read(info.name) for info in reader.tensors})
    assert calls and (mode != "all" or len(calls) == len(arrays))
    written, _ = load(tmp_path / target)
    assert all(same_bits(written[name], array) for name, array in arrays.items())


def _data_start(path: Path) -> int:
    return 8 + struct.unpack("<Q", path.read_bytes()[:8])[0]


@settings(max_examples=60, deadline=None)
@given(sizes=st.lists(st.sampled_from([6, 8, 4096, 12288, 65536 + 8, 40000, 8190]), min_size=1, max_size=6),
       places=st.lists(st.integers(0, 3 * 4096).map(lambda n: 8 * n), min_size=6, max_size=6),
       copied=st.lists(st.booleans(), min_size=6, max_size=6), name_length=st.integers(1, 40))
def test_header_puts_the_most_copied_bytes_at_their_place_within_a_page(sizes, places, copied, name_length):
    from wtool.io.safetensors import PAGE, encode_header

    tensors = [TensorInfo("t" * name_length + str(i), "U8", (size,)) for i, size in enumerate(sizes)]
    copies = {info.name: place for info, place, chosen in zip(tensors, places, copied) if chosen}
    plain, header = encode_header(tensors, {"k": "v"}), encode_header(tensors, {"k": "v"}, copies)
    assert header[8:len(plain)] == plain[8:]
    assert set(header[len(plain):]) <= {ord(" ")} and len(header) % 8 == 0 and len(header) < len(plain) + PAGE
    assert json.loads(header[8:]) == json.loads(plain[8:])

    def aligned(start: int) -> int:  # every place the data could start, counted from scratch
        offsets = np.cumsum([0] + sizes[:-1])
        return sum(info.nbytes for info, offset in zip(tensors, offsets)
                   if info.name in copies and info.nbytes >= PAGE and (start + offset - copies[info.name]) % PAGE == 0)
    starts = range(len(plain), len(plain) + PAGE, 8)
    best = max(aligned(start) for start in starts)
    assert len(header) == min(start for start in starts if aligned(start) == best)  # the fewest spaces
    assert best or header == plain


def test_untouched_tensors_keep_their_place_within_a_page(tmp_path):
    """A copied tensor lands where the kernel copies it page to page, and every reader agrees."""
    from wtool.io.safetensors import PAGE

    arrays = {"a": sample("BF16", (4,), seed=1), "big": sample("F32", (64, 64), seed=2),
              "odd": sample("F32", (34,), seed=3), "big2": sample("I8", (8192,), seed=4)}
    source = save(tmp_path / "in.safetensors", arrays, {"k": "v"})
    with open_checkpoint(source) as reader:
        copies = {name: reader.stored(name).offset for name in ("big", "big2")}
        assert [reader.stored(name).offset for name in arrays] == [_data_start(source) + sum(
            a.nbytes for a in list(arrays.values())[:i]) for i in range(len(arrays))]
        changed = dict(arrays, odd=arrays["odd"] + 1)
        metadata = {"k": "a longer value, so the output's header is longer than the input's"}
        out = save(tmp_path / "out.safetensors", changed, metadata, copies=copies)
        folder = save(tmp_path / "folder", changed, metadata, copies=copies, max_shard_size=20000)
    for path in (out, *sorted(folder.glob("*.safetensors"))):
        with safe_open(str(path), framework="numpy") as opened:
            for name in opened.keys():
                assert same_bits(opened.get_tensor(name), changed[name]), (path, name)
    assert json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]["big2"] \
        == "model-00002-of-00002.safetensors"
    shard = folder / "model-00002-of-00002.safetensors"
    assert (_data_start(out) + 8 + 16384 + 136 - copies["big2"]) % PAGE == 0
    assert (_data_start(shard) - copies["big2"]) % PAGE == 0
    assert (_data_start(out) + 8 - copies["big"]) % PAGE == 0
    assert _data_start(out) != _data_start(source)


def test_the_header_limit_comes_before_the_page_places(tmp_path, monkeypatch):
    from wtool.io.safetensors import encode_header

    tensors = infos_for({"w": np.zeros(4096, np.uint8)})
    monkeypatch.setattr(wtool.io.safetensors, "MAX_HEADER_BYTES", len(encode_header(tensors, {})) + 100)
    path = save(tmp_path / "out.safetensors", {"w": np.zeros(4096, np.uint8)}, copies={"w": 4096 + 2000})
    assert path.read_bytes()[:len(encode_header(tensors, {}))] == encode_header(tensors, {})


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="no copy_file_range")
@pytest.mark.parametrize("mode", ["all", "stops", "refuses"])
@pytest.mark.parametrize("source", ["in.safetensors", "in"])
@pytest.mark.parametrize("target", ["out.safetensors", "out", "out.npz"])
def test_stored_tensors_are_copied_in_the_kernel_or_else_read(tmp_path, monkeypatch, mode, source, target):
    """A tensor handed over as stored, not read, is copied file to file where the output is
    safetensors, and read only for what the kernel leaves (and for npz, which it never copies)."""
    import wtool.io.safetensors as module

    arrays = {"a": sample("BF16", (64, 33), seed=1), "b": sample("F32", (7, 5), seed=2),
              "c": sample("I8", (100,), seed=3), "d": sample("BOOL", (9,), seed=4)}
    path = save(tmp_path / source, arrays, max_shard_size=3000 if source == "in" else None)
    calls: list[int] = []
    monkeypatch.setattr(os, "copy_file_range", _kernel(calls, mode))
    reads: list[int] = []
    real_read = module.read_exactly
    monkeypatch.setattr(module, "read_exactly", lambda fd, buffer, *rest: (reads.append(len(buffer)),
                                                                           real_read(fd, buffer, *rest)))
    with open_checkpoint(path) as reader:
        stored = {name: reader.stored(name) for name in arrays}
        assert stored["d"] is None  # bool bytes are checked as they are read
        save(tmp_path / target, {name: stored[name] or reader.read(name) for name in arrays})
    copied = target != "out.npz" and mode == "all"
    assert len(reads) == (1 if copied else 4)  # "d" is read in any case
    assert bool(calls) == (target != "out.npz")
    written, _ = load(tmp_path / target)
    assert all(same_bits(written[name], array) for name, array in arrays.items())


@pytest.mark.skipif(not hasattr(os, "copy_file_range"), reason="no copy_file_range")
def test_other_arrays_are_written_from_memory(tmp_path, monkeypatch):
    source = save(tmp_path / "in.safetensors", {"a": sample("F32", (8, 8), seed=1)})
    calls: list[int] = []
    monkeypatch.setattr(os, "copy_file_range", _kernel(calls, "all"))
    with open_checkpoint(source) as reader:
        array = reader.read("a")
        save(tmp_path / "out.safetensors", {"a": array + 1, "b": array[::-1]})
    assert not calls
    written, _ = load(tmp_path / "out.safetensors")
    assert same_bits(written["a"], load(source)[0]["a"] + 1)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise")
@pytest.mark.parametrize("refuse", [False, True])
def test_large_tensors_are_sent_to_the_disk_as_they_are_written(tmp_path, monkeypatch, refuse):
    import wtool.io.safetensors as module

    monkeypatch.setattr(module, "WRITEBACK", 4096)
    monkeypatch.setattr(module, "WRITEBACK_WINDOW", 8192)
    hints = []

    def posix_fadvise(descriptor, offset, length, advice):
        hints.append((offset, length, advice))
        if refuse:
            raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))
    monkeypatch.setattr(os, "posix_fadvise", posix_fadvise)
    arrays = {"small": sample("F32", (10,), seed=1), "a": sample("F32", (64, 64), seed=2),
              "b": sample("BF16", (64, 64), seed=3), "c": sample("F32", (64, 64), seed=4)}
    save(tmp_path / "out.safetensors", arrays)
    header = struct.unpack("<Q", (tmp_path / "out.safetensors").read_bytes()[:8])[0] + 8
    ends = [header + 40 + 16384, header + 40 + 16384 + 8192, header + 40 + 16384 + 8192 + 16384]
    assert hints == [(max(0, end - size - 8192), min(end, size + 8192), os.POSIX_FADV_DONTNEED)
                     for end, size in zip(ends, (16384, 8192, 16384))]
    written, _ = load(tmp_path / "out.safetensors")
    assert all(same_bits(written[name], array) for name, array in arrays.items())
