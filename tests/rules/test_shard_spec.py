"""``target.shard`` parsed (remap.rules.shard_spec, through parse_rules): good specs, and every
error, pinned whole (file, line, column, the field, what was found and what was expected)."""

from __future__ import annotations

from typing import Any

import pytest

from remap.errors import RulesError
from remap.rules.parse import TargetSpec, parse_rules
from remap.rules.shard_spec import ShardSpec, ShardSpecError


def _shard(text: str) -> ShardSpec | None:
    return parse_rules(f"version: 1\ntarget:\n  shard: {text}\n", filename="r.yaml").target.shard


def test_a_block_style_shard_section_parses_with_the_rest_of_the_target() -> None:
    text = """version: 1
target:
  model: mypkg.models:build
  device: meta
  shard:
    mesh: {dp: 2, tp: 2}
    tp:
      'layers\\.\\d+\\.attn\\.q': colwise
      'layers\\.\\d+\\.attn\\.o': rowwise
    fsdp: ['layers\\.\\d+', '']
"""
    target = parse_rules(text).target
    assert target == TargetSpec(model="mypkg.models:build", device="meta", shard=ShardSpec(
        mesh=(("dp", 2), ("tp", 2)), tp=((r"layers\.\d+\.attn\.q", "colwise"), (r"layers\.\d+\.attn\.o", "rowwise")),
        fsdp=True, fsdp_modules=(r"layers\.\d+", "")))  # fmt: skip


@pytest.mark.parametrize(
    "text, spec, shape",
    [
        ("{fsdp: true}", ShardSpec(fsdp=True), (("dp", 8),)),
        ("{fsdp: 'layers\\.\\d+', mesh: [8]}", ShardSpec((("dp", 8),), fsdp=True, fsdp_modules=(r"layers\.\d+",)), (("dp", 8),)),
        ("{tp: {q: colwise, o: rowwise}}", ShardSpec(tp=(("q", "colwise"), ("o", "rowwise"))), (("tp", 8),)),
        ("{tp: {q: colwise}, mesh: [8]}", ShardSpec((("tp", 8),), tp=(("q", "colwise"),)), (("tp", 8),)),
        ("{tp: {q: colwise}, fsdp: true, mesh: {tp: 4, dp: 2}}",  # the order given: tp outermost
         ShardSpec((("tp", 4), ("dp", 2)), tp=(("q", "colwise"),), fsdp=True), (("tp", 4), ("dp", 2))),
        ("{tp: {q: colwise}, fsdp: false}", ShardSpec(tp=(("q", "colwise"),)), (("tp", 8),)),
    ],
)  # fmt: skip
def test_good_specs(text: str, spec: ShardSpec, shape: tuple[tuple[str, int], ...]) -> None:
    assert _shard(text) == spec
    assert spec.mesh_shape(8) == shape


def test_no_shard_section_is_none() -> None:
    assert parse_rules("version: 1\ntarget: {model: 'a:b'}\n").target.shard is None


def test_describe() -> None:
    assert _shard("{tp: {'a\\.b': colwise}, fsdp: ['x', ''], mesh: {dp: 2, tp: 2}}").describe() == (
        "{dp: 2, tp: 2}, tp: 'a\\.b' colwise, fsdp: 'x', ''")


NEEDS = "say how to shard: fsdp (module patterns, or true), tp (module pattern -> colwise | rowwise), or both"
TWO_D = "fsdp and tp together need a 2-D mesh that names its dims, such as mesh: {dp: 2, tp: 2}"
DIMS = "expected dp (the dim fsdp shards over) or tp (the dim tensor parallelism shards over)"


