"""One matcher for tensor names, shared by the CLI and recipes.

Semantics (documented in the README):
- a pattern is an fnmatch glob, case-sensitive, matched against the whole name (`*` also
  crosses dots); `re:PATTERN` is a Python regex matched against the whole name (fullmatch);
- a tensor is selected when it matches any include (or there are no includes) and no
  exclude: exclude always wins, and the order of patterns never matters;
- a pattern that matches no tensor at all is an error naming it and the closest names
  (unless allowed empty);
- a regex runs in time linear in the name's length (`wtool.linear_regex`: Python's syntax and
  character classes, an NFA run as a lazy DFA instead of backtracking); backreferences,
  lookarounds, conditionals, atomic groups and possessive quantifiers, which no linear-time
  matcher supports, are refused. Globs never backtrack exponentially and stay on `re`.

>>> Selector(include=("*.weight",), exclude=("re:.*norm.*",)).admits("layers.0.mlp.weight")
True
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache

from wtool.errors import UsageError
from wtool.linear_regex import LinearRegex, RegexRefused


@dataclass(frozen=True)
class Pattern:
    """One include/exclude pattern as the user wrote it."""

    text: str

    @cached_property
    def _regex(self) -> re.Pattern[str] | LinearRegex:
        if self.text.startswith("re:"):
            return _linear(self.text)
        return re.compile(fnmatch.translate(self.text))

    def validate(self) -> Pattern:
        if not self.text:
            raise UsageError("empty include/exclude pattern")
        self._regex  # noqa: B018  compile now so a bad regex fails before any work
        return self

    def matches(self, name: str) -> bool:
        return bool(self._regex.fullmatch(name))


@lru_cache(maxsize=256)
def _linear(text: str) -> LinearRegex:
    """The matcher of a `re:` pattern, shared by every Pattern of that text (its DFA warms up once)."""
    try:
        return LinearRegex(text[3:])
    except re.error as err:
        raise UsageError(f"invalid regex {text!r}: {err}") from None
    except RegexRefused as err:
        raise UsageError(f"regex {text!r} {err}; rewrite it, or use a glob") from None


def no_match_hint(pattern: str, names: Sequence[str]) -> str:
    """Why a pattern may have matched nothing: the whole-name rule and the closest names.

    >>> no_match_hint("layers", ["model.layers.0.w"])
    "; patterns match the whole name: '*layers*' matches 1 tensor(s); closest: 'model.layers.0.w'"
    """
    core = pattern[3:] if pattern.startswith("re:") else pattern
    hints = []
    if pattern.startswith("re:"):
        wider = Pattern(f"re:.*(?:{core}).*")
        with_dots = f"'re:.*{core}.*'"
    else:
        wider = Pattern(f"*{core.strip('*')}*")
        with_dots = repr(wider.text)
    try:
        count = sum(wider.matches(name) for name in names)
    except UsageError:
        count = 0
    if count:
        hints.append(f"patterns match the whole name: {with_dots} matches {count} tensor(s)")
    close = difflib.get_close_matches(core, list(names), n=3, cutoff=0.5)
    if close:
        hints.append("closest: " + ", ".join(repr(name) for name in close))
    return "".join(f"; {hint}" for hint in hints)


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
