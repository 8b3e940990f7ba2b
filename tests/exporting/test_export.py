"""``remap.export``: the rules run backwards (issue 15, items 1-3).

Every shipped config: load the original into its target, export back with no training, and
the original file's tensors come back bit for bit (as the library that wrote the file reads
them), lossy steps showing the --like fallback in the report. Then each op's inverse on its
own, with a change standing in for training; the proof that refuses an export that does not
round-trip (writing nothing); and the original's layout kept: format, __metadata__, the
torch.save nesting and the shard assignment.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

import conversion_models as cm
import remap
from remap.exporting import inverse
from remap.exporting.inverse import APPROXIMATED, EXPORTED, KEPT, LEFT_OUT, UNCHANGED
from test_conversions import CONFIGS, _hf_gpt2, pretrained_like, save_safetensors, save_torch
from weights import Small, perturb


def equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit: same dtype, shape and values."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


# --------------------------------------------------------------------------- every shipped config


@dataclass
class Case:
    """An original file, the target its config loads it into, and what the file holds as
    the library that wrote it reads it back."""

    like: Path
    target: nn.Module
    reference: dict[str, torch.Tensor]
    save: str  # where the export goes, relative to tmp_path
    unchanged: set[str] = field(default_factory=set)  # original keys the rules drop
    kept: set[str] = field(default_factory=set)  # original keys behind a lossy op
    left_out: set[str] = field(default_factory=set)  # target keys no source feeds


def _torch_file(path: Path, key: str | None = None) -> dict[str, torch.Tensor]:
    obj = torch.load(path, weights_only=True)
    return dict(obj[key] if key else obj)


def _timm_vit(tmp: Path) -> Case:
    like = save_safetensors(pretrained_like(cm.timm_vit()).state_dict(), tmp / "vit.safetensors")
    return Case(like, cm.torchvision_vit(), load_file(str(like)), "out/vit.safetensors")


def _timm_vit_resize(tmp: Path) -> Case:
    like = save_torch(pretrained_like(cm.timm_vit()).state_dict(), tmp / "vit_32.pth")
    return Case(like, cm.timm_vit_64(), _torch_file(like), "out/vit_64.pth", kept={"pos_embed"})


def _timm_resnet(tmp: Path) -> Case:
    import timm
    import torchvision

    like = save_torch(pretrained_like(timm.create_model("resnet18", pretrained=False)).state_dict(), tmp / "resnet18.pth")
    return Case(like, torchvision.models.resnet18(), _torch_file(like), "out/resnet18.pth")


def _gpt2(tmp: Path) -> Case:
    hf = pretrained_like(_hf_gpt2())
    hf.save_pretrained(tmp / "gpt2")  # model.safetensors without the tied lm_head.weight
    like = tmp / "gpt2"
    return Case(like, cm.GPT(), load_file(str(like / "model.safetensors")), "out")  # a folder: out/model.safetensors


def _head_subset(tmp: Path) -> Case:
    import torchvision

    like = save_safetensors(pretrained_like(torchvision.models.resnet18()).state_dict(), tmp / "r18.safetensors")
    return Case(like, cm.resnet18_head_subset(), load_file(str(like)), "out/r18.safetensors")


def _keras(tmp: Path) -> Case:
    import numpy as np
    from test_keras_conversion import TorchNet, _keras as keras_module, save_keras_model

    like = Path(save_keras_model(tmp))
    loaded = keras_module().models.load_model(like)
    reference = {f"{layer.name}.{w.path.rsplit('/', 1)[1]}": torch.from_numpy(np.array(w.numpy())) for layer in loaded.layers for w in layer.weights}
    counters = {"bn1.num_batches_tracked", "bn2.num_batches_tracked"}
    return Case(like, TorchNet(), reference, "out/model.safetensors", left_out=counters)


def _flax(tmp: Path) -> Case:
    from test_flax_conversion import TorchNet, flax_variables, save_flax

    serialization = pytest.importorskip("flax.serialization")
    like = save_flax(tmp, flax_variables())

    def flat(tree: dict, prefix: str = "") -> dict[str, torch.Tensor]:
        out = {}
        for k, v in tree.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": torch.from_numpy(__import__("numpy").array(v))})
        return out

    reference = flat(serialization.msgpack_restore(like.read_bytes()))  # what flax reads back
    return Case(like, TorchNet(), reference, "out/model.safetensors", left_out={"bn1.num_batches_tracked", "bn2.num_batches_tracked"})


def _pickled_model(tmp: Path) -> Case:
    """A whole-model pickle of a class gone since: the export is its state_dict (remap writes
    no pickled classes), under the old names."""
    from test_pickled_model_conversion import NewNet, save_old_model

    saved = save_old_model(tmp)
    return Case(saved.path, NewNet(), dict(saved.state), "out/old_model.pt")


def _tf(tmp: Path) -> Case:
    """A TensorFlow checkpoint (TensorFlow wrote it, in a subprocess): exported as safetensors
    under the checkpoint's variable names, with TensorFlow's own values."""
    from test_tf_conversion import TorchNet, tf_checkpoint, tf_values

    out = tf_checkpoint()
    left_out = {"bn1.num_batches_tracked", "bn2.num_batches_tracked"}
    return Case(out / "ckpt" / "ckpt-1", TorchNet(), tf_values(out), "out/model.safetensors", left_out=left_out)


def _lightning(tmp: Path) -> Case:
    import torchvision
    from test_configs import make_checkpoint

    like = tmp / "last.ckpt"
    make_checkpoint("torchvision.models:resnet18", str(like), "--wrap", "lightning")
    return Case(like, torchvision.models.resnet18(), _torch_file(like, "state_dict"), "out/last.ckpt")


def _mha_to_qkv(tmp: Path) -> Case:
    like = save_torch(pretrained_like(cm.mha_stack()).state_dict(), tmp / "mha.pt")
    return Case(like, cm.qkv_stack(), _torch_file(like), "out/mha.pt")


def _qkv_to_mha(tmp: Path) -> Case:
    like = save_torch(pretrained_like(cm.qkv_stack()).state_dict(), tmp / "qkv.pt")
    return Case(like, cm.mha_stack(), _torch_file(like), "out/qkv.pt")


def _onnx(tmp: Path) -> Case:
    from test_onnx_gguf_conversions import ConvBnNet, onnx_source

    onnx = pytest.importorskip("onnx")
    like = Path(onnx_source(tmp))
    reference = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy()) for t in onnx.load(str(like)).graph.initializer}
    return Case(like, ConvBnNet(), reference, "out/net.safetensors", left_out={"bn1.num_batches_tracked", "bn2.num_batches_tracked"})


def _stem(tmp: Path) -> Case:
    import torchvision

    like = save_torch(pretrained_like(torchvision.models.resnet18()).state_dict(), tmp / "r18.pth")
    return Case(like, cm.resnet18_gray(), _torch_file(like), "out/r18.pth", kept={"conv1.weight"})


def _finetune(tmp: Path) -> Case:
    import torchvision

    like = save_torch(pretrained_like(torchvision.models.resnet18()).state_dict(), tmp / "r18.pth")
    head = {"fc.weight", "fc.bias"}
    return Case(like, torchvision.models.resnet18(num_classes=10), _torch_file(like), "out/r18.pth", unchanged=head, left_out=head)


def _ddp(tmp: Path) -> Case:
    like = save_torch({f"module._orig_mod.{k}": v for k, v in perturb(Small(), seed=4).state_dict().items()}, tmp / "ddp.pt")
    return Case(like, Small(), _torch_file(like), "out/ddp.pt")


def _gguf(tmp: Path) -> Case:
    from test_onnx_gguf_conversions import LLAMA, gguf_name, gguf_permute, tiny_llama, write_llama_gguf

    source = pretrained_like(tiny_llama())
    like = write_llama_gguf(source, tmp / "tiny-llama.gguf")
    reference = {}  # what the test wrote: llama.cpp's names, q and k rows permuted, F32
    for key, t in source.state_dict().items():
        data = t.detach().float()
        if ".self_attn.q_proj." in key or ".self_attn.k_proj." in key:
            heads = LLAMA["num_attention_heads"] if ".q_proj." in key else LLAMA["num_key_value_heads"]
            data = torch.from_numpy(gguf_permute(data.numpy(), heads).copy())
        reference[gguf_name(key)] = data
    return Case(like, tiny_llama(), reference, "out/llama.safetensors")


def _meta_llama(tmp: Path) -> Case:
    from tests.rules.test_vars_and_heads import _meta_weights, hf_llama

    like = tmp / "consolidated.00.pth"
    torch.save(_meta_weights(), like)  # Meta's names, q/k rows interleaved for its rotary embedding
    return Case(like, hf_llama(), _torch_file(like), "out/consolidated.00.pth")


CASES: dict[str, Callable[[Path], Case]] = {
    "timm-vit-to-torchvision.yaml": _timm_vit,
    "timm-vit-resize-pos-embed.yaml": _timm_vit_resize,
    "timm-resnet-to-torchvision.yaml": _timm_resnet,
    "hf-gpt2-to-linear.yaml": _gpt2,
    "imagenet-head-subset.yaml": _head_subset,
    "keras-to-torch.yaml": _keras,
    "flax-to-torch.yaml": _flax,
    "tf-checkpoint-to-torch.yaml": _tf,
    "pickled-model-renamed-class.yaml": _pickled_model,
    "lightning-to-module.yaml": _lightning,
    "mha-to-qkv.yaml": _mha_to_qkv,
    "qkv-to-mha.yaml": _qkv_to_mha,
    "onnx-to-module.yaml": _onnx,
    "resnet-stem-in-channels.yaml": _stem,
    "torchvision-resnet-finetune.yaml": _finetune,
    "unwrap-ddp-compile.yaml": _ddp,
    "gguf-to-hf-llama.yaml": _gguf,
    "meta-llama-to-hf.yaml": _meta_llama,
}


#: Shipped configs that export refuses, with the test that proves the refusal.
REFUSED = {
    "merge-lora.yaml": "tests/test_peft_conversion.py (a LoRA merge keeps no factors)",
    "clip-two-towers.yaml": "tests/test_several_sources_cli.py (several sources: export each with its own rules)",
}


def test_every_shipped_config_has_an_export_case():
    assert set(CASES) | set(REFUSED) == {p.name for p in CONFIGS.glob("*.yaml")} and not set(CASES) & set(REFUSED)


def _read_back(path: Path, nest: str | None = None) -> dict[str, torch.Tensor]:
    """An exported file as safetensors or torch reads it (the library, not remap)."""
    if path.suffix == ".safetensors":
        return load_file(str(path))
    return _torch_file(path, nest)


@pytest.mark.parametrize("name", list(CASES))
def test_load_then_export_gives_the_original_back_bit_for_bit(tmp_path, name):
    case = CASES[name](tmp_path)
    config = CONFIGS / name
    assert remap.load(case.target, case.like, rules=config).ok
    report = remap.export(case.target, config, like=case.like, save=tmp_path / case.save)

    assert report.ok and set(report.state_dict) == set(case.reference)
    statuses = {r.key: r.status for r in report.keys}
    assert {k for k, s in statuses.items() if s == UNCHANGED} == case.unchanged
    assert {k for k, s in statuses.items() if s == KEPT} == case.kept
    assert {k for k, s in statuses.items() if s not in (UNCHANGED, KEPT)} == set(case.reference) - case.unchanged - case.kept
    assert {t.key for t in report.left_out} == case.left_out
    for key, value in case.reference.items():
        assert equal(report.state_dict[key], value), key
    for key in case.kept:  # a lossy op: the report says --like's tensor was kept
        assert any("cannot be inverted: --like's tensor kept" in n for n in report.record(key).notes), key
    if case.kept:
        assert f"lossy, --like kept: {len(case.kept)}" in str(report)
    for key in case.unchanged:
        assert any(n.startswith("dropped by step") for n in report.record(key).notes), key

    written = Path(report.saved["path"])
    expected = tmp_path / case.save
    assert written.is_file() and written == (expected if expected.suffix else expected / Path(report.like["path"]).name)
    back = _read_back(written, "state_dict" if name == "lightning-to-module.yaml" else None)
    assert back.keys() == case.reference.keys()
    for key, value in case.reference.items():
        assert equal(back[key], value), key


# --------------------------------------------------------------------------- each op backwards, with a change for training


def _export(target: nn.Module, rules: dict, like: dict[str, torch.Tensor], **options) -> remap.ExportReport:
    return remap.export(target, rules, like=like, **options)


class Holder(nn.Module):
    """Parameters under given names and shapes (dots make submodules)."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.names = list(shapes)
        for key, shape in shapes.items():
            *path, leaf = key.split(".")
            owner = self
            for part in path:
                if not hasattr(owner, part):
                    owner.add_module(part, nn.Module())
                owner = getattr(owner, part)
            owner.register_parameter(leaf, nn.Parameter(torch.zeros(shape, dtype=dtype)))


