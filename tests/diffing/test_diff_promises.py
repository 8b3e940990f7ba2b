"""remap diff keeps the promise (issue 11): a draft never loads nothing and passes, and
same-shaped siblings are never told apart by definition order.

The ResNet pair is real: torchvision's ``Bottleneck`` (``conv1, bn1, ..., conv3, bn3,
downsample``) against Hugging Face's ``ResNetForImageClassification``, whose bottleneck
layer declares its ``shortcut`` before ``layer.0..2``. The reference is the source model's
own output: the draft, applied as written, must reproduce it.

Factories below (``tests.diffing.test_diff_promises:...``) are importable by name: tests/ is on ``sys.path``.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

import remap
from remap.cli import main
from remap.diffing.alignment import align
from remap.diffing.render import summary_line
from remap.diffing.draft import draft_rules

# --------------------------------------------------------------------------- 1. unrelated names: the draft fails on apply


class XY(nn.Module):
    """Two same-shaped layers whose names share nothing with the checkpoint's ``a``, ``b``."""

    def __init__(self) -> None:
        super().__init__()
        self.x = nn.Linear(4, 4, bias=False)
        self.y = nn.Linear(4, 4, bias=False)


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_a_draft_between_unrelated_names_declares_nothing_and_apply_fails_naming_every_key(capsys, tmp_path):
    """`remap diff ab.pth XY --write r.yaml && remap apply r.yaml`: the draft drops nothing and
    declares nothing missing, so apply fails with exit 1 and lists the four keys; uncommenting
    the drafted choices (here: as suggested) loads the tensors where the reviewer said."""
    g = torch.Generator().manual_seed(0)
    state = {"a.weight": torch.randn(4, 4, generator=g), "b.weight": torch.randn(4, 4, generator=g)}
    ckpt, rules = tmp_path / "ab.pth", tmp_path / "r.yaml"
    torch.save(state, ckpt)
    code, out, err = run(capsys, "diff", ckpt, "tests.diffing.test_diff_promises:XY", "--write", rules)
    assert (code, err) == (0, "")
    assert "0 paired; 0 shape conflicts; 2 ambiguous; 0 source only; 0 target only\n" in out
    assert ("wrote {}: 0 rename rules; loads 0 of 2 target keys; drops 0 source keys; 0 target keys keep their initial values; "
            "2 source and 2 target keys left for you to decide: remap apply fails until you do\n").format(rules) in out  # fmt: skip
    text = rules.read_text()
    assert yaml.safe_load(text) == {"version": 1, "source": {"path": "ab.pth"}, "target": {"model": "tests.diffing.test_diff_promises:XY"}}
    assert "# Leaves 2 source and 2 target keys undeclared: `remap apply` fails and lists them until you decide (see UNDECLARED below).\n" in text
    assert text.endswith(
        "# rules:                  # uncomment this line too when you uncomment a choice below\n"
        "  # AMBIGUOUS, not written: a.weight, b.weight [4, 4] could feed any of x.weight, y.weight; each line is one candidate, not a pick: set the target you choose, then uncomment it (each target once)\n"
        "  # - rename: {'^a\\.weight$': 'x.weight'}  # choice: a.weight -> x.weight or y.weight (same shape [4, 4])\n"
        "  # - rename: {'^b\\.weight$': 'y.weight'}  # choice: b.weight -> x.weight or y.weight (same shape [4, 4])\n"
        "\n"
        "# UNDECLARED, so `remap apply` fails and lists them until you decide:\n"
        "#   nothing pairs on evidence, so nothing is declared: declaring every key would pass a load of nothing\n"
    )
    code, out, err = run(capsys, "apply", rules)
    assert code == 1
    assert "missing: 2 target key(s) would keep their initial values and are not in expect.missing" in out + err
    assert "unused: 2 source key(s) reach no target key and are not dropped or in expect.unused" in out + err
    assert all(k in out + err for k in ("a.weight", "b.weight", "x.weight", "y.weight"))

    rules.write_text(text.replace("# rules:  ", "rules:    ").replace("  # - rename:", "  - rename:"))  # the reviewer's choice
    model = XY()
    assert remap.load(model, ckpt, rules=rules).ok
    assert torch.equal(model.x.weight.detach(), state["a.weight"]) and torch.equal(model.y.weight.detach(), state["b.weight"])


