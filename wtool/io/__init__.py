"""Every checkpoint format behind one Reader and one Writer.

>>> with open_checkpoint("model.safetensors") as reader:            # doctest: +SKIP
...     infos = reader.tensors
...     with create_writer("out", infos, reader.metadata, max_shard_size=parse_size("2GB")) as writer:
...         for info in infos:
...             writer.write(info.name, reader.read(info.name))

Formats: a `.safetensors` file, an `.npz` archive, or a Hugging Face sharded folder
(`model.safetensors.index.json` plus shards). Reading validates everything up front and
raises InputError with one line naming the file, the tensor and the problem; writing is
streamed and atomic (a hidden temporary beside the target, renamed into place on commit).
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from wtool.errors import InputError, UsageError
from wtool.io.atomic import check_target
from wtool.io.protect import Inputs
from wtool.io.base import (
    Reader,
    Stored,
    Writer,
    WriterMisuse,
    check_output_tensors,
    model_folder,
    open_regular,
    parse_size,
)
from wtool.io.npz import NpzReader, NpzWriter
from wtool.io.safetensors import SafetensorsReader, SafetensorsWriter
from wtool.io.sharded import INDEX_NAME, ModelFiles, ShardedReader, ShardedWriter, model_files
from wtool.tensor import TensorInfo

__all__ = ["FORMATS", "Format", "Inputs", "Reader", "Stored", "Writer", "WriterMisuse", "open_checkpoint", "create_writer",
           "is_folder_output", "check_target", "ModelFiles", "model_files", "model_folder", "output_format",
           "parse_size", "protect", "protect_readers", "checkpoint_file", "is_checkpoint_folder", "sniff"]

_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}
#: A name ending like this is meant as a file, never as a folder (`.5-7B` in `Qwen2.5-7B` is not).
_FILE_SUFFIX = re.compile(r"\.[A-Za-z][A-Za-z0-9_]*")


@dataclass(frozen=True)
class Format:
    """One way a checkpoint is stored: the name ending that says so, how its first bytes look,
    its reader and writer, and for a folder the names of the checkpoint files in it."""

    suffix: str
    reader: Callable[[Path], Reader]
    writer: Callable[..., Writer] | None
    folder: bool = False
    #: Whether a file's first `MAGIC_BYTES` bytes start this format (None: only its name says so).
    magic: Callable[[bytes], bool] | None = None
    #: A folder's checkpoint files (shards, index), by name ending.
    members: tuple[str, ...] = ()

    def holds(self, name: str) -> bool:
        """Whether a file called `name` in a folder of this format is one of its checkpoint files."""
        return name.endswith(self.members) if self.members else False


#: How many bytes `sniff` reads: safetensors' 8-byte header length and the `{` after it.
MAGIC_BYTES = 9


def _safetensors_start(start: bytes) -> bool:
    return len(start) == MAGIC_BYTES and start[8:9] == b"{"


def _zip_start(start: bytes) -> bool:
    return start[:4] in (b"PK\x03\x04", b"PK\x05\x06")


def _open_index(path: Path) -> Reader:
    return ShardedReader(path, path)


def _open_folder(path: Path) -> Reader:
    if (path / INDEX_NAME).is_file():
        return ShardedReader(path, path / INDEX_NAME)
    if (path / "model.safetensors").is_file():
        return SafetensorsReader(path, path / "model.safetensors")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return ShardedReader(path, indexes[0])
    singles = sorted(path.glob("*.safetensors"))
    if not indexes and len(singles) == 1:
        return SafetensorsReader(path, singles[0])
    raise InputError(f"{path}: folder holds no {INDEX_NAME} or model.safetensors")


SAFETENSORS = Format(".safetensors", SafetensorsReader, SafetensorsWriter, magic=_safetensors_start)
NPZ = Format(".npz", NpzReader, NpzWriter, magic=_zip_start)
#: A Hugging Face sharded folder; read through its index file too.
FOLDER = Format("/", _open_folder, ShardedWriter, folder=True, members=(".safetensors", ".safetensors.index.json"))
INDEX = Format(".json", _open_index, None)
#: Every format a path's name selects, looked up by suffix (case-insensitive).
FORMATS = (SAFETENSORS, NPZ, INDEX)


def _by_suffix(path: Path) -> Format | None:
    name = path.name.lower()
    return next((fmt for fmt in FORMATS if name.endswith(fmt.suffix)), None)


def is_checkpoint_folder(path: Path) -> bool:
    """A Hugging Face model folder: sharded (an index) or a single `model.safetensors` (a folder
    that only holds some `*.safetensors` files opens too, but is not one: batch looks inside it)."""
    return (path / INDEX_NAME).is_file() or (path / "model.safetensors").is_file() or \
        any(path.glob("*.safetensors.index.json"))


def checkpoint_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is named as a checkpoint file (`.safetensors`, `.npz`; not an index)."""
    fmt = _by_suffix(Path(path))
    return fmt is not None and fmt.magic is not None


