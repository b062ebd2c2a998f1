"""Builders for well-formed and malformed checkpoint files, made with struct/json/zipfile.

Nothing binary is committed: each test builds the bytes it needs in tmp_path. The hostile
cases are tables of (id, builder, pattern) so one test per case can check that reading
fails with an InputError whose message names the file and the tensor.
"""

from __future__ import annotations

import io
import json
import os
import re
import struct
import subprocess
import warnings
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from wtool.dtypes import DTYPES

ALL_CODES = list(DTYPES)
SHAPES = [(), (0,), (7,), (0, 3), (2, 3, 1, 4)]


def sample(code: str, shape: tuple[int, ...], seed: int = 0, *, bits: bool = True) -> np.ndarray:
    """Random data of dtype `code`, the one generator of the test suite.

    `bits=True`: random bytes viewed as the dtype (NaN payloads, -0.0, inf all occur), bools
    as 0/1. `bits=False`: values a model would hold: normal (σ = 2) rounded to the float
    dtype, integers over their whole range.
    """
    dtype = DTYPES[code].numpy
    if not bits:
        rng = np.random.default_rng(seed)
        if code == "BOOL":
            return rng.random(shape) < 0.5
        if dtype.kind in "iu":
            limits = np.iinfo(dtype)
            return rng.integers(limits.min, limits.max, size=shape, dtype=dtype, endpoint=True)
        return rng.normal(0, 2, size=shape).astype(np.float32).astype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    rng = np.random.default_rng([seed, ALL_CODES.index(code), count, len(shape)])
    if code == "BOOL":
        return np.asarray(rng.integers(0, 2, size=shape) == 1)
    raw = rng.integers(0, 256, size=count * dtype.itemsize, dtype=np.uint8)
    return raw.view(dtype).reshape(shape)


def every_bit_pattern(code: str) -> np.ndarray:
    """All 256 / 65536 values of an 8- or 16-bit float (every NaN payload, both zeros, both
    infinities); for 32- and 64-bit floats a list of special bit patterns."""
    dtype = DTYPES[code].numpy
    if dtype.itemsize == 1:
        return np.arange(256, dtype=np.uint8).view(dtype)
    if dtype.itemsize == 2:
        return np.arange(65536, dtype=np.uint16).view(dtype)
    bits = {4: (np.uint32, [0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001,
                            0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0x3F800000]),
            8: (np.uint64, [0, 1 << 63, 0x7FF0000000000000, 0xFFF0000000000000, 0x7FF8000000000000,
                            0xFFF0000000000001, 0x7FF4000000000123, 1, 0x7FEFFFFFFFFFFFFF])}
    unsigned, values = bits[dtype.itemsize]
    return np.array(values, dtype=unsigned).view(dtype)


#: Bytes that look like a checkpoint (an empty safetensors file, an empty zip): what `--force` may replace.
OLD_SAFETENSORS = b"\x02\x00\x00\x00\x00\x00\x00\x00{}"
OLD_NPZ = b"PK\x05\x06" + bytes(18)


def stop_midway(process: subprocess.Popen, wait: Callable[[], None], signum: int,
                timeout: float) -> tuple[str, str]:
    """Wait (`wait()`) until the run is mid-write, send it `signum`, and return its stdout and
    stderr; the process is killed whatever happens, so a hung run cannot outlive the test."""
    try:
        wait()
        process.send_signal(signum)
        return process.communicate(timeout=timeout)
    finally:
        process.kill()


def write(path: Path, blob: bytes) -> Path:
    path.write_bytes(blob)
    return path


# -- safetensors ------------------------------------------------------------------------------

def entry(dtype: Any, shape: Any, begin: Any, end: Any) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [begin, end]}


def safetensors_bytes(header: dict[str, Any] | str | bytes, data: bytes = b"", *,
                      header_length: int | None = None, pad: bool = True) -> bytes:
    """A safetensors file from a header (dict, raw JSON text or raw bytes) and a data area."""
    if isinstance(header, dict):
        raw = json.dumps(header).encode("utf-8")
    elif isinstance(header, str):
        raw = header.encode("utf-8", "surrogatepass")
    else:
        raw = header
    if pad:
        raw += b" " * (-len(raw) % 8)
    length = len(raw) if header_length is None else header_length
    return struct.pack("<Q", length) + raw + data


