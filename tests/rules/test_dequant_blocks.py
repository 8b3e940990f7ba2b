"""``dequant_blocks``: DeepSeek-V3 / Hugging Face fine-grained fp8 weights (float8_e4m3fn, one
float32 ``weight_scale_inv`` per 128x128 block) into a bf16 model, from a sharded checkpoint
whose scales sit in another shard than their weights. The reference dequantization is
computed here, block by block, as DeepSeek's ``fp8_cast_bf16.py`` describes it."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import remap
from remap.errors import CheckError, RulesError
from weights import snapshot

FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
BLOCK = 128


def quantize(w: torch.Tensor, block: int = BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Per block: scale = amax / 448, weight = (w / scale) in float8_e4m3fn; the scale is what
    the checkpoint calls weight_scale_inv (the weight is weight * scale_inv)."""
    rows, cols = w.shape
    nr, nc = math.ceil(rows / block), math.ceil(cols / block)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale = torch.empty(nr, nc, dtype=torch.float32)
    for i in range(nr):
        for j in range(nc):
            part = w[i * block:(i + 1) * block, j * block:(j + 1) * block].float()
            s = part.abs().max().clamp(min=1e-12) / FP8_MAX
            scale[i, j] = s
            q[i * block:(i + 1) * block, j * block:(j + 1) * block] = (part / s).to(torch.float8_e4m3fn)
    return q, scale


def reference(q: torch.Tensor, scale: torch.Tensor, block: int = BLOCK, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """The dequantized weight, one block at a time: the float32 product, then the cast."""
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale.shape[0]):
        for j in range(scale.shape[1]):
            rows, cols = slice(i * block, (i + 1) * block), slice(j * block, (j + 1) * block)
            out[rows, cols] = q[rows, cols].to(torch.float32) * scale[i, j]
    return out.to(dtype)


class Model(nn.Module):
    """Linear layers whose shapes are not multiples of 128 (and one that is), a norm."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(200, 300)  # weight [300, 200]: blocks 3 x 2, both partial
        self.down = nn.Linear(300, 256, bias=False)  # [256, 300]: 2 x 3
        self.norm = nn.LayerNorm(256)
        self.head = nn.Linear(256, 130, bias=False)  # [130, 256]: one row of blocks partial

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.down(torch.relu(self.up(x)))))


QUANTIZED = ("up.weight", "down.weight", "head.weight")


def fp8_checkpoint(folder: Path, seed: int = 0) -> tuple[Path, dict[str, torch.Tensor]]:
    """A two-shard fp8 checkpoint with an index: the weights (and the bf16 bias and norm) in
    the first shard, every weight_scale_inv in the second. Returns the index and all tensors."""
    g = torch.Generator().manual_seed(seed)
    plain = {k: (torch.randn(v.shape, generator=g) * 0.05).to(torch.bfloat16) for k, v in Model().state_dict().items()}
    first, second = {}, {}
    for key, value in plain.items():
        if key in QUANTIZED:
            q, s = quantize(value)
            first[key], second[key + "_scale_inv"] = q, s
        else:
            first[key] = value
    folder.mkdir(parents=True, exist_ok=True)
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    save_file(first, str(folder / names[0]))
    save_file(second, str(folder / names[1]))
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"metadata": {}, "weight_map": {**dict.fromkeys(first, names[0]), **dict.fromkeys(second, names[1])}}))
    return index, {**first, **second}


RULES = {"version": 1, "rules": [{"dequant_blocks": {"match": r"\.weight$"}}]}


def test_sharded_fp8_checkpoint_loads_into_a_bf16_model_as_the_reference(tmp_path: Path) -> None:
    index, tensors = fp8_checkpoint(tmp_path / "ckpt")
    model = Model().to(torch.bfloat16)
    report = remap.load(model, index, rules=RULES)
    assert report.ok
    state = model.state_dict()
    for key in QUANTIZED:
        want = reference(tensors[key], tensors[key + "_scale_inv"])
        assert state[key].dtype == torch.bfloat16 and torch.equal(state[key], want), key
        record = report.target_record(key)
        assert record.sources == (key, key + "_scale_inv") and record.ops[-1].startswith("dequant_blocks(128x128")
        assert report.source_record(key + "_scale_inv").fate == "used"
    for key in ("up.bias", "norm.weight", "norm.bias"):  # bf16 already, no scale: left alone
        assert torch.equal(state[key], tensors[key]) and report.target_record(key).ops == ()
    assert report.totals.unused == 0 and report.totals.loaded == len(state)


def test_dequantized_weights_are_close_to_the_weights_that_were_quantized(tmp_path: Path) -> None:
    """Not only equal to the reference: the reference itself gives the original weights back to fp8's precision."""
    index, tensors = fp8_checkpoint(tmp_path / "ckpt", seed=1)
    g = torch.Generator().manual_seed(1)
    original = {k: (torch.randn(v.shape, generator=g) * 0.05).to(torch.bfloat16) for k, v in Model().state_dict().items()}
    model = Model().to(torch.bfloat16)
    remap.load(model, index, rules=RULES)
    for key in QUANTIZED:
        err = (model.state_dict()[key].float() - original[key].float()).abs().max()
        assert err <= original[key].float().abs().max() / 8, key  # e4m3: 3 mantissa bits


