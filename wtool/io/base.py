"""What every format shares: the Reader and Writer interfaces, name checks, size parsing.

A Reader lists tensors (name, dtype, shape) before any data is read and reads one tensor at
a time; a Writer is told every tensor up front and then receives arrays in that order, so
formats with a header (safetensors) can stream.

>>> parse_size("1.5GB")
1500000000
"""

from __future__ import annotations

import json
import os
import re
import stat
import unicodedata
from collections.abc import Mapping, Sequence
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import numpy as np

from wtool.dtypes import DTYPES, by_numpy, to_storage
from wtool.errors import InputError, UsageError, WtoolError
from wtool.io.protect import Stamp
from wtool.tensor import Stored, TensorInfo

#: JSON headers, indexes and metadata members larger than this are refused before reading them
#: (the safetensors library uses the same limit).
MAX_HEADER_BYTES = 100_000_000


class WriterMisuse(WtoolError, ValueError):
    """A Writer was driven wrongly (order, dtype, shape): a bug in the caller, not bad input."""


def show(name: str, limit: int = 120) -> str:
    """A tensor name quoted for a one-line message: control characters escaped, long names cut."""
    if len(name) > limit:
        name = name[:limit] + "..."
    return repr(name)


def name_problem(name: object) -> str | None:
    """Why `name` cannot be a tensor name, or None. Names are data, never paths: `../x` is fine."""
    if not isinstance(name, str):
        return f"is not a string ({type(name).__name__})"
    if not name:
        return "is empty"
    for char in name:
        if unicodedata.category(char) == "Cc":
            return f"contains the control character {char!r}"
        if "\ud800" <= char <= "\udfff":
            return "is not valid Unicode (lone surrogate)"
    return None


class _DuplicateKey(Exception):
    pass


def _refuse_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise _DuplicateKey(key)
        result[key] = value
    return result


def load_json(data: bytes, where: str) -> Any:
    """Parse UTF-8 JSON strictly: duplicate keys anywhere, bad UTF-8 or deep nesting -> InputError."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{where} is not valid UTF-8 (byte {exc.start})") from None
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates)
    except _DuplicateKey as exc:
        raise InputError(f"{where} has the key {show(exc.args[0])} twice") from None
    except json.JSONDecodeError as exc:
        raise InputError(f"{where} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise InputError(f"{where} is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal longer than Python's 4300-digit limit
        raise InputError(f"{where} is not valid JSON: {exc}") from None


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading; InputError for anything else (a FIFO would block forever)."""
    try:
        descriptor = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            kind = "a folder" if stat.S_ISDIR(mode) else "not a regular file"
            raise InputError(f"{path}: is {kind}")
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


def check_metadata(metadata: object, where: str) -> dict[str, str]:
    """A str -> str mapping, or InputError naming `where`."""
    if not isinstance(metadata, dict):
        raise InputError(f"{where} must be an object of strings, not {type(metadata).__name__}")
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise InputError(f"{where}: value of {show(key)} must be a string, not {type(value).__name__}")
        if any("\ud800" <= char <= "\udfff" for char in key + value):
            raise InputError(f"{where}: entry {show(key)} is not valid Unicode (lone surrogate)")
    return dict(metadata)


def check_bool_bytes(array: np.ndarray, where: str) -> None:
    """numpy's behaviour for bool bytes other than 0 and 1 is undefined: refuse them."""
    if array.size and int(array.reshape(-1).view(np.uint8).max()) > 1:
        raise InputError(f"{where}: BOOL data holds bytes other than 0 and 1")


