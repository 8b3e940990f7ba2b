"""Issue 12, item 4: planning and inspecting a checkpoint of very many keys stays
near-linear. Timing is never asserted here (benchmarks/scale.py measures it); these tests
pin what makes it linear — work done once per key, not per key pair, and the per-object
JSON hook not run on a header without duplicates — and that every check the faster paths
skip still holds at 10**5 keys: duplicate header keys refused, tied and overlapping target
tensors found exactly, a changed module told apart from its plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import remap
import remap.meta
import remap.sources.readers
import remap.sources.safetensors_reader
from remap.errors import SourceError, TargetError, UsageError
from remap.meta import TargetMeta, target_meta_of_module
from remap.sources.readers import open_source

pytestmark = pytest.mark.hostile

N = 100_000


def write_safetensors(path: Path, header_text: str, data: bytes) -> Path:
    """A safetensors file whose header is exactly ``header_text`` (duplicates and all)."""
    raw = header_text.encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(len(raw).to_bytes(8, "little") + raw + data)
    return path


def entries(names: list[str]) -> list[str]:
    """One ``"name": {F32, [1], offsets}`` JSON member per name, 4 bytes each, in order; a
    name is written as it is given (``\\u003a`` stays an escape in the JSON text)."""
    return [f'"{n}": {{"dtype": "F32", "shape": [1], "data_offsets": [{4 * i}, {4 * i + 4}]}}'
            for i, n in enumerate(names)]  # fmt: skip


def header(members: list[str]) -> str:
    return "{" + ", ".join(members) + "}"


@pytest.fixture
def hook_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the calls of ``object_pairs_hook=_unique_keys`` (one per JSON object parsed with it)."""
    calls: list[int] = []
    real = remap.sources.safetensors_reader._unique_keys

    def counting(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        calls.append(len(pairs))
        return real(pairs)

    monkeypatch.setattr(remap.sources.safetensors_reader, "_unique_keys", counting)
    return calls


# --------------------------------------------------------------------------- safetensors headers


def test_a_large_header_without_duplicates_never_calls_the_per_object_hook(tmp_path, hook_calls):
    names = [f"layers.{i}.w" for i in range(N)]
    path = write_safetensors(tmp_path / "big.safetensors", header(['"__metadata__": {"format": "pt"}', *entries(names)]),
                             bytes(4 * N))  # fmt: skip
    src = open_source(path)
    assert list(src.meta) == names and src.meta["layers.7.w"].shape == (1,)
    assert hook_calls == []


def test_colons_in_names_and_metadata_still_skip_the_hook(tmp_path, hook_calls):
    names = [f"a:{i}::w" for i in range(1000)]
    meta = '"__metadata__": {"format": "pt", "note": "k: v"}'
    path = write_safetensors(tmp_path / "colons.safetensors", header([meta, *entries(names)]), bytes(4 * 1000))
    src = open_source(path)
    assert list(src.meta) == names and remap.sources.safetensors_reader._read_safetensors_header(path)[1] == {"format": "'pt'", "note": "'k: v'"}
    assert hook_calls == []


DUPLICATES = {
    # (members, the key named twice)
    "top-level, last of many": (entries([f"k{i}" for i in range(N)] + ["k5"]), "k5"),
    "inside an entry": (['"a": {"dtype": "F32", "dtype": "F32", "shape": [1], "data_offsets": [0, 4]}'], "dtype"),
    "in the metadata": (['"__metadata__": {"x": "1", "x": "2"}', *entries(["a"])], "x"),
    "names with colons": (entries([f"n:{i}" for i in range(1000)] + ["n:3"]), "n:3"),
    # \u003a parses as ':' without being a ':' in the text: a count of parsed colons must not hide the duplicate
    "an escaped colon elsewhere": (entries(["a\\u003ab", "c", "c"]), "c"),
    # one key lost to the duplicate, one colon gained from the escape: the counts would balance
    "a duplicate offset by an escaped colon": (['"__metadata__": {"x": "1", "x": "2"}', *entries(["a\\u003ab"])], "x"),
    "escaped colons in the key itself": (entries(["x\\u003a", "x\\u003a", "y"]), "x:"),
    "nested deeper than an entry": (['"__metadata__": {"o": {"p": 1, "p": 2}}', *entries(["a"])], "p"),
}  # fmt: skip


@pytest.mark.parametrize("case", DUPLICATES)
def test_a_key_named_twice_is_refused_at_any_depth_and_size(tmp_path, case):
    members, twice = DUPLICATES[case]
    count = sum(1 for m in members if '"data_offsets"' in m)
    path = write_safetensors(tmp_path / "dup.safetensors", header(members), bytes(4 * count))
    with pytest.raises(SourceError) as info:
        open_source(path)
    assert str(info.value) == f"{path}: the safetensors header is not valid JSON: the key {twice!r} appears twice"
    assert info.value.exit_code == 3


def test_a_syntax_error_after_a_duplicate_reports_the_duplicate_as_before(tmp_path):
    path = write_safetensors(tmp_path / "both.safetensors", '{"a": 1, "a": 2} trailing', b"")
    with pytest.raises(SourceError, match="the key 'a' appears twice$"):
        remap.sources.safetensors_reader._read_safetensors_header(path)


# Keys from a small alphabet (so they repeat), written raw or with \u escapes, with values
# that may be strings holding colons or objects with keys of their own.
KEY = st.text(alphabet="ab:\\\"", max_size=3)
LEAF = st.one_of(st.integers(0, 3), KEY, st.lists(st.integers(0, 3), max_size=2))
VALUE = st.recursive(LEAF, lambda inner: st.lists(st.tuples(KEY, st.booleans(), inner), max_size=4), max_leaves=8)


def to_text(value: Any) -> str:
    """JSON text of ``value``: a list of (key, escape it?, value) is an object (keys may repeat)."""
    if isinstance(value, list) and all(isinstance(m, tuple) for m in value) and value:
        return "{" + ",".join(f"{json.dumps(k, ensure_ascii=False) if not esc else _escaped(k)}:{to_text(v)}"
                              for k, esc, v in value) + "}"  # fmt: skip
    return json.dumps(value, ensure_ascii=False)


def _escaped(key: str) -> str:
    return '"' + "".join(f"\\u{ord(c):04x}" for c in key) + '"'


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(st.lists(st.tuples(KEY, st.booleans(), VALUE), min_size=1, max_size=6))
def test_fuzz_the_header_parser_agrees_with_the_per_object_hook(members):
    """Whatever the keys (repeated, escaped, holding colons) and however deep the objects,
    the fast parse returns what the hook returns, or raises what it raises."""
    raw = to_text(members).encode()
    try:
        expected: Any = json.loads(raw.decode(), object_pairs_hook=remap.sources.readers._unique_keys)
    except ValueError as exc:
        expected = ("error", str(exc))
    try:
        got: Any = remap.sources.safetensors_reader._load_header_json(raw)
    except ValueError as exc:
        got = ("error", str(exc))
    assert got == expected


# --------------------------------------------------------------------------- target modules


class Many(nn.Module):
    """``n`` one-element parameters as disjoint views of one storage (the overlap check's
    hardest layout), every ``tie_every``-th registered again under ``tied<i>``, and
    ``extra`` buffers added as given."""

    def __init__(self, n: int, tie_every: int = 0, extra: dict[str, torch.Tensor] | None = None) -> None:
        super().__init__()
        self.flat = torch.zeros(n)
        self._parameters.update({f"p{i}": nn.Parameter(self.flat[i : i + 1]) for i in range(n)})
        if tie_every:
            self._parameters.update({f"tied{i}": self._parameters[f"p{i}"] for i in range(0, n, tie_every)})
        for name, t in (extra or {}).items():
            self.register_buffer(name, t)


def test_target_meta_of_a_module_does_constant_work_per_key(monkeypatch):
    calls = {"identity": 0, "dtype_name": 0}
    real_identity, real_dtype_name = remap.meta._identity, remap.meta.dtype_name

    def identity(tensor: torch.Tensor) -> Any:
        calls["identity"] += 1
        return real_identity(tensor)

    def dtype_name(dtype: Any) -> str:
        calls["dtype_name"] += 1
        return real_dtype_name(dtype)

    monkeypatch.setattr(remap.meta, "_identity", identity)
    monkeypatch.setattr(remap.meta, "dtype_name", dtype_name)
    m = Many(N, tie_every=100, extra={"halves": torch.zeros(3, dtype=torch.float16)})
    meta = target_meta_of_module(m)
    keys = list(m.state_dict(keep_vars=True))
    assert list(meta) == keys
    assert calls == {"identity": len(keys), "dtype_name": 2}  # once per key; once per distinct dtype


def test_tied_aliases_are_found_exactly_among_many_keys():
    m = Many(N, tie_every=97)
    meta = target_meta_of_module(m)
    # the reference: torch's own names for one parameter object, in state_dict order
    first: dict[int, str] = {}
    for name, p in m.named_parameters(remove_duplicate=False):
        first.setdefault(id(p), name)
    expected = {name: (first[id(p)] if first[id(p)] != name else None) for name, p in m.named_parameters(remove_duplicate=False)}
    assert {k: v.tied_to for k, v in meta.items()} == expected
    assert sum(v.tied_to is not None for v in meta.values()) == len(range(0, N, 97))
    assert meta["p5"] == TargetMeta((1,), "float32", "parameter", True)
    assert meta["tied97"] == TargetMeta((1,), "float32", "parameter", True, "p97")


@pytest.mark.parametrize(("view", "pair"), [
    ((N // 2, N // 2 + 2), (f"p{N // 2}", "ov")),  # two elements: one parameter and the next
    ((N - 2, N), (f"p{N - 2}", "ov")),  # the last two parameters' elements
])  # fmt: skip
def test_one_overlapping_view_among_many_disjoint_ones_is_named(view, pair):
    m = Many(N)
    m.register_buffer("ov", m.flat[view[0] : view[1]])
    with pytest.raises(TargetError) as info:
        target_meta_of_module(m)
    assert str(info.value).startswith(f"target: target keys {pair[0]!r} and {pair[1]!r} overlap in memory without being one tensor")


def test_a_second_view_of_exactly_one_parameter_is_that_parameter_tied():
    m = Many(N)
    m.register_buffer("same", m.flat[N - 1 : N])  # another tensor object, the same memory, shape and strides
    meta = target_meta_of_module(m)
    assert meta["same"] == TargetMeta((1,), "float32", "buffer", False, f"p{N - 1}")


def test_many_disjoint_views_and_empty_and_meta_tensors_are_not_overlaps():
    m = Many(N, extra={"empty": torch.zeros(0), "empty2": torch.zeros(0)})
    meta = target_meta_of_module(m)
    assert len(meta) == N + 2 and all(v.tied_to is None for v in meta.values())
    with torch.device("meta"):
        lin = nn.Linear(3, 3)
    assert target_meta_of_module(lin)["weight"] == TargetMeta((3, 3), "float32", "parameter", True)


# --------------------------------------------------------------------------- the dry run's module check


class WithExtraState(Many):
    def get_extra_state(self) -> Any:
        return {"step": 1}

    def set_extra_state(self, state: Any) -> None:
        pass


def test_a_dry_run_tells_a_changed_module_from_its_plan_among_many_keys():
    m = Many(1000)
    plan = remap.plan(m, {k: (1,) for k in m.state_dict()}, {"version": 1})
    assert plan.apply(m, dry_run=True).ok
    m.p7 = nn.Parameter(torch.zeros(2))
    with pytest.raises(UsageError) as info:
        plan.apply(m, dry_run=True)
    assert str(info.value) == "the module is not the target this plan was made for: shapes differ: p7: planned [1], module [2]"
    m.p7 = nn.Parameter(torch.zeros(1))
    m.register_buffer("new", torch.zeros(1))
    del m._parameters["p9"]
    with pytest.raises(UsageError) as info:
        plan.apply(m, dry_run=True)
    assert str(info.value) == "the module is not the target this plan was made for: keys not in the plan: new; planned keys the module lacks: p9"


def test_a_dry_run_leaves_extra_state_out_of_the_key_check():
    m = WithExtraState(1000)
    assert "_extra_state" in m.state_dict()
    plan = remap.plan(m, {k: (1,) for k in m.state_dict() if k != "_extra_state"}, {"version": 1})
    assert plan.apply(m, dry_run=True).ok


# --------------------------------------------------------------------------- records


def test_records_of_many_keys_have_each_its_own_status():
    n = N
    src = {f"m.k{i}": (1,) for i in range(n)}
    src.update({f"m.bad{i}": (2,) for i in range(10)})
    tgt: dict[str, Any] = {f"k{i}": TargetMeta((1,)) for i in range(n)}
    tgt.update({f"bad{i}": TargetMeta((3,)) for i in range(10)})
    tgt.update({f"gone{i}": TargetMeta((1,)) for i in range(10)})
    tgt.update({f"alias{i}": TargetMeta((1,), tied_to=f"k{i}") for i in range(10)})
    rules = {"version": 1, "rules": [{"strip_prefix": "m."}], "shapes": "skip",
             "expect": {"missing": ["bad*", "gone*"], "unused": ["m.bad*"]}}  # fmt: skip
    plan = remap.plan(tgt, src, rules)
    statuses = {r.key: r.status for r in plan.report.targets}
    expected = {k: "loaded" for k in tgt}
    expected.update({f"bad{i}": "mismatched" for i in range(10)})
    expected.update({f"gone{i}": "missing" for i in range(10)})
    expected.update({f"alias{i}": "tied" for i in range(10)})
    assert statuses == expected
    rec = plan.report.target_record("k123")
    assert (rec.sources, rec.steps, rec.source_shape) == (("m.k123",), ("step 1 (strip_prefix)",), (1,))
    assert plan.report.target_record("bad3").sources == ("m.bad3",) and plan.report.target_record("bad3").declared
    assert plan.report.target_record("alias4").tied_to == "k4"
    assert len(plan.report.sources) == n + 10
