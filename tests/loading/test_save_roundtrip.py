"""What ``--save`` writes loads back into the plain architecture.

``batchnorm: frozen`` replaces BatchNorm2d by FrozenBatchNorm2d, which keeps no
``num_batches_tracked``; the save writes each replaced BatchNorm's counter back, as it was
loaded, so a fine-tuned ResNet saved by remap loads into a plain ``resnet18`` with bare
rules. A save name remap cannot write is a usage error before anything is loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from safetensors.torch import load_file
from torchvision.ops.misc import FrozenBatchNorm2d
from weights import perturb

import remap
from remap.cli import main
from remap.errors import TargetError, UsageError
from remap.loading.freeze import plain_state_dict

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "torchvision-resnet-finetune.yaml"


def pretrained_resnet18(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """An ImageNet-shaped resnet18 checkpoint with random weights and a distinct counter per BatchNorm."""
    model = perturb(torchvision.models.resnet18(), seed=3)
    state = model.state_dict()
    counters = [k for k in state if k.endswith("num_batches_tracked")]
    for n, key in enumerate(counters):
        state[key].fill_(500 + n)
    path = tmp_path / "resnet18.pth"
    torch.save(state, path)
    return path, {k: v.clone() for k, v in state.items()}


def saved_state(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    if path.name.endswith(".index.json"):
        with remap.sources.readers.open_source(path) as src:
            return {k: src.read(k).clone() for k in src.meta}
    return torch.load(path, weights_only=True)


@pytest.mark.parametrize(("name", "shard"), [("ft.safetensors", None), ("ft.pt", None), ("ft.safetensors", "4MB")],
                         ids=["safetensors", "torch", "sharded"])  # fmt: skip
def test_a_frozen_batchnorm_save_loads_into_the_plain_resnet(tmp_path, capsys, name, shard):
    ckpt, source = pretrained_resnet18(tmp_path)
    out = tmp_path / name
    argv = ["apply", str(CONFIG), "--source", str(ckpt), "--target", "torchvision.models:resnet18", "--save", str(out), "-q"]
    assert main(argv + (["--max-shard-size", shard] if shard else [])) == 0, capsys.readouterr().err
    written = out.parent / f"{out.name}.index.json" if shard else out
    assert written.is_file()

    plain = torchvision.models.resnet18(num_classes=10)
    saved_keys, plain_keys = list(saved_state(written)), list(plain.state_dict())
    assert sorted(saved_keys) == sorted(plain_keys)  # the plain architecture's keys
    if name.endswith(".pt"):
        assert saved_keys == plain_keys  # in its order (safetensors sorts its header)
    report = remap.load(plain, written, rules=None)  # bare rules: every key must match
    assert report.ok and report.totals.loaded == len(plain.state_dict()) and report.totals.missing == 0
    state = plain.state_dict()
    for key, value in source.items():
        if not key.startswith("fc."):
            assert torch.equal(state[key], value), key  # counters included: 500, 501, ...
    assert state["layer4.1.bn2.num_batches_tracked"] == source["layer4.1.bn2.num_batches_tracked"] != 0


def test_the_python_api_keeps_the_frozen_model_and_saves_the_plain_keys(tmp_path):
    ckpt, source = pretrained_resnet18(tmp_path)
    rules = yaml.safe_load(CONFIG.read_text())
    rules.pop("target")
    model = torchvision.models.resnet18(num_classes=10)
    remap.load(model, ckpt, rules=rules, save=tmp_path / "ft.safetensors")
    assert isinstance(model.layer1[0].bn1, FrozenBatchNorm2d)
    assert not any(k.endswith("num_batches_tracked") for k in model.state_dict())  # the module itself is unchanged
    saved = load_file(str(tmp_path / "ft.safetensors"))
    assert torch.equal(saved["layer1.0.bn1.num_batches_tracked"], source["layer1.0.bn1.num_batches_tracked"])
    assert saved.keys() == plain_state_dict(model).keys()
    frozen = torchvision.models.resnet18(num_classes=10)
    remap.load(frozen, ckpt, rules=rules)
    frozen.load_state_dict(saved, strict=True)  # FrozenBatchNorm2d ignores the counter: the file loads there too
    assert all(torch.equal(frozen.state_dict()[k], v) for k, v in model.state_dict().items())


def test_a_frozen_batchnorm_keeps_the_target_dtype(tmp_path):
    """With target.dtype float16 the FrozenBatchNorm2d is float16 too, as the BatchNorm it replaced was."""
    ckpt, source = pretrained_resnet18(tmp_path)
    rules = yaml.safe_load(CONFIG.read_text())
    rules["target"] = {"model": "torchvision.models:resnet18", "kwargs": {"num_classes": 10}, "dtype": "float16"}
    remap.load(None, ckpt, rules=rules, save=tmp_path / "ft.safetensors")
    saved = load_file(str(tmp_path / "ft.safetensors"))
    assert saved["bn1.weight"].dtype == saved["conv1.weight"].dtype == torch.float16
    assert torch.equal(saved["bn1.running_var"], source["bn1.running_var"].half())


@pytest.mark.parametrize("name", ["out.npz", "out", "model.safetensors.index.json"])
def test_an_unknown_save_suffix_fails_before_anything_is_loaded(tmp_path, name):
    missing_source = tmp_path / "not-there.pth"  # the suffix is checked first: no SourceError
    with pytest.raises(UsageError) as info:
        remap.load(torch.nn.Linear(2, 2), missing_source, save=tmp_path / name)
    found = f"unknown format {Path(name).suffix!r}" if Path(name).suffix else "the name has no suffix"
    assert str(info.value) == (
        f"save (--save): cannot save {str(tmp_path / name)!r}: {found}; "
        "expected a file name ending in .safetensors, .pt, .pth, .bin or .ckpt, or a folder name ending in .dcp (torch.distributed.checkpoint)"
    )
    assert info.value.exit_code == 2 and list(tmp_path.iterdir()) == []


def test_an_unknown_save_suffix_on_the_command_line_and_in_the_rules(tmp_path, capsys):
    ckpt, _ = pretrained_resnet18(tmp_path)
    argv = ["apply", str(CONFIG), "--source", str(ckpt), "--target", "torchvision.models:resnet18"]
    assert main([*argv, "--save", str(tmp_path / "out.npz")]) == 2
    assert capsys.readouterr().err == (
        f"remap: error: save (--save): cannot save '{tmp_path / 'out.npz'}': unknown format '.npz'; "
        "expected a file name ending in .safetensors, .pt, .pth, .bin or .ckpt, or a folder name ending in .dcp (torch.distributed.checkpoint)\n"
    )
    rules = yaml.safe_load(CONFIG.read_text())
    rules["output"] = {"save": "ft.npz"}
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
    assert main(["apply", str(tmp_path / "rules.yaml"), "--source", str(ckpt), "--target", "torchvision.models:resnet18"]) == 2
    assert capsys.readouterr().err == (
        f"remap: error: output.save: cannot save '{tmp_path / 'ft.npz'}': unknown format '.npz'; "
        "expected a file name ending in .safetensors, .pt, .pth, .bin or .ckpt, or a folder name ending in .dcp (torch.distributed.checkpoint)\n"
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["resnet18.pth", "rules.yaml"]


def test_save_suffixes_are_case_blind_and_write_their_format(tmp_path):
    model = torch.nn.Linear(2, 2)
    report = remap.load(torch.nn.Linear(2, 2), model.state_dict(), save=tmp_path / "m.PT", report=tmp_path / "r.json")
    assert report.target["saved"] == {"path": str(tmp_path / "m.PT"), "format": "torch"}
    assert torch.equal(torch.load(tmp_path / "m.PT", weights_only=True)["weight"], model.weight)
    assert json.loads((tmp_path / "r.json").read_text())["target"]["saved"]["format"] == "torch"


def dict_factory():
    return {"w": torch.zeros(2)}


def test_a_factory_that_returns_no_module_names_the_field_and_flag(tmp_path, capsys):
    (tmp_path / "rules.yaml").write_text("version: 1\n")
    code = main(["apply", str(tmp_path / "rules.yaml"), "--source", str(tmp_path / "x.pth"), "--target", "tests.loading.test_save_roundtrip:dict_factory"])
    assert code == 3
    assert capsys.readouterr().err == (
        "remap: error: target.model (--target): tests.loading.test_save_roundtrip:dict_factory() returned a dict, expected a torch.nn.Module\n"
    )
    with pytest.raises(TargetError):
        remap.plan(None, {"w": [2]}, {"version": 1, "target": {"model": "tests.loading.test_save_roundtrip:dict_factory"}})


def test_load_into_a_mapping_says_what_to_use_instead():
    with pytest.raises(UsageError) as info:
        remap.load({"w": [2]}, {"w": torch.zeros(2)})
    assert str(info.value) == "remap.load needs a torch.nn.Module to load into, found a dict; remap.plan takes a mapping of key -> shape"


class WithExtraState(torch.nn.Module):
    """A module whose state_dict holds a non-tensor ``_extra_state``, as some libraries' layers do."""

    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(2, 2)

    def get_extra_state(self) -> dict:
        return {"version": 3}

    def set_extra_state(self, state: dict) -> None:
        self.loaded_extra = state


def test_extra_state_refuses_safetensors_before_loading_and_goes_into_a_pt_file(tmp_path):
    source = WithExtraState()
    state = {k: v for k, v in source.state_dict().items() if isinstance(v, torch.Tensor)}
    target = WithExtraState()
    before = {k: v.clone() for k, v in target.linear.state_dict().items()}
    with pytest.raises(UsageError) as info:
        remap.load(target, state, save=tmp_path / "m.safetensors")
    assert str(info.value) == (
        f"save (--save): cannot save '{tmp_path / 'm.safetensors'}': safetensors holds tensors only, and the state_dict has "
        "1 entry that is not: _extra_state (dict); save to a single .pt file instead (torch.save keeps them)"
    )
    assert all(torch.equal(target.linear.state_dict()[k], v) for k, v in before.items())  # refused before loading
    remap.load(target, state, save=tmp_path / "m.pt")
    saved = torch.load(tmp_path / "m.pt", weights_only=True)
    assert saved["_extra_state"] == {"version": 3} and torch.equal(saved["linear.weight"], source.linear.weight)
    again = WithExtraState()
    again.load_state_dict(saved)  # strictly, extra state included
    assert again.loaded_extra == {"version": 3} and torch.equal(again.linear.bias, source.linear.bias)
