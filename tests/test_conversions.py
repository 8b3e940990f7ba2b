"""The cross-library conversion configs in configs/, each run end to end.

Every test builds a source model offline with random weights (non-trivial BatchNorm
statistics and LayerNorm affines), saves it as a user's checkpoint would be saved, runs
the config the way its comment says, with the command line (``remap apply ... --target
factory --save``) and with the Python API (``remap.load``), and compares the outputs of
the source model and of the loaded target on the same input. The default tests use small
configurations; full-size models are under ``-m slow``, and a dry run of every config
against the full-size key sets (meta tensors, nothing allocated) runs by default.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file, save_file
from torch import nn

import conversion_models as cm
import remap
from remap.cli import main
from remap.sources.factories import build, import_callable

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

TESTED: set[str] = set()
"""The configs that a default (not slow) test below runs end to end; test_configs.py checks
that every file in configs/ is run by some test."""


def runs(name: str, *, slow: bool = False) -> Callable[[Callable[..., Any]], Any]:
    """Give the test its config as the ``config`` argument; a default test registers it in TESTED."""

    def mark(fn: Callable[..., Any]) -> Any:
        if not slow:
            TESTED.add(name)
        fn = pytest.mark.parametrize("config", [CONFIGS / name], ids=[name.removesuffix(".yaml")])(fn)
        return pytest.mark.slow(fn) if slow else fn

    return mark


# --------------------------------------------------------------------------- helpers


def pretrained_like(model: nn.Module, seed: int = 0, spread: float = 0.1) -> nn.Module:
    """Weights that a wrong load cannot hide, at a scale that keeps deep models finite.

    Matrices, kernels and embeddings are redrawn at the scale of their initialisation, at
    least 0.02 (unit-variance weights would overflow a ResNet-50 in eval mode, and a class
    token initialised at 1e-6 would hide); vectors (biases, norm affines, BatchNorm means)
    spread by ``spread`` around their initial mean, so that LayerNorm's ones and zeros
    differ from a fresh target's; BatchNorm variances lie in [0.5, 1.5].
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                if name.endswith("num_batches_tracked"):
                    t.fill_(1000 + seed)
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=g) + 0.5)
            elif t.dim() >= 2:
                t.copy_(noise * max(float(t.std()) if t.numel() > 1 else 0.0, 0.02))
            else:
                t.copy_(t.mean() + noise * spread)
    return model.eval()


def save_torch(state: dict[str, torch.Tensor], path: Path) -> Path:
    torch.save(state, path)
    return path


def save_safetensors(state: dict[str, torch.Tensor], path: Path) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def cli_apply(tmp_path: Path, config: Path, source: Path, target: str | None) -> tuple[dict, dict]:
    """``remap apply CONFIG --source S [--target T] --save ... --report ...``: (report, saved state_dict)."""
    report, saved = tmp_path / "cli-report.json", tmp_path / "cli-loaded.pt"
    argv = ["apply", str(config), "--source", str(source), "--report", str(report), "--save", str(saved), "-q"]
    if target is not None:
        argv += ["--target", target]
    assert main(argv) == 0
    return json.loads(report.read_text()), torch.load(saved, weights_only=True)


def rebuild(factory: str, state: dict[str, torch.Tensor]) -> nn.Module:
    """A fresh target from ``factory`` holding exactly ``state`` (what the CLI saved)."""
    model = import_callable(factory)()
    model.load_state_dict(state, strict=True)
    return model.eval()


