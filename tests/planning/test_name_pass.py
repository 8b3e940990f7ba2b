"""Planning once per key shape must give exactly what planning key by key gives."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from remap.meta import TensorMeta
from remap.planning.name_pass import abstract_pattern, component_view, leading_name_steps, required_literals, run_name_steps
from remap.rules.steps import Rename
from remap.errors import RulesError
from remap.rules.parse import parse_rules
from remap.rules.steps import Item

NAMES = ["layers", "blocks", "w1", "fc2", "q_proj", "bn", "weight", "bias", "e3", "mlp", "0a", "x_1"]
PATTERNS = [
    r"^layers\.(\d+)\.", r"\.(\d+)\.", r"(\d+)", r"w1", r"fc\d+", r"^(.*)\.weight$", r"[^.]+\.bias$",
    r"\w+\.(\d+)\.", r"^blocks\.0\.", r"\.1\.", r"layers\.\d\.", r"(\d+)\.(\d+)", r"\.e3$", r"^(\w+)\.",
    r"\d*\.", r"[0-9]+\.w", r"_\d+$", r"mlp\.(?P<i>\d+)",
    # patterns that tell numbers apart, each anchored so it can run per class of numbers
    r"^layers\.(\d*[01])\.", r"^blocks\.(\d+)\.0\.", r"^(\d+)\.", r"^layers\.1", r"^w1\.(\d+)$",
    r"^mlp\.(\d*[13])\.(\d+)\.", r"^(\w+)\.([12])\.", r"^layers\.(?:1|2)0?\.", r"^bn\.(\d)\.",
]  # fmt: skip
REPLACEMENTS = [r"blocks.\1.", r".\1.", "x", "", r"\1.y", "mlp.", r"L\1"]


@pytest.mark.parametrize(
    "pattern, ok",
    [
        (r"^model\.layers\.(\d+)\.", True),
        (r"\.w1\.", True),
        (r"^(.*)\.qkv\.weight$", True),
        (r"fc\d+", True),
        (r"^layers\.0\.", False),  # a literal index
        (r"layers\.\d\.", False),  # one digit: the length of a number would matter
        (r"(\d+)(\d+)", False),  # two neighbours could split one number
        (r".*\d+", False),
        (r"\bfc", False),
        (r"a{2}", False),
        (r"(?<=x)y", False),
    ],
)
def test_which_patterns_can_run_on_shapes(pattern, ok):
    assert (abstract_pattern(pattern) is not None) == ok


def keys_strategy():
    component = st.one_of(st.sampled_from(NAMES), st.integers(0, 30).map(str))
    key = st.lists(component, min_size=1, max_size=5).map(".".join)
    return st.lists(key, min_size=1, max_size=40, unique=True)


def rules_strategy():
    rename = st.builds(lambda p, r: {"rename": {p: r}}, st.sampled_from(PATTERNS), st.sampled_from(REPLACEMENTS))
    drop = st.builds(lambda p: {"drop": p}, st.sampled_from(PATTERNS))
    keep = st.builds(lambda ps: {"keep": ps}, st.lists(st.sampled_from(PATTERNS), min_size=1, max_size=2, unique=True))
    mapping = st.builds(lambda ps, r: {"rename": {p: r for p in ps}}, st.lists(st.sampled_from(PATTERNS), min_size=2, max_size=3, unique=True), st.sampled_from(REPLACEMENTS))
    strip = st.builds(lambda p: {"strip_prefix": p}, st.sampled_from(["layers.", "blocks.", "0.", "mlp."]))
    step = st.one_of(rename, drop, keep, mapping, strip).map(lambda s: {**s, "optional": True})
    return st.lists(step, min_size=1, max_size=6)


def per_key(steps, keys):
    items = [Item.source(k, TensorMeta((1,))) for k in keys]
    dropped = []
    for step in steps:
        result = step.run(items)
        items = result.items
        dropped += [(i, step) for i in result.dropped]
    return items, dropped


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(keys=keys_strategy(), steps=rules_strategy())
@example(  # a rename that deletes the dots around a number glues it to a name: 'w1' + '0'
    keys=["w1.0.0"], steps=[{"rename": {r"\.(\d+)\.": ""}, "optional": True}, {"rename": {r"(\d+)": r"blocks.\1."}, "optional": True}]
)
def test_shapes_agree_with_key_by_key(keys, steps):
    try:
        rules = parse_rules({"version": 1, "rules": steps})
    except RulesError:
        assume(False)  # a replacement naming a group its pattern lacks: not a rules file
        return
    leading = leading_name_steps(rules.steps)
    if not leading:
        return
    source = {k: TensorMeta((1,)) for k in keys}
    fast = run_name_steps(leading, source)
    if fast is None:
        return  # the planner then runs key by key: nothing to compare
    items, dropped, counts = fast.items(source), fast.dropped_items(source), fast.counts
    assert all(tuple(s for s, _ in fast.hops(i)) == fast.hop_steps(i) for i in range(len(keys)))
    slow_items, slow_dropped = per_key([s for s, _ in leading], keys)
    assert [(i.key, i.sources, i.hops) for i in items] == [(i.key, i.sources, i.hops) for i in slow_items]
    assert sorted((i.key, i.sources, i.hops, s.index) for i, s in dropped) == sorted(
        (i.key, i.sources, i.hops, s.index) for i, s in slow_dropped
    )
    slow_counts = []
    current = [Item.source(k, TensorMeta((1,))) for k in keys]
    for step, _ in leading:
        result = step.run(current)
        slow_counts.append([n for _, n in result.counts])
        current = result.items
    assert counts == slow_counts


def test_a_typical_llm_rule_set_runs_on_shapes():
    rules = parse_rules(
        {
            "version": 1,
            "rules": [
                {"strip_prefix": "model."},
                {"rename": {r"^layers\.(\d+)\.self_attn\.": r"blocks.\1.attn."}},
                {"rename": {r"^layers\.(\d+)\.mlp\.experts\.(\d+)\.w1\.": r"blocks.\1.moe.\2.fc1."}},
                {"drop": r"\.rotary_emb\.inv_freq$"},
            ],
        }
    )
    leading = leading_name_steps(rules.steps)
    assert len(leading) == 4
    source = {f"model.layers.{i}.self_attn.q_proj.weight": TensorMeta((2,)) for i in range(3)}
    source |= {f"model.layers.{i}.mlp.experts.{e}.w1.weight": TensorMeta((2,)) for i in range(3) for e in range(4)}
    source |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": TensorMeta((2,)) for i in range(3)}
    fast = run_name_steps(leading, source)
    items, dropped, counts = fast.items(source), fast.dropped_items(source), fast.counts
    assert items[0].key == "blocks.0.attn.q_proj.weight"
    assert items[0].hops == ((1, "layers.0.self_attn.q_proj.weight"), (2, "blocks.0.attn.q_proj.weight"))
    assert "blocks.2.moe.3.fc1.weight" in {i.key for i in items}
    assert len(dropped) == 3 and counts == [[18], [6], [12], [3]]


@pytest.mark.parametrize(
    "pattern, kinds",
    [
        (r"^layers\.(\d+)\.experts\.(\d*[01])\.w1", ("plain", "number", "plain", "test", "digits")),
        (r"^module\.layer1\.(\d+)\.downsample\.0\.", ("plain", "test", "number", "plain", "test", "plain")),
        (r"^a\.(\d)(\d)\.", ("plain", "digits", "plain")),  # two captures in one number: its value matters
        (r"^a\.\d+$", ("plain", "number")),
        (r"^a\.1$", ("plain", "test")),
    ],
)
def test_component_kinds(pattern, kinds):
    assert component_view(pattern).kinds == kinds


@pytest.mark.parametrize("pattern", [r"\.0\.", r"^a.0", r"^a\.(0|1\.2)", r"^(?i)a\.0", r"^a\.?0", r"^a(?=\.0)", r"^a\.[^x]\.", r"^(\d)\.\1"])
def test_patterns_without_a_component_view(pattern):
    assert component_view(pattern) is None


@pytest.mark.parametrize(
    "pattern, literals",
    [
        (r"^model\.layers\.(\d*[01])\.mlp\.experts\.", ("model.layers.", ".mlp.experts.")),
        (r"\.w1\.(weight|bias)$", (".w1.",)),
        (r"downsample\.0\.", ("downsample.", ".")),  # the 0 could be a whole component: left out
        (r"fc2?\.x", ("fc", ".x")),
        (r"(a|b)", ()),
        (r"(?i)fc", ()),
        (r"a|b", ()),
    ],
)
def test_required_literals(pattern, literals):
    assert required_literals(pattern) == literals


def test_rules_that_pick_numbers_run_once_per_class_not_per_key(monkeypatch):
    """Expert-parallel ranks picked by an expert's last digit: 2 x 64 x 16 keys, one
    pattern per rank; the steps run once per class of numbers they can tell apart."""
    calls = []
    original = Rename.name_map
    monkeypatch.setattr(Rename, "name_map", lambda self, key: calls.append(key) or original(self, key))
    steps = [{"rename": {rf"^layers\.(\d+)\.experts\.(\d*{r})\.w1\.": rf"layers.\1.ep{r}.experts.\2.w1."}} for r in range(10)]
    rules = parse_rules({"version": 1, "rules": steps + [{"strip_prefix": "layers."}]})
    source = {f"layers.{i}.experts.{e}.w1.{w}": TensorMeta((2,)) for i in range(16) for e in range(64) for w in ("weight", "bias")}
    fast = run_name_steps(leading_name_steps(rules.steps), source)
    assert fast is not None and len(fast.names) == len(source) == 2048
    assert fast.names[0] == "0.ep0.experts.0.w1.weight" and fast.names[-1] == "15.ep3.experts.63.w1.bias"
    assert len(calls) < 200  # per class and shape; per key it would be over 10,000
    assert fast.hops(len(source) - 1) == ((1 + 3, "layers.15.ep3.experts.63.w1.bias"), (11, "15.ep3.experts.63.w1.bias"))


def test_a_capture_glued_to_text_runs_on_shapes_unless_it_holds_a_number(monkeypatch):
    """``w\\2`` glues a capture to a letter: harmless for ``(q|k|v)``, which never holds a
    number, so the step runs once per shape; ``layer\\1`` glues an index to a name, so
    those keys run one by one. Both give what the per-key run gives."""
    calls = []
    original = Rename.name_map
    monkeypatch.setattr(Rename, "name_map", lambda self, key: calls.append(key) or original(self, key))
    source = {f"layers.{i}.attn.{p}_proj.weight": TensorMeta((2,)) for i in range(100) for p in "qkv"}
    glued = parse_rules({"version": 1, "rules": [{"rename": {r"^layers\.(\d+)\.attn\.(q|k|v)_proj\.": r"blocks.\1.attn.w\2."}}]})
    fast = run_name_steps(leading_name_steps(glued.steps), source)
    assert fast.names[:3] == ["blocks.0.attn.wq.weight", "blocks.0.attn.wk.weight", "blocks.0.attn.wv.weight"]
    assert len(calls) == 3  # one per shape, not 300
    calls.clear()
    fused = parse_rules({"version": 1, "rules": [{"rename": {r"^layers\.(\d+)\.": r"layer\1."}}]})
    fast = run_name_steps(leading_name_steps(fused.steps), source)
    slow, _ = per_key([s for s, _ in leading_name_steps(fused.steps)], list(source))
    assert fast.names == [i.key for i in slow] and fast.names[0] == "layer0.attn.q_proj.weight"


def test_a_step_looks_only_at_shapes_holding_its_literal_text(monkeypatch):
    """1,000 keys without indices are 1,000 shapes: a rename runs on the few that hold its
    text, a keep drops the rest without looking at them."""
    calls = []
    original = Rename.name_map
    monkeypatch.setattr(Rename, "name_map", lambda self, key: calls.append(key) or original(self, key))
    source = {f"{head}.p{n}.weight": TensorMeta((2,)) for head in ("encoder", "decoder", "head") for n in "abcdefghij"}
    source |= {f"aux{n}x.weight": TensorMeta((2,)) for n in range(0, 970)}  # digits glued to a name: no index
    rules = parse_rules({"version": 1, "rules": [{"keep": ["^encoder\\.", "^decoder\\.", "^head\\."]}, {"rename": {r"^head\.": "classifier."}}]})
    fast = run_name_steps(leading_name_steps(rules.steps), source)
    assert sorted(calls) == sorted(k for k in source if k.startswith("head."))  # 10 of 1,000
    slow, slow_dropped = per_key([s for s, _ in leading_name_steps(rules.steps)], list(source))
    assert fast.names == [i.key for i in slow] and len(fast.dropped) == len(slow_dropped) == 970