def sniff(start: bytes) -> Format | None:
    """The file format whose first bytes `start` (up to `MAGIC_BYTES` of them) are, if any.

    >>> sniff(b"PK\x03\x04") is NPZ, sniff(b"\x10" + bytes(7) + b"{") is SAFETENSORS, sniff(b"GGUF")
    (True, True, None)
    """
    return next((fmt for fmt in FORMATS if fmt.magic is not None and fmt.magic(start)), None)


def output_format(path: str | os.PathLike[str]) -> Format:
    """What `create_writer` writes at `path`: `.safetensors` or `.npz`, else a sharded folder
    for a name with no suffix, a trailing `/` or an existing folder. Other suffixes are a
    UsageError with a hint, never silently a folder.

    >>> output_format("out.npz").suffix, output_format("Qwen2.5-7B-q4").folder, output_format("out.bin/").folder
    ('.npz', True, True)
    >>> output_format("out.safetensor")
    Traceback (most recent call last):
    wtool.errors.UsageError: out.safetensor: cannot write '.safetensor' files (did you mean .safetensors?); \
the output is a .safetensors or .npz file, or a folder (no suffix, or end the path with /)
    """
    text = os.fspath(path)
    if text.endswith(("/", os.sep)):
        return FOLDER
    fmt = _by_suffix(Path(text))
    if fmt is not None and fmt.writer is not None:
        return fmt
    suffix = Path(text).suffix
    if not _FILE_SUFFIX.fullmatch(suffix) or Path(text).is_dir():
        return FOLDER
    writable = [f.suffix for f in FORMATS if f.writer is not None]
    close = difflib.get_close_matches(suffix.lower(), writable, n=1, cutoff=0.8)
    hint = f" (did you mean {close[0]}?)" if close else \
        " (wtool writes no pickle checkpoints)" if suffix.lower() in _PICKLE_SUFFIXES else ""
    raise UsageError(f"{text}: cannot write {suffix!r} files{hint}; the output is a "
                     f"{' or '.join(writable)} file, or a folder (no suffix, or end the path with /)")


