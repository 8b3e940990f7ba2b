"""First divergence: where a wrong conversion's target parts from its source.

Every case loads a real conversion (the repo's configs, timm and torchvision models) with
``remap.load`` and runs ``first_divergence`` on the report's records. What must be named is
known from how the conversion was broken, never from the code under test.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from conversion_models import EMBED_DIM, mha_stack, qkv_stack, timm_vit, torchvision_vit
from torch import nn

import remap
from remap.errors import UsageError
from remap.report.records import TargetRecord
from remap.verifying.divergence import describe_divergence, first_divergence, pair_modules

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
TOL = {"atol": 1e-5, "rtol": 1e-5}
BLOCK1_ATTN = ("encoder.layers.encoder_layer_1.self_attention", "blocks.1.attn")


def perturb(model: nn.Module, seed: int) -> nn.Module:
    """Random weights at the scale a trained model has (matrices by 1/sqrt(fan in), vectors
    spread by 0.1 around their initial mean): unit-variance weights saturate attention's
    softmax, and two correct kernels then differ inside the model by more than any tolerance."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            noise = torch.randn(t.shape, generator=g)
            t.copy_(noise / t[0].numel() ** 0.5 if t.dim() >= 2 else t.mean() + 0.1 * noise)
    return model


def vit_rules(*extra: dict) -> dict:
    """The ViT config with ``extra`` steps run first; the small target is passed instead of vit_b_16."""
    rules = yaml.safe_load((CONFIGS / "timm-vit-to-torchvision.yaml").read_text())
    rules.pop("target")
    rules["rules"] = [*extra, *rules["rules"]]
    return rules


def image() -> torch.Tensor:
    return torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(3))


def convert_vit(tmp_path: Path, state: dict[str, torch.Tensor], *extra: dict) -> tuple[nn.Module, remap.Report]:
    path = tmp_path / "vit.pth"
    torch.save(state, path)
    target = torchvision_vit()
    report = remap.load(target, path, rules=vit_rules(*extra))
    assert report.ok
    return target, report


def outputs_differ(source: nn.Module, target: nn.Module, *inputs: torch.Tensor) -> bool:
    with torch.no_grad():
        return not torch.allclose(source.eval()(*inputs), target.eval()(*inputs), **TOL)


def no_hooks(*models: nn.Module) -> bool:
    return all(not m._forward_hooks and not m._forward_pre_hooks for model in models for m in model.modules())


# --------------------------------------------------------------------------- the case: q and k swapped in a ViT


def test_q_and_k_swapped_in_one_block_of_the_checkpoint_name_that_blocks_attention(tmp_path):
    source = perturb(timm_vit(), seed=1).eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    for key in ("blocks.1.attn.qkv.weight", "blocks.1.attn.qkv.bias"):  # [q; k; v] -> [k; q; v]
        q, k, v = state[key].chunk(3)
        state[key] = torch.cat([k, q, v])
    target, report = convert_vit(tmp_path, state)
    assert outputs_differ(source, target, image())

    d = first_divergence(source, target, ([image()], {}), report.targets, **TOL)
    first = d["first"]
    assert (first["target"], first["source"]) == BLOCK1_ATTN
    assert first["max_abs"] > 1e-3 and first["call"] == 0 and first["ops"] == []  # the config only renames
    assert "blocks.1.attn.qkv.weight" in first["sources"]
    assert "encoder.layers.encoder_layer_1.self_attention.in_proj_weight" in first["keys"]
    before = d["pairs"][: d["pairs"].index(list(BLOCK1_ATTN))]  # block 0 and block 1's first norm: all agree
    assert ["encoder.layers.encoder_layer_0", "blocks.0"] in before and ["encoder.layers.encoder_layer_1.ln_1", "blocks.1.norm1"] in before
    assert describe_divergence(d) == (f"first divergence: target {BLOCK1_ATTN[0]} <- source {BLOCK1_ATTN[1]} "
                                      f"(max abs {first['max_abs']:.3g}); weights renamed only")  # fmt: skip
    assert no_hooks(source, target)


