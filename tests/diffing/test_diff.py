"""remap diff: aligning two key sets, drafting the rules, and the command line.

The three model pairs of issue 5 run end to end: ``remap diff SOURCE TARGET --write`` on a
checkpoint with random weights, then the drafted file applied as written (command line and
``remap.load``), then the outputs compared. Full-size models are under ``-m slow``.

Factories below (``tests.diffing.test_diff:...``) are importable by name: tests/ is on ``sys.path``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from torch import nn

import conversion_models as cm
import remap
from remap.cli import main
from remap.diffing.alignment import Alignment, Choice, Pair, PrefixChange, align, candidate_ops, index_tokens
from remap.meta import source_meta, target_meta
from remap.diffing.render import fold, format_alignment, summary_line
from remap.diffing.draft import cover, draft_rules

BERT_SMALL = {"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
              "intermediate_size": 64, "max_position_embeddings": 64}  # fmt: skip


# --------------------------------------------------------------------------- factories (targets by name)


def torchvision_resnet_small(num_classes: int = 10) -> nn.Module:
    """torchvision's ResNet with one BasicBlock per stage (resnet18's blocks, fewer of them)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


def timm_resnet_small(num_classes: int = 10) -> nn.Module:
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=num_classes)


def bert_config(**overrides):
    from transformers import BertConfig

    return BertConfig(**{**BERT_SMALL, **overrides})


def bert_encoder() -> nn.Module:
    from transformers import BertModel

    return BertModel(bert_config())


def bert_classifier(num_labels: int = 3) -> nn.Module:
    from transformers import BertForSequenceClassification

    return BertForSequenceClassification(bert_config(num_labels=num_labels))


def bert_base_classifier() -> nn.Module:
    from transformers import BertConfig, BertForSequenceClassification

    return BertForSequenceClassification(BertConfig(num_labels=3))


class Lin(nn.Module):
    """One Linear layer as ``lin``: a target whose weight is the transpose of the source's."""

    def __init__(self, n_in: int = 6, n_out: int = 4) -> None:
        super().__init__()
        self.lin = nn.Linear(n_in, n_out)


# --------------------------------------------------------------------------- helpers


def like_pretrained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Weights a wrong load cannot hide, at a scale that keeps the outputs finite and
    float32 error small: matrices at their init scale (at least 0.02), vectors spread by 0.1
    around their mean, BatchNorm variances in [0.5, 1.5]."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() >= 2:
                t.copy_(noise * max(float(t.std()) if t.numel() > 1 else 0.0, 0.02))
            else:
                t.copy_(t.mean() + noise * 0.1)
    return model.eval()


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def diff_write(capsys, tmp_path: Path, source: Path, target: str, *extra: str) -> tuple[Path, str, dict]:
    """``remap diff SOURCE TARGET --write rules.yaml``, checked, then ``remap validate``."""
    rules = tmp_path / "rules.yaml"
    code, out, err = run(capsys, "diff", source, target, "--write", rules, *extra)
    assert (code, err) == (0, ""), err
    assert f"wrote {rules}: " in out
    code, out_v, err = run(capsys, "validate", rules)
    assert (code, err) == (0, ""), err
    text = rules.read_text()
    return rules, text, yaml.safe_load(text)


def apply_cli(capsys, tmp_path: Path, rules: Path) -> tuple[dict, dict]:
    """``remap apply RULES --save --report`` with the source and target the file names."""
    report, saved = tmp_path / "report.json", tmp_path / "loaded.pt"
    code, out, err = run(capsys, "apply", rules, "--report", report, "--save", saved, "-q")
    assert (code, err) == (0, ""), err
    return json.loads(report.read_text()), torch.load(saved, weights_only=True)


def assert_loads_every_compatible_key(report: dict, missing: set[str] = frozenset(), dropped: set[str] = frozenset()) -> None:
    """Every target key loaded but the ``missing`` ones; every source key used but the ``dropped`` ones."""
    assert report["ok"] and report["failures"] == []
    for key, rec in report["targets"].items():
        assert rec["status"] == ("missing" if key in missing else "loaded"), (key, rec["status"])
    for key, rec in report["sources"].items():
        assert rec["fate"] == ("dropped" if key in dropped else "used"), (key, rec["fate"])


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-5) -> None:
    assert actual.shape == expected.shape
    assert expected.abs().max() > 100 * atol, "a trivial output proves nothing"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0)


# --------------------------------------------------------------------------- the alignment, on metadata


def test_module_prefix_is_found_in_the_data_and_drafted_as_strip_prefix():
    src = {"module.conv.weight": [4, 3, 3, 3], "module.bn.weight": [4], "module.bn.bias": [4], "module.fc.weight": [5, 4]}
    tgt = {"conv.weight": [4, 3, 3, 3], "bn.weight": [4], "bn.bias": [4], "fc.weight": [5, 4]}
    a = align(src, tgt)
    assert [(p.source, p.target, p.evidence, p.detail) for p in a.pairs] == [
        (f"module.{k}", k, "prefix", "strip 'module.'") for k in tgt
    ]
    assert a.prefixes == (PrefixChange("module.", "", 4),)
    assert (a.choices, a.source_only, a.target_only, a.conflicts) == ((), (), (), ())
    draft = draft_rules(a)
    assert draft.rules == {"version": 1, "rules": [{"strip_prefix": "module."}]}
    assert "  - strip_prefix: 'module.'  # 4 keys, prefix found in the names\n" in draft.text


def test_other_prefixes_are_found_too_and_a_replaced_prefix_is_one_rename():
    src = {f"backbone.layer{i}.{p}": [8] for i in range(3) for p in ("weight", "bias")}
    tgt = {f"encoder.layer{i}.{p}": [8] for i in range(3) for p in ("weight", "bias")}
    a = align(src, tgt)
    assert {p.evidence for p in a.pairs} == {"prefix"}
    assert a.prefixes == (PrefixChange("backbone.", "encoder.", 6),)
    assert draft_rules(a).rules["rules"] == [{"rename": {r"^backbone\.": "encoder."}}]


