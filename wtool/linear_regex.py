"""Python regexes matched against a whole name in time linear in its length.

Why this is hand-written: Python's `re` backtracks, and a backtracking engine can take time
exponential (`.*(a+)+b`, `(a|a)*b`: over 100 s on a 32-character name) or a high power
(`.*a.*a.*a.*a.*b`) of the name length. The engines that cannot (RE2 through `google-re2`, Rust's
`regex`) are compiled dependencies, and none of wtool's core dependencies (typer, rich, numpy,
safetensors, ml_dtypes, scipy) holds one. So this module keeps Python's syntax and character
semantics and replaces only the search, the way RE2 does it:

- the pattern is parsed by Python's own parser (`re._parser`), so what is accepted, and every
  syntax error, is exactly `re`'s;
- each one-character atom (a literal, a class, `.`, `\\w`, `\\d`...) is compiled by `re` itself
  with the flags in force where it stands and used as a test of one character, so IGNORECASE,
  Unicode classes and DOTALL are `re`'s own;
- the structure (concatenation, `|`, `*`, `+`, `?`, `{m,n}` and their lazy forms, groups, inline
  flags) becomes a Thompson NFA; the anchors `^ $ \\A \\Z \\b \\B` are zero-width edges decided by
  the characters on either side (`$` before a final newline included);
- the NFA runs as a DFA built on demand: each (set of NFA states, character) -> set is computed
  once and cached, so after warm-up a name costs one dict lookup per character. The cache holds
  at most `max_states` sets and is flushed when full (as RE2 does), so memory stays bounded and
  the worst case is O(len(name) x pattern size).

Matching is boolean (`fullmatch` semantics, no groups). Constructs with no linear-time meaning
(backreferences, lookahead and lookbehind, conditionals, atomic groups, possessive quantifiers)
raise `RegexRefused` naming the construct.

>>> LinearRegex(r".*(a+)+b").fullmatch("a" * 5000)
False
>>> LinearRegex(r"(?i)model\\.layers\\.\\d+\\..*WEIGHT").fullmatch("model.layers.10.mlp.weight")
True
"""

from __future__ import annotations

import re
from collections.abc import Callable

# re's own parser and compiler (Python >= 3.11, as pyproject requires; before, sre_parse & co.)
from re import _compiler as sre_compile, _constants as sre_constants, _parser as sre_parse

__all__ = ["LinearRegex", "RegexRefused", "MAX_NODES"]

MAX_NODES = 20_000
"""Largest NFA built (a `{m,n}` repeats its body): beyond it a pattern is refused as too large."""

_C = sre_constants
_ATOMS = (_C.LITERAL, _C.NOT_LITERAL, _C.ANY, _C.IN)
_REFUSED = {
    _C.GROUPREF: "a backreference (\\1, (?P=name))",
    _C.GROUPREF_EXISTS: "a conditional group ((?(1)...|...))",
    _C.ATOMIC_GROUP: "an atomic group ((?>...))",
    _C.POSSESSIVE_REPEAT: "a possessive quantifier (*+, ++, ?+, {m,n}+)",
}
_LOOK = {(_C.ASSERT, 1): "a lookahead ((?=...))", (_C.ASSERT_NOT, 1): "a negative lookahead ((?!...))",
         (_C.ASSERT, -1): "a lookbehind ((?<=...))", (_C.ASSERT_NOT, -1): "a negative lookbehind ((?<!...))"}

# NFA node kinds
_CHAR, _SPLIT, _ASSERT, _MATCH = range(4)

# what a position knows of the character before it (bits of a DFA state)
_AT_START, _AFTER_NEWLINE, _AFTER_WORD, _AFTER_ASCII_WORD = 1, 2, 4, 8
_is_word = re.compile(r"\w").fullmatch
_is_ascii_word = re.compile(r"\w", re.ASCII).fullmatch
# whether \B matches in an empty string differs between Python versions: ask this one
_NON_BOUNDARY_IN_EMPTY = re.fullmatch(r"\B", "") is not None

# A thread's promise about the rest of the name, made by a `$` that matched before a "\n":
# the rest is exactly "\n" (_BEFORE_FINAL_NEWLINE), then nothing (_AT_END_ONLY).
_FREE, _BEFORE_FINAL_NEWLINE, _AT_END_ONLY = 0, 1, 2


class RegexRefused(ValueError):
    """The pattern uses a construct that no linear-time matcher supports, or is too large;
    the message completes "regex X ..."."""

    @classmethod
    def construct(cls, construct: str) -> RegexRefused:
        return cls(f"uses {construct}, which linear-time matching (as in RE2) does not support")


