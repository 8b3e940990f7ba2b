"""The issue's checks, as a user runs them: ``remap.load(..., verify=True)`` and
``remap apply --verify`` on conversions broken in ways plain output comparison cannot see
(coverage) or cannot place (first divergence).

What must be found comes from how each conversion was broken; that plain verify is blind to
the first is shown with torch itself.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import remap
from remap.cli import main
from remap.errors import VerifyError
from remap.report.render import format_report

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
SWAPPED = ("layer1.0.conv1.weight", "layer1.1.conv1.weight")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny convolutions run far faster on one thread on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def zero_init_resnet() -> nn.Module:
    """resnet18d's structure, narrow, with timm's default init: the last BatchNorm of every
    residual block has gamma 0 (``zero_init_last``), so on these weights each block's
    residual branch contributes nothing."""
    from timm.models.resnet import BasicBlock, ResNet

    torch.manual_seed(0)
    return ResNet(BasicBlock, [2, 2, 2, 2], num_classes=10, channels=(8, 16, 32, 64), stem_type="deep", stem_width=4)


def swap_rules(path: Path) -> dict:
    """Rules that load layer1.0's conv1 into layer1.1 and back: a bug, same shapes."""
    return {
        "version": 1,
        "source": {"path": str(path), "model": "verifying.test_verify_end_to_end:zero_init_resnet"},
        "rules": [{"rename": {r"^layer1\.0\.conv1\.": "layer1.1.conv1.", r"^layer1\.1\.conv1\.": "layer1.0.conv1."}}],
        "verify": {"input": [2, 3, 32, 32], "atol": 1e-6},
    }


def test_swapped_conv1_in_a_zero_init_resnet_is_inconclusive_and_names_the_uncovered_weights(tmp_path):
    source = zero_init_resnet().eval()
    torch.save(source.state_dict(), tmp_path / "resnet.pth")
    target = zero_init_resnet()
    with pytest.raises(VerifyError) as caught:
        remap.load(target, tmp_path / "resnet.pth", rules=swap_rules(tmp_path / "resnet.pth"), verify=True)
    # the weights really are swapped, and torch itself cannot tell: the outputs agree
    assert torch.equal(target.layer1[1].conv1.weight, source.layer1[0].conv1.weight)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(source(x), target.eval()(x), atol=1e-6)
    v = caught.value.report.verify
    assert (v["outcome"], v["close"], v["ok"]) == ("inconclusive", True, False)
    assert set(SWAPPED) <= set(v["coverage"]["uncovered"])
    text = format_report(caught.value.report, verbose=True)
    assert "INCONCLUSIVE" in text and "      layer{1..4}.{0, 1}.conv{1, 2}.weight\n" in text


def test_declaring_the_zero_init_branches_uncovered_lets_it_agree(tmp_path):
    source = zero_init_resnet().eval()
    torch.save(source.state_dict(), tmp_path / "resnet.pth")
    rules = swap_rules(tmp_path / "resnet.pth")
    rules["rules"] = []
    rules["verify"]["uncovered"] = [r"^layer\d\.\d\.(conv|bn)[12]\.", r"^layer\d\.\d\.bn2\.", r"\.downsample\."]
    report = remap.load(zero_init_resnet(), tmp_path / "resnet.pth", rules=rules, verify=True)
    v = report.verify
    assert (v["outcome"], v["coverage"]["uncovered"]) == ("agree", [])
    assert set(SWAPPED) <= set(v["coverage"]["declared"])


def test_q_and_k_swapped_in_a_vit_conversion_names_the_first_attention_block_and_the_split(tmp_path, capsys, monkeypatch):
    from conversion_models import timm_vit

    torch.manual_seed(1)
    source = timm_vit()
    with torch.no_grad():
        for p in source.parameters():  # trained-model scale, so the attention softmax does not saturate
            p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5 if p.dim() >= 2 else p + 0.1 * torch.randn_like(p))
    torch.save(source.state_dict(), tmp_path / "vit.pth")
    rules = yaml.safe_load((CONFIGS / "timm-vit-to-torchvision.yaml").read_text())
    rules["source"] = {"path": "vit.pth", "model": "conversion_models:timm_vit"}
    rules["target"] = {"model": "conversion_models:torchvision_vit"}
    split = {"split": {"match": r"^(blocks\.1\.attn\.)qkv\.(weight|bias)$", "into": [r"\1q.\2", r"\1k.\2", r"\1v.\2"], "dim": 0}}
    merge = {"merge": {"match": r"^(blocks\.1\.attn\.)(q|k|v)\.(weight|bias)$", "into": r"\1qkv.\3", "group": 2,
                       "order": ["k", "q", "v"], "dim": 0}}  # fmt: skip
    rules["rules"] = [split, merge, *rules["rules"]]
    rules["verify"] = {"input": [2, 3, 32, 32], "atol": 1e-5}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    monkeypatch.chdir(tmp_path)

    code = main(["apply", "rules.yaml", "--verify"])
    out = capsys.readouterr().out
    assert code == 1
    assert ("first divergence: target encoder.layers.encoder_layer_1.self_attention <- source blocks.1.attn (max abs "
            in " ".join(out.split()))  # fmt: skip
    assert "cat(dim=0)[k, q, v]" in out

    code = main(["apply", "rules.yaml", "--verify", "--json"])
    v = __import__("json").loads(capsys.readouterr().out)["verify"]
    first = v["divergence"]["first"]
    assert (code, v["outcome"], first["target"], first["source"]) == (
        1, "differ", "encoder.layers.encoder_layer_1.self_attention", "blocks.1.attn")
    assert any(op.startswith("split(dim=0)") for op in first["ops"])
