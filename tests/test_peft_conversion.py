"""LoRA / DoRA adapters as PEFT saves them, merged by the ``lora`` step, against PEFT itself.

References come from peft: a tiny model wrapped with ``get_peft_model`` (random non-zero
factors), its adapter written with ``save_pretrained``; the merged plain model's outputs must
equal the PEFT model's, and its weights ``merge_and_unload()``'s. Then the second mode: an
adapter trained on other names, loaded into a PEFT-wrapped model through the base's renames.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import remap
from remap.errors import CheckError
from remap.rules.parse import load_rules

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "merge-lora.yaml"
LLAMA = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 32, "tie_word_embeddings": False}  # fmt: skip


def _llama() -> nn.Module:
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**LLAMA)).eval()


def _peft(base: nn.Module, folder: Path, seed: int = 1, **config: object) -> nn.Module:
    """``base`` (a copy) wrapped with LoRA, every factor random (B non-zero), saved to ``folder``."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn_like(p) * 0.2 + (1.0 if "magnitude" in name else 0.0))
    model.eval().save_pretrained(folder)
    return model


def _together(base: nn.Module, folder: Path) -> dict[str, torch.Tensor]:
    """The base model's weights and the adapter's keys in one state dict (one source)."""
    return {**{k: v.clone() for k, v in base.state_dict().items()}, **load_file(folder / "adapter_model.safetensors")}


def _merge_rules(folder: Path) -> dict:
    return {"version": 1, "rules": [{"drop": r"\.base_layer\.weight$", "optional": True},
                                    {"lora": {"match": ".*", "config": str(folder / "adapter_config.json")}}]}  # fmt: skip


def _target(report: object, key: str) -> object:
    return next(t for t in report.targets if t.key == key)


def _same_weights(model: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert set(state) == set(reference)
    for key, value in reference.items():
        torch.testing.assert_close(state[key], value, rtol=1e-6, atol=1e-6, msg=key)


@pytest.mark.parametrize("extra", [{}, {"use_rslora": True}, {"use_dora": True}], ids=["lora", "rslora", "dora"])
def test_llama_adapter_merges_into_its_base_like_peft(tmp_path: Path, extra: dict) -> None:
    torch.manual_seed(0)
    base = _llama()
    model = _peft(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"], **extra)
    x = torch.randint(0, LLAMA["vocab_size"], (2, 9))
    with torch.no_grad():
        expected = model(x).logits
    merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}

    target = _llama()
    report = remap.load(target, _together(base, tmp_path), rules=_merge_rules(tmp_path))
    with torch.no_grad():
        got = target(x).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    _same_weights(target, merged)
    assert not torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base.state_dict()["model.layers.0.self_attn.q_proj.weight"])
    q = _target(report, "model.layers.1.self_attn.q_proj.weight")
    assert q.sources == ("model.layers.1.self_attn.q_proj.weight", "base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight",
                         "base_model.model.model.layers.1.self_attn.q_proj.lora_B.weight",
                         *(("base_model.model.model.layers.1.self_attn.q_proj.lora_magnitude_vector",) if extra.get("use_dora") else ()))
    scale = 8 / 2 if extra.get("use_rslora") else 8 / 4
    assert f"scale={scale:g}" in q.ops[0] and ("dora" in q.ops[0]) == bool(extra.get("use_dora"))


def test_gpt2_conv1d_adapter_with_lora_bias_merges_like_peft(tmp_path: Path) -> None:
    config = transformers.GPT2Config(vocab_size=50, n_positions=16, n_embd=24, n_layer=2, n_head=2)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config).eval()
    model = _peft(base, tmp_path, r=4, lora_alpha=16, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, lora_bias=True)
    x = torch.randint(0, 50, (2, 8))
    with torch.no_grad():
        expected = model(x).logits
    merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    target = transformers.GPT2LMHeadModel(config).eval()
    report = remap.load(target, _together(base, tmp_path), rules=_merge_rules(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(target(x).logits, expected, rtol=1e-5, atol=1e-5)
    _same_weights(target, merged)
    assert "fan_in_fan_out" in _target(report, "transformer.h.0.attn.c_attn.weight").ops[0]
    assert _target(report, "transformer.h.0.attn.c_attn.bias").ops[0].startswith("lora_bias")


class _Convs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.point = nn.Conv2d(8, 6, 1)
        self.head = nn.Linear(6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.point(torch.relu(self.stem(x))).mean((2, 3)))


@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_conv2d_adapters_merge_like_peft(tmp_path: Path, dora: bool) -> None:
    torch.manual_seed(0)
    base = _Convs().eval()
    model = _peft(base, tmp_path, r=2, lora_alpha=4, target_modules=["stem", "point", "head"], use_dora=dora)
    x = torch.randn(2, 3, 6, 6)
    with torch.no_grad():
        expected = model(x)
    merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    target = _Convs().eval()
    remap.load(target, _together(base, tmp_path), rules=_merge_rules(tmp_path))
    with torch.no_grad():
        torch.testing.assert_close(target(x), expected, rtol=1e-5, atol=1e-5)
    _same_weights(target, merged)


def test_the_shipped_config_merges_an_adapter_beside_it(tmp_path: Path) -> None:
    """configs/merge-lora.yaml copied beside the adapter, the base and the adapter in one file."""
    torch.manual_seed(0)
    base = _llama()
    model = _peft(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "o_proj"])
    merged = {k: v.clone() for k, v in model.merge_and_unload().state_dict().items()}
    save_file(_together(base, tmp_path), tmp_path / "base_and_adapter.safetensors")
    rules = tmp_path / "merge-lora.yaml"
    shutil.copy(CONFIG, rules)
    target = _llama()
    report = remap.load(target, tmp_path / "base_and_adapter.safetensors", rules=load_rules(rules))
    _same_weights(target, merged)
    fates = {r.key: r.fate for r in report.sources}
    assert fates["base_model.model.model.layers.0.self_attn.k_proj.lora_B.weight"] == "used"
    assert {f for k, f in fates.items() if "lora_" in k} == {"used"}


def test_a_wrong_rank_in_the_config_fails_at_plan_time_naming_key_and_shapes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = _llama()
    _peft(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**config, "r": 8}))
    target = _llama()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(CheckError) as err:
        remap.load(target, _together(base, tmp_path), rules=_merge_rules(tmp_path))
    text = str(err.value)
    assert "'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight' [4, 32]" in text
    assert "[32, 4]" in text and "rank 4" in text and "rank 8" in text
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())  # nothing touched


