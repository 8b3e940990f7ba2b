"""Drafts that use the rules language (issue 18, item 7): `remap diff --write` writes a `split`
for a fused qkv whose parts have their own targets (and a `merge` back), index arithmetic
instead of one rule per stage, and, where layers were picked, commented `map` choices — never
a pick. Every draft here is applied as written and the outputs compared with the source
library's own model (timm, torchvision, Hugging Face transformers, built offline from configs).

Factories below (``tests.diffing.test_draft_language:...``) are importable by name.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

import remap
from remap.cli import main

timm = pytest.importorskip("timm")
transformers = pytest.importorskip("transformers")
torchvision = pytest.importorskip("torchvision")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def timm_vit(depth: int = 2) -> torch.nn.Module:
    return timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=depth, num_heads=4,
                                                            mlp_ratio=2, num_classes=10)  # fmt: skip


def hf_vit() -> torch.nn.Module:
    """The same sizes as :func:`timm_vit`; timm's LayerNorm eps (1e-6) and exact GELU."""
    config = transformers.ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    intermediate_size=64, num_labels=10, layer_norm_eps=1e-6, hidden_act="gelu")  # fmt: skip
    return transformers.ViTForImageClassification(config).eval()


def hf_resnet18() -> torch.nn.Module:
    config = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[64, 128, 256, 512], depths=[2, 2, 2, 2], layer_type="basic",
                                       num_labels=10)  # fmt: skip
    return transformers.ResNetForImageClassification(config).eval()


def student_vit() -> torch.nn.Module:
    return timm_vit(depth=3)


def _randomized(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Every float tensor random (norms and biases too), so a wrong pairing shows in the outputs."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in model.state_dict().values():
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.2)
    return model.eval()


