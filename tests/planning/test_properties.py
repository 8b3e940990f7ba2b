"""Property-based tests (hypothesis) of the rules parser and the planner.

1. Random rules dicts, built from a grammar of the real sections and steps with invalid
   values mixed in, random YAML texts and mutated valid YAML: parsing gives a ``Rules``
   or raises a ``RemapError`` subclass with a non-empty message, never anything else.
2. Random source and target key sets planned with random name-step rules: every plan
   satisfies the invariants the report promises (one status per target key, one fate per
   source key, equal shapes after ops for every loaded pair, totals that add up,
   ``ok == not failures``, a JSON form that validates against the published schema).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from importlib import resources
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from remap import make_plan
from remap.planning.planner import totals_of
from remap.errors import RemapError
from remap.meta import DTYPE_NAMES, TargetMeta
from remap.report.records import FAILURE_KINDS, LOADED, MISMATCHED, MISSING, TIED, USED, DROPPED, UNUSED, SKIPPED, DUPLICATE
from remap.rules.parse import Rules, parse_rules

jsonschema = pytest.importorskip("jsonschema")

# REMAP_FUZZ_SCALE=20 runs twenty times as many examples (a longer fuzzing session)
SCALE = float(os.environ.get("REMAP_FUZZ_SCALE", "1"))
FAST = settings(max_examples=int(150 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])
FASTER = settings(max_examples=int(60 * SCALE), deadline=None, suppress_health_check=[HealthCheck.too_slow])


def assert_clean_outcome(parse, value: Any) -> Rules | None:
    """``parse(value)`` gives Rules, or raises a RemapError with a message; nothing else."""
    try:
        result = parse(value)
    except RemapError as exc:
        assert str(exc).strip(), f"empty message from {type(exc).__name__}"
        assert exc.exit_code == 2, (type(exc).__name__, str(exc))
        return None
    assert isinstance(result, Rules)
    return result


# ---------------------------------------------------------------------------- a grammar of rules

JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=4),
    st.lists(st.integers(-2, 2), max_size=2),
    st.dictionaries(st.text(max_size=3), st.integers(0, 2), max_size=2),
)
PATTERN = st.sampled_from(
    [r"^module\.", r"\.weight$", "layer", r"^(\w+)\.(\d+)\.", r"(?P<n>\d+)", "(q|k|v)", ".*", "fc",
     # invalid or odd ones
     "(", "[a-", "*", "", "a{2,1}", "\\", "(?<=a+)b", "(?P<n>x)(?P<n>y)", r"\p{Foo}"]
)  # fmt: skip
PATTERNS = st.one_of(PATTERN, st.lists(PATTERN, max_size=3), JUNK)
PREFIX = st.sampled_from(["module.", "backbone.", "", "_orig_mod.", "0.", "x"])
REPLACEMENT = st.sampled_from([r"layers.\1.", r"\g<n>", r"\g<2>", r"\9", r"\.", "a\\", r"\g<", "plain", "", "conv\\1."])
INTS = st.lists(st.integers(-2, 4), max_size=4)


def _step_value(kind: str) -> st.SearchStrategy[Any]:
    m = {"match": PATTERNS}
    if kind == "strip_prefix":
        return st.one_of(PREFIX, st.lists(PREFIX, max_size=3), JUNK)
    if kind == "add_prefix":
        return st.one_of(PREFIX, st.fixed_dictionaries({"prefix": st.one_of(PREFIX, JUNK)}, optional={"match": PATTERNS, "x": JUNK}), JUNK)
    if kind == "rename":
        short = st.dictionaries(st.one_of(PATTERN, st.integers(0, 3)), st.one_of(REPLACEMENT, JUNK), max_size=3)
        add = st.one_of(st.dictionaries(st.one_of(st.integers(0, 3), st.sampled_from(["n", "1", "x"])), st.one_of(st.integers(-2, 2), JUNK), max_size=2), JUNK)
        long = st.fixed_dictionaries({"from": st.one_of(PATTERN, JUNK), "to": st.one_of(REPLACEMENT, JUNK)}, optional={"add": add, "form": JUNK})
        return st.one_of(short, long, JUNK)
    if kind in ("drop", "keep"):
        return PATTERNS
    if kind == "transpose":
        return st.one_of(PATTERNS, st.fixed_dictionaries(m, optional={"dims": st.one_of(INTS, JUNK)}))
    if kind == "reshape":
        return st.one_of(st.fixed_dictionaries(m, optional={"shape": st.one_of(INTS, st.just("target"), JUNK)}), JUNK)
    if kind == "slice":
        opt = {"dim": st.one_of(st.integers(-3, 3), JUNK), "index": st.one_of(INTS, JUNK), "start": st.integers(-3, 3),
               "stop": st.integers(-3, 5), "step": st.integers(-2, 2)}  # fmt: skip
        return st.one_of(st.fixed_dictionaries(m, optional=opt), JUNK)
    if kind == "pad":
        return st.fixed_dictionaries(m, optional={"fill": st.one_of(st.sampled_from(["zeros", "mean", "x"]), st.floats(), JUNK), "to": st.one_of(INTS, JUNK)})
    if kind == "cast":
        return st.fixed_dictionaries(m, optional={"dtype": st.one_of(st.sampled_from([*DTYPE_NAMES, "float", "x"]), JUNK)})
    if kind == "adapt":
        return st.fixed_dictionaries(m, optional={"op": st.sampled_from(["in_channels", "interpolate", "x"]),
                                                  "mode": st.sampled_from(["bicubic", "nearest", "linear", "cubic"]),
                                                  "grid": st.sampled_from(["2d", "1d", "3d"]),
                                                  "prefix_tokens": st.one_of(st.integers(-1, 2), JUNK)})  # fmt: skip
    if kind == "merge":
        return st.fixed_dictionaries(
            {"match": st.one_of(PATTERN, JUNK)},
            optional={"into": st.one_of(REPLACEMENT, JUNK), "order": st.one_of(st.lists(st.sampled_from(["q", "k", "v", 1]), max_size=4), JUNK),
                      "dim": st.one_of(st.integers(-2, 2), JUNK), "group": st.one_of(st.sampled_from([1, 2, 0, "n", "x"]), JUNK),
                      "stack": st.one_of(st.booleans(), JUNK)},
        )  # fmt: skip
    if kind == "split":
        return st.fixed_dictionaries(
            {"match": st.one_of(PATTERN, JUNK)},
            optional={"into": st.one_of(st.lists(REPLACEMENT, max_size=4), JUNK), "dim": st.one_of(st.integers(-2, 2), JUNK),
                      "sizes": st.one_of(INTS, JUNK)},
        )  # fmt: skip
    return JUNK


STEP_KINDS = ["strip_prefix", "add_prefix", "rename", "drop", "keep", "transpose", "reshape", "slice", "pad", "cast",
              "adapt", "merge", "split"]  # fmt: skip


@st.composite
def steps(draw: st.DrawFn) -> Any:
    shape = draw(st.sampled_from(["one", "one", "one", "one", "two", "none", "junk"]))
    if shape == "junk":
        return draw(JUNK)
    item: dict[Any, Any] = {}
    kinds = [] if shape == "none" else draw(st.lists(st.sampled_from([*STEP_KINDS, "renam"]), min_size=1 if shape == "one" else 2, max_size=1 if shape == "one" else 2))
    for kind in kinds:
        item[kind] = draw(_step_value(kind))
    if draw(st.booleans()):
        item["optional"] = draw(st.one_of(st.booleans(), JUNK))
    return item


def _section(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    return st.one_of(st.fixed_dictionaries({}, optional={**fields, "bogus": JUNK}), JUNK)


RULES_DICTS = st.fixed_dictionaries(
    {},
    optional={
        "version": st.sampled_from([1, 1, 1, 2, "1", 1.0, True, None]),
        "source": _section({"path": st.text(max_size=5), "key": st.one_of(st.text(max_size=5), JUNK), "trust_pickle": st.one_of(st.booleans(), JUNK),
                            "model": st.one_of(st.sampled_from(["a.b:c", "x"]), JUNK), "args": JUNK, "kwargs": JUNK}),
        "target": _section({"model": st.one_of(st.sampled_from(["torch.nn:Linear", "x"]), JUNK), "args": JUNK, "kwargs": JUNK,
                            "device": st.sampled_from(["meta", "cpu", ""]), "dtype": st.sampled_from(["float16", "int8", "x"])}),
        "rules": st.one_of(st.lists(steps(), max_size=4), JUNK),
        "shapes": st.one_of(st.sampled_from(["error", "skip", "ignore"]), st.fixed_dictionaries({}, optional={"default": st.sampled_from(["error", "skip", "x"]), "skip": PATTERNS, "y": JUNK}), JUNK),
        "expect": _section({"missing": PATTERNS, "unused": PATTERNS,
                            "min_loaded": st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-1, 2), JUNK)}),
        "freeze": _section({"params": PATTERNS, "except": PATTERNS, "batchnorm": st.one_of(st.sampled_from(["keep", "eval", "frozen", "x"]), JUNK)}),
        "output": _section({"report": st.one_of(st.text(max_size=4), JUNK), "save": st.one_of(st.text(max_size=4), JUNK),
                            "max_shard_size": st.one_of(st.sampled_from(["5GB", "1.5KiB", "0", "x", " 3 MB "]), st.integers(-1, 10**10), JUNK)}),
        "expcet": JUNK,
    },
)  # fmt: skip


@FAST
@given(RULES_DICTS)
@example({"version": 1, "rules": [{"rename": {"(": "x"}}]})
@example({"version": 1, "expect": {"min_loaded": float("nan")}})
@example({"version": 1, "rules": [{"merge": {"match": "(q|k)", "into": "x", "order": ["q", "q"]}}]})
@example({"version": 1, "rules": [{"rename": {"from": "(a)", "to": "\\1", "add": {1: True}}}]})
def test_random_rules_dicts_parse_or_fail_cleanly(data: Any) -> None:
    assert_clean_outcome(parse_rules, data)


@FAST
@given(st.one_of(RULES_DICTS, st.lists(RULES_DICTS, max_size=2), JUNK))
def test_random_rules_dicts_as_yaml_parse_or_fail_cleanly(data: Any) -> None:
    text = yaml.safe_dump(data, default_flow_style=bool(hash(str(data)) % 2))
    assert_clean_outcome(parse_rules, text)


YAML_CHARS = st.sampled_from(list("ab:- \n\t{}[],&*!|>'\"#%@`?.\\1\x00\x85\ufeff") + ["!!int ", "!!binary ", "<<: ", "&a ", "*a", "---\n", "...\n", "!!python/object:os.system ", "!!timestamp ", "2001-13-45", "!!float "])


@FAST
@given(st.one_of(st.text(max_size=60), st.lists(YAML_CHARS, max_size=40).map("".join)))
@example("version: 1\nrules: !!python/object/apply:os.system ['echo hi']\n")
@example("version: !!timestamp 2001-13-45\n")
@example("version: !!int x\n")
@example("a: &a [*a]\n")
@example("version: 1\n? [a]\n: 1\n")
@example("\ufeffversion: 1\n")
@example("version: !!binary AAAA\n")
@example("version: 1\nrules: [{drop: !!float x}]\n")
@example("{" * 2000)
def test_random_yaml_text_parses_or_fails_cleanly(text: str) -> None:
    assert_clean_outcome(parse_rules, text)


VALID_YAML = """\
version: 1
source: {path: ckpt.pth, key: state_dict}
target: {model: 'torch.nn:Linear', args: [4, 2]}
rules:
  - strip_prefix: module.
  - rename: {'^features\\.(\\d+)\\.': 'layers.\\1.'}
  - rename: {from: '^encoder\\.(\\d+)\\.', to: 'conv\\1.', add: {1: 1}}
  - drop: ['\\.num_batches_tracked$', '^fc\\.']
  - transpose: {match: '\\.c_attn\\.weight$', dims: [0, 1]}
  - merge: {match: '^(.*)\\.(q|k|v)_proj\\.weight$', into: '\\1.in_proj_weight', order: [q, k, v], dim: 0}
  - split: {match: '^(.*)\\.qkv\\.weight$', into: ['\\1.q.weight', '\\1.k.weight'], dim: 0}
    optional: true
