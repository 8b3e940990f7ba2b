"""Hostile rules, ops and planning at scale (issue 12, items 2, 4, 5, 6 and 10 on the rules side).

Every test builds its hostile input itself, in ``tmp_path`` or in memory, and runs it the
way an attacker would: a crafted checkpoint header with a rules file (item 2), crafted
keys under a catastrophic pattern (item 5), a rules "file" that is a FIFO, a device or
too long (item 6), and values that Python cannot print or torch cannot hold (item 10).
Subprocesses have timeouts; memory is measured with ``resource.getrusage`` in the child.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import remap
import remap.rules.patterns
from remap.errors import RemapError, RulesError, UsageError
from remap.meta import TargetMeta, TensorMeta, source_meta
from remap.planning.planner import make_plan
from remap.rules.parse import MAX_RULES_BYTES, load_rules, parse_rules

pytestmark = pytest.mark.hostile

SUBPROCESS_TIMEOUT = 120  # seconds; every child gets one


def _safetensors(path: Path, tensors: dict[str, tuple[str, list[int]]]) -> Path:
    """A safetensors file of empty tensors (shapes with a 0 in them: no data bytes), the
    header written by hand, as an attacker would."""
    header: dict[str, Any] = {}
    for key, (dtype, shape) in tensors.items():
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [0, 0]}
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw)
    return path


def _run(args: list[str], cwd: Path, timeout: float = SUBPROCESS_TIMEOUT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(cwd), *filter(None, [os.environ.get("PYTHONPATH")])])}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


# --------------------------------------------------------------------------- item 2: ops at plan time

RSS_SCRIPT = """
import sys
import remap
def PEAK_MB():  # this process's own peak (VmHWM); ru_maxrss would include the forking parent's pages
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:"))
plan = remap.plan({"a": [10, 0]}, sys.argv[1], sys.argv[2])
print(plan.ok, PEAK_MB())
"""


@pytest.mark.parametrize("size", [2**28, 2**34, 2**62])
def test_a_slice_of_a_huge_empty_dim_plans_without_listing_it(tmp_path: Path, size: int) -> None:
    """80 bytes of header and a slice rule took 32 s and 10.8 GB (``list(range(size))``);
    with 2**34, exit 4. Planning computes the slice by arithmetic: the child stays small."""
    ckpt = _safetensors(tmp_path / "a.safetensors", {"a": ("F32", [size, 0])})
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nrules:\n  - slice: {match: '^a$', dim: 0, start: 0, stop: 10}\n")
    done = _run(["-c", RSS_SCRIPT, str(ckpt), str(rules)], tmp_path)
    assert done.returncode == 0, done.stderr
    ok, rss_mb = done.stdout.split()
    assert ok == "True"
    assert int(rss_mb) < 1024, f"planning a slice of a [{size}, 0] tensor peaked at {rss_mb} MB"


def test_a_slice_of_a_huge_empty_dim_dry_runs_and_applies_through_the_cli(tmp_path: Path) -> None:
    ckpt = _safetensors(tmp_path / "a.safetensors", {"a": ("F32", [2**34, 0])})
    (tmp_path / "target_factory.py").write_text(
        "import torch\n\n\ndef make():\n    m = torch.nn.Module()\n    m.a = torch.nn.Parameter(torch.empty(10, 0))\n    return m\n"
    )
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nrules:\n  - slice: {match: '^a$', dim: 0, start: 0, stop: 10}\nexpect: {min_loaded: 0}\n")
    for extra in (["--dry-run"], []):
        done = _run(["-m", "remap", "apply", str(rules), "--source", str(ckpt), "--target", "target_factory:make", *extra], tmp_path)
        assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("start", "stop", "step"),
    [(0, 10, None), (None, None, -1), (-3, None, None), (5, None, 2**40), (2**62, None, -(2**61)), (None, 7, -2)],
)
def test_a_range_slice_applies_as_numpy_slices_without_an_index_tensor(start: Any, stop: Any, step: Any) -> None:
    """Apply takes a view (flipped for a negative step), as numpy's slicing of the same dim."""
    import numpy as np

    from remap.rules import ops

    t = torch.arange(40.0).reshape(20, 2)
    ref = t.numpy()[slice(start, stop, step)]
    out = ops.slice_(t, 0, None, start, stop, step)
    assert out.shape == ref.shape and np.array_equal(out.numpy(), ref)
    assert ops.slice_shape((20, 2), 0, None, start, stop, step) == ref.shape


