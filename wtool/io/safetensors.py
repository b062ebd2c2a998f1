"""safetensors: our own strict header parser, pread reads and a streaming writer.

The file is an 8-byte little-endian header length, a JSON header, then the data area.
We parse it ourselves because the safetensors library lets a duplicate key silently win and
its numpy API cannot return float8; the writer still asks the library to open every file it
writes, so the reference implementation vouches for each output.

>>> with SafetensorsReader(Path("model.safetensors")) as reader:     # doctest: +SKIP
...     reader.read("lm_head.weight").dtype
dtype(bfloat16)
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np

from wtool.buffers import empty
from wtool.dtypes import DTYPES, by_code
from wtool.errors import InputError, OutputError, UsageError
from wtool.io.atomic import AtomicFile, as_output_error
from wtool.io.base import (
    MAX_HEADER_BYTES,
    Reader,
    Stored,
    Writer,
    check_bool_bytes,
    check_metadata,
    load_json,
    name_problem,
    open_regular,
    show,
)
from wtool.io.protect import Inputs, Stamp
from wtool.tensor import TensorInfo, read_exactly


def _offsets_problem(value: object) -> str | None:
    if not isinstance(value, list) or len(value) != 2:
        return f"data_offsets must be a list [begin, end], not {_brief(value)}"
    if any(isinstance(item, bool) or not isinstance(item, int) or item < 0 for item in value):
        return f"data_offsets must be two non-negative integers, not {_brief(value)}"
    if value[0] > value[1]:
        return f"data_offsets {value} end before they begin"
    return None


def _brief(value: object) -> str:
    text = json.dumps(value, ensure_ascii=True) if not isinstance(value, bytes) else repr(value)
    return text if len(text) <= 60 else text[:60] + "..."


def parse_header(path: Path, handle: BinaryIO,
                 file_size: int) -> tuple[list[tuple[TensorInfo, int]], dict[str, str], int]:
    """Validate the header of an open safetensors file.

    Returns (tensor, absolute data offset) pairs in header order, the metadata, and where the
    data area starts. Every check happens before any tensor data is touched.
    """
    if file_size < 8:
        raise InputError(f"{path}: file is {file_size} bytes, too short for a safetensors header")
    (header_size,) = struct.unpack("<Q", handle.read(8))
    if header_size > MAX_HEADER_BYTES:
        raise InputError(f"{path}: header length {header_size} is over the {MAX_HEADER_BYTES} byte limit")
    if 8 + header_size > file_size:
        raise InputError(f"{path}: header length {header_size} runs past the end of the {file_size} byte file")
    raw = handle.read(header_size)
    if len(raw) != header_size:
        raise InputError(f"{path}: file shrank while reading its header")
    header = load_json(raw, f"{path}: header")
    if not isinstance(header, dict):
        raise InputError(f"{path}: header must be a JSON object, not {type(header).__name__}")

    data_start = 8 + header_size
    data_size = file_size - data_start
    metadata: dict[str, str] = {}
    entries: list[tuple[TensorInfo, int, int]] = []
    for name, entry in header.items():
        if name == "__metadata__":
            metadata = {} if entry is None else check_metadata(entry, f"{path}: __metadata__")
            continue
        problem = name_problem(name)
        if problem:
            raise InputError(f"{path}: tensor name {show(name)} {problem}")
        where = f"{path}: tensor {show(name)}"
        if not isinstance(entry, dict):
            raise InputError(f"{where}: entry must be an object, not {_brief(entry)}")
        for field in ("dtype", "shape", "data_offsets"):
            if field not in entry:
                raise InputError(f"{where}: entry has no {field!r}")
        code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(code, str) or code not in DTYPES:
            raise InputError(f"{where}: unsupported dtype {_brief(code)} (wtool reads {', '.join(DTYPES)})")
        if not isinstance(shape, list) or any(
                isinstance(dim, bool) or not isinstance(dim, int) or dim < 0 for dim in shape):
            raise InputError(f"{where}: shape must be a list of non-negative integers, not {_brief(shape)}")
        problem = _offsets_problem(offsets)
        if problem:
            raise InputError(f"{where}: {problem}")
        begin, end = offsets
        needed = math.prod(shape) * by_code(code).itemsize
        if end - begin != needed:
            raise InputError(f"{where}: data offsets [{begin}, {end}] hold {end - begin} bytes "
                             f"but {code} {shape} needs {needed}")
        if end > data_size:
            raise InputError(f"{where}: data offsets [{begin}, {end}] run past the end of the "
                             f"{data_size} byte data area")
        entries.append((TensorInfo(name, code, tuple(shape)), begin, end))

    position, previous = 0, None
    for info, begin, end in sorted(entries, key=lambda item: (item[1], item[2])):
        if begin < position:
            raise InputError(f"{path}: tensor {show(info.name)}: data offsets [{begin}, {end}] overlap "
                             f"tensor {show(previous)} (which ends at {position})")
        if begin > position:
            raise InputError(f"{path}: tensor {show(info.name)}: data bytes [{position}, {begin}) before it "
                             f"belong to no tensor (safetensors data must be contiguous)")
        position, previous = end, info.name
    if position != data_size:
        raise InputError(f"{path}: the last {data_size - position} bytes of the data area belong to no tensor")
    return [(info, data_start + begin) for info, begin, _ in entries], metadata, data_start


class SafetensorsReader(Reader):
    """Reads a .safetensors file; `read` copies just that tensor's bytes into a new array.

    Bytes come through pread, not a memory map: a map of a file that another process
    truncates kills the reader with SIGBUS, which Python cannot catch, while pread sees a
    short read and says the input changed. Threads may read at once (pread keeps no offset).
    A tensor read again while an array of it is still alive (the report's "before" and the
    first step's input) is that same read-only array, not a second copy. A writer handed that
    very array copies its bytes file to file in the kernel (`write_data`).
    """

    format = "safetensors"

    def __init__(self, path: Path, file: Path | None = None):
        file = file or path
        handle = open_regular(file)
        try:
            status = os.fstat(handle.fileno())
            entries, metadata, _ = parse_header(file, handle, status.st_size)
        except OSError as exc:
            handle.close()
            raise InputError(f"{file}: cannot read: {exc.strerror or exc}") from None
        except BaseException:
            handle.close()
            raise
        super().__init__(path, [info for info, _ in entries], metadata, [file], [Stamp.of(file, status)])
        self.file = file
        self._handle: BinaryIO | None = handle
        self._released = False
        self._offsets = {info.name: offset for info, offset in entries}
        self._alive: weakref.WeakValueDictionary[str, np.ndarray] = weakref.WeakValueDictionary()

    def release(self) -> None:
        """Close the file until the next read, so that a folder of many shards keeps few open."""
        if self._handle is not None:
            self._handle.close()
            self._handle = None
            self._released = True

    def _opened(self) -> BinaryIO | None:
        """The file, opened again if `release` closed it; None once the reader is closed."""
        if self._handle is None and self._released:
            self._handle = open_regular(self.file)
            self._released = False
        return self._handle

    def _read(self, info: TensorInfo) -> np.ndarray:
        if self._opened() is None:
            raise InputError(f"{self.file}: reader is closed")
        array = self._alive.get(info.name)
        if array is not None:
            return array
        array = empty(info.shape, info.dtype_info.numpy, "read")  # pages mapped by the last read: 3x faster
        if info.nbytes:
            read_exactly(self._handle.fileno(), memoryview(array.reshape(-1).view(np.uint8)),
                         self._offsets[info.name], f"{self.file}: tensor {show(info.name)}")
        if info.dtype == "BOOL":
            check_bool_bytes(array, f"{self.file}: tensor {show(info.name)}")
        array.setflags(write=False)  # steps must not change what they were given
        self._alive[info.name] = array
        key = (array.__array_interface__["data"][0], array.nbytes)
        _SOURCES[key] = entry = (weakref.ref(array), weakref.ref(self), self._offsets[info.name])
        weakref.finalize(array, _forget, key, entry)
        return array

    def stored(self, name: str) -> Stored | None:
        info = self.info(name)
        if info.dtype == "BOOL":
            return None
        offset = self._offsets[name]
        return Stored(info, Path(os.path.abspath(self.file)), offset, partial(self.read, name),
                      partial(self.copy_into, info.nbytes, offset), f"{self.file}: tensor {show(name)}")

    def copy_into(self, nbytes: int, offset: int, handle: BinaryIO) -> int:
        """Copy `nbytes` stored bytes from `offset` of this reader's file to the end of `handle`
        with copy_file_range, kernel to kernel; returns how many bytes were copied, which is
        fewer than all (0 included) when the kernel cannot or the file changed."""
        if self._opened() is None or not hasattr(os, "copy_file_range"):
            return 0
        source, target = self._handle.fileno(), handle.fileno()
        handle.flush()
        start, done = handle.tell(), 0
        try:
            while done < nbytes:
                count = os.copy_file_range(source, target, nbytes - done, offset + done, start + done)
                if count == 0:
                    break
                done += count
        except OSError:
            pass
        handle.seek(start + done)
        return done

    def close(self) -> None:
        """Close the file; arrays already returned stay valid."""
        self._released = False
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def encode_header(tensors: Sequence[TensorInfo], metadata: Mapping[str, str],
                  copies: Mapping[str, int] | None = None) -> bytes:
    """Length prefix and JSON header for `tensors` laid out back to back in the given order.

    `__metadata__` comes first when non-empty; the JSON is padded with spaces to a multiple of
    8 bytes, as the safetensors library does, so the data area starts aligned. `copies` gives
    the input file offset of tensors whose bytes will be copied there unchanged: the padding
    then also puts most of those bytes at the same place within a page as in the input
    (up to a page of spaces), so the kernel copies them page to page.

    >>> tensor = TensorInfo("w", "F32", (1024, 1024))
    >>> len(encode_header([tensor], {}))
    80
    >>> len(encode_header([tensor], {}, copies={"w": 4096 + 1000}))
    1000
    """
    header: dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for info in tensors:
        end = offset + info.nbytes
        header[info.name] = {"dtype": info.dtype, "shape": list(info.shape), "data_offsets": [offset, end]}
        offset = end
    raw = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    raw += b" " * _padding(tensors, copies or {}, 8 + len(raw))
    return struct.pack("<Q", len(raw)) + raw


#: The kernel copies file to file a page at a time: bytes at the same place within a page in
#: both files are copied whole pages at once (1 GiB: 0.45 s against 0.67 s when they are not).
PAGE = 4096


def _padding(tensors: Sequence[TensorInfo], copies: Mapping[str, int], start: int) -> int:
    """Spaces after a header whose data would start at `start`: enough for a multiple of 8, or
    the multiple of 8 that puts the most copied bytes at their input place within a page."""
    aligned: dict[int, int] = {}
    offset = 0
    for info in tensors:
        if info.name in copies and info.nbytes >= PAGE:
            pad = (copies[info.name] - start - offset) % PAGE
            if (start + pad) % 8 == 0:
                aligned[pad] = aligned.get(pad, 0) + info.nbytes
        offset += info.nbytes
    return max(aligned, key=lambda pad: (aligned[pad], -pad), default=-start % 8)


def check_header_size(path: Path, tensors: Sequence[TensorInfo], metadata: Mapping[str, str],
                      copies: Mapping[str, int] | None = None) -> bytes:
    header = encode_header(tensors, metadata, copies)
    if len(header) - 8 > MAX_HEADER_BYTES and copies:
        header = encode_header(tensors, metadata)  # the limit first; the copy's speed second
    if len(header) - 8 > MAX_HEADER_BYTES:
        raise UsageError(f"{path}: the safetensors header would be {len(header) - 8} bytes, over the "
                         f"{MAX_HEADER_BYTES} byte limit readers accept")
    return header


#: Arrays a SafetensorsReader returned, by (address, size) of their bytes: (the array, the
#: reader, the file offset of its bytes). An entry whose array is alive describes those bytes:
#: the array is read-only, and a recycled buffer is not handed out again while it lives.
_SOURCES: dict[tuple[int, int], tuple[weakref.ref[np.ndarray], weakref.ref[SafetensorsReader], int]] = {}


def _forget(key: tuple[int, int], entry: tuple[object, ...]) -> None:
    if _SOURCES.get(key) is entry:  # not a later array read into the same recycled pages
        del _SOURCES[key]


def _source(array: np.ndarray) -> tuple[SafetensorsReader, int] | None:
    """The reader and file offset of `array`'s bytes, when they are exactly the bytes of an
    array a SafetensorsReader returned (that array or a whole view of it) and both that array
    and its reader are still alive."""
    if not array.flags.c_contiguous:
        return None
    entry = _SOURCES.get((array.__array_interface__["data"][0], array.nbytes))
    if entry is None or entry[0]() is None:
        return None
    reader = entry[1]()
    return None if reader is None else (reader, entry[2])


def write_data(handle: BinaryIO, array: np.ndarray) -> None:
    """Write a C-contiguous little-endian array's bytes without copying it.

    An array exactly as a SafetensorsReader returned it (read-only, so its bytes are still
    the file's) is copied from the input file in the kernel, as `cp` does, without passing
    through this process; whatever the kernel does not copy is written from memory, so the
    output bytes are the array's either way.
    """
    found = _source(array)
    copy = partial(found[0].copy_into, array.nbytes, found[1]) if found is not None else None
    _copy_or_write(handle, array.nbytes, copy, lambda: array)


def write_stored(handle: BinaryIO, stored: Stored) -> None:
    """Copy a stored tensor's bytes from its file to the end of `handle`, kernel to kernel, as
    `cp` does; whatever the kernel does not copy is read and written from memory."""
    _copy_or_write(handle, stored.nbytes, stored.copy, stored.read)


def _copy_or_write(handle: BinaryIO, nbytes: int, copy: Callable[[BinaryIO], int] | None,
                   values: Callable[[], np.ndarray]) -> None:
    """Append `nbytes` to `handle`: as many as `copy` copies file to file, the rest from `values()`."""
    if not nbytes:
        return
    done = copy(handle) if copy is not None else 0
    if done < nbytes:
        handle.write(memoryview(values().reshape(-1).view(np.uint8))[done:])
    _written_out(handle, nbytes)


#: Tensors this large are sent on their way to the disk as soon as they are written.
WRITEBACK = 8 << 20
#: How far back each hint reaches: pages still being written at one hint go at a later one.
WRITEBACK_WINDOW = 1 << 30


def _written_out(handle: BinaryIO, nbytes: int) -> None:
    """Start writing a large tensor's pages to the disk now and drop the ones already there from
    the page cache (posix_fadvise DONTNEED): the disk works while the next tensors are computed,
    so the fsync before the output is committed waits for little, and an output of many GB
    does not push the input and the run's own memory out of RAM (on this kernel, memory kept
    free that way also spares new arrays the compaction stalls of their huge pages). The
    output is just as durable: the fsync still comes before the commit."""
    if nbytes < WRITEBACK or not hasattr(os, "posix_fadvise"):
        return
    handle.flush()
    end = handle.tell()
    start = max(0, end - nbytes - WRITEBACK_WINDOW)
    try:
        os.posix_fadvise(handle.fileno(), start, end - start, os.POSIX_FADV_DONTNEED)
    except OSError:  # a hint: a file system that refuses it loses nothing
        pass


def check_with_reference(target: Path, written: Path, header: bytes, tensors: Sequence[TensorInfo],
                         metadata: Mapping[str, str]) -> None:
    """Check a written file without mapping it (the library maps whole files, which would need
    as much address space as the output): the file must start with exactly the `header` bytes
    wtool encoded (whose parse the tests prove) and be as long as the tensors need, and the
    safetensors library opens a header-only probe with the same names, dtypes and metadata
    and must read them back. Comparing bytes instead of parsing the header a second time
    keeps a 100,000-tensor output from holding two parsed headers at once."""
    from safetensors import safe_open

    expected_size = len(header) + sum(info.nbytes for info in tensors)
    try:
        with open_regular(written) as handle:
            size = os.fstat(handle.fileno()).st_size
            same = handle.read(len(header)) == header
    except (InputError, OSError) as exc:
        raise OutputError(f"{target}: the written file does not read back: {exc}") from None
    if not same:
        raise OutputError(f"{target}: the written header differs from the tensors and metadata declared")
    if size != expected_size:
        raise OutputError(f"{target}: the written file is {size} bytes, not the {expected_size} its header declares")
    probe = encode_header([TensorInfo(info.name, info.dtype, (0,)) for info in tensors], metadata)
    with tempfile.TemporaryDirectory(prefix="wtool-probe-") as folder:
        path = Path(folder) / "probe.safetensors"
        path.write_bytes(probe)
        try:
            with safe_open(str(path), framework="numpy") as opened:
                keys = set(opened.keys())
                library_metadata = opened.metadata() or {}
        except Exception as exc:  # SafetensorError is not importable in every version
            raise OutputError(f"{target}: the safetensors library cannot open the written header: {exc}") from None
    if keys != {info.name for info in tensors} or library_metadata != dict(metadata):
        raise OutputError(f"{target}: the safetensors library reads different tensors or metadata "
                          f"than were written")


class SafetensorsWriter(Writer):
    """Streams one .safetensors file: header first (from the declared tensors), then data in order."""

    def __init__(self, path: Path, tensors: Sequence[TensorInfo], metadata: Mapping[str, str], *,
                 force: bool = False, inputs: Inputs | None = None, copies: Mapping[str, int] | None = None):
        super().__init__(path, tensors, metadata)
        header = self._header = check_header_size(path, self.tensors, self.metadata, copies)
        self._file = AtomicFile(path, force=force, inputs=inputs)
        try:
            with as_output_error(path):
                self._file.handle.write(header)
        except BaseException:
            self._state = "aborted"
            self._file.abort()
            raise

    @property
    def placed(self) -> bool:
        return self._file.placed

    def _write(self, info: TensorInfo, array: np.ndarray) -> None:
        with as_output_error(self.path):
            write_data(self._file.handle, array)

    def _write_stored(self, info: TensorInfo, stored: Stored) -> None:
        with as_output_error(self.path):
            write_stored(self._file.handle, stored)

    def _commit(self) -> None:
        written = self._file.finish()
        check_with_reference(self.path, written, self._header, self.tensors, self.metadata)
        self._file.commit()

    def _abort(self) -> None:
        self._file.abort()
