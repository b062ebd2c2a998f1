"""npz: a zip of .npy members, read and written one member at a time, never unpickling.

npz has no bfloat16, float8 or metadata. wtool stores BF16 as uint16 and F8 as uint8 bit
patterns and records what they really are, with the metadata, in one extra member
`__wtool__.npy`: a 0-d unicode array (loadable with allow_pickle=False) holding the JSON
`{"dtypes": {"name": "BF16"}, "metadata": {"key": "value"}}`. Plain npz files from
`np.savez` / `np.savez_compressed` need no such member.

>>> import numpy as np
>>> np.load("out.npz", allow_pickle=False)["w"].dtype   # doctest: +SKIP
dtype('uint16')
"""

from __future__ import annotations

import json
import math
import os
import struct
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np
from numpy.lib import format as npy_format

from wtool.dtypes import DTYPES, by_code, by_numpy
from wtool.errors import InputError, OutputError, UsageError
from wtool.io.atomic import AtomicFile, as_output_error
from wtool.io.base import (
    MAX_HEADER_BYTES,
    Reader,
    Writer,
    check_bool_bytes,
    check_metadata,
    load_json,
    name_problem,
    open_regular,
    show,
)
from wtool.io.protect import Inputs, Stamp
from wtool.tensor import TensorInfo

WTOOL_MEMBER = "__wtool__.npy"
#: dtypes npz cannot hold, and the unsigned integer whose bits stand in for them.
BIT_CARRIERS = {"BF16": "U16", "F8_E4M3": "U8", "F8_E5M2": "U8"}
#: deflate cannot expand data more than about 1032 times; a member claiming more is a zip bomb.
MAX_DEFLATE_RATIO = 1100
_CHUNK = 16 * 2**20
_FIXED_DATE = (1980, 1, 1, 0, 0, 0)  # reproducible archives
#: failures of the archive itself (corrupt data, CRC, I/O), as opposed to a malformed .npy inside it
_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError)
_ZIP_ERRORS = (*_READ_ERRORS, zipfile.LargeZipFile, ValueError, NotImplementedError, struct.error,
               OverflowError, KeyError, IndexError)


@dataclass(frozen=True)
class _Member:
    zip_info: zipfile.ZipInfo
    shape: tuple[int, ...]
    fortran_order: bool
    stored: np.dtype
    header_size: int


def _read_npy_header(archive: zipfile.ZipFile, zip_info: zipfile.ZipInfo, where: str, *,
                     text: bool = False) -> _Member:
    """Parse one member's .npy header and check it against the zip's declared sizes."""
    try:
        with archive.open(zip_info) as member:
            version = npy_format.read_magic(member)
            if version == (1, 0):
                shape, fortran_order, dtype = npy_format.read_array_header_1_0(member)
            elif version == (2, 0):
                shape, fortran_order, dtype = npy_format.read_array_header_2_0(member)
            else:
                raise InputError(f"{where}: unsupported .npy format version {version[0]}.{version[1]}")
            header_size = member.tell()
    except InputError:
        raise
    except _READ_ERRORS as exc:
        raise InputError(f"{where}: cannot read the member: {_one_line(exc)}") from None
    except _ZIP_ERRORS as exc:
        raise InputError(f"{where}: not a valid .npy member: {_one_line(exc)}") from None
    if any(isinstance(dim, bool) or not isinstance(dim, int) or dim < 0 for dim in shape):
        raise InputError(f"{where}: invalid shape {shape}")
    if dtype.hasobject:
        raise InputError(f"{where}: object arrays are refused (loading them would unpickle code)")
    try:
        if not (text and dtype.kind == "U"):
            by_numpy(dtype)
    except KeyError:
        raise InputError(f"{where}: unsupported dtype {dtype} (wtool reads {', '.join(DTYPES)})") from None
    needed = header_size + math.prod(shape) * dtype.itemsize
    if zip_info.file_size != needed:
        raise InputError(f"{where}: the zip declares {zip_info.file_size} bytes but the .npy header "
                         f"({dtype} {list(shape)}) needs {needed}")
    return _Member(zip_info, tuple(shape), bool(fortran_order), dtype, header_size)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= 200 else text[:200] + "..."


def _check_zip_entry(zip_info: zipfile.ZipInfo, archive_size: int, where: str) -> None:
    if zip_info.flag_bits & 0x1:
        raise InputError(f"{where}: encrypted members are not supported")
    if zip_info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise InputError(f"{where}: unsupported compression method {zip_info.compress_type} "
                         f"(npz uses stored or deflate)")
    if zip_info.header_offset + zip_info.compress_size > archive_size:
        raise InputError(f"{where}: member data runs past the end of the archive (truncated file?)")
    if zip_info.compress_type == zipfile.ZIP_STORED and zip_info.compress_size != zip_info.file_size:
        raise InputError(f"{where}: stored member declares {zip_info.file_size} bytes but holds "
                         f"{zip_info.compress_size}")
    if (zip_info.compress_type == zipfile.ZIP_DEFLATED
            and zip_info.file_size > MAX_DEFLATE_RATIO * zip_info.compress_size + 4096):
        raise InputError(f"{where}: declares {zip_info.file_size} bytes from {zip_info.compress_size} "
                         f"compressed, more than deflate can produce (zip bomb?)")