def test_a_draft_whose_only_pair_has_no_certain_fix_is_written_and_fails_on_apply(capsys, tmp_path):
    """A 1000-class head against a 10-class one, nothing else: the draft declares nothing
    (it used to stop with an internal error), and apply fails on that key's shape."""
    torch.save({"fc.weight": torch.zeros(1000, 4)}, tmp_path / "s.pth")
    torch.save({"fc.weight": torch.zeros(10, 4)}, tmp_path / "t.pth")
    code, out, err = run(capsys, "diff", tmp_path / "s.pth", tmp_path / "t.pth", "--write", tmp_path / "r.yaml")
    assert code == 0, err
    assert "1 source and 1 target key left for you to decide" in out
    drafted = yaml.safe_load((tmp_path / "r.yaml").read_text())
    assert "expect" not in drafted and "rules" not in drafted
    with pytest.raises(remap.CheckError) as info:
        remap.load(nn.ModuleDict({"fc": nn.Linear(4, 10, bias=False)}), tmp_path / "s.pth", rules=tmp_path / "r.yaml")
    assert [f.kind for f in info.value.report.failures] == ["shape_mismatch"]


def test_a_leftover_that_nothing_could_feed_is_declared_one_with_a_candidate_is_not():
    """Evidence-based declarations only: ``aux`` [7] has no leftover of a related shape on the
    target side, so it is dropped; ``head`` [1000, 4] could be sliced into ``fc`` [10, 4], so
    neither is declared; ``new`` [5, 5] has no candidate and is declared missing."""
    src = {"stem.weight": [4, 3], "stem.bias": [4], "head.weight": [1000, 4], "aux": [7]}
    tgt = {"stem.weight": [4, 3], "stem.bias": [4], "fc.weight": [10, 4], "new.weight": [5, 5]}
    draft = draft_rules(align(src, tgt))
    assert draft.rules == {"version": 1, "rules": [{"drop": ["^aux$"]}], "expect": {"missing": [r"^new\."]}}
    assert (draft.open_sources, draft.open_targets) == (("head.weight",), ("fc.weight",))
    assert ("#   source keys that a leftover key of a related shape could become: head.weight; drop or rename them\n"
            "#   target keys that a leftover key of a related shape could feed: fc.weight; rename a source key to them or add them "
            "to expect.missing\n") in draft.text  # fmt: skip
    plan = remap.plan(tgt, src, draft.rules)
    assert [(f.kind, f.keys) for f in plan.failures] == [("missing", ("fc.weight",)), ("unused", ("head.weight",))]


# --------------------------------------------------------------------------- 2. torchvision Bottleneck <-> Hugging Face ResNet


class TorchvisionResNet(nn.Module):
    """torchvision's ResNet (its stem, its ``Bottleneck``, its ``_make_layer`` layout) at
    any widths: the stage widths are Hugging Face's ``hidden_sizes`` (expansion 4)."""

    def __init__(self, embedding_size: int, hidden_sizes: list[int], depths: list[int], num_classes: int) -> None:
        from torchvision.models.resnet import Bottleneck, conv1x1

        super().__init__()
        self.conv1 = nn.Conv2d(3, embedding_size, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(embedding_size)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        inplanes = embedding_size
        for i, (width, depth) in enumerate(zip(hidden_sizes, depths)):
            stride = 1 if i == 0 else 2
            planes = width // Bottleneck.expansion
            downsample = nn.Sequential(conv1x1(inplanes, width, stride), nn.BatchNorm2d(width))
            blocks = [Bottleneck(inplanes, planes, stride, downsample)] + [Bottleneck(width, planes) for _ in range(depth - 1)]
            self.add_module(f"layer{i + 1}", nn.Sequential(*blocks))
            inplanes = width
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, num_classes)
        self.stages = len(depths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))


SMALL = {"embedding_size": 16, "hidden_sizes": [64, 128], "num_labels": 10}  # stage 1's conv3 and downsample.0 are both [64, 16, 1, 1], as in ResNet-50


def hf_resnet(depths: list[int], **overrides) -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = {**SMALL, **overrides}
    return ResNetForImageClassification(ResNetConfig(embedding_size=config["embedding_size"], hidden_sizes=config["hidden_sizes"],
                                                     depths=depths, layer_type="bottleneck", num_labels=config["num_labels"]))  # fmt: skip


def hf_resnet_21() -> nn.Module:
    return hf_resnet([2, 1])


def hf_resnet_11() -> nn.Module:
    return hf_resnet([1, 1])


def hf_resnet50() -> nn.Module:
    return hf_resnet([3, 4, 6, 3], embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], num_labels=1000)