def test_index_offset_is_one_family_rule_with_add():
    """An inserted layer shifts features.N by one: paired on the family, written with `add`
    (the keys that keep their index are left alone)."""
    src = {"features.0.weight": [8, 3], "features.2.weight": [16, 8], "features.2.bias": [16], "features.4.weight": [32, 16],
           "features.4.bias": [32]}  # fmt: skip
    tgt = {"features.0.weight": [8, 3], "features.3.weight": [16, 8], "features.3.bias": [16], "features.5.weight": [32, 16],
           "features.5.bias": [32]}  # fmt: skip
    a = align(src, tgt)
    assert [(p.source, p.target, p.evidence) for p in a.pairs] == [
        ("features.0.weight", "features.0.weight", "exact"),
        ("features.2.weight", "features.3.weight", "offset"),
        ("features.2.bias", "features.3.bias", "offset"),
        ("features.4.weight", "features.5.weight", "offset"),
        ("features.4.bias", "features.5.bias", "offset"),
    ]
    assert a.pairs[1].detail == "index +1 in 'features.#'"
    rules = draft_rules(a).rules["rules"]
    assert rules == [{"rename": {r"^features\.(2|4)\.": {"to": r"features.\1.", "add": {1: 1}}}}]
    plan = remap.plan(tgt, src, {"version": 1, "rules": rules})
    assert plan.ok and {x.target: x.sources for x in plan.assignments}["features.5.bias"] == ("features.4.bias",)


def test_two_same_shaped_candidates_with_unrelated_names_are_a_choice_and_nothing_is_written_for_them(capsys):
    src = {"stem.weight": [4, 3], "foo.weight": [8, 8]}
    tgt = {"stem.weight": [4, 3], "bar.weight": [8, 8], "baz.weight": [8, 8]}
    a = align(src, tgt)
    assert [p.source for p in a.pairs] == ["stem.weight"]
    assert a.choices == (Choice((8, 8), ("foo.weight",), ("bar.weight", "baz.weight"), a.choices[0].reason),)
    assert a.choices[0].reason == "1 source and 2 target key(s) of shape [8, 8]; names and structure do not tell them apart"
    assert (a.source_only, a.target_only) == ((), ())
    draft = draft_rules(a)
    assert draft.rules == {"version": 1}  # no rename, no drop, no expect.missing: the user chooses, and apply fails until then
    assert (draft.open_sources, draft.open_targets) == (("foo.weight",), ("bar.weight", "baz.weight"))
    assert draft.text.endswith(
        "# rules:                  # uncomment this line too when you uncomment a choice below\n"
        "  # AMBIGUOUS, not written: foo.weight [8, 8] could feed any of bar.weight, baz.weight; each line is one candidate, not a pick: set the target you choose, then uncomment it (each target once)\n"
        "  # - rename: {'^foo\\.weight$': 'bar.weight'}  # choice: foo.weight -> bar.weight or baz.weight (same shape [8, 8])\n"
        "\n"
        "# UNDECLARED, so `remap apply` fails and lists them until you decide:\n"
        "#   ambiguous keys: choose with the commented renames in rules (or drop / expect.missing what you do not want)\n"
    )
    plan = remap.plan(tgt, src, draft.rules)
    assert [(f.kind, f.keys) for f in plan.failures] == [("missing", ("bar.weight", "baz.weight")), ("unused", ("foo.weight",))]
    text = format_alignment(a)
    assert "Ambiguous (1): never guessed; choose, then write the rename yourself\n  foo.weight [8, 8] -> one of: bar.weight, baz.weight\n" in text


def test_a_common_dotted_suffix_pairs_when_it_names_one_key_on_each_side():
    src = {"a.fc.weight": [10, 4], "b.norm.weight": [4], "x.proj.weight": [5]}
    tgt = {"c.d.fc.weight": [10, 4], "e.norm.weight": [4], "p.proj.weight": [5], "q.proj.weight": [5]}
    a = align(src, tgt)
    assert [(p.source, p.target, p.evidence, p.detail) for p in a.pairs] == [
        ("a.fc.weight", "c.d.fc.weight", "suffix", "common suffix 'fc.weight'"),
        ("b.norm.weight", "e.norm.weight", "suffix", "common suffix 'norm.weight'"),
    ]
    assert a.choices[0].targets == ("p.proj.weight", "q.proj.weight")  # 'proj.weight' names two: not a guess to make


def test_structure_pairs_blocks_whose_names_differ_entirely_and_numbers_break_ties():
    """The source sorted by name (as a safetensors file is): no definition order to lean on."""
    block_s = {"attn.qkv.weight": [24, 8], "attn.qkv.bias": [24], "norm1.weight": [8], "norm1.bias": [8], "norm2.weight": [8],
               "norm2.bias": [8]}  # fmt: skip
    block_t = {"ln_1.weight": [8], "ln_1.bias": [8], "self_attention.in_proj_weight": [24, 8], "self_attention.in_proj_bias": [24],
               "ln_2.weight": [8], "ln_2.bias": [8]}  # fmt: skip
    src = dict(sorted({f"blocks.{i}.{k}": v for i in range(3) for k, v in block_s.items()}.items()))
    tgt = {f"encoder.layers.encoder_layer_{i}.{k}": v for i in range(3) for k, v in block_t.items()}
    a = align(src, tgt)
    assert {p.evidence for p in a.pairs} == {"structure"} and len(a.pairs) == 18
    pairs = {p.source: p.target for p in a.pairs}
    assert pairs["blocks.2.norm2.bias"] == "encoder.layers.encoder_layer_2.ln_2.bias"
    assert pairs["blocks.1.attn.qkv.weight"] == "encoder.layers.encoder_layer_1.self_attention.in_proj_weight"
    norm = next(p for p in a.pairs if p.source == "blocks.0.norm1.weight")
    assert norm.detail == "'blocks.#' ~ 'encoder.layers.encoder_layer_#', by number"
    assert draft_rules(a).rules["rules"] == [{"rename": {
        r"^blocks\.(\d+)\.attn\.qkv\.": r"encoder.layers.encoder_layer_\1.self_attention.in_proj_",
        r"^blocks\.(\d+)\.norm1\.": r"encoder.layers.encoder_layer_\1.ln_1.",
        r"^blocks\.(\d+)\.norm2\.": r"encoder.layers.encoder_layer_\1.ln_2.",
    }}]  # fmt: skip


