"""Key patterns and rename templates: parsing, expansion, index arithmetic, errors. No torch."""

from __future__ import annotations

from typing import Any

import pytest

from remap.rules.patterns import CaptureError, PatternError, Template, compile_regex, quote, quotes, search


def _sub(pattern: str, replacement: str, key: str, add: dict[Any, int] | None = None) -> str:
    compiled = compile_regex(pattern)
    return Template.parse(replacement, compiled, add).sub(compiled, key)


# --------------------------------------------------------------------------- expansion

EXPANSIONS = [
    # (pattern, replacement, add, key, result)
    pytest.param(r"^features\.(\d+)\.", r"layers.\1.", None, "features.3.weight", "layers.3.weight", id="backslash-index"),
    pytest.param(r"^features\.(\d+)\.", r"layers.\g<1>.", None, "features.3.weight", "layers.3.weight", id="g-index"),
    pytest.param(r"^features\.(?P<n>\d+)\.", r"layers.\g<n>.", None, "features.3.weight", "layers.3.weight", id="g-name"),
    pytest.param(r"^features\.(?P<n>\d+)\.", r"layers.\1.", None, "features.3.weight", "layers.3.weight", id="index-of-named"),
    pytest.param(r"^(a)\.(b)$", r"\2.\1", None, "a.b", "b.a", id="swap"),
    pytest.param(r"(a)", r"\g<1>0", None, "xa", "xa0", id="g-then-digit"),
    pytest.param(r"^(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)$", r"\10", None, "abcdefghij", "j", id="two-digit-group"),
    pytest.param(r"^(a)(b)(c)(d)(e)(f)(g)(h)(i)(j)$", r"\1\0", None, "abcdefghij", "aabcdefghij", id="group-0-whole-match"),
    pytest.param(r"^x", r"y", None, "x.x", "y.x", id="anchored-once"),
    pytest.param(r"x", r"y", None, "x.x.ax", "y.y.ay", id="every-match-replaced"),
    pytest.param(r"\.(\d+)\.", r"[\1].", None, "a.0.b.1.c", "a[0].b[1].c", id="every-match-own-groups"),
    pytest.param(r"\.(\d+)\.", r".\1.", {1: 10}, "a.0.b.1.c", "a.10.b.11.c", id="add-every-match"),
    pytest.param(r"x", r"a\\b", None, "x", "a\\b", id="escaped-backslash-literal"),
    pytest.param(r"(x)", r"\\1", None, "x", "\\1", id="escaped-backslash-then-digit-literal"),
    pytest.param(r"(x)", r"\\\1", None, "x", "\\x", id="escaped-backslash-then-group"),
    pytest.param(r"(x)?y", r"[\1]", None, "y", "[]", id="unmatched-group-empty"),
    pytest.param(r"^", r"pre.", None, "k", "pre.k", id="empty-match"),
    pytest.param(r"^encoder\.(\d+)\.", r"conv\1.", {1: 1}, "encoder.0.weight", "conv1.weight", id="add-index"),
    pytest.param(r"^encoder\.(\d+)\.", r"conv\g<1>.", {1: 1}, "encoder.9.weight", "conv10.weight", id="add-carries"),
    pytest.param(r"^l(\d+)", r"l\1", {1: -1}, "l1", "l0", id="add-negative-to-zero"),
    pytest.param(r"^l(\d+)", r"l\1", {1: 0}, "l007", "l7", id="add-zero-normalises"),
    pytest.param(r"^l(?P<i>\d+)", r"m\g<i>", {"i": 2}, "l3", "m5", id="add-name-ref-name"),
    pytest.param(r"^l(?P<i>\d+)", r"m\1", {"i": 2}, "l3", "m5", id="add-name-ref-index"),
    pytest.param(r"^l(?P<i>\d+)", r"m\g<i>", {1: 2}, "l3", "m5", id="add-index-ref-name"),
    pytest.param(r"^l(\d+)", r"m\1", {"1": 2}, "l3", "m5", id="add-digit-string"),
    pytest.param(r"^(\d+)\.(\d+)", r"\1.\2", {1: 1, 2: 10}, "1.2", "2.12", id="add-two-groups"),
    pytest.param(r"^(\d+)\.(\d+)", r"\1.\2.\1", {1: 1}, "1.2", "2.2.2", id="add-group-used-twice"),
]


