"""Sizes from the tensor and the model (``vars``, ``dN`` in reshape) and ``permute_heads``.

References come from the libraries, not from remap: transformers' own rotary
permutations (``PermuteForRope`` of its conversion ops, the GGUF loader's
``_reverse_permute_weights``), and, by outputs, a Meta-style Llama written here from the
Meta reference formula (rotary embedding as complex multiplication of interleaved pairs)
against transformers' ``LlamaForCausalLM`` loaded through ``configs/meta-llama-to-hf.yaml``.
Big configs are planned on shapes and run on meta tensors only.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import remap
from remap.errors import RulesError
from remap.planning.planner import make_plan
from remap.rules import ops
from remap.rules.parse import parse_rules
from remap.rules.steps import run_recipe

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "meta-llama-to-hf.yaml"
LLAMA = {"vocab_size": 96, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "tie_word_embeddings": False}  # fmt: skip


def _yaml(text: str) -> str:
    return textwrap.dedent(text).lstrip("\n")


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


# --------------------------------------------------------------------------- the permutation itself


@pytest.mark.parametrize(("shape", "heads", "dim"), [((64, 48), 4, 0), ((32, 48), 2, 0), ((64,), 8, 0), ((48, 64), 4, 1)])
def test_permute_heads_round_trips_exactly(shape: tuple[int, ...], heads: int, dim: int) -> None:
    w = _rand(*shape)
    there = ops.permute_heads(w, heads, "half_split", dim)
    assert not torch.equal(there, w)
    assert torch.equal(ops.permute_heads(there, heads, "interleaved", dim), w)
    assert torch.equal(ops.permute_heads(ops.permute_heads(w, heads, "interleaved", dim), heads, "half_split", dim), w)


def test_permute_heads_is_transformers_own_rope_permutation() -> None:
    from transformers.core_model_loading import PermuteForRope
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    class Config:
        num_attention_heads = 8

    for shape in ((64, 40), (64,)):
        w = _rand(*shape, seed=3)
        to_hf = PermuteForRope()._permute_for_rope(w.clone(), Config())  # interleaved (complex) -> split halves
        back = PermuteForRope(inverse=True)._permute_for_rope(w.clone(), Config())
        assert torch.equal(ops.permute_heads(w, 8, "half_split"), to_hf)
        assert torch.equal(ops.permute_heads(w, 8, "interleaved"), back)
    # transformers' GGUF loader undoes llama.cpp's permutation of attn_k with the kv heads (GQA)
    wk = _rand(32, 64, seed=4)
    processor = LlamaTensorProcessor(config={"num_attention_heads": 8, "num_key_value_heads": 4})
    gguf_back = torch.from_numpy(processor._reverse_permute_weights(wk.numpy().copy(), 8, 4).copy())
    assert torch.equal(ops.permute_heads(wk, 4, "half_split"), gguf_back)


# --------------------------------------------------------------------------- a Meta-style Llama


class MetaAttention(nn.Module):
    """Attention as Meta's llama reference writes it: q and k rotated as complex numbers made
    of neighbouring (interleaved) pairs, kv heads repeated for grouped-query attention."""

    def __init__(self, dim: int, heads: int, kv_heads: int) -> None:
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.wq = nn.Linear(dim, heads * self.head_dim, bias=False)
        self.wk = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wv = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.wo = nn.Linear(heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.wq(x).view(b, n, self.heads, self.head_dim)
        k = self.wk(x).view(b, n, self.kv_heads, self.head_dim)
        v = self.wv(x).view(b, n, self.kv_heads, self.head_dim)
        q, k = _rotate(q, freqs_cis), _rotate(k, freqs_cis)
        k = k.repeat_interleave(self.heads // self.kv_heads, dim=2)
        v = v.repeat_interleave(self.heads // self.kv_heads, dim=2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(2, 3) / math.sqrt(self.head_dim)
        scores = scores + torch.full((n, n), float("-inf")).triu(1)
        out = scores.softmax(dim=-1) @ v
        return self.wo(out.transpose(1, 2).reshape(b, n, -1))


def _rotate(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Meta's apply_rotary_emb: pairs (x[2i], x[2i+1]) as complex numbers times e^{i t theta_i}."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs_cis[None, :, None, :]).flatten(3).type_as(x)


def _freqs_cis(head_dim: int, n: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))
    return torch.polar(torch.ones(n, head_dim // 2), torch.outer(torch.arange(n).float(), freqs))


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class MetaBlock(nn.Module):
    def __init__(self, c: dict[str, Any]) -> None:
        super().__init__()
        dim = c["hidden_size"]
        self.attention = MetaAttention(dim, c["num_attention_heads"], c["num_key_value_heads"])
        self.feed_forward = nn.Module()
        self.feed_forward.w1 = nn.Linear(dim, c["intermediate_size"], bias=False)
        self.feed_forward.w2 = nn.Linear(c["intermediate_size"], dim, bias=False)
        self.feed_forward.w3 = nn.Linear(dim, c["intermediate_size"], bias=False)
        self.attention_norm, self.ffn_norm = RMSNorm(dim, c["rms_norm_eps"]), RMSNorm(dim, c["rms_norm_eps"])

    def forward(self, x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), freqs_cis)
        ff = self.feed_forward
        y = self.ffn_norm(h)
        return h + ff.w2(nn.functional.silu(ff.w1(y)) * ff.w3(y))


class MetaLlama(nn.Module):
    """Meta's ``Transformer``: its state_dict keys are those of a consolidated.00.pth."""

    def __init__(self, c: dict[str, Any] = LLAMA) -> None:
        super().__init__()
        self.head_dim = c["hidden_size"] // c["num_attention_heads"]
        self.tok_embeddings = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.layers = nn.ModuleList(MetaBlock(c) for _ in range(c["num_hidden_layers"]))
        self.norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.output = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.tok_embeddings(ids)
        freqs_cis = _freqs_cis(self.head_dim, ids.shape[1])
        for layer in self.layers:
            x = layer(x, freqs_cis)
        return self.output(self.norm(x))


