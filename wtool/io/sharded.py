"""Hugging Face sharded checkpoints: a folder of safetensors shards and an index.

The index is `{"metadata": {"total_size": N}, "weight_map": {tensor: shard file}}`. Shard
names are paths relative to the folder; one that could leave it (`..`, absolute, a drive)
is refused without being opened. Symlinks inside the folder are followed, as in the Hub
cache, whose snapshot files link to `../../blobs/...`.

Reading order: shards sorted by file name (`model-00001-of-00003` first), then each shard's
header order. Writing: shards `model-00001-of-0000N.safetensors` filled greedily in tensor
order, and always an index, even for a single shard; or, for a single-file model, one
`model.safetensors` and no index.
"""

from __future__ import annotations

import json
import os
import threading
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import BinaryIO, TypeVar

import numpy as np

from wtool.errors import InputError
from wtool.io.atomic import AtomicFolder, as_output_error, copy_file, create_file, finish_file, fsync_dir
from wtool.io.base import (
    MAX_HEADER_BYTES,
    Reader,
    Stored,
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
    write_stored,
)
from wtool.io.protect import Inputs, Stamp
from wtool.tensor import TensorInfo

T = TypeVar("T")
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
MAX_OPEN_SHARDS = 16
#: Weight files (and their indexes): in a model folder they hold the weights the run rewrites or
#: the same weights in another format (pytorch_model.bin, onnx/model.onnx), so they stay behind,
#: except inside the module folders a sentence-transformers `modules.json` names (2_Dense/...).
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".ot", ".onnx",
                   ".onnx_data", ".gguf", ".tflite", ".index.json")


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
    """Reads every shard's header listed by the index and checks they agree with it; shard
    files are then opened as tensors are read, a few at a time (a 300-shard folder works
    under `ulimit -n 256`)."""

    format = "sharded"

    def __init__(self, path: Path, index: Path):
        weight_map, self._index_stamp = _read_index(index)
        folder = index.parent
        self._shards: dict[str, SafetensorsReader] = {}
        self._open: dict[str, None] = {}  # shards with an open file, least recently read first
        self._lock = threading.Lock()
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
            self._shards[shard].release()

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
        """Read the tensor from its shard, opening the shard if needed; at most MAX_OPEN_SHARDS
        stay open (arrays outlive the file handle)."""
        return self._in_shard(info.name, lambda reader: reader.read(info.name))

    def stored(self, name: str) -> Stored | None:
        inner = self._shards[self._location[self.info(name).name]].stored(name)
        if inner is None:
            return None

        def copy(handle: BinaryIO) -> int:  # through `_in_shard`, as reads: few shards open at once
            return self._in_shard(name, lambda reader: reader.copy_into(inner.nbytes, inner.offset, handle))
        return Stored(inner.info, inner.file, inner.offset, partial(self.read, name), copy, inner.where)

    def _in_shard(self, name: str, use: Callable[[SafetensorsReader], T]) -> T:
        """`use` the reader of `name`'s shard, opened if need be; the least recently used is
        closed when more than MAX_OPEN_SHARDS are open."""
        shard = self._location[name]
        with self._lock:
            result = use(self._shards[shard])
            self._open.pop(shard, None)
            self._open[shard] = None
            if len(self._open) > MAX_OPEN_SHARDS:
                oldest = next(iter(self._open))
                del self._open[oldest]
                self._shards[oldest].release()
        return result

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


@dataclass
class ModelFiles:
    """What of a model folder travels to a folder output (relative POSIX paths) and what stays."""

    folder: Path
    copied: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


def model_files(folder: Path, skip: Sequence[Path] = ()) -> ModelFiles:
    """Every file of a model folder that a folder output carries along: config, tokenizer,
    sentence-transformers modules (`1_Pooling/`), custom code, licence, model card.

    Left behind: weight files (see WEIGHT_SUFFIXES) outside sentence-transformers module
    folders, hidden files and folders (`.git`, `.cache`), symlinked folders, anything that is
    not a regular file, and the paths in `skip` (the input's own files, an output inside it).

    >>> model_files(Path("all-MiniLM-L6-v2")).copied[:2]                  # doctest: +SKIP
    ['1_Pooling/config.json', 'README.md']
    """
    skipped = {path.resolve() for path in skip}
    modules = _module_folders(folder)
    found = ModelFiles(folder)
    for root, folders, files in os.walk(folder):
        here = Path(root)
        relative = here.relative_to(folder)
        for name in sorted(folders):
            path = here / name
            if name.startswith(".") or path.resolve() in skipped or path.is_symlink():
                folders.remove(name)
                if not name.startswith("."):
                    found.left.append((relative / name).as_posix() + "/")
        for name in files:
            path = here / name
            shown = (relative / name).as_posix()
            weights = name.lower().endswith(WEIGHT_SUFFIXES) and not (relative.parts and relative.parts[0] in modules)
            if name.startswith(".") or path.resolve() in skipped:
                continue
            if weights or not path.is_file():
                found.left.append(shown)
            else:
                found.copied.append(shown)
    found.copied.sort()
    found.left.sort()
    return found


