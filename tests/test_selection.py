"""The one matcher: globs, full-match regexes, exclude wins, unmatched patterns reported;
regexes run in linear time and agree with `re.fullmatch`."""

import re
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.numpy import save_file
from typer.testing import CliRunner

from wtool.cli import app
from wtool.errors import UsageError
from wtool.linear_regex import LinearRegex
from wtool.selection import Pattern, Selector

NAMES = ["model.layers.0.mlp.up_proj.weight", "model.layers.10.mlp.up_proj.bias", "lm_head.weight", "[odd]name"]


@pytest.mark.parametrize("pattern, expected", [
    ("*.weight", [0, 2]),
    ("model.layers.?.*", [0]),
    ("model.layers.*", [0, 1]),
    ("re:model\\.layers\\.\\d+\\..*", [0, 1]),
    ("re:layers", []),               # regexes are full matches, not searches
    ("re:.*layers.*", [0, 1]),
    ("LM_HEAD.weight", []),           # case-sensitive
    ("[[]odd]*", [3]),
])
def test_pattern_semantics(pattern, expected):
    assert [i for i, n in enumerate(NAMES) if Pattern(pattern).matches(n)] == expected


def test_any_include_and_no_exclude_order_independent():
    a = Selector(("*.weight", "*.bias"), ("lm_head.*",))
    b = Selector(("*.bias", "*.weight"), ("lm_head.*",))
    assert [a.admits(n) for n in NAMES] == [b.admits(n) for n in NAMES] == [True, True, False, False]
    assert Selector().admits("anything")
    assert not Selector((), ("*",)).admits("x")


def test_unmatched_patterns_are_named():
    selector = Selector(("*.weight", "nothing*"), ("re:never",))
    assert selector.unmatched(NAMES) == ["nothing*", "re:never"]


def test_included_explicitly():
    selector = Selector(("*.bias",))
    assert selector.included_explicitly(NAMES[1]) and not Selector().included_explicitly(NAMES[1])


@pytest.mark.parametrize("bad", ["re:(", ""])
def test_bad_patterns(bad):
    with pytest.raises(UsageError):
        Selector((bad,))


@given(st.text(min_size=1, max_size=30))
def test_a_literal_name_matches_itself_as_a_regex(name):
    import re

    assert Pattern("re:" + re.escape(name)).matches(name)


# -- the linear-time engine ----------------------------------------------------------------------

ATOMS = ["a", "b", "A", "é", "É", "_", "1", ".", r"\.", r"\n", "[ab]", "[^a]", "[a-c]", "[A-Z_]", r"[\d.]",
         r"\w", r"\W", r"\d", r"\D", r"\s", r"\S"]
ANCHORS = ["^", "$", r"\A", r"\Z", r"\b", r"\B"]
QUANTIFIERS = ["*", "+", "?", "*?", "+?", "??", "{2}", "{0,2}", "{1,3}?", "{2,}", "{,2}"]


def _grow(children):
    pair = st.tuples(children, children)
    return st.one_of(
        pair.map("".join),
        pair.map("|".join),
        children.map("({})".format),
        children.map("(?:{})".format),
        st.tuples(children, st.sampled_from(QUANTIFIERS)).map(lambda t: f"(?:{t[0]}){t[1]}"),
        st.tuples(st.sampled_from("imsa"), children).map(lambda t: f"(?{t[0]}:{t[1]})"),
        st.tuples(st.sampled_from("im"), children).map(lambda t: f"(?-{t[0]}:{t[1]})"),
    )


PATTERNS = st.tuples(st.sampled_from(["", "(?i)", "(?s)", "(?m)", "(?a)", "(?ims)", "(?x)"]),
                     st.recursive(st.sampled_from(ATOMS + ANCHORS), _grow, max_leaves=8)).map("".join)
NAME_TEXT = st.text(alphabet="abAéÉ_1.\n -", max_size=10)


@pytest.mark.parametrize("max_states", [10_000, 1], ids=["cached", "flushed-every-step"])
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pattern=PATTERNS, names=st.lists(NAME_TEXT, min_size=1, max_size=5), data=st.data())
def test_linear_engine_agrees_with_re_fullmatch(max_states, pattern, names, data):
    """Random names mostly fail, so one name is drawn among those `re` matches (hypothesis' from_regex)."""
    try:
        reference = re.compile(pattern)
    except re.error:
        assume(False)
    names.append(data.draw(st.from_regex(reference, fullmatch=True), label="matching name"))
    engine = LinearRegex(pattern, max_states=max_states)
    assert [engine.fullmatch(n) for n in names] == [reference.fullmatch(n) is not None for n in names]


