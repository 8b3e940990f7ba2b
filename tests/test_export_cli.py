"""``remap export`` on the command line (issue 15): the user's check, exit codes, JSON, and a
failed export that leaves nothing behind.

The user's check: a timm ViT (``timm.create_model(..., pretrained=False)``, a tiny
configuration) converted to torchvision's naming with ``remap apply --save``, fine-tuned a
step in torchvision, exported back with ``--like`` the original: timm loads the export
strictly and computes what the fine-tuned torchvision model computes; without the training
step the file is the original, tensor by tensor, bit for bit.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import conversion_models as cm
from remap.cli import main
from test_conversions import CONFIGS, pretrained_like
from weights import Small, perturb

VIT = CONFIGS / "timm-vit-to-torchvision.yaml"


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def timm_vit() -> torch.nn.Module:
    """A tiny timm ViT, as ``timm.create_model`` builds it offline."""
    import timm

    return timm.create_model("vit_base_patch16_224", pretrained=False, img_size=32, patch_size=8, embed_dim=64, depth=2,
                             num_heads=2, num_classes=10)  # fmt: skip


def converted(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[Path, dict[str, torch.Tensor], torch.nn.Module]:
    """The original timm checkpoint, its tensors, and the torchvision model `remap apply --save` made of it."""
    original = tmp_path / "vit_tiny.safetensors"
    state = pretrained_like(timm_vit()).state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(original))
    tv = tmp_path / "tv.pt"
    code, _, err = run(capsys, "apply", VIT, "--source", original, "--target", "conversion_models:torchvision_vit", "--save", tv, "-q")
    assert (code, err) == (0, "")
    model = cm.torchvision_vit()
    model.load_state_dict(torch.load(tv, weights_only=True), strict=True)
    return original, load_file(str(original)), model


def test_untrained_round_trip_is_the_original_bit_for_bit(tmp_path, capsys):
    original, tensors, model = converted(tmp_path, capsys)
    torch.save(model.state_dict(), tmp_path / "ft.pt")
    out = tmp_path / "back" / "vit_tiny.safetensors"
    code, text, err = run(capsys, "export", VIT, "--from", tmp_path / "ft.pt", "--like", original, "--save", out)
    assert (code, err) == (0, "")
    assert text.startswith("export: 32 of 32 keys of the original written (32 exported)\n")
    assert text.rstrip().endswith("ok")
    back = load_file(str(out))
    assert list(back) == list(tensors)
    for key, value in tensors.items():
        assert back[key].dtype == value.dtype and torch.equal(back[key], value), key


def test_fine_tuned_step_exports_back_and_timm_loads_it_strictly(tmp_path, capsys):
    original, tensors, model = converted(tmp_path, capsys)
    image = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    torch.nn.functional.cross_entropy(model(image), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    model.eval()
    torch.save(model.state_dict(), tmp_path / "ft.pt")
    out = tmp_path / "back.safetensors"
    code, _, err = run(capsys, "export", VIT, "--from", tmp_path / "ft.pt", "--like", original, "--save", out, "-q")
    assert (code, err) == (0, "")

    timm_model = timm_vit().eval()
    timm_model.load_state_dict(load_file(str(out)), strict=True)  # timm accepts it as is
    qkv = model.encoder.layers.encoder_layer_1.self_attention.in_proj_weight.detach()
    assert torch.equal(timm_model.blocks[1].attn.qkv.weight.detach(), qkv)  # the trained weight is there
    assert not torch.equal(qkv, tensors["blocks.1.attn.qkv.weight"])
    with torch.no_grad():
        torch.testing.assert_close(timm_model(image), model(image), atol=1e-4, rtol=0)


def test_one_changed_weight_is_the_only_change(tmp_path, capsys):
    original, tensors, model = converted(tmp_path, capsys)
    with torch.no_grad():
        model.heads.head.weight.mul_(-1)
    torch.save(model.state_dict(), tmp_path / "ft.pt")
    code, out, _ = run(capsys, "export", VIT, "--from", tmp_path / "ft.pt", "--like", original, "--save", tmp_path / "b.safetensors", "--json")
    assert code == 0 and json.loads(out)["totals"]["exported"] == 32
    back = load_file(str(tmp_path / "b.safetensors"))
    assert torch.equal(back["head.weight"], -tensors["head.weight"])
    assert all(torch.equal(back[k], v) for k, v in tensors.items() if k != "head.weight")


# --------------------------------------------------------------------------- exit codes, JSON, nothing written on failure


@pytest.fixture
def ddp(tmp_path: Path) -> tuple[Path, Path, Path]:
    """An original with DDP's prefix, the rules that strip it, and a fine-tuned bare checkpoint."""
    state = perturb(Small(), seed=1).state_dict()
    original = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in state.items()}, original)
    rules = tmp_path / "rules.yaml"
    rules.write_text(f"version: 1\nsource: {{path: {original.name}}}\nrules:\n  - strip_prefix: module.\n")
    finetuned = tmp_path / "ft.safetensors"
    save_file({k: v + 1 if k == "fc.bias" else v for k, v in state.items()}, str(finetuned))
    return original, rules, finetuned