def test_q_and_k_swapped_by_the_rules_split_names_the_split(tmp_path):
    source = perturb(timm_vit(), seed=2).eval()
    split = {"split": {"match": r"^(blocks\.1\.attn\.)qkv\.(weight|bias)$", "into": [r"\1q.\2", r"\1k.\2", r"\1v.\2"], "dim": 0}}
    merge = {"merge": {"match": r"^(blocks\.1\.attn\.)(q|k|v)\.(weight|bias)$", "into": r"\1qkv.\3", "group": 2,
                       "order": ["k", "q", "v"], "dim": 0}}  # fmt: skip
    target, report = convert_vit(tmp_path, source.state_dict(), split, merge)
    assert outputs_differ(source, target, image())

    d = first_divergence(source, target, ([image()], {}), report.targets, **TOL)
    assert (d["first"]["target"], d["first"]["source"]) == BLOCK1_ATTN
    assert "cat(dim=0)[k, q, v]" in d["first"]["ops"] and any(op.startswith("split(dim=0)") for op in d["first"]["ops"])
    line = describe_divergence(d)
    assert line.startswith(f"first divergence: target {BLOCK1_ATTN[0]} <- source {BLOCK1_ATTN[1]} (max abs ")
    assert line.endswith("; weights through split(dim=0), cat(dim=0)[k, q, v]")


# --------------------------------------------------------------------------- a correct conversion, a late bug


def test_a_correct_conversion_has_no_first_divergence_and_says_what_it_compared(tmp_path):
    source = perturb(timm_vit(), seed=3).eval()
    target, report = convert_vit(tmp_path, source.state_dict())
    assert not outputs_differ(source, target, image())
    state = {k: v.clone() for k, v in target.state_dict().items()}
    target.train()
    target.encoder.eval()  # mixed training flags come back as they were

    d = first_divergence(source, target, ([image()], {}), report.targets, **TOL)
    assert d["first"] is None and d["diverged"] == 0 and d["compared"] == len(d["pairs"]) > 10
    for pair in (["encoder.layers.encoder_layer_0.self_attention", "blocks.0.attn"], ["encoder.layers.encoder_layer_1.mlp.0", "blocks.1.mlp.fc1"],
                 ["encoder.layers", "blocks"], ["heads.head", "head"], ["", ""]):  # fmt: skip
        assert pair in d["pairs"]
    # the fused qkv has no module of its own in nn.MultiheadAttention; the encoder also holds the position embedding
    assert d["unpaired"] == {"target": ["encoder"], "source": ["blocks.0.attn.qkv", "blocks.1.attn.qkv"], "target_total": 1, "source_total": 2}
    skipped = {(s["target"], s["source"]): s["reason"] for s in d["skipped"]}
    assert "shape" in skipped[("conv_proj", "patch_embed")]  # [B, C, H, W] against timm's flattened [B, N, C]
    assert skipped[("encoder.layers.encoder_layer_0.self_attention.out_proj", "blocks.0.attn.proj")] == "not run in the target"
    assert describe_divergence(d).startswith(f"no first divergence: the {d['compared']} compared module pair(s) agree")
    assert target.training and not target.encoder.training and target.heads.training
    assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())
    assert no_hooks(source, target)


def test_a_wrong_head_bias_names_the_head_not_an_earlier_module(tmp_path):
    source = perturb(timm_vit(), seed=4).eval()
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["head.bias"][3] += 0.5
    target, report = convert_vit(tmp_path, state)

    d = first_divergence(source, target, ([image()], {}), report.targets, **TOL)
    assert (d["first"]["target"], d["first"]["source"]) == ("heads.head", "head")
    assert d["first"]["max_abs"] == pytest.approx(0.5, rel=1e-4) and d["first"]["keys"] == ["heads.head.weight", "heads.head.bias"]
    assert d["diverged"] == 3  # the head, the Sequential around it and the whole model
    assert d["compared"] > 10 and d["pairs"][-3:] == [["heads.head", "head"], ["heads", "head"], ["", ""]]


# --------------------------------------------------------------------------- split and merge: parts pair with nothing