def _loaded(like: dict[str, torch.Tensor], rules: dict, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype = torch.float32) -> Holder:
    model = Holder(shapes, dtype)
    assert remap.load(model, like, rules=rules).ok
    return model


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def test_permute_and_reshape_invert_exactly():
    like = {"a": _rand(2, 3, 4), "b": _rand(6, 4, seed=1)}
    rules = {"version": 1, "rules": [{"transpose": {"match": "^a$", "dims": [2, 0, 1]}}, {"reshape": {"match": "^b$", "shape": [3, 2, 4]}}]}
    model = _loaded(like, rules, {"a": (4, 2, 3), "b": (3, 2, 4)})
    with torch.no_grad():
        model.a.add_(1.0)
    out = _export(model, rules, like)
    assert equal(out.state_dict["a"], like["a"] + 1.0)  # permute(2, 0, 1) undone by permute(1, 2, 0)
    assert equal(out.state_dict["b"], like["b"])
    assert out.record("a").ops == ("permute(2, 0, 1)",) and out.record("a").status == EXPORTED


def test_a_narrowing_cast_gives_the_original_bits_back_where_nothing_changed():
    like = {"w": _rand(5, 3), "v": _rand(4, seed=1)}
    rules = {"version": 1, "rules": [{"cast": {"match": ".*", "dtype": "float16"}}]}
    model = _loaded(like, rules, {"w": (5, 3), "v": (4,)}, torch.float16)
    with torch.no_grad():
        model.v.add_(1.0)
    out = _export(model, rules, like)
    assert equal(out.state_dict["w"], like["w"])  # float32 bits that float16 rounded away: from --like
    assert equal(out.state_dict["v"], model.v.detach().float())  # trained in float16: widened back
    assert not equal(out.state_dict["v"], like["v"] + 1.0)