def _save(model: torch.nn.Module, path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _draft(capsys, tmp_path: Path, source: Path, target: str) -> tuple[Path, dict, str]:
    rules = tmp_path / "rules.yaml"
    code, out, err = run(capsys, "diff", source, f"tests.diffing.test_draft_language:{target}", "--write", rules)
    assert (code, err) == (0, ""), err
    text = rules.read_text()
    return rules, yaml.safe_load(text), text


def test_timm_vit_to_hugging_face_vit_drafts_the_qkv_split_and_applies_as_written(capsys, tmp_path):
    """The issue's check. HF's q/k/v/o_proj are all [32, 32]: the fused qkv is found by its
    name (q, k, v in that order) inside blocks the mlp pairs say correspond, and then
    attn.proj is the one [32, 32] left (o_proj). norm1/norm2 ~ layernorm_before/after by
    the order words. The draft loads every key and gives timm's logits."""
    source = _randomized(timm_vit())
    rules, parsed, text = _draft(capsys, tmp_path, _save(source, tmp_path / "vit.safetensors"), "hf_vit")
    splits = [s["split"] for s in parsed["rules"] if "split" in s]
    assert splits == [{"match": r"^blocks\.(\d+)\.attn\.qkv\.(bias|weight)$",
                       "into": [rf"vit.layers.\1.attention.{p}_proj.\2" for p in "qkv"], "dim": 0}]  # fmt: skip
    renames = parsed["rules"][0]["rename"]
    assert renames[r"^blocks\.(\d+)\.attn\.proj\."] == r"vit.layers.\1.attention.o_proj."
    assert renames[r"^blocks\.(\d+)\.norm1\."] == r"vit.layers.\1.layernorm_before."
    assert renames[r"^blocks\.(\d+)\.mlp\."] == r"vit.layers.\1.mlp."
    assert "UNDECLARED" not in text and "AMBIGUOUS" not in text
    target = hf_vit()
    assert remap.load(target, tmp_path / "vit.safetensors", rules=rules).ok
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(target(pixel_values=image).logits, source(image), rtol=1e-5, atol=1e-5)


def test_hugging_face_vit_to_timm_drafts_a_merge_in_the_names_order(capsys, tmp_path):
    """The other way: q_proj, k_proj, v_proj merge into qkv, in the order qkv names."""
    source = _randomized(hf_vit(), seed=3)
    rules, parsed, _ = _draft(capsys, tmp_path, _save(source, tmp_path / "hf.safetensors"), "timm_vit")
    merges = [s["merge"] for s in parsed["rules"] if "merge" in s]
    assert merges == [{"match": r"^vit\.layers\.(\d+)\.attention\.(q|k|v)_proj\.(bias|weight)$", "into": r"blocks.\1.attn.qkv.\3",
                       "order": ["q", "k", "v"], "dim": 0, "group": 2}]  # fmt: skip
    target = timm_vit().eval()
    assert remap.load(target, tmp_path / "hf.safetensors", rules=rules).ok
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(target(image), source(pixel_values=image).logits, rtol=1e-5, atol=1e-5)


def test_torchvision_resnet_to_hugging_face_resnet_is_stage_index_arithmetic(capsys, tmp_path):
    """layer1..4 -> stages.0..3 and conv1/2 -> layer.0/1: one rename per kind of module, with
    `add` in the mapping form, not one per stage; applied as written, torchvision's logits."""
    source = _randomized(torchvision.models.resnet18(num_classes=10))
    with torch.no_grad():
        for name, t in source.state_dict().items():
            if name.endswith("running_var"):
                t.abs_().add_(0.5)
    rules, parsed, text = _draft(capsys, tmp_path, _save(source, tmp_path / "tv.safetensors"), "hf_resnet18")
    (step,) = [s["rename"] for s in parsed["rules"] if "rename" in s]
    assert step[r"^layer(\d+)\.(\d+)\.conv(\d+)\."] == {"to": r"resnet.encoder.stages.\1.layers.\2.layer.\3.convolution.",
                                                        "add": {1: -1, 3: -1}}  # fmt: skip
    assert step[r"^layer(\d+)\.(\d+)\.bn(\d+)\."] == {"to": r"resnet.encoder.stages.\1.layers.\2.layer.\3.normalization.",
                                                      "add": {1: -1, 3: -1}}  # fmt: skip
    assert len(step) <= 8 and "UNDECLARED" not in text
    target = hf_resnet18()
    assert remap.load(target, tmp_path / "tv.safetensors", rules=rules).ok
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(target(pixel_values=image).logits, source(image), rtol=1e-4, atol=1e-4)


def test_a_distillation_student_gets_commented_map_choices_never_a_pick(capsys, tmp_path):
    """6 teacher blocks, 3 student blocks of the same make-up: the names match blocks 0..2,
    but that is no evidence of which layers the student takes. The draft writes `map`
    choices as comments and leaves the blocks undeclared: apply fails until one is chosen;
    with the 'evenly spaced' line uncommented, the student holds teacher blocks 0, 2, 4."""
    teacher = _randomized(timm_vit(depth=6), seed=5)
    ckpt = _save(teacher, tmp_path / "teacher.safetensors")
    rules, parsed, text = _draft(capsys, tmp_path, ckpt, "student_vit")
    assert "LAYERS PICKED" in text and "rules" not in (parsed or {})
    lines = [ln for ln in text.splitlines() if ln.lstrip().startswith("# - rename:") and "map:" in ln]
    assert any("{0: 0, 2: 1, 4: 2}" in ln for ln in lines) and any("{0: 0, 1: 1, 2: 2}" in ln for ln in lines)
    code, out, err = run(capsys, "apply", rules, "--target", "tests.diffing.test_draft_language:student_vit")
    assert code == 1 and "blocks.{3..5}." in out + err  # the teacher's other blocks are not silently dropped

    chosen = next(ln for ln in lines if "{0: 0, 2: 1, 4: 2}" in ln)
    body = text.replace("# rules:", "rules:", 1).replace(chosen, chosen.replace("# - rename", "- rename", 1).split("  #")[0])
    rules.write_text(body)
    student = student_vit().eval()
    assert remap.load(student, ckpt, rules=rules).ok
    state = teacher.state_dict()
    picked = {"blocks.0.": "blocks.0.", "blocks.1.": "blocks.2.", "blocks.2.": "blocks.4."}
    for k, v in student.state_dict().items():
        head = next((h for h in picked if k.startswith(h)), None)
        src = picked[head] + k[len(head) :] if head else k
        torch.testing.assert_close(v, state[src], rtol=0, atol=0)


# --------------------------------------------------------------------------- names and shapes only


def _block(prefix: str, names: dict[str, list[int]]) -> dict[str, list[int]]:
    return {prefix + k: v for k, v in names.items()}


def _timm_like(blocks: int, qkv: list[int]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for i in range(blocks):
        out |= _block(f"blocks.{i}.", {"attn.qkv.weight": qkv, "attn.proj.weight": [32, 32], "mlp.fc1.weight": [64, 32],
                                       "mlp.fc2.weight": [32, 64]})  # fmt: skip
    return out


def test_query_key_value_names_and_a_deeper_attention_module_still_split():
    """Older Hugging Face names (attention.attention.query/key/value, attention.output.dense,
    all [32, 32]): 'qkv' names q, k, v, which begin query, key, value; the split sits one
    module deeper than the fused key, and the dense output is what is left."""
    from remap.diffing.alignment import align
    from remap.diffing.draft import draft_rules

    tgt: dict[str, list[int]] = {}
    for i in range(2):
        tgt |= _block(f"encoder.layer.{i}.", {"attention.attention.query.weight": [32, 32], "attention.attention.key.weight": [32, 32],
                                              "attention.attention.value.weight": [32, 32], "attention.output.dense.weight": [32, 32],
                                              "mlp.fc1.weight": [64, 32], "mlp.fc2.weight": [32, 64]})  # fmt: skip
    a = align(_timm_like(2, [96, 32]), tgt)
    named = [r for r in a.regroups if r.detail]
    assert [(r.sources, r.targets) for r in named] == [
        ((f"blocks.{i}.attn.qkv.weight",), tuple(f"encoder.layer.{i}.attention.attention.{p}.weight" for p in ("query", "key", "value")))
        for i in range(2)
    ]
    assert "'qkv' names its parts q, k, v: query, key, value" in named[0].detail
    assert {p.source: p.target for p in a.pairs}["blocks.1.attn.proj.weight"] == "encoder.layer.1.attention.output.dense.weight"
    draft = draft_rules(a)
    (split,) = [s["split"] for s in draft.rules["rules"] if "split" in s]
    assert split["into"][0] == r"encoder.layer.\1.attention.attention.query.weight" and "sizes" not in split
    assert draft.loaded == len(tgt) and not draft.open_sources


def test_grouped_query_qkv_splits_with_sizes():
    """q [32, 32], k and v [16, 32] (grouped-query attention): unequal parts, so `sizes`."""
    from remap.diffing.alignment import align
    from remap.diffing.draft import draft_rules
    from remap.planning.planner import make_plan
    from remap.rules.parse import parse_rules

    src = _timm_like(2, [64, 32])
    tgt: dict[str, list[int]] = {}
    for i in range(2):
        tgt |= _block(f"layers.{i}.", {"self_attn.q_proj.weight": [32, 32], "self_attn.k_proj.weight": [16, 32],
                                       "self_attn.v_proj.weight": [16, 32], "self_attn.o_proj.weight": [32, 32],
                                       "mlp.fc1.weight": [64, 32], "mlp.fc2.weight": [32, 64]})  # fmt: skip
    draft = draft_rules(align(src, tgt))
    (split,) = [s["split"] for s in draft.rules["rules"] if "split" in s]
    assert split["sizes"] == [32, 16, 16] and split["dim"] == 0
    plan = make_plan(parse_rules(draft.rules), src, tgt)
    assert plan.ok and {a.target: a.sources for a in plan.assignments}["layers.1.self_attn.k_proj.weight"] == ("blocks.1.attn.qkv.weight",)


def test_a_fused_key_whose_name_lists_no_parts_stays_a_candidate():
    """nn.MultiheadAttention's in_proj_weight against q/k/v_proj: the name does not say the
    order of the parts, so nothing is written: a commented candidate, the keys undeclared."""
    from remap.diffing.alignment import align
    from remap.diffing.draft import draft_rules

    src = {"attn.in_proj_weight": [96, 32], "attn.out_proj.weight": [32, 32], "fc.weight": [10, 32]}
    tgt = {"attn.q_proj.weight": [32, 32], "attn.k_proj.weight": [32, 32], "attn.v_proj.weight": [32, 32], "fc.weight": [10, 32]}
    a = align(src, tgt)
    assert not [r for r in a.regroups if r.detail]
    draft = draft_rules(a)
    assert not any("split" in s for s in draft.rules.get("rules", [])) and "attn.in_proj_weight" in draft.open_sources