def test_meta_target_gets_the_dequantized_dtype(tmp_path: Path) -> None:
    index, tensors = fp8_checkpoint(tmp_path / "ckpt", seed=2)
    with torch.device("meta"):
        model = Model()
    rules = {"version": 1, "rules": [{"dequant_blocks": {"match": r"^(.*)\.weight$", "scale": r"\1.weight_scale_inv", "dtype": "bfloat16"}}]}
    report = remap.load(model, index, rules=rules, dtype="bfloat16")
    assert report.ok
    want = reference(tensors["down.weight"], tensors["down.weight_scale_inv"])
    assert model.down.weight.device.type == "cpu" and torch.equal(model.down.weight, want)


def test_float32_output_and_a_float32_weight_is_not_scaled_in_place() -> None:
    from remap.rules.quant_steps import dequant_blocks

    w = torch.randn(5, 7)
    before = w.clone()
    out = dequant_blocks(w, torch.tensor([[2.0, 3.0]]), block=(8, 4), dtype="float32")
    assert torch.equal(w, before)
    assert torch.equal(out[:, :4], before[:, :4] * 2) and torch.equal(out[:, 4:], before[:, 4:] * 3)


def test_wrong_scale_shape_fails_at_plan_time_and_nothing_is_touched(tmp_path: Path) -> None:
    index, tensors = fp8_checkpoint(tmp_path / "ckpt")
    model = Model().to(torch.bfloat16)
    before = snapshot(model)
    rules = {"version": 1, "rules": [{"dequant_blocks": {"match": r"\.weight$", "block": [64, 128]}}]}
    with pytest.raises(CheckError) as info:
        remap.load(model, index, rules=rules)
    messages = [f.message for f in info.value.report.failures if f.kind == "op"]
    assert any("'up.weight' [300, 200] float8_e4m3fn with scale 'up.weight_scale_inv' [3, 2] float32" in m
               and "blocks of 64x128 need a scale of shape [5, 2]" in m for m in messages), messages
    assert snapshot(model) == before


def test_fp8_weight_without_its_scale_is_named(tmp_path: Path) -> None:
    index, _ = fp8_checkpoint(tmp_path / "ckpt")
    rules = {"version": 1, "rules": [{"dequant_blocks": {"match": r"\.weight$", "scale": r"\g<0>_scale"}}]}
    with pytest.raises(CheckError) as info:
        remap.load(Model().to(torch.bfloat16), index, rules=rules)
    text = str(info.value)
    assert "key 'up.weight' is float8_e4m3fn but its scale 'up.weight_scale' is not a key at this step" in text


def test_dtype_target_needs_the_target_name(tmp_path: Path) -> None:
    index, _ = fp8_checkpoint(tmp_path / "ckpt")
    model = nn.Sequential()
    model.add_module("inner", Model().to(torch.bfloat16))
    rules = {"version": 1, "rules": [{"dequant_blocks": {"match": r"\.weight$"}}, {"add_prefix": "inner."}]}
    with pytest.raises(CheckError) as info:
        remap.load(model, index, rules=rules)
    assert "dtype 'target' takes the dtype of the target key 'up.weight', and there is none" in str(info.value)
    rules = {"version": 1, "rules": [{"add_prefix": "inner."}, {"dequant_blocks": {"match": r"\.weight$"}}]}
    assert remap.load(model, index, rules=rules).ok


def test_step_that_pairs_nothing_fails_unless_optional() -> None:
    source = {"a.weight": torch.zeros(2, 2, dtype=torch.bfloat16)}
    model = nn.Module()
    model.a = nn.Linear(2, 2, bias=False).to(torch.bfloat16)
    with pytest.raises(CheckError) as info:
        remap.load(model, dict(source), rules=RULES)
    assert info.value.report.failures[0].kind == "unmatched_step"
    optional = {"version": 1, "rules": [{"dequant_blocks": {"match": r"\.weight$"}, "optional": True}]}
    assert remap.load(model, dict(source), rules=optional).ok


def test_bad_block_and_dtype_are_rules_errors_with_their_line() -> None:
    with pytest.raises(RulesError, match=r"r\.yaml:3:\d+: .*expected two block sizes >= 1, e\.g\. \[128, 128\], found"):
        remap.parse_rules("version: 1\nrules:\n  - dequant_blocks: {match: 'w$', block: [128]}\n", filename="r.yaml")
    with pytest.raises(RulesError, match="expected a floating dtype .* or 'target', found a string 'int8'"):
        remap.parse_rules({"version": 1, "rules": [{"dequant_blocks": {"match": "w$", "dtype": "int8"}}]})


def test_dry_run_plans_from_headers_only(tmp_path: Path) -> None:
    index, _ = fp8_checkpoint(tmp_path / "ckpt")
    plan = remap.plan(Model().to(torch.bfloat16), index, RULES)
    assert plan.ok and plan.report.target_record("head.weight").source_dtype == "bfloat16"
    assert "dequant_blocks" in plan.explain("head.weight")
