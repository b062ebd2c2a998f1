"""The Transform base class: parameters declared once, one method to implement.

A transform is one small class. Subclassing registers it under its name; its docstring's
first line is the summary `wtool transforms` shows; `Params` is a frozen dataclass whose
fields (declared with `param`) carry help, ranges and choices, so options are parsed and
validated before any tensor is read.

>>> class Negate(Transform, name="negate"):
...     '''Flip the sign of every weight.'''
...     formula = "w' = -w"
...     def apply(self, array, ctx):
...         return -array
>>> Transform.create("negate").apply(np.array([1.0, -2.0]), Context.of(np.zeros(2)))
array([-1.,  2.])
>>> del REGISTRY["negate"]
"""

from __future__ import annotations

import dataclasses
import hashlib
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from wtool.buffers import empty_like
from wtool.dtypes import by_numpy
from wtool.errors import UsageError
from wtool.tensor import TensorInfo

REGISTRY: dict[str, type[Transform]] = {}

_MISSING = dataclasses.MISSING


def param(
    default: Any = _MISSING,
    help: str = "",
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    choices: Sequence[str] | None = None,
    kind: str = "",
    spreads_nonfinite: bool = False,
    fit_when: Any = None,
) -> Any:
    """Declare one transform parameter: default, help text, inclusive range [low, high], choices.

    `low_open=True` excludes `low` itself (e.g. a learning rate > 0). `kind="checkpoint"`
    marks a path to a companion checkpoint that the pipeline streams alongside the input.
    `spreads_nonfinite=True`: when this parameter is set (not None) the math spreads NaN/Inf
    (e.g. clip's percentile), so the `--nonfinite` policy runs first. `fit_when=VALUE`: this
    parameter at VALUE needs a first pass over every selected tensor (`Transform.fit`).
    """
    return field(default=default, metadata={"help": help, "low": low, "high": high, "low_open": low_open,
                                            "choices": choices, "kind": kind,
                                            "spreads_nonfinite": spreads_nonfinite, "fit_when": fit_when})


@dataclass(frozen=True)
class NoParams:
    """For transforms without parameters."""


@dataclass(frozen=True)
class Skip:
    """Why a transform leaves a tensor alone. `hard` skips (non-float dtypes) can never be
    overridden; soft ones (e.g. 1-D tensors) are lifted by a step-level `include`."""

    reason: str
    hard: bool = False


@dataclass
class Context:
    """What `apply` may know besides the array: the tensor, the seed-derived stream, fitted state.

    >>> Context.of(np.zeros((2, 3), np.float32), "fc.weight").info
    TensorInfo(name='fc.weight', dtype='F32', shape=(2, 3))
    """

    info: TensorInfo
    state: Any = None
    companions: Mapping[str, np.ndarray | None] = field(default_factory=dict)
    #: Per-tensor figures a transform reports (e.g. sigma before/after); shown in the report.
    extras: dict[str, Any] = field(default_factory=dict)
    #: The array is a copy made for this step alone (its conversion to compute dtype), which
    #: nothing else reads: `apply` may write its result over it (`output`).
    owned: bool = False
    #: The run reports statistics (not with --no-stats): figures that cost passes over the data
    #: of their own (sparsify's energy) are taken only then.
    measure: bool = True

    @classmethod
    def of(cls, array: np.ndarray, name: str = "w", **fields: Any) -> Context:
        """The context of `array` seen as tensor `name` (for examples and tests)."""
        return cls(TensorInfo(name, by_numpy(array.dtype).code, array.shape), **fields)

    @property
    def name(self) -> str:
        return self.info.name

    def output(self, array: np.ndarray) -> np.ndarray:
        """Where to write an elementwise result of `array`: `array` itself when the step owns it
        (a bfloat16 weight's float32 copy then holds the result, and no second float32 tensor
        is made), else a recycled buffer of its shape and dtype.

        >>> w = np.ones(3, np.float32)
        >>> Context.of(w, owned=True).output(w) is w, Context.of(w).output(w) is w
        (True, False)
        """
        return array if self.owned else empty_like(array)

    def rng(self, seed: int) -> np.random.Generator:
        """A random stream that depends only on (seed, tensor name), never on tensor order."""
        digest = hashlib.sha256(self.info.name.encode("utf-8")).digest()
        return np.random.default_rng([seed, int.from_bytes(digest[:8], "little")])