shapes: {default: error, skip: ['^fc\\.']}
expect: {missing: ['^fc\\.'], min_loaded: 0.5}
freeze: {params: ['.*'], except: ['^fc\\.'], batchnorm: frozen}
output: {report: out/report.json, max_shard_size: 5GB}
"""


def test_the_valid_yaml_used_for_mutations_is_valid() -> None:
    assert isinstance(parse_rules(VALID_YAML), Rules)


@FAST
@given(st.lists(st.tuples(st.integers(0, len(VALID_YAML)), st.integers(0, 3), YAML_CHARS), min_size=1, max_size=6))
def test_mutated_yaml_parses_or_fails_cleanly(edits: list[tuple[int, int, str]]) -> None:
    text = VALID_YAML
    for pos, cut, insert in edits:  # replace `cut` characters at `pos` with `insert`
        pos = min(pos, len(text))
        text = text[:pos] + insert + text[pos + cut :]
    assert_clean_outcome(parse_rules, text)


# ---------------------------------------------------------------------------- plan invariants

SCHEMA = json.loads(resources.files("remap.report").joinpath("report.schema.json").read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
TARGET_STATUSES = {LOADED, MISSING, MISMATCHED, TIED}
SOURCE_FATES = {USED, DROPPED, UNUSED, SKIPPED, DUPLICATE}

PREFIXES = ["", "", "module.", "backbone.", "module.backbone."]
MODULES = ["conv", "bn", "fc", "layer.0", "layer.1", "layer.10", "encoder.0", "encoder.1", "head"]
LEAVES = ["weight", "bias", "running_mean"]
SHAPES = [(2,), (3,), (2, 3), (3, 2), (4, 3, 1, 1), ()]

KEY = st.builds(lambda p, m, l: f"{p}{m}.{l}", st.sampled_from(PREFIXES), st.sampled_from(MODULES), st.sampled_from(LEAVES))
SOURCE = st.dictionaries(KEY, st.sampled_from(SHAPES), max_size=12)
TARGET_KEY = st.builds(lambda p, m, l: f"{p}{m}.{l}", st.sampled_from(["", "", "backbone."]), st.sampled_from(MODULES), st.sampled_from(LEAVES))
TARGET_VALUE = st.builds(
    lambda shape, kind, grad: TargetMeta(shape, "float32", kind, grad and kind == "parameter"),
    st.sampled_from(SHAPES), st.sampled_from(["parameter", "parameter", "buffer"]), st.booleans(),
)  # fmt: skip
NAME_PATTERN = st.sampled_from([r"^module\.", r"\.weight$", r"^layer\.", r"bias", r"^encoder\.(\d+)\.", r"^fc\.", r"^(\w+)\.(\d+)\.", "^nothing$", ".*"])
NAME_STEP = st.one_of(
    st.builds(lambda p: {"strip_prefix": p}, st.sampled_from(["module.", "backbone.", ["module.", "backbone."]])),
    st.builds(lambda p: {"add_prefix": p}, st.sampled_from(["backbone.", "module."])),
    st.builds(lambda p, m: {"add_prefix": {"prefix": p, "match": m}}, st.sampled_from(["backbone.", "x."]), NAME_PATTERN),
    st.builds(lambda r: {"rename": r}, st.sampled_from([
        {r"^encoder\.(\d+)\.": r"layer.\1."}, {r"^layer\.": "encoder."}, {r"\.weight$": ".bias", r"\.bias$": ".weight"},
        {r"^(\w+)\.(\d+)\.": r"\1.1\2."}, {"^conv": "fc", "^fc": "conv"}, {r"running_mean$": "weight"},
    ])),  # fmt: skip
    st.builds(lambda t, a: {"rename": {"from": r"^(\w+)\.(\d+)\.", "to": t, "add": {2: a}}}, st.sampled_from([r"\1.\2.", r"layer.\2."]), st.integers(-1, 1)),
    st.builds(lambda p: {"drop": p}, st.one_of(NAME_PATTERN, st.lists(NAME_PATTERN, min_size=1, max_size=2))),
    st.builds(lambda p: {"keep": p}, st.one_of(NAME_PATTERN, st.lists(NAME_PATTERN, min_size=1, max_size=2))),
    st.builds(lambda p: {"transpose": p}, st.sampled_from([r"\.weight$", r"^fc\."])),
    st.builds(lambda p: {"reshape": {"match": p, "shape": "target"}}, st.sampled_from([r"\.weight$", r"^conv\."])),
)
RULES = st.fixed_dictionaries(
    {"version": st.just(1), "rules": st.lists(st.tuples(NAME_STEP, st.booleans()).map(lambda s: {**s[0], "optional": s[1]}), max_size=4)},
    optional={
        "shapes": st.sampled_from(["error", "skip", {"skip": [r"^fc\."]}]),
        "expect": st.fixed_dictionaries({}, optional={"missing": st.lists(NAME_PATTERN, max_size=2), "unused": st.lists(NAME_PATTERN, max_size=2),
                                                      "min_loaded": st.sampled_from([0.0, 0.5, 1.0])}),
        "freeze": st.fixed_dictionaries({}, optional={"params": st.lists(NAME_PATTERN, max_size=2), "except": st.lists(NAME_PATTERN, max_size=1)}),
    },
)  # fmt: skip


@st.composite
def targets(draw: st.DrawFn) -> dict[str, TargetMeta]:
    tgt = draw(st.dictionaries(TARGET_KEY, TARGET_VALUE, max_size=12))
    keys = [k for k, m in tgt.items() if m.kind == "parameter"]
    if len(keys) >= 2 and draw(st.booleans()):  # tie a later parameter to an earlier one, as a module would
        first, alias = keys[0], draw(st.sampled_from(keys[1:]))
        m = tgt[first]
        tgt[alias] = TargetMeta(m.shape, m.dtype, "parameter", m.requires_grad, tied_to=first)
    return tgt


def _meta_run(recipe: Any, source: dict[str, Any]) -> torch.Tensor:
    """Run a recipe's ops on meta tensors: the shape its ops really give."""
    if isinstance(recipe, str):
        m = source[recipe]
        return torch.empty(m.shape, dtype=getattr(torch, m.dtype), device="meta")
    return recipe.op.fn(*(_meta_run(i, source) for i in recipe.inputs))


