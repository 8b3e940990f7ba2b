"""Building without initialising: ``remap.empty_weights()`` (parameters on meta, buffers real),
targets remap builds itself, and meta-device targets whose non-persistent buffers remap computes
through the model's own ``_init_weights``. References are the real libraries' own models."""

from __future__ import annotations

import torch
import pytest
from torch import nn

import remap
from remap.errors import CheckError

transformers = pytest.importorskip("transformers")

CONFIGS = {
    "bert": lambda: (transformers.BertModel, transformers.BertConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=100, max_position_embeddings=64)),
    "gpt2": lambda: (transformers.GPT2Model, transformers.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=100, n_positions=64, bos_token_id=0, eos_token_id=0)),
    "llama": lambda: (transformers.LlamaModel, transformers.LlamaConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64, vocab_size=100,
        max_position_embeddings=64)),
    "vit": lambda: (transformers.ViTModel, transformers.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32, patch_size=8)),
}  # fmt: skip

# transformers 5 saves ViT under its legacy names; the model's own are newer
VIT_RULES = {"version": 1, "rules": [
    {"rename": {r"^encoder\.layer\.": "layers."}},
    {"rename": {r"\.attention\.attention\.query\.": ".attention.q_proj."}},
    {"rename": {r"\.attention\.attention\.key\.": ".attention.k_proj."}},
    {"rename": {r"\.attention\.attention\.value\.": ".attention.v_proj."}},
    {"rename": {r"\.attention\.output\.dense\.": ".attention.o_proj."}},
    {"rename": {r"\.intermediate\.dense\.": ".mlp.fc1."}},
    {"rename": {r"\.output\.dense\.": ".mlp.fc2."}},
]}  # fmt: skip


def reference(name: str, folder):
    """A seeded model of ``name``, saved with save_pretrained; its class, config, input, output, rules."""
    cls, config = CONFIGS[name]()
    torch.manual_seed(0)
    ref = cls(config).eval()
    ref.save_pretrained(folder)
    x = torch.randn(2, 3, 32, 32) if name == "vit" else torch.randint(0, 100, (2, 10))
    with torch.no_grad():
        want = ref(x).last_hidden_state
    return cls, config, x, want, VIT_RULES if name == "vit" else None


