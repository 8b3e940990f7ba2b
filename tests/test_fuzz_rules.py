"""Fuzzing rules as an attacker writes them: every step with hostile values, then planning.

A generated rules dict holds random steps whose fields take the values that broke remap
before (issue 12): integers at and past the int64 limits and past what Python prints (a
5000-digit number), lone surrogates in patterns, keys and replacements, catastrophic
patterns, and metadata with dims of 2**62. ``parse_rules`` and then ``make_plan`` over a
small source (some keys crafted for the catastrophic patterns) must either succeed or
raise a :class:`~remap.errors.RemapError` with exit code 2, never anything else; the
same dict as YAML text must do the same.

``REMAP_FUZZ_SCALE=20`` runs twenty times as many examples.
"""

from __future__ import annotations

import os
from typing import Any
from unittest import mock

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import remap.rules.patterns
from remap.errors import RemapError
from remap.meta import TargetMeta, TensorMeta
from remap.planning.planner import make_plan
from remap.rules.parse import parse_rules

pytestmark = pytest.mark.hostile

SCALE = float(os.environ.get("REMAP_FUZZ_SCALE", "1"))
FUZZ = settings(max_examples=int(200 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])

SURROGATES = ["\ud800", "\udfff", "a\udc80b"]
HUGE_INTS = [2**63 - 1, -(2**63), 2**63, 2**64, -(2**64) - 1, 2**100, 10**5000, -(16**5000)]
SMALL = st.integers(-3, 5)
INT = st.one_of(SMALL, SMALL, SMALL, st.sampled_from(HUGE_INTS), st.integers(-(2**70), 2**70))  # mostly plain: steps get planned
TEXT = st.one_of(st.text(max_size=6), st.text(max_size=6), st.text(max_size=6), st.sampled_from(SURROGATES))
EVIL_PATTERNS = [r"^(a|aa)+$", r"(a*)*b", r"^(\w+\s?)*$", r"(x+x+)+y", r"^blocks\.(\d+)\.(a|aa)+$"]
PLAIN_PATTERN = st.sampled_from([r"^a$", r"\.w$", r"^blocks\.(\d+)\.", r"(?P<n>\d+)", "(q|k|v)", ".*", "(", *EVIL_PATTERNS])
PATTERN = st.one_of(PLAIN_PATTERN, PLAIN_PATTERN, PLAIN_PATTERN, PLAIN_PATTERN, st.sampled_from(SURROGATES))
PATTERNS = st.one_of(PATTERN, st.lists(PATTERN, min_size=1, max_size=3))
VALUE = st.one_of(INT, TEXT, st.none(), st.booleans(), st.floats(allow_nan=True, allow_infinity=True), st.lists(INT, max_size=3))
INTS = st.lists(INT, min_size=1, max_size=4)


def _step(kind: str) -> st.SearchStrategy[Any]:
    match = {"match": PATTERNS}
    return {
        "strip_prefix": st.one_of(TEXT, st.lists(TEXT, min_size=1, max_size=2)),
        "add_prefix": st.one_of(TEXT, st.fixed_dictionaries({"prefix": TEXT}, optional={"match": PATTERNS})),
        "rename": st.one_of(
            st.dictionaries(PATTERN, st.one_of(TEXT, st.sampled_from([r"x.\1", r"\g<n>"])), min_size=1, max_size=2),
            st.fixed_dictionaries({"from": PATTERN, "to": st.sampled_from([r"x.\1", "y", "\udcff"])},
                                  optional={"add": st.dictionaries(st.sampled_from([1, "n"]), INT, min_size=1, max_size=1)}),
        ),
        "drop": PATTERNS,
        "keep": PATTERNS,
        "transpose": st.one_of(PATTERNS, st.fixed_dictionaries(match, optional={"dims": INTS})),
        "reshape": st.fixed_dictionaries({**match, "shape": st.one_of(INTS, st.just("target"))}),
        "slice": st.one_of(
            st.fixed_dictionaries({**match, "index": INTS}, optional={"dim": INT}),
            st.fixed_dictionaries(match, optional={"dim": INT, "start": INT, "stop": INT, "step": INT}),
        ),
        "pad": st.fixed_dictionaries(match, optional={"fill": st.one_of(INT, st.floats(), st.sampled_from(["zeros", "mean"])), "to": INTS}),
        "cast": st.fixed_dictionaries({**match, "dtype": st.sampled_from(["float16", "int8", "bool", "float8_e4m3fn"])}),
        "adapt": st.fixed_dictionaries({**match, "op": st.sampled_from(["in_channels", "interpolate"])},
                                       optional={"prefix_tokens": INT, "grid": st.sampled_from(["1d", "2d"])}),
        "merge": st.fixed_dictionaries({"match": st.sampled_from([r"^(a|b)$", r"^blocks\.(\d+)\.(q|k)$", *EVIL_PATTERNS]), "into": st.sampled_from(["m", r"m.\1"]),
                                        "order": st.sampled_from([["a", "b"], ["q", "k"]])}, optional={"dim": INT, "stack": st.booleans()}),
        "split": st.fixed_dictionaries({"match": PATTERN, "into": st.sampled_from([["p", "q"], ["p", "q", "r"]])},
                                       optional={"dim": INT, "sizes": INTS}),
    }[kind]  # fmt: skip


