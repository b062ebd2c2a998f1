"""`wtool new`: build a checkpoint from a small TOML or JSON spec, one tensor at a time.

A spec lists tensors by name, shape and dtype; float tensors are drawn by the `init`
transform (Xavier by default), 1-D float tensors and every non-float tensor are filled with
a constant (0 unless `value` says otherwise). Nothing is held in memory but the tensor being
written, so a multi-gigabyte stress fixture costs one tensor of RAM.

```toml
[defaults]              # optional: init options (and dtype) for every float tensor
scheme = "he"
seed = 0
dtype = "bfloat16"

[metadata]              # optional: str -> str, stored in the checkpoint header
format = "pt"

[[tensors]]
name = "embed.weight"
shape = [32000, 4096]
scheme = "xavier"       # per-tensor override of any init option

[[tensors]]             # repeat form: count copies, "{i}" in the name becomes 0..count-1
name = "layers.{i}.mlp.weight"
count = 24
shape = [4096, 4096]

[[tensors]]
name = "layers.{i}.norm.weight"
count = 24
shape = [4096]
value = 1.0             # 1-D tensors are filled (default 0)

[[tensors]]
name = "position_ids"
shape = [1, 2048]
dtype = "int64"         # non-float tensors are filled with value (default 0)
```

The JSON form has the same keys: {"defaults": {...}, "metadata": {...}, "tensors": [...]}.
Entries are written in the order given; the repeat form expands in place. Options of an
entry replace those of [defaults] as a group: an entry with `value` drops the defaults'
scheme options and an entry with any scheme option drops the defaults' `value`.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from wtool.dtypes import DType, by_user_name
from wtool.errors import InputError, UsageError
from wtool.io import create_writer
from wtool.io.base import name_problem
from wtool.tensor import TensorInfo
from wtool.transforms import Context, Transform
from wtool.transforms.init import SCHEME_OPTIONS, Init

__all__ = ["new_checkpoint", "read_spec"]

_TOP_KEYS = ("defaults", "metadata", "tensors")
_ENTRY_KEYS = ("name", "shape", "dtype", "count")
_PLACEHOLDER = "{i}"
_MAX_COUNT = 1_000_000


@dataclass(frozen=True)
class Planned:
    """One tensor to write: what it is, and either the init step drawing it or its fill value."""

    info: TensorInfo
    init: Transform | None
    fill: Any = 0


def new_checkpoint(spec_path: Path, out: str | Path, *, force: bool = False,
                   max_shard_size: int | None = None) -> list[TensorInfo]:
    """Write the checkpoint `spec_path` describes to `out` (format by suffix, as every output).

    The whole spec is validated before anything is written; then each tensor is generated,
    written and freed in turn. Returns the tensors written, in order.

    Raises InputError (exit 3) for a bad spec, naming the file and the entry, and UsageError
    for an existing `out` without `force`.
    """
    spec_path = Path(spec_path)
    metadata, plan = read_spec(spec_path)
    infos = [item.info for item in plan]
    with create_writer(out, infos, metadata, max_shard_size=max_shard_size, force=force) as writer:
        for item in plan:
            writer.write(item.info.name, _generate(item))
    return infos


def read_spec(spec_path: Path) -> tuple[dict[str, str], list[Planned]]:
    """Parse and check a spec: its metadata and the tensors to write, nothing generated yet."""
    spec = _load(spec_path)
    where = str(spec_path)
    if not isinstance(spec, dict):
        raise InputError(f"{where}: expected a table with {', '.join(_TOP_KEYS)}")
    unknown = [key for key in spec if key not in _TOP_KEYS]
    if unknown:
        raise InputError(f"{where}: unknown top-level key {unknown[0]!r}; expected {', '.join(_TOP_KEYS)}")
    defaults = spec.get("defaults", {})
    if not isinstance(defaults, dict):
        raise InputError(f"{where}: [defaults] must be a table of init options")
    metadata = spec.get("metadata", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise InputError(f"{where}: [metadata] must map names to strings")
    entries = spec.get("tensors")
    if not isinstance(entries, list) or not entries:
        raise InputError(f"{where}: no tensors: add [[tensors]] entries with name and shape")
    default_dtype = _dtype(defaults.get("dtype", "float32"), f"{where}: [defaults]")
    default_options = {key: value for key, value in defaults.items() if key != "dtype"}
    known = [row["name"] for row in Init.describe_params()]
    for key in default_options:  # a typo here fails even where every entry overrides it
        if key not in known:
            raise InputError(f"{where}: [defaults]: unknown option {key!r}; expected dtype, {', '.join(known)}")
    plan: list[Planned] = []
    seen: dict[str, int] = {}
    for index, entry in enumerate(entries):
        for item in _expand(entry, index, where, default_dtype, default_options):
            name = item.info.name
            if name in seen:
                raise InputError(f"{where}: tensors[{index}]: name {name!r} is already used by "
                                 f"tensors[{seen[name]}]")
            seen[name] = index
            plan.append(item)
    return dict(metadata), plan


def _load(spec_path: Path) -> Any:
    try:
        text = spec_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{spec_path}: no such spec file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"{spec_path}: cannot read the spec: {error}") from None
    if spec_path.suffix.lower() == ".json":
        try:
            return json.loads(text)
        except json.JSONDecodeError as error:
            raise InputError(f"{spec_path}: invalid JSON: {error}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        hint = "" if spec_path.suffix.lower() == ".toml" else " (a .json suffix reads JSON)"
        raise InputError(f"{spec_path}: invalid TOML{hint}: {error}") from None


def _dtype(name: Any, where: str) -> DType:
    if not isinstance(name, str):
        raise InputError(f"{where}: dtype must be a string such as \"bfloat16\", not {name!r}")
    try:
        return by_user_name(name)
    except UsageError as error:
        raise InputError(f"{where}: {error}") from None


def _init_step(options: dict[str, Any], where: str) -> Transform:
    try:
        return Transform.create("init", options)
    except UsageError as error:
        raise InputError(f"{where}: {error}") from None


def _expand(entry: Any, index: int, where: str, default_dtype: DType,
            default_options: dict[str, Any]) -> list[Planned]:
    at = f"{where}: tensors[{index}]"
    if not isinstance(entry, dict):
        raise InputError(f"{at}: expected a table with name and shape")
    name = entry.get("name")
    if not isinstance(name, str):
        raise InputError(f"{at}: needs a name (a string)")
    at = f"{at} ({name!r})"
    count = entry.get("count")
    if count is not None:
        if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= _MAX_COUNT:
            raise InputError(f"{at}: count must be an integer from 1 to {_MAX_COUNT:,}, not {count!r}")
        if _PLACEHOLDER not in name:
            raise InputError(f"{at}: count={count} needs {_PLACEHOLDER} in the name to number the copies")
    shape = entry.get("shape")
    if (not isinstance(shape, list)
            or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
        raise InputError(f"{at}: shape must be a list of non-negative integers, not {shape!r}")
    dtype = _dtype(entry["dtype"], at) if "dtype" in entry else default_dtype
    options = {key: value for key, value in entry.items() if key not in _ENTRY_KEYS}
    names = [name] if count is None else [name.replace(_PLACEHOLDER, str(i)) for i in range(count)]
    for each in names:
        problem = name_problem(each)
        if problem:
            raise InputError(f"{at}: tensor name {each!r} {problem}")
    template = _plan_one(TensorInfo(names[0], dtype.code, tuple(shape)), options, default_options, at)
    return [Planned(TensorInfo(each, dtype.code, tuple(shape)), template.init, template.fill) for each in names]


def _plan_one(info: TensorInfo, options: dict[str, Any], default_options: dict[str, Any], at: str) -> Planned:
    own_scheme = [key for key in SCHEME_OPTIONS if key in options]
    if not info.dtype_info.is_float:
        if own_scheme:
            raise InputError(f"{at}: init options ({', '.join(own_scheme)}) need a float dtype; "
                             f"{info.dtype_info.user_name} tensors take only value")
        extra = [key for key in options if key not in ("value", "seed")]
        if extra:
            _init_step({extra[0]: options[extra[0]]}, at)  # reports the unknown option
        return Planned(info, None, _integral_fill(options.get("value", 0), info, at))
    merged = dict(default_options)
    if "value" in options:
        merged = {key: value for key, value in merged.items() if key not in SCHEME_OPTIONS}
    if own_scheme:
        merged.pop("value", None)
    merged.update(options)
    if info.ndim < 2 and merged.get("value") is None:
        if own_scheme:
            raise InputError(f"{at}: a {info.ndim}-D tensor has no fan_in/fan_out for "
                             f"{', '.join(own_scheme)}; give value instead (default 0)")
        merged = {key: value for key, value in merged.items() if key not in SCHEME_OPTIONS}
        merged["value"] = 0.0
    return Planned(info, _init_step(merged, at))


def _integral_fill(value: Any, info: TensorInfo, at: str) -> Any:
    kind = info.dtype_info.numpy
    if kind == np.bool_:
        if isinstance(value, bool) or value in (0, 1):
            return bool(value)
        raise InputError(f"{at}: value for a bool tensor must be true, false, 0 or 1, not {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not float(value).is_integer():
        raise InputError(f"{at}: value for a {info.dtype_info.user_name} tensor must be an integer, not {value!r}")
    limits = np.iinfo(kind)
    if not limits.min <= int(value) <= limits.max:
        raise InputError(f"{at}: value {value!r} does not fit {info.dtype_info.user_name} "
                         f"[{limits.min}, {limits.max}]")
    return int(value)


def _generate(item: Planned) -> np.ndarray:
    info = item.info
    storage = info.dtype_info.numpy
    if item.init is None:
        return np.full(info.shape, item.fill, dtype=storage)
    # init reads only shape and dtype: a broadcast zero stands in for the input, no memory
    placeholder = np.broadcast_to(np.zeros((), info.dtype_info.compute), info.shape)
    drawn = item.init.apply(placeholder, Context(info))
    with np.errstate(over="ignore", invalid="ignore"):
        return drawn.astype(storage)