def _st(header: Any, data: bytes = b"", **options: Any) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        return write(folder / "model.safetensors", safetensors_bytes(header, data, **options))
    return build


F32_2x3 = entry("F32", [2, 3], 0, 24)
ONE = entry("F32", [1], 0, 4)

#: (id, builder(folder) -> path, regex the InputError message must match after the file name)
HOSTILE_SAFETENSORS: list[tuple[str, Callable[[Path], Path], str]] = [
    ("empty-file", lambda folder: write(folder / "model.safetensors", b""), r"file is 0 bytes, too short"),
    ("short-file", lambda folder: write(folder / "model.safetensors", b"\x10\x00\x00"), r"file is 3 bytes, too short"),
    ("header-past-end", _st({"w": F32_2x3}, bytes(24), header_length=10_000), r"header length 10000 runs past"),
    ("header-absurd", _st({"w": F32_2x3}, bytes(24), header_length=2**63),
     r"header length 9223372036854775808 is over"),
    ("header-not-utf8", _st(b'{"w\xff": 1}'), r"header is not valid UTF-8"),
    ("header-not-json", _st("{not json"), r"header is not valid JSON"),
    ("header-huge-int", _st('{"w": {"dtype": "F32", "shape": [%s], "data_offsets": [0, 4]}}' % ("9" * 5000)),
     r"header is not valid JSON: Exceeds the limit"),
    ("header-not-object", _st("[1, 2]"), r"header must be a JSON object, not list"),
    ("header-deep", _st("[" * 100_000 + "]" * 100_000), r"header is (nested too deeply|not valid JSON)"),
    ("duplicate-key", _st('{"w": %s, "w": %s}' % (json.dumps(ONE), json.dumps(entry("F32", [1], 4, 8))), bytes(8)),
     r"header has the key 'w' twice"),
    ("duplicate-field", _st('{"w": {"dtype": "F32", "dtype": "F16", "shape": [1], "data_offsets": [0, 4]}}',
                            bytes(4)), r"header has the key 'dtype' twice"),
    ("metadata-not-object", _st({"__metadata__": ["a"], "w": F32_2x3}, bytes(24)),
     r"__metadata__ must be an object"),
    ("metadata-not-str", _st({"__metadata__": {"k": 1}, "w": F32_2x3}, bytes(24)),
     r"__metadata__: value of 'k' must be a string"),
    ("entry-not-object", _st({"w": [1, 2]}), r"tensor 'w': entry must be an object"),
    ("no-dtype", _st({"w": {"shape": [1], "data_offsets": [0, 4]}}, bytes(4)), r"tensor 'w': entry has no 'dtype'"),
    ("no-shape", _st({"w": {"dtype": "F32", "data_offsets": [0, 4]}}, bytes(4)), r"tensor 'w': entry has no 'shape'"),
    ("no-offsets", _st({"w": {"dtype": "F32", "shape": [1]}}, bytes(4)), r"tensor 'w': entry has no 'data_offsets'"),
    ("unknown-dtype", _st({"w": entry("C64", [1], 0, 8)}, bytes(8)), r"tensor 'w': unsupported dtype \"C64\""),
    ("dtype-not-str", _st({"w": entry(4, [1], 0, 4)}, bytes(4)), r"tensor 'w': unsupported dtype 4"),
    ("shape-negative", _st({"w": entry("F32", [-1], 0, 0)}), r"tensor 'w': shape must be a list of non-negative"),
    ("shape-float", _st({"w": entry("F32", [1.0], 0, 4)}, bytes(4)), r"tensor 'w': shape must be"),
    ("shape-bool", _st({"w": entry("F32", [True], 0, 4)}, bytes(4)), r"tensor 'w': shape must be"),
    ("shape-not-list", _st({"w": entry("F32", 4, 0, 16)}, bytes(16)), r"tensor 'w': shape must be"),
    ("offsets-short", _st({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0]}}, bytes(4)),
     r"tensor 'w': data_offsets must be a list \[begin, end\]"),
    ("offsets-negative", _st({"w": entry("F32", [1], -4, 0)}, bytes(4)),
     r"tensor 'w': data_offsets must be two non-negative"),
    ("offsets-float", _st({"w": entry("F32", [1], 0.0, 4)}, bytes(4)),
     r"tensor 'w': data_offsets must be two non-negative"),
    ("offsets-reversed", _st({"w": entry("F32", [1], 4, 0)}, bytes(4)),
     r"tensor 'w': data_offsets \[4, 0\] end before"),
    ("size-mismatch", _st({"w": entry("F32", [2, 3], 0, 20)}, bytes(20)),
     r"tensor 'w': data offsets \[0, 20\] hold 20 bytes but F32 \[2, 3\] needs 24"),
    ("absurd-size", _st({"w": entry("F64", [2**40, 2**40], 0, 8 * 2**80)}, bytes(8)),
     r"tensor 'w': data offsets \[0, 9671406556917033397649408\] run past the end"),
    ("past-data-end", _st({"w": F32_2x3}, bytes(20)),
     r"tensor 'w': data offsets \[0, 24\] run past the end of the 20 byte"),
    ("overlap", _st({"a": entry("F32", [2], 0, 8), "b": entry("F32", [2], 4, 12)}, bytes(12)),
     r"tensor 'b': data offsets \[4, 12\] overlap tensor 'a'"),
    ("gap", _st({"a": entry("F32", [1], 0, 4), "b": entry("F32", [1], 8, 12)}, bytes(12)),
     r"tensor 'b': data bytes \[4, 8\) before it belong to no tensor"),
    ("gap-at-start", _st({"a": entry("F32", [1], 4, 8)}, bytes(8)), r"tensor 'a': data bytes \[0, 4\)"),
    ("trailing-bytes", _st({"w": F32_2x3}, bytes(30)), r"the last 6 bytes of the data area belong to no tensor"),
    ("empty-name", _st({"": ONE}, bytes(4)), r"tensor name '' is empty"),
    ("nul-in-name", _st({"a\x00b": ONE}, bytes(4)), r"tensor name 'a\\x00b' contains the control"),
    ("newline-in-name", _st({"a\nb": ONE}, bytes(4)), r"tensor name 'a\\nb' contains the control"),
    ("escape-in-name", _st({"a\x1b[31m": ONE}, bytes(4)), r"tensor name 'a\\x1b\[31m' contains the control"),
    ("surrogate-in-name", _st('{"a\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}', bytes(4)),
     r"tensor name 'a\\ud800' is not valid Unicode"),
]


