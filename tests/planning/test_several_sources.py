"""Several named sources in one plan, on metadata: `from:` steps, equal keys kept apart,
collisions across sources, the report naming each key's source; the joined Source."""

from __future__ import annotations

import json

import jsonschema
import pytest
import torch

import remap
from remap.errors import RulesError, UsageError
from remap.rules.parse import parse_rules
from remap.sources.combined import CombinedSource, namespaced, open_several, split_key
from remap.sources.readers import open_source

VISION = {"embeddings.weight": [4, 8], "encoder.0.weight": [8, 8], "head.weight": [2, 8]}
TEXT = {"embeddings.weight": [5, 8], "encoder.0.weight": [8, 8]}
TARGET = {"vision.embeddings.weight": [4, 8], "vision.encoder.0.weight": [8, 8],
          "text.embeddings.weight": [5, 8], "text.encoder.0.weight": [8, 8]}  # fmt: skip
TOWERS = [{"add_prefix": "vision.", "from": "vision"}, {"add_prefix": "text.", "from": "text"}, {"drop": "head"}]


def plan(steps, sources=None, target=None, **rules):
    return remap.plan(target or TARGET, sources or {"vision": open_source(VISION), "text": open_source(TEXT)},
                      {"version": 1, "rules": steps, **rules})  # fmt: skip


def schema() -> dict:
    from importlib import resources

    return json.loads(resources.files("remap.report").joinpath("report.schema.json").read_text())


def test_from_steps_keep_equal_keys_apart():
    p = plan(TOWERS)
    assert p.ok, p.failures
    got = {a.target: a.sources for a in p.assignments}
    assert got == {"vision.embeddings.weight": ("vision:embeddings.weight",), "vision.encoder.0.weight": ("vision:encoder.0.weight",),
                   "text.embeddings.weight": ("text:embeddings.weight",), "text.encoder.0.weight": ("text:encoder.0.weight",)}  # fmt: skip
    counts = [s.matched for s in p.report.steps]
    assert counts == [3, 2, 1]  # each from-step saw its source's keys; drop saw all
    assert "from source 'vision'" in p.report.steps[0].summary


def test_the_report_names_the_source_of_every_key_json_and_text():
    report = plan(TOWERS).report
    data = json.loads(report.to_json())
    jsonschema.validate(data, schema())
    assert {k: v["source"] for k, v in data["sources"].items()} == {
        "vision:embeddings.weight": "vision", "vision:encoder.0.weight": "vision", "vision:head.weight": "vision",
        "text:embeddings.weight": "text", "text:encoder.0.weight": "text"}  # fmt: skip
    assert data["sources"]["vision:head.weight"]["fate"] == "dropped"
    text = str(report)
    vision_at, text_at = text.index("from vision: 3 keys"), text.index("from text: 2 keys")
    assert vision_at < text.index("head.weight", vision_at) < text_at  # the dropped key is listed under its source


def test_single_source_reports_have_no_source_names():
    p = remap.plan({"w": [2]}, {"w": [2]})
    assert [r.source for r in p.report.sources] == [None]
    jsonschema.validate(json.loads(p.report.to_json()), schema())


def test_a_collision_across_sources_fails_naming_both_sources_and_keys():
    p = plan([{"drop": "head"}], target={"embeddings.weight": [4, 8], "encoder.0.weight": [8, 8]})
    collisions = [f for f in p.failures if f.kind == "collision"]
    assert len(collisions) == 2
    assert "'embeddings.weight' of source 'vision' and 'embeddings.weight' of source 'text' both become 'embeddings.weight'" in collisions[0].message
    assert set(collisions[0].keys) == {"vision:embeddings.weight", "text:embeddings.weight"}
    rec = p.report.source_record("text:embeddings.weight")
    assert rec.fate == "unused" and "collision" in rec.note


def test_a_collision_after_renaming_fails_too():
    steps = [{"rename": {"^embeddings": "emb"}, "from": "vision"}, {"rename": {"^embeddings": "emb"}, "from": "text"}, {"drop": "head"}]
    p = plan(steps, target={"emb.weight": [4, 8], "encoder.0.weight": [8, 8]})
    assert any(f.kind == "collision" and "'emb.weight'" in f.message and "source 'text'" in f.message for f in p.failures)


def test_a_collision_within_one_source_fails_at_its_step():
    p = plan([{"rename": {"^(embeddings|encoder\\.0)\\.": "x."}, "from": "vision"}, {"drop": "head"}, {"add_prefix": "text.", "from": "text"}])
    collision = next(f for f in p.failures if f.kind == "collision")
    assert collision.message.startswith("step 1 (rename)") and "'vision:embeddings.weight'" in collision.message


def test_a_step_without_from_on_shared_names_runs_per_source_and_matches_over_all():
    # `rename` without `from` while both sources hold `embeddings.weight`: each source's keys apart,
    # and a pattern that only vision's keys match is no "matched no key" failure
    steps = [{"rename": {"^head\\.": "classifier."}}, *TOWERS[:2]]
    p = plan(steps, target={**TARGET, "vision.classifier.weight": [2, 8]})
    assert p.ok, p.failures
    assert p.report.steps[0].matched == 1
    unmatched = plan([{"rename": {"^nothing\\.": "x."}}, *TOWERS], target=TARGET)
    assert [f.kind for f in unmatched.failures] == ["unmatched_step"]