def test_same_shaped_modules_without_numbers_are_a_choice_whatever_the_order():
    """Definition order is not evidence: a library may declare a block's modules in any order."""
    tgt = {"b.start.weight": [8], "b.end.weight": [8], "b.proj.weight": [4, 8]}  # not sorted: definition order
    for src in (dict(sorted({"a.pre.weight": [8], "a.post.weight": [8], "a.fc.weight": [4, 8]}.items())),
                {"a.pre.weight": [8], "a.post.weight": [8], "a.fc.weight": [4, 8]}):  # fmt: skip
        a = align(src, tgt)
        assert [(p.source, p.target) for p in a.pairs] == [("a.fc.weight", "b.proj.weight")]
        assert a.choices == (Choice((8,), tuple(k for k in src if k != "a.fc.weight"), ("b.start.weight", "b.end.weight"),
                                    "2 source and 2 target key(s) of shape [8]; names and structure do not tell them apart"),)  # fmt: skip


def test_order_never_pairs_same_shaped_top_level_keys():
    """Definition order is evidence inside a module, not among unrelated top-level keys."""
    a = align({"stem.weight": [4, 3], "a.weight": [8, 8], "b.weight": [8, 8]}, {"stem.weight": [4, 3], "y.weight": [8, 8], "x.weight": [8, 8]})
    assert [p.source for p in a.pairs] == ["stem.weight"]
    assert a.choices[0].sources == ("a.weight", "b.weight") and a.choices[0].targets == ("y.weight", "x.weight")


def test_shape_conflicts_list_the_ops_that_could_fix_them():
    assert candidate_ops((64, 192), (192, 64)).ops == ("transpose",)
    assert candidate_ops((2, 3, 4), (4, 3, 2)).fix == "permute"
    assert candidate_ops((1000, 512), (10, 512)).ops == ("slice dim 0 (1000 -> 10)",)
    assert candidate_ops((10, 512), (1000, 512)).ops == ("pad dim 0 (10 -> 1000)",)
    assert candidate_ops((64, 32), (128, 32)).ops == ("pad dim 0 (64 -> 128)", "merge 2 along dim 0")
    assert candidate_ops((192, 64), (64, 64)).ops == ("slice dim 0 (192 -> 64)", "split dim 0 into 3 (as qkv)")
    assert candidate_ops((64, 3, 7, 7), (64, 1, 7, 7)).ops == ("slice dim 1 (3 -> 1)", "split dim 1 into 3 (as qkv)",
                                                              "adapt in_channels (3 -> 1)")  # fmt: skip
    assert candidate_ops((1, 17, 64), (1, 65, 64)).ops == ("pad dim 1 (17 -> 65)", "adapt interpolate (17 -> 65 tokens)")
    assert candidate_ops((768, 768, 1, 1), (768, 768)).ops == ("reshape (only size-1 dims differ)",)
    assert candidate_ops((6, 4), (3, 8)).ops == ("reshape (same number of elements)",)
    assert candidate_ops((6, 4), (3, 5)).ops == ()


def test_transposed_shapes_are_written_as_a_transpose_step_and_load_transposed(tmp_path):
    source = {"lin.weight": torch.randn(6, 4), "lin.bias": torch.randn(4)}  # stored as (in, out), like HF's Conv1D
    a = align(source, Lin())
    (weight,) = a.conflicts
    assert (weight.source, weight.conflict.ops, weight.conflict.fix) == ("lin.weight", ("transpose",), "transpose")
    draft = draft_rules(a)
    assert draft.rules["rules"] == [{"transpose": r"^lin\.weight$"}]
    assert "  - transpose: '^lin\\.weight$'  # 1 key, shapes reversed\n" in draft.text
    model = Lin()
    assert remap.load(model, source, rules=draft.rules).ok
    assert torch.equal(model.lin.weight.detach(), source["lin.weight"].T)


def test_square_matrices_next_to_transposed_ones_get_a_note():
    src = {"h.0.c_attn.weight": [8, 24], "h.0.c_proj.weight": [8, 8]}
    tgt = {"h.0.c_attn.weight": [24, 8], "h.0.c_proj.weight": [8, 8]}
    a = align(src, tgt)
    assert a.notes == ("1 square matrix paired as it is (h.0.c_proj.weight) while other 'weight' keys need a transpose: "
                       "a square shape cannot tell; check whether they need one too",)  # fmt: skip
    assert "  # NOTE: 1 square matrix paired as it is" in draft_rules(a).text
    assert "\nNotes\n  1 square matrix paired as it is" in format_alignment(a)


def test_an_unfixable_conflict_is_dropped_and_declared_missing_with_its_candidate_ops():
    src = {"conv.weight": [4, 3, 3, 3], "fc.weight": [1000, 4], "fc.bias": [1000]}
    tgt = {"conv.weight": [4, 3, 3, 3], "fc.weight": [10, 4], "fc.bias": [10]}
    a = align(src, tgt)
    assert [(p.source, p.evidence, p.conflict.ops if p.conflict else None) for p in a.pairs] == [
        ("conv.weight", "exact", None),
        ("fc.weight", "exact", ("slice dim 0 (1000 -> 10)",)),
        ("fc.bias", "exact", ("slice dim 0 (1000 -> 10)",)),
    ]
    draft = draft_rules(a)
    assert draft.rules["rules"] == [{"drop": [r"^fc\."]}] and draft.rules["expect"] == {"missing": [r"^fc\."]}
    assert ("# SHAPE CONFLICT, not loaded: fc.weight [1000, 4] -> fc.weight [10, 4] (exact); "
            "candidate ops: slice dim 0 (1000 -> 10)\n") in draft.text  # fmt: skip
    assert ("Shape conflicts (2): paired, but the shapes differ\n"
            "  fc.weight [1000, 4] -> fc.weight [10, 4]: slice dim 0 (1000 -> 10)  [--write leaves it unloaded]\n"
            ) in format_alignment(a)  # fmt: skip