def test_a_target_in_another_dtype_is_cast_back_to_the_originals():
    like = {"w": _rand(3, 3)}
    model = _loaded(like, {"version": 1}, {"w": (3, 3)}, torch.bfloat16)
    out = _export(model, {"version": 1}, like)
    assert equal(out.state_dict["w"], like["w"])  # untrained: the original bits, not bfloat16's
    with torch.no_grad():
        model.w.mul_(2)
    out = _export(model, {"version": 1}, like)
    assert equal(out.state_dict["w"], model.w.detach().float())


@pytest.mark.parametrize("spec", [{"index": [4, 0, 2]}, {"start": 1, "stop": 6, "step": 2}, {"start": 5, "stop": 0, "step": -2}])
def test_a_slice_is_written_back_into_the_originals_tensor(spec):
    like = {"fc.weight": _rand(7, 3)}
    rules = {"version": 1, "rules": [{"slice": {"match": "^fc", "dim": 0, **spec}}]}
    rows = list(range(7))[slice(spec.get("start"), spec.get("stop"), spec.get("step"))] if "index" not in spec else spec["index"]
    model = _loaded(like, rules, {"fc.weight": (3, 3)})
    with torch.no_grad():
        model.fc.weight.add_(10.0)
    out = _export(model, rules, like)
    expected = like["fc.weight"].clone()
    expected[rows] += 10.0
    assert equal(out.state_dict["fc.weight"], expected)
    assert "slice: written back into --like's tensor" in out.record("fc.weight").notes