class NpzReader(Reader):
    """Reads an .npz archive member by member; memory is bounded by the tensor being read."""

    format = "npz"

    def __init__(self, path: Path):
        handle = open_regular(path)
        try:
            self._open(path, handle)
        except BaseException:
            handle.close()
            raise

    def _open(self, path: Path, handle: BinaryIO) -> None:
        self._handle = handle
        try:
            archive_size = os.fstat(handle.fileno()).st_size
            if handle.read(6) == b"\x93NUMPY":
                raise InputError(f"{path}: is a single .npy array, not an .npz archive")
            handle.seek(0)
            self._zip: zipfile.ZipFile | None = zipfile.ZipFile(handle)
            entries = self._zip.infolist()
        except InputError:
            raise
        except _ZIP_ERRORS as exc:
            raise InputError(f"{path}: not a valid .npz (zip) archive: {_one_line(exc)}") from None

        members: dict[str, _Member] = {}
        seen: set[str] = set()
        wtool_entry = None
        for zip_info in entries:
            member_name = zip_info.filename
            where = f"{path}: member {show(member_name)}"
            if member_name in seen:
                raise InputError(f"{where} appears twice in the archive")
            seen.add(member_name)
            if zip_info.is_dir():
                continue
            _check_zip_entry(zip_info, archive_size, where)
            if not member_name.endswith(".npy"):
                raise InputError(f"{where} is not a .npy array")
            if member_name == WTOOL_MEMBER:
                wtool_entry = zip_info
                continue
            name = member_name[:-4]
            problem = name_problem(name)
            if problem:
                raise InputError(f"{path}: tensor name {show(name)} {problem}")
            members[name] = _read_npy_header(self._zip, zip_info, f"{path}: tensor {show(name)}")

        dtypes, metadata = ({}, {}) if wtool_entry is None else self._read_wtool(path, wtool_entry)
        tensors = []
        for name, member in members.items():
            stored_code = by_numpy(member.stored).code
            code = dtypes.get(name, stored_code)
            if code != stored_code and BIT_CARRIERS.get(code) != stored_code:
                raise InputError(f"{path}: member {WTOOL_MEMBER!r} declares tensor {show(name)} as {code} "
                                 f"but it is stored as {stored_code}")
            tensors.append(TensorInfo(name, code, member.shape))
        for name in dtypes:
            if name not in members:
                raise InputError(f"{path}: member {WTOOL_MEMBER!r} declares a dtype for tensor {show(name)}, "
                                 f"which the archive does not hold")
        self._members = members
        super().__init__(path, tensors, metadata, [path], [Stamp.of(path, os.fstat(handle.fileno()))])

    def _read_wtool(self, path: Path, zip_info: zipfile.ZipInfo) -> tuple[dict[str, str], dict[str, str]]:
        where = f"{path}: member {WTOOL_MEMBER!r}"
        if zip_info.file_size > MAX_HEADER_BYTES:
            raise InputError(f"{where} is {zip_info.file_size} bytes, over the {MAX_HEADER_BYTES} byte limit")
        member = _read_npy_header(self._zip, zip_info, where, text=True)
        if member.stored.kind != "U" or member.shape != ():
            raise InputError(f"{where} must hold a 0-d unicode string, not {member.stored} {list(member.shape)}")
        text = str(self._load(member, where)[()])
        record = load_json(text.encode("utf-8", "surrogatepass"), where)
        if not isinstance(record, dict):
            raise InputError(f"{where} must hold a JSON object")
        dtypes = record.get("dtypes", {})
        if not isinstance(dtypes, dict) or any(
                not isinstance(code, str) or code not in DTYPES for code in dtypes.values()):
            raise InputError(f"{where}: 'dtypes' must map tensor names to dtype codes ({', '.join(DTYPES)})")
        metadata = check_metadata(record.get("metadata", {}), f"{where}: metadata")
        return dtypes, metadata

    def _load(self, member: _Member, where: str) -> np.ndarray:
        """The member's array, C-contiguous and native-endian in its stored dtype."""
        if self._zip is None:
            raise InputError(f"{self.path}: reader is closed")
        nbytes = math.prod(member.shape) * member.stored.itemsize
        data = np.empty(nbytes, dtype=np.uint8)
        try:
            with self._zip.open(member.zip_info) as stream:
                stream.read(member.header_size)
                view = memoryview(data)
                position = 0
                while position < nbytes:
                    count = stream.readinto(view[position:position + _CHUNK])
                    if not count:
                        raise InputError(f"{where}: data ends after {position} of {nbytes} bytes")
                    position += count
                if stream.read(1):
                    raise InputError(f"{where}: member holds more data than its .npy header describes")
        except InputError:
            raise
        except _ZIP_ERRORS as exc:
            raise InputError(f"{where}: cannot read the member: {_one_line(exc)}") from None
        array = data.view(member.stored)
        if member.fortran_order:
            array = array.reshape(member.shape[::-1]).T
        else:
            array = array.reshape(member.shape)
        # ascontiguousarray returns at least 1-d: reshape keeps 0-d arrays 0-d
        return np.ascontiguousarray(array, dtype=member.stored.newbyteorder("=")).reshape(member.shape)

    def _read(self, info: TensorInfo) -> np.ndarray:
        where = f"{self.path}: tensor {show(info.name)}"
        array = self._load(self._members[info.name], where)
        if info.dtype == "BOOL":
            check_bool_bytes(array, where)
        if array.dtype != info.dtype_info.numpy:
            array = array.view(info.dtype_info.numpy)
        return array

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None
        self._handle.close()