# -- npy / npz --------------------------------------------------------------------------------

def npy_bytes(array: np.ndarray | None = None, *, header: str | None = None, data: bytes = b"",
              version: tuple[int, int] = (1, 0)) -> bytes:
    """A .npy file written by numpy from `array`, or from a raw header dict text plus raw data."""
    if header is None:
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, version=version, allow_pickle=False)
        return buffer.getvalue()
    text = header.encode("latin1")
    prefix = 10 if version == (1, 0) else 12
    text += b" " * (-(prefix + len(text) + 1) % 64) + b"\n"
    length = struct.pack("<H" if version == (1, 0) else "<I", len(text))
    return b"\x93NUMPY" + bytes(version) + length + text + data


def zip_bytes(members: Iterable[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile warns when a name is added twice
        with zipfile.ZipFile(buffer, "w", compression) as archive:
            for name, blob in members:
                archive.writestr(zipfile.ZipInfo(name), blob, compress_type=compression)
    return buffer.getvalue()


def set_declared_size(blob: bytes, member: str, size: int) -> bytes:
    """Patch the uncompressed size a zip declares for `member` (local header and central directory)."""
    data = bytearray(blob)
    encoded = member.encode("utf-8")
    for signature, length_at, name_at, size_at in ((b"PK\x03\x04", 26, 30, 22), (b"PK\x01\x02", 28, 46, 24)):
        start = 0
        while (start := data.find(signature, start)) >= 0:
            name_length = struct.unpack_from("<H", data, start + length_at)[0]
            if bytes(data[start + name_at:start + name_at + name_length]) == encoded:
                struct.pack_into("<I", data, start + size_at, size)
            start += 4
    return bytes(data)


def _npz(members: list[tuple[str, bytes]], compression: int = zipfile.ZIP_STORED) -> Callable[[Path], Path]:
    def build(folder: Path) -> Path:
        return write(folder / "weights.npz", zip_bytes(members, compression))
    return build


def _bomb(folder: Path) -> Path:
    header = "{'descr': '|u1', 'fortran_order': False, 'shape': (1000000000,), }"
    blob = zip_bytes([("w.npy", npy_bytes(header=header, data=bytes(1000)))], zipfile.ZIP_DEFLATED)
    return write(folder / "weights.npz", set_declared_size(blob, "w.npy", 128 + 10**9))


def _truncated(folder: Path) -> Path:
    blob = zip_bytes([("w.npy", npy_bytes(np.zeros(100, np.float32)))])
    return write(folder / "weights.npz", blob[: len(blob) // 2])


def _corrupt_data(folder: Path) -> Path:
    blob = bytearray(zip_bytes([("w.npy", npy_bytes(np.zeros(100, np.float32)))]))
    blob[300] ^= 0xFF  # inside the member's data: the CRC no longer matches
    return write(folder / "weights.npz", bytes(blob))


def _corrupt_deflate(folder: Path) -> Path:
    blob = bytearray(zip_bytes([("w.npy", npy_bytes(np.arange(1000, dtype=np.float32)))], zipfile.ZIP_DEFLATED))
    blob[40:60] = b"\xff" * 20  # the start of the deflate stream
    return write(folder / "weights.npz", bytes(blob))


def _object_array() -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return buffer.getvalue()


def _wtool(record: object) -> bytes:
    text = record if isinstance(record, str) else json.dumps(record)
    return npy_bytes(np.array(text))


U16 = npy_bytes(np.zeros(2, np.uint16))
HOSTILE_NPZ: list[tuple[str, Callable[[Path], Path], str]] = [
    ("not-a-zip", lambda folder: write(folder / "weights.npz", b"hello, not a zip file at all"),
     r"not a valid \.npz \(zip\) archive"),
    ("empty-file", lambda folder: write(folder / "weights.npz", b""), r"not a valid \.npz \(zip\) archive"),
    ("bare-npy", lambda folder: write(folder / "weights.npz", npy_bytes(np.zeros(3))),
     r"is a single \.npy array, not an \.npz archive"),
    ("truncated", _truncated, r"(not a valid \.npz|truncated|runs past)"),
    ("corrupt-data", _corrupt_data, r"tensor 'w': cannot read the member: Bad CRC-32"),
    ("corrupt-deflate", _corrupt_deflate, r"tensor 'w': cannot read the member: Error -3 while decompressing"),
    ("not-npy-member", _npz([("w.npy", U16), ("notes.txt", b"hi")]), r"member 'notes\.txt' is not a \.npy array"),
    ("invalid-npy", _npz([("w.npy", b"\x93NUMPY\x01\x00garbage")]), r"tensor 'w': not a valid \.npy member"),
    ("bad-npy-header", _npz([("w.npy", npy_bytes(header="{'descr': '<f4', 'shape': (2,)}", data=bytes(8)))]),
     r"tensor 'w': not a valid \.npy member"),
    ("npy-version-3", _npz([("w.npy", npy_bytes(np.zeros(2, np.float32), version=(3, 0)))]),
     r"tensor 'w': unsupported \.npy format version 3\.0"),
    ("negative-shape", _npz([("w.npy", npy_bytes(header="{'descr': '<f4', 'fortran_order': False, 'shape': (-2,)}"))]),
     r"tensor 'w': invalid shape"),
    ("object-dtype", _npz([("w.npy", _object_array())]), r"tensor 'w': object arrays are refused"),
    ("complex-dtype", _npz([("w.npy", npy_bytes(np.zeros(2, np.complex64)))]),
     r"tensor 'w': unsupported dtype complex64"),
    ("string-dtype", _npz([("w.npy", npy_bytes(np.array(["ab"])))]), r"tensor 'w': unsupported dtype <U2"),
    ("duplicate-member", _npz([("w.npy", U16), ("w.npy", U16)]), r"member 'w\.npy' appears twice"),
    ("size-mismatch", _npz([("w.npy", npy_bytes(header="{'descr': '<f4', 'fortran_order': False, 'shape': (1000,), }",
                                                data=bytes(40)))]),
     r"tensor 'w': the zip declares 168 bytes but the \.npy header \(float32 \[1000\]\) needs 4128"),
    ("zip-bomb", _bomb, r"member 'w\.npy': declares 1000000128 bytes from \d+ compressed, more than deflate"),
    ("empty-name", _npz([(".npy", U16)]), r"tensor name '' is empty"),
    ("control-name", _npz([("a\x07.npy", U16)]), r"tensor name 'a\\x07' contains the control"),
    ("wtool-not-json", _npz([("w.npy", U16), ("__wtool__.npy", _wtool("{oops"))]),
     r"member '__wtool__\.npy' is not valid JSON"),
    ("wtool-not-string", _npz([("w.npy", U16), ("__wtool__.npy", npy_bytes(np.zeros(2)))]),
     r"member '__wtool__\.npy' must hold a 0-d unicode string"),
    ("wtool-wrong-carrier", _npz([("w.npy", npy_bytes(np.zeros(2, np.float32))),
                                  ("__wtool__.npy", _wtool({"dtypes": {"w": "BF16"}}))]),
     r"member '__wtool__\.npy' declares tensor 'w' as BF16 but it is stored as F32"),
    ("wtool-unknown-tensor", _npz([("w.npy", U16), ("__wtool__.npy", _wtool({"dtypes": {"v": "BF16"}}))]),
     r"member '__wtool__\.npy' declares a dtype for tensor 'v', which the archive does not hold"),
    ("wtool-bad-code", _npz([("w.npy", U16), ("__wtool__.npy", _wtool({"dtypes": {"w": "BF17"}}))]),
     r"member '__wtool__\.npy': 'dtypes' must map tensor names to dtype codes"),
    ("wtool-bad-metadata", _npz([("w.npy", U16), ("__wtool__.npy", _wtool({"metadata": {"k": 1}}))]),
     r"member '__wtool__\.npy': metadata: value of 'k' must be a string"),
    ("bool-bytes", _npz([("w.npy", npy_bytes(header="{'descr': '|b1', 'fortran_order': False, 'shape': (3,), }",
                                            data=b"\x00\x01\x02"))]),
     r"tensor 'w': BOOL data holds bytes other than 0 and 1"),
]


# -- writing through wtool ----------------------------------------------------------------------

def infos_for(arrays: dict[str, np.ndarray]) -> list[Any]:
    from wtool.dtypes import by_numpy
    from wtool.tensor import TensorInfo
    return [TensorInfo(name, by_numpy(array.dtype).code, array.shape) for name, array in arrays.items()]


def save(path: Path, arrays: dict[str, np.ndarray], metadata: dict[str, str] | None = None, **options: Any) -> Path:
    """Write `arrays` with wtool's own writer (format from the path)."""
    from wtool.io import create_writer
    with create_writer(path, infos_for(arrays), metadata or {}, **options) as writer:
        for name, array in arrays.items():
            writer.write(name, array)
    return path


def load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Every tensor (copied) and the metadata, through wtool's reader."""
    from wtool.io import open_checkpoint
    with open_checkpoint(path) as reader:
        return {info.name: np.array(reader.read(info.name)) for info in reader.tensors}, reader.metadata


def same_bits(left: np.ndarray, right: np.ndarray) -> bool:
    """Equal dtype, shape and bytes: NaN payloads and -0.0 included."""
    return left.dtype == right.dtype and left.shape == right.shape and left.tobytes() == right.tobytes()


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every path under `folder` (hidden ones included) with its size and mtime."""
    return {str(path.relative_to(folder)): (path.stat().st_size, path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*"))}


def assert_refused(path: Path, pattern: str) -> None:
    """Opening `path` and reading every tensor raises one InputError line that starts with the
    path and matches `pattern`, and nothing under its folder changes."""
    from wtool.errors import InputError
    from wtool.io import open_checkpoint

    before = listing(path.parent)
    with pytest.raises(InputError, match=rf"^{re.escape(str(path))}: {pattern}") as caught:
        with open_checkpoint(path) as reader:
            for info in reader.tensors:
                reader.read(info.name)
    assert "\n" not in str(caught.value)
    assert listing(path.parent) == before


@pytest.fixture(autouse=True)
def skip_fsync(monkeypatch):
    """fsync costs ~10 ms on a real disk and the tests write hundreds of files: skip it.
    `test_commit_fsyncs_file_and_folder` spies on it instead."""
    monkeypatch.setattr(os, "fsync", lambda descriptor: None)
