"""A module built on ``torch.device("meta")`` whose non-persistent buffers a Hugging Face
``_init_weights`` does not write: remap builds the model again from what is recorded on it (its
config, timm's recorded arguments) under ``remap.empty_weights()`` and takes the buffers from that
twin. References are the real libraries' models built on a real device."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import remap
from remap.errors import CheckError
from remap.loading.empty import hf_initialises, init_owners, rebuild_buffers

transformers = pytest.importorskip("transformers")


def falcon_config(**changes):
    """A tiny FalconH1: its ``mup_vector`` buffers are registered by FalconH1Model.__init__ on each
    mixer, and its ``_init_weights`` writes them only when run on the whole FalconH1Model."""
    return transformers.FalconH1Config(**{**dict(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, intermediate_size=64, vocab_size=100,
        mamba_d_ssm=32, mamba_n_heads=4, mamba_d_head=8, mamba_d_state=8, mamba_n_groups=1, mamba_chunk_size=16,
        max_position_embeddings=64, mamba_expand=1, ssm_multipliers=[0.5, 2.0, 3.0, 0.25, 1.5]), **changes})  # fmt: skip


def non_persistent(model: nn.Module) -> dict[str, torch.Tensor]:
    persistent = model.state_dict().keys()
    return {n: b for n, b in model.named_buffers() if n not in persistent}


def test_falcon_h1_on_meta_gets_its_mup_vectors_from_a_rebuild(tmp_path):
    torch.manual_seed(0)
    ref = transformers.FalconH1ForCausalLM(falcon_config()).eval()
    ref.save_pretrained(tmp_path)
    x = torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        want = ref(x).logits
    with torch.device("meta"):
        model = transformers.FalconH1ForCausalLM(falcon_config())
    mixer = model.model.layers[0].mamba  # what remap used to rely on, and refused without: _init_weights does not write it
    assert "mup_vector" not in hf_initialises(init_owners(model)["model.layers.0.mamba"], mixer)
    report = remap.load(model, tmp_path)
    assert report.warnings == (
        "4 tensor(s) not in the checkpoint were initialised on the meta-device target by FalconH1ForCausalLM(config) rebuilt from "
        "its FalconH1Config under remap.empty_weights(): model.layers.0.mamba.mup_vector (non-persistent buffer), "
        "model.layers.1.mamba.mup_vector (non-persistent buffer); by FalconH1Model._init_weights: model.rotary_emb.inv_freq "
        "(non-persistent buffer), model.rotary_emb.original_inv_freq (non-persistent buffer)",)  # fmt: skip
    for name, buffer in non_persistent(ref).items():
        assert torch.equal(model.get_buffer(name), buffer), name
    with torch.no_grad():
        assert torch.equal(model.eval()(x).logits, want)


def test_a_rebuild_whose_twin_differs_is_refused_naming_the_buffers_and_both_shapes(tmp_path):
    torch.manual_seed(0)
    transformers.FalconH1ForCausalLM(falcon_config()).save_pretrained(tmp_path)
    with torch.device("meta"):
        model = transformers.FalconH1ForCausalLM(falcon_config())
    model.config.mamba_n_heads = 8  # changed after the build: a rebuild from it is not this module
    with pytest.raises(CheckError) as info:
        remap.load(model, tmp_path)
    assert info.value.report.failures[0].message == (
        "non-persistent buffer(s) model.layers.0.mamba.mup_vector, model.layers.1.mamba.mup_vector of a meta-device target are not in "
        "any checkpoint and remap cannot compute them (FalconH1ForCausalLM(config) rebuilt from its FalconH1Config gives "
        "float32[1, 1, 88] where the module has float32[1, 1, 84]); build the target with `with remap.empty_weights(): model = ...` "
        "(parameters on meta, buffers computed by the module as usual) or on a real device")  # fmt: skip
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])  # untouched


@pytest.mark.parametrize("name", ["llama", "gpt2", "bert", "vit"])
def test_a_rebuild_gives_the_buffers_a_real_build_computes(name):
    """Llama, GPT-2, BERT and ViT get theirs from ``_init_weights`` (tests/loading/test_empty_weights.py
    loads them built on meta); the rebuild, the fallback, must give the same values."""
    from tests.loading.test_empty_weights import CONFIGS

    cls, config = CONFIGS[name]()
    ref = cls(config)
    with torch.device("meta"):
        model = cls(config)
    wanted = {n: b for n, b in non_persistent(model).items() if b.is_meta}
    assert wanted.keys() == non_persistent(ref).keys()
    state = torch.random.get_rng_state()
    found, missing = rebuild_buffers(model, wanted)
    assert missing == [] and found.keys() == wanted.keys()
    for n, r in found.items():
        assert torch.equal(r.value, ref.get_buffer(n)), n
        assert r.how == f"{cls.__name__}(config) rebuilt from its {type(config).__name__} under remap.empty_weights()"
    assert torch.equal(torch.random.get_rng_state(), state)  # a rebuild draws no random numbers of the caller's
    assert all(b.is_meta for b in wanted.values())  # the module is not touched


class Rotary(nn.Module):
    """A user's model around a Hugging Face submodule: no PreTrainedModel above it, no _init_weights."""

    def __init__(self, config) -> None:
        super().__init__()
        self.proj = nn.Linear(config.hidden_size, config.hidden_size)
        self.rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(config)