@pytest.mark.parametrize(("pattern", "replacement", "add", "key", "result"), EXPANSIONS)
def test_expand(pattern: str, replacement: str, add: dict[Any, int] | None, key: str, result: str) -> None:
    assert _sub(pattern, replacement, key, add) == result


def test_template_fields() -> None:
    compiled = compile_regex(r"^l(?P<i>\d+)\.(\w+)")
    template = Template.parse(r"m\g<i>.\2x\\", compiled, {"1": 3})
    assert template.text == r"m\g<i>.\2x\\"
    assert template.parts == (("text", "m"), ("group", "i"), ("text", "."), ("group", 2), ("text", "x\\"))
    assert template.add == ((1, 3),)  # a digit string names the index


def test_template_is_reusable_across_patterns_and_keys() -> None:
    compiled = compile_regex(r"^a(\d)")
    template = Template.parse(r"b\1", compiled, {1: 1})
    assert [template.sub(compiled, k) for k in ("a0", "a1.x", "za1")] == ["b1", "b2.x", "za1"]


# --------------------------------------------------------------------------- capture errors

CAPTURE_ERRORS = [
    pytest.param(r"^l(\w+)", r"m\1", {1: 1}, "lx", "group 1 captured 'x', which is not a non-negative integer", id="not-integer"),
    pytest.param(r"^l(\S+)", r"m\1", {1: 1}, "l-1", "group 1 captured '-1', which is not a non-negative integer", id="minus-sign"),
    pytest.param(r"^l(\S+)", r"m\1", {1: 1}, "l²", "group 1 captured '²', which is not a non-negative integer", id="unicode-digit"),
    pytest.param(r"^l(\d+)", r"m\1", {1: -2}, "l1", "group 1 captured 1; adding -2 gives -1 < 0", id="negative-result"),
    pytest.param(r"^l(?P<i>\d+)", r"m\g<i>", {"i": -5}, "l3", "group 'i' captured 3; adding -5 gives -2 < 0", id="negative-result-named"),
    pytest.param(
        r"^l(\d)?x", r"m\1", {1: 1}, "lx", "group 1 took no part in the match, so there is no integer to add 1 to", id="group-not-matched"
    ),
    pytest.param(
        r"\.(\w+)\.", r".\1.", {1: 1}, "a.0.b.c.d", "group 1 captured 'c', which is not a non-negative integer", id="second-match-bad"
    ),
]


@pytest.mark.parametrize(("pattern", "replacement", "add", "key", "message"), CAPTURE_ERRORS)
def test_capture_error(pattern: str, replacement: str, add: dict[Any, int], key: str, message: str) -> None:
    with pytest.raises(CaptureError) as info:
        _sub(pattern, replacement, key, add)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


# --------------------------------------------------------------------------- template errors

TEMPLATE_ERRORS = [
    pytest.param(r"a(\d)", r"b\2", None, r"replacement 'b\2' refers to group 2, but pattern 'a(\d)' has 1 group(s)", id="missing-index"),
    pytest.param(r"a", r"\1", None, r"replacement '\1' refers to group 1, but pattern 'a' has 0 group(s)", id="no-groups"),
    pytest.param(r"a(\d)", r"b\g<2>", None, r"replacement 'b\g<2>' refers to group 2, but pattern 'a(\d)' has 1 group(s)", id="missing-g-index"),
    pytest.param(
        r"a(?P<n>\d)",
        r"\g<m>",
        None,
        r"replacement '\g<m>' refers to group 'm', but pattern 'a(?P<n>\d)' has no such group (named groups: n)",
        id="missing-name",
    ),
    pytest.param(
        r"a(\d)", r"\g<-1>", None, r"replacement '\g<-1>' refers to group '-1', but pattern 'a(\d)' has no such group (named groups: none)", id="negative-index"
    ),
    pytest.param(
        r"a(\d)", r"\g<>", None, r"replacement '\g<>' refers to group '', but pattern 'a(\d)' has no such group (named groups: none)", id="empty-name"
    ),
    pytest.param(r"a", r"x\g<1", None, r"replacement 'x\g<1': unterminated \g<...> at position 1", id="unterminated"),
    pytest.param(
        r"a\.",
        r"b\.",
        None,
        r"replacement 'b\.' has the escape '\.' at position 1: replacements are plain text with \1 or \g<name> references (write '.', not '\.')",
        id="regex-escape",
    ),
    pytest.param(
        r"a",
        r"\n",
        None,
        r"replacement '\n' has the escape '\n' at position 0: replacements are plain text with \1 or \g<name> references (write 'n', not '\n')",
        id="newline-escape",
    ),
    pytest.param(
        r"a", "b\\", None, "replacement 'b\\' ends with a lone backslash: write \\\\ for a backslash, \\1 or \\g<name> for a group", id="lone-backslash"
    ),
    pytest.param(r"a(\d)", r"b\1", {2: 1}, r"add refers to group 2, but pattern 'a(\d)' has 1 group(s)", id="add-missing-index"),
    pytest.param(
        r"a(?P<i>\d)", r"b\1", {"j": 1}, r"add refers to group 'j', but pattern 'a(?P<i>\d)' has no such group (named groups: i)", id="add-missing-name"
    ),
    pytest.param(r"a(\d)(\d)", r"b\1", {2: 1}, r"add changes group 2, which replacement 'b\1' does not use", id="add-unused-group"),
    pytest.param(r"a(?P<i>\d)(\d)", r"b\2", {"i": 1}, r"add changes group 'i', which replacement 'b\2' does not use", id="add-unused-name"),
]


