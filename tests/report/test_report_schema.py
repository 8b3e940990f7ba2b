"""The JSON Schema of Report.to_dict(): valid, shipped as package data, in step with
remap.report.records and with docs/report.md, and strict enough to reject broken reports."""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import json
import re
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from jsonschema import Draft202012Validator

from remap.report import records as report_module
from remap.report.render import format_report
from remap.report.records import (
    FAILURE_KINDS,
    REPORT_SCHEMA_VERSION,
    Failure,
    FreezeRecord,
    Report,
    SourceRecord,
    StepRecord,
    TargetRecord,
    Totals,
)
from tests.report.test_render import resnet50_report, small_report, transfer_report

DOC = Path(__file__).resolve().parents[2] / "docs" / "report.md"

# to_dict() keeps a few tuples (failure keys, batchnorm_modules) that JSON writes as arrays.
_TUPLE_ARRAYS = Draft202012Validator.TYPE_CHECKER.redefine(
    "array", lambda _checker, value: isinstance(value, (list, tuple))
)
DictValidator = jsonschema.validators.extend(Draft202012Validator, type_checker=_TUPLE_ARRAYS)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    text = importlib.resources.files("remap.report").joinpath("report.schema.json").read_text(encoding="utf-8")
    return json.loads(text)


def _errors(schema: dict[str, Any], instance: Any) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in DictValidator(schema).iter_errors(instance)]


def test_schema_is_valid_draft_2020_12(schema: dict[str, Any]) -> None:
    Draft202012Validator.check_schema(schema)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["properties"]["schema"] == {"const": REPORT_SCHEMA_VERSION, "description": schema["properties"]["schema"]["description"]}


# --------------------------------------------------------------- valid reports pass


def doc_example_report() -> Report:
    """The report shown in docs/report.md, built from the dataclasses."""
    steps = ("step 1 (strip_prefix)", "step 3 (add_prefix)")
    targets = (
        TargetRecord("backbone.conv1.weight", "loaded", (64, 3, 7, 7), "float32", "parameter", 9408,
                     sources=("module.conv1.weight",), steps=steps, source_shape=(64, 3, 7, 7), source_dtype="float16",
                     trainable=False),  # fmt: skip
        TargetRecord("backbone.bn1.running_mean", "loaded", (64,), "float32", "buffer", 64,
                     sources=("module.bn1.running_mean",), steps=steps, source_shape=(64,), source_dtype="float32"),  # fmt: skip
        TargetRecord("head.weight", "missing", (10, 2048), "float32", "parameter", 20480, declared=True, trainable=True),
    )
    sources = (
        SourceRecord("module.conv1.weight", "used", (64, 3, 7, 7), "float16", targets=("backbone.conv1.weight",),
                     final_key="backbone.conv1.weight"),  # fmt: skip
        SourceRecord("module.bn1.running_mean", "used", (64,), "float32", targets=("backbone.bn1.running_mean",),
                     final_key="backbone.bn1.running_mean"),  # fmt: skip
        SourceRecord("module.fc.weight", "dropped", (1000, 2048), "float32", final_key="fc.weight", step=2, step_kind="drop"),
        SourceRecord("module.aux.weight", "unused", (4,), "float32", final_key="backbone.aux.weight"),
    )
    where = "configs/transfer.yaml:{}:5"
    return Report(
        dry_run=True,
        source={"kind": "file", "path": "ckpt/resnet50.pth", "format": "torch-zip", "key": "state_dict",
                "key_detected": True, "files": 1, "factory": None, "entries": {"epoch": "90"}, "notes": [], "folder": None},  # fmt: skip
        target={"kind": "module", "class": "myproject.models.Detector", "factory": "myproject.models:Detector"},
        rules="configs/transfer.yaml",
        steps=(
            StepRecord(1, "strip_prefix", "strip_prefix 'module.'", 4, patterns=(("module.", 4),), where=where.format(4)),
            StepRecord(2, "drop", r"drop '^fc\.'", 1, patterns=((r"^fc\.", 1),), where=where.format(5)),
            StepRecord(3, "add_prefix", "add_prefix 'backbone.'", 3, patterns=(("backbone.", 3),), where=where.format(6)),
        ),
        targets=targets,
        sources=sources,
        failures=(
            Failure("unused", "1 source key(s) reach no target key and are not dropped or in expect.unused:\n  module.aux.weight",
                    ("module.aux.weight",)),  # fmt: skip
        ),
        warnings=("1 tensor(s) will be cast from float16 to float32 by load_state_dict",),
        totals=Totals(target_keys=3, loaded=2, missing=1, mismatched=0, source_keys=4, used=2, dropped=1, unused=1,
                      param_elements=29888, loaded_elements=9408, frozen_elements=9408, trainable_elements=20480,
                      frozen_params=1, trainable_params=1),  # fmt: skip
        freeze=FreezeRecord("frozen", ("backbone.bn1",)),
    )