def _plan_failures(rules: dict[str, Any], source: dict[str, Any], target: dict[str, Any]) -> list[str]:
    plan = make_plan(parse_rules({"version": 1, **rules}), source, target)
    return [f.message for f in plan.failures if f.kind == "op"]


HUGE = 2**62


@pytest.mark.parametrize(
    ("rules", "source", "target", "message"),
    [
        pytest.param({"rules": [{"pad": {"match": "^a$", "to": [HUGE, 4]}}]}, {"a": [1, 4]}, {"a": [1, 4]},
                     f"step 1 (pad): key 'a' [1, 4] float32: shape [{HUGE}, 4] has {HUGE * 4} elements; a tensor holds at most 2**63 - 1",
                     id="pad-past-int64"),
        pytest.param({"rules": [{"reshape": {"match": "^a$", "shape": [2**63, 0]}}]}, {"a": [0]}, {"a": [0]},
                     f"step 1 (reshape): key 'a' [0] float32: shape [{2**63}, 0] has a size of {2**63}; a tensor dim holds at most 2**63 - 1",
                     id="reshape-to-a-size-past-int64"),
        pytest.param({"rules": [{"merge": {"match": "^(a|b)$", "into": "c", "order": ["a", "b"], "stack": True}}]},
                     {"a": [HUGE, 1], "b": [HUGE, 1]}, {"c": [1]},
                     f"step 1 (merge): cannot merge into 'c': shape [2, {HUGE}, 1] has {2 * HUGE} elements; a tensor holds at most 2**63 - 1",
                     id="stack-past-int64"),
        pytest.param({"rules": [{"merge": {"match": "^(a|b)$", "into": "c", "order": ["a", "b"]}}]},
                     {"a": [HUGE, 1], "b": [HUGE, 1]}, {"c": [1]},
                     f"step 1 (merge): cannot merge into 'c': shape [{2 * HUGE}, 1] has a size of {2 * HUGE}; a tensor dim holds at most 2**63 - 1",
                     id="concat-past-int64"),
        pytest.param({"rules": [{"pad": {"match": "^a$", "fill": 300}}]}, {"a": ([1], "int8")}, {"a": ([2], "int8")},
                     "step 1 (pad): key 'a' [1] int8: cannot pad with fill 300: int8 holds integers from -128 to 127",
                     id="fill-past-int8"),
        pytest.param({"rules": [{"pad": {"match": "^a$", "fill": 1e10}}]}, {"a": ([1], "float16")}, {"a": ([2], "float16")},
                     "step 1 (pad): key 'a' [1] float16: cannot pad with fill 10000000000.0: the largest finite float16 is 65504",
                     id="fill-past-float16"),
        pytest.param({"rules": [{"pad": {"match": "^a$", "fill": -1}}]}, {"a": ([1], "uint8")}, {"a": ([2], "uint8")},
                     "step 1 (pad): key 'a' [1] uint8: cannot pad with fill -1: uint8 holds integers from 0 to 255",
                     id="fill-below-uint8"),
    ],
)  # fmt: skip
def test_an_op_whose_result_no_tensor_can_hold_fails_at_plan_time(rules: Any, source: Any, target: Any, message: str) -> None:
    """Before: the plan passed and apply died in torch (exit 4), or planning overflowed."""
    assert _plan_failures(rules, source, target) == [message]