def test_a_name_match_with_the_wrong_shape_yields_to_a_better_explanation():
    """features.3 exists on both sides, but its shape says features.3 became features.4."""
    src = {"features.3.weight": [16, 8], "features.3.bias": [16]}
    tgt = {"features.3.weight": [8, 8], "features.3.bias": [8], "features.4.weight": [16, 8], "features.4.bias": [16]}
    a = align(src, tgt)
    assert {p.source: (p.target, p.evidence) for p in a.pairs} == {
        "features.3.weight": ("features.4.weight", "offset"), "features.3.bias": ("features.4.bias", "offset")}  # fmt: skip
    assert a.target_only == ("features.3.weight", "features.3.bias")


def test_rules_that_would_catch_another_familys_key_are_narrowed():
    """`^blocks\\.(\\d+)\\.attn\\.` would also rename blocks.N.attn_norm..., which keeps its name."""
    src = {"blocks.0.attn.w": [4, 4], "blocks.1.attn.w": [4, 4], "blocks.0.attn.b": [4, 2], "blocks.1.attn.b": [4, 2],
           "blocks.0.norm.w": [3], "blocks.1.norm.w": [3]}  # fmt: skip
    tgt = {"blocks.0.attention.w": [4, 4], "blocks.1.attention.w": [4, 4], "blocks.0.attention.b": [4, 2],
           "blocks.1.attention.b": [4, 2], "blocks.0.attn.norm.w": [3], "blocks.1.attn.norm.w": [3]}  # fmt: skip
    a = align(src, tgt)
    assert len(a.pairs) == 6
    draft = draft_rules(a)  # checked by the planner inside: every pair loads as aligned
    plan = remap.plan(tgt, src, draft.rules)
    assert plan.ok and plan.report.totals.loaded == 6


def test_tokens_cover_and_fold():
    assert index_tokens("layer1.0.conv1.weight") == [("layer1.", False), ("0", True), (".conv1.weight", False)]
    assert cover(["fc.weight"], ["fc.weight", "fc.bias"]) == [(r"^fc\.weight$", ("fc.weight",))]
    assert cover(["a.0.x", "a.1.x", "a.1.y"], ["a.0.x", "a.0.y", "a.1.x", "a.1.y"]) == [
        (r"^a\.0\.x$", ("a.0.x",)), (r"^a\.1\.", ("a.1.x", "a.1.y"))]  # fmt: skip
    assert fold(["x.encoder_layer_0.w", "x.encoder_layer_1.w"]) == ["x.encoder_layer_{0, 1}.w"]


def test_alignment_of_many_keys_is_fast():
    """A 96-block model, 1,000+ keys a side, names differing entirely."""
    block = {"norm1.weight": [64], "norm1.bias": [64], "attn.qkv.weight": [192, 64], "attn.qkv.bias": [192],
             "attn.proj.weight": [64, 64], "attn.proj.bias": [64], "mlp.fc1.weight": [256, 64], "mlp.fc2.weight": [64, 256]}  # fmt: skip
    names = {"norm1.weight": "ln_1.weight", "norm1.bias": "ln_1.bias", "attn.qkv.weight": "sa.in_proj_weight",
             "attn.qkv.bias": "sa.in_proj_bias", "attn.proj.weight": "sa.out_proj.weight", "attn.proj.bias": "sa.out_proj.bias",
             "mlp.fc1.weight": "mlp.0.weight", "mlp.fc2.weight": "mlp.3.weight"}  # fmt: skip
    src = {f"module.blocks.{i}.{k}": v for i in range(96) for k, v in block.items()}
    tgt = {f"enc.layer_{i}.{names[k]}": v for i in range(96) for k, v in block.items()}
    start = time.perf_counter()
    a = align(src, tgt)
    draft = draft_rules(a)
    assert time.perf_counter() - start < 10
    assert len(a.pairs) == len(src) and len(draft.rules["rules"][0]["rename"]) == 5


# --------------------------------------------------------------------------- 1. timm ViT -> torchvision ViT


VIT_RULES = {
    r"^blocks\.(\d+)\.attn\.proj\.": r"encoder.layers.encoder_layer_\1.self_attention.out_proj.",
    r"^blocks\.(\d+)\.attn\.qkv\.": r"encoder.layers.encoder_layer_\1.self_attention.in_proj_",
    r"^blocks\.(\d+)\.mlp\.fc1\.": r"encoder.layers.encoder_layer_\1.mlp.0.",
    r"^blocks\.(\d+)\.mlp\.fc2\.": r"encoder.layers.encoder_layer_\1.mlp.3.",
    r"^blocks\.(\d+)\.norm1\.": r"encoder.layers.encoder_layer_\1.ln_1.",
    r"^blocks\.(\d+)\.norm2\.": r"encoder.layers.encoder_layer_\1.ln_2.",
    r"^cls_token$": "class_token",
    r"^head\.": "heads.head.",
    r"^norm\.": "encoder.ln.",
    r"^patch_embed\.proj\.": "conv_proj.",
    r"^pos_embed$": "encoder.pos_embedding",
}


def _vit_roundtrip(capsys, tmp_path, source: nn.Module, target: str, build, image: torch.Tensor) -> dict:
    ckpt = tmp_path / "vit.safetensors"  # sorted by name: the alignment cannot lean on definition order
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(ckpt))
    expected = source(image)
    rules, text, parsed = diff_write(capsys, tmp_path, ckpt, target)
    report, saved = apply_cli(capsys, tmp_path, rules)
    assert_loads_every_compatible_key(report)
    model = build().eval()
    model.load_state_dict(saved)
    assert_close(model(image), expected)
    model = build().eval()
    assert remap.load(model, ckpt, rules=rules).ok
    assert_close(model(image), expected)
    return parsed


@torch.no_grad()
def test_timm_vit_to_torchvision_vit(capsys, tmp_path):
    source = like_pretrained(cm.timm_vit())
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    parsed = _vit_roundtrip(capsys, tmp_path, source, "conversion_models:torchvision_vit", cm.torchvision_vit, image)
    assert parsed == {"version": 1, "source": {"path": "vit.safetensors"}, "target": {"model": "conversion_models:torchvision_vit"},
                      "rules": [{"rename": VIT_RULES}]}  # fmt: skip