@pytest.mark.parametrize(
    "text, message",
    [
        ("{}", f"r.yaml:3:10: target: field 'shard': {NEEDS}"),
        ("{fsdp: false}", f"r.yaml:3:10: target: field 'shard': {NEEDS}"),
        ("[1]", "r.yaml:3:10: target: field 'shard': expected a mapping, found a list [1]"),
        ("{fsdp: true, mseh: [2]}",
         "r.yaml:3:23: target: field 'shard': unknown field 'mseh' (did you mean 'mesh'?); expected one of: mesh, tp, fsdp"),
        ("{fsdp: true, mesh: [2, 2]}",
         "r.yaml:3:29: target: field 'shard.mesh': a list gives one unnamed dim, such as [4]; found a list [2, 2]: name the dims "
         "of a 2-D mesh, such as {dp: 2, tp: 2}"),
        ("{fsdp: true, mesh: [-1]}",
         "r.yaml:3:30: target: field 'shard.mesh': item 1: expected a positive number of ranks, found an integer -1"),
        ("{fsdp: true, mesh: [2.0]}",
         "r.yaml:3:30: target: field 'shard.mesh': item 1: expected a positive number of ranks, found a number 2.0"),
        ("{fsdp: true, mesh: {dp: true}}",
         "r.yaml:3:34: target: field 'shard.mesh.dp': expected a positive number of ranks, found a boolean True"),
        ("{fsdp: true, mesh: 4}",
         "r.yaml:3:29: target: field 'shard.mesh': expected a mesh such as [4] or {dp: 2, tp: 2}, found an integer 4"),
        ("{fsdp: true, mesh: [99999999]}",
         "r.yaml:3:29: target: field 'shard.mesh': the mesh holds 99999999 ranks; expected at most 1048576"),
        ("{fsdp: true, mesh: {pp: 2}}", f"r.yaml:3:30: target: field 'shard.mesh': unknown mesh dim 'pp'; {DIMS}"),
        ("{fsdp: true, mesh: {dpp: 2}}",
         f"r.yaml:3:30: target: field 'shard.mesh': unknown mesh dim 'dpp' (did you mean 'dp'?); {DIMS}"),
        ("{tp: {q: colwise}, mesh: {dp: 2}}",
         "r.yaml:3:35: target: field 'shard.mesh': tp needs a 'tp' dim in the mesh; found dims: dp"),
        ("{fsdp: true, tp: {q: colwise}, mesh: {tp: 2}}",
         "r.yaml:3:47: target: field 'shard.mesh': fsdp needs a 'dp' dim in the mesh; found dims: tp"),
        ("{tp: {q: colwise}, mesh: {dp: 2, tp: 2}}",
         "r.yaml:3:36: target: field 'shard.mesh': the mesh has a 'dp' dim but no fsdp uses it: add fsdp, or remove the dim"),
        ("{fsdp: true, mesh: {dp: 2, tp: 2}}",
         "r.yaml:3:37: target: field 'shard.mesh': the mesh has a 'tp' dim but no tp uses it: add tp, or remove the dim"),
        ("{fsdp: true, tp: {q: colwise}, mesh: [4]}", f"r.yaml:3:47: target: field 'shard.mesh': {TWO_D}"),
        ("{fsdp: true, tp: {q: colwise}}", f"r.yaml:3:10: target: field 'shard': {TWO_D}"),
        ("{tp: {'layers\\.\\d+\\.q': colwse}}",
         "r.yaml:3:34: target: field 'shard.tp': module 'layers\\.\\d+\\.q': expected one of: colwise, rowwise; found a string "
         "'colwse' (did you mean 'colwise'?)"),
        ("{tp: {q: 1}}",
         "r.yaml:3:19: target: field 'shard.tp': module 'q': expected one of: colwise, rowwise; found an integer 1"),
        ("{tp: {0: colwise}}", "r.yaml:3:16: target: field 'shard.tp': a module pattern is a string, found an integer 0"),
        ("{tp: {'(': colwise}}", "r.yaml:3:16: target: field 'shard.tp': bad regex '(': missing ) at position 1"),
        ("{tp: [q]}",
         "r.yaml:3:15: target: field 'shard.tp': expected a mapping of module patterns to colwise or rowwise, found a list ['q']"),
        ("{tp: {}}",
         "r.yaml:3:15: target: field 'shard.tp': expected a mapping of module patterns to colwise or rowwise, found a mapping {}"),
        ("{fsdp: [1]}", "r.yaml:3:18: target: field 'shard.fsdp': item 1: expected a string, found an integer 1"),
        ("{fsdp: []}", "r.yaml:3:17: target: field 'shard.fsdp': expected a non-empty list, found a list []"),
        ("{fsdp: ['a', '(']}", "r.yaml:3:23: target: field 'shard.fsdp': item 2: bad regex '(': missing ) at position 1"),
        ("{fsdp: ['a', 'a']}", "r.yaml:3:23: target: field 'shard.fsdp': item 2: the module pattern 'a' is listed twice"),
        ("{fsdp: 3}",
         "r.yaml:3:17: target: field 'shard.fsdp': expected true, or a list of module patterns such as ['layers\\.\\d+', ''], "
         "found an integer 3"),
    ],
)  # fmt: skip
def test_errors_name_the_line_the_field_what_was_found_and_expected(text: str, message: str) -> None:
    with pytest.raises(RulesError) as err:
        _shard(text)
    assert str(err.value) == message


def test_a_dict_from_python_gets_the_same_errors() -> None:
    with pytest.raises(RulesError) as err:
        parse_rules({"version": 1, "target": {"shard": {"fsdp": True, "mesh": {"dp": 0}}}})
    assert str(err.value) == "<rules>: target: field 'shard.mesh.dp': expected a positive number of ranks, found an integer 0"


@pytest.mark.parametrize(
    "value, message, at",
    [
        ([1], "expected a mapping with fsdp, tp and mesh, found a list [1]", ()),
        ({"fsdp": True, "tp": {"q": "colwise"}}, TWO_D, ()),
        ({"fsdp": True, "mesh": "4"}, "expected a mesh such as [4] or {dp: 2, tp: 2}, found a string '4'", ("mesh",)),
        ({"fsdp": (r"layers\.\d+", ""), "mesh": (2, 2)}, "a list gives one unnamed dim, such as [4]; found tuple (2, 2): name "
         "the dims of a 2-D mesh, such as {dp: 2, tp: 2}", ("mesh",)),
    ],
)
def test_shard_spec_parse_from_python(value: Any, message: str, at: tuple[Any, ...]) -> None:
    with pytest.raises(ShardSpecError) as err:
        ShardSpec.parse(value)
    assert (str(err.value), err.value.at) == (message, at)
    spec = ShardSpec(fsdp=True)
    assert ShardSpec.parse(spec) is spec
    assert ShardSpec.parse({"fsdp": ("a", ""), "mesh": (2,)}) == ShardSpec((("dp", 2),), fsdp=True, fsdp_modules=("a", ""))