@pytest.mark.parametrize(
    "step",
    [
        {"slice": {"match": "^a$", "dim": 0, "start": 0, "stop": 3}},
        {"slice": {"match": "^a$", "dim": 0, "index": [0, -1, 2**62 - 1]}},
        {"split": {"match": "^a$", "into": ["p", "q"], "dim": 0}},
        {"split": {"match": "^a$", "into": ["p", "q"], "dim": 0, "sizes": [2**61, 2**61]}},
        {"transpose": "^a$"},
        {"reshape": {"match": "^a$", "shape": [2**61, 2, 0]}},
        {"cast": {"match": "^a$", "dtype": "float16"}},
        {"pad": {"match": "^a$", "to": [2**62, 1]}},
    ],
    ids=lambda s: next(iter(s)) + ("-index" if "index" in str(s) else "-sizes" if "sizes" in str(s) else ""),
)
def test_every_op_plans_a_huge_dim_by_arithmetic(step: dict[str, Any]) -> None:
    """A dim of 2**62 (an empty tensor of that many rows) costs every op what a dim of 10
    does: the plan is made at once and says what the op makes of it."""
    started = time.perf_counter()
    plan = make_plan(parse_rules({"version": 1, "rules": [step], "expect": {"unused": [".*"], "missing": [".*"], "min_loaded": 0}}),
                     {"a": [2**62, 0]}, {"b": [1]})  # fmt: skip
    assert time.perf_counter() - started < 30  # generous: listing 2**62 entries would never finish
    assert [f.kind for f in plan.failures] == []


def test_a_pad_with_the_largest_int64_fills_exactly() -> None:
    """The fill stays an int: 2**63 - 1 through float() would have overflowed int64 in torch."""
    model = torch.nn.Module()
    model.register_buffer("a", torch.zeros(3, dtype=torch.int64))
    rules = {"version": 1, "rules": [{"pad": {"match": "^a$", "fill": 2**63 - 1}}]}
    report = remap.load(model, {"a": torch.tensor([7], dtype=torch.int64)}, rules=rules)
    assert report.ok and model.a.tolist() == [7, 2**63 - 1, 2**63 - 1]


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ([2**64, 0], "key 'a': shape [18446744073709551616, 0] is larger than any tensor can be (sizes and element counts stop at 2**63 - 1)"),
        ((2**40, 2**40), "key 'a': shape [1099511627776, 1099511627776] is larger than any tensor can be (sizes and element counts stop at 2**63 - 1)"),
        ([10**5000], "key 'a': shape [<a 16610-bit integer>] is larger than any tensor can be (sizes and element counts stop at 2**63 - 1)"),
    ],
    ids=["size-past-int64", "elements-past-int64", "5000-digits"],
)
def test_metadata_no_tensor_can_have_is_a_usage_error(value: Any, message: str) -> None:
    with pytest.raises(UsageError) as info:
        source_meta({"a": value})
    assert str(info.value) == message and info.value.exit_code == 2


# --------------------------------------------------------------------------- item 5: regex time per pattern

EVIL = "^(a|aa)+$"


def _crafted_keys(n: int, run: int = 26) -> dict[str, list[int]]:
    """``n`` distinct keys on which ``EVIL`` backtracks over a run of ``run`` a's (each
    under the per-key timeout, all together far over any reasonable time)."""
    return {"a" * run + f"b{i}": [1] for i in range(n)}


