"""Hugging Face sharded checkpoints: a folder of safetensors shards and an index.

The index is `{"metadata": {"total_size": N}, "weight_map": {tensor: shard file}}`. Shard
names are paths relative to the folder; one that could leave it (`..`, absolute, a drive)
is refused without being opened. Symlinks inside the folder are followed, as in the Hub
cache, whose snapshot files link to `../../blobs/...`.

Reading order: shards sorted by file name (`model-00001-of-00003` first), then each shard's
header order. Writing: shards `model-00001-of-0000N.safetensors` filled greedily in tensor
order, and always an index, even for a single shard.
"""

from __future__ import annotations

import json
import os
import unicodedata
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO

import numpy as np

from wtool.errors import InputError
from wtool.io.atomic import AtomicFolder, as_output_error, copy_file, create_file, finish_file
from wtool.io.base import (
    MAX_HEADER_BYTES,
    Reader,
    Writer,
    load_json,
    open_regular,
    show,
)
from wtool.io.safetensors import (
    SafetensorsReader,
    check_header_size,
    check_with_reference,
    write_data,
)
from wtool.io.protect import Inputs, Stamp
from wtool.tensor import TensorInfo

INDEX_NAME = "model.safetensors.index.json"
#: Files of a Hugging Face model folder that travel with the weights (never weight files).
MODEL_FILES = ("config.json", "generation_config.json", "tokenizer*", "special_tokens_map.json",
               "added_tokens.json", "vocab.*", "merges.txt", "*.jinja", "chat_template.json",
               "preprocessor_config.json", "README.md")


def shard_problem(shard: object) -> str | None:
    """Why an index entry cannot name a shard inside the folder, or None."""
    if not isinstance(shard, str):
        return f"is not a string ({type(shard).__name__})"
    if not shard:
        return "is empty"
    if any(unicodedata.category(char) == "Cc" for char in shard):
        return "contains a control character"
    windows = PureWindowsPath(shard)
    if "\\" in shard or PurePosixPath(shard).is_absolute() or windows.drive or windows.root:
        return "must be a relative path inside the folder"
    if ".." in PurePosixPath(shard).parts:
        return "leaves the folder"
    if not shard.endswith(".safetensors"):
        return "is not a .safetensors file"
    return None


class ShardedReader(Reader):
    """Opens every shard listed by the index (header only) and checks they agree with it."""

    format = "sharded"

    def __init__(self, path: Path, index: Path):
        weight_map, self._index_stamp = _read_index(index)
        folder = index.parent
        self._shards: dict[str, SafetensorsReader] = {}
        try:
            self._open_shards(path, index, folder, weight_map)
        except BaseException:
            self.close()
            raise

    def _open_shards(self, path: Path, index: Path, folder: Path, weight_map: dict[str, str]) -> None:
        for shard in sorted(set(weight_map.values())):
            file = folder / shard
            if not (file.exists() or file.is_symlink()):
                tensor = next(name for name, value in weight_map.items() if value == shard)
                raise InputError(f"{index}: shard {shard!r} (holding tensor {show(tensor)}) does not exist")
            self._shards[shard] = SafetensorsReader(file)

        location: dict[str, str] = {}
        tensors: list[TensorInfo] = []
        for shard, reader in self._shards.items():
            for info in reader.tensors:
                where = f"{index}: tensor {show(info.name)}"
                if info.name in location:
                    raise InputError(f"{where} is stored in both {location[info.name]!r} and {shard!r}")
                if info.name not in weight_map:
                    raise InputError(f"{where} is stored in {shard!r} but the index does not list it")
                if weight_map[info.name] != shard:
                    raise InputError(f"{where} is stored in {shard!r} but the index maps it to "
                                     f"{weight_map[info.name]!r}")
                location[info.name] = shard
                tensors.append(info)
        for name, shard in weight_map.items():
            if name not in location:
                raise InputError(f"{index}: tensor {show(name)} is mapped to {shard!r}, which does not hold it")

        first = next(iter(self._shards.values()), None)
        metadata = dict(first.metadata) if first else {}
        files = [index] + [reader.file for reader in self._shards.values()]
        stamps = [self._index_stamp] + [stamp for reader in self._shards.values() for stamp in reader.stamps]
        super().__init__(path, tensors, metadata, files, stamps)
        self._location = location

    def _read(self, info: TensorInfo) -> np.ndarray:
        return self._shards[self._location[info.name]].read(info.name)

    def close(self) -> None:
        for reader in self._shards.values():
            reader.close()