class _State(dict):
    """One DFA state: the NFA threads before their zero-width edges and what the last character
    was; as a dict, its known transitions (character -> state), one lookup per character."""

    __slots__ = ("threads", "context", "accepts")

    def __init__(self, threads: frozenset[tuple[int, int]], context: int) -> None:
        super().__init__()
        self.threads = threads
        self.context = context
        self.accepts: bool | None = None


class LinearRegex:
    """A Python regex, matched against whole strings by a lazily built DFA.

    `re.error` for invalid syntax, `RegexRefused` for a construct without a linear-time meaning.

    >>> LinearRegex(r"(a|a)*b").fullmatch("a" * 40)
    False
    >>> LinearRegex(r"(\\w+)\\1")
    Traceback (most recent call last):
    ...
    wtool.linear_regex.RegexRefused: uses a backreference (\\1, (?P=name)), which linear-time matching (as in RE2) does not support
    """

    def __init__(self, pattern: str, *, max_states: int = 10_000) -> None:
        re.compile(pattern)  # every error exactly as `re` reports it
        parsed = sre_parse.parse(pattern)
        self.pattern = pattern
        self.max_states = max_states
        self.flushes = 0
        self._kind: list[int] = []
        self._arg: list[object] = []
        self._outs: list[list[int]] = []
        self._tests: dict[tuple[str, int], Callable[[str], object]] = {}
        self._has_anchors = False
        match = self._node(_MATCH, None, [])
        self._first = self._sequence(parsed.data, parsed.state.flags, match)
        self._dead = _State(frozenset(), 0)
        self._dead.accepts = False
        self._flush()

    def fullmatch(self, name: str) -> bool:
        """True when the whole of `name` matches."""
        state, dead = self._start, self._dead
        for char in name:
            following = state.get(char)
            state = self._step(state, char) if following is None else following
            if state is dead:
                return False
        if state.accepts is None:
            state.accepts = any(self._kind[node] == _MATCH and promise != _BEFORE_FINAL_NEWLINE
                                for node, promise in self._closure(state, None))
        return state.accepts

    def __repr__(self) -> str:
        return f"LinearRegex({self.pattern!r})"

    def __reduce__(self) -> tuple[object, tuple[str, int]]:
        """Pickled as its pattern (batch workers get pipelines by pickle): the DFA is rebuilt there."""
        return _rebuilt, (self.pattern, self.max_states)

    # --- building the NFA -------------------------------------------------------------------

    def _node(self, kind: int, arg: object, outs: list[int]) -> int:
        if len(self._kind) >= MAX_NODES:
            raise RegexRefused(f"is too large: more than {MAX_NODES} NFA states once its {{m,n}} repeats are expanded")
        self._kind.append(kind)
        self._arg.append(arg)
        self._outs.append(outs)
        return len(self._kind) - 1

    def _sequence(self, items: list, flags: int, out: int) -> int:
        """The first node of `items` followed by `out` (built back to front)."""
        for op, value in reversed(items):
            out = self._item(op, value, flags, out)
        return out

    def _item(self, op: object, value: object, flags: int, out: int) -> int:
        if op in _ATOMS:
            return self._node(_CHAR, self._test(op, value, flags), [out])
        if op is _C.SUBPATTERN:
            _, add_flags, del_flags, body = value  # type: ignore[misc]
            if add_flags & sre_parse.TYPE_FLAGS:  # (?a:...) inside a Unicode pattern, as re does it
                flags &= ~sre_parse.TYPE_FLAGS
            return self._sequence(body.data, (flags | add_flags) & ~del_flags, out)
        if op is _C.BRANCH:
            return self._node(_SPLIT, None, [self._sequence(alt.data, flags, out) for alt in value[1]])  # type: ignore[index]
        if op in (_C.MAX_REPEAT, _C.MIN_REPEAT):  # greedy or lazy: the same set of matches
            low, high, body = value  # type: ignore[misc]
            if high == _C.MAXREPEAT:
                loop = self._node(_SPLIT, None, [out])
                self._outs[loop].insert(0, self._sequence(body.data, flags, loop))
                tail = loop
            else:
                tail = out
                for _ in range(high - low):
                    tail = self._node(_SPLIT, None, [self._sequence(body.data, flags, tail), out])
            for _ in range(low):
                tail = self._sequence(body.data, flags, tail)
            return tail
        if op is _C.AT:
            self._has_anchors = True
            return self._node(_ASSERT, _anchor(value, flags), [out])
        if op in (_C.ASSERT, _C.ASSERT_NOT):
            raise RegexRefused.construct(_LOOK[op, value[0]])  # type: ignore[index]
        raise RegexRefused.construct(_REFUSED.get(op, f"the regex construct {op}"))

    def _test(self, op: object, value: object, flags: int) -> tuple[str, int]:
        """A one-character atom compiled by `re` with the flags in force: its exact semantics."""
        key = (repr((op, value)), flags)
        if key not in self._tests:
            state = sre_parse.State()
            state.flags = flags
            self._tests[key] = sre_compile.compile(sre_parse.SubPattern(state, [(op, value)]), flags).fullmatch
        return key

    # --- running it as a DFA ----------------------------------------------------------------

    def _flush(self) -> None:
        """Forget every DFA state (the cache is full, or on creation) and start again."""
        self._cache: dict[tuple[frozenset[tuple[int, int]], int], _State] = {}
        self._start = self._intern(frozenset({(self._first, _FREE)}), _AT_START if self._has_anchors else 0)

    def _intern(self, threads: frozenset[tuple[int, int]], context: int) -> _State:
        if not threads:
            return self._dead
        key = (threads, context)
        state = self._cache.get(key)
        if state is None:
            state = self._cache[key] = _State(threads, context)
        return state

    def _step(self, state: _State, char: str) -> _State:
        """The state after `char`, computed once and remembered in `state`."""
        if len(self._cache) >= self.max_states:
            self.flushes += 1
            self._flush()
        threads = set()
        for node, promise in self._closure(state, char):
            if self._kind[node] == _CHAR and promise != _AT_END_ONLY and self._tests[self._arg[node]](char):
                threads.add((self._outs[node][0], _AT_END_ONLY if promise == _BEFORE_FINAL_NEWLINE else _FREE))
        context = 0
        if self._has_anchors:
            context = ((_AFTER_NEWLINE if char == "\n" else 0) | (_AFTER_WORD if _is_word(char) else 0)
                       | (_AFTER_ASCII_WORD if _is_ascii_word(char) else 0))
        following = state[char] = self._intern(frozenset(threads), context)
        return following

    def _closure(self, state: _State, char: str | None) -> list[tuple[int, int]]:
        """The threads reachable through splits and anchors, before `char` (None: the end)."""
        seen = set(state.threads)
        stack = list(seen)
        found = []
        while stack:
            node, promise = stack.pop()
            kind = self._kind[node]
            if kind == _CHAR or kind == _MATCH:
                found.append((node, promise))
                continue
            if kind == _ASSERT:
                promise = _holds(self._arg[node], promise, state.context, char)  # type: ignore[arg-type]
                if promise is None:
                    continue
            for out in self._outs[node]:
                if (out, promise) not in seen:
                    seen.add((out, promise))
                    stack.append((out, promise))
        return found