def check_report(
    report: dict,
    *,
    ops: dict[str, list[str]] | None = None,
    dropped: str | None = None,
    tied: dict[str, str] | None = None,
) -> None:
    """A clean load: ok, no failure, every target key loaded (or tied, as given), every
    source key used (or dropped by a step, when it matches ``dropped``, or a checked
    duplicate of a tied parameter). ``ops`` maps target keys to the ops they must list;
    every other target key must list none."""
    ops, tied = ops or {}, tied or {}
    assert report["ok"] and report["failures"] == [], report["failures"]
    assert report["totals"]["missing"] == report["totals"]["mismatched"] == report["totals"]["unused"] == 0
    assert report["totals"]["loaded"] == report["totals"]["target_keys"]  # a tied alias is not a key of its own
    assert len(report["targets"]) == report["totals"]["target_keys"] + len(tied)
    for key, rec in report["targets"].items():
        if key in tied:
            assert (rec["status"], rec["tied_to"]) == ("tied", tied[key]), key
        else:
            assert rec["status"] == "loaded" and rec["sources"], key
        assert rec["ops"] == ops.get(key, []), key
    assert set(ops) <= set(report["targets"])
    for key, rec in report["sources"].items():
        if rec["fate"] == "dropped":
            assert dropped is not None and rec["step_kind"] == "drop" and re.search(dropped, key), key
        elif rec["fate"] == "duplicate":
            assert set(rec["targets"]) <= set(tied.values()), key
        else:
            assert rec["fate"] == "used" and rec["targets"], key


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float = 0.0) -> None:
    assert actual.shape == expected.shape
    assert torch.isfinite(expected).all() and expected.abs().max() > 10 * atol, "a trivial output proves nothing"
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@torch.no_grad()
def run(model: nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    out = model.eval()(*inputs)
    return getattr(out, "logits", out)


def step_matches(report: dict) -> list[int]:
    return [s["matched"] for s in report["steps"]]


# --------------------------------------------------------------------------- 1. timm ViT -> torchvision ViT


@runs("timm-vit-to-torchvision.yaml")
def test_timm_vit_to_torchvision(tmp_path, config):
    source = pretrained_like(cm.timm_vit())
    ckpt = save_safetensors(source.state_dict(), tmp_path / "vit_small_patch8_32.safetensors")
    image = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    expected = run(source, image)

    report, saved = cli_apply(tmp_path, config, ckpt, "conversion_models:torchvision_vit")
    check_report(report)  # renames only: no key lists an op
    depth = cm.VIT_SMALL["depth"]
    assert step_matches(report) == [12 * depth, 12 * depth, 8]  # every block key, then the 8 outside
    qkv = report["targets"]["encoder.layers.encoder_layer_1.self_attention.in_proj_weight"]
    assert qkv["sources"] == ["blocks.1.attn.qkv.weight"] and qkv["steps"] == ["step 1 (rename)", "step 2 (rename)"]
    assert report["targets"]["heads.head.bias"]["sources"] == ["head.bias"]
    assert_close(run(rebuild("conversion_models:torchvision_vit", saved), image), expected, atol=1e-4)

    model = cm.torchvision_vit()
    api = remap.load(model, ckpt, rules=config)
    assert api.ok and api.totals.loaded == api.totals.target_keys == 12 * depth + 8
    assert_close(run(model, image), expected, atol=1e-4)


def test_timm_qkv_layout_is_multihead_attentions():
    """timm's fused qkv is [q; k; v] along dim 0, heads contiguous within each: the
    layout of nn.MultiheadAttention's in_proj, so the ViT config moves it as it is."""
    from timm.models.vision_transformer import Attention

    attn = pretrained_like(Attention(32, num_heads=4, qkv_bias=True))
    mha = nn.MultiheadAttention(32, 4, batch_first=True).eval()
    mha.load_state_dict({"in_proj_weight": attn.qkv.weight, "in_proj_bias": attn.qkv.bias,
                         "out_proj.weight": attn.proj.weight, "out_proj.bias": attn.proj.bias})  # fmt: skip
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert_close(mha(x, x, x, need_weights=False)[0], attn(x), atol=1e-5)


@runs("timm-vit-to-torchvision.yaml", slow=True)
def test_timm_vit_base_to_torchvision_vit_b_16(tmp_path, config):
    import timm
    import torchvision

    source = pretrained_like(timm.create_model("vit_base_patch16_224"))
    ckpt = save_safetensors(source.state_dict(), tmp_path / "vit_base_patch16_224.safetensors")
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    expected = run(source, image)
    report, saved = cli_apply(tmp_path, config, ckpt, None)  # the config's own target: vit_b_16
    check_report(report)
    assert report["totals"]["loaded"] == 152 and step_matches(report) == [144, 144, 8]
    model = torchvision.models.vit_b_16()
    model.load_state_dict(saved)
    assert_close(run(model, image), expected, atol=1e-4)
    model = torchvision.models.vit_b_16()
    assert remap.load(model, ckpt, rules=config).ok
    assert_close(run(model, image), expected, atol=1e-4)


def test_vit_config_typo_fails_the_dry_run_naming_the_step(tmp_path, capsys):
    """Change one character of a rename: the dry run fails and says which step broke which key."""
    source = cm.timm_vit()
    ckpt = save_safetensors(source.state_dict(), tmp_path / "vit.safetensors")
    broken = tmp_path / "broken.yaml"
    broken.write_text((CONFIGS / "timm-vit-to-torchvision.yaml").read_text().replace(r"'\.mlp\.fc2\.'", r"'\.mlp\.fc3\.'"))
    code = main(["apply", str(broken), "--source", str(ckpt), "--target", "conversion_models:torchvision_vit", "--dry-run"])
    out = capsys.readouterr().out
    assert code == 1
    assert r"unmatched_step: step 2 (rename) (" in out and r"broken.yaml:22:5): '\.mlp\.fc3\.' matched no key" in out
    assert "blocks.0.mlp.fc2.{bias, weight} -> encoder.layers.encoder_layer_0.mlp.fc2.{bias, weight}" in out  # left without a target
    assert "encoder.layers.encoder_layer_0.mlp.3.{bias, weight}" in out  # and what it should have loaded


# --------------------------------------------------------------------------- 2. ViT position grid resized


def _interpolated(pos_embed: torch.Tensor, old: int, new: int) -> torch.Tensor:
    """A direct F.interpolate of the patch grid, the class token kept aside."""
    cls, grid = pos_embed[:, :1], pos_embed[:, 1:]
    dim = grid.shape[-1]
    grid = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False, antialias=True)
    return torch.cat([cls, grid.permute(0, 2, 3, 1).reshape(1, new * new, dim)], dim=1)