def truth(key: str) -> str:
    """The known correspondence, written by hand from the two libraries' sources."""
    key = re.sub(r"^conv1\.", "resnet.embedder.embedder.convolution.", key)
    key = re.sub(r"^bn1\.", "resnet.embedder.embedder.normalization.", key)
    key = re.sub(r"^fc\.", "classifier.1.", key)
    m = re.match(r"^layer(\d+)\.(\d+)\.(.*)$", key)
    if m:
        inner = m.group(3)
        inner = re.sub(r"^conv(\d)\.", lambda c: f"layer.{int(c.group(1)) - 1}.convolution.", inner)
        inner = re.sub(r"^bn(\d)\.", lambda c: f"layer.{int(c.group(1)) - 1}.normalization.", inner)
        inner = re.sub(r"^downsample\.0\.", "shortcut.convolution.", inner)
        inner = re.sub(r"^downsample\.1\.", "shortcut.normalization.", inner)
        key = f"resnet.encoder.stages.{int(m.group(1)) - 1}.layers.{m.group(2)}.{inner}"
    return key


def pretrained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random weights a wrong load cannot hide; BatchNorm statistics spread out."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() >= 2:
                t.copy_(torch.randn(t.shape, generator=g) * (2.0 / t[0].numel()) ** 0.5)
            else:
                t.copy_(torch.randn(t.shape, generator=g) * 0.1 + (1.0 if name.endswith("weight") else 0.0))
    return model.eval()


def _diff(capsys, tmp_path: Path, source: nn.Module, factory: str) -> tuple[Path, Path, str, str]:
    ckpt, rules = tmp_path / "tv.pth", tmp_path / "rules.yaml"
    torch.save(source.state_dict(), ckpt)  # definition order kept: it must not be taken for evidence
    code, out, err = run(capsys, "diff", ckpt, f"tests.diffing.test_diff_promises:{factory}", "--write", rules)
    assert (code, err) == (0, ""), err
    return ckpt, rules, rules.read_text(), out


def _logits(model: nn.Module, image: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(image)
    return out.logits if hasattr(out, "logits") else out


def _assert_same_outputs(source: nn.Module, target: nn.Module, image: torch.Tensor) -> None:
    expected, got = _logits(source, image), _logits(target.eval(), image)
    assert expected.abs().max() > 1e-2, "a trivial output proves nothing"
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_torchvision_bottlenecks_to_hugging_face_resnet_pair_right_and_load_the_same_model(capsys, tmp_path):
    """Every pairing is the true one (none by definition order: HF declares the shortcut
    first), nothing is ambiguous, and the draft applied as written gives the source's logits.
    Stage 1's first block alone cannot tell conv3 from downsample.0 (same shape); its second
    block can, and the family says the same inner name goes to the same place."""
    source = pretrained(TorchvisionResNet(16, [64, 128], [2, 1], num_classes=10))
    alignment = align(source.state_dict(), hf_resnet_21())
    assert [(p.source, p.target) for p in alignment.pairs if p.target != truth(p.source)] == []
    assert (len(alignment.pairs), alignment.choices, alignment.source_only, alignment.target_only) == (len(source.state_dict()), (), (), ())
    details = {p.source: p.detail for p in alignment.pairs}
    assert details["layer2.0.downsample.1.weight"] == "'layer2.0.downsample' ~ 'resnet.encoder.stages.1.layers.0.shortcut', the pairs inside agree"
    assert details["layer1.0.conv3.weight"] == "'layer1.#' ~ 'resnet.encoder.stages.0.layers.#', as in the other instances"
    assert details["layer2.0.bn1.weight"] == "'layer2.0' ~ 'resnet.encoder.stages.1.layers.0', by number"  # bn1..3 ~ layer.0..2
    assert not any("order" in d for d in details.values())

    ckpt, rules, text, out = _diff(capsys, tmp_path, source, "hf_resnet_21")
    assert "; 0 ambiguous; 0 source only; 0 target only\n" in out and "UNDECLARED" not in text
    target = hf_resnet_21()
    assert remap.load(target, ckpt, rules=rules).ok
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    _assert_same_outputs(source, target, image)


def test_what_nothing_tells_apart_is_a_choice_and_the_rest_is_right(capsys, tmp_path):
    """One block per stage: in stage 1, conv3 and downsample.0 are both [64, 16, 1, 1], bn3 and
    downsample.1 both [64], and no other block shows which is which. They are choices, left
    undeclared (apply fails naming them); every other pairing is the true one, and once the
    reviewer writes the true renames for the choices the model gives the source's logits."""
    source = pretrained(TorchvisionResNet(16, [64, 128], [1, 1], num_classes=10))
    alignment = align(source.state_dict(), hf_resnet_11())
    assert [(p.source, p.target) for p in alignment.pairs if p.target != truth(p.source)] == []
    base_s, base_t = "layer1.0.", "resnet.encoder.stages.0.layers.0."
    assert [(c.shape, c.sources, c.targets) for c in alignment.choices] == [
        ((64, 16, 1, 1), (base_s + "conv3.weight", base_s + "downsample.0.weight"),
         (base_t + "shortcut.convolution.weight", base_t + "layer.2.convolution.weight")),
        ((64,), tuple(base_s + f"{m}.{p}" for m in ("bn3", "downsample.1") for p in ("weight", "bias", "running_mean", "running_var")),
         tuple(base_t + f"{m}.normalization.{p}" for m in ("shortcut", "layer.2") for p in ("weight", "bias", "running_mean", "running_var"))),
        ((), (base_s + "bn3.num_batches_tracked", base_s + "downsample.1.num_batches_tracked"),
         (base_t + "shortcut.normalization.num_batches_tracked", base_t + "layer.2.normalization.num_batches_tracked")),
    ]  # fmt: skip
    assert summary_line(alignment).endswith("; 0 shape conflicts; 12 ambiguous; 0 source only; 0 target only")

    ckpt, rules, text, _ = _diff(capsys, tmp_path, source, "hf_resnet_11")
    parsed = yaml.safe_load(text)
    assert "expect" not in parsed and not any("drop" in step for step in parsed["rules"])  # nothing declared
    code, out, err = run(capsys, "apply", rules)
    assert code == 1 and "missing: 12 target key(s)" in out + err and "unused: 12 source key(s)" in out + err

    chosen = yaml.safe_load(text)
    chosen["rules"].append({"rename": {f"^{re.escape(s)}$": truth(s) for c in alignment.choices for s in c.sources}})
    target = hf_resnet_11()
    assert remap.load(target, ckpt, rules=chosen).ok
    _assert_same_outputs(source, target, torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2)))