def _rebuilt(pattern: str, max_states: int) -> LinearRegex:
    return LinearRegex(pattern, max_states=max_states)


def _anchor(code: object, flags: int) -> object:
    """The anchor `re` would compile for `code` under `flags` (MULTILINE `^`/`$`, Unicode `\\b`)."""
    if flags & _C.SRE_FLAG_MULTILINE:
        code = _C.AT_MULTILINE.get(code, code)
    if flags & _C.SRE_FLAG_UNICODE:
        code = _C.AT_UNICODE.get(code, code)
    return code


def _holds(anchor: object, promise: int, context: int, char: str | None) -> int | None:
    """Whether a zero-width anchor holds between the last character (`context`) and `char`
    (None: the end of the name): the thread's promise, possibly tightened, or None."""
    at_start = bool(context & _AT_START)
    if anchor in (_C.AT_BEGINNING, _C.AT_BEGINNING_STRING):
        return promise if at_start else None
    if anchor is _C.AT_BEGINNING_LINE:
        return promise if at_start or context & _AFTER_NEWLINE else None
    if anchor is _C.AT_END_STRING:
        return promise if char is None else None
    if anchor is _C.AT_END_LINE:
        return promise if char is None or char == "\n" else None
    if anchor is _C.AT_END:  # the end, or before a "\n" that ends the name
        if char is None:
            return promise
        return (_BEFORE_FINAL_NEWLINE if promise == _FREE else promise) if char == "\n" else None
    unicode = anchor in (_C.AT_UNI_BOUNDARY, _C.AT_UNI_NON_BOUNDARY)
    before = bool(context & (_AFTER_WORD if unicode else _AFTER_ASCII_WORD))
    after = char is not None and bool((_is_word if unicode else _is_ascii_word)(char))
    if anchor in (_C.AT_BOUNDARY, _C.AT_UNI_BOUNDARY):
        return promise if before != after else None
    empty = at_start and char is None
    return promise if before == after and (_NON_BOUNDARY_IN_EMPTY or not empty) else None