def parse_size(text: str | int) -> int:
    """Bytes from a size like `5GB`, `500MB`, `2GiB`, `1.5GB` or `123B` (Hugging Face convention).

    KB/MB/GB/TB are powers of 10, KiB/MiB/GiB/TiB powers of 2; units are case-insensitive and
    the trailing `B` is optional (`5G` is `5GB`). A text needs a unit (`5` could mean 5 bytes or
    5 GB); an int is bytes. Fractions are rounded down to whole bytes.

    >>> parse_size("2GiB"), parse_size("500MB"), parse_size(123)
    (2147483648, 500000000, 123)
    """
    if isinstance(text, bool):
        raise UsageError(f"invalid size {text!r}")
    if isinstance(text, int):
        value = Decimal(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?|\.\d+)\s*(?:([kmgt])(i)?)?(b)?\s*", str(text), re.IGNORECASE)
        if not match:
            raise UsageError(f"invalid size {text!r}; use e.g. 5GB, 500MB, 2GiB or 1000B")
        if not match.group(2) and not match.group(4):
            raise UsageError(f"invalid size {text!r}: needs a unit, e.g. 5GB, 500MB, 2GiB or {text.strip()}B for bytes")
        try:
            value = Decimal(match.group(1))
        except InvalidOperation:  # pragma: no cover - the pattern only lets numbers through
            raise UsageError(f"invalid size {text!r}") from None
        if match.group(2):
            power = "kmgt".index(match.group(2).lower()) + 1
            value *= (1024 if match.group(3) else 1000) ** power
    size = int(value)
    if size < 1:
        raise UsageError(f"invalid size {text!r}: must be at least 1 byte")
    return size


def model_folder(path: Path) -> Path | None:
    """The Hugging Face model folder a checkpoint path stands for (config, tokenizer and
    shards live there): the folder itself or the folder of an index file; None for a file.

    >>> model_folder(Path("fixtures/tiny-llama.safetensors")) is None, model_folder(Path("m/model.index.json"))
    (True, PosixPath('m'))
    """
    if path.is_dir():
        return path
    return path.parent if path.name.lower().endswith(".json") else None