@pytest.mark.slow
@torch.no_grad()
def test_timm_vit_base_to_torchvision_vit_b_16(capsys, tmp_path):
    import timm
    import torchvision

    source = like_pretrained(timm.create_model("vit_base_patch16_224"))
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    parsed = _vit_roundtrip(capsys, tmp_path, source, "torchvision.models:vit_b_16", torchvision.models.vit_b_16, image)
    assert parsed["rules"] == [{"rename": VIT_RULES}]


# --------------------------------------------------------------------------- 2. timm ResNet -> torchvision ResNet


def _resnet_roundtrip(capsys, tmp_path, source: nn.Module, target: str, build, extra: tuple[str, ...] = ()) -> str:
    ckpt = tmp_path / "resnet.pth"
    torch.save({"state_dict": source.state_dict(), "epoch": 90}, ckpt)  # a training checkpoint: weights nested
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = source(image)
    rules, text, parsed = diff_write(capsys, tmp_path, ckpt, target, *extra)
    assert "rules" not in parsed and "# rules: none needed: every paired key has the same name and shape on both sides\n" in text
    report, saved = apply_cli(capsys, tmp_path, rules)
    assert_loads_every_compatible_key(report)
    model = build().eval()
    assert remap.load(model, ckpt, rules=rules).ok
    with torch.no_grad():
        assert_close(model(image), expected)
    return text


def test_timm_resnet_to_torchvision_resnet(capsys, tmp_path):
    text = _resnet_roundtrip(capsys, tmp_path, like_pretrained(timm_resnet_small()), "tests.diffing.test_diff:torchvision_resnet_small",
                             torchvision_resnet_small)  # fmt: skip
    assert ("\nsource:\n  path: 'resnet.pth'\n  key: 'state_dict'  # where the weights sit in the checkpoint (found by remap diff)\n"
            "\ntarget:\n  model: 'tests.diffing.test_diff:torchvision_resnet_small'\n") in text  # fmt: skip


def test_timm_resnet_to_torchvision_resnet_with_another_head(capsys, tmp_path):
    """--target-kwargs gives the target 5 classes: the head conflicts, is dropped and declared missing."""
    source = like_pretrained(timm_resnet_small(num_classes=10))
    ckpt = tmp_path / "resnet.pth"
    torch.save(source.state_dict(), ckpt)
    rules, text, parsed = diff_write(capsys, tmp_path, ckpt, "tests.diffing.test_diff:torchvision_resnet_small", "--target-kwargs", '{"num_classes": 5}')
    assert parsed["target"] == {"model": "tests.diffing.test_diff:torchvision_resnet_small", "kwargs": {"num_classes": 5}}
    assert parsed["rules"] == [{"drop": [r"^fc\."]}] and parsed["expect"] == {"missing": [r"^fc\."]}
    assert "# SHAPE CONFLICT, not loaded: fc.weight [10, 512] -> fc.weight [5, 512] (exact); candidate ops: slice dim 0 (10 -> 5); split dim 0 into 2\n" in text
    report, _ = apply_cli(capsys, tmp_path, rules)
    assert_loads_every_compatible_key(report, missing={"fc.weight", "fc.bias"}, dropped={"fc.weight", "fc.bias"})


@pytest.mark.slow
def test_timm_resnet50_to_torchvision_resnet50(capsys, tmp_path):
    import timm
    import torchvision

    _resnet_roundtrip(capsys, tmp_path, like_pretrained(timm.create_model("resnet50")), "torchvision.models:resnet50",
                      torchvision.models.resnet50)  # fmt: skip


# --------------------------------------------------------------------------- 3. BERT encoder -> BertForSequenceClassification


BERT_TEXT_TAIL = """\
version: 1

source:
  path: 'bert.safetensors'

target:
  model: 'tests.diffing.test_diff:{factory}'

rules:
  - add_prefix: 'bert.'  # {n} keys, prefix found in the names

expect:
  missing:                 # target keys nothing loads: they keep their initial values
    - '^classifier\\.'  # classifier.{{bias, weight}}
"""


def _bert_roundtrip(capsys, tmp_path, source: nn.Module, factory: str, build, vocab: int) -> None:
    ckpt = tmp_path / "bert.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(ckpt))
    ids = torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = source(input_ids=ids)
    rules, text, parsed = diff_write(capsys, tmp_path, ckpt, f"tests.diffing.test_diff:{factory}")
    assert text.endswith(BERT_TEXT_TAIL.format(factory=factory, n=len(source.state_dict())))
    report, saved = apply_cli(capsys, tmp_path, rules)
    assert_loads_every_compatible_key(report, missing={"classifier.weight", "classifier.bias"})
    model = build().eval()
    assert remap.load(model, ckpt, rules=rules).ok
    with torch.no_grad():
        got = model.bert(input_ids=ids)
    assert_close(got.last_hidden_state, expected.last_hidden_state)
    assert_close(got.pooler_output, expected.pooler_output)


def test_bert_encoder_to_bert_for_sequence_classification(capsys, tmp_path):
    _bert_roundtrip(capsys, tmp_path, like_pretrained(bert_encoder()), "bert_classifier", bert_classifier, BERT_SMALL["vocab_size"])


@pytest.mark.slow
def test_bert_base_encoder_to_bert_for_sequence_classification(capsys, tmp_path):
    from transformers import BertConfig, BertModel

    _bert_roundtrip(capsys, tmp_path, like_pretrained(BertModel(BertConfig())), "bert_base_classifier", bert_base_classifier, 30522)


# --------------------------------------------------------------------------- the command line


@pytest.fixture
def ddp_ckpt(tmp_path: Path) -> Path:
    """A Small model saved from DistributedDataParallel, with a head the target lacks and a stray key."""
    from weights import Small, perturb

    state = {f"module.{k}": v for k, v in perturb(Small(), seed=1).state_dict().items()}
    state["module.aux.weight"] = torch.randn(7, 3)
    path = tmp_path / "ddp.pth"
    torch.save(state, path)
    return path


