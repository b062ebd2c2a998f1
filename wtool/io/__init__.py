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

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from wtool.errors import InputError, UsageError
from wtool.io.atomic import check_target
from wtool.io.protect import Inputs
from wtool.io.base import (
    Reader,
    Writer,
    WriterMisuse,
    check_output_tensors,
    open_regular,
    parse_size,
)
from wtool.io.npz import NpzReader, NpzWriter
from wtool.io.safetensors import SafetensorsReader, SafetensorsWriter
from wtool.io.sharded import INDEX_NAME, ModelFiles, ShardedReader, ShardedWriter, model_files
from wtool.tensor import TensorInfo

__all__ = ["Inputs", "Reader", "Writer", "WriterMisuse", "open_checkpoint", "create_writer", "is_folder_output",
           "check_target", "ModelFiles", "model_files", "parse_size"]

_PICKLE_SUFFIXES = {".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle"}


def open_checkpoint(path: str | os.PathLike[str]) -> Reader:
    """Open a `.safetensors` file, an `.npz` archive, a sharded folder or its index file.

    A folder is read through `model.safetensors.index.json`, else `model.safetensors`, else
    its only `*.safetensors.index.json` or only `*.safetensors` file.
    """
    path = Path(path)
    if path.is_dir():
        return _open_folder(path)
    if not (path.exists() or path.is_symlink()):
        raise InputError(f"{path}: no such file or folder")
    name = path.name.lower()
    if name.endswith(".json"):
        return ShardedReader(path, path)
    if name.endswith(".safetensors"):
        return SafetensorsReader(path)
    if name.endswith(".npz"):
        return NpzReader(path)
    if path.suffix.lower() in _PICKLE_SUFFIXES:
        raise InputError(f"{path}: pickle-based checkpoints are not read (loading them can run code); "
                         f"convert to safetensors first")
    if name.endswith(".npy"):
        raise InputError(f"{path}: a single .npy array is not a checkpoint; save it in an .npz")
    with open_regular(path) as handle:
        start = handle.read(9)
    if start[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return NpzReader(path)
    if len(start) == 9 and start[8:9] == b"{":
        return SafetensorsReader(path)
    raise InputError(f"{path}: not a recognised checkpoint (expected .safetensors, .npz or a sharded folder)")


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


def is_folder_output(path: str | os.PathLike[str]) -> bool:
    """Whether `create_writer` would write a sharded folder at `path` (anything but *.safetensors / *.npz)."""
    return not Path(path).name.lower().endswith((".safetensors", ".npz"))


def create_writer(path: str | os.PathLike[str], tensors: Sequence[TensorInfo], metadata: Mapping[str, str] | None,
                  *, max_shard_size: int | str | None = None, force: bool = False,
                  extra_files: Mapping[str, Path | bytes] | None = None, one_file: bool = False,
                  inputs: Inputs | None = None) -> Writer:
    """A streaming, atomic writer; the format follows the path.

    `*.safetensors` -> one file, `*.npz` -> npz, anything else -> a Hugging Face sharded folder
    (one shard when `max_shard_size` is None, or a lone `model.safetensors` with `one_file`), into
    which `extra_files` (relative name -> source file or bytes: config, tokenizer, modules) are
    copied before the folder is put in place. An existing target is a UsageError unless `force`,
    and even then only a checkpoint wtool wrote is replaced (`atomic.replace_problem`). `inputs`,
    when given, may not be touched by the output and must not change before the commit.
    """
    path = Path(path)
    metadata = dict(metadata or {})
    name = path.name.lower()
    single = not is_folder_output(path)
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
    if name.endswith(".safetensors"):
        return SafetensorsWriter(path, tensors, metadata, force=force, inputs=inputs)
    if name.endswith(".npz"):
        return NpzWriter(path, tensors, metadata, force=force, inputs=inputs)
    return ShardedWriter(path, tensors, metadata, max_shard_size, extra_files, one_file, force=force, inputs=inputs)