def test_the_bottleneck_alone_wrapped_or_at_the_top_level_pairs_the_same_way():
    """The issue's case: one torchvision Bottleneck against one HF bottleneck layer, at the top
    level and inside a wrapper module. bn3 must not go to the shortcut, nor downsample.1 into
    layer.2, whatever order the two libraries declare their modules in."""
    from torchvision.models.resnet import Bottleneck, conv1x1
    from transformers.models.resnet.modeling_resnet import ResNetBottleNeckLayer

    class Wrap(nn.Module):
        def __init__(self, block: nn.Module) -> None:
            super().__init__()
            self.block = block

    def tv() -> nn.Module:
        return Bottleneck(16, 8, downsample=nn.Sequential(conv1x1(16, 32), nn.BatchNorm2d(32)))

    def hf() -> nn.Module:
        return ResNetBottleNeckLayer(16, 32)

    def block_truth(key: str) -> str:
        return truth(f"layer1.0.{key}").removeprefix("resnet.encoder.stages.0.layers.0.")

    for source, target, prefix in ((tv(), hf(), ""), (Wrap(tv()), Wrap(hf()), "block.")):
        a = align(source.state_dict(), target)
        assert {p.source: p.target for p in a.pairs} == {k: prefix + block_truth(k.removeprefix(prefix)) for k in source.state_dict()}
        assert summary_line(a) == "24 paired (24 structure); 0 shape conflicts; 0 ambiguous; 0 source only; 0 target only"
        draft = draft_rules(a)
        target = pretrained(target)
        source = pretrained(source, seed=3)
        assert remap.load(target, source.state_dict(), rules=draft.rules).ok
        image = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
        inner_s, inner_t = (source.block, target.block) if prefix else (source, target)
        _assert_same_outputs(inner_s, inner_t, image)


@pytest.mark.slow
def test_torchvision_resnet50_to_hugging_face_resnet50(capsys, tmp_path):
    """The full-size conversion of the issue (320 tensors, 34 of which used to come from the
    wrong source): every pairing the true one, and the logits the same."""
    import torchvision

    source = pretrained(torchvision.models.resnet50())
    alignment = align(source.state_dict(), hf_resnet50())
    assert [(p.source, p.target) for p in alignment.pairs if p.target != truth(p.source)] == []
    assert (len(alignment.pairs), alignment.choices) == (320, ())
    ckpt, rules, text, _ = _diff(capsys, tmp_path, source, "hf_resnet50")
    target = hf_resnet50()
    assert remap.load(target, ckpt, rules=rules).ok
    _assert_same_outputs(source, target, torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(5)))
