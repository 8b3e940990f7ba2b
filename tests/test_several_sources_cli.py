"""Several sources in one plan, with real models: a tiny transformers CLIPModel loaded from a
CLIPVisionModelWithProjection and a CLIPTextModelWithProjection saved apart (save_pretrained),
compared by outputs with the CLIPModel transformers assembles from those very towers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import CLIPConfig, CLIPModel, CLIPTextModelWithProjection, CLIPVisionModelWithProjection

import remap
from remap.cli import main
from remap.errors import CheckError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "clip-two-towers.yaml"


def tiny_config() -> CLIPConfig:
    tower = {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4, "projection_dim": 8}
    return CLIPConfig(text_config={**tower, "vocab_size": 99, "max_position_embeddings": 16},
                      vision_config={**tower, "image_size": 16, "patch_size": 8}, projection_dim=8)  # fmt: skip


def tiny_clip() -> CLIPModel:
    """The target, as ``--target test_several_sources_cli:tiny_clip`` builds it. CLIPModel writes
    logit_scale outside torch.nn.init, so a target remap builds without memory cannot initialise
    it: the factory gives it its real initial value (config.logit_scale_init_value) itself."""
    config = tiny_config()
    model = CLIPModel(config)
    if model.logit_scale.is_meta:  # built under remap.empty_weights (the command line)
        model._parameters["logit_scale"] = torch.nn.Parameter(torch.tensor(config.logit_scale_init_value))
    return model


@pytest.fixture(scope="module")
def towers(tmp_path_factory: pytest.TempPathFactory) -> dict:
    torch.manual_seed(1)
    cfg = tiny_config()
    vision, text = CLIPVisionModelWithProjection(cfg.vision_config).eval(), CLIPTextModelWithProjection(cfg.text_config).eval()
    root = tmp_path_factory.mktemp("towers")
    vision.save_pretrained(root / "vision-tower")
    text.save_pretrained(root / "text-tower")
    # the same towers saved bare (no vision_model./text_model. prefix): both hold encoder.layers.0.*, embeddings.*
    save_file({k: v.contiguous() for k, v in vision.vision_model.state_dict().items()}, root / "vision-bare.safetensors")
    save_file({k: v.contiguous() for k, v in text.text_model.state_dict().items()}, root / "text-bare.safetensors")
    reference = CLIPModel(cfg).eval()  # transformers' own assembly: the towers' modules in their places
    reference.vision_model, reference.visual_projection = vision.vision_model, vision.visual_projection
    reference.text_model, reference.text_projection = text.text_model, text.text_projection
    return {"root": root, "vision": root / "vision-tower", "text": root / "text-tower", "reference": reference}


def outputs(model: CLIPModel) -> tuple[torch.Tensor, ...]:
    torch.manual_seed(0)
    pixels, ids = torch.randn(2, 3, 16, 16), torch.randint(0, 99, (3, 7))
    with torch.no_grad():
        out = model.eval()(input_ids=ids, pixel_values=pixels)
    return out.logits_per_image, out.image_embeds, out.text_embeds


def assert_same_outputs(model: CLIPModel, reference: CLIPModel) -> None:
    for got, want in zip(outputs(model), outputs(reference)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def fresh_target() -> CLIPModel:
    torch.manual_seed(123)  # other weights than the towers': a load that did nothing cannot pass
    return tiny_clip()


def test_two_towers_load_into_clip_like_transformers_assembles_them(towers):
    target = fresh_target()
    assert not torch.equal(outputs(target)[0], outputs(towers["reference"])[0])
    report = remap.load(target, {"vision": towers["vision"], "text": towers["text"]}, rules=CONFIG)
    assert report.ok and report.totals.unused == 0 and report.keys_with("missing") == ["logit_scale"]
    assert_same_outputs(target, towers["reference"])
    by_source = {r.source for r in report.sources}
    assert by_source == {"vision", "text"}
    for r in report.sources:  # every source key names its source
        assert r.key.startswith(f"{r.source}:")
    assert report.target_record("text_projection.weight").sources == ("text:text_projection.weight",)


def test_the_rules_own_sources_relative_to_the_rules_file(towers, tmp_path):
    rules = tmp_path / "clip.yaml"
    rules.write_text(CONFIG.read_text().replace("path: vision-tower", f"path: {towers['root'].name}/vision-tower")
                     .replace("path: text-tower", f"path: {towers['root'].name}/text-tower"))  # fmt: skip
    rules.rename(towers["root"].parent / "clip.yaml")
    target = fresh_target()
    remap.load(target, rules=towers["root"].parent / "clip.yaml")
    assert_same_outputs(target, towers["reference"])


def test_cli_apply_with_named_sources_writes_a_report_naming_every_source(towers, tmp_path, capsys):
    report, saved = tmp_path / "report.json", tmp_path / "clip.safetensors"
    code = main(["apply", str(CONFIG), "--source", f"vision={towers['vision']}", "--source", f"text={towers['text']}",
                 "--target", "test_several_sources_cli:tiny_clip", "--report", str(report), "--save", str(saved)])  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0, text
    assert "from vision: 40 keys" in text and "from text: 37 keys" in text  # the text report groups source keys by source
    data = json.loads(report.read_text())
    assert {v["source"] for v in data["sources"].values()} == {"vision", "text"}
    assert all(k.startswith(v["source"] + ":") for k, v in data["sources"].items())
    assert set(data["source"]["sources"]) == {"vision", "text"}
    loaded = fresh_target()
    remap.load(loaded, saved)  # the saved model: CLIPModel's own names, loaded strictly
    assert_same_outputs(loaded, towers["reference"])


def test_cli_dry_run_reads_no_tensor(towers, capsys, monkeypatch):
    from remap.sources.combined import CombinedSource

    def refuse(self, key):  # pragma: no cover - reached only by a bug
        raise AssertionError(f"a dry run read {key}")

    monkeypatch.setattr(CombinedSource, "_read", refuse)
    code = main(["apply", str(CONFIG), "--source", f"vision={towers['vision']}", "--source", f"text={towers['text']}",
                 "--target", "test_several_sources_cli:tiny_clip", "--dry-run", "--json"])  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert code == 0 and data["dry_run"] and data["totals"]["used"] == 77


def test_swapped_towers_fail_loudly(towers, capsys):
    code = main(["apply", str(CONFIG), "--source", f"vision={towers['text']}", "--source", f"text={towers['vision']}",
                 "--target", "test_several_sources_cli:tiny_clip", "--dry-run"])  # fmt: skip
    err = capsys.readouterr()
    assert code == 1
    assert "matched no key" in err.out + err.err


def test_equal_keys_of_two_bare_towers_are_kept_apart_by_from(towers):
    root = towers["root"]
    rules = {"version": 1, "rules": [{"add_prefix": "vision_model.", "from": "vision"}, {"add_prefix": "text_model.", "from": "text"}],
             "expect": {"missing": ["^logit_scale$", "_projection\\.weight$"]}}  # fmt: skip
    sources = {"vision": root / "vision-bare.safetensors", "text": root / "text-bare.safetensors"}
    shared = set(remap.plan(fresh_target(), sources["vision"]).source_meta) & set(remap.plan(fresh_target(), sources["text"]).source_meta)
    assert "encoder.layers.0.self_attn.k_proj.weight" in shared  # the case: equal keys in both
    target = fresh_target()
    reference = towers["reference"]
    target.visual_projection.load_state_dict(reference.visual_projection.state_dict())
    target.text_projection.load_state_dict(reference.text_projection.state_dict())
    report = remap.load(target, sources, rules=rules)
    assert report.ok
    assert_same_outputs(target, reference)
    rec = report.source_record("text:encoder.layers.0.self_attn.k_proj.weight")
    assert (rec.source, rec.targets) == ("text", ("text_model.encoder.layers.0.self_attn.k_proj.weight",))


def test_a_collision_across_sources_fails_naming_both(towers, tmp_path, capsys):
    root = towers["root"]
    rules = tmp_path / "one-prefix.yaml"
    rules.write_text("version: 1\nrules:\n  - add_prefix: vision_model.\n")  # no `from`: the text tower lands there too
    target = fresh_target()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckError) as caught:
        remap.load(target, {"vision": root / "vision-bare.safetensors", "text": root / "text-bare.safetensors"}, rules=rules)
    collisions = [f for f in caught.value.report.failures if f.kind == "collision"]
    assert collisions
    message = next(f.message for f in collisions if "encoder.layers.0.self_attn.k_proj.weight" in f.message)
    assert ("'encoder.layers.0.self_attn.k_proj.weight' of source 'vision' and 'encoder.layers.0.self_attn.k_proj.weight' "
            "of source 'text' both become 'vision_model.encoder.layers.0.self_attn.k_proj.weight'") in message  # fmt: skip
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # untouched
    code = main(["apply", str(rules), "--source", f"vision={root / 'vision-bare.safetensors'}",
                 "--source", f"text={root / 'text-bare.safetensors'}", "--target", "test_several_sources_cli:tiny_clip", "--json"])  # fmt: skip
    data = json.loads(capsys.readouterr().out)
    assert code == 1 and any(f["kind"] == "collision" and "'text'" in f["message"] for f in data["failures"])


def test_export_with_several_sources_is_refused(towers, tmp_path, capsys):
    code = main(["export", str(CONFIG), "--from", str(towers["root"] / "vision-bare.safetensors"), "--save", str(tmp_path / "x.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "several sources" in err and not (tmp_path / "x.safetensors").exists()


@pytest.mark.parametrize("flags, says", [
    (["--source", "a.pt", "--source", "b.pt"], "one source is --source PATH"),
    (["--source", "vision=a", "--source", "vision=b"], "given twice"),
    (["--source", "visoin=a"], "no source 'visoin'"),
])  # fmt: skip
def test_bad_source_flags_are_usage_errors(flags, says, capsys):
    code = main(["apply", str(CONFIG), *flags, "--target", "test_several_sources_cli:tiny_clip", "--dry-run"])
    assert code == 2 and says in capsys.readouterr().err


def test_a_missing_tower_names_its_source(towers, tmp_path, capsys):
    code = main(["apply", str(CONFIG), "--source", f"vision={towers['vision']}", "--source", f"text={tmp_path / 'nope'}",
                 "--target", "test_several_sources_cli:tiny_clip", "--dry-run"])  # fmt: skip
    assert code == 3 and "source 'text'" in capsys.readouterr().err


def test_validate_shows_which_source_each_step_reads(capsys):
    assert main(["validate", str(CONFIG)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[1:] == ["  1. keep '^vision_model\\.', '^visual_projection\\.' (from vision)",
                         "  2. keep '^text_model\\.', '^text_projection\\.' (from text)"]  # fmt: skip