def test_a_repeated_slice_entry_is_lossy():
    like = {"w": _rand(4, 2)}
    rules = {"version": 1, "rules": [{"slice": {"match": "w", "index": [1, 1]}}]}
    model = _loaded(like, rules, {"w": (2, 2)})
    with torch.no_grad():
        model.w.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    kept = _export(model, rules, like)
    assert kept.record("w").status == KEPT and equal(kept.state_dict["w"], like["w"])
    approx = _export(model, rules, like, allow_lossy=True)
    expected = like["w"].clone()
    expected[1] = torch.tensor([3.0, 4.0])  # the last copy wins
    assert approx.record("w").status == APPROXIMATED and equal(approx.state_dict["w"], expected)


def test_a_pad_is_cut_back_off_and_says_so():
    like = {"emb.weight": _rand(5, 2)}
    rules = {"version": 1, "rules": [{"pad": {"match": "emb", "fill": "mean"}}]}
    model = _loaded(like, rules, {"emb.weight": (8, 2)})
    with torch.no_grad():
        model.emb.weight.add_(1.0)
    out = _export(model, rules, like)
    assert equal(out.state_dict["emb.weight"], like["emb.weight"] + 1.0)
    assert "pad: the 6 entries it added are cut back off" in out.record("emb.weight").notes