@runs("timm-vit-resize-pos-embed.yaml")
def test_timm_vit_resize_pos_embed(tmp_path, config):
    from timm.layers import resample_abs_pos_embed

    source = pretrained_like(cm.timm_vit())  # 32x32 images, 8x8 patches: a 4x4 grid
    ckpt = save_torch(source.state_dict(), tmp_path / "vit_32.pth")
    pos = source.pos_embed.detach()
    expected_pos = _interpolated(pos, 4, 8)
    assert torch.equal(expected_pos, resample_abs_pos_embed(pos, (8, 8), (4, 4), num_prefix_tokens=1))  # timm's own

    report, saved = cli_apply(tmp_path, config, ckpt, "conversion_models:timm_vit_64")
    check_report(report, ops={"pos_embed": ["interpolate(17->65 tokens, 2d, bicubic)"]})
    assert report["targets"]["pos_embed"]["source_shape"] == [1, 65, 64]
    assert report["sources"]["pos_embed"]["shape"] == [1, 17, 64]
    assert torch.allclose(saved["pos_embed"], expected_pos, atol=1e-6)

    model = cm.timm_vit_64()
    assert remap.load(model, ckpt, rules=config).ok
    assert torch.allclose(model.pos_embed.detach(), expected_pos, atol=1e-6)
    assert torch.equal(model.pos_embed[:, 0].detach(), pos[:, 0])  # the class token, untouched
    for key, value in source.state_dict().items():
        if key != "pos_embed":
            assert torch.equal(model.state_dict()[key], value), key
    out = run(model, torch.randn(2, 3, 64, 64))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


