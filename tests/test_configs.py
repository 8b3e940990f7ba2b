"""Every rules file in configs/ run end to end, the way the README tells users to run it."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch
import torchvision

import remap
from remap.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def make_checkpoint(*argv: str) -> None:
    """Run examples/make_checkpoint.py, the README quickstart's first step."""
    spec = importlib.util.spec_from_file_location("make_checkpoint", ROOT / "examples" / "make_checkpoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(list(argv)) == 0


def cli_report(tmp_path: Path, *argv: str) -> dict:
    report = tmp_path / "report.json"
    code = main([*map(str, argv), "--report", str(report), "-q"])
    assert code == 0
    return json.loads(report.read_text())


def source_state(path: Path, prefix: str = "", key: str | None = None) -> dict[str, torch.Tensor]:
    obj = torch.load(path, weights_only=True)
    obj = obj[key] if key else obj
    return {k.removeprefix(prefix): v for k, v in obj.items()}


def assert_loaded(model: torch.nn.Module, expected: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    state = model.state_dict()
    compared = 0
    for key, value in expected.items():
        if key.startswith(skip) or (key.endswith("num_batches_tracked") and key not in state):
            continue  # FrozenBatchNorm2d keeps no num_batches_tracked
        assert torch.equal(state[key], value), key
        compared += 1
    assert compared >= len(expected) * 0.6


def test_every_config_has_a_scenario():
    from test_conversions import TESTED as CONVERSIONS  # the cross-library conversions, each run end to end there
    tested = {"torchvision-resnet-finetune.yaml", "unwrap-ddp-compile.yaml", "lightning-to-module.yaml"} | CONVERSIONS
    tested |= {"keras-to-torch.yaml"}  # a Keras-built model against its torch port: tests/test_keras_conversion.py
    tested |= {"onnx-to-module.yaml", "gguf-to-hf-llama.yaml"}  # tests/test_onnx_gguf_conversions.py
    tested |= {"flax-to-torch.yaml"}  # a Flax-built model against its torch port: tests/test_flax_conversion.py
    tested |= {"tf-checkpoint-to-torch.yaml"}  # a TensorFlow-written checkpoint against its torch port: tests/test_tf_conversion.py
    tested |= {"pickled-model-renamed-class.yaml"}  # a whole-model pickle of a removed class: tests/test_pickled_model_conversion.py
    tested |= {"meta-llama-to-hf.yaml"}  # a Meta-style Llama against HF LlamaForCausalLM by logits: tests/rules/test_vars_and_heads.py
    tested |= {"merge-lora.yaml"}  # a PEFT adapter merged into its base, against merge_and_unload: tests/test_peft_conversion.py
    tested |= {"clip-two-towers.yaml"}  # two towers saved apart into one CLIPModel, by outputs: tests/test_several_sources_cli.py
    assert {p.name for p in CONFIGS.glob("*.yaml")} == tested


def test_resnet_finetune(tmp_path):
    ckpt = tmp_path / "checkpoints" / "resnet50.pth"
    make_checkpoint("torchvision.models:resnet50", str(ckpt))
    config = CONFIGS / "torchvision-resnet-finetune.yaml"
    report = cli_report(tmp_path, "apply", config, "--source", ckpt)
    missing = [k for k, t in report["targets"].items() if t["status"] == "missing"]
    assert missing == ["fc.weight", "fc.bias"]
    assert all(report["targets"][k]["declared"] for k in missing)
    assert report["totals"]["trainable_params"] == 2 and report["totals"]["trainable_elements"] == 2048 * 10 + 10
    assert report["totals"]["frozen_params"] == 159
    assert len(report["freeze"]["batchnorm_modules"]) == 53
    assert [s["fate"] for k, s in report["sources"].items() if k.startswith("fc.")] == ["dropped", "dropped"]

    model = torchvision.models.resnet50(num_classes=10)
    remap.load(model, ckpt, rules=config)
    assert_loaded(model, source_state(ckpt), skip=("fc.",))
    assert isinstance(model.bn1, torchvision.ops.misc.FrozenBatchNorm2d)
    assert torch.equal(model.bn1.running_var, source_state(ckpt)["bn1.running_var"])
    assert [n for n, p in model.named_parameters() if p.requires_grad] == ["fc.weight", "fc.bias"]
    model.train()
    before = model.layer1[0].bn1.running_mean.clone()
    model(torch.randn(2, 3, 64, 64))
    assert torch.equal(model.layer1[0].bn1.running_mean, before)


@pytest.mark.parametrize("wrap", ["none", "ddp", "compile", "ddp+compile"])
def test_unwrap_ddp_compile(tmp_path, wrap):
    ckpt = tmp_path / "ckpt.pth"
    make_checkpoint("torchvision.models:resnet18", str(ckpt), "--wrap", wrap)
    config = CONFIGS / "unwrap-ddp-compile.yaml"
    report = cli_report(tmp_path, "apply", config, "--source", ckpt, "--target", "torchvision.models:resnet18")
    assert report["ok"] and report["totals"]["loaded"] == report["totals"]["target_keys"] == 122
    model = torchvision.models.resnet18()
    remap.load(model, ckpt, rules=config)
    prefix = {"none": "", "ddp": "module.", "compile": "_orig_mod.", "ddp+compile": "module._orig_mod."}[wrap]
    assert_loaded(model, source_state(ckpt, prefix))


def test_lightning_to_module(tmp_path):
    ckpt = tmp_path / "last.ckpt"
    make_checkpoint("torchvision.models:resnet18", str(ckpt), "--wrap", "lightning")
    config = CONFIGS / "lightning-to-module.yaml"
    report = cli_report(tmp_path, "apply", config, "--source", ckpt, "--target", "torchvision.models:resnet18")
    assert report["ok"] and report["totals"]["loaded"] == 122
    assert report["source"]["key"] == "state_dict"
    model = torchvision.models.resnet18()
    remap.load(model, ckpt, rules=config)
    assert_loaded(model, source_state(ckpt, "model.", key="state_dict"))


def test_every_config_validates(capsys):
    for config in CONFIGS.glob("*.yaml"):
        assert main(["validate", str(config)]) == 0, capsys.readouterr()
