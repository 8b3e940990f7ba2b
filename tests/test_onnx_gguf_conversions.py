"""End-to-end conversions from other frameworks' files (issue 14, item 10), outputs compared.

* ``configs/onnx-to-module.yaml``: a conv+BatchNorm+linear module exported with
  ``torch.onnx.export`` (the TorchScript exporter, settings that keep the state_dict names),
  loaded back into a fresh module; its outputs must equal the original module's (onnxruntime
  is not needed: the reference is the torch module the file was exported from).
* ``configs/gguf-to-hf-llama.yaml``: a tiny ``transformers`` LlamaForCausalLM written as a
  GGUF file with the ``gguf`` package's own GGUFWriter, named and laid out as llama.cpp's
  converter does (attn_q / attn_k rows permuted for its rotary layout), loaded into a fresh
  LlamaForCausalLM; its logits must equal the original's (F32), or those of the original
  with the quantized tensors replaced by what ``gguf.quants`` dequantizes (Q8_0).
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import remap
from remap.cli import main
from test_conversions import assert_close, pretrained_like, rebuild, run, runs

onnx = pytest.importorskip("onnx")
gguf = pytest.importorskip("gguf")
np = pytest.importorskip("numpy")


def cli_apply(tmp_path: Path, config: Path, source: Path, target: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """``remap apply CONFIG --source S --target T --save ... --report ...``: (report, saved state_dict)."""
    report, saved = tmp_path / "cli-report.json", tmp_path / "cli-loaded.pt"
    argv = ["apply", str(config), "--source", str(source), "--target", target, "--report", str(report), "--save", str(saved), "-q"]
    assert main(argv) == 0
    return json.loads(report.read_text()), torch.load(saved, weights_only=True)


def check_clean(report: dict, *, missing: set[str] = frozenset(), ops: dict[str, list[str]] | None = None,
                tied: dict[str, str] | None = None) -> None:  # fmt: skip
    """ok; every target key loaded but the declared ``missing`` ones (and ``tied`` aliases);
    every source key used; ``ops`` lists the ops each target key must show (others: none)."""
    ops, tied = ops or {}, tied or {}
    assert report["ok"] and report["failures"] == [], report["failures"]
    t = report["totals"]
    assert t["mismatched"] == t["unused"] == t["dropped"] == 0
    assert t["missing"] == len(missing) and t["loaded"] == t["target_keys"] - len(missing)
    for key, rec in report["targets"].items():
        if key in missing:
            assert rec["status"] == "missing" and rec["declared"], key
        elif key in tied:
            assert (rec["status"], rec["tied_to"]) == ("tied", tied[key]), key
        else:
            assert rec["status"] == "loaded" and rec["sources"], key
            assert rec["ops"] == ops.get(key, []), key
    assert set(ops) <= set(report["targets"])
    assert all(rec["fate"] == "used" for rec in report["sources"].values())


# --------------------------------------------------------------------------- ONNX -> the module it was exported from


class ConvBnNet(nn.Module):
    """Conv + BatchNorm + ReLU, a second conv without bias, global pooling, a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean((2, 3)))


#: export settings: the config's (initializer names = state_dict keys); training mode, which
#: keeps the names but moves BatchNorm statistics; the default, which folds each BatchNorm
#: into its conv under graph-internal names (onnx::Conv_N).
EXPORTS: dict[str, dict[str, Any]] = {
    "eval-no-folding": {"do_constant_folding": False},
    "training-mode": {"training": torch.onnx.TrainingMode.TRAINING},
    "default-folded": {},
}


def export_onnx(model: nn.Module, path: Path, how: str = "eval-no-folding") -> Path:
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation warning
        torch.onnx.export(model, (torch.randn(1, 3, 16, 16),), str(path), dynamo=False, **EXPORTS[how])
    return path


def onnx_source(folder: Path) -> str:
    """A source for tests/report: a pretrained-like ConvBnNet exported as the config says."""
    return str(export_onnx(pretrained_like(ConvBnNet()), folder / "net.onnx"))