def test_a_split_pairs_the_attention_modules_not_the_parts(tmp_path):
    source = perturb(mha_stack(), seed=5).eval()
    path = tmp_path / "mha.pth"
    torch.save(source.state_dict(), path)
    rules = yaml.safe_load((CONFIGS / "mha-to-qkv.yaml").read_text())
    rules["rules"][0]["split"]["into"] = [r"\1k_proj.\2", r"\1q_proj.\2", r"\1v_proj.\2"]  # q and k swapped
    target = qkv_stack()
    report = remap.load(target, path, rules=rules)
    x = torch.randn(1, 5, EMBED_DIM, generator=torch.Generator().manual_seed(0))
    assert outputs_differ(source, target, x)

    d = first_divergence(source, target, ([x], {}), report.targets, **TOL)
    assert (d["first"]["target"], d["first"]["source"]) == ("layers.0.attn", "layers.0.attn")
    assert d["pairs"][0] == ["layers.0.norm", "layers.0.norm"]  # its input agreed
    parts = [f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qkv"]
    assert set(parts) <= set(d["unpaired"]["target"])
    assert not {p for pair in d["pairs"] for p in pair if p.endswith(("q_proj", "k_proj", "v_proj"))}
    assert describe_divergence(d).endswith("; weights through split(dim=0)")


def test_a_merge_pairs_the_attention_modules_and_agrees(tmp_path):
    source = perturb(qkv_stack(), seed=6).eval()
    path = tmp_path / "qkv.pth"
    torch.save(source.state_dict(), path)
    target = mha_stack()
    report = remap.load(target, path, rules=CONFIGS / "qkv-to-mha.yaml")
    x = torch.randn(1, 5, EMBED_DIM, generator=torch.Generator().manual_seed(0))

    d = first_divergence(source, target, ([x], {}), report.targets, **TOL)
    assert d["first"] is None and ["layers.1.attn", "layers.1.attn"] in d["pairs"]
    assert {f"layers.{i}.attn.{p}_proj" for i in range(2) for p in "qkv"} <= set(d["unpaired"]["source"])


# --------------------------------------------------------------------------- calls, pairing rules, hooks


class TwoCalls(nn.Module):
    """One Linear called twice, a parameter-free function between the calls."""

    def __init__(self, between) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.between = between

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(self.between(self.lin(x)))


def identity_load(tmp_path: Path, source: nn.Module, target: nn.Module) -> remap.Report:
    path = tmp_path / "same.pth"
    torch.save(source.state_dict(), path)
    return remap.load(target, path)


def test_a_module_called_twice_is_compared_call_by_call(tmp_path):
    source, target = perturb(TwoCalls(torch.tanh), seed=7).eval(), TwoCalls(torch.sin)  # the bug sits between the calls
    report = identity_load(tmp_path, source, target)
    d = first_divergence(source, target, ([torch.randn(3, 4)], {}), report.targets, **TOL)
    assert (d["first"]["target"], d["first"]["call"]) == ("lin", 1)
    assert "(max abs " in describe_divergence(d) and ", call 2)" in describe_divergence(d)


def test_a_module_with_a_key_not_loaded_pairs_with_nothing_nor_do_its_ancestors():
    model = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), nn.Linear(2, 2))

    def rec(key: str, status: str = "loaded", **kw) -> TargetRecord:
        return TargetRecord(key, status, (2,), "float32", "parameter", 2, sources=(key,) if status == "loaded" else (), **kw)

    records = [rec("0.0.weight"), rec("0.0.bias"), rec("0.1.weight"), rec("0.1.bias", "missing"), rec("1.weight"), rec("1.bias")]
    pairing = pair_modules(model, model, records)
    assert pairing.pairs == [("0.0", "0.0"), ("1", "1")]
    assert pairing.unpaired_target == ["", "0", "0.1"]


def test_a_source_linear_split_into_three_pairs_its_parts_with_nothing():
    """One source ``qkv`` Linear cut into target ``q``, ``k``, ``v``: the set of source keys
    is all ``qkv`` holds, but each part is a third of its output; their parent pairs."""
    source = nn.Sequential(nn.ModuleDict({"qkv": nn.Linear(2, 6), "proj": nn.Linear(2, 2)}))
    target = nn.Sequential(nn.ModuleDict({"q": nn.Linear(2, 2), "k": nn.Linear(2, 2), "v": nn.Linear(2, 2), "proj": nn.Linear(2, 2)}))

    def rec(key: str, source_key: str) -> TargetRecord:
        return TargetRecord(key, "loaded", (2,), "float32", "parameter", 2, sources=(source_key,))

    records = [rec(f"0.{p}.{t}", f"0.qkv.{t}") for p in "qkv" for t in ("weight", "bias")]
    records += [rec("0.proj.weight", "0.proj.weight"), rec("0.proj.bias", "0.proj.bias")]
    pairing = pair_modules(source, target, records)
    assert pairing.pairs == [("", ""), ("0", "0"), ("0.proj", "0.proj")]
    assert pairing.unpaired_target == ["0.q", "0.k", "0.v"] and pairing.unpaired_source == ["0.qkv"]


def test_hooks_removed_and_flags_restored_when_a_forward_raises(tmp_path):
    class Breaks(nn.Sequential):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            self[0](x)
            raise RuntimeError("boom")

    source, target = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), Breaks(nn.Linear(2, 2), nn.Linear(2, 2))
    report = identity_load(tmp_path, source, target)
    target.train()
    target[1].eval()
    with pytest.raises(UsageError, match="the target model failed on the verify input.*RuntimeError: boom"):
        first_divergence(source, target, ([torch.randn(1, 2)], {}), report.targets, **TOL)
    assert no_hooks(source, target)
    assert target.training and target[0].training and not target[1].training and source.training