def test_a_merge_and_a_stack_split_back_into_their_parts():
    like = {f"{p}.weight": _rand(4, 4, seed=n) for n, p in enumerate("qkv")} | {f"e{n}": _rand(2, 3, seed=5 + n) for n in range(2)}
    rules = {"version": 1, "rules": [
        {"merge": {"match": r"^(q|k|v)\.weight$", "into": "qkv", "order": ["q", "k", "v"]}},
        {"merge": {"match": r"^e(\d)$", "into": "experts", "order": ["0", "1"], "stack": True, "dim": 1}},
    ]}  # fmt: skip
    model = _loaded(like, rules, {"qkv": (12, 4), "experts": (2, 2, 3)})
    with torch.no_grad():
        model.qkv[4:8].mul_(3.0)  # "train" k only
    out = _export(model, rules, like)
    assert equal(out.state_dict["k.weight"], like["k.weight"] * 3.0)
    assert equal(out.state_dict["q.weight"], like["q.weight"]) and equal(out.state_dict["e1"], like["e1"])
    assert out.record("v.weight").targets == ("qkv",)


def test_split_parts_that_reach_no_target_come_from_the_original():
    like = {"in_proj": _rand(9, 2)}
    rules = {"version": 1, "rules": [{"split": {"match": "^in_proj$", "into": ["q", "k", "v"], "sizes": [2, 3, 4]}}, {"drop": "^k$"}]}
    model = _loaded(like, rules, {"q": (2, 2), "v": (4, 2)})
    with torch.no_grad():
        model.q.add_(1.0)
        model.v.add_(2.0)
    out = _export(model, rules, like)
    expected = like["in_proj"].clone()
    expected[:2] += 1.0
    expected[5:] += 2.0
    assert equal(out.state_dict["in_proj"], expected)
    assert "split: part 2 of 3 reaches no target key: taken from --like" in out.record("in_proj").notes
    assert out.record("in_proj").targets == ("q", "v")


def test_in_channels_is_kept_or_approximated():
    from timm.models import adapt_input_conv

    rgb = _rand(8, 3, 3, 3)
    rules = {"version": 1, "rules": [{"adapt": {"match": "conv", "op": "in_channels"}}]}
    gray = _loaded({"conv": rgb}, rules, {"conv": (8, 1, 3, 3)})
    with torch.no_grad():
        gray.conv.add_(0.5)
    kept = _export(gray, rules, {"conv": rgb})
    assert kept.record("conv").status == KEPT and equal(kept.state_dict["conv"], rgb)
    assert "(allow_lossy, --allow-lossy: an approximate inverse instead)" in kept.record("conv").notes[0]
    approx = _export(gray, rules, {"conv": rgb}, allow_lossy=True)
    assert approx.record("conv").status == APPROXIMATED
    torch.testing.assert_close(approx.state_dict["conv"].sum(1, keepdim=True), gray.conv.detach(), atol=1e-6, rtol=0)  # loads back as the gray filter
    torch.testing.assert_close(adapt_input_conv(1, approx.state_dict["conv"]), gray.conv.detach(), atol=1e-6, rtol=0)

    rgbn = _loaded({"conv": rgb}, rules, {"conv": (8, 4, 3, 3)})
    approx = _export(rgbn, rules, {"conv": rgb}, allow_lossy=True)
    torch.testing.assert_close(approx.state_dict["conv"], rgb, atol=1e-6, rtol=0)  # untrained: R's two copies agree
    with torch.no_grad():
        rgbn.conv[:, 3].add_(0.3)  # train the near-infrared channel (a copy of R)
    approx = _export(rgbn, rules, {"conv": rgb}, allow_lossy=True)
    expected = rgb.clone()
    expected[:, 0] += 0.3 / 2 * 4 / 3  # the mean of R's copies, unscaled
    torch.testing.assert_close(approx.state_dict["conv"], expected, atol=1e-6, rtol=0)