def test_cli_table_pins_every_line_format(capsys, tmp_path, ddp_ckpt):
    code, out, err = run(capsys, "diff", ddp_ckpt, "tests.diffing.test_diff:Lin")
    assert (code, err) == (0, "")
    assert out.splitlines()[:3] == [f"remap diff: {ddp_ckpt} (9 tensors) -> tests.diffing.test_diff:Lin (2 keys)", "", "Aligned: 0 of 9 source keys -> 0 of 2 target keys"]
    code, out, err = run(capsys, "diff", ddp_ckpt, "weights:Small", "--target-kwargs", '{"num_classes": 3}')
    assert (code, err) == (0, "")
    assert out == (
        f"remap diff: {ddp_ckpt} (9 tensors) -> weights:Small(num_classes=3) (8 keys)\n"
        "  prefix: strip 'module.' (8 keys)\n"
        "\n"
        "Aligned: 8 of 9 source keys -> 8 of 8 target keys\n"
        "  evidence  keys  source -> target\n"
        "  prefix       8  module.* -> *  (strip 'module.')\n"
        "\n"
        "Shape conflicts (2): paired, but the shapes differ\n"
        "  module.fc.weight [5, 4] -> fc.weight [3, 4]: slice dim 0 (5 -> 3)  [--write leaves it unloaded]\n"
        "  module.fc.bias [5] -> fc.bias [3]: slice dim 0 (5 -> 3)  [--write leaves it unloaded]\n"
        "\n"
        "Source only (1): no target key takes them\n"
        "  module.aux.weight  [7, 3]\n"
        "\n"
        "8 paired (8 prefix); 2 shape conflicts; 0 ambiguous; 1 source only; 0 target only\n"
    )


def test_cli_write_pins_the_file_and_the_message(capsys, tmp_path, ddp_ckpt):
    rules = tmp_path / "out" / "rules.yaml"
    code, out, err = run(capsys, "diff", ddp_ckpt, "weights:Small", "--write", rules)
    assert (code, err) == (0, "")
    assert out.endswith(
        f"\nwrote {rules}: 1 rename rule; loads 8 of 8 target keys; drops 1 source key; 0 target keys keep their initial values\n"
        f"review every line, then: remap apply {rules}\n"
    )
    assert rules.read_text() == (
        "# Drafted by `remap diff` (remap 0.1.0). REVIEW IT BEFORE USE: nothing here was checked\n"
        "# against the tensors' values. Each line rests on the evidence in its comment (names, shapes and\n"
        "# the modules they sit in); read every one, then load with `remap apply` and compare the outputs.\n"
        f"#   source: {ddp_ckpt} (9 tensors)\n"
        "#   target: weights:Small (8 keys)\n"
        "# Loads 8 of 8 target keys; drops 1 source key; 0 target keys keep their initial values.\n"
        "version: 1\n"
        "\n"
        "source:\n"
        "  path: '../ddp.pth'\n"
        "\n"
        "target:\n"
        "  model: 'weights:Small'\n"
        "\n"
        "rules:\n"
        "  - drop:                    # source keys that reach no target key\n"
        "      - '^module\\.aux\\.'  # module.aux.weight\n"
        "  - strip_prefix: 'module.'  # 8 keys, prefix found in the names\n"
    )
    code, out, err = run(capsys, "apply", rules, "-q")
    assert (code, out, err) == (0, "", "")
    code, out, err = run(capsys, "diff", ddp_ckpt, "weights:Small", "--write", rules)  # never overwritten unasked
    assert (code, out) == (2, "") and err == f"remap: error: '{rules}' exists; pass --force to replace it\n"
    code, out, err = run(capsys, "diff", ddp_ckpt, "weights:Small", "--write", rules, "--force")
    assert code == 0
    assert [p.name for p in rules.parent.iterdir()] == ["rules.yaml"]  # written atomically: no temporary left


def test_cli_json(capsys, tmp_path, ddp_ckpt):
    code, out, err = run(capsys, "diff", ddp_ckpt, "weights:Small", "--json", "--write", tmp_path / "r.yaml")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["version"] == 1 and data["target"] == {"kind": "factory", "model": "weights:Small", "args": [], "kwargs": {},
                                                      "text": "weights:Small"}  # fmt: skip
    assert data["totals"] == {"source_keys": 9, "target_keys": 8, "paired": 8, "paired_targets": 8, "by_evidence": {"prefix": 8}, "conflicts": 0,
                              "ambiguous_source_keys": 0, "ambiguous_target_keys": 0, "source_only": 1, "target_only": 0}  # fmt: skip
    assert data["pairs"][0] == {"source": "module.conv.weight", "target": "conv.weight", "evidence": "prefix",
                                "detail": "strip 'module.'", "source_shape": [4, 3, 3, 3], "target_shape": [4, 3, 3, 3], "conflict": None}  # fmt: skip
    assert data["source_only"] == [{"key": "module.aux.weight", "shape": [7, 3]}]
    assert data["prefixes"] == [{"strip": "module.", "add": "", "keys": 8}]
    assert data["written"]["path"] == str(tmp_path / "r.yaml")


def test_cli_exit_codes(capsys, tmp_path, ddp_ckpt):
    code, out, err = run(capsys, "diff", tmp_path / "nope.pth", "weights:Small")
    assert code == 3 and out == "" and err.startswith("remap: error: ")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a checkpoint")
    assert run(capsys, "diff", garbage, "weights:Small")[0] == 3
    code, out, err = run(capsys, "diff", ddp_ckpt, "weights:NoSuchModel")
    assert code == 3 and "NoSuchModel" in err
    assert run(capsys, "diff", ddp_ckpt, tmp_path / "missing-target.pth")[0] == 3
    assert run(capsys, "diff", ddp_ckpt, garbage)[0] == 3
    code, out, err = run(capsys, "diff", ddp_ckpt)
    assert code == 2 and "the following arguments are required: TARGET" in err
    code, out, err = run(capsys, "diff", ddp_ckpt, "weights:Small", "--target-kwargs", "{num_classes: 3}")
    assert code == 2 and err.startswith("remap: error: --target-kwargs: expected a JSON object")
    assert run(capsys, "diff", ddp_ckpt, "weights:Small", "--target-kwargs", "[3]")[0] == 2
    assert run(capsys, "diff", ddp_ckpt, "weights:Small", "--bogus")[0] == 2
    assert run(capsys, "diff", ddp_ckpt, "weights:Small")[0] == 0