def check_invariants(plan: Any, src: dict[str, Any], tgt: dict[str, TargetMeta]) -> None:
    report = plan.report
    # each target key exactly one status, each source key exactly one fate
    assert [t.key for t in report.targets] == list(tgt)
    assert [s.key for s in report.sources] == list(src)
    assert {t.status for t in report.targets} <= TARGET_STATUSES
    assert {s.fate for s in report.sources} <= SOURCE_FATES
    for t in report.targets:
        assert (t.status == TIED) == (tgt[t.key].tied_to is not None), t
    # every loaded pair has equal shapes after its ops, and the ops really give that shape
    for a in plan.assignments:
        assert a.meta.shape == tgt[a.target].shape, a
        if a.recipe is not None:
            assert tuple(_meta_run(a.recipe, plan.source_meta).shape) == tgt[a.target].shape, a
        for s in a.sources:
            assert report.source_record(s).fate == USED and a.target in report.source_record(s).targets
    loaded = {t.key for t in report.targets if t.status == LOADED}
    assert loaded == {a.target for a in plan.assignments}
    assert len(plan.assignments) == len(loaded)  # one writer per target key
    for t in report.targets:
        if t.status == LOADED:
            assert t.source_shape == t.shape
        if t.status == MISMATCHED:
            assert t.source_shape is not None and t.source_shape != t.shape
    for s in report.sources:
        if s.fate in (USED, SKIPPED, DUPLICATE):
            assert s.targets and all(k in tgt for k in s.targets), s
        if s.fate == DROPPED:
            assert s.step is not None and s.step_kind in ("strip_prefix", "add_prefix", "rename", "drop", "keep"), s
    # totals add up
    tot = report.totals
    own = [t for t in report.targets if t.status != TIED]
    assert tot.loaded + tot.missing + tot.mismatched == tot.target_keys == len(own)
    assert tot.used + tot.dropped + tot.unused == tot.source_keys == len(src)
    params = [t for t in own if t.kind == "parameter"]
    assert tot.param_elements == sum(math.prod(t.shape) for t in params)
    assert tot.loaded_elements == sum(math.prod(t.shape) for t in params if t.status == LOADED)
    assert tot.frozen_elements + tot.trainable_elements == tot.param_elements
    assert tot.frozen_params + tot.trainable_params == len(params)
    counts = Counter(s.fate for s in report.sources)
    assert tot.used == counts[USED] + counts[DUPLICATE] and tot.dropped == counts[DROPPED]
    # the planner counts from its columns; the records, built later, must say the same
    assert tot == totals_of(list(report.targets), list(report.sources))
    undeclared = [t.key for t in report.targets if t.status == MISSING and not t.declared]
    missing = [f for f in report.failures if f.kind == "missing"]
    assert (missing[0].keys if missing else ()) == tuple(undeclared) or any(t.status == MISMATCHED for t in report.targets)
    # ok iff no failure; failures are of the documented kinds and have messages
    assert report.ok == (not report.failures) == plan.ok
    assert all(f.kind in FAILURE_KINDS and f.message for f in report.failures)
    # the JSON form validates against the published schema and survives a round trip
    d = report.to_dict()
    errors = sorted(VALIDATOR.iter_errors(d), key=str)
    assert not errors, errors[0]
    assert json.loads(report.to_json()) == json.loads(json.dumps(d))