def _read_index(index: Path) -> tuple[dict[str, str], Stamp]:
    with open_regular(index) as handle:
        try:
            stamp = Stamp.of(index, os.fstat(handle.fileno()))
            raw = handle.read(MAX_HEADER_BYTES + 1)
        except OSError as exc:
            raise InputError(f"{index}: cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_HEADER_BYTES:
        raise InputError(f"{index}: index is over the {MAX_HEADER_BYTES} byte limit")
    document = load_json(raw, f"{index}: index")
    if not isinstance(document, dict):
        raise InputError(f"{index}: index must be a JSON object, not {type(document).__name__}")
    if "weight_map" not in document:
        raise InputError(f"{index}: index has no 'weight_map'")
    weight_map = document["weight_map"]
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: 'weight_map' must be an object, not {type(weight_map).__name__}")
    normalized = {}
    for name, shard in weight_map.items():
        problem = shard_problem(shard)
        if problem:
            shown = shard if isinstance(shard, str) else json.dumps(shard)
            raise InputError(f"{index}: tensor {show(name)}: shard {show(shown)} {problem}")
        normalized[name] = str(PurePosixPath(shard))  # `./a` and `a` are the same shard
    return normalized, stamp


def plan_shards(tensors: Sequence[TensorInfo], max_shard_size: int | None) -> list[list[TensorInfo]]:
    """Greedy split in tensor order: a new shard starts when the next tensor would overflow this one.

    A tensor larger than the limit gets a shard of its own. Sizes count tensor bytes only,
    like transformers.

    >>> [len(s) for s in plan_shards([TensorInfo(n, "U8", (4,)) for n in "abcde"], 8)]
    [2, 2, 1]
    """
    shards: list[list[TensorInfo]] = []
    size = 0
    for info in tensors:
        if not shards or (max_shard_size is not None and shards[-1] and size + info.nbytes > max_shard_size):
            shards.append([])
            size = 0
        shards[-1].append(info)
        size += info.nbytes
    return shards


def model_files(folder: Path) -> list[Path]:
    """The non-weight files of a model folder (config, tokenizer, model card) that a folder
    output should carry along, so that the result loads with `from_pretrained`."""
    found = {p for pattern in MODEL_FILES for p in folder.glob(pattern) if p.is_file()}
    return sorted(found)


def shard_name(number: int, count: int) -> str:
    return f"model-{number:05d}-of-{count:05d}.safetensors"


class ShardedWriter(Writer):
    """Writes shards one after another into a hidden folder, then the index, then renames the folder."""

    def __init__(self, path: Path, tensors: Sequence[TensorInfo], metadata: Mapping[str, str],
                 max_shard_size: int | None, extra_files: Sequence[Path | tuple[str, bytes]] = (), *, force: bool = False,
                 inputs: Inputs | None = None):
        super().__init__(path, tensors, metadata)
        self._extra_files = list(extra_files)
        plan = plan_shards(self.tensors, max_shard_size)
        self._shards = [(shard_name(number, len(plan)), shard) for number, shard in enumerate(plan, 1)]
        self._headers = [check_header_size(path, shard, self.metadata) for _, shard in self._shards]
        self._shard_of = [number for number, (_, shard) in enumerate(self._shards) for _ in shard]
        self._ends_shard = {position for position, number in enumerate(self._shard_of)
                            if position + 1 == len(self._shard_of) or self._shard_of[position + 1] != number}
        self._handle: BinaryIO | None = None
        self._folder = AtomicFolder(path, force=force, inputs=inputs)

    @property
    def placed(self) -> bool:
        return self._folder.placed

    def _write(self, info: TensorInfo, array: np.ndarray) -> None:
        number = self._shard_of[self._next]
        name, shard = self._shards[number]
        with as_output_error(self.path / name):
            if self._handle is None:
                self._handle = create_file(self._folder.temp / name)
                self._handle.write(self._headers[number])
            write_data(self._handle, array)
            if self._next in self._ends_shard:
                handle, self._handle = self._handle, None
                finish_file(handle)
        if self._next in self._ends_shard:
            check_with_reference(self.path / name, self._folder.temp / name, shard, self.metadata)

    def _commit(self) -> None:
        index = {
            "metadata": {"total_size": sum(info.nbytes for info in self.tensors)},
            "weight_map": {info.name: name for name, shard in self._shards for info in shard},
        }
        with as_output_error(self.path / INDEX_NAME):
            handle = create_file(self._folder.temp / INDEX_NAME)
            handle.write((json.dumps(index, indent=2) + "\n").encode("utf-8"))
            finish_file(handle)
        for extra in self._extra_files:
            name, content = (extra.name, None) if isinstance(extra, Path) else extra
            with as_output_error(self.path / name):
                if content is None:
                    copy_file(extra, self._folder.temp / name)
                else:
                    handle = create_file(self._folder.temp / name)
                    handle.write(content)
                    finish_file(handle)
        self._folder.commit()

    def _abort(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError:
                pass
            self._handle = None
        self._folder.abort()