def test_a_submodule_built_from_its_config_alone_is_rebuilt():
    config = transformers.LlamaConfig(hidden_size=32, num_attention_heads=4, rope_theta=500.0)
    ref = Rotary(config)
    with torch.device("meta"):
        model = Rotary(config)
    report = remap.load(model, {k: v.clone() for k, v in ref.state_dict().items()})
    assert torch.equal(model.rotary.inv_freq, ref.rotary.inv_freq)
    assert report.warnings == (
        "2 tensor(s) not in the checkpoint were initialised on the meta-device target by LlamaRotaryEmbedding(config) rebuilt from "
        "its LlamaConfig under remap.empty_weights(): rotary.inv_freq (non-persistent buffer), rotary.original_inv_freq "
        "(non-persistent buffer)",)  # fmt: skip


class Window(nn.Module):
    """Keeps a config, but its constructor takes a size that is not in it: not rebuildable."""

    def __init__(self, config: dict, size: int) -> None:
        super().__init__()
        self.config = config
        self.fc = nn.Linear(size, size)
        self.register_buffer("mask", torch.tril(torch.ones(size, size)), persistent=False)


class Layer(nn.Module):
    """``(config, layer_idx)``, both kept: rebuilt with them."""

    def __init__(self, config: dict, layer_idx: int) -> None:
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.fc = nn.Linear(config["size"], config["size"])
        self.register_buffer("scale", torch.full((config["size"],), float(layer_idx + 1)), persistent=False)


def test_only_a_certain_call_is_rebuilt():
    with torch.device("meta"):
        model = nn.Sequential(Layer({"size": 4}, 0), Layer({"size": 4}, 1), Window({"size": 4}, 4))
    state = {f"{i}.fc.{k}": torch.ones(4, 4) if k == "weight" else torch.zeros(4) for i in range(3) for k in ("weight", "bias")}
    with pytest.raises(CheckError) as info:
        remap.load(model, state)
    assert [f.message for f in info.value.report.failures] == [
        "non-persistent buffer(s) 2.mask of a meta-device target are not in any checkpoint and remap cannot compute them; build the "
        "target with `with remap.empty_weights(): model = ...` (parameters on meta, buffers computed by the module as usual) or on a "
        "real device"]  # fmt: skip
    assert model[0].scale.is_meta and model[0].fc.weight.is_meta  # untouched
    del model[2]
    report = remap.load(model, {k: v for k, v in state.items() if not k.startswith("2.")})
    assert torch.equal(model[0].scale, torch.ones(4)) and torch.equal(model[1].scale, torch.full((4,), 2.0))
    assert "by Layer(config, layer_idx=0) rebuilt from its dict under remap.empty_weights(): 0.scale" in report.warnings[0]


class Masked(nn.Module):
    def __init__(self, size: int) -> None:
        super().__init__()
        self.fc = nn.Linear(size, size)
        self.register_buffer("mask", torch.tril(torch.ones(size, size)), persistent=False)


def test_a_plain_module_of_sizes_is_refused_as_before():
    with torch.device("meta"):
        model = Masked(4)
    with pytest.raises(CheckError) as info:
        remap.load(model, {"fc.weight": torch.ones(4, 4), "fc.bias": torch.zeros(4)})
    assert str(info.value) == (
        "1 check(s) failed (missing); the module was not touched.\n- non-persistent buffer(s) mask of a meta-device target are not "
        "in any checkpoint and remap cannot compute them; build the target with `with remap.empty_weights(): model = ...` (parameters "
        "on meta, buffers computed by the module as usual) or on a real device")  # fmt: skip
    assert model.mask.is_meta and model.fc.weight.is_meta


def test_a_timm_model_on_meta_is_rebuilt_from_the_arguments_timm_recorded():
    timm = pytest.importorskip("timm")
    kwargs = dict(img_size=64, window_size=4, depths=(1, 1), num_heads=(2, 4), embed_dim=16, num_classes=5)
    torch.manual_seed(0)
    ref = timm.create_model("swin_tiny_patch4_window7_224", **kwargs).eval()
    with torch.device("meta"):
        model = timm.create_model("swin_tiny_patch4_window7_224", **kwargs)
    if not isinstance(getattr(model, "_model_args", None), dict):
        pytest.skip("this timm does not record create_model's arguments on the model")
    report = remap.load(model, {k: v.clone() for k, v in ref.state_dict().items()})
    assert report.warnings[0].endswith(
        "by timm.create_model('swin_tiny_patch4_window7_224', img_size=64, window_size=4, depths=(1, 1), num_heads=(2, 4), "
        "embed_dim=16, num_classes=5) rebuilt from the arguments timm recorded under remap.empty_weights(): "
        "layers.0.blocks.0.attn.relative_position_index (non-persistent buffer), layers.1.blocks.0.attn.relative_position_index "
        "(non-persistent buffer)")  # fmt: skip
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref(x))


def test_a_timm_model_changed_after_creation_is_refused():
    timm = pytest.importorskip("timm")
    kwargs = dict(img_size=64, window_size=4, depths=(1, 1), num_heads=(2, 4), embed_dim=16, num_classes=5)
    with torch.device("meta"):
        model = timm.create_model("swin_tiny_patch4_window7_224", **kwargs)
        model.layers[0].blocks[0].attn.qkv = nn.Linear(16, 96)  # not what the recorded arguments build
    if not isinstance(getattr(model, "_model_args", None), dict):
        pytest.skip("this timm does not record create_model's arguments on the model")
    state = {k: torch.zeros(v.shape) for k, v in model.state_dict().items()}
    with pytest.raises(CheckError) as info:
        remap.load(model, state)
    message = info.value.report.failures[0].message
    assert message.startswith("non-persistent buffer(s) layers.0.blocks.0.attn.relative_position_index of a meta-device target")
    assert ("builds the WindowAttention that holds them unlike the module's (qkv.weight: module [96, 16], rebuilt [48, 16]; "
            "qkv.bias: module [96], rebuilt [48])") in message  # fmt: skip
    assert all(t.is_meta for t in model.parameters())