def test_cli_diff_against_a_checkpoint_target(capsys, tmp_path, ddp_ckpt):
    from weights import Small

    target = tmp_path / "target.safetensors"
    save_file(Small().state_dict(), str(target))
    rules = tmp_path / "rules.yaml"
    code, out, err = run(capsys, "diff", ddp_ckpt, target, "--write", rules)
    assert (code, err) == (0, "")
    text = rules.read_text()
    assert "# target: the diff compared a checkpoint; give the model with --target module.path:callable\n" in text
    assert run(capsys, "apply", rules, "--target", "weights:Small", "-q")[0] == 0


def test_summary_line_counts_by_evidence():
    a = align({"a.w": [2], "m.b.w": [3], "n.c.w": [4], "z": [5]}, {"a.w": [2], "x.b.w": [3], "y.c.w": [4], "q": [6]})
    assert summary_line(a) == "3 paired (1 exact, 2 suffix); 0 shape conflicts; 0 ambiguous; 1 source only; 1 target only"


def test_cli_nested_weights_are_found_and_the_key_written(capsys, tmp_path):
    """A training checkpoint: the weights under 'state_dict', found and said so; --source-key works too."""
    from weights import Small

    ckpt = tmp_path / "train.ckpt"
    torch.save({"state_dict": Small().state_dict(), "epoch": 3, "optimizer": {"lr": 0.1}}, ckpt)
    code, out, err = run(capsys, "diff", ckpt, "weights:Small", "--write", tmp_path / "a.yaml")
    assert (code, err) == (0, "")
    assert out.splitlines()[1] == "  weights found under 'state_dict' in the checkpoint"
    assert "  path: 'train.ckpt'\n  key: 'state_dict'  # where the weights sit in the checkpoint (found by remap diff)\n" in (tmp_path / "a.yaml").read_text()
    code, out, err = run(capsys, "diff", ckpt, "weights:Small", "--source-key", "state_dict", "--write", tmp_path / "b.yaml")
    assert (code, err) == (0, "") and "weights found under" not in out
    assert "  key: 'state_dict'  # where the weights sit in the checkpoint\n" in (tmp_path / "b.yaml").read_text()
    assert run(capsys, "apply", tmp_path / "b.yaml", "-q")[0] == 0
    assert run(capsys, "diff", ckpt, "weights:Small", "--source-key", "nope")[0] == 3


def test_merge_and_split_candidates_are_shown_not_written():
    a = align(cm.qkv_stack().state_dict(), cm.mha_stack())
    assert [(r.kind, r.sources, r.targets, r.dim) for r in a.regroups][0] == (
        "merge", ("layers.0.attn.q_proj.weight", "layers.0.attn.k_proj.weight", "layers.0.attn.v_proj.weight"),
        ("layers.0.attn.in_proj_weight",), 0)  # fmt: skip
    assert len(a.regroups) == 4 and a.source_only and a.target_only
    assert ("Merge or split candidates (4): left unloaded; one key is several on the other side\n"
            "  layers.{0, 1}.attn.q_proj.weight, layers.{0, 1}.attn.k_proj.weight, layers.{0, 1}.attn.v_proj.weight -> "
            "layers.{0, 1}.attn.in_proj_weight: merge 3 along dim 0  [the order of the parts is yours to check]\n") in format_alignment(a)  # fmt: skip
    draft = draft_rules(a)
    assert "rules" not in draft.rules and draft.open_sources and draft.open_targets  # left undeclared: apply fails naming them
    assert ("# MERGE CANDIDATE, not written: layers.{0, 1}.attn.q_proj.bias, layers.{0, 1}.attn.k_proj.bias, layers.{0, 1}.attn.v_proj.bias "
            "-> layers.{0, 1}.attn.in_proj_bias: merge 3 along dim 0; a `merge` step could join them once you have checked the "
            "order of the parts\n") in draft.text  # fmt: skip
    back = align(cm.mha_stack().state_dict(), cm.qkv_stack())
    assert {r.kind for r in back.regroups} == {"split"} and back.regroups[0].targets[0] == "layers.0.attn.q_proj.weight"