def test_like_defaults_to_the_rules_source_and_json_accounts_every_key(tmp_path, capsys, ddp):
    original, rules, finetuned = ddp
    code, out, err = run(capsys, "export", rules, "--from", finetuned, "--save", tmp_path / "out.pt", "--json", "--report", tmp_path / "r.json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data == json.loads((tmp_path / "r.json").read_text())
    assert data["ok"] and data["kind"] == "export" and data["like"]["path"] == str(original)
    assert data["keys"]["module.fc.bias"]["targets"] == ["fc.bias"] and data["keys"]["module.fc.bias"]["status"] == "exported"
    saved = torch.load(tmp_path / "out.pt", weights_only=True)
    assert torch.equal(saved["module.fc.bias"], torch.load(original, weights_only=True)["module.fc.bias"] + 1)


def test_a_failed_check_exits_1_and_writes_nothing(tmp_path, capsys, ddp):
    original, _, finetuned = ddp
    bare = tmp_path / "bare.yaml"  # no strip_prefix: nothing lines up
    bare.write_text("version: 1\n")
    out = tmp_path / "out.pt"
    code, text, err = run(capsys, "export", bare, "--from", finetuned, "--like", original, "--save", out, "--json")
    assert code == 1 and not out.exists()
    report = json.loads(text)
    assert report["ok"] is False and [f["kind"] for f in report["failures"]][:2] == ["missing", "unused"]
    assert err.splitlines()[-1].startswith("remap: ") and err.rstrip().endswith("nothing was written.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bare.yaml", "ddp.pt", "ft.safetensors", "rules.yaml"]

    code, text, err = run(capsys, "export", bare, "--from", finetuned, "--like", original, "--save", out, "-q")
    assert (code, text) == (1, "") and err.startswith("remap: missing: 8 target key(s)")
    code, text, _ = run(capsys, "export", bare, "--from", finetuned, "--like", original)
    assert code == 1 and "FAILED missing:" in text and text.rstrip().endswith("FAILED: nothing was written")


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["--like", "{original}"], 2, "the following arguments are required: --from"),
        (["--from", "{finetuned}", "--like", "{original}", "--save", "{tmp}/out.safetensors"], 2,
         "is a torch file and the export keeps its format; give a name ending in .pt or .pth or .bin or .ckpt"),
        (["--from", "{tmp}/missing.pt", "--like", "{original}"], 3, "no such file or folder"),
        (["--from", "{finetuned}", "--like", "{tmp}/nothing.pt"], 3, "no such file or folder"),
    ],
)  # fmt: skip
def test_usage_and_unreadable_files_exit_2_and_3(tmp_path, capsys, ddp, argv, code, message):
    original, rules, finetuned = ddp
    argv = [a.format(original=original, finetuned=finetuned, tmp=tmp_path) for a in argv]
    got, out, err = run(capsys, "export", rules, *argv, "--json")
    assert got == code and message in err
    assert json.loads(out)["error"]["exit_code"] == code
    assert not (tmp_path / "out.safetensors").exists()


def test_no_like_and_no_source_in_the_rules_is_a_usage_error(tmp_path, capsys, ddp):
    _, _, finetuned = ddp
    rules = tmp_path / "plain.yaml"
    rules.write_text("version: 1\n")
    code, out, err = run(capsys, "export", rules, "--from", finetuned)
    assert (code, out) == (2, "")
    assert err == "remap: error: no original to export back to (--like): give one, or set source.path in the rules\n"