@runs("timm-vit-resize-pos-embed.yaml", slow=True)
def test_timm_vit_base_224_to_384(tmp_path, config):
    import timm

    source = pretrained_like(timm.create_model("vit_base_patch16_224"))
    ckpt = save_safetensors(source.state_dict(), tmp_path / "vit_base_patch16_224.safetensors")
    report, saved = cli_apply(tmp_path, config, ckpt, None)  # the config's target: the same ViT at 384
    check_report(report, ops={"pos_embed": ["interpolate(197->577 tokens, 2d, bicubic)"]})
    assert torch.allclose(saved["pos_embed"], _interpolated(source.pos_embed.detach(), 14, 24), atol=1e-6)
    model = timm.create_model("vit_base_patch16_224", img_size=384)
    model.load_state_dict(saved)
    out = run(model, torch.randn(1, 3, 384, 384))
    assert out.shape == (1, 1000) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- 3. timm ResNet -> torchvision ResNet


def _timm_resnet_to_torchvision(tmp_path: Path, config: Path, arch: str, target: str | None) -> None:
    import timm
    import torchvision

    source = pretrained_like(timm.create_model(arch))
    ckpt = save_torch(source.state_dict(), tmp_path / f"{arch}.pth")
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = run(source, image)

    report, saved = cli_apply(tmp_path, config, ckpt, target)
    check_report(report)
    assert all(rec["sources"] == [key] for key, rec in report["targets"].items())  # same names, nothing renamed
    model = getattr(torchvision.models, arch)()
    model.load_state_dict(saved)
    assert_close(run(model, image), expected, atol=1e-5)

    model = getattr(torchvision.models, arch)()
    assert remap.load(model, ckpt, rules=config).ok
    assert_close(run(model, image), expected, atol=1e-5)


@runs("timm-resnet-to-torchvision.yaml")
def test_timm_resnet18_to_torchvision(tmp_path, config):
    _timm_resnet_to_torchvision(tmp_path, config, "resnet18", "torchvision.models:resnet18")


@runs("timm-resnet-to-torchvision.yaml", slow=True)
def test_timm_resnet50_to_torchvision(tmp_path, config):
    _timm_resnet_to_torchvision(tmp_path, config, "resnet50", None)  # the config's target: resnet50


# --------------------------------------------------------------------------- 4. HF GPT-2 (Conv1D) -> nn.Linear


def _hf_gpt2(**config: Any) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    small = {"n_layer": 2, "n_embd": 64, "n_head": 2, "vocab_size": 100, "n_positions": 32, "bos_token_id": 0, "eos_token_id": 0}
    return GPT2LMHeadModel(GPT2Config(**{**small, **config}))


GPT2_TRANSPOSED = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def _gpt2_ops(n_layer: int) -> dict[str, list[str]]:
    return {f"transformer.h.{i}.{m}.weight": ["transpose(-2, -1)"] for i in range(n_layer) for m in GPT2_TRANSPOSED}


@pytest.mark.parametrize("layout", ["state_dict", "save_pretrained", "hub_gpt2model"])
@runs("hf-gpt2-to-linear.yaml")
def test_hf_gpt2_to_linear(tmp_path, config, layout):
    hf = pretrained_like(_hf_gpt2())
    assert hf.lm_head.weight is hf.transformer.wte.weight
    assert not [n for n, _ in hf.named_buffers()]  # transformers 5 keeps no attn.bias / masked_bias buffer
    dropped = None
    if layout == "state_dict":  # torch.save(model.state_dict()): lm_head.weight saved as well
        ckpt = save_torch(hf.state_dict(), tmp_path / "gpt2.pth")
    elif layout == "save_pretrained":  # the model folder: model.safetensors without the tied lm_head.weight
        hf.save_pretrained(tmp_path / "gpt2")
        ckpt = tmp_path / "gpt2"
        assert "lm_head.weight" not in load_file(ckpt / "model.safetensors")
    else:  # the original hub file: GPT2Model keys (no "transformer."), causal-mask buffers, no lm_head
        state = dict(hf.transformer.state_dict())
        for i in range(2):
            state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(32, 32, dtype=torch.bool)).view(1, 1, 32, 32)
            state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        ckpt = save_torch(state, tmp_path / "pytorch_model.bin")
        dropped = r"\.attn\.(bias|masked_bias)$"
    tokens = torch.randint(0, 100, (2, 32), generator=torch.Generator().manual_seed(1))
    expected = run(hf, tokens)

    report, saved = cli_apply(tmp_path, config, ckpt, "conversion_models:GPT")
    check_report(report, ops=_gpt2_ops(2), dropped=dropped, tied={"lm_head.weight": "transformer.wte.weight"})
    assert step_matches(report) == ([32, 4, 8] if layout == "hub_gpt2model" else [0, 0, 8])  # the optional steps match or not
    if layout == "state_dict":
        assert report["sources"]["lm_head.weight"]["fate"] == "duplicate"  # checked equal to wte, not loaded twice
    assert_close(run(rebuild("conversion_models:GPT", saved), tokens), expected, atol=1e-4)

    model = cm.GPT()
    api = remap.load(model, ckpt, rules=config)
    check_report(api.to_dict(), ops=_gpt2_ops(2), dropped=dropped, tied={"lm_head.weight": "transformer.wte.weight"})
    assert model.lm_head.weight is model.transformer.wte.weight  # still tied after the load
    assert_close(run(model, tokens), expected, atol=1e-4)