class Reader:
    """One opened checkpoint. Subclasses fill the attributes and implement `_read`.

    `tensors` lists every tensor in checkpoint order before any data is read;
    `read(name)` returns one C-contiguous, native-endian array of the exact stored dtype.
    """

    path: Path
    format: str
    metadata: dict[str, str]
    tensors: list[TensorInfo]
    files: list[Path]
    stamps: list[Stamp]

    def __init__(self, path: Path, tensors: list[TensorInfo], metadata: dict[str, str], files: list[Path],
                 stamps: list[Stamp] | None = None):
        self.path = path
        self.tensors = tensors
        self.metadata = metadata
        self.files = files
        #: each file as it was opened, so a run can tell when one changes under it
        self.stamps = stamps if stamps is not None else [Stamp.of(file) for file in files]
        self._by_name = {info.name: info for info in tensors}

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {str(self.path)!r}: {len(self.tensors)} tensors>"

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def info(self, name: str) -> TensorInfo:
        try:
            return self._by_name[name]
        except KeyError:
            raise InputError(f"{self.path}: no tensor {show(name)}") from None

    def read(self, name: str) -> np.ndarray:
        return self._read(self.info(name))

    def stored(self, name: str) -> Stored | None:
        """`name` as stored, not read: a writer copies its bytes file to file and the statistics
        process reads them itself. None when they are not stored as they are read (npz members,
        decompressed weights) or need a check when read (bool)."""
        self.info(name)
        return None

    def config(self) -> dict[str, Any] | None:
        """The model's `config.json` beside the checkpoint (where transformers looks), or None.

        Group transforms read facts such as `tie_word_embeddings` from it.
        """
        candidate = (model_folder(self.path) or self.path.parent) / "config.json"
        if not candidate.is_file():
            return None
        try:
            data = load_json(candidate.read_bytes(), str(candidate))
        except OSError as exc:
            raise InputError(f"{candidate}: cannot read: {exc.strerror or exc}") from None
        if not isinstance(data, dict):
            raise InputError(f"{candidate}: not a JSON object")
        return data

    def _read(self, info: TensorInfo) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        """Release files and mappings; arrays already returned stay valid."""

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class Writer:
    """Receives arrays in the declared order and commits them atomically.

    `with create_writer(...) as writer:` commits when the block ends normally and aborts
    (nothing left behind, an existing target untouched) when it raises, Ctrl-C included.
    Subclasses implement `_write`, `_commit` and `_abort`.
    """

    def __init__(self, path: Path, tensors: Sequence[TensorInfo], metadata: Mapping[str, str]):
        self.path = path
        self.tensors = list(tensors)
        self.metadata = dict(metadata)
        self._next = 0
        self._state = "open"

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {str(self.path)!r}: {self._next}/{len(self.tensors)} written, {self._state}>"

    def write(self, name: str, array: np.ndarray | Stored) -> None:
        """Write the next tensor; its dtype and shape must be the declared ones. A `Stored`
        tensor is copied from its file where the format allows, else read and written."""
        if self._state != "open":
            raise WriterMisuse(f"{self.path}: write({show(name)}) after the writer was {self._state}")
        if self._next >= len(self.tensors):
            raise WriterMisuse(f"{self.path}: tensor {show(name)} was not declared (all {len(self.tensors)} written)")
        info = self.tensors[self._next]
        if name != info.name:
            raise WriterMisuse(f"{self.path}: tensor {show(name)} written where {show(info.name)} was declared next")
        if not isinstance(array, Stored):
            array = np.asarray(array)
        try:
            code = by_numpy(array.dtype).code
        except KeyError:
            code = str(array.dtype)
        if code != info.dtype or array.shape != tuple(info.shape):
            raise WriterMisuse(f"{self.path}: tensor {show(name)} is {code} {list(array.shape)} "
                               f"but was declared {info.dtype} {list(info.shape)}")
        try:
            if isinstance(array, Stored):
                self._write_stored(info, array)
            else:  # to_storage (np.ascontiguousarray) turns 0-d arrays into shape (1,): restore the shape
                self._write(info, to_storage(array, info.dtype_info).reshape(info.shape))
        except BaseException:
            self.abort()
            raise
        self._next += 1

    def _write_stored(self, info: TensorInfo, stored: Stored) -> None:
        """Write a tensor as stored; formats that copy it file to file override this."""
        self._write(info, stored.read())

    def commit(self) -> None:
        """Finish the output and move it into place; a second call does nothing."""
        if self._state == "committed":
            return
        if self._state != "open":
            raise WriterMisuse(f"{self.path}: commit after the writer was {self._state}")
        if self._next != len(self.tensors):
            self.abort()
            missing = self.tensors[self._next].name
            raise WriterMisuse(f"{self.path}: commit with {len(self.tensors) - self._next} tensors "
                               f"not written, first {show(missing)}")
        try:
            self._commit()
        except BaseException:
            if self.placed:  # a signal held while the output was put in place: it is complete
                self._state = "committed"
            else:
                self.abort()
            raise
        self._state = "committed"

    def abort(self) -> None:
        """Remove everything written so far; an existing target stays untouched. Idempotent."""
        if self._state == "open":
            self._state = "aborted"
            self._abort()

    def __enter__(self) -> Writer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()

    def __del__(self) -> None:
        if getattr(self, "_state", None) == "open":
            try:
                self.abort()
            except Exception:
                pass

    @property
    def placed(self) -> bool:
        """Whether the output is in place (it may be, while `commit` still raises a held signal)."""
        raise NotImplementedError

    def _write(self, info: TensorInfo, array: np.ndarray) -> None:
        raise NotImplementedError

    def _commit(self) -> None:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError


def check_output_tensors(path: Path, tensors: Sequence[TensorInfo], metadata: Mapping[str, str]) -> None:
    """Refuse names and metadata no reader would accept back, before anything is created."""
    seen: set[str] = set()
    for info in tensors:
        problem = name_problem(info.name)
        if problem:
            raise UsageError(f"{path}: output tensor name {show(str(info.name))} {problem}")
        if info.name == "__metadata__":
            raise UsageError(f"{path}: '__metadata__' is reserved and cannot be a tensor name")
        if info.name in seen:
            raise UsageError(f"{path}: output tensor {show(info.name)} is declared twice")
        seen.add(info.name)
        if info.dtype not in DTYPES:
            raise UsageError(f"{path}: tensor {show(info.name)} has unknown dtype {info.dtype!r}")
        if any(isinstance(dim, bool) or not isinstance(dim, int) or dim < 0 for dim in info.shape):
            raise UsageError(f"{path}: tensor {show(info.name)} has invalid shape {list(info.shape)}")
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise UsageError(f"{path}: metadata must map strings to strings; got {key!r}: {value!r}")
        if any("\ud800" <= char <= "\udfff" for char in key + value):
            raise UsageError(f"{path}: metadata entry {show(key)} is not valid Unicode")