def test_an_adapter_for_another_shape_fails_naming_the_base_key_and_both_shapes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    wide = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**LLAMA, "intermediate_size": 64}))
    _peft(wide, tmp_path, r=4, lora_alpha=8, target_modules=["down_proj"])
    base = _llama()
    plan = remap.plan(_llama(), _together(base, tmp_path), _merge_rules(tmp_path))
    assert not plan.ok
    text = "\n".join(f.message for f in plan.failures)
    assert "gives [32, 64]" in text and "'model.layers.0.mlp.down_proj.weight' is [32, 48]" in text


def test_export_refuses_a_merged_adapter(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = _llama()
    _peft(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj"])
    save_file(_together(base, tmp_path), tmp_path / "original.safetensors")
    target = _llama()
    remap.load(target, tmp_path / "original.safetensors", rules=_merge_rules(tmp_path))
    with pytest.raises(CheckError) as err:
        remap.export(target, rules=_merge_rules(tmp_path), like=tmp_path / "original.safetensors", save=tmp_path / "out.safetensors")
    text = str(err.value)
    assert "no export can run backwards" in text and "lora_merge(scale=2, rank=4)" in text and "keeps no factors" in text
    assert not (tmp_path / "out.safetensors").exists()


# --------------------------------------------------------------------------- the second mode: into a PEFT-wrapped model

#: Test-made "other library" names for the tiny Llama (the reverse of the rules below).
_FOREIGN = {"model.embed_tokens.": "tok_embeddings.", "model.norm.": "norm.", "lm_head.": "output.", ".self_attn.q_proj.": ".attention.wq.",
            ".self_attn.k_proj.": ".attention.wk.", ".self_attn.v_proj.": ".attention.wv.", ".self_attn.o_proj.": ".attention.wo.",
            ".mlp.gate_proj.": ".feed_forward.w1.", ".mlp.up_proj.": ".feed_forward.w3.", ".mlp.down_proj.": ".feed_forward.w2.",
            ".input_layernorm.": ".attention_norm.", ".post_attention_layernorm.": ".ffn_norm.", "model.layers.": "layers."}  # fmt: skip

INTO_PEFT = r"""
version: 1
rules:
  - strip_prefix: base_model.model.       # adapter keys now name modules as the base's keys do
  - rename:                               # the base's renames, written so that they rename adapter keys too
      '^tok_embeddings\.': 'model.embed_tokens.'
      '^norm\.': 'model.norm.'
      '^output\.': 'lm_head.'
      '^layers\.(\d+)\.attention\.w([qkvo])\.': 'model.layers.\1.self_attn.\2_proj.'
      '^layers\.(\d+)\.feed_forward\.w1\.': 'model.layers.\1.mlp.gate_proj.'
      '^layers\.(\d+)\.feed_forward\.w3\.': 'model.layers.\1.mlp.up_proj.'
      '^layers\.(\d+)\.feed_forward\.w2\.': 'model.layers.\1.mlp.down_proj.'
      '^layers\.(\d+)\.attention_norm\.': 'model.layers.\1.input_layernorm.'
      '^layers\.(\d+)\.ffn_norm\.': 'model.layers.\1.post_attention_layernorm.'
  - rename:                               # PEFT's wrapped names: the adapter's name, the wrapped base layer
      '\.(lora_A|lora_B)\.weight$': '.\1.default.weight'
      '\.(q_proj|v_proj)\.weight$': '.\1.base_layer.weight'
  - add_prefix: base_model.model.
"""


def _foreign(key: str) -> str:
    for hf, other in _FOREIGN.items():
        key = key.replace(hf, other)
    return key


def test_an_adapter_on_other_names_loads_into_a_peft_wrapped_model_through_the_base_renames(tmp_path: Path) -> None:
    torch.manual_seed(0)
    base = _llama()
    model = _peft(base, tmp_path, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    x = torch.randint(0, LLAMA["vocab_size"], (2, 9))
    with torch.no_grad():
        expected = model(x).logits
    checkpoint = {_foreign(k): v for k, v in _together(base, tmp_path).items()}
    assert "base_model.model.layers.0.attention.wq.lora_A.weight" in checkpoint and "layers.1.attention.wv.weight" in checkpoint

    torch.manual_seed(5)
    wrapped = peft.get_peft_model(_llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])).eval()
    rules = tmp_path / "into-peft.yaml"
    rules.write_text(INTO_PEFT)
    report = remap.load(wrapped, checkpoint, rules=load_rules(rules))
    with torch.no_grad():
        torch.testing.assert_close(wrapped(x).logits, expected, rtol=1e-6, atol=1e-6)
    assert _target(report, "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default.weight").sources == (
        "base_model.model.layers.0.attention.wq.lora_B.weight",)
    assert report.totals.missing == 0 and report.totals.unused == 0
