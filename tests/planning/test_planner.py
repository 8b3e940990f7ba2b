"""The planner on plain dicts of shapes: steps, pairing, shapes, expectations, tied
parameters, freezing, explain. Every plan is also checked against the invariants the
report promises (one status per target key, one fate per source key, totals that add
up, loaded pairs of equal shape). No torch here.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest

from remap.errors import UsageError
from remap.meta import TargetMeta, TensorMeta
from remap.planning.planner import Plan, make_plan
from remap.rules.parse import parse_rules

TARGET_STATUSES = {"loaded", "missing", "mismatched", "tied"}
SOURCE_FATES = {"used", "dropped", "unused", "skipped", "duplicate"}
UNMATCHED_TAIL = "Fix the pattern, or add `optional: true` beside the step if that is expected."


def check_invariants(plan: Plan) -> None:
    report, totals = plan.report, plan.report.totals
    # one record per key, in the order of the metadata
    assert [t.key for t in report.targets] == list(plan.target_meta)
    assert [s.key for s in report.sources] == list(plan.source_meta)
    assert {t.status for t in report.targets} <= TARGET_STATUSES
    assert {s.fate for s in report.sources} <= SOURCE_FATES
    status = {t.key: t for t in report.targets}
    fate = {s.key: s for s in report.sources}
    # totals add up (tied aliases are not keys of their own)
    own = [t for t in report.targets if t.status != "tied"]
    counts = Counter(t.status for t in own)
    assert totals.target_keys == len(own) == totals.loaded + totals.missing + totals.mismatched
    assert (totals.loaded, totals.missing, totals.mismatched) == (counts["loaded"], counts["missing"], counts["mismatched"])
    assert totals.source_keys == len(report.sources) == totals.used + totals.dropped + totals.unused
    params = [t for t in own if t.kind == "parameter"]
    assert totals.param_elements == sum(t.numel for t in params)
    assert totals.loaded_elements == sum(t.numel for t in params if t.status == "loaded")
    assert totals.frozen_elements + totals.trainable_elements == totals.param_elements
    assert totals.frozen_params + totals.trainable_params == len(params)
    # every assignment is a loaded target fed by used sources of the same shape
    assert sorted(a.target for a in plan.assignments) == sorted(k for k, t in status.items() if t.status == "loaded")
    for a in plan.assignments:
        assert a.meta.shape == plan.target_meta[a.target].shape
        assert status[a.target].sources == a.sources
        assert status[a.target].source_shape == status[a.target].shape
        for s in a.sources:
            assert fate[s].fate == "used" and fate[s].targets == (a.target,)
    used = {s.key for s in report.sources if s.fate == "used"}
    assert used == {s for a in plan.assignments for s in a.sources}
    for s in report.sources:
        assert (s.step is not None) == (s.fate == "dropped")
    for d in plan.duplicates:
        assert fate[d.source].fate == "duplicate" and fate[d.source].targets == (d.target,)
    for t in report.targets:
        assert (t.trainable is None) == (t.kind != "parameter")
    # ok means no failures; every failure kind is a known one
    assert plan.ok == (not plan.failures)
    assert {f.kind for f in plan.failures} <= {"unmatched_step", "collision", "bad_capture", "shape_mismatch", "missing", "unused", "min_loaded", "freeze"}


def plan_of(rules: dict[str, Any] | str | None, source: dict[str, Any], target: dict[str, Any]) -> Plan:
    parsed = parse_rules(rules, filename="rules.yaml") if isinstance(rules, str) else parse_rules({"version": 1, **(rules or {})})
    plan = make_plan(parsed, source, target)
    check_invariants(plan)
    return plan


def targets(plan: Plan) -> dict[str, tuple[str, tuple[str, ...]]]:
    return {t.key: (t.status, t.sources) for t in plan.report.targets}


def fates(plan: Plan) -> dict[str, str]:
    return {s.key: s.fate for s in plan.report.sources}


def failures(plan: Plan) -> list[tuple[str, str]]:
    return [(f.kind, f.message) for f in plan.failures]


# --------------------------------------------------------------------------- steps that load everything

LOADS = [
    # (rules, source, {target: source it loads from})
    pytest.param({}, {"a": [2], "b.c": [3, 1]}, {"a": "a", "b.c": "b.c"}, id="identity"),
    pytest.param(
        {"rules": [{"strip_prefix": "module."}]},
        {"module.a": [2], "module.b.c": [3]},
        {"a": "module.a", "b.c": "module.b.c"},
        id="strip-prefix",
    ),
    pytest.param(
        {"rules": [{"strip_prefix": ["module.", "_orig_mod."]}]},
        {"module._orig_mod.a": [2], "_orig_mod.module.b": [3], "_orig_mod.c": [1], "module.module.d": [1]},
        {"a": "module._orig_mod.a", "b": "_orig_mod.module.b", "c": "_orig_mod.c", "d": "module.module.d"},
        id="strip-prefix-nested-any-order",
    ),
    pytest.param(
        {"rules": [{"strip_prefix": "a."}]},
        {"a.": [1], "a.b": [2]},
        {"a.": "a.", "b": "a.b"},
        id="strip-prefix-never-empties-a-key",
    ),
    pytest.param({"rules": [{"add_prefix": "backbone."}]}, {"a": [2], "b": [3]}, {"backbone.a": "a", "backbone.b": "b"}, id="add-prefix"),
    pytest.param(
        {"rules": [{"add_prefix": {"prefix": "backbone.", "match": [r"^layer", r"^stem\."]}}]},
        {"layer1.w": [1], "stem.w": [2], "fc.w": [3]},
        {"backbone.layer1.w": "layer1.w", "backbone.stem.w": "stem.w", "fc.w": "fc.w"},
        id="add-prefix-match",
    ),
    pytest.param(
        {"rules": [{"rename": {r"^features\.(\d+)\.": r"layers.\1."}}]},
        {"features.0.w": [1], "features.12.w": [2], "head.w": [3]},
        {"layers.0.w": "features.0.w", "layers.12.w": "features.12.w", "head.w": "head.w"},
        id="rename-mapping",
    ),
    pytest.param(
        {"rules": [{"rename": {r"^a\.b\.": "y.", r"^a\.": "x."}}]},
        {"a.b.c": [1], "a.q": [2]},
        {"y.c": "a.b.c", "x.q": "a.q"},
        id="rename-first-pattern-wins",
    ),
    pytest.param(
        {"rules": [{"rename": {r"^x": "a", r"^a": "b"}}]},
        {"x.w": [1], "a.w": [2]},
        {"a.w": "x.w", "b.w": "a.w"},
        id="rename-one-pattern-per-key",
    ),
    pytest.param(
        {"rules": [{"rename": {r"\.gamma$": ".weight", r"\.beta$": ".bias"}}]},
        {"ln.gamma": [4], "ln.beta": [4]},
        {"ln.weight": "ln.gamma", "ln.bias": "ln.beta"},
        id="rename-suffixes",
    ),
    pytest.param(
        {"rules": [{"rename": {"_": "."}}]},
        {"a_b_c": [1]},
        {"a.b.c": "a_b_c"},
        id="rename-every-occurrence",
    ),
    pytest.param(
        {"rules": [{"rename": {"from": r"^encoder\.(\d+)\.", "to": r"conv\1.", "add": {1: 1}}}]},
        {"encoder.0.weight": [4], "encoder.1.weight": [5], "encoder.9.bias": [6]},
        {"conv1.weight": "encoder.0.weight", "conv2.weight": "encoder.1.weight", "conv10.bias": "encoder.9.bias"},
        id="rename-add",
    ),
    pytest.param(
        {"rules": [{"rename": {"from": r"^blocks\.(?P<i>\d+)\.", "to": r"layers.\g<i>.", "add": {"i": -1}}}]},
        {"blocks.1.w": [1], "blocks.2.w": [2]},
        {"layers.0.w": "blocks.1.w", "layers.1.w": "blocks.2.w"},
        id="rename-add-named-negative",
    ),
    pytest.param(
        {"rules": [{"strip_prefix": "module."}, {"add_prefix": "model."}, {"rename": {r"^model\.fc\.": "model.head."}}]},
        {"module.fc.w": [1], "module.conv.w": [2]},
        {"model.head.w": "module.fc.w", "model.conv.w": "module.conv.w"},
        id="pipeline-in-order",
    ),
]


@pytest.mark.parametrize(("rules", "source", "loads"), LOADS)
def test_loads(rules: dict[str, Any], source: dict[str, Any], loads: dict[str, str]) -> None:
    target = {t: source[s] for t, s in loads.items()}
    plan = plan_of(rules, source, target)
    assert failures(plan) == []
    assert plan.ok
    assert targets(plan) == {t: ("loaded", (s,)) for t, s in loads.items()}
    assert {a.target: a.sources for a in plan.assignments} == {t: (s,) for t, s in loads.items()}
    assert set(fates(plan).values()) == {"used"}


def test_hops_and_final_keys() -> None:
    plan = plan_of(
        {"rules": [{"strip_prefix": "module."}, {"drop": "^x"}, {"rename": {r"^fc\.": "head."}}]},
        {"module.fc.w": [1], "module.x": [1]},
        {"head.w": [1]},
    )
    fc = plan.report.source_record("module.fc.w")
    assert (fc.fate, fc.final_key, fc.targets, fc.step, fc.step_kind) == ("used", "head.w", ("head.w",), None, None)
    x = plan.report.source_record("module.x")
    assert (x.fate, x.final_key, x.targets, x.step, x.step_kind) == ("dropped", "x", (), 2, "drop")
    assert plan.report.target_record("head.w").steps == ("step 1 (strip_prefix)", "step 3 (rename)")


def test_step_records() -> None:
    plan = plan_of(
        {"rules": [{"strip_prefix": ["module.", "_orig_mod."], "optional": True}, {"drop": ["^a", "^zz"], "optional": True}]},
        {"module.a": [1], "module.b": [1], "c": [1]},
        {"b": [1], "c": [1]},
    )
    steps = [(s.index, s.kind, s.summary, s.matched, s.optional, s.patterns, s.where) for s in plan.report.steps]
    assert steps == [
        (1, "strip_prefix", "strip_prefix 'module.', '_orig_mod.'", 2, True, (("module.", 2), ("_orig_mod.", 0)), None),
        (2, "drop", "drop '^a', '^zz'", 1, True, (("^a", 1), ("^zz", 0)), None),
    ]


# --------------------------------------------------------------------------- drop and keep


def test_drop() -> None:
    plan = plan_of(
        {"rules": [{"drop": [r"\.num_batches_tracked$", r"^fc\."]}]},
        {"bn.num_batches_tracked": [], "fc.weight": [10, 4], "fc.bias": [10], "conv.weight": [4]},
        {"conv.weight": [4]},
    )
    assert plan.ok
    assert fates(plan) == {"bn.num_batches_tracked": "dropped", "fc.weight": "dropped", "fc.bias": "dropped", "conv.weight": "used"}
    assert plan.report.source_record("fc.bias").step == 1
    assert plan.report.totals.dropped == 3


def test_keep() -> None:
    plan = plan_of(
        {"rules": [{"keep": [r"^encoder\.", r"^stem\."]}]},
        {"encoder.w": [1], "stem.w": [1], "decoder.w": [1], "head.w": [1]},
        {"encoder.w": [1], "stem.w": [1]},
    )
    assert plan.ok
    assert fates(plan) == {"encoder.w": "used", "stem.w": "used", "decoder.w": "dropped", "head.w": "dropped"}


def test_dropped_key_never_reaches_a_target() -> None:
    """A dropped key named like a target key does not load it: the target is missing."""
    plan = plan_of({"rules": [{"drop": "^a$"}], "expect": {"missing": "^a$", "min_loaded": 0}}, {"a": [1]}, {"a": [1]})
    assert plan.ok
    assert targets(plan) == {"a": ("missing", ())}


# --------------------------------------------------------------------------- unmatched steps

UNMATCHED = [
    pytest.param(
        "version: 1\nrules:\n  - strip_prefix: module.\n",
        {"a": [1]},
        [f"step 1 (strip_prefix) (rules.yaml:3:5): 'module.' matched no key. {UNMATCHED_TAIL}"],
        id="strip-prefix",
    ),
    pytest.param(
        "version: 1\nrules:\n  - strip_prefix: [module., _orig_mod.]\n",
        {"module.a": [1]},
        [f"step 1 (strip_prefix) (rules.yaml:3:5): '_orig_mod.' matched no key. {UNMATCHED_TAIL}"],
        id="strip-prefix-one-of-two",
    ),
    pytest.param(
        "version: 1\nrules:\n  - strip_prefix: modle.\n",
        {"module.a": [1]},
        [f"step 1 (strip_prefix) (rules.yaml:3:5): 'modle.' matched no key; closest keys at this step: 'module.a'. {UNMATCHED_TAIL}"],
        id="strip-prefix-typo-hint",
    ),
    pytest.param(
        "version: 1\nrules:\n  - add_prefix: {prefix: b., match: '^zz'}\n",
        {"a": [1]},
        [f"step 1 (add_prefix) (rules.yaml:3:5): '^zz' matched no key. {UNMATCHED_TAIL}"],
        id="add-prefix-match",
    ),
    pytest.param(
        "version: 1\nrules:\n  - drop: x\n  - rename: {'^fc\\.': 'head.'}\n",
        {"a": [1]},
        [
            f"step 1 (drop) (rules.yaml:3:5): 'x' matched no key. {UNMATCHED_TAIL}",
            f"step 2 (rename) (rules.yaml:4:5): '^fc\\.' matched no key. {UNMATCHED_TAIL}",
        ],
        id="two-steps-backslash-not-doubled",
    ),
    pytest.param(
        "version: 1\nrules:\n  - keep: ['^a', '^zz']\n",
        {"a": [1]},
        [f"step 1 (keep) (rules.yaml:3:5): '^zz' matched no key. {UNMATCHED_TAIL}"],
        id="keep-one-of-two",
    ),
    pytest.param(
        "version: 1\nrules:\n  - drop: '^a'\n  - drop: '^a'\n",
        {"a": [1]},
        [f"step 2 (drop) (rules.yaml:4:5): '^a' matched no key. {UNMATCHED_TAIL}"],
        id="matches-nothing-left-by-earlier-step",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {'^a': x, '^a\\.b': y}\n",
        {"a.b": [1]},
        [f"step 1 (rename) (rules.yaml:3:5): '^a\\.b' matched no key; closest keys at this step: 'a.b'. {UNMATCHED_TAIL}"],
        id="rename-pattern-shadowed-by-first",
    ),
    pytest.param(
        "version: 1\nrules:\n  - rename: {'^zz': y, '^a': b}\n",
        {"a": [1]},
        [f"step 1 (rename) (rules.yaml:3:5): '^zz' matched no key. {UNMATCHED_TAIL}"],
        id="rename-one-of-two",
    ),
]


@pytest.mark.parametrize(("text", "source", "messages"), UNMATCHED)
def test_unmatched_step_fails(text: str, source: dict[str, Any], messages: list[str]) -> None:
    plan = plan_of(text, source, {})
    assert [f.message for f in plan.failures if f.kind == "unmatched_step"] == messages
    assert not plan.ok


def test_unmatched_step_in_dict_rules_has_no_position() -> None:
    plan = plan_of({"rules": [{"drop": "x"}]}, {"a": [1]}, {"a": [1]})
    assert failures(plan) == [("unmatched_step", f"step 1 (drop): 'x' matched no key. {UNMATCHED_TAIL}")]


@pytest.mark.parametrize(
    "step",
    [
        {"strip_prefix": ["module.", "_orig_mod."]},
        {"add_prefix": {"prefix": "b.", "match": "^zz"}},
        {"rename": {"^zz": "y"}},
        {"drop": "^zz"},
    ],
    ids=["strip_prefix", "add_prefix", "rename", "drop"],
)
def test_optional_step_may_match_nothing(step: dict[str, Any]) -> None:
    plan = plan_of({"rules": [{**step, "optional": True}]}, {"a": [1]}, {"a": [1]})
    assert plan.ok
    assert plan.report.steps[0].matched == 0


def test_add_prefix_on_no_keys_is_unmatched() -> None:
    plan = plan_of({"rules": [{"add_prefix": "b."}]}, {}, {})
    assert failures(plan) == [("unmatched_step", f"step 1 (add_prefix): 'b.' matched no key. {UNMATCHED_TAIL}")]


def test_bad_capture() -> None:
    plan = plan_of(
        {"rules": [{"rename": {"from": r"^l(\w)", "to": r"m\1", "add": {1: 1}}}], "expect": {"unused": "^lx$", "missing": "^mx$"}},
        {"lx": [1], "l1": [1]},
        {"mx": [1], "m2": [1]},
    )
    assert failures(plan) == [("bad_capture", "step 1 (rename): key 'lx': group 1 captured 'x', which is not a non-negative integer")]
    assert plan.failures[0].keys == ("lx",)
    assert plan.report.steps[0].matched == 2


# --------------------------------------------------------------------------- collisions


def test_collision_names_both_sources() -> None:
    plan = plan_of({"rules": [{"rename": {"^a": "c", "^b": "c"}}]}, {"a": [2], "b": [2]}, {"c": [2]})
    assert failures(plan) == [
        ("collision", "step 1 (rename): source keys 'a' and 'b' both become 'c'"),
    ]  # 'b' is not reported a second time as unused: the collision explains it
    assert plan.failures[0].keys == ("a", "b")
    assert targets(plan) == {"c": ("loaded", ("a",))}  # the first one is kept
    assert fates(plan) == {"a": "used", "b": "unused"}


def test_collision_after_strip_prefix() -> None:
    plan = plan_of({"rules": [{"strip_prefix": "module."}]}, {"module.fc.w": [2], "fc.w": [2]}, {"fc.w": [2]})
    assert failures(plan)[0] == ("collision", "step 1 (strip_prefix): source keys 'module.fc.w' and 'fc.w' both become 'fc.w'")


def test_collision_of_three() -> None:
    plan = plan_of({"rules": [{"rename": {"^[abc]$": "z"}}]}, {"a": [1], "b": [1], "c": [1]}, {"z": [1]})
    assert [f for f in failures(plan) if f[0] == "collision"] == [
        ("collision", "step 1 (rename): source keys 'a' and 'b' both become 'z'"),
        ("collision", "step 1 (rename): source keys 'a' and 'c' both become 'z'"),
    ]


# --------------------------------------------------------------------------- shapes

SHAPE_MISMATCH = (
    "1 mapped key(s) differ in shape from the target (shapes: error):\n"
    "  fc.w: checkpoint [1000, 4] (from 'fc.w') vs model [10, 4]\n"
    "Fix the rules, or allow skipping them with `shapes: {skip: [pattern]}` and list them in expect.missing."
)


@pytest.mark.parametrize(
    ("rules", "expected"),
    [
        pytest.param({}, [("shape_mismatch", SHAPE_MISMATCH)], id="error-default"),
        pytest.param({"shapes": "error", "expect": {"missing": "^fc"}}, [("shape_mismatch", SHAPE_MISMATCH)], id="error-missing-does-not-help"),
        pytest.param(
            {"shapes": "skip"},
            [("missing", "1 target key(s) would keep their initial values and are not in expect.missing:\n  fc.w")],
            id="skip-counts-as-missing",
        ),
        pytest.param({"shapes": "skip", "expect": {"missing": r"^fc\."}}, [], id="skip-and-declared"),
        pytest.param({"shapes": {"skip": [r"^fc\."]}, "expect": {"missing": r"^fc\."}}, [], id="skip-pattern-declared"),
        pytest.param(
            {"shapes": {"skip": ["^other"]}, "expect": {"missing": r"^fc\."}},
            [("shape_mismatch", SHAPE_MISMATCH)],
            id="skip-pattern-not-matching",
        ),
        pytest.param({"shapes": {"default": "skip"}, "expect": {"missing": r"^fc\."}}, [], id="skip-default-long-form"),
    ],
)
def test_shapes(rules: dict[str, Any], expected: list[tuple[str, str]]) -> None:
    plan = plan_of(rules, {"fc.w": [1000, 4], "conv.w": [3]}, {"fc.w": [10, 4], "conv.w": [3]})
    assert failures(plan) == expected
    fc = plan.report.target_record("fc.w")
    assert (fc.status, fc.sources, fc.source_shape, fc.shape) == ("mismatched", ("fc.w",), (1000, 4), (10, 4))
    assert plan.report.source_record("fc.w").fate == "skipped"
    assert [a.target for a in plan.assignments] == ["conv.w"]


def test_shape_mismatch_lists_every_key() -> None:
    plan = plan_of({"rules": [{"strip_prefix": "m."}]}, {"m.a": [1], "m.b": [2, 2], "m.c": [3]}, {"a": [2], "b": [2], "c": [3]})
    assert failures(plan) == [
        (
            "shape_mismatch",
            "2 mapped key(s) differ in shape from the target (shapes: error):\n"
            "  a: checkpoint [1] (from 'm.a') vs model [2]\n"
            "  b: checkpoint [2, 2] (from 'm.b') vs model [2]\n"
            "Fix the rules, or allow skipping them with `shapes: {skip: [pattern]}` and list them in expect.missing.",
        )
    ]
    assert plan.failures[0].keys == ("a", "b")


def test_reversed_shapes_suggest_the_transpose_step() -> None:
    """As diff would: a kernel stored (in, out) fails with the step that fixes it, one pattern
    per leaf name when no other paired key has that leaf; applying the hint loads."""
    source = {"h.0.fc.weight": [3, 5], "h.1.fc.weight": [3, 5], "h.0.fc.bias": [5], "head.weight": [2, 4]}
    target = {"h.0.fc.weight": [5, 3], "h.1.fc.weight": [5, 3], "h.0.fc.bias": [5], "head.weight": [4, 2]}
    plan = plan_of({}, source, target)
    assert failures(plan) == [
        (
            "shape_mismatch",
            "3 mapped key(s) differ in shape from the target (shapes: error):\n"
            "  h.0.fc.weight: checkpoint [3, 5] (from 'h.0.fc.weight') vs model [5, 3] (reversed)\n"
            "  h.1.fc.weight: checkpoint [3, 5] (from 'h.1.fc.weight') vs model [5, 3] (reversed)\n"
            "  head.weight: checkpoint [2, 4] (from 'head.weight') vs model [4, 2] (reversed)\n"
            "hint: shapes reversed: add `- transpose: ['\\.fc\\.weight$', '^head\\.weight$']` at the end of rules\n"
            "Fix the rules, or allow skipping them with `shapes: {skip: [pattern]}` and list them in expect.missing.",
        )
    ]
    fixed = plan_of({"rules": [{"transpose": ["\\.fc\\.weight$", "^head\\.weight$"]}]}, source, target)
    assert fixed.ok and fixed.report.totals.loaded == 4


def test_a_leaf_shared_with_a_fitting_key_is_not_suggested_as_a_pattern() -> None:
    """A square fc.weight loads as it is, so '\\.fc\\.weight$' would transpose it too: the hint names the key."""
    plan = plan_of({}, {"a.fc.weight": [3, 5], "b.fc.weight": [4, 4]}, {"a.fc.weight": [5, 3], "b.fc.weight": [4, 4]})
    assert "hint: shapes reversed: add `- transpose: '^a\\.fc\\.weight$'` at the end of rules" in plan.failures[0].message


def test_a_load_of_nothing_fails_even_when_every_key_is_declared() -> None:
    """Drop every source key and declare every target key missing: nothing would load, so the
    run fails (the promise) unless the rules say ``min_loaded: 0``."""
    everything = {"rules": [{"drop": "."}], "expect": {"missing": "."}}
    plan = plan_of(everything, {"a.weight": [4, 4], "b.weight": [4, 4]}, {"x.weight": [4, 4], "y.weight": [4, 4]})
    assert failures(plan) == [
        (
            "min_loaded",
            "nothing loaded: 0 of 2 target key(s) would come from the source (2 missing, 0 mismatched; "
            "of 2 source key(s), 2 dropped, 0 unused); a load that loads nothing fails unless the rules say so "
            "with `expect: {min_loaded: 0}`",
        )
    ]
    said = plan_of({**everything, "expect": {"missing": ".", "min_loaded": 0}}, {"a.weight": [4, 4]}, {"x.weight": [4, 4]})
    assert said.ok


def test_an_empty_target_is_not_an_empty_load() -> None:
    """A module without a state (a bare activation) has nothing to load: that passes."""
    assert plan_of({"rules": [{"drop": "."}]}, {"a": [1]}, {}).ok


def test_scalar_shapes() -> None:
    plan = plan_of({}, {"s": []}, {"s": []})
    assert plan.ok and targets(plan) == {"s": ("loaded", ("s",))}


# --------------------------------------------------------------------------- expectations


def test_expect_missing() -> None:
    plan = plan_of({"expect": {"missing": [r"^fc\."]}}, {"conv.w": [3]}, {"conv.w": [3], "fc.weight": [10, 4], "fc.bias": [10]})
    assert plan.ok
    assert [(t.key, t.status, t.declared) for t in plan.report.targets] == [
        ("conv.w", "loaded", False),
        ("fc.weight", "missing", True),
        ("fc.bias", "missing", True),
    ]


def test_missing_fails_with_folded_keys() -> None:
    target = {f"layers.{i}.{p}": [2] for i in range(3) for p in ("weight", "bias")}
    plan = plan_of({}, {}, {**target, "head": [1]})
    assert failures(plan) == [
        ("missing", "7 target key(s) would keep their initial values and are not in expect.missing:\n  layers.{0..2}.{bias, weight}\n  head")
    ]
    assert plan.failures[0].keys == (*target, "head")


def test_expect_unused() -> None:
    plan = plan_of({"expect": {"unused": [r"^aux\."]}}, {"a": [1], "aux.x": [1], "aux.y": [1]}, {"a": [1]})
    assert plan.ok
    assert [(s.key, s.fate, s.declared) for s in plan.report.sources] == [("a", "used", False), ("aux.x", "unused", True), ("aux.y", "unused", True)]


def test_expect_unused_matches_the_final_name_too() -> None:
    plan = plan_of({"rules": [{"strip_prefix": "module."}], "expect": {"unused": [r"^aux\."]}}, {"module.a": [1], "module.aux.x": [1]}, {"a": [1]})
    assert plan.ok


def test_unused_fails() -> None:
    plan = plan_of({}, {"a": [1], "extra": [1]}, {"a": [1]})
    assert failures(plan) == [("unused", "1 source key(s) reach no target key and are not dropped or in expect.unused:\n  extra")]
    assert plan.failures[0].keys == ("extra",)


@pytest.mark.parametrize(
    ("min_loaded", "expected"),
    [
        pytest.param(None, [], id="unset"),
        pytest.param(0.0, [], id="zero"),
        pytest.param(0.4, [], id="exactly-reached"),
        pytest.param(
            0.5,
            [("min_loaded", "loaded 40.0% of the target's parameter elements (4 of 10); expect.min_loaded is 50.0%")],
            id="below",
        ),
        pytest.param(
            1.0,
            [("min_loaded", "loaded 40.0% of the target's parameter elements (4 of 10); expect.min_loaded is 100.0%")],
            id="all",
        ),
    ],
)
def test_min_loaded(min_loaded: float | None, expected: list[tuple[str, str]]) -> None:
    expect: dict[str, Any] = {"missing": r"^fc\."}
    if min_loaded is not None:
        expect["min_loaded"] = min_loaded
    plan = plan_of({"expect": expect}, {"conv.w": [4]}, {"conv.w": [4], "fc.w": [6], "bn.running_mean": TargetMeta((100,), kind="buffer")})
    assert [f for f in failures(plan) if f[0] != "missing"] == expected
    totals = plan.report.totals
    assert (totals.param_elements, totals.loaded_elements) == (10, 4)  # buffers are not parameter elements
    assert totals.loaded_fraction == pytest.approx(0.4)


def test_min_loaded_with_no_parameters() -> None:
    plan = plan_of({"expect": {"min_loaded": 1.0}}, {}, {})
    assert plan.ok and plan.report.totals.loaded_fraction == 1.0


def test_forgot_module_prefix() -> None:
    """The classic silent failure of strict=False: nothing loads. Here it fails, with both
    sides named and a hint that says what to add."""
    source = {"module.conv.weight": [4, 3], "module.conv.bias": [4], "module.fc.weight": [2, 4]}
    target = {"conv.weight": [4, 3], "conv.bias": [4], "fc.weight": [2, 4]}
    plan = plan_of({}, source, target)
    assert failures(plan) == [
        ("missing", "3 target key(s) would keep their initial values and are not in expect.missing:\n  conv.{bias, weight}\n  fc.weight"),
        (
            "unused",
            "3 source key(s) reach no target key and are not dropped or in expect.unused:\n"
            "  module.conv.{bias, weight}\n  module.fc.weight\n"
            "hint: 3 unused source key(s) start with 'module.' and match missing target keys without it: "
            "add `- strip_prefix: module.` to rules",
        ),
    ]
    assert plan.report.totals.loaded == 0
    assert plan_of({"rules": [{"strip_prefix": "module."}]}, source, target).ok


def test_forgot_add_prefix_hint() -> None:
    plan = plan_of({}, {"a.w": [1], "b.w": [1]}, {"model.a.w": [1], "model.b.w": [1]})
    assert failures(plan)[1] == (
        "unused",
        "2 source key(s) reach no target key and are not dropped or in expect.unused:\n  a.w\n  b.w\n"
        "hint: 2 missing target key(s) are unused source keys with 'model.' in front: add `- add_prefix: model.` to rules",
    )


def test_no_hint_when_prefixes_do_not_explain() -> None:
    plan = plan_of({}, {"x.a": [1]}, {"y.b": [1]})
    assert failures(plan)[1] == ("unused", "1 source key(s) reach no target key and are not dropped or in expect.unused:\n  x.a")


def test_expect_missing_pattern_matching_nothing_warns() -> None:
    plan = plan_of({"expect": {"missing": ["^nothing"]}}, {"a": [1]}, {"a": [1]})
    assert plan.ok
    assert plan.report.warnings == ("expect.missing: pattern '^nothing' matched no target key",)


def test_dtype_cast_warns() -> None:
    plan = plan_of({}, {"a": ([2], "float16"), "b": TensorMeta((2,), "float16"), "c": [2]}, {"a": [2], "b": [2], "c": [2]})
    assert plan.ok
    assert plan.report.warnings == ("2 tensor(s) will be cast from float16 to float32 by load_state_dict",)


# --------------------------------------------------------------------------- tied parameters


def test_tied_loads_once_and_second_source_is_duplicate() -> None:
    target = {"embed.weight": TargetMeta((5, 2)), "head.weight": TargetMeta((5, 2), tied_to="embed.weight")}
    plan = plan_of({}, {"embed.weight": [5, 2], "head.weight": [5, 2]}, target)
    assert plan.ok
    assert [(a.target, a.sources) for a in plan.assignments] == [("embed.weight", ("embed.weight",))]
    assert [(d.source, d.first, d.target) for d in plan.duplicates] == [("head.weight", "embed.weight", "embed.weight")]
    assert [(t.key, t.status, t.tied_to, t.declared) for t in plan.report.targets] == [
        ("embed.weight", "loaded", None, False),
        ("head.weight", "tied", "embed.weight", True),
    ]
    assert fates(plan) == {"embed.weight": "used", "head.weight": "duplicate"}
    totals = plan.report.totals
    assert (totals.target_keys, totals.loaded, totals.used, totals.param_elements) == (1, 1, 2, 10)


def test_tied_alias_name_alone_loads_the_first_name() -> None:
    target = {"embed.weight": TargetMeta((5, 2)), "head.weight": TargetMeta((5, 2), tied_to="embed.weight")}
    plan = plan_of({}, {"head.weight": [5, 2]}, target)
    assert plan.ok
    assert [(a.target, a.sources) for a in plan.assignments] == [("embed.weight", ("head.weight",))]
    assert plan.report.source_record("head.weight").targets == ("embed.weight",)


def test_tied_duplicate_after_rename_prefers_the_first_name() -> None:
    target = {"a": TargetMeta((2,)), "b": TargetMeta((2,), tied_to="a")}
    plan = plan_of({"rules": [{"rename": {"^x$": "b", "^y$": "a"}}]}, {"x": [2], "y": [2]}, target)
    assert plan.ok
    assert [(a.target, a.sources) for a in plan.assignments] == [("a", ("y",))]
    assert [(d.source, d.first) for d in plan.duplicates] == [("x", "y")]


def test_tied_duplicate_of_another_shape_fails_the_plan() -> None:
    target = {"a": TargetMeta((2,)), "b": TargetMeta((2,), tied_to="a")}
    plan = make_plan(parse_rules({"version": 1}), {"a": [2], "b": [3]}, target)
    assert not plan.ok
    assert any({"a", "b"} <= set(f.keys) for f in plan.failures)


def test_tied_neither_loaded_is_missing() -> None:
    target = {"a": TargetMeta((2,)), "b": TargetMeta((2,), tied_to="a")}
    plan = plan_of({"expect": {"missing": "^[ab]$", "min_loaded": 0}}, {}, target)
    assert plan.ok
    assert targets(plan) == {"a": ("missing", ()), "b": ("tied", ())}  # an alias follows its first name


def test_tied_alias_follows_its_first_name() -> None:
    target = {"a": TargetMeta((3,)), "b": TargetMeta((3,), tied_to="a")}
    plan = make_plan(parse_rules({"version": 1, "shapes": {"skip": "^a$"}, "expect": {"missing": "^a$", "min_loaded": 0}}), {"a": [2]}, target)
    assert failures(plan) == []
    assert plan.report.totals.param_elements == 3


# --------------------------------------------------------------------------- freeze


def _frozen(plan: Plan) -> dict[str, bool | None]:
    return {t.key: t.trainable for t in plan.report.targets}


@pytest.mark.parametrize(
    ("freeze", "trainable"),
    [
        pytest.param({}, {"conv.w": True, "fc.w": True, "bn.running_mean": None}, id="none"),
        pytest.param({"params": ".*"}, {"conv.w": False, "fc.w": False, "bn.running_mean": None}, id="all"),
        pytest.param({"params": [".*"], "except": [r"^fc\."]}, {"conv.w": False, "fc.w": True, "bn.running_mean": None}, id="all-except-head"),
        pytest.param({"params": r"^conv\."}, {"conv.w": False, "fc.w": True, "bn.running_mean": None}, id="some"),
    ],
)
def test_freeze(freeze: dict[str, Any], trainable: dict[str, bool | None]) -> None:
    target = {"conv.w": TargetMeta((4,)), "fc.w": TargetMeta((2,)), "bn.running_mean": TargetMeta((3,), kind="buffer")}
    plan = plan_of({"freeze": freeze, "expect": {"missing": "^bn"}}, {"conv.w": [4], "fc.w": [2]}, target)
    assert plan.ok
    assert _frozen(plan) == trainable
    assert plan.frozen == {k for k, v in trainable.items() if v is False}
    totals = plan.report.totals
    assert totals.frozen_elements == sum(target[k].numel for k, v in trainable.items() if v is False)


def test_freeze_keeps_requires_grad_false() -> None:
    plan = plan_of({}, {"a": [1]}, {"a": TargetMeta((1,), requires_grad=False)})
    assert _frozen(plan) == {"a": False}


@pytest.mark.parametrize(
    ("freeze", "messages"),
    [
        pytest.param({"params": r"^encoder"}, ["freeze.params: pattern '^encoder' matched no parameter of the target"], id="params"),
        pytest.param({"params": ".*", "except": ["^fc", "^zz"]}, ["freeze.except: pattern '^zz' matched no parameter of the target"], id="except"),
        pytest.param(
            {"params": "^bn"},
            ["freeze.params: pattern '^bn' matched no parameter of the target"],
            id="matches-only-a-buffer",
        ),
    ],
)
def test_freeze_pattern_matching_nothing_fails(freeze: dict[str, Any], messages: list[str]) -> None:
    target = {"conv.w": TargetMeta((4,)), "fc.w": TargetMeta((2,)), "bn.running_mean": TargetMeta((3,), kind="buffer")}
    plan = plan_of({"freeze": freeze, "expect": {"missing": "^bn"}}, {"conv.w": [4], "fc.w": [2]}, target)
    assert [f.message for f in plan.failures] == messages
    assert {f.kind for f in plan.failures} == {"freeze"}


def test_planner_messages_quote_patterns_without_doubling_backslashes() -> None:
    plan = make_plan(parse_rules({"version": 1, "freeze": {"params": r"^enc\."}, "expect": {"missing": r"^new\."}}), {"a": [1]}, {"a": [1]})
    assert [f.message for f in plan.failures] == [r"freeze.params: pattern '^enc\.' matched no parameter of the target"]
    assert plan.report.warnings == (r"expect.missing: pattern '^new\.' matched no target key",)


def test_freeze_tied_alias_follows_first_name() -> None:
    target = {"a": TargetMeta((2,)), "b": TargetMeta((2,), tied_to="a")}
    plan = plan_of({"freeze": {"params": "^a$"}}, {"a": [2]}, target)
    assert _frozen(plan) == {"a": False, "b": False}


# --------------------------------------------------------------------------- explain


def _explained() -> Plan:
    return plan_of(
        {
            "rules": [{"strip_prefix": "module."}, {"drop": r"^aux\."}, {"rename": {"from": r"^enc\.(\d+)\.", "to": r"conv\1.", "add": {1: 1}}}],
            "shapes": {"skip": r"^fc\."},
            "expect": {"missing": [r"^fc\.", r"^new\."]},
            "freeze": {"params": r"^conv"},
        },
        {"module.enc.0.w": [4], "module.aux.x": [1], "module.fc.w": [1000]},
        {"conv1.w": [4], "fc.w": [10], "new.w": [3]},
    )


EXPLAIN = [
    pytest.param(
        "module.enc.0.w",
        "source 'module.enc.0.w' [4] float32\n"
        "  step 1 (strip_prefix 'module.'): -> 'enc.0.w'\n"
        "  step 3 (rename '^enc\\.(\\d+)\\.' -> 'conv\\1.' add {1: 1}): -> 'conv1.w'\n"
        "  => loaded into 'conv1.w'",
        id="source-used",
    ),
    pytest.param(
        "conv1.w",
        "target 'conv1.w' [4] float32 parameter: loaded, frozen\n"
        "  from source 'module.enc.0.w' [4] float32\n"
        "    step 1 (strip_prefix 'module.'): -> 'enc.0.w'\n"
        "    step 3 (rename '^enc\\.(\\d+)\\.' -> 'conv\\1.' add {1: 1}): -> 'conv1.w'\n"
        "    => loaded into 'conv1.w'",
        id="target-loaded",
    ),
    pytest.param(
        "module.aux.x",
        "source 'module.aux.x' [1] float32\n  step 1 (strip_prefix 'module.'): -> 'aux.x'\n  => dropped by step 2 (drop '^aux\\.')",
        id="source-dropped",
    ),
    pytest.param(
        "fc.w",
        "target 'fc.w' [10] float32 parameter: mismatched, trainable (allowed by expect.missing)\n"
        "  from source 'module.fc.w' [1000] float32\n"
        "    step 1 (strip_prefix 'module.'): -> 'fc.w'\n"
        "    => not loaded: shape differs from target 'fc.w'\n"
        "  not written: the source has shape [1000], the target [10]",
        id="target-mismatched",
    ),
    pytest.param(
        "new.w",
        "target 'new.w' [3] float32 parameter: missing, trainable (allowed by expect.missing)\n  no source key reaches this name",
        id="target-missing",
    ),
]


@pytest.mark.parametrize(("key", "text"), EXPLAIN)
def test_explain(key: str, text: str) -> None:
    assert _explained().explain(key) == text


def test_explain_unused_source() -> None:
    plan = plan_of({"expect": {"unused": "x"}}, {"x.w": [1]}, {})
    assert plan.explain("x.w") == "source 'x.w' [1] float32\n  => unused: no target key named 'x.w'"


def test_explain_key_that_is_both() -> None:
    plan = plan_of({}, {"a": [2]}, {"a": [2]})
    assert plan.explain("a") == (
        "target 'a' [2] float32 parameter: loaded, trainable\n"
        "  from source 'a' [2] float32\n"
        "    => loaded into 'a'\n"
        "source 'a' [2] float32\n"
        "  => loaded into 'a'"
    )


def test_explain_tied() -> None:
    target = {"a": TargetMeta((2,)), "b": TargetMeta((2,), tied_to="a")}
    plan = plan_of({}, {"a": [2], "b": [2]}, target)
    assert plan.explain("b") == (
        "target 'b' [2] float32 parameter: tied, trainable\n"
        "  tied to 'a': loaded once, under that name\n"
        "source 'b' [2] float32\n"
        "  => duplicate of a tied parameter 'a': checked equal, loaded once"
    )


def test_explain_unknown_key() -> None:
    with pytest.raises(UsageError) as info:
        _explained().explain("conv1.weight")
    assert str(info.value) == "'conv1.weight' is neither a source nor a target key; did you mean 'conv1.w'?"
    assert info.value.exit_code == 2


def test_explain_unknown_key_far_from_everything() -> None:
    with pytest.raises(UsageError) as info:
        _explained().explain("zzzzzzzz")
    assert str(info.value) == "'zzzzzzzz' is neither a source nor a target key"


def test_explain_did_you_mean_names_each_key_once() -> None:
    plan = plan_of({}, {"fc.w": [2]}, {"fc.w": [2]})
    with pytest.raises(UsageError) as info:
        plan.explain("fc.x")
    assert str(info.value) == "'fc.x' is neither a source nor a target key; did you mean 'fc.w'?"


def test_explain_collided_source_names_the_collision() -> None:
    plan = plan_of({"rules": [{"rename": {"^a": "c"}}]}, {"a": [2], "c": [2]}, {"c": [2]})
    text = plan.explain("c").splitlines()
    assert "no target key named" not in text[-1]
    assert "'a'" in text[-1]


# --------------------------------------------------------------------------- input forms and scale


def test_source_and_target_forms() -> None:
    plan = plan_of(
        {},
        {"a": [2], "b": (3,), "c": ([4], "bfloat16"), "d": TensorMeta((5,), "int64")},
        {"a": (2,), "b": [3], "c": TargetMeta((4,), "bfloat16"), "d": ([5], "int64")},
    )
    assert plan.ok
    assert [(t.key, t.dtype, t.source_dtype) for t in plan.report.targets] == [
        ("a", "float32", "float32"),
        ("b", "float32", "float32"),
        ("c", "bfloat16", "bfloat16"),
        ("d", "int64", "int64"),
    ]


def test_plan_of_nothing() -> None:
    plan = plan_of({}, {}, {})
    assert plan.ok and plan.report.totals.target_keys == 0


def test_report_is_a_dry_run() -> None:
    plan = plan_of({}, {"a": [1]}, {"a": [1]})
    assert plan.report.dry_run is True
    assert plan.report.source == {"kind": "metadata"} and plan.report.target == {"kind": "metadata"}


def test_hundred_thousand_keys() -> None:
    n = 100_000
    source = {f"module.blocks.{i // 10}.layer{i % 10}.weight": [4] for i in range(n)}
    source["module.bn.num_batches_tracked"] = []
    target = {f"blocks.{i // 10}.layer{i % 10}.weight": TargetMeta((4,)) for i in range(n)}
    rules = parse_rules(
        {"version": 1, "rules": [{"strip_prefix": "module."}, {"drop": r"\.num_batches_tracked$"}], "expect": {"min_loaded": 1.0}}
    )
    plan = make_plan(rules, source, target)
    assert plan.ok
    totals = plan.report.totals
    assert (totals.loaded, totals.used, totals.dropped, totals.loaded_elements) == (n, n, 1, 4 * n)
    assert len(plan.assignments) == n


def test_missing_batchnorm_counters_carry_the_hint_that_names_the_fix() -> None:
    """A file saved from a frozen-BatchNorm model by another tool has no counters: the
    failure says so and names the declaration that accepts it; declaring it passes."""
    target = {"bn.weight": [4], "bn.running_mean": [4], "bn.num_batches_tracked": []}
    source = {"bn.weight": [4], "bn.running_mean": [4]}
    plan = plan_of({}, source, target)
    assert failures(plan) == [
        (
            "missing",
            "1 target key(s) would keep their initial values and are not in expect.missing:\n  bn.num_batches_tracked\n"
            "hint: 1 of these are BatchNorm num_batches_tracked counters, which FrozenBatchNorm2d does not keep: the checkpoint "
            "was probably saved from a model with frozen BatchNorm; declare them with `expect: {missing: ['\\.num_batches_tracked$']}` "
            "(the counters keep their initial values; eval-mode outputs do not depend on them)",
        )
    ]
    assert plan_of({"expect": {"missing": r"\.num_batches_tracked$"}}, source, target).ok