@pytest.mark.parametrize("pattern, name", [
    ("a$\n", "a\n"), ("a$", "a\n"), ("a$$\n$", "a\n"), (r"a$\n\Z", "a\n"), ("(?s)a$.", "a\n"), ("a$\n", "a\n\n"),
    ("(?m)a$\n^b", "a\nb"), ("(?m)^$\n^$", "\n"), ("^$", ""), (r"\A\Z", ""), (r"\B", ""), (r"\b", ""),
    (r"\b\w+\b", "é_1"), (r"(?a)\b.\b", "é"), (r"(?a:\b).", "é"), (r".\B.", "éa"), (r"(?i)É\W", "é-"),
    (r"(?x) a \  b # comment", "a b"), ("(?s:.)(?-s:.)", "\n\n"),
])
def test_anchors_flags_and_classes_agree_with_re(pattern, name):
    assert LinearRegex(pattern).fullmatch(name) == (re.fullmatch(pattern, name) is not None)


def test_a_full_cache_is_flushed_and_rebuilt():
    engine = LinearRegex(r"[a-z]{0,4}\d", max_states=2)
    names = ["abc1", "xyz", "q9", "", "zzzz0"]
    assert [engine.fullmatch(n) for n in names * 2] == [True, False, True, False, True] * 2
    assert engine.flushes > 0 and len(engine._cache) <= 2


# patterns on which a backtracking engine takes exponential (or fifth-power) time, with the
# letter they repeat and the character that makes a name match
PATHOLOGICAL = [(r".*(a+)+b", "a", "b"), (r"(a|a)*b", "a", "b"), (r"(a*)*b", "a", "b"),
                (r".*a.*a.*a.*a.*b", "a", "b"), (r"(x+x+)+y", "x", "y")]
PROBE = """import sys
from wtool.selection import Pattern
pattern = Pattern("re:" + sys.argv[1])
print([pattern.matches(sys.argv[2] * n + end) for n in (32, 5000) for end in ("", sys.argv[3])])
"""


@pytest.mark.parametrize("pattern, letter, end", PATHOLOGICAL)
def test_pathological_patterns_finish_on_long_names(pattern, letter, end):
    """In a child process with a timeout, so that a backtracking engine fails the test rather than hangs it."""
    done = subprocess.run([sys.executable, "-c", PROBE, pattern, letter, end], capture_output=True, text=True,
                          timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split("\n")[0] == "[False, True, False, True]"


@pytest.mark.parametrize("pattern, matches", [(r".*(a+)+b", False), (r"(a+)+b?", True), (r"(\d+\.)*w", False)])
def test_nested_repetition_is_matched_not_refused(tmp_path, pattern, matches):
    save_file({"a" * 32: np.ones((2, 2), np.float32)}, tmp_path / "a.safetensors")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "a.safetensors"), "-i", "re:" + pattern])
    assert (result.exit_code == 0) == matches, result.output
    assert matches or "matches no tensor" in result.output


@pytest.mark.parametrize("pattern, construct", [
    (r"(a)\1", "a backreference"),
    (r"(?P<x>a)(?P=x)", "a backreference"),
    (r"a(?=b)b", "a lookahead"),
    (r"a(?!c)b", "a negative lookahead"),
    (r".(?<=a)b", "a lookbehind"),
    (r".(?<!c)b", "a negative lookbehind"),
    (r"(a)?(?(1)b|c)", "a conditional group"),
    (r"(?>a+)b", "an atomic group"),
    (r"a*+b", "a possessive quantifier"),
    (r"a++", "a possessive quantifier"),
    (r"ab?+", "a possessive quantifier"),
    (r"a{1,2}+", "a possessive quantifier"),
    (r"(?:a{1000}){1000}", "is too large"),
])
def test_constructs_without_a_linear_time_meaning_are_refused(tmp_path, pattern, construct):
    save_file({"ab": np.ones((2, 2), np.float32)}, tmp_path / "a.safetensors")
    result = CliRunner().invoke(app, ["inspect", str(tmp_path / "a.safetensors"), "-i", "re:" + pattern])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and f"regex {'re:' + pattern!r} " in result.output
    assert construct in result.output
    with pytest.raises(UsageError, match=re.escape(construct)):
        Pattern("re:" + pattern).validate()


def test_a_warm_selector_pickles_as_its_patterns():
    """Batch workers receive pipelines by pickle: the DFA is rebuilt there, not copied (a long
    chain of states would overflow pickle's recursion)."""
    import pickle

    selector = Selector(("re:.*(a+)+b", r"re:model\.layers\.\d+\..*"), ("re:.*bias",))
    names = [*NAMES, "a" * 3000 + "b", "a" * 3000]
    before = [selector.admits(n) for n in names]
    engine = LinearRegex(".*(a+)+b", max_states=7)
    engine.fullmatch("a" * 3000)
    copy = pickle.loads(pickle.dumps(engine))
    assert (copy.pattern, copy.max_states, len(copy._cache)) == (".*(a+)+b", 7, 1)
    assert [pickle.loads(pickle.dumps(selector)).admits(n) for n in names] == before == [
        True, False, False, False, True, False]