def hf_llama(**overrides: Any) -> nn.Module:
    """The target: transformers' LlamaForCausalLM of the same config (eager attention)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**LLAMA, **overrides})
    config._attn_implementation = "eager"
    return LlamaForCausalLM(config).eval()


def _meta_weights() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = MetaLlama()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # far from init: a wrong permutation shows
    return model.state_dict()


def test_meta_llama_loads_into_hf_llama_with_the_same_logits(tmp_path: Path) -> None:
    weights = _meta_weights()
    torch.save({**weights, "rope.freqs": torch.zeros(8)}, tmp_path / "consolidated.00.pth")
    meta = MetaLlama().eval()
    meta.load_state_dict(weights)
    ids = torch.randint(0, LLAMA["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(1))

    target = hf_llama()
    report = remap.load(target, tmp_path / "consolidated.00.pth", rules=CONFIG)

    assert report.ok
    ops_of = {r.key: r.ops for r in report.targets}
    assert ops_of["model.layers.1.self_attn.q_proj.weight"] == ("permute_heads(to=half_split, heads=4)",)
    assert ops_of["model.layers.1.self_attn.k_proj.weight"] == ("permute_heads(to=half_split, heads=2)",)
    with torch.no_grad():
        expected, got = meta(ids), target(ids).logits
    assert torch.allclose(got, expected, atol=1e-4, rtol=1e-4), (got - expected).abs().max()
    # without the permutation the same weights load in the same shapes and give other logits
    plain = hf_llama()
    rules = parse_rules(CONFIG.read_text().split("  - permute_heads")[0].replace(
        "vars:\n  heads: {config: num_attention_heads}\n  kv_heads: {config: num_key_value_heads}\n", ""))
    assert remap.load(plain, weights, rules=rules).ok
    with torch.no_grad():
        assert not torch.allclose(plain(ids).logits, expected, atol=1e-2)


def test_export_runs_permute_heads_backwards(tmp_path: Path) -> None:
    weights = _meta_weights()
    target = hf_llama()
    assert remap.load(target, weights, rules=CONFIG).ok
    out = remap.export(target, CONFIG, like=weights)
    assert out.ok and set(out.state_dict) == set(weights)
    for key, value in weights.items():
        assert torch.equal(out.state_dict[key], value), key


SIZES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32, "num_key_value_heads": 32, "vocab_size": 32000},
    "70b": {"hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 128256},
}


def _meta_shapes(c: dict[str, Any], layers: int) -> dict[str, tuple[int, ...]]:
    hd = c["hidden_size"] // c["num_attention_heads"]
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (c["vocab_size"], c["hidden_size"]), "norm.weight": (c["hidden_size"],),
                                          "output.weight": (c["vocab_size"], c["hidden_size"])}  # fmt: skip
    for i in range(layers):
        p = f"layers.{i}."
        shapes |= {p + "attention.wq.weight": (c["num_attention_heads"] * hd, c["hidden_size"]),
                   p + "attention.wk.weight": (c["num_key_value_heads"] * hd, c["hidden_size"]),
                   p + "attention.wv.weight": (c["num_key_value_heads"] * hd, c["hidden_size"]),
                   p + "attention.wo.weight": (c["hidden_size"], c["num_attention_heads"] * hd),
                   p + "feed_forward.w1.weight": (c["intermediate_size"], c["hidden_size"]),
                   p + "feed_forward.w2.weight": (c["hidden_size"], c["intermediate_size"]),
                   p + "feed_forward.w3.weight": (c["intermediate_size"], c["hidden_size"]),
                   p + "attention_norm.weight": (c["hidden_size"],), p + "ffn_norm.weight": (c["hidden_size"],)}  # fmt: skip
    return shapes


@pytest.mark.parametrize("size", list(SIZES))
def test_one_rules_file_plans_7b_and_70b_on_shapes_only(size: str) -> None:
    """The shipped config unchanged: the head counts come from each model's config; the
    plan reads no tensor and every op runs on meta tensors."""
    c = SIZES[size]
    with torch.device("meta"):
        target = hf_llama(**c, num_hidden_layers=2)
    plan = remap.plan(target, _meta_shapes(c, 2), rules=CONFIG)

    assert plan.ok, plan.failures
    by_target = {a.target: a for a in plan.assignments}
    for proj, heads in (("q_proj", c["num_attention_heads"]), ("k_proj", c["num_key_value_heads"])):
        a = by_target[f"model.layers.1.self_attn.{proj}.weight"]
        assert a.ops == (f"permute_heads(to=half_split, heads={heads})",)
        inputs = {s: torch.empty(plan.source_meta[s].shape, device="meta") for s in a.sources}
        assert run_recipe(a.recipe, inputs).shape == target.get_parameter(a.target).shape


# --------------------------------------------------------------------------- vars and size expressions


def test_reshape_sizes_from_dims_and_vars() -> None:
    rules = parse_rules(_yaml("""
        version: 1
        vars: {heads: 4}
        rules:
          - reshape: {match: '^w$', shape: [heads, d0/heads, d1]}
          - reshape: {match: '^w$', shape: [d0*d1, -1]}
        """))
    plan = make_plan(rules, {"w": [64, 48]}, {"w": [64, 48]})
    assert plan.ok, plan.failures
    assert plan.assignments[0].ops == ("reshape([4, 16, 48])", "reshape([64, 48])")
    assert rules.steps[0].summary() == "reshape to [heads, d0/heads, d1] (heads=4) on '^w$'"


def test_a_division_with_a_remainder_fails_the_plan_naming_the_key_and_the_values() -> None:
    rules = parse_rules(_yaml("""
        version: 1
        vars: {heads: 3}
        rules:
          - reshape: {match: 'wq', shape: [heads, d0/heads, -1]}
        """), filename="rules.yaml")
    plan = make_plan(rules, {"l.wq": [64, 8]}, {"l.wq": [3, 21, 8]})
    assert [f.message for f in plan.failures if f.kind == "op"] == [
        "step 1 (reshape) (rules.yaml:4:5): key 'l.wq' [64, 8] float32: size 'd0/heads' does not divide exactly: "
        "64 / 3 leaves a remainder of 1 (d0=64, heads=3)"]


def test_permute_heads_that_do_not_split_fail_the_plan() -> None:
    rules = parse_rules({"version": 1, "rules": [{"permute_heads": {"match": "w", "heads": 3, "to": "half_split"}},
                                                 {"permute_heads": {"match": "v", "heads": 4, "to": "interleaved"}}]})  # fmt: skip
    plan = make_plan(rules, {"w": [64, 8], "v": [36, 8]}, {"w": [64, 8], "v": [36, 8]})
    assert [f.message for f in plan.failures] == [
        "step 1 (permute_heads): key 'w' [64, 8] float32: dim 0 has 64 rows, which do not split into 3 heads (64 / 3 leaves 1)",
        "step 2 (permute_heads): key 'v' [36, 8] float32: dim 0 has 36 rows: 4 heads of 9 rows, an odd head_dim, which has no "
        "rotary pairs to permute (is heads right?)"]


def test_config_vars_need_the_target_model() -> None:
    text = _yaml("""
        version: 1
        vars:
          heads: {config: num_attention_heads}
        rules:
          - permute_heads: {match: 'w', heads: heads, to: half_split}
        """)
    rules = parse_rules(text, filename="rules.yaml")
    with pytest.raises(RulesError) as info:
        remap.plan({"w": (8, 4)}, {"w": (8, 4)}, rules=rules)
    assert str(info.value) == ("rules.yaml:3:19: vars: 'heads' reads config.num_attention_heads of the target model, but the "
                               "target is a mapping of key -> shape (no model): plan with the model itself, or write the number "
                               "(`heads: 32`)")  # fmt: skip
    with pytest.raises(RulesError) as info:
        remap.plan(nn.Linear(4, 8), {"weight": (8, 4)}, rules=text.replace("'w'", "'weight'"))
    assert "but the target is a Linear without .config" in str(info.value)
    plan = make_plan(rules, {"w": [8, 4]}, {"w": [8, 4]})  # planned without binding: the op says why
    assert [f.message for f in plan.failures] == [
        "step 1 (permute_heads) (rules.yaml:5:5): key 'w' [8, 4] float32: size 'heads': heads is read from the target model's config "
        "(num_attention_heads), and this plan was made without the target module: plan with the model (remap.plan(model, ...)), "
        "or write the number in vars (`heads: 32`)"]


# (YAML text after `version: 1`, the whole message)
ERRORS = [
    pytest.param("vars: {heads: 4}\nrules:\n  - reshape: {match: w, shape: [haeds, -1]}\n",
                 "rules.yaml:4:33: step 1 (reshape): field 'shape': item 1: size 'haeds': 'haeds' is not in vars (did you mean "
                 "'heads'?) (defined: heads); dims of the input are d0, d1, ...", id="unknown-name"),
    pytest.param("vars: {heads: 4}\nrules:\n  - reshape: {match: w, shape: ['d0/(heads*2)', -1]}\n",
                 "rules.yaml:4:33: step 1 (reshape): field 'shape': item 1: bad size 'd0/(heads*2)' at column 4: expected an "
                 "integer, a name from vars or dN, found '(' (no parentheses: write d0/heads/2, read left to right)", id="parens"),
    pytest.param("rules:\n  - reshape: {match: w, shape: [d0+1]}\n",
                 "rules.yaml:3:33: step 1 (reshape): field 'shape': item 1: bad size 'd0+1' at column 3: expected * or / between "
                 "sizes, found '+' (sizes are products and exact quotients: + and - are not part of them; -1 is a whole entry)",
                 id="plus"),
    pytest.param("rules:\n  - reshape: {match: w, shape: ['d0/', -1]}\n",
                 "rules.yaml:3:33: step 1 (reshape): field 'shape': item 1: bad size 'd0/' at column 3: it ends with '/', expected "
                 "a size after it", id="trailing-op"),
    pytest.param("rules:\n  - reshape: {match: w, shape: [1.5, -1]}\n",
                 "rules.yaml:3:33: step 1 (reshape): field 'shape': item 1: expected an integer or a string, found a number 1.5",
                 id="float"),
    pytest.param("vars: {heads: 4, kv: 2}\nrules:\n  - reshape: {match: w, shape: [heads, -1]}\n",
                 "rules.yaml:2:18: vars: 'kv' is defined but no step's size names it; remove it, or use it", id="unused-var"),
    pytest.param("vars: {d1: 4}\nrules: []\n",
                 "rules.yaml:2:8: vars: the name 'd1' means dim 1 of the input in a size: call the var something else",
                 id="var-named-like-a-dim"),
    pytest.param("vars: {heads: {config: 3}}\nrules: []\n",
                 "rules.yaml:2:15: vars: field 'heads': expected a positive integer or {config: name} (an entry of the target "
                 "model's config), found a mapping {'config': 3}", id="bad-config"),
    pytest.param("rules:\n  - permute_heads: {match: w, heads: 0, to: half_split}\n",
                 "rules.yaml:3:38: step 1 (permute_heads): field 'heads': expected a number of heads >= 1 (or a name from vars), "
                 "found an integer 0", id="zero-heads"),
    pytest.param("rules:\n  - permute_heads: {match: w, heads: 4, to: halfsplit}\n",
                 "rules.yaml:3:45: step 1 (permute_heads): field 'to': expected one of: half_split, interleaved; found a string "
                 "'halfsplit' (did you mean 'half_split'?)", id="bad-layout"),
]


@pytest.mark.parametrize(("text", "message"), ERRORS)
def test_size_and_var_errors_name_the_place(text: str, message: str) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules("version: 1\n" + text, filename="rules.yaml")
    assert str(info.value) == message
