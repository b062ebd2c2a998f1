"""One matcher for tensor names, shared by the CLI and recipes.

Semantics (documented in the README):
- a pattern is an fnmatch glob, case-sensitive, matched against the whole name (`*` also
  crosses dots); `re:PATTERN` is a Python regex matched against the whole name (fullmatch);
- a tensor is selected when it matches any include (or there are no includes) and no
  exclude: exclude always wins, and the order of patterns never matters;
- a pattern that matches no tensor at all is an error naming it (unless allowed empty).

>>> Selector(include=("*.weight",), exclude=("re:.*norm.*",)).admits("layers.0.mlp.weight")
True
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property

from wtool.errors import UsageError


@dataclass(frozen=True)
class Pattern:
    """One include/exclude pattern as the user wrote it."""

    text: str

    @cached_property
    def _regex(self) -> re.Pattern[str]:
        if self.text.startswith("re:"):
            try:
                return re.compile(self.text[3:])
            except re.error as err:
                raise UsageError(f"invalid regex {self.text!r}: {err}") from None
        return re.compile(fnmatch.translate(self.text))

    def validate(self) -> Pattern:
        if not self.text:
            raise UsageError("empty include/exclude pattern")
        self._regex  # noqa: B018  compile now so a bad regex fails before any work
        return self

    def matches(self, name: str) -> bool:
        return self._regex.fullmatch(name) is not None


@dataclass(frozen=True)
class Selector:
    """Include/exclude patterns applied together: any include, and no exclude."""

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for text in (*self.include, *self.exclude):
            Pattern(text).validate()

    @cached_property
    def _include(self) -> tuple[Pattern, ...]:
        return tuple(Pattern(t) for t in self.include)

    @cached_property
    def _exclude(self) -> tuple[Pattern, ...]:
        return tuple(Pattern(t) for t in self.exclude)

    def admits(self, name: str) -> bool:
        if self._include and not any(p.matches(name) for p in self._include):
            return False
        return not any(p.matches(name) for p in self._exclude)

    def included_explicitly(self, name: str) -> bool:
        """True when an include pattern (not the absence of one) selects the name."""
        return any(p.matches(name) for p in self._include) and self.admits(name)

    def unmatched(self, names: Sequence[str]) -> list[str]:
        """Patterns that match none of `names`, in the order given."""
        patterns: Iterable[Pattern] = (*self._include, *self._exclude)
        return [p.text for p in patterns if not any(p.matches(n) for n in names)]