def test_interpolate_is_kept_or_approximated_by_interpolating_back():
    pos = _rand(1, 17, 8)
    rules = {"version": 1, "rules": [{"adapt": {"match": "pos", "op": "interpolate"}}]}
    model = _loaded({"pos": pos}, rules, {"pos": (1, 65, 8)})
    kept = _export(model, rules, {"pos": pos})
    assert kept.record("pos").status == KEPT and equal(kept.state_dict["pos"], pos)
    approx = _export(model, rules, {"pos": pos}, allow_lossy=True)
    grid = model.pos.detach()[:, 1:].reshape(1, 8, 8, 8).permute(0, 3, 1, 2)
    back = F.interpolate(grid, size=(4, 4), mode="bicubic", antialias=True).permute(0, 2, 3, 1).reshape(1, 16, 8)
    torch.testing.assert_close(approx.state_dict["pos"], torch.cat([model.pos.detach()[:, :1], back], 1), atol=1e-6, rtol=0)
    assert approx.record("pos").status == APPROXIMATED
    assert "interpolating back to 17 tokens (bicubic)" in approx.record("pos").notes[0]


def test_dropped_keys_come_unchanged_or_are_left_out():
    like = {"module.w": _rand(2), "module.head": _rand(3, seed=1)}
    rules = {"version": 1, "rules": [{"strip_prefix": "module."}, {"drop": "head"}]}
    model = _loaded(like, rules, {"w": (2,)})
    out = _export(model, rules, like)
    assert out.record("module.head").status == UNCHANGED and equal(out.state_dict["module.head"], like["module.head"])
    assert out.record("module.head").notes == ("dropped by step 2 (drop)",)
    only = _export(model, rules, like, only_loaded=True)
    assert list(only.state_dict) == ["module.w"] and only.record("module.head").status == LEFT_OUT


def test_a_tied_duplicate_is_the_same_tensor_again():
    hf = pretrained_like(_hf_gpt2())
    like = hf.state_dict()  # lm_head.weight is transformer.wte.weight, saved under both names
    config = CONFIGS / "hf-gpt2-to-linear.yaml"
    model = cm.GPT()
    assert remap.load(model, like, rules=config).ok
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    out = remap.export(model, config, like=like)
    assert out.state_dict["lm_head.weight"] is out.state_dict["transformer.wte.weight"]
    assert equal(out.state_dict["lm_head.weight"], like["lm_head.weight"] + 1.0)
    assert "a second copy of the tied 'transformer.wte.weight'" in out.record("lm_head.weight").notes[0]


def test_merged_qkv_after_fine_tuning_splits_back_into_the_three_projections(tmp_path):
    """configs/qkv-to-mha.yaml: a merge, fine-tuned, exported back: each projection is its
    part of the fine-tuned in_proj, and the original module computes what the fine-tuned
    MultiheadAttention computes."""
    source = pretrained_like(cm.QKVAttention())
    like = save_torch(source.state_dict(), tmp_path / "qkv.pt")
    config = CONFIGS / "qkv-to-mha.yaml"
    mha = cm.mha()
    assert remap.load(mha, like, rules=config).ok
    opt = torch.optim.SGD(mha.parameters(), lr=0.1)
    x = _rand(2, 5, cm.EMBED_DIM)
    mha(x, x, x, need_weights=False)[0].square().mean().backward()
    opt.step()
    out = remap.export(mha, config, like=like, save=tmp_path / "out.pt")
    back = cm.QKVAttention()
    back.load_state_dict(torch.load(tmp_path / "out.pt", weights_only=True), strict=True)
    e = cm.EMBED_DIM
    assert equal(back.k_proj.weight.detach(), mha.in_proj_weight.detach()[e : 2 * e])
    with torch.no_grad():
        torch.testing.assert_close(back(x, x, x)[0], mha(x, x, x, need_weights=False)[0], atol=1e-6, rtol=0)
    assert all(r.status == EXPORTED for r in out.keys)


# --------------------------------------------------------------------------- the proof


def test_the_proof_refuses_an_inverse_that_does_not_round_trip(tmp_path, monkeypatch):
    """An op whose recorded inverse is wrong (here: transpose undone as nothing) is caught
    before anything is written: loading the export would not give the tensor back."""
    like = {"w": _rand(3, 3)}
    rules = {"version": 1, "rules": [{"transpose": "w"}]}
    model = _loaded(like, rules, {"w": (3, 3)})
    monkeypatch.setitem(inverse._EXACT, "transpose", lambda t, inv: t)
    save = tmp_path / "out.safetensors"
    with pytest.raises(remap.CheckError) as err:
        _export(model, rules, like, save=save)
    assert not save.exists() and not list(tmp_path.iterdir())
    (failure,) = err.value.report.failures
    assert failure.kind == "round_trip" and "loading the export does not give back 1 fine-tuned tensor(s)" in failure.message
    assert "nothing was written" in err.value.message