@FAST
@given(SOURCE, targets(), RULES)
@example({"module.fc.weight": (2, 3), "fc.weight": (2, 3)}, {"fc.weight": TargetMeta((2, 3))}, {"version": 1, "rules": [{"strip_prefix": "module."}]})
@example({"conv.weight": (2,), "fc.weight": (3,)}, {"conv.weight": TargetMeta((3,)), "fc.weight": TargetMeta((2,))},
         {"version": 1, "rules": [{"rename": {"^conv": "fc", "^fc": "conv"}}]})  # fmt: skip
def test_plan_invariants(src: dict[str, tuple[int, ...]], tgt: dict[str, TargetMeta], rules: dict[str, Any]) -> None:
    parsed = parse_rules(rules)
    try:
        plan = make_plan(parsed, src, tgt)
    except RemapError as exc:  # a rename that produces an impossible key, say: a clean error is fine
        assert str(exc).strip()
        return
    check_invariants(plan, dict(plan.source_meta), tgt)


@FASTER
@given(st.dictionaries(KEY, st.sampled_from(SHAPES), min_size=1, max_size=8), st.data())
def test_plan_invariants_when_names_line_up(src: dict[str, tuple[int, ...]], data: st.DataObject) -> None:
    """Targets made from the sources themselves (renamed as the rules would), so most keys load."""
    strip = data.draw(st.booleans())
    tgt: dict[str, TargetMeta] = {}
    for key, shape in src.items():
        name = key.removeprefix("module.") if strip else key
        if data.draw(st.integers(0, 4)) and name not in tgt:
            tgt[name] = TargetMeta(shape if data.draw(st.integers(0, 5)) else (7,))
    rules = {"version": 1, "rules": [{"strip_prefix": "module.", "optional": True}] if strip else [], "shapes": data.draw(st.sampled_from(["error", "skip"]))}
    plan = make_plan(parse_rules(rules), src, tgt)
    check_invariants(plan, dict(plan.source_meta), tgt)
    assume(plan.assignments)


def test_reshape_to_a_scalar_target_runs() -> None:
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(()))
    import remap

    report = remap.load(model, {"w": torch.full((1,), 3.0)}, rules={"version": 1, "rules": [{"reshape": {"match": "w", "shape": "target"}}]})
    assert report.ok and model.w.item() == 3.0