def _module_folders(folder: Path) -> set[str]:
    """Top-level folders of sentence-transformers modules (`modules.json`), which keep their weights."""
    try:
        modules = json.loads((folder / "modules.json").read_text(encoding="utf-8"))
        return {str(m["path"]).split("/")[0] for m in modules if isinstance(m, dict) and m.get("path")}
    except (OSError, ValueError, TypeError, KeyError):
        return set()


def _write_new(target: Path, data: bytes) -> None:
    """Create `target` with `data`, fsynced (the index, a rewritten config.json)."""
    handle = create_file(target)
    try:
        handle.write(data)
        finish_file(handle)
    except BaseException:
        handle.close()
        raise


def shard_name(number: int, count: int) -> str:
    return f"model-{number:05d}-of-{count:05d}.safetensors"


class ShardedWriter(Writer):
    """Writes shards one after another into a hidden folder, then the index, then renames the folder."""

    def __init__(self, path: Path, tensors: Sequence[TensorInfo], metadata: Mapping[str, str],
                 max_shard_size: int | None, extra_files: Mapping[str, Path | bytes] | None = None,
                 one_file: bool = False, *, force: bool = False, inputs: Inputs | None = None,
                 copies: Mapping[str, int] | None = None):
        super().__init__(path, tensors, metadata)
        self._extra_files = dict(extra_files or {})
        self._one_file = one_file and max_shard_size is None
        if self._one_file:
            self._shards = [(SINGLE_NAME, self.tensors)]
        else:
            plan = plan_shards(self.tensors, max_shard_size)
            self._shards = [(shard_name(number, len(plan)), shard) for number, shard in enumerate(plan, 1)]
        self._headers = [check_header_size(path, shard, self.metadata, copies) for _, shard in self._shards]
        self._shard_of = [number for number, (_, shard) in enumerate(self._shards) for _ in shard]
        self._ends_shard = {position for position, number in enumerate(self._shard_of)
                            if position + 1 == len(self._shard_of) or self._shard_of[position + 1] != number}
        self._handle: BinaryIO | None = None
        self._folder = AtomicFolder(path, force=force, inputs=inputs)

    @property
    def placed(self) -> bool:
        return self._folder.placed

    def _write(self, info: TensorInfo, array: np.ndarray) -> None:
        self._put(partial(write_data, array=array))

    def _write_stored(self, info: TensorInfo, stored: Stored) -> None:
        self._put(partial(write_stored, stored=stored))

    def _put(self, write: Callable[[BinaryIO], None]) -> None:
        """Write the next tensor (`write` writes it to the shard's handle), starting and finishing shards."""
        number = self._shard_of[self._next]
        name, shard = self._shards[number]
        with as_output_error(self.path / name):
            if self._handle is None:
                self._handle = create_file(self._folder.temp / name)
                self._handle.write(self._headers[number])
            write(self._handle)
            if self._next in self._ends_shard:
                handle, self._handle = self._handle, None
                finish_file(handle)
        if self._next in self._ends_shard:
            check_with_reference(self.path / name, self._folder.temp / name, self._headers[number], shard,
                                 self.metadata)

    def _commit(self) -> None:
        index = {
            "metadata": {"total_size": sum(info.nbytes for info in self.tensors)},
            "weight_map": {info.name: name for name, shard in self._shards for info in shard},
        }
        if not self._one_file:
            with as_output_error(self.path / INDEX_NAME):
                _write_new(self._folder.temp / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode("utf-8"))
        folders = set()
        for name, source in self._extra_files.items():
            target = self._folder.temp / name
            with as_output_error(self.path / name):
                target.parent.mkdir(parents=True, exist_ok=True)
                if isinstance(source, bytes):
                    _write_new(target, source)
                else:
                    copy_file(source, target)
            folders.update(parent for parent in target.parents if self._folder.temp in parent.parents)
        for folder in sorted(folders, key=lambda p: -len(p.parts)):
            fsync_dir(folder)
        self._folder.commit()

    def _abort(self) -> None:
        if self._handle is not None:
            try:
                self._handle.close()
            except OSError:
                pass
            self._handle = None
        self._folder.abort()