def output(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    assert not [k for k, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    with torch.no_grad():
        return model.eval()(x).last_hidden_state


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_built_under_empty_weights_loads_the_reference(tmp_path, name):
    cls, config, x, want, rules = reference(name, tmp_path)
    with remap.empty_weights():
        model = cls(config)
    assert all(p.is_meta for p in model.parameters())
    assert not any(b.is_meta for b in model.buffers())  # computed in __init__, as usual
    report = remap.load(model, tmp_path, rules)
    assert report.ok and report.target["meta"] is True
    assert torch.equal(output(model, x), want)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_built_on_meta_loads_the_reference_with_its_buffers_computed(tmp_path, name):
    cls, config, x, want, rules = reference(name, tmp_path)
    with torch.device("meta"):
        model = cls(config)
    remap.load(model, tmp_path, rules)
    assert torch.equal(output(model, x), want)


def test_meta_bert_buffers_are_named_in_the_report(tmp_path):
    cls, config, _, _, _ = reference("bert", tmp_path)
    with torch.device("meta"):
        model = cls(config)
    report = remap.load(model, tmp_path)
    assert report.warnings == ("2 tensor(s) not in the checkpoint were initialised on the meta-device target by BertModel._init_weights: "
                               "embeddings.position_ids (non-persistent buffer), embeddings.token_type_ids (non-persistent buffer)",)  # fmt: skip
    assert torch.equal(model.embeddings.position_ids, torch.arange(64).expand(1, -1))


class Masked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("mask", torch.tril(torch.ones(4, 4)), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x) @ self.mask


def test_a_meta_buffer_nothing_computes_is_refused_naming_it_and_the_fix():
    with torch.device("meta"):
        model = Masked()
    with pytest.raises(CheckError) as info:
        remap.load(model, {"fc.weight": torch.ones(4, 4), "fc.bias": torch.zeros(4)})
    assert info.value.report.failures[0].message == (
        "non-persistent buffer(s) mask of a meta-device target are not in any checkpoint and remap cannot compute them; "
        "build the target with `with remap.empty_weights(): model = ...` (parameters on meta, buffers computed by the module "
        "as usual) or on a real device"
    )
    assert model.fc.weight.is_meta  # untouched
    with remap.empty_weights():  # the fix the message shows
        model = Masked()
    remap.load(model, {"fc.weight": torch.ones(4, 4), "fc.bias": torch.zeros(4)})
    assert torch.equal(model.mask, torch.tril(torch.ones(4, 4)))


class WithHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)


def test_a_new_head_is_initialised_as_its_init_did(tmp_path):
    body = nn.Linear(8, 8)
    with remap.empty_weights():
        model = WithHead()
    torch.manual_seed(7)
    expected = nn.Linear(8, 3)  # its constructor runs reset_parameters
    torch.manual_seed(7)
    report = remap.load(model, {"body.weight": body.weight.detach(), "body.bias": body.bias.detach()},
                        {"version": 1, "expect": {"missing": [r"^head\."]}})
    assert [t.key for t in report.targets if t.status == "missing"] == ["head.weight", "head.bias"]
    assert not model.head.weight.is_meta and torch.isfinite(model.head.weight).all()
    assert torch.equal(model.head.weight, expected.weight) and torch.equal(model.head.bias, expected.bias)
    assert torch.equal(model.body.weight, body.weight)
    assert report.warnings == ()  # replayed init calls give what a real build gives: nothing to warn about


class CustomInit(WithHead):
    def __init__(self) -> None:
        super().__init__()
        nn.init.zeros_(self.head.weight)  # the author's choice for a new head, not reset_parameters'
        nn.init.constant_(self.head.bias, 0.5)


def test_a_new_head_keeps_the_init_its_author_wrote():
    body = nn.Linear(8, 8)
    with remap.empty_weights():
        model = CustomInit()
    remap.load(model, {"body.weight": body.weight.detach(), "body.bias": body.bias.detach()},
               {"version": 1, "expect": {"missing": [r"^head\."]}})
    assert torch.equal(model.head.weight, torch.zeros(3, 8)) and torch.equal(model.head.bias, torch.full((3,), 0.5))


def test_a_meta_module_without_recorded_inits_uses_reset_parameters():
    body = nn.Linear(8, 8)
    with torch.device("meta"):
        model = WithHead()
    torch.manual_seed(3)
    expected = nn.Linear(8, 3)
    torch.manual_seed(3)
    report = remap.load(model, {"body.weight": body.weight.detach(), "body.bias": body.bias.detach()},
                        {"version": 1, "expect": {"missing": [r"^head\."]}})
    assert torch.equal(model.head.weight, expected.weight) and torch.equal(model.head.bias, expected.bias)
    assert report.warnings == ("2 tensor(s) not in the checkpoint were initialised on the meta-device target by reset_parameters: "
                               "head.weight, head.bias",)  # fmt: skip


def test_a_new_hf_head_is_initialised_by_init_weights(tmp_path):
    cls, config, _, _, _ = reference("bert", tmp_path)
    with remap.empty_weights():
        model = transformers.BertForSequenceClassification(config)
    rules = {"version": 1, "rules": [{"add_prefix": "bert."}], "expect": {"missing": [r"^classifier\."]}}
    report = remap.load(model, tmp_path, rules)
    head = model.classifier
    assert not head.weight.is_meta and torch.isfinite(head.weight).all()
    assert torch.equal(head.bias, torch.zeros(2))  # BertPreTrainedModel._init_weights zeroes a Linear's bias
    assert 0.01 < head.weight.std().item() < 0.03  # and draws its weight with std initializer_range (0.02)
    assert "classifier.weight, classifier.bias" in report.warnings[0]
    assert "by __init__'s values and torch.nn.init calls (replayed), then BertForSequenceClassification._init_weights" in report.warnings[0]


def test_a_rules_target_is_built_under_empty_weights(tmp_path):
    from weights import Small, perturb

    src = perturb(Small(), seed=2)
    report = remap.load(None, {k: v.clone() for k, v in src.state_dict().items()}, {"version": 1, "target": {"model": "weights:Small"}})
    assert report.target["meta"] is True  # parameters were on meta: nothing was randomly initialised


def test_empty_weights_restores_torch_on_exit_and_error():
    register, normal = nn.Module.register_parameter, torch.nn.init.normal_
    with pytest.raises(ZeroDivisionError):
        with remap.empty_weights():
            assert nn.Module.register_parameter is not register
            1 / 0
    assert nn.Module.register_parameter is register and torch.nn.init.normal_ is normal
    assert not nn.Linear(2, 2).weight.is_meta


def test_timm_model_built_under_empty_weights_loads(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5).eval()
    with remap.empty_weights():
        model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=5)
    assert all(p.is_meta for p in model.parameters())
    remap.load(model, {k: v.clone() for k, v in ref.state_dict().items()})
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), ref(x))