@pytest.mark.parametrize(
    ("rules", "label"),
    [
        ({"rules": [{"drop": EVIL, "optional": True}]}, "step 1 (drop): "),
        ({"rules": [{"transpose": EVIL, "optional": True}]}, "step 1 (transpose): "),
        ({"expect": {"unused": [EVIL]}}, ""),
    ],
    ids=["name-step", "tensor-step", "expect.unused"],
)
def test_a_pattern_slow_on_every_key_fails_once_its_time_is_spent(rules: dict[str, Any], label: str) -> None:
    """120 keys that each take ``^(a|aa)+$`` a good fraction of a second: 67 s of dry run
    before. Now the pattern has REGEX_BUDGET seconds over all keys; the error names the
    pattern, the step and the key it ran out on, and the keys after it are never tried."""
    keys = _crafted_keys(120)
    started = time.perf_counter()
    with pytest.raises(RulesError) as info:
        make_plan(parse_rules({"version": 1, **rules}), {**keys, "ok": [1]}, {"ok": [1]})
    elapsed = time.perf_counter() - started
    message = str(info.value)
    tried = int(message.split("over the ")[1].split(" key(s)")[0])
    key = message.split("on key '")[1].split("'")[0]
    assert message == (f"{label}regex '{EVIL}' ran out of time on key '{key}': more than {remap.rules.patterns.REGEX_BUDGET:g}s over "
                       f"the {tried} key(s) it was tried on (catastrophic backtracking?); remap tries it on no further key")  # fmt: skip
    assert key in keys and tried < len(keys), "the pattern was tried on every key"
    assert info.value.exit_code == 2
    assert elapsed < 60  # generous; every key tried would take minutes


def test_a_pattern_fast_on_many_keys_never_runs_out(monkeypatch: pytest.MonkeyPatch) -> None:
    """The budget grows with the keys tried: no base budget at all, and 20,000 quick
    searches still pass (each earns more than it spends)."""
    monkeypatch.setattr(remap.rules.patterns, "REGEX_BUDGET", 0.0)
    monkeypatch.setattr(remap.rules.patterns, "REGEX_PER_KEY", 0.01)
    keys = {f"layers.{i}.weight": [1] for i in range(20_000)}
    plan = make_plan(parse_rules({"version": 1, "rules": [{"drop": r"^layers\.\d*7\.weight$"}]}), keys, keys)
    assert plan.report.steps[0].matched == 2_000


def test_a_timeout_on_a_key_shape_names_the_steps_own_pattern_and_a_real_key() -> None:
    """The name pass runs a rewritten pattern once per key shape; when that times out, the
    error tells of the pattern as written and of a real key, not of placeholders."""
    pattern = r"^blocks\.(\d+)\.(a|aa)+$"
    keys = {f"blocks.{i}." + "a" * 36 + "b": [1] for i in range(3)}
    with pytest.raises(RulesError) as info:
        make_plan(parse_rules({"version": 1, "rules": [{"rename": {pattern: r"x.\1"}, "optional": True}]}), keys, keys)
    message = str(info.value)
    assert message.startswith(f"step 1 (rename): regex '{pattern}' ")
    assert f"on key '{next(iter(keys))}'" in message
    assert not any(0xE000 <= ord(c) <= 0xF8FF for c in message)


# --------------------------------------------------------------------------- item 6: what a rules file is


def _validate(path: Path | str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return _run(["-m", "remap", "validate", str(path)], cwd, timeout=60)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda d: (os.mkfifo(d / "rules.yaml"), d / "rules.yaml")[1],
         "cannot read the rules file: a FIFO (named pipe), not a regular file: remap reads it only from regular files"),
        (lambda d: Path("/dev/zero"), "cannot read the rules file: a character device, not a regular file: remap reads it only from regular files"),
        (lambda d: Path("/dev/urandom"), "cannot read the rules file: a character device, not a regular file: remap reads it only from regular files"),
        (lambda d: (d / "big.yaml").write_bytes(b"#" * (MAX_RULES_BYTES + 1)) and d / "big.yaml",
         f"cannot read the rules file: it is {MAX_RULES_BYTES + 1} bytes; remap reads at most {MAX_RULES_BYTES}"),
    ],
    ids=["fifo", "dev-zero", "dev-urandom", "too-long"],
)  # fmt: skip
def test_validate_refuses_what_is_not_a_rules_file(tmp_path: Path, make: Any, message: str) -> None:
    """A FIFO and /dev/urandom hung ``validate``; /dev/zero reached 7.4 GB and exit 4."""
    path = make(tmp_path)
    if not path.exists():
        pytest.skip(f"{path} does not exist here")
    done = _validate(path, tmp_path)
    assert (done.returncode, done.stdout) == (2, "")
    assert done.stderr == f"remap: error: {path}: {message}\n"