@runs("onnx-to-module.yaml")
def test_onnx_to_module(tmp_path, config):
    source = pretrained_like(ConvBnNet())
    before = {k: v.clone() for k, v in source.state_dict().items()}
    image = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    expected = run(source, image)
    path = export_onnx(source, tmp_path / "net.onnx")
    assert all(torch.equal(v, before[k]) for k, v in source.state_dict().items())  # the export changed nothing
    model = onnx.load(str(path))
    names = {t.name for t in model.graph.initializer}
    assert names == {k for k in before if not k.endswith("num_batches_tracked")}  # the settings keep the names
    assert "BatchNormalization" in {n.op_type for n in model.graph.node}  # not folded
    for t in model.graph.initializer:  # the file holds the module's values, read by onnx itself
        assert np.array_equal(onnx.numpy_helper.to_array(t), before[t.name].numpy()), t.name

    counters = {"bn1.num_batches_tracked", "bn2.num_batches_tracked"}
    report, saved = cli_apply(tmp_path, config, path, "test_onnx_gguf_conversions:ConvBnNet")
    check_clean(report, missing=counters)
    assert_close(run(rebuild("test_onnx_gguf_conversions:ConvBnNet", saved), image), expected, atol=1e-6)

    fresh = ConvBnNet()
    assert not torch.allclose(run(fresh, image), expected, atol=1e-3)  # a fresh module differs
    api = remap.load(fresh, path, rules=config)
    check_clean(api.to_dict(), missing=counters)
    assert_close(run(fresh, image), expected, atol=1e-6)
    for key, value in fresh.state_dict().items():
        if key not in counters:
            assert torch.equal(value, before[key]), key


@runs("onnx-to-module.yaml")
def test_onnx_training_mode_export_moves_batchnorm_statistics(tmp_path, config):
    """Why the config says not to export in training mode: the names are kept, but the trace
    runs the module in train mode, so its BatchNorm statistics (and the file's) move. The
    config loads what the file holds: the module as the export left it."""
    source = pretrained_like(ConvBnNet())
    original = copy.deepcopy(source)
    before = {k: v.clone() for k, v in source.state_dict().items()}
    path = export_onnx(source, tmp_path / "net.onnx", "training-mode")
    moved = {k for k, v in source.state_dict().items() if not torch.equal(v, before[k])}
    assert moved == {f"bn{i}.{s}" for i in (1, 2) for s in ("running_mean", "running_var", "num_batches_tracked")}
    image = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    fresh = ConvBnNet()
    remap.load(fresh, path, rules=config)
    assert_close(run(fresh, image), run(source, image), atol=1e-6)  # the module after the export
    assert not torch.allclose(run(fresh, image), run(original, image), atol=1e-4)  # not before it


@runs("onnx-to-module.yaml")
def test_onnx_folded_export_is_refused_not_guessed(tmp_path, config):
    """The default export folds BatchNorm into the conv (onnx::Conv_N): the config refuses the
    file, naming the unused graph-internal keys and the missing ones, and touches nothing."""
    path = export_onnx(pretrained_like(ConvBnNet()), tmp_path / "folded.onnx", "default-folded")
    names = {t.name for t in onnx.load(str(path)).graph.initializer}
    assert any(n.startswith("onnx::Conv_") for n in names) and "bn1.running_var" not in names
    fresh = ConvBnNet()
    state = {k: v.clone() for k, v in fresh.state_dict().items()}
    with pytest.raises(remap.CheckError) as err:
        remap.load(fresh, path, rules=config)
    report = err.value.report.to_dict()
    kinds = {f["kind"] for f in report["failures"]}
    assert {"missing", "unused"} <= kinds
    unused = {k for k, r in report["sources"].items() if r["fate"] == "unused"}
    assert unused == {n for n in names if n.startswith("onnx::")}
    missing = {k for k, r in report["targets"].items() if r["status"] == "missing" and not r["declared"]}
    assert {"conv1.weight", "bn1.running_mean", "bn2.running_var"} <= missing
    assert all(torch.equal(v, state[k]) for k, v in fresh.state_dict().items())