def test_the_proof_refuses_a_shape_other_than_the_originals(tmp_path, monkeypatch):
    like = {"w": _rand(2, 3, 4)}
    rules = {"version": 1, "rules": [{"transpose": {"match": "w", "dims": [2, 0, 1]}}]}
    model = _loaded(like, rules, {"w": (4, 2, 3)})
    monkeypatch.setitem(inverse._EXACT, "transpose", lambda t, inv: t.permute(2, 0, 1))  # the forward op again, not its inverse
    with pytest.raises(remap.CheckError) as err:
        _export(model, rules, like, save=tmp_path / "out.pt")
    assert "'w': [3, 4, 2] float32, the original [2, 3, 4] float32" in err.value.report.failures[0].message
    assert not (tmp_path / "out.pt").exists()


def test_a_forward_plan_that_fails_is_refused_naming_its_failures(tmp_path):
    like = {"module.w": _rand(2), "module.extra": _rand(2)}
    rules = {"version": 1, "rules": [{"strip_prefix": "module."}]}
    model = Holder({"w": (2,), "new": (3,)})
    with pytest.raises(remap.CheckError) as err:
        remap.export(model, rules, like=like, save=tmp_path / "out.safetensors", report=tmp_path / "r.json")
    kinds = [f.kind for f in err.value.report.failures]
    assert kinds[:2] == ["missing", "unused"]
    assert not (tmp_path / "out.safetensors").exists()
    assert json.loads((tmp_path / "r.json").read_text())["ok"] is False


# --------------------------------------------------------------------------- layout kept