def test_a_from_step_sees_only_its_source():
    # text has no head: a `drop` of head from text matched nothing there, whatever vision holds
    p = plan([*TOWERS[:2], {"drop": "head", "from": "text"}])
    assert any(f.kind == "unmatched_step" and "step 3 (drop)" in f.message for f in p.failures)


def test_a_cross_source_merge_is_possible_where_names_differ():
    sources = {"base": open_source({"w": [2, 4]}), "extra": open_source({"v": [2, 4]})}
    steps = [{"merge": {"match": "^(w|v)$", "into": "wv", "order": ["w", "v"], "dim": 0}}]
    p = plan(steps, sources=sources, target={"wv": [4, 4]})
    assert p.ok, p.failures
    assert p.assignments[0].sources == ("base:w", "extra:v")


def test_from_names_must_exist():
    with pytest.raises(RulesError, match="no source 'visoin' \\(did you mean 'vision'\\?\\)"):
        parse_rules({"version": 1, "sources": {"vision": {"path": "a"}}, "rules": [{"drop": "x", "from": "visoin"}]})
    with pytest.raises(RulesError, match="`from: vision` names no source; the sources are: a, b"):
        plan([{"drop": "x", "from": "vision"}], sources={"a": open_source(VISION), "b": open_source(TEXT)})
    with pytest.raises(RulesError, match="there is one source"):
        remap.plan(TARGET, VISION, {"version": 1, "rules": [{"drop": "head", "from": "vision"}]})


def test_source_and_sources_exclude_each_other():
    with pytest.raises(RulesError, match="exclude each other"):
        parse_rules("version: 1\nsource: {path: a}\nsources: {b: {path: c}}\n", filename="r.yaml")
    with pytest.raises(RulesError, match="r.yaml:2:10: sources: expected a source name"):
        parse_rules("version: 1\nsources: {'a:b': {path: c}}\n", filename="r.yaml")


def test_rules_sources_open_relative_to_the_rules_file(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "a.safetensors")
    save_file({"w": torch.zeros(3)}, tmp_path / "b.safetensors")
    rules = tmp_path / "r.yaml"
    rules.write_text("version: 1\nsources:\n  a: {path: a.safetensors}\n  b: {path: b.safetensors}\n"
                     "rules:\n  - add_prefix: a.\n    from: a\n  - add_prefix: b.\n    from: b\n")  # fmt: skip
    target = torch.nn.ModuleDict({"a": torch.nn.Module(), "b": torch.nn.Module()})
    target["a"].w = torch.nn.Parameter(torch.zeros(2))
    target["b"].w = torch.nn.Parameter(torch.ones(3))
    report = remap.load(target, rules=rules)
    assert report.ok and torch.equal(target["a"].w.detach(), torch.ones(2)) and torch.equal(target["b"].w.detach(), torch.zeros(3))
    # one named source overridden, the other from the rules
    save_file({"w": torch.full((3,), 7.0)}, tmp_path / "c.safetensors")
    remap.load(target, {"b": str(tmp_path / "c.safetensors")}, rules=rules)
    assert torch.equal(target["b"].w.detach(), torch.full((3,), 7.0))
    with pytest.raises(UsageError, match="no source 'c'"):
        remap.plan(target, {"c": str(tmp_path / "c.safetensors")}, rules)
    with pytest.raises(UsageError, match="several sources"):
        remap.plan(target, str(tmp_path / "c.safetensors"), rules)


def test_combined_source_delegates_reads_and_closes_all():
    closed = []

    class Tracked(type(open_source({"w": torch.zeros(1)}))):
        def close(self):
            closed.append(self)

    a = Tracked({"w": torch.arange(3.0)}, {"kind": "state_dict"})
    b = Tracked({"w": torch.arange(2.0)}, {"kind": "state_dict"})
    src = CombinedSource({"a": a, "b": b})
    assert list(src.meta) == ["a:w", "b:w"]
    assert torch.equal(src.read("b:w"), torch.arange(2.0)) and src.origin("a:w") == ("a", "w")
    assert src.requires_grad is None
    src.close()
    assert closed == [a, b]
    assert split_key(namespaced("x", "k:with:colons")) == ("x", "k:with:colons")


def test_open_several_closes_what_it_opened_when_one_fails():
    closed = []

    def opener(name, value):
        if value is None:
            raise UsageError(f"{name} is missing")
        src = open_source(value)
        src.close = lambda: closed.append(name)  # type: ignore[method-assign]
        return src

    with pytest.raises(UsageError, match="b is missing"):
        open_several({"a": {"w": [1]}, "b": None}, opener)
    assert closed == ["a"]
    with pytest.raises(UsageError, match="a source name"):
        open_several({"a:b": {"w": [1]}})


def test_metadata_sources_plan_without_tensors():
    p = remap.plan(TARGET, {"vision": open_source(VISION), "text": open_source(TEXT)}, {"version": 1, "rules": TOWERS})
    assert p.ok and p.report.source["kind"] == "several"
    assert set(p.report.source["sources"]) == {"vision", "text"}
