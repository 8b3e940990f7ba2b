"""The dtype policy: ``target.dtype: auto`` (the checkpoint's dtypes), a target dtype with
``target.keep_fp32``, the report's ``precision`` lines for every key whose dtype changes, and
narrowing casts whose overflow fails the load with the key named and the module untouched."""

from __future__ import annotations

import importlib.resources
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import remap
from remap.errors import CheckError, RulesError, UsageError
from weights import perturb, snapshot


class Block(nn.Module):
    """Two linears, a norm and a MoE-style router; a buffer of integers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.LayerNorm(8)
        self.router = nn.Linear(8, 3, bias=False)
        self.fc2 = nn.Linear(8, 6)
        self.register_buffer("steps", torch.tensor([3, 4]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.fc1(x))
        return self.fc2(h) + self.router(h).sum(-1, keepdim=True)


def state(dtype: torch.dtype, seed: int = 0) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in perturb(Block(), seed=seed).state_dict().items()}


def meta_block() -> Block:
    with torch.device("meta"):
        return Block()


def write(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


FLOATS = ("fc1.weight", "fc1.bias", "norm.weight", "norm.bias", "router.weight", "fc2.weight", "fc2.bias")


# --------------------------------------------------------------------------- what happens today, reported


def test_bf16_checkpoint_into_a_float32_module_is_an_upcast_on_every_key_reported(tmp_path: Path) -> None:
    src = state(torch.bfloat16)
    model = Block()
    report = remap.load(model, write(tmp_path / "c.safetensors", src))
    assert all(model.state_dict()[k].dtype == torch.float32 and torch.equal(model.state_dict()[k], src[k].float()) for k in FLOATS)
    [record] = report.precision
    assert (record.source_dtype, record.dtype, record.kind, record.by) == ("bfloat16", "float32", "widened", "target")
    assert set(record.keys) == set(FLOATS)
    text = str(report)
    assert "Precision: 7 keys change dtype" in text and "7 keys  bfloat16 -> float32  widened, by the target's own dtype" in text
    entry = report.to_dict()["precision"][0]
    assert entry["count"] == 7 and entry["source_dtype"] == "bfloat16" and sorted(entry["keys"]) == sorted(FLOATS)


def test_same_dtype_everywhere_reports_no_precision_line() -> None:
    report = remap.load(Block(), state(torch.float32))
    assert report.precision == () and "Precision" not in str(report)


def test_report_with_precision_lines_validates_against_the_schema() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads(importlib.resources.files("remap.report").joinpath("report.schema.json").read_text(encoding="utf-8"))
    report = remap.load(meta_block(), state(torch.float32), dtype="float16", rules={"version": 1, "target": {"keep_fp32": ["^norm\\."]}})
    jsonschema.validate(json.loads(report.to_json()), schema)
    assert {(p["source_dtype"], p["dtype"], p["by"]) for p in report.to_dict()["precision"]} == {("float32", "float16", "dtype")}


# --------------------------------------------------------------------------- narrowing: overflow fails, named


def overflowing(dtype: torch.dtype) -> dict[str, torch.Tensor]:
    src = state(dtype, seed=1)
    src["fc2.weight"][2, 3] = 2.0**17  # 131072 (exact in bf16 too); float16 holds at most 65504
    return src


@pytest.mark.parametrize("stored", [torch.float32, torch.bfloat16])
def test_overflow_into_float16_on_a_meta_target_fails_naming_the_key(stored: torch.dtype) -> None:
    model = meta_block()
    with pytest.raises(CheckError) as info:
        remap.load(model, overflowing(stored), dtype="float16")
    [failure] = info.value.report.failures
    assert failure.kind == "precision" and failure.keys[0] == "fc2.weight"
    name = str(stored).removeprefix("torch.")
    assert f"'fc2.weight': {name} -> float16 overflows: its largest value is 131072 (at index 19), and float16 holds at most 65504" \
        in failure.message  # fmt: skip
    assert all(t.device.type == "meta" for t in model.state_dict().values())  # put back as it was


def test_overflow_into_an_allocated_float16_module_leaves_it_as_it_was(tmp_path: Path) -> None:
    """The failing key streams in a later batch than keys already written: those are put back."""
    model = Block().half()
    before = snapshot(model)
    path = write(tmp_path / "c.safetensors", overflowing(torch.float32))
    with pytest.raises(CheckError, match="'fc2.weight': float32 -> float16 overflows") as info:
        remap.load(model, path, batch_bytes=64)
    assert "the module was not touched" in str(info.value)
    assert snapshot(model) == before


@pytest.mark.parametrize("meta", [False, True], ids=["allocated", "meta"])
def test_an_overflowing_cast_step_fails_naming_the_key_and_puts_the_module_back(tmp_path: Path, meta: bool) -> None:
    """An explicit ``cast`` step in the rules is range-checked as the load's own casts are
    (a float32 module: the step's float16 value would load as inf)."""
    model = meta_block() if meta else Block()
    before = snapshot(model) if not meta else None
    path = write(tmp_path / "c.safetensors", overflowing(torch.float32))
    rules = {"version": 1, "rules": [{"cast": {"match": r"^fc2\.", "dtype": "float16"}}]}
    with pytest.raises(CheckError) as info:
        remap.load(model, path, rules=rules, batch_bytes=64)
    [failure] = info.value.report.failures
    assert failure.kind == "precision"
    assert failure.message == ("'fc2.weight': the rules' cast step float32 -> float16 overflows: its largest value is 131072 "
                               "(at index 19), and float16 holds at most 65504; 1 value(s) would become inf. Cast to a "
                               "wider dtype, or scale it in the rules")  # fmt: skip
    if meta:
        assert all(t.device.type == "meta" for t in model.state_dict().values())
    else:
        assert snapshot(model) == before


def test_values_in_range_narrow_without_failure_and_are_reported() -> None:
    src = state(torch.float32, seed=2)
    model = Block().half()
    report = remap.load(model, src)
    assert torch.equal(model.fc1.weight, src["fc1.weight"].half())
    [record] = report.precision
    assert (record.source_dtype, record.dtype, record.kind, record.by) == ("float32", "float16", "narrowed", "target")


def test_infinities_already_in_the_checkpoint_are_not_an_overflow() -> None:
    src = state(torch.float32, seed=3)
    src["fc1.bias"][0] = float("inf")
    model = meta_block()
    assert remap.load(model, src, dtype="float16").ok
    assert model.fc1.bias[0].item() == float("inf")


# --------------------------------------------------------------------------- dtype: auto


def test_auto_keeps_each_checkpoint_dtype_on_a_meta_target() -> None:
    src = state(torch.bfloat16, seed=4)
    src["norm.weight"] = src["norm.weight"].float()
    model = meta_block()
    report = remap.load(model, dict(src), rules={"version": 1, "target": {"dtype": "auto"}})
    got = model.state_dict()
    assert got["norm.weight"].dtype == torch.float32 and got["fc1.weight"].dtype == torch.bfloat16
    assert all(torch.equal(got[k], src[k]) for k in FLOATS)
    assert report.precision == () and not any("will be cast" in w for w in report.warnings)


def test_auto_on_a_module_with_its_memory_is_refused_before_anything_is_read() -> None:
    model = Block()
    before = snapshot(model)
    with pytest.raises(UsageError, match="dtype auto keeps the checkpoint's dtypes, so the load must make the target's tensors"):
        remap.load(model, state(torch.bfloat16), dtype="auto")
    assert snapshot(model) == before


def test_auto_on_a_target_remap_builds(tmp_path: Path) -> None:
    src = state(torch.float16, seed=5)
    path = write(tmp_path / "c.safetensors", src)
    rules = {"version": 1, "source": {"path": str(path)},
             "target": {"model": "torch.nn:Linear", "args": [6, 8], "dtype": "auto"}, "rules": [{"keep": "^fc1\\."}, {"strip_prefix": "fc1."}]}
    report = remap.load(rules=rules)
    assert report.ok and report.precision == ()


# --------------------------------------------------------------------------- keep_fp32


KEEP = {"version": 1, "target": {"dtype": "bfloat16", "keep_fp32": ["^norm\\.", "^router\\."]}}


def test_keep_fp32_on_a_meta_target() -> None:
    src = state(torch.float32, seed=6)
    model = meta_block()
    report = remap.load(model, dict(src), rules=KEEP)
    got = model.state_dict()
    for key in FLOATS:
        kept = key.startswith(("norm.", "router."))
        assert got[key].dtype == (torch.float32 if kept else torch.bfloat16), key
        assert torch.equal(got[key], src[key] if kept else src[key].bfloat16()), key
    assert got["steps"].dtype == torch.int64
    [record] = report.precision
    assert (record.source_dtype, record.dtype, record.by) == ("float32", "bfloat16", "dtype")
    assert set(record.keys) == {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"}


def test_keep_fp32_upcasts_a_bf16_checkpoint_and_says_so() -> None:
    report = remap.load(meta_block(), state(torch.bfloat16, seed=7), rules=KEEP)
    [record] = report.precision
    assert (record.source_dtype, record.dtype, record.kind, record.by) == ("bfloat16", "float32", "widened", "keep_fp32")
    assert set(record.keys) == {"norm.weight", "norm.bias", "router.weight"}


def test_keep_fp32_reaches_keys_the_checkpoint_does_not_feed() -> None:
    src = {k: v for k, v in state(torch.float32, seed=8).items() if not k.startswith("norm.")}
    model = meta_block()
    remap.load(model, src, rules={**KEEP, "expect": {"missing": ["^norm\\."]}})
    assert model.norm.weight.dtype == torch.float32 and model.fc1.weight.dtype == torch.bfloat16


def test_keep_fp32_on_a_target_remap_builds(tmp_path: Path) -> None:
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    path = write(tmp_path / "layer.safetensors", perturb(layer, seed=9).state_dict())
    rules = {"version": 1, "source": {"path": str(path)},
             "target": {"model": "torch.nn:TransformerEncoderLayer", "args": [8, 2, 16], "kwargs": {"dropout": 0.0},
                        "dtype": "bfloat16", "keep_fp32": ["^norm\\d\\."]}}  # fmt: skip
    report = remap.load(rules=rules)
    assert report.ok
    by_key = {k: p.by for p in report.precision for k in p.keys}
    assert by_key["linear1.weight"] == "dtype" and "norm1.weight" not in by_key


def test_keep_fp32_refuses_an_allocated_module_holding_those_keys_in_another_dtype() -> None:
    with pytest.raises(UsageError, match=r"keep_fp32 matches tensors this module already holds in another dtype: norm.weight \(bfloat16\)"):
        remap.load(Block().bfloat16(), state(torch.float32), rules=KEEP)


# --------------------------------------------------------------------------- the rules


def test_rules_accept_auto_and_keep_fp32_and_check_the_patterns() -> None:
    rules = remap.parse_rules("version: 1\ntarget: {dtype: auto, keep_fp32: ['norm', 'router']}\n")
    assert rules.target.dtype == "auto" and rules.target.keep_fp32 == ("norm", "router")
    with pytest.raises(RulesError, match=r"r\.yaml:2:\d+: target: field 'keep_fp32'"):
        remap.parse_rules("version: 1\ntarget: {keep_fp32: '('}\n", filename="r.yaml")
    with pytest.raises(RulesError, match="expected one of: float32, float16, bfloat16, float64, auto"):
        remap.parse_rules({"version": 1, "target": {"dtype": "fp8"}})


def test_dry_run_reports_precision_without_reading(tmp_path: Path) -> None:
    path = write(tmp_path / "c.safetensors", state(torch.bfloat16))
    report = remap.load(Block(), path, dry_run=True)
    assert report.dry_run and report.precision[0].keys and report.stats == {}


def test_dequant_then_the_load_cast_is_reported_as_narrowed(tmp_path: Path) -> None:
    """fp8 weight dequantized to float32 by the step, cast to the module's bf16 by the load."""
    w = torch.randn(4, 4)
    src = {"weight": w.to(torch.float8_e4m3fn), "weight_scale_inv": torch.ones(1, 1)}
    model = nn.Linear(4, 4, bias=False).bfloat16()
    report = remap.load(model, src, rules={"version": 1, "rules": [{"dequant_blocks": {"match": "^weight$", "dtype": "float32"}}]})
    [record] = report.precision
    assert (record.source_dtype, record.dtype, record.kind, record.keys) == ("float8_e4m3fn", "bfloat16", "narrowed", ("weight",))