def _sharded_original(folder: Path, fmt: str) -> tuple[Path, dict[str, torch.Tensor], dict[str, str]]:
    """A Hugging Face style sharded checkpoint of Small (3 shards, an index, __metadata__)."""
    folder.mkdir(parents=True)
    state = {f"module.{k}": v.contiguous() for k, v in perturb(Small(), seed=6).state_dict().items()}
    keys = list(state)
    groups = [keys[:2], keys[2:6], keys[6:]]
    suffix = ".safetensors" if fmt == "safetensors" else ".bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for n, group in enumerate(groups):
        name = f"{stem}-{n + 1:05d}-of-00003{suffix}"
        part = {k: state[k] for k in group}
        if fmt == "safetensors":
            save_file(part, str(folder / name), metadata={"format": "pt", "shard": str(n)})
        else:
            torch.save(part, folder / name)
        weight_map.update(dict.fromkeys(group, name))
    index = folder / f"{stem}{suffix}.index.json"
    index.write_text(json.dumps({"metadata": {"total_size": 1, "origin": "hub"}, "weight_map": weight_map}))
    return index, state, weight_map


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
@pytest.mark.parametrize("save_as", ["folder", "index"])
def test_a_sharded_original_keeps_its_shard_assignment(tmp_path, fmt, save_as):
    index, state, weight_map = _sharded_original(tmp_path / "hub", fmt)
    config = CONFIGS / "unwrap-ddp-compile.yaml"
    model = Small()
    assert remap.load(model, index.parent, rules=config).ok
    with torch.no_grad():
        model.fc.bias.add_(1.0)
    save = tmp_path / "out" if save_as == "folder" else tmp_path / "out" / index.name
    report = remap.export(model, config, like=index.parent, save=save)
    written = json.loads((tmp_path / "out" / index.name).read_text())
    assert written["weight_map"] == weight_map  # same keys in the same shard files
    assert written["metadata"]["origin"] == "hub" and written["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in state.values())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted({*weight_map.values(), index.name})
    assert report.saved["shards"] == sorted(set(weight_map.values()))
    for name in set(weight_map.values()):
        path = tmp_path / "out" / name
        if fmt == "safetensors":
            with safe_open(str(path), framework="pt") as f:
                assert f.metadata() == {"format": "pt", "shard": str(sorted(set(weight_map.values())).index(name))}
            part = load_file(str(path))
        else:
            part = torch.load(path, weights_only=True)
        assert set(part) == {k for k, v in weight_map.items() if v == name}
        for key, value in part.items():
            expected = state[key] + 1.0 if key == "module.fc.bias" else state[key]
            assert equal(value, expected), key


def test_a_single_file_save_for_a_sharded_original_is_refused_before_anything_is_read(tmp_path):
    index, _, _ = _sharded_original(tmp_path / "hub", "safetensors")
    model = Small()
    with pytest.raises(remap.UsageError, match="the original is sharded .* give a folder, or the index's path"):
        remap.export(model, CONFIGS / "unwrap-ddp-compile.yaml", like=index, save=tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_safetensors_metadata_and_a_format_change_refused(tmp_path):
    state = perturb(Small(), seed=2).state_dict()
    like = tmp_path / "small.safetensors"
    save_file(state, str(like), metadata={"format": "pt", "license": "apache-2.0"})
    model = Small()
    assert remap.load(model, like).ok
    remap.export(model, None, like=like, save=tmp_path / "out" / "small.safetensors")
    with safe_open(str(tmp_path / "out" / "small.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "license": "apache-2.0"}
    with pytest.raises(remap.UsageError, match="is a safetensors file and the export keeps its format; give a name ending in .safetensors"):
        remap.export(model, None, like=like, save=tmp_path / "out.pt")


def test_a_nested_torch_original_is_written_nested(tmp_path):
    """A Lightning checkpoint: the weights go back under ``state_dict``; the report says the
    other entries (epoch, hyper_parameters) are not written."""
    from test_configs import make_checkpoint
    import torchvision

    like = tmp_path / "last.ckpt"
    make_checkpoint("torchvision.models:resnet18", str(like), "--wrap", "lightning")
    config = CONFIGS / "lightning-to-module.yaml"
    model = torchvision.models.resnet18()
    assert remap.load(model, like, rules=config).ok
    report = remap.export(model, config, like=like, save=tmp_path / "out.ckpt")
    saved = torch.load(tmp_path / "out.ckpt", weights_only=True)
    assert list(saved) == ["state_dict"] and set(saved["state_dict"]) == set(torch.load(like, weights_only=True)["state_dict"])
    assert any("the export writes the weights only" in w and "'epoch'" in w for w in report.warnings)


def test_the_report_accounts_for_every_key_in_json(tmp_path):
    case = _finetune(tmp_path)
    config = CONFIGS / "torchvision-resnet-finetune.yaml"
    remap.load(case.target, case.like, rules=config)
    report = remap.export(case.target, config, like=case.like, report=tmp_path / "r.json")
    data = json.loads((tmp_path / "r.json").read_text())
    assert data["schema"] == 1 and data["kind"] == "export" and data["ok"] and data["saved"] is None
    assert set(data["keys"]) == set(case.reference)
    assert data["keys"]["fc.weight"] == {"status": "unchanged", "shape": [1000, 512], "dtype": "float32", "targets": [], "ops": [],
                                         "notes": ["dropped by step 1 (drop)"]}  # fmt: skip
    assert data["left_out"] == {"fc.weight": {"reason": "no source key feeds it (expect.missing)"},
                                "fc.bias": {"reason": "no source key feeds it (expect.missing)"}}  # fmt: skip
    t = data["totals"]
    assert t["like_keys"] == t["written"] == len(case.reference) and t["unchanged"] == 2 and t["targets_left_out"] == 2
    assert t["exported"] == len(case.reference) - 2
    assert data == json.loads(report.to_json())


def test_a_tied_duplicate_in_a_safetensors_original_is_written_twice(tmp_path):
    """safetensors refuses two names on one memory: the second copy is written as a copy."""
    hf = pretrained_like(_hf_gpt2())
    like = tmp_path / "gpt2.safetensors"
    save_file({k: v.clone().contiguous() for k, v in hf.state_dict().items()}, str(like))  # lm_head.weight saved as its own tensor
    config = CONFIGS / "hf-gpt2-to-linear.yaml"
    model = cm.GPT()
    assert remap.load(model, like, rules=config).ok
    with torch.no_grad():
        model.transformer.wte.weight.add_(1.0)
    remap.export(model, config, like=like, save=tmp_path / "out.safetensors")
    back = load_file(str(tmp_path / "out.safetensors"))
    assert equal(back["lm_head.weight"], back["transformer.wte.weight"])
    assert equal(back["lm_head.weight"], load_file(str(like))["lm_head.weight"] + 1.0)