# --------------------------------------------------------------------------- GGUF (llama.cpp) -> HF LlamaForCausalLM

LLAMA = {"vocab_size": 128, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}  # fmt: skip


def tiny_llama(**overrides: Any) -> nn.Module:
    """The config's example model: LlamaForCausalLM, 2 layers, hidden 64, 4 heads, 2 kv heads."""
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(**{**LLAMA, "tie_word_embeddings": False, **overrides})).eval()


def tiny_llama_tied() -> nn.Module:
    return tiny_llama(tie_word_embeddings=True)


def gguf_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's converter on an attn_q / attn_k weight [out, in] (or bias [out]): within
    each head, rows go from the half-split rotary layout to interleaved pairs."""
    out, rest = w.shape[0], w.shape[1:]
    return w.reshape(n_head, 2, out // n_head // 2, *rest).swapaxes(1, 2).reshape(w.shape)


#: HF names -> llama.cpp names, as convert_hf_to_gguf.py maps a LlamaForCausalLM.
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "post_attention_layernorm": "ffn_norm",
}  # fmt: skip


def gguf_name(key: str) -> str:
    if key in GGUF_NAMES:
        return GGUF_NAMES[key]
    _, _, layer, rest = key.split(".", 3)  # model.layers.N.<module>.weight
    module, param = rest.rsplit(".", 1)
    return f"blk.{layer}.{GGUF_NAMES[module]}.{param}"


def write_llama_gguf(model: nn.Module, path: Path, *, q8_0: tuple[str, ...] = (), permute: bool = True) -> Path:
    """``model`` as llama.cpp's converter writes it: llama metadata, llama.cpp names, attn_q /
    attn_k permuted (with head_count and head_count_kv), F32 tensors but the HF keys in
    ``q8_0``, stored Q8_0 by ``gguf.quants.quantize``. A tied lm_head is not written."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny-llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if getattr(cfg, "rope_parameters", None) else 10000.0)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    w.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    state = model.state_dict()
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight")
    for key, t in state.items():
        data = t.detach().float().numpy()
        if permute and key.endswith(("self_attn.q_proj.weight", "self_attn.q_proj.bias")):
            data = gguf_permute(data, cfg.num_attention_heads)
        elif permute and key.endswith(("self_attn.k_proj.weight", "self_attn.k_proj.bias")):
            data = gguf_permute(data, cfg.num_key_value_heads)
        if key in q8_0:
            w.add_tensor(gguf_name(key), gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0),
                         raw_dtype=gguf.GGMLQuantizationType.Q8_0)  # fmt: skip
        else:
            w.add_tensor(gguf_name(key), np.ascontiguousarray(data))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_source(folder: Path) -> str:
    """A source for tests/report: a pretrained-like tiny Llama written as llama.cpp writes it."""
    return str(write_llama_gguf(pretrained_like(tiny_llama()), folder / "tiny-llama.gguf"))


def q8_0_roundtrip(t: torch.Tensor) -> torch.Tensor:
    """What a Q8_0 tensor holds: quantized and dequantized by the gguf package. Q8_0 blocks
    run along rows, so the converter's row permutation commutes with it."""
    q = gguf.quants.quantize(t.detach().float().numpy(), gguf.GGMLQuantizationType.Q8_0)
    return torch.from_numpy(gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(t.shape).copy())


ROTARY_OPS = {
    "q_proj.weight": ["permute_heads(to=half_split, heads=4)"],
    "k_proj.weight": ["permute_heads(to=half_split, heads=2)"],
    "q_proj.bias": ["permute_heads(to=half_split, heads=4)"],
    "k_proj.bias": ["permute_heads(to=half_split, heads=2)"],
}


def llama_ops(bias: bool, n_layer: int = 2) -> dict[str, list[str]]:
    return {f"model.layers.{i}.self_attn.{p}": ops for i in range(n_layer) for p, ops in ROTARY_OPS.items()
            if bias or p.endswith("weight")}  # fmt: skip