@st.composite
def steps(draw: st.DrawFn) -> dict[str, Any]:
    kind = draw(st.sampled_from(["strip_prefix", "add_prefix", "rename", "drop", "keep", "transpose", "reshape", "slice",
                                 "pad", "cast", "adapt", "merge", "split"]))  # fmt: skip
    item: dict[str, Any] = {kind: draw(_step(kind))}
    if draw(st.booleans()):
        item["optional"] = True
    return item


RULES = st.fixed_dictionaries(
    {"version": st.just(1)},  # a version past 64 bits: the examples below (random ones would stop there)
    optional={
        "rules": st.lists(steps(), max_size=4),
        "expect": st.fixed_dictionaries({}, optional={"missing": PATTERNS, "unused": PATTERNS, "min_loaded": st.sampled_from([0, 1, 0.5])}),
        "shapes": st.one_of(st.sampled_from(["error", "skip"]), st.fixed_dictionaries({"skip": PATTERNS})),
        "freeze": st.fixed_dictionaries({}, optional={"params": PATTERNS, "except": PATTERNS}),
        "target": st.fixed_dictionaries({"model": st.just("m:f")}, optional={"kwargs": st.dictionaries(TEXT, VALUE, max_size=2),
                                                                             "args": st.lists(VALUE, max_size=2)}),
    },
)  # fmt: skip

SLOW_KEY = "a" * 22 + "!"  # a few ms under the catastrophic patterns: enough to pass a tiny timeout
SOURCE = {
    "a": TensorMeta((4, 2)),
    "b": TensorMeta((4, 2)),
    "blocks.0.q": TensorMeta((2, 3)),
    "blocks.0.k": TensorMeta((2, 3)),
    "blocks.1.w": TensorMeta((2**62, 0)),
    "blocks.2." + SLOW_KEY: TensorMeta((1,), "int8"),
    SLOW_KEY: TensorMeta((1, 3, 4, 4), "float16"),
    "pos": TensorMeta((1, 5, 4)),
}
TARGET = {
    "a": TargetMeta((4, 2)),
    "m": TargetMeta((8, 2)),
    "blocks.0.q": TargetMeta((2, 3)),
    "blocks.1.w": TargetMeta((10, 0)),
    SLOW_KEY: TargetMeta((1, 1, 4, 4), "float16"),
    "pos": TargetMeta((1, 10, 4), kind="buffer", requires_grad=False),
}


def _plans_or_fails_as_rules(rules: Any) -> None:
    """Parse and plan: a plan (failed checks included), or a RemapError of exit code 2."""
    with mock.patch.object(remap.rules.patterns, "REGEX_TIMEOUT", 0.02), mock.patch.object(remap.rules.patterns, "REGEX_BUDGET", 0.05):
        try:
            plan = make_plan(parse_rules(rules), SOURCE, TARGET)
        except RemapError as exc:
            assert exc.exit_code == 2, (type(exc).__name__, str(exc))
            assert str(exc).strip()
            str(exc).encode("utf-8")  # the message itself prints
            return
    for failure in plan.failures:
        failure.message.encode("utf-8")
    len(plan.report.targets), len(plan.report.sources)  # the records build too


@FUZZ
@given(RULES)
@example({"version": 1, "rules": [{"slice": {"match": "^blocks", "dim": 0, "start": 0, "stop": 10}}]})
@example({"version": 1, "rules": [{"drop": "\ud800"}]})
@example({"version": 16**5000})
@example({"version": -(2**64)})
@example({"version": 1, "rules": [{"pad": {"match": "^a$", "fill": 10**5000}}]})
@example({"version": 1, "rules": [{"drop": r"^(a|aa)+$", "optional": True}]})
def test_hostile_rules_dicts_plan_or_fail_as_rules_errors(rules: dict[str, Any]) -> None:
    _plans_or_fails_as_rules(rules)


@FUZZ
@given(RULES)
def test_hostile_rules_as_yaml_plan_or_fail_as_rules_errors(rules: dict[str, Any]) -> None:
    """The same through the YAML reader: hex and decimal integers past 64 bits, escaped surrogates."""
    try:
        text = yaml.safe_dump(rules, allow_unicode=False)  # surrogates written as "\ud800" escapes
    except (yaml.YAMLError, ValueError):  # pyyaml cannot represent it: nothing to read back
        return
    _plans_or_fails_as_rules(text)