@pytest.mark.parametrize(("pattern", "replacement", "add", "message"), TEMPLATE_ERRORS)
def test_template_error(pattern: str, replacement: str, add: dict[Any, int] | None, message: str) -> None:
    with pytest.raises(PatternError) as info:
        Template.parse(replacement, compile_regex(pattern), add)
    assert str(info.value) == message


# --------------------------------------------------------------------------- compile_regex

REGEX_ERRORS = [
    pytest.param("(", "bad regex '(': missing ) at position 1", id="open-paren"),
    pytest.param("a)", "bad regex 'a)': unbalanced parenthesis at position 1", id="close-paren"),
    pytest.param("[a", "bad regex '[a': unterminated character set at position 2", id="char-set"),
    pytest.param("*", "bad regex '*': nothing to repeat at position 0", id="nothing-to-repeat"),
    pytest.param("a{2,1}", "bad regex 'a{2,1}': min repeat greater than max repeat at position 2", id="repeat-range"),
    pytest.param(r"^fc\.(", r"bad regex '^fc\.(': missing ) at position 6", id="backslashes-not-doubled"),
]


@pytest.mark.parametrize(("pattern", "message"), REGEX_ERRORS)
def test_compile_regex_error(pattern: str, message: str) -> None:
    with pytest.raises(PatternError) as info:
        compile_regex(pattern)
    assert str(info.value) == message
    assert isinstance(info.value, ValueError)


def test_compile_regex_is_cached() -> None:
    pattern = r"^cache\.test\.(\d+)$"
    first = compile_regex(pattern)
    hits = compile_regex.cache_info().hits
    assert compile_regex(pattern) is first
    assert compile_regex.cache_info().hits == hits + 1


def test_compile_regex_errors_every_time() -> None:
    """A failed compile is not cached as a success."""
    for _ in range(2):
        with pytest.raises(PatternError):
            compile_regex("(uncached")


@pytest.mark.parametrize(
    ("pattern", "key", "found"),
    [
        (r"\.bias$", "fc.bias", True),
        (r"\.bias$", "fc.bias.x", False),
        (r"fc", "head.fc.weight", True),  # searched anywhere
        (r"^fc", "head.fc.weight", False),
    ],
)
def test_search(pattern: str, key: str, found: bool) -> None:
    assert (search(compile_regex(pattern), key) is not None) is found


def test_quote_keeps_backslashes_single() -> None:
    assert quote(r"^fc\.") == r"'^fc\.'"
    assert quotes([r"a\.", "b"]) == r"'a\.', 'b'"


def test_catastrophic_pattern_fails_instead_of_hanging(monkeypatch: pytest.MonkeyPatch) -> None:
    import remap.rules.patterns

    monkeypatch.setattr(remap.rules.patterns, "REGEX_TIMEOUT", 0.05)
    compiled = compile_regex(r"(a|aa)+$")
    key = "a" * 40 + "!"
    with pytest.raises(PatternError) as info:
        search(compiled, key)
    assert str(info.value) == f"regex '(a|aa)+$' took more than 0.05s on key '{key}' (catastrophic backtracking?)"
    with pytest.raises(PatternError) as info:
        Template.parse("x", compiled).sub(compiled, key)
    assert str(info.value) == f"regex '(a|aa)+$' took more than 0.05s on key '{key}' (catastrophic backtracking?)"