def test_load_rules_refuses_a_fifo_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "rules.yaml"
    os.mkfifo(fifo)
    with pytest.raises(RulesError) as info:
        load_rules(fifo)  # opening it would block until a writer came
    assert str(info.value) == f"{fifo}: cannot read the rules file: a FIFO (named pipe), not a regular file: remap reads it only from regular files"


# --------------------------------------------------------------------------- item 10: values Python cannot print


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("version: 0x" + "f" * 5000 + "\n", "rules.yaml:1:10: expected an integer of at most 64 bits, found a 20000-bit integer"),
        ("version: " + "9" * 5000 + "\n", "rules.yaml:1:10: expected an integer of at most 64 bits, found one of 5000 digits"),
        ('version: 1\nrules:\n  - drop: "\\ud800"\n',
         "rules.yaml:3:11: expected text, found a string holding the lone surrogate '\\ud800' at position 0, which is not a character"),
        ('version: 1\nrules:\n  - rename: {"a\\udfff": b}\n',
         "rules.yaml:3:14: expected text, found a string holding the lone surrogate '\\udfff' at position 1, which is not a character"),
        ("version: 1\nrules:\n  - slice: {match: a, dim: 0, index: [" + str(2**64) + "]}\n",
         "rules.yaml:3:39: expected an integer of at most 64 bits, found a 65-bit integer"),
    ],
    ids=["hex-version", "decimal-version", "surrogate-pattern", "surrogate-key", "index-past-64-bits"],
)  # fmt: skip
def test_validate_words_an_unprintable_value_as_a_rules_error(tmp_path: Path, text: str, message: str) -> None:
    """Both were exit 4: the huge int could not be printed, the surrogate not encoded."""
    (tmp_path / "rules.yaml").write_text(text, encoding="utf-8")
    done = _validate("rules.yaml", tmp_path)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"remap: error: {message}\n")


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ({"version": 2**100}, "version: expected an integer of at most 64 bits, found a 101-bit integer"),
        ({"version": 1, "rules": [{"drop": "\ud800"}]},
         "rules: item 1: field 'drop': expected text, found a string holding the lone surrogate '\\ud800' at position 0, which is not a character"),
        ({"version": 1, "rules": [{"rename": {"\udc80": "x"}}]},
         "rules: item 1: field 'rename': a key: expected text, found a string holding the lone surrogate '\\udc80' at position 0, which is not a character"),
        ({"version": 1, "target": {"model": "m:f", "kwargs": {"n": -(2**64)}}},
         "target: field 'kwargs.n': expected an integer of at most 64 bits, found a 65-bit integer"),
    ],
    ids=["version", "surrogate-pattern", "surrogate-key", "kwargs"],
)  # fmt: skip
def test_a_rules_dict_with_an_unprintable_value_is_a_rules_error(rules: dict[str, Any], message: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(rules)
    assert str(info.value) == f"<rules>: {message}"


def test_a_rules_dict_nested_ten_thousand_deep_is_a_rules_error() -> None:
    deep: dict[str, Any] = {}
    for _ in range(10_000):
        deep = {"x": deep}
    with pytest.raises(RulesError) as info:
        parse_rules({"version": 1, "target": {"model": "m:f", "kwargs": deep}})
    assert str(info.value) == "<rules>: the rules are nested too deeply"


# --------------------------------------------------------------------------- item 4: planning with no step


def test_planning_without_steps_takes_the_name_pass_and_agrees_with_the_item_path() -> None:
    """No step at all used to send every key through the item path (a record per key, a
    fate settled one by one: the bulk of a 10**6-key dry run). It is now the name pass of
    no step; what it reports is what the item path reports."""
    n = 20_000
    src = {f"blocks.{i}.w": TensorMeta((2,)) for i in range(n)}
    tgt = {f"blocks.{i}.w": TargetMeta((2,)) for i in range(0, n, 2)} | {"extra": TargetMeta((3,))}
    expect = {"unused": [r"^blocks\.\d*[13579]\.w$"], "missing": ["^extra$"]}
    bare = make_plan(parse_rules({"version": 1, "expect": expect}), src, tgt)
    nop = {"cast": {"match": "^nothing$", "dtype": "float32"}, "optional": True}  # a tensor step: the item path
    items = make_plan(parse_rules({"version": 1, "rules": [nop], "expect": expect}), src, tgt)
    assert bare.ok and items.ok
    assert bare.report.totals == items.report.totals
    assert list(bare.report.targets) == list(items.report.targets)
    strip = [dataclass_without(r, "step_kind") for r in bare.report.sources]
    assert strip == [dataclass_without(r, "step_kind") for r in items.report.sources]
    assert [a.target for a in bare.assignments] == [a.target for a in items.assignments]


def dataclass_without(record: Any, *names: str) -> dict[str, Any]:
    import dataclasses

    return {k: v for k, v in dataclasses.asdict(record).items() if k not in names}


@pytest.mark.parametrize(
    ("step", "source", "target", "failure"),
    [
        ({"slice": {"match": "^a$", "dim": 0, "step": -(2**63)}}, [2**62, 0], [1, 0], None),
        ({"slice": {"match": "^a$", "dim": 2**63 - 1, "index": [0]}}, [4], [1],
         "step 1 (slice): key 'a' [4] float32: dim 9223372036854775807 is out of range for a 1-d tensor"),
        ({"transpose": {"match": "^a$", "dims": [-(2**63), 2**63 - 1]}}, [4, 4], [4, 4],
         "step 1 (transpose): key 'a' [4, 4] float32: dim -9223372036854775808 is out of range for a 2-d tensor"),
        ({"adapt": {"match": "^a$", "op": "interpolate", "prefix_tokens": 2**63 - 1}}, [1, 5, 4], [1, 10, 4],
         "step 1 (adapt): key 'a' [1, 5, 4] float32: [1, 5, 4] has no grid tokens after 9223372036854775807 prefix token(s)"),
    ],
    ids=["slice-step", "slice-dim", "transpose-dims", "interpolate-prefix"],
)  # fmt: skip
def test_int64_extremes_in_op_fields_plan_or_fail_as_ops(step: Any, source: Any, target: Any, failure: str | None) -> None:
    """The largest integers a rules file may hold, in every integer field of an op."""
    plan = make_plan(parse_rules({"version": 1, "rules": [step]}), {"a": source}, {"a": target})
    assert [f.message for f in plan.failures if f.kind == "op"] == ([failure] if failure else [])
    assert plan.ok is (failure is None)


def test_index_arithmetic_on_a_5000_digit_index_is_a_capture_failure() -> None:
    """A checkpoint key with a 5000-digit layer index under ``add``: int() refuses it (a
    ValueError, exit 4, before); now the key fails as a bad capture, named."""
    rules = parse_rules({"version": 1, "rules": [{"rename": {"from": r"^l\.(\d+)\.w$", "to": r"x.\1.w", "add": {1: 1}}}]})
    key = "l." + "9" * 5000 + ".w"
    plan = make_plan(rules, {key: [1], "l.1.w": [1]}, {"x.2.w": [1]})
    bad = [f for f in plan.failures if f.kind == "bad_capture"]
    assert [f.message for f in bad] == [f"step 1 (rename): key {key!r}: group 1 captured a number of 5000 digits; index arithmetic takes at most 100"]
