"""Steps and pipelines as the user writes them: `-t NAME:key=value,...` specs and TOML recipes.

Everything here is checked before a checkpoint is opened: unknown transforms and
parameters, ill-typed values, bad patterns.

>>> pipe = Pipeline.from_specs(["clip:c=0.5", "quantize:bits=4,include=*.weight"])
>>> [step.op for step in pipe.steps], pipe.steps[1].selector.include
(['clip', 'quantize'], ('*.weight',))
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from wtool import __version__
from wtool.errors import InputError, UsageError
from wtool.selection import Selector
from wtool.transforms import Transform

NONFINITE_POLICIES = ("error", "skip", "zero")
RESERVED_KEYS = ("include", "exclude")


@dataclass(frozen=True)
class Step:
    """One transform with its own include/exclude patterns, as written by the user."""

    transform: Transform
    selector: Selector = field(default_factory=Selector)

    @property
    def op(self) -> str:
        return self.transform.name

    @classmethod
    def parse(cls, spec: str) -> Step:
        """Parse `NAME` or `NAME:key=value,key=value`; `include=`/`exclude=` may repeat.

        >>> Step.parse("quantize:bits=4,include=*.weight").selector.include
        ('*.weight',)
        """
        name, _, rest = spec.strip().partition(":")
        options: dict[str, str] = {}
        patterns: dict[str, list[str]] = {"include": [], "exclude": []}
        for item in filter(None, (part.strip() for part in rest.split(","))):
            key, sep, value = item.partition("=")
            key = key.strip()
            if not sep or not key:
                hint = ("; a comma ends a -t parameter, so a regex with a comma (such as {1,3}) belongs in "
                        "--include/--exclude or a recipe") if "re:" in spec else ""
                raise UsageError(f"step {spec!r}: expected key=value, got {item!r}{hint}")
            if key in RESERVED_KEYS:
                patterns[key].append(value.strip())
            elif key in options:
                raise UsageError(f"step {spec!r}: parameter {key!r} given twice")
            else:
                options[key] = value
        return cls(Transform.create(name.strip(), options),
                   Selector(tuple(patterns["include"]), tuple(patterns["exclude"])))

    @classmethod
    def from_table(cls, table: Mapping[str, Any], where: str) -> Step:
        """Build a step from a recipe's `[[steps]]` table: `op`, parameters, include/exclude."""
        if not isinstance(table.get("op"), str):
            raise UsageError(f"{where}: every [[steps]] table needs op = \"NAME\"")
        options = {k: v for k, v in table.items() if k != "op" and k not in RESERVED_KEYS}
        selector = Selector(_pattern_list(table.get("include"), where), _pattern_list(table.get("exclude"), where))
        try:
            transform = Transform.create(table["op"], options)
        except UsageError as err:
            raise UsageError(f"{where}: {err}") from None
        return cls(transform, selector)


def _pattern_list(value: Any, where: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise UsageError(f"{where}: include/exclude must be a string or a list of strings")


@dataclass(frozen=True)
class Pipeline:
    """Steps in order plus the options that apply to all of them.

    `nonfinite` decides what happens when a step that would spread NaN/Inf meets them:
    `error` (default) fails naming the tensor, `skip` leaves that tensor out of the step,
    `zero` replaces them with 0 first.
    """

    steps: tuple[Step, ...] = ()
    selector: Selector = field(default_factory=Selector)
    allow_empty: bool = False
    nonfinite: str = "error"
    #: Read compressed weights (packed, fp8, codebook) as dense floats, so steps may change them.
    allow_requantize: bool = False

    def __post_init__(self) -> None:
        if self.nonfinite not in NONFINITE_POLICIES:
            raise UsageError(f"--nonfinite={self.nonfinite!r}: expected one of {', '.join(NONFINITE_POLICIES)}")

    @classmethod
    def from_specs(cls, specs: Sequence[str], **options: Any) -> Pipeline:
        return cls(tuple(Step.parse(s) for s in specs), **options)

    @classmethod
    def from_recipe(cls, path: str | Path, *, include: Sequence[str] = (), exclude: Sequence[str] = (),
                    **options: Any) -> Pipeline:
        """Read a TOML recipe; command-line include/exclude patterns are added to the recipe's."""
        path = Path(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as err:
            raise InputError(f"{path}: cannot read recipe: {err}") from None
        except tomllib.TOMLDecodeError as err:
            raise InputError(f"{path}: invalid TOML: {err}") from None
        unknown = set(data) - {"include", "exclude", "steps"}
        if unknown:
            raise UsageError(f"{path}: unknown top-level key(s) {', '.join(sorted(unknown))}; "
                             "expected include, exclude, [[steps]]")
        tables = data.get("steps", [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise UsageError(f"{path}: steps must be [[steps]] tables")
        steps = tuple(Step.from_table(t, f"{path} step {i + 1}") for i, t in enumerate(tables))
        selector = Selector(_pattern_list(data.get("include"), str(path)) + tuple(include),
                            _pattern_list(data.get("exclude"), str(path)) + tuple(exclude))
        return cls(steps, selector, **options)

    def describe(self) -> list[dict[str, Any]]:
        """`[{"op", "params"}]` as recorded in the report and the output's metadata."""
        rows = []
        for step in self.steps:
            row: dict[str, Any] = {"op": step.op, "params": step.transform.options()}
            if step.selector.include or step.selector.exclude:
                row["include"], row["exclude"] = list(step.selector.include), list(step.selector.exclude)
            rows.append(row)
        return rows

    def provenance(self) -> dict[str, Any]:
        """What the output's `wtool` metadata records: version, steps, and the run-wide
        patterns and NaN policy when they are not the defaults (`batch --resume` compares it)."""
        recorded: dict[str, Any] = {"version": __version__, "steps": self.describe()}
        if self.selector.include or self.selector.exclude:
            recorded["include"], recorded["exclude"] = list(self.selector.include), list(self.selector.exclude)
        if self.nonfinite != "error":
            recorded["nonfinite"] = self.nonfinite
        return recorded