@runs("hf-gpt2-to-linear.yaml", slow=True)
def test_hf_gpt2_124m_to_linear(tmp_path, config):
    hf = pretrained_like(_hf_gpt2(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024))
    hf.save_pretrained(tmp_path / "gpt2")
    tokens = torch.randint(0, 50257, (1, 64), generator=torch.Generator().manual_seed(1))
    model = cm.GPT.gpt2()
    report = remap.load(model, tmp_path / "gpt2", rules=config)
    check_report(report.to_dict(), ops=_gpt2_ops(12), tied={"lm_head.weight": "transformer.wte.weight"})
    assert_close(run(model, tokens), run(hf, tokens), atol=1e-4)


# --------------------------------------------------------------------------- 5. q/k/v <-> nn.MultiheadAttention


def _attention_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cross-attention: query, key and value all differ, so a swapped part shows."""
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 5, cm.EMBED_DIM, generator=g), torch.randn(2, 7, cm.EMBED_DIM, generator=g), torch.randn(2, 7, cm.EMBED_DIM, generator=g)


def _merge_ops(prefix: str) -> dict[str, list[str]]:
    return {f"{prefix}in_proj_weight": ["cat(dim=0)[q, k, v]"], f"{prefix}in_proj_bias": ["cat(dim=0)[q, k, v]"]}


def _split_ops(prefix: str) -> dict[str, list[str]]:
    return {f"{prefix}{p}_proj.{w}": [f"split(dim=0)[{n} of 3]"] for n, p in enumerate("qkv") for w in ("weight", "bias")}


def test_qkv_attention_computes_what_multihead_attention_computes():
    """The reference module itself: same weights by hand, same outputs."""
    qkv, mha = pretrained_like(cm.QKVAttention()), cm.mha().eval()
    with torch.no_grad():
        mha.in_proj_weight.copy_(torch.cat([qkv.q_proj.weight, qkv.k_proj.weight, qkv.v_proj.weight]))
        mha.in_proj_bias.copy_(torch.cat([qkv.q_proj.bias, qkv.k_proj.bias, qkv.v_proj.bias]))
        mha.out_proj.load_state_dict(qkv.out_proj.state_dict())
        q, k, v = _attention_inputs()
        assert_close(mha(q, k, v, need_weights=False)[0], qkv(q, k, v)[0], atol=1e-5)


@runs("qkv-to-mha.yaml")
def test_qkv_to_mha(tmp_path, config):
    source = pretrained_like(cm.QKVAttention())
    ckpt = save_torch(source.state_dict(), tmp_path / "attn.pt")
    q, k, v = _attention_inputs()
    expected = run(source, q, k, v)[0]

    report, saved = cli_apply(tmp_path, config, ckpt, "conversion_models:mha")
    check_report(report, ops=_merge_ops(""))
    assert report["targets"]["in_proj_weight"]["sources"] == ["q_proj.weight", "k_proj.weight", "v_proj.weight"]
    assert report["targets"]["out_proj.weight"]["ops"] == [] and report["targets"]["out_proj.weight"]["sources"] == ["out_proj.weight"]
    assert_close(rebuild("conversion_models:mha", saved)(q, k, v, need_weights=False)[0].detach(), expected, atol=1e-5)

    model = cm.mha()
    assert remap.load(model, ckpt, rules=config).ok
    assert_close(run(model, q, k, v)[0], expected, atol=1e-5)


@runs("mha-to-qkv.yaml")
def test_mha_to_qkv(tmp_path, config):
    source = pretrained_like(cm.mha())
    ckpt = save_torch(source.state_dict(), tmp_path / "mha.pt")
    q, k, v = _attention_inputs()
    expected = run(source, q, k, v)[0]

    report, saved = cli_apply(tmp_path, config, ckpt, "conversion_models:QKVAttention")
    check_report(report, ops=_split_ops(""))
    assert report["targets"]["k_proj.weight"]["sources"] == ["in_proj_weight"]
    assert report["sources"]["in_proj_weight"]["targets"] == ["q_proj.weight", "k_proj.weight", "v_proj.weight"]
    assert_close(run(rebuild("conversion_models:QKVAttention", saved), q, k, v)[0], expected, atol=1e-5)

    model = cm.QKVAttention()
    assert remap.load(model, ckpt, rules=config).ok
    assert_close(run(model, q, k, v)[0], expected, atol=1e-5)
    assert torch.equal(model.v_proj.weight.detach(), source.in_proj_weight.detach()[2 * cm.EMBED_DIM :])


@pytest.mark.parametrize("direction", ["merge", "split"])
def test_qkv_mha_nested_and_round_trip(tmp_path, direction):
    """Attention under layers.N.attn: the same configs, prefixes carried through; and
    merge then split gives back the original tensors exactly."""
    merge, split = CONFIGS / "qkv-to-mha.yaml", CONFIGS / "mha-to-qkv.yaml"
    config, src_factory, tgt_factory = {
        "merge": (merge, "conversion_models:qkv_stack", "conversion_models:mha_stack"),
        "split": (split, "conversion_models:mha_stack", "conversion_models:qkv_stack"),
    }[direction]
    source = pretrained_like(import_callable(src_factory)())
    ckpt = save_torch(source.state_dict(), tmp_path / "stack.pt")
    x = torch.randn(2, 6, cm.EMBED_DIM, generator=torch.Generator().manual_seed(2))
    report, saved = cli_apply(tmp_path, config, ckpt, tgt_factory)
    ops = {k: v for i in range(2) for k, v in (_merge_ops if direction == "merge" else _split_ops)(f"layers.{i}.attn.").items()}
    check_report(report, ops=ops)
    target = rebuild(tgt_factory, saved)
    assert_close(run(target, x), run(source, x), atol=1e-5)

    back = import_callable(src_factory)()
    assert remap.load(back, target.state_dict(), rules=split if direction == "merge" else merge).ok
    for key, value in source.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key


# --------------------------------------------------------------------------- 6. RGB stem -> 1 or 4 input channels


@runs("resnet-stem-in-channels.yaml")
def test_resnet_stem_to_gray(tmp_path, config):
    import torchvision

    source = pretrained_like(torchvision.models.resnet18())
    ckpt = save_torch(source.state_dict(), tmp_path / "resnet18.pth")
    gray = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = run(source, gray.expand(-1, 3, -1, -1))  # the RGB model on the gray image, repeated

    report, saved = cli_apply(tmp_path, config, ckpt, "conversion_models:resnet18_gray")
    check_report(report, ops={"conv1.weight": ["in_channels(3->1)"]})
    assert report["targets"]["conv1.weight"]["shape"] == [64, 1, 7, 7]
    assert torch.equal(saved["conv1.weight"], source.conv1.weight.detach().sum(1, keepdim=True))
    assert_close(run(rebuild("conversion_models:resnet18_gray", saved), gray), expected, atol=1e-5, rtol=1e-5)

    model = cm.resnet18_gray()
    assert remap.load(model, ckpt, rules=config).ok
    assert_close(run(model, gray), expected, atol=1e-5, rtol=1e-5)
    for key, value in source.state_dict().items():
        if key != "conv1.weight":
            assert torch.equal(model.state_dict()[key], value), key


@runs("resnet-stem-in-channels.yaml")
def test_resnet_stem_to_four_channels(tmp_path, config):
    import torchvision
    from timm.models import adapt_input_conv

    source = pretrained_like(torchvision.models.resnet18())
    ckpt = save_safetensors(source.state_dict(), tmp_path / "resnet18.safetensors")
    report, saved = cli_apply(tmp_path, config, ckpt, "conversion_models:resnet18_rgbn")
    check_report(report, ops={"conv1.weight": ["in_channels(3->4)"]})
    reference = adapt_input_conv(4, source.conv1.weight.detach())
    assert torch.equal(saved["conv1.weight"], reference)

    model = cm.resnet18_rgbn()
    assert remap.load(model, ckpt, rules=config).ok
    assert torch.equal(model.conv1.weight.detach(), reference)
    for key, value in source.state_dict().items():
        if key != "conv1.weight":
            assert torch.equal(model.state_dict()[key], value), key
    w = source.conv1.weight.detach()
    assert torch.equal(model.conv1.weight.detach(), torch.cat([w, w[:, :1]], dim=1) * 0.75)  # R, G, B, R at 3/4
    assert torch.isfinite(run(model, torch.randn(1, 4, 64, 64))).all()


# --------------------------------------------------------------------------- 7. ImageNet head sliced to chosen classes


def _head_subset_index(config: Path) -> list[int]:
    rules = yaml.safe_load(config.read_text())
    (step,) = [s["slice"] for s in rules["rules"] if "slice" in s]
    assert rules["target"]["kwargs"]["num_classes"] == len(step["index"])  # the config agrees with itself
    return step["index"]


@runs("imagenet-head-subset.yaml")
def test_imagenet_head_subset(tmp_path, config):
    import torchvision

    index = _head_subset_index(config)
    assert len(index) == cm.HEAD_SUBSET_CLASSES
    source = pretrained_like(torchvision.models.resnet18())
    ckpt = save_safetensors(source.state_dict(), tmp_path / "resnet18-imagenet.safetensors")
    image = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    expected = run(source, image)[:, index]

    report, saved = cli_apply(tmp_path, config, ckpt, "conversion_models:resnet18_head_subset")
    op = f"slice(dim=0, index={index})"
    check_report(report, ops={"fc.weight": [op], "fc.bias": [op]})
    assert report["targets"]["fc.weight"]["shape"] == [len(index), 512]
    assert_close(run(rebuild("conversion_models:resnet18_head_subset", saved), image), expected, atol=1e-5)

    model = torchvision.models.resnet18(num_classes=len(index))
    assert remap.load(model, ckpt, rules=config).ok
    assert_close(run(model, image), expected, atol=1e-5)
    assert torch.equal(model.fc.weight.detach(), source.fc.weight.detach()[index])


@runs("imagenet-head-subset.yaml", slow=True)
def test_imagenet_head_subset_resnet50(tmp_path, config):
    import torchvision

    index = _head_subset_index(config)
    source = pretrained_like(torchvision.models.resnet50())
    ckpt = save_torch(source.state_dict(), tmp_path / "resnet50-imagenet.pth")
    image = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    report, saved = cli_apply(tmp_path, config, ckpt, None)  # the config's target: resnet50, 5 classes
    op = f"slice(dim=0, index={index})"
    check_report(report, ops={"fc.weight": [op], "fc.bias": [op]})
    model = torchvision.models.resnet50(num_classes=len(index))
    model.load_state_dict(saved)
    assert_close(run(model, image), run(source, image)[:, index], atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------- every config on full-size key sets


def _meta_state(factory: Callable[[], nn.Module]) -> dict[str, tuple[tuple[int, ...], str]]:
    with torch.device("meta"):
        model = factory()
    return {k: (tuple(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()}


def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import timm

        return timm.create_model(name, **kwargs)

    return make


def _torchvision(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(**kwargs)

    return make


def _hf_gpt2_124m() -> nn.Module:
    return _hf_gpt2(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024)


def _gray_resnet50() -> nn.Module:
    model = _torchvision("resnet50")()
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


FULL_SIZE = {  # id: config, source, target (None: the config's own), the ops every loaded key must list
    "vit_b_16": ("timm-vit-to-torchvision.yaml", _timm("vit_base_patch16_224"), None, {}),
    "vit_l_16": ("timm-vit-to-torchvision.yaml", _timm("vit_large_patch16_224"), _torchvision("vit_l_16"), {}),
    "vit_384": ("timm-vit-resize-pos-embed.yaml", _timm("vit_base_patch16_224"), None,
                {"pos_embed": ["interpolate(197->577 tokens, 2d, bicubic)"]}),
    "resnet50": ("timm-resnet-to-torchvision.yaml", _timm("resnet50"), None, {}),
    "gpt2_124m": ("hf-gpt2-to-linear.yaml", _hf_gpt2_124m, cm.GPT.gpt2, _gpt2_ops(12)),
    "gray_resnet50": ("resnet-stem-in-channels.yaml", _torchvision("resnet50"), _gray_resnet50,
                      {"conv1.weight": ["in_channels(3->1)"]}),
    "head_subset": ("imagenet-head-subset.yaml", _torchvision("resnet50"), None,
                    {f"fc.{w}": ["slice(dim=0, index=[207, 208, 281, 282, 285])"] for w in ("weight", "bias")}),
}  # fmt: skip


@pytest.mark.parametrize("case", list(FULL_SIZE))
def test_full_size_dry_run(case):
    """Each config planned against full-size key sets, with the config's own target where
    it names one: meta tensors, so nothing is allocated or read, and it runs by default."""
    name, source, target, ops = FULL_SIZE[case]
    config = CONFIGS / name
    if target is None:
        spec = yaml.safe_load(config.read_text())["target"]
        target = lambda: build(spec["model"], spec.get("args", []), spec.get("kwargs", {}))  # noqa: E731
    with torch.device("meta"):
        model = target()
    plan = remap.plan(model, _meta_state(source), config)
    assert plan.report.dry_run
    check_report(plan.report.to_dict(), ops=ops, tied={"lm_head.weight": "transformer.wte.weight"} if case == "gpt2_124m" else None)


# --------------------------------------------------------------------------- the report names the op steps


def test_report_steps_list_the_tensor_op_steps():
    """Each loaded key's ``steps`` names the tensor steps that changed it, one-to-one ops as
    well as merge and split (docs/report.md: the steps that changed its name or tensor)."""
    import torchvision

    gpt = remap.load(cm.GPT(), pretrained_like(_hf_gpt2()).state_dict(), rules=CONFIGS / "hf-gpt2-to-linear.yaml")
    resnet = pretrained_like(torchvision.models.resnet18()).state_dict()
    stem = remap.load(cm.resnet18_gray(), resnet, rules=CONFIGS / "resnet-stem-in-channels.yaml")
    head = remap.load(cm.resnet18_head_subset(), resnet, rules=CONFIGS / "imagenet-head-subset.yaml")
    merge = remap.load(cm.mha(), cm.QKVAttention().state_dict(), rules=CONFIGS / "qkv-to-mha.yaml")
    assert merge.target_record("in_proj_weight").steps == ("step 1 (merge)",)
    assert gpt.target_record("transformer.h.0.attn.c_attn.weight").steps == ("step 3 (transpose)",)
    assert stem.target_record("conv1.weight").steps == ("step 1 (adapt)",)
    assert head.target_record("fc.bias").steps == ("step 1 (slice)",)
