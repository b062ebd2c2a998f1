"""One matcher for tensor names, shared by the CLI and recipes.

Semantics (documented in the README):
- a pattern is an fnmatch glob, case-sensitive, matched against the whole name (`*` also
  crosses dots); `re:PATTERN` is a Python regex matched against the whole name (fullmatch);
- a tensor is selected when it matches any include (or there are no includes) and no
  exclude: exclude always wins, and the order of patterns never matters;
- a pattern that matches no tensor at all is an error naming it and the closest names
  (unless allowed empty);
- a regex may not repeat a repetition (`(a+)+`), the one shape on which Python's backtracking
  engine takes exponential time; globs never backtrack exponentially.

>>> Selector(include=("*.weight",), exclude=("re:.*norm.*",)).admits("layers.0.mlp.weight")
True
"""

from __future__ import annotations

import difflib
import fnmatch
import re
import re._constants as sre_constants  # the parsed form of a regex, to refuse nested repetition
import re._parser as sre_parser
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
                nested = _nested_repetition(sre_parser.parse(self.text[3:]), inside=False)
                compiled = re.compile(self.text[3:])
            except re.error as err:
                raise UsageError(f"invalid regex {self.text!r}: {err}") from None
            if nested:
                raise UsageError(f"regex {self.text!r} repeats a repetition ({nested}): Python's regex engine can "
                                 "take exponential time on such patterns; write it without nesting, or as a glob")
            return compiled
        return re.compile(fnmatch.translate(self.text))

    def validate(self) -> Pattern:
        if not self.text:
            raise UsageError("empty include/exclude pattern")
        self._regex  # noqa: B018  compile now so a bad regex fails before any work
        return self

    def matches(self, name: str) -> bool:
        return self._regex.fullmatch(name) is not None


_REPEATS = (sre_constants.MAX_REPEAT, sre_constants.MIN_REPEAT, sre_constants.POSSESSIVE_REPEAT)


def _nested_repetition(items: Iterable[tuple[object, object]], inside: bool) -> str | None:
    """The first unbounded repetition inside another one (`(a+)+`, `(.*x)*`), shown as text, or None.

    Only such nesting makes a backtracking engine exponential; a pattern without it matches
    in time polynomial in the name length.
    """
    for op, value in items:
        children: list = []
        unbounded = False
        if op in _REPEATS:
            _, high, body = value  # type: ignore[misc]
            unbounded = high == sre_constants.MAXREPEAT
            if inside and unbounded:
                return "a '*', '+' or '{n,}' inside another"
            children = [body]
        elif op == sre_constants.SUBPATTERN:
            children = [value[3]]  # type: ignore[index]
        elif op == sre_constants.BRANCH:
            children = list(value[1])  # type: ignore[index]
        elif op in (sre_constants.ASSERT, sre_constants.ASSERT_NOT):
            children = [value[1]]  # type: ignore[index]
        elif op == sre_constants.ATOMIC_GROUP:
            children = [value]
        elif op == sre_constants.GROUPREF_EXISTS:
            children = [branch for branch in value[1:] if branch is not None]  # type: ignore[index]
        for child in children:
            found = _nested_repetition(child, inside or unbounded)
            if found:
                return found
    return None


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