def minimal_report() -> Report:
    """No keys at all, as a plan over two empty mappings would give."""
    return Report(dry_run=True, source={"kind": "metadata"}, target={"kind": "metadata", "keys": 0})


REPORTS = [small_report, transfer_report, resnet50_report, doc_example_report, minimal_report]


@pytest.mark.parametrize("make", REPORTS, ids=lambda f: f.__name__)
def test_to_dict_validates(schema: dict[str, Any], make) -> None:  # type: ignore[no-untyped-def]
    assert _errors(schema, make().to_dict()) == []


@pytest.mark.parametrize("make", REPORTS, ids=lambda f: f.__name__)
def test_json_round_trip_validates_with_the_plain_validator(schema: dict[str, Any], make) -> None:  # type: ignore[no-untyped-def]
    Draft202012Validator(schema).validate(json.loads(make().to_json()))


def test_empty_report_validates(schema: dict[str, Any]) -> None:
    Draft202012Validator(schema).validate(json.loads(Report.empty(dry_run=False).to_json()))
    assert _errors(schema, Report.empty(dry_run=True).to_dict()) == []


# ------------------------------------------------------------- broken reports fail


def _set(path: str, value: Any) -> Any:
    def mutate(d: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        for p in parents:
            d = d[int(p)] if isinstance(d, list) else d[p]
        if value is _DELETE:
            del d[last]
        else:
            d[last] = value

    return mutate


_DELETE = object()
_T = "targets/conv1.weight"
_S = "sources/module.extra.scale"

INVALID = [
    pytest.param(_set("schema", 2), id="schema version 2"),
    pytest.param(_set("ok", True), id="ok with failures"),
    pytest.param(_set("ok", "false"), id="ok not a bool"),
    pytest.param(_set("totals", _DELETE), id="totals missing"),
    pytest.param(_set("totals/loaded", -1), id="negative count"),
    pytest.param(_set("totals/loaded_fraction", 1.5), id="fraction above 1"),
    pytest.param(_set("failures/0/kind", "typo"), id="unknown failure kind"),
    pytest.param(_set("failures/0/keys", "module.extra.scale"), id="failure keys not a list"),
    pytest.param(_set("steps/0/index", 0), id="step index 0"),
    pytest.param(_set("steps/0/patterns", [["module.", 9]]), id="patterns as pairs"),
    pytest.param(_set("freeze/batchnorm", "train"), id="unknown batchnorm mode"),
    pytest.param(_set(f"{_T}/status", "partial"), id="unknown status"),
    pytest.param(_set(f"{_T}/kind", "param"), id="unknown tensor kind"),
    pytest.param(_set(f"{_T}/shape", [64, "3"]), id="shape with a string"),
    pytest.param(_set(f"{_T}/sources", []), id="loaded from nothing"),
    pytest.param(_set(f"{_T}/numel", _DELETE), id="target record without numel"),
    pytest.param(_set(f"{_T}/status", "mismatched"), id="mismatched without source_shape"),
    pytest.param(_set(f"{_T}/status", "tied"), id="tied without tied_to"),
    pytest.param(_set(f"{_T}/extra", 1), id="unknown field in a target record"),
    pytest.param(_set("targets/bn1.running_mean/trainable", True), id="trainable buffer"),
    pytest.param(_set(f"{_S}/fate", "lost"), id="unknown fate"),
    pytest.param(_set(f"{_S}/fate", "dropped"), id="dropped without its step"),
    pytest.param(_set(f"{_S}/fate", "used"), id="used without targets"),
    pytest.param(_set(f"{_S}/step", 0), id="step 0"),
    pytest.param(_set("source", "ckpt.pth"), id="source not an object"),
    pytest.param(_set("source/path", 3), id="source path not a string"),
    pytest.param(_set("warnings", ["ok", 3]), id="warning not a string"),
    pytest.param(_set("surprise", True), id="unknown top-level field"),
]


@pytest.mark.parametrize("mutate", INVALID)
def test_invalid_reports_fail(schema: dict[str, Any], mutate) -> None:  # type: ignore[no-untyped-def]
    d = json.loads(small_report().to_json())
    assert Draft202012Validator(schema).is_valid(d)
    mutate(d)
    assert not Draft202012Validator(schema).is_valid(d)


def test_failing_report_must_not_be_ok(schema: dict[str, Any]) -> None:
    d = json.loads(transfer_report().to_json())
    d["ok"] = False  # ok false with no failure
    assert not Draft202012Validator(schema).is_valid(d)


# ------------------------------------------------- the schema follows remap.report.records


def _record_properties(schema: dict[str, Any], name: str) -> set[str]:
    return set(schema["$defs"][name]["properties"])


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_top_level_matches_to_dict(schema: dict[str, Any]) -> None:
    keys = set(minimal_report().to_dict())
    assert set(schema["properties"]) == keys
    assert set(schema["required"]) == keys


@pytest.mark.parametrize(
    ("definition", "cls", "extra"),
    [
        ("target_record", TargetRecord, set()),
        ("source_record", SourceRecord, set()),
        ("step", StepRecord, set()),
        ("failure", Failure, set()),
        ("freeze", FreezeRecord, set()),
        ("totals", Totals, {"loaded_fraction"}),
    ],
)
def test_records_match_the_dataclasses(schema: dict[str, Any], definition: str, cls: type, extra: set[str]) -> None:
    expected = (_fields(cls) - {"key"}) | extra
    assert _record_properties(schema, definition) == expected
    assert set(schema["$defs"][definition]["required"]) == expected


def test_vocabularies_match_the_constants(schema: dict[str, Any]) -> None:
    defs = schema["$defs"]
    statuses = {report_module.LOADED, report_module.MISSING, report_module.MISMATCHED, report_module.TIED}
    fates = {report_module.USED, report_module.DROPPED, report_module.UNUSED, report_module.SKIPPED, report_module.DUPLICATE}
    assert set(defs["target_record"]["properties"]["status"]["enum"]) == statuses
    assert set(defs["source_record"]["properties"]["fate"]["enum"]) == fates
    assert defs["failure"]["properties"]["kind"]["enum"] == list(FAILURE_KINDS)


# ------------------------------------------------------- docs/report.md stays true


def _doc_block(lang: str) -> str:
    blocks = re.findall(rf"```{lang}\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert len(blocks) == 1, f"docs/report.md should hold one {lang} block"
    return blocks[0]


def test_doc_example_is_valid_and_matches_to_dict(schema: dict[str, Any]) -> None:
    example = json.loads(_doc_block("json"))
    Draft202012Validator(schema).validate(example)
    assert example == json.loads(doc_example_report().to_json())


def test_doc_text_is_what_format_report_prints() -> None:
    assert _doc_block("text").rstrip("\n") == format_report(doc_example_report())


def test_doc_names_every_field_and_word(schema: dict[str, Any]) -> None:
    doc = DOC.read_text(encoding="utf-8")
    words = set(schema["properties"]) | set(FAILURE_KINDS)
    for definition in ("target_record", "source_record", "step", "failure", "freeze", "totals"):
        words |= _record_properties(schema, definition)
    words |= set(schema["$defs"]["target_record"]["properties"]["status"]["enum"])
    words |= set(schema["$defs"]["source_record"]["properties"]["fate"]["enum"])
    undocumented = sorted(w for w in words if f"`{w}`" not in doc)
    assert undocumented == []


def test_invalid_mutations_start_from_a_copy() -> None:
    """Guard for the table above: mutating one parsed report never leaks into another."""
    d = json.loads(small_report().to_json())
    e = copy.deepcopy(d)
    _set("schema", 2)(e)
    assert d["schema"] == 1
