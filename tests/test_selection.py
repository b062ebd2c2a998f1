"""The one matcher: globs, full-match regexes, exclude wins, unmatched patterns reported."""

import pytest
from hypothesis import given
from hypothesis import strategies as st

from wtool.errors import UsageError
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