def _check_npz_names(path: Path, tensors: Sequence[TensorInfo]) -> None:
    for info in tensors:
        if info.name + ".npy" == WTOOL_MEMBER:
            raise UsageError(f"{path}: tensor name '__wtool__' is reserved in npz output")
        if len((info.name + ".npy").encode("utf-8")) > 0xFFFF:
            raise UsageError(f"{path}: tensor name {show(info.name)} is too long for a zip member name")


class NpzWriter(Writer):
    """Streams an uncompressed (ZIP_STORED, zip64) npz, one member per tensor."""

    def __init__(self, path: Path, tensors: Sequence[TensorInfo], metadata: Mapping[str, str], *,
                 force: bool = False, inputs: Inputs | None = None):
        super().__init__(path, tensors, metadata)
        _check_npz_names(path, self.tensors)
        self._file = AtomicFile(path, force=force, inputs=inputs)
        try:
            with as_output_error(path):
                self._zip = zipfile.ZipFile(self._file.handle, "w", zipfile.ZIP_STORED, allowZip64=True)
                dtypes = {info.name: info.dtype for info in self.tensors if info.dtype in BIT_CARRIERS}
                if dtypes or self.metadata:
                    record = json.dumps({"dtypes": dtypes, "metadata": self.metadata}, ensure_ascii=False)
                    self._member(WTOOL_MEMBER, np.array(record))
        except BaseException:
            self._state = "aborted"
            self._abort()
            raise

    @property
    def placed(self) -> bool:
        return self._file.placed

    def _member(self, member_name: str, array: np.ndarray) -> None:
        zip_info = zipfile.ZipInfo(member_name, date_time=_FIXED_DATE)
        zip_info.compress_type = zipfile.ZIP_STORED
        zip_info.external_attr = 0o644 << 16
        with self._zip.open(zip_info, "w", force_zip64=True) as member:
            npy_format.write_array(member, array, allow_pickle=False)

    def _write(self, info: TensorInfo, array: np.ndarray) -> None:
        carrier = BIT_CARRIERS.get(info.dtype)
        if carrier:
            array = array.view(by_code(carrier).numpy)
        with as_output_error(self.path):
            self._member(info.name + ".npy", array)

    def _commit(self) -> None:
        with as_output_error(self.path):
            self._zip.close()
        written = self._file.finish()
        _check_written(self.path, written, self.tensors, self.metadata)
        self._file.commit()

    def _abort(self) -> None:
        self._file.abort()
        archive = getattr(self, "_zip", None)
        try:  # the handle is closed: this only releases the ZipFile, which would otherwise finish in __del__
            if archive is not None:
                archive.close()
        except (OSError, ValueError):
            pass


def _check_written(target: Path, written: Path, tensors: Sequence[TensorInfo], metadata: Mapping[str, str]) -> None:
    """numpy must list the members, and our reader must see exactly the declared tensors."""
    try:
        with np.load(written, allow_pickle=False) as loaded:
            files = [name for name in loaded.files if name != WTOOL_MEMBER[:-4]]
        with NpzReader(written) as reader:
            found, found_metadata = reader.tensors, reader.metadata
    except Exception as exc:
        raise OutputError(f"{target}: the written npz does not load back: {_one_line(exc)}") from None
    declared = [TensorInfo(info.name, info.dtype, tuple(info.shape)) for info in tensors]
    if files != [info.name for info in tensors] or found != declared or found_metadata != dict(metadata):
        raise OutputError(f"{target}: the written npz reads back different tensors or metadata than were written")