def test_only_loaded_and_allow_lossy_flags(tmp_path, capsys):
    import torchvision

    original = tmp_path / "r18.safetensors"
    save_file(pretrained_like(torchvision.models.resnet18()).state_dict(), str(original))
    gray = cm.resnet18_gray()
    stem = CONFIGS / "resnet-stem-in-channels.yaml"
    code, _, _ = run(capsys, "apply", stem, "--source", original, "--target", "conversion_models:resnet18_gray", "--save", tmp_path / "g.pt", "-q")
    assert code == 0
    gray.load_state_dict(torch.load(tmp_path / "g.pt", weights_only=True))
    code, text, _ = run(capsys, "export", stem, "--from", tmp_path / "g.pt", "--like", original)
    assert code == 0 and "lossy, --like kept: 1" in text and "conv1.weight: in_channels(3->1) cannot be inverted" in text
    code, text, _ = run(capsys, "export", stem, "--from", tmp_path / "g.pt", "--like", original, "--allow-lossy", "--json")
    assert json.loads(text)["keys"]["conv1.weight"]["status"] == "lossy_approximated"

    finetune = CONFIGS / "torchvision-resnet-finetune.yaml"
    ten = torchvision.models.resnet18(num_classes=10)
    ten.load_state_dict({k: v for k, v in load_file(str(original)).items() if not k.startswith("fc.")}, strict=False)
    torch.save(ten.state_dict(), tmp_path / "ten.pt")
    code, text, _ = run(capsys, "export", finetune, "--from", tmp_path / "ten.pt", "--like", original, "--only-loaded",
                        "--save", tmp_path / "o.safetensors", "--json")  # fmt: skip
    data = json.loads(text)
    assert code == 0 and data["keys"]["fc.weight"]["status"] == "left_out" and data["left_out"]["fc.bias"]
    assert "fc.weight" not in load_file(str(tmp_path / "o.safetensors"))


def test_export_help_shows_exit_codes_and_examples(capsys):
    code, out, _ = run(capsys, "export", "--help")
    assert code == 0 and "\nexit codes:\n  0  " in out and "\n  1  a check failed" in out and "\nexamples:\n  remap export " in out


def test_a_nan_in_the_fine_tuned_weights_is_exported_as_it_is(tmp_path, capsys, ddp):
    original, rules, _ = ddp
    state = perturb(Small(), seed=1).state_dict()
    state["conv.weight"][0, 0, 0, 0] = float("nan")
    save_file(state, str(tmp_path / "nan.safetensors"))
    code, _, err = run(capsys, "export", rules, "--from", tmp_path / "nan.safetensors", "--save", tmp_path / "out.pt", "-q")
    assert (code, err) == (0, "")
    back = torch.load(tmp_path / "out.pt", weights_only=True)["module.conv.weight"]
    assert back.isnan().sum() == 1 and back[0, 0, 0, 0].isnan()


@pytest.mark.hostile
def test_a_save_over_a_fifo_is_refused_before_anything_is_read(tmp_path, capsys, ddp):
    import os
    import stat

    original, rules, finetuned = ddp
    fifo = tmp_path / "out.pt"
    os.mkfifo(fifo)
    code, out, err = run(capsys, "export", rules, "--from", finetuned, "--save", fifo)
    assert (code, out) == (2, "") and "a FIFO (named pipe), not a regular file" in err
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)


def test_a_file_with_several_weight_sets_asks_for_its_own_key_flag(tmp_path, capsys, ddp):
    original, rules, _ = ddp
    state = perturb(Small(), seed=1).state_dict()
    two = tmp_path / "two.pt"
    torch.save({"model": state, "ema": state}, two)
    code, _, err = run(capsys, "export", rules, "--from", two)
    assert code == 3 and "say which to load with --from-key model\n" in err
    torch.save({"model": state, "ema": state}, tmp_path / "two_like.pt")
    code, _, err = run(capsys, "export", rules, "--from", two, "--from-key", "ema", "--like", tmp_path / "two_like.pt", "--save", tmp_path / "o.pt")
    assert code == 3 and "say which to load with --like-key model\n" in err
    assert not (tmp_path / "o.pt").exists()