class ReadsItsWeights(nn.Module):
    """``__init__`` reads a parameter's value: it cannot be built with its parameters on meta."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.scale = float(self.fc.weight.detach().abs().sum())


def test_a_rules_target_that_cannot_be_built_on_meta_is_built_for_real_with_a_warning():
    state = {k: v.clone() for k, v in nn.Linear(2, 2).state_dict().items()}
    rules = {"version": 1, "target": {"model": "tests.loading.test_empty_weights:ReadsItsWeights"}, "rules": [{"add_prefix": "fc."}]}
    report = remap.load(None, state, rules)
    assert report.target["meta"] is False
    assert report.warnings[-1].startswith("target.model could not be built with its parameters on meta (")
    assert report.warnings[-1].endswith("it was built on a real device and randomly initialised before loading")


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight


def test_tied_parameters_stay_one_tensor_after_loading_an_empty_weights_build():
    w = torch.randn(10, 4)
    with remap.empty_weights():
        model = Tied()
    remap.load(model, {"emb.weight": w, "head.weight": w.clone()})
    assert model.head.weight is model.emb.weight and torch.equal(model.emb.weight, w)


class FillsInPlace(WithHead):
    def __init__(self) -> None:
        super().__init__()
        with torch.no_grad():
            self.head.bias.fill_(0.5)  # not through torch.nn.init: remap cannot replay it


def test_an_init_remap_cannot_replay_is_said_in_the_report():
    body = nn.Linear(8, 8)
    with remap.empty_weights():
        model = FillsInPlace()
    report = remap.load(model, {"body.weight": body.weight.detach(), "body.bias": body.bias.detach()},
                        {"version": 1, "expect": {"missing": [r"^head\."]}})
    assert report.warnings == (
        "1 tensor(s) not in the checkpoint were initialised on the meta-device target by __init__'s values and torch.nn.init calls "
        "(replayed) (its __init__ also wrote it in place, not through torch.nn.init: that was not replayed): head.bias",)


class Scale(nn.Module):
    """A parameter of its own, initialised in ``__init__``, and no reset_parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.empty(4))
        nn.init.ones_(self.gamma)


class WithScale(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = Scale()


def test_a_missing_parameter_of_a_module_without_reset_parameters_gets_its_init_replayed():
    fc = nn.Linear(4, 4)
    with remap.empty_weights():
        model = WithScale()
    remap.load(model, {"fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()},
               {"version": 1, "expect": {"missing": [r"^scale\."]}})
    assert torch.equal(model.scale.gamma, torch.ones(4))
    with torch.device("meta"):  # built on meta, nothing was recorded: refused before loading
        model = WithScale()
    with pytest.raises(CheckError, match="scale.gamma of a meta-device target would stay uninitialised: Scale has no reset_parameters"):
        remap.load(model, {"fc.weight": fc.weight.detach(), "fc.bias": fc.bias.detach()},
                   {"version": 1, "expect": {"missing": [r"^scale\."]}})


def test_a_value_given_at_construction_survives_empty_weights_when_no_checkpoint_holds_it():
    """CLIP's ``logit_scale = nn.Parameter(torch.tensor(log(1 / 0.07)))`` is no torch.nn.init call:
    a parameter that small keeps the value it was registered with, and gets it back when the
    checkpoint does not provide it (as a real build would have it)."""

    class Scaled(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = torch.nn.Linear(3, 3)
            self.scale = torch.nn.Parameter(torch.tensor(2.6592))
            self.gain = torch.nn.Parameter(torch.full((3,), 0.5))

    real = Scaled()
    with remap.empty_weights():
        model = Scaled()
    assert model.scale.is_meta and model.gain.is_meta
    state = {k: v for k, v in real.state_dict().items() if k.startswith("fc.")}
    report = remap.load(model, state, rules={"version": 1, "expect": {"missing": [r"^(scale|gain)$"]}})
    assert report.ok and not report.warnings
    assert torch.equal(model.scale, real.scale) and torch.equal(model.gain, real.gain)
    assert torch.equal(model.fc.weight, real.fc.weight)