class Transform:
    """Base of every transform: subclass with `name=`, a docstring, `Params`, `formula`, `example`.

    Implement `apply(array, ctx)`: the tensor in compute dtype (float32, float64 for F64) to an
    array of its shape, never mutating it unless the step owns it (`ctx.output`). Declare the rest: `min_ndim`, `spreads_nonfinite`,
    companions as `param(kind="checkpoint")`, a first pass as `param(fit_when=...)` plus `fit`.
    """

    name: ClassVar[str] = ""
    Params: ClassVar[type] = NoParams
    formula: ClassVar[str] = ""
    #: True when the math spreads NaN/Inf to other values (norms, ranges, k-means) whatever the
    #: parameters; the pipeline then applies the user's `--nonfinite` policy before `apply`.
    spreads_nonfinite: ClassVar[bool] = False
    #: Float tensors with fewer dimensions are skipped by default (a step-level include lifts it).
    min_ndim: ClassVar[int] = 2
    #: Human summary of the default `skip` rule, shown by `wtool transforms`.
    applies_to: ClassVar[str] = "float tensors with ndim >= 2"
    #: A working `-t` spec, shown in help and used by the contract tests.
    example: ClassVar[str] = ""

    def __init_subclass__(cls, name: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if name is None:
            return
        if name in REGISTRY:
            raise TypeError(f"transform name {name!r} is registered twice "
                            f"({REGISTRY[name].__qualname__} and {cls.__qualname__})")
        if not (cls.__doc__ or "").strip():
            raise TypeError(f"transform {name!r} needs a docstring: its first line is the summary")
        cls.name = name
        REGISTRY[name] = cls

    def __init__(self, params: Any = None) -> None:
        self.params = params if params is not None else self.Params()
        self.check()

    # ---- declared once, used by the CLI, recipes and `wtool transforms` ----
    @classmethod
    def summary(cls) -> str:
        return (cls.__doc__ or "").strip().splitlines()[0]

    @classmethod
    def describe_params(cls) -> list[dict[str, Any]]:
        """One dict per parameter: name, type, default, help, range, choices."""
        hints = typing.get_type_hints(cls.Params)
        rows = []
        for f in dataclasses.fields(cls.Params):
            meta = f.metadata
            rows.append({
                "name": f.name,
                "type": _type_label(hints[f.name]),
                "default": None if f.default is _MISSING else f.default,
                "required": f.default is _MISSING,
                "help": meta.get("help", ""),
                "low": meta.get("low"), "high": meta.get("high"),
                "choices": list(meta["choices"]) if meta.get("choices") else None,
            })
        return rows

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> Transform:
        """Build the transform from user options (strings from `-t`, native values from TOML).

        >>> Transform.create("clip", {"c": "0.5"}).params.c
        0.5
        """
        hints = typing.get_type_hints(cls.Params)
        fields = {f.name: f for f in dataclasses.fields(cls.Params)}
        values: dict[str, Any] = {}
        for key, raw in options.items():
            if key not in fields:
                raise UsageError(f"{cls.name}: unknown parameter {key!r}"
                                 f"{_suggest(key, fields)}; valid: {', '.join(fields) or 'none'}")
            values[key] = _convert(cls.name, key, raw, hints[key], fields[key].metadata)
        missing = [n for n, f in fields.items() if f.default is _MISSING and n not in values]
        if missing:
            raise UsageError(f"{cls.name}: missing required parameter {missing[0]!r}")
        return cls(cls.Params(**values))

    @staticmethod
    def create(name: str, options: Mapping[str, Any] | None = None) -> Transform:
        """Look a transform up by name and build it; unknown names suggest the closest one."""
        if name not in REGISTRY:
            raise UsageError(f"unknown transform {name!r}{_suggest(name, REGISTRY)}; "
                             f"run `wtool transforms` to list them")
        return REGISTRY[name].from_options(options or {})

    def options(self) -> dict[str, Any]:
        """The parameters as plain values, for the report and the output metadata."""
        return dataclasses.asdict(self.params)

    # ---- derived from the declarations ----
    @property
    def needs_finite(self) -> bool:
        """Whether the `--nonfinite` policy runs before this step: the class spreads NaN/Inf, or
        a parameter declared `spreads_nonfinite` is set."""
        return self.spreads_nonfinite or any(getattr(self.params, f.name) is not None
                                             for f in dataclasses.fields(self.Params)
                                             if f.metadata.get("spreads_nonfinite"))

    @property
    def needs_fit(self) -> bool:
        """Whether `fit` runs first: a parameter declared `fit_when` has that value."""
        return any(f.metadata.get("fit_when") is not None and getattr(self.params, f.name) == f.metadata["fit_when"]
                   for f in dataclasses.fields(self.Params))

    def companion_paths(self) -> dict[str, str]:
        """Companion checkpoints to stream alongside the input, by role: the parameters declared
        `kind="checkpoint"` that are set (e.g. {"grads": path})."""
        return {f.name: getattr(self.params, f.name) for f in dataclasses.fields(self.Params)
                if f.metadata.get("kind") == "checkpoint" and getattr(self.params, f.name) is not None}

    # ---- what subclasses override ----
    def check(self) -> None:
        """Validate combinations of parameters (single values are checked from their `param`)."""

    def skip(self, info: TensorInfo) -> Skip | None:
        """Why this transform leaves `info` alone by default, or None when it applies."""
        if not info.dtype_info.is_float:
            return Skip(f"{info.dtype} is not a float dtype", hard=True)
        if info.ndim < self.min_ndim:
            return Skip(f"{info.ndim}-D tensor (default: ndim >= {self.min_ndim})")
        return None

    def problem(self, info: TensorInfo) -> str | None:
        """What this step cannot do with a tensor it selected, knowable from the header alone
        (e.g. a group size that does not divide an axis), or None. The plan, and so
        `--dry-run`, turns it into a usage error before any data is read."""
        return None

    def output_dtype(self, dtype: str) -> str:
        """The storage dtype of a tensor after this step (only `cast` changes it)."""
        return dtype

    def fit(self, tensors: Iterable[tuple[TensorInfo, Callable[[], np.ndarray]]]) -> Any:
        """The first pass over the selected tensors (e.g. one global threshold), run when
        `needs_fit`: (info, load) pairs, `load()` giving the step's input in compute dtype.
        Returns the state every `apply` then finds in `ctx.state`."""
        raise NotImplementedError(f"{self.name} declares fit_when but does not implement fit")

    def apply(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        raise NotImplementedError

    def split(self, info: TensorInfo) -> Group | None:
        """When this step stores `info` as several tensors (a compressed layout), the group of
        one input it writes instead; `data` describes the layout. None: one tensor, same shape."""
        return None

    def apply_split(self, array: np.ndarray, ctx: Context) -> dict[str, np.ndarray]:
        """The arrays of the group `split` declared for this tensor, by name."""
        raise NotImplementedError

    def apply_split_decoded(self, array: np.ndarray, ctx: Context) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
        """`apply_split`, and the dense weight its layout decodes to in the tensor's dtype when
        the transform has it at hand (the run then measures the layout's error without
        decoding the pieces again); None: the run decodes them (`compressed.dequantize`)."""
        return self.apply_split(array, ctx), None


@dataclass(frozen=True)
class Group:
    """Tensors a group transform reads together and what it writes back.

    Outputs that reuse an input's name keep that input's position in the checkpoint; new
    outputs take the position of the first input; inputs not among the outputs are dropped.
    """

    inputs: tuple[str, ...]
    outputs: tuple[TensorInfo, ...]
    note: str = ""
    data: Any = None

    @property
    def dropped(self) -> tuple[str, ...]:
        produced = {o.name for o in self.outputs}
        return tuple(n for n in self.inputs if n not in produced)

    @property
    def created(self) -> tuple[str, ...]:
        return tuple(o.name for o in self.outputs if o.name not in self.inputs)


@dataclass(frozen=True)
class GroupPlan:
    """What a group transform found: its groups, and notes on what it left alone and why."""

    groups: tuple[Group, ...]
    notes: tuple[str, ...] = ()


class GroupTransform(Transform):
    """A transform over groups of related tensors found by name (fold-bn, fold-weight-norm...).

    Implement `plan` (pure naming logic over TensorInfo) and `apply_group` (pure math).
    """

    applies_to: ClassVar[str] = "groups of tensors found by name"

    def plan(self, tensors: Sequence[TensorInfo], selected: Callable[[str], bool],
             config: Mapping[str, Any] | None = None) -> GroupPlan:
        """Find the groups among `tensors`; `selected(name)` says whether the user's
        include/exclude patterns admit a tensor; `config` is the model's config.json, if any
        (e.g. `tie_word_embeddings`)."""
        raise NotImplementedError

    def apply_group(self, group: Group, arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Map the group's input arrays (compute dtype) to its output arrays, by name."""
        raise NotImplementedError

    def apply(self, array: np.ndarray, ctx: Context) -> np.ndarray:
        raise TypeError(f"{self.name} works on groups of tensors; use apply_group")


# ---------------------------------------------------------------- option parsing

def _type_label(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if args:
        return " | ".join(_type_label(a) for a in args) + (" | none" if type(None) in typing.get_args(hint) else "")
    return getattr(hint, "__name__", str(hint))


def _convert(op: str, key: str, raw: Any, hint: Any, meta: Mapping[str, Any]) -> Any:
    where = f"{op}: parameter {key}={raw!r}"
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    optional = type(None) in typing.get_args(hint)
    if optional and (raw is None or (isinstance(raw, str) and raw.strip().lower() in {"none", "null", ""})):
        return None
    value: Any = None
    for target in options:
        try:
            value = _coerce(raw, target)
            break
        except (TypeError, ValueError):
            continue
    else:
        raise UsageError(f"{where}: expected {_type_label(hint)}")
    choices = meta.get("choices")
    if choices and value not in choices:
        raise UsageError(f"{where}: expected one of {', '.join(map(str, choices))}"
                         f"{_suggest(str(value), choices)}")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        low, high = meta.get("low"), meta.get("high")
        if not np.isfinite(value):
            raise UsageError(f"{where}: must be finite")
        if low is not None and (value < low or (meta.get("low_open") and value == low)):
            raise UsageError(f"{where}: must be {'>' if meta.get('low_open') else '>='} {low}")
        if high is not None and value > high:
            raise UsageError(f"{where}: must be <= {high}")
    return value


def _coerce(raw: Any, target: type) -> Any:
    if target is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.strip().lower() in {"true", "1", "yes", "on"}:
            return True
        if isinstance(raw, str) and raw.strip().lower() in {"false", "0", "no", "off"}:
            return False
        raise ValueError(raw)
    if isinstance(raw, bool):
        raise TypeError(raw)
    if target is int:
        if isinstance(raw, int):
            return raw
        if isinstance(raw, float) and raw.is_integer():
            return int(raw)
        if isinstance(raw, str):
            return int(raw.strip(), 0) if raw.strip().lower().startswith("0x") else int(raw.strip())
        raise TypeError(raw)
    if target is float:
        if isinstance(raw, (int, float)):
            return float(raw)
        if isinstance(raw, str):
            return float(raw.strip())
        raise TypeError(raw)
    if target is str:
        if isinstance(raw, str):
            return raw.strip()
        raise TypeError(raw)
    raise TypeError(f"unsupported parameter type {target}")


def _suggest(word: str, candidates: Iterable[str]) -> str:
    import difflib

    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