def test_hf_gpt2_conv1d_to_linear_transposes_and_flags_the_square_matrices():
    """HF GPT-2 stores Linear weights transposed (Conv1D): the non-square ones are transposed;
    attn.c_proj is square, so its shape cannot tell, and a note says so. lm_head is tied."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hf = GPT2LMHeadModel(GPT2Config(vocab_size=100, n_positions=32, n_embd=64, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0))
    a = align(hf.state_dict(), cm.GPT())
    assert a.tied == ("lm_head.weight",) and format_alignment(a).splitlines()[2] == "Aligned: 29 of 29 source keys -> 28 of 28 target keys"
    draft = draft_rules(a)
    assert draft.rules["rules"] == [{"transpose": [r"^transformer\.h\.\d+\.attn\.c_attn\.weight$", r"^transformer\.h\.\d+\.mlp\.c_fc\.weight$",
                                                   r"^transformer\.h\.\d+\.mlp\.c_proj\.weight$"]}]  # fmt: skip
    assert a.notes[0].startswith("2 square matrices paired as they are (transformer.h.{0, 1}.attn.c_proj.weight)")
    assert remap.plan(cm.GPT(), hf.state_dict(), draft.rules).ok


def test_long_lists_are_capped_unless_verbose():
    src = {f"s{i}.w": [i + 1] for i in range(50)}
    tgt = {f"t{i}.w": [i + 1] for i in range(50)} | {"same.w": [99]}
    src["same.w"] = [99]
    text = format_alignment(align(src, tgt))
    assert "  ... and 11 more rows (-v shows every row)\n" in text
    assert "  evidence   keys  source -> target\n  exact         1  1 key with the same name on both sides\n" in text
    assert "  structure     1  s0.w -> t0.w  (top level)\n" in text
    verbose = format_alignment(align(src, tgt), verbose=True)
    assert "more rows" not in verbose and "  exact         1  1 key with the same name on both sides\n                     same.w\n" in verbose


def test_the_terminal_rendering_draws_the_same_text():
    import io

    from rich.console import Console

    from remap.diffing.render import print_alignment

    a = align({"module.fc.weight": [2, 4], "module.fc.bias": [2], "foo.w": [8, 8]}, {"fc.weight": [2, 4], "fc.bias": [2], "x.w": [8, 8], "y.w": [8, 8]})
    out = io.StringIO()
    print_alignment(a, console=Console(file=out, width=60, color_system=None))
    assert [line.rstrip() for line in out.getvalue().splitlines()] == format_alignment(a).splitlines()


# --------------------------------------------------------------------------- the writer, on any pairing

_NAMES = st.sampled_from(["blocks", "layers", "encoder_layer_", "attn", "qkv", "norm1", "ln_1", "mlp", "fc", "proj", "head", "module"])
_PART = st.one_of(_NAMES, st.integers(0, 12).map(str), st.tuples(st.sampled_from(["layer_", "h_"]), st.integers(0, 3)).map(lambda t: f"{t[0]}{t[1]}"))
_KEY = st.lists(_PART, min_size=1, max_size=5).map(".".join).filter(lambda k: not k.endswith("_"))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_KEY, min_size=1, max_size=24, unique=True), st.lists(_KEY, min_size=1, max_size=24, unique=True), st.randoms())
def test_drafted_rules_load_exactly_the_pairs_of_any_alignment(sources, targets, rnd):
    """Whatever the names and whichever source pairs with whichever target, the drafted
    rules load exactly those pairs (draft_rules checks its own result with the planner and
    raises otherwise). The other keys are declared (dropped, expect.missing) only when their
    shapes are unrelated to any leftover on the other side and something loads; else they stay
    undeclared and the plan fails naming exactly them. An unpaired source key never has a
    target key's name here: align pairs those by name."""
    n = rnd.randint(0, min(len(sources), len(targets)))
    paired_s, paired_t = rnd.sample(sources, n), rnd.sample(targets, n)
    left_s = [k for k in sources if k not in paired_s and k not in targets]
    sources = [*paired_s, *left_s]
    assume(sources)
    left_t = [k for k in targets if k not in paired_t]
    related = rnd.random() < 0.5
    meta_s = {k: (3,) for k in sources}
    meta_t = {k: (3,) if related or k in paired_t else (5, 7) for k in targets}
    pairs = tuple(Pair(s, t, "structure", "", (3,), (3,)) for s, t in zip(paired_s, paired_t))
    a = Alignment(source_meta(meta_s), target_meta(meta_t), pairs, source_only=tuple(left_s), target_only=tuple(left_t))  # fmt: skip
    draft = draft_rules(a)
    plan = remap.plan(meta_t, meta_s, draft.rules)
    assert {x.target: x.sources for x in plan.assignments} == {t: (s,) for s, t in zip(paired_s, paired_t)}
    undeclared = not n or related and left_s and left_t  # nothing loads, or the leftovers could feed each other
    assert draft.open_sources == (tuple(left_s) if undeclared else ()) and draft.open_targets == (tuple(left_t) if undeclared else ())
    assert {f.kind: set(f.keys) for f in plan.failures} == ({k: set(v) for k, v in (("missing", left_t), ("unused", left_s)) if v}
                                                            if undeclared else {})  # fmt: skip
    assert yaml.safe_load(draft.text) == draft.rules


@settings(max_examples=200, deadline=None)
@given(st.randoms(use_true_random=False))
def test_the_alignment_never_pairs_wrongly_when_names_are_consistent(r):
    """A random architecture (top-level modules, a repeated block), its twin with every
    module renamed (letters only: no number can mislead), a prefix, a shifted block index,
    stray keys on each side, sorted or not: whatever is paired is paired right."""
    from itertools import product

    dims = [8, 16, 24]
    names = r.sample(["".join(p) for p in product("abcdefgh", repeat=3)], 12)  # distinct, so the truth is one-to-one
    twins = dict(zip(names, r.sample(["".join(p) for p in product("ijklmnop", repeat=4)], 12)))

    def module():
        o, i = r.choice(dims), r.choice(dims)
        return [("weight", (o, i) if r.random() < 0.8 else (o,))] + ([("bias", (o,))] if r.random() < 0.7 else [])

    top = {n: module() for n in r.sample(names[:6], r.randint(1, 3))}
    block = {n: module() for n in r.sample(names[6:], r.randint(1, 4))}
    prefix, shift = r.choice(["", "module."]), r.choice([0, 1])
    src, tgt, truth = {}, {}, {}
    for n, leaves in top.items():
        for leaf, shape in leaves:
            src[f"{prefix}{n}.{leaf}"], tgt[f"{twins[n]}.{leaf}"] = shape, shape
            truth[f"{prefix}{n}.{leaf}"] = f"{twins[n]}.{leaf}"
    for j in range(r.randint(1, 4)):
        for n, leaves in block.items():
            for leaf, shape in leaves:
                src[f"{prefix}blocks.{j}.{n}.{leaf}"], tgt[f"enc.layer_{j + shift}.{twins[n]}.{leaf}"] = shape, shape
                truth[f"{prefix}blocks.{j}.{n}.{leaf}"] = f"enc.layer_{j + shift}.{twins[n]}.{leaf}"
    src[f"{prefix}stray.w"], tgt["fresh.w"] = (r.choice(dims),), (r.choice(dims),)
    if r.random() < 0.5:
        src = dict(sorted(src.items()))
    a = align(src, tgt)
    assert [p for p in a.pairs if p.source in truth and truth[p.source] != p.target] == []
    draft_rules(a)  # and the draft loads what was paired (checked inside)


class NeedsRealTensors(nn.Module):
    """A factory that cannot run on the meta device (it reads a value while building)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 2)
        if float(self.fc.weight.detach().abs().sum()) < 0:  # .item() on a meta tensor raises
            raise AssertionError


def test_a_target_factory_that_fails_on_the_meta_device_is_built_for_real(capsys, tmp_path):
    ckpt = tmp_path / "fc.pth"
    torch.save(NeedsRealTensors().state_dict(), ckpt)
    code, out, err = run(capsys, "diff", ckpt, "tests.diffing.test_diff:NeedsRealTensors")
    assert (code, err) == (0, "")
    assert out.splitlines()[1].startswith("  target: built for real: it failed on the meta device (tests.diffing.test_diff:NeedsRealTensors() raised ")
    assert "2 paired (2 exact)" in out