def tiny_llama_bias() -> nn.Module:
    return tiny_llama(attention_bias=True)


#: variant -> (target factory, HF keys stored as Q8_0)
GGUF_VARIANTS = {
    "f32": ("tiny_llama", ()),
    "f32-tied": ("tiny_llama_tied", ()),
    "f32-attention-bias": ("tiny_llama_bias", ()),
    "q8_0": ("tiny_llama", ("model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.down_proj.weight")),
}


@pytest.mark.parametrize("variant", list(GGUF_VARIANTS))
@runs("gguf-to-hf-llama.yaml")
def test_gguf_to_hf_llama(tmp_path, config, variant):
    name, quantized = GGUF_VARIANTS[variant]
    build, factory = globals()[name], f"test_onnx_gguf_conversions:{name}"
    tied, bias = variant == "f32-tied", variant == "f32-attention-bias"
    source = pretrained_like(build())
    assert (source.lm_head.weight is source.model.embed_tokens.weight) == tied
    path = write_llama_gguf(source, tmp_path / "tiny-llama.gguf", q8_0=quantized)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    expected = run(source, ids)

    # the file as the gguf package reads it: llama.cpp names, Q8_0 where asked
    stored = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(path)).tensors}
    assert ("output.weight" in stored) != tied and ("blk.1.attn_k.bias" in stored) == bias
    assert len(stored) == 2 + (9 + 4 * bias) * 2 + (not tied)
    assert {k for k, v in stored.items() if v == "Q8_0"} == {gguf_name(k) for k in quantized}

    reference = source
    if quantized:  # the original with each quantized tensor replaced by what Q8_0 holds
        reference = copy.deepcopy(source)
        with torch.no_grad():
            for key in quantized:
                reference.get_parameter(key).copy_(q8_0_roundtrip(source.get_parameter(key)))
        assert_close(run(reference, ids), expected, atol=0.05)  # Q8_0 is close to the original
        assert not torch.equal(run(reference, ids), expected)
        expected = run(reference, ids)
    atol = 1e-5

    tie = {"lm_head.weight": "model.embed_tokens.weight"} if tied else None
    report, saved = cli_apply(tmp_path, config, path, factory)
    check_clean(report, ops=llama_ops(bias), tied=tie)
    per_op = 4 if bias else 2
    assert [s["matched"] for s in report["steps"]] == [20 + 8 * bias, 0 if tied else 1, 0, *[per_op] * 2]
    rebuilt = import_target(factory)
    rebuilt.load_state_dict(saved, strict=not tied)
    assert_close(run(rebuilt, ids), expected, atol=atol)

    fresh = build()
    assert not torch.allclose(run(fresh, ids), expected, atol=1e-2)  # a fresh model differs
    api = remap.load(fresh, path, rules=config)
    check_clean(api.to_dict(), ops=llama_ops(bias), tied=tie)
    assert_close(run(fresh, ids), expected, atol=atol)
    assert (fresh.lm_head.weight is fresh.model.embed_tokens.weight) == tied
    for key, value in reference.state_dict().items():  # every weight back in its HF layout
        assert torch.allclose(fresh.state_dict()[key], value, atol=1e-7, rtol=0), key


def import_target(factory: str) -> nn.Module:
    from remap.sources.factories import import_callable

    return import_callable(factory)().eval()


@runs("gguf-to-hf-llama.yaml")
def test_gguf_rotary_steps_are_what_makes_attention_right(tmp_path, config):
    """The same weights written without the converter's permutation load in the same shapes,
    and the config's steps then scramble q and k: the logits differ. So the steps undo
    exactly the converter's layout, and a file converted differently is caught by outputs."""
    source = pretrained_like(tiny_llama())
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(1))
    path = write_llama_gguf(source, tmp_path / "unpermuted.gguf", permute=False)
    fresh = tiny_llama()
    report = remap.load(fresh, path, rules=config)
    assert report.ok
    assert not torch.allclose(run(fresh, ids), run(source, ids), atol=1e-3)