def open_checkpoint(path: str | os.PathLike[str]) -> Reader:
    """Open a `.safetensors` file, an `.npz` archive, a sharded folder or its index file.

    A folder is read through `model.safetensors.index.json`, else `model.safetensors`, else
    its only `*.safetensors.index.json` or only `*.safetensors` file.
    """
    path = Path(path)
    if path.is_dir():
        return FOLDER.reader(path)
    if not (path.exists() or path.is_symlink()):
        raise InputError(f"{path}: no such file or folder")
    fmt = _by_suffix(path)
    if fmt is not None:
        return fmt.reader(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise InputError(f"{path}: pickle-based checkpoints are not read (loading them can run code); "
                         f"convert to safetensors first")
    if path.name.lower().endswith(".npy"):
        raise InputError(f"{path}: a single .npy array is not a checkpoint; save it in an .npz")
    with open_regular(path) as handle:
        fmt = sniff(handle.read(MAGIC_BYTES))
    if fmt is not None:
        return fmt.reader(path)
    raise InputError(f"{path}: not a recognised checkpoint (expected .safetensors, .npz or a sharded folder)")


def is_folder_output(path: str | os.PathLike[str]) -> bool:
    """Whether `create_writer` writes a sharded folder at `path` (see `output_format`)."""
    return output_format(path).folder


def create_writer(path: str | os.PathLike[str], tensors: Sequence[TensorInfo], metadata: Mapping[str, str] | None,
                  *, max_shard_size: int | str | None = None, force: bool = False,
                  extra_files: Mapping[str, Path | bytes] | None = None, one_file: bool = False,
                  inputs: Inputs | None = None, copies: Mapping[str, int] | None = None) -> Writer:
    """A streaming, atomic writer; the format follows the path.

    `*.safetensors` -> one file, `*.npz` -> npz, a folder name -> a Hugging Face sharded folder
    (`output_format`; one shard when `max_shard_size` is None, or a lone `model.safetensors` with
    `one_file`), into which `extra_files` (relative name -> source file or bytes: config,
    tokenizer, modules) are copied before the folder is put in place. An existing target is a
    UsageError unless `force`, and even then only a checkpoint wtool wrote is replaced
    (`atomic.replace_problem`). `inputs`, when given, may not be touched by the output and must
    not change before the commit. `copies` (name -> `Reader.stored(name).offset`) names the tensors
    that will be copied from the input unchanged: a safetensors output places them so that the
    kernel copies them page to page (`safetensors.encode_header`).
    """
    fmt = output_format(path)
    path = Path(path)
    metadata = dict(metadata or {})
    single = not fmt.folder
    if extra_files and single:
        raise UsageError(f"{path}: extra files can only go into a folder output")
    if max_shard_size is not None:
        if single:
            raise UsageError(f"{path}: --max-shard-size needs a folder output, not a single "
                             f"{path.suffix} file")
        if isinstance(max_shard_size, str):
            max_shard_size = parse_size(max_shard_size)
        if isinstance(max_shard_size, bool) or not isinstance(max_shard_size, int) or max_shard_size < 1:
            raise UsageError(f"invalid max shard size {max_shard_size!r}: must be a positive number of bytes")
    check_output_tensors(path, tensors, metadata)
    if inputs is not None:
        inputs.refuse(path, "output")
    check_target(path, force, "file" if single else "folder")
    if fmt.folder:
        return ShardedWriter(path, tensors, metadata, max_shard_size, extra_files, one_file, force=force,
                             inputs=inputs, copies=copies)
    if fmt is SAFETENSORS:
        return SafetensorsWriter(path, tensors, metadata, force=force, inputs=inputs, copies=copies)
    assert fmt.writer is not None
    return fmt.writer(path, tensors, metadata, force=force, inputs=inputs)


def protect_readers(readers: Sequence[Reader], reads: Sequence[str | os.PathLike[str]] = ()) -> Inputs:
    """Every file a run reads: each reader's files, the model files beside them, and `reads`."""
    inputs = Inputs()
    for reader in readers:
        _protect_reader(inputs, reader)
    for path in reads:
        inputs.add(Path(path))
    return inputs


def _protect_reader(inputs: Inputs, reader: Reader) -> None:
    inputs.add_stamps(reader.stamps)
    source = Path(reader.path)
    folder = model_folder(source)
    beside = [folder / name for name in model_files(folder).copied] if folder is not None else []
    for path in [*beside, (folder or source.parent) / "config.json"]:
        if path.is_file():
            inputs.add(path)


def protect(sources: Sequence[str | os.PathLike[str]]) -> Inputs:
    """The protected set of a command that only reads `sources` (inspect, diff, eval): what its
    reports may not touch, and what must not change before they are written. Only headers are read."""
    inputs = Inputs()
    for source in sources:
        with open_checkpoint(source) as reader:
            _protect_reader(inputs, reader)
    return inputs
