"""configs/pickled-model-renamed-class.yaml end to end: a whole-model pickle (``torch.save(model)``)
of a class ``OldNet`` that no longer exists when the file is read (its module is written to a
temporary folder, imported, saved from, then removed), loaded into ``NewNet`` with renamed
submodules; outputs compared with the old model's, computed before saving, and the saved
requires_grad flags recovered by ``freeze: {from_source: true}``."""

from __future__ import annotations

import importlib
import json
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from weights import perturb

import remap
from remap.cli import main
from remap.errors import CheckError

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "pickled-model-renamed-class.yaml"

OLD_MODULE = '''
import torch
from torch import nn


class OldNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.encoder = nn.Linear(8, 16)
        self.classifier = nn.Linear(16, 5)

    def forward(self, x):
        x = self.features(x).mean((2, 3))
        return self.classifier(torch.relu(self.encoder(x)))


class Trainer:
    """A training loop's object holding the model, as Lightning and HF Trainer objects do."""

    def __init__(self, model):
        self.model = model
        self.model_wrapped = model
        self.epoch = 3
'''


class NewNet(nn.Module):
    """The renamed class: ``stem``, ``proj``, ``head`` where OldNet had ``features``, ``encoder``, ``classifier``."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.proj = nn.Linear(8, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).mean((2, 3))
        return self.head(torch.relu(self.proj(x)))


@dataclass
class Saved:
    path: Path
    module: str  # the name of the module OldNet lived in (gone now)
    x: torch.Tensor
    expected: torch.Tensor  # OldNet's output on x, computed before saving
    state: dict[str, torch.Tensor]  # OldNet's state_dict, as saved


def save_old_model(tmp_path: Path, wrap: str = "module") -> Saved:
    """Write OldNet's module, import it, train-freeze its stem, save, then remove every trace of it.

    ``wrap``: ``module`` (``torch.save(model)``), ``dict`` (``{"model": model, "epoch": 3}``)
    or ``trainer`` (a Trainer object whose ``.model`` is the model).
    """
    name = f"oldmodels_{uuid.uuid4().hex[:8]}"
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / f"{name}.py").write_text(OLD_MODULE)
    sys.path.insert(0, str(folder))
    try:
        old = importlib.import_module(name)
        model = perturb(old.OldNet(), seed=4)
        model.features.requires_grad_(False)  # frozen while it was trained
        model.eval()
        x = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            expected = model(x)
        obj = {"model": model, "epoch": 3} if wrap == "dict" else old.Trainer(model) if wrap == "trainer" else model
        path = tmp_path / "old_model.pt"
        torch.save(obj, path)
        state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop(name, None)
        (folder / f"{name}.py").unlink()
    with pytest.raises(ModuleNotFoundError, match=name):  # the class is gone: torch.load cannot rebuild it
        torch.load(path, weights_only=False)
    return Saved(path, name, x, expected, state)


def test_the_config_loads_a_pickle_of_a_class_that_no_longer_exists(tmp_path: Path) -> None:
    old = save_old_model(tmp_path)
    saved, report_path = tmp_path / "new.safetensors", tmp_path / "report.json"
    code = main(["apply", str(CONFIG), "--source", str(old.path), "--target", "test_pickled_model_conversion:NewNet",
                 "--save", str(saved), "--report", str(report_path), "-q"])  # fmt: skip
    assert code == 0
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["totals"]["loaded"] == report["totals"]["target_keys"] == 11
    assert report["source"]["format"] == "torch-module"
    assert report["source"]["notes"][0] == (
        f"whole-model pickle read without running it: saved classes: {old.module}.OldNet, "
        "torch.nn.modules.container.Sequential, torch.nn.modules.conv.Conv2d, torch.nn.modules.batchnorm.BatchNorm2d, "
        "torch.nn.modules.activation.ReLU, torch.nn.modules.linear.Linear"
    )
    trainable = {k: t["trainable"] for k, t in report["targets"].items() if t["kind"] == "parameter"}
    assert trainable == {"stem.0.weight": False, "stem.0.bias": False, "stem.1.weight": False, "stem.1.bias": False,
                         "proj.weight": True, "proj.bias": True, "head.weight": True, "head.bias": True}  # fmt: skip

    net = NewNet()
    net.load_state_dict(load_file(saved))
    with torch.no_grad():
        got = net.eval()(old.x)
    torch.testing.assert_close(got, old.expected, rtol=0, atol=1e-6)
    assert old.expected.abs().max() > 0.1  # a real signal
    assert torch.equal(net.stem[1].running_var, old.state["features.1.running_var"])
    assert torch.equal(net.head.weight, old.state["classifier.weight"])


@pytest.mark.parametrize("wrap", ["module", "dict", "trainer"])
def test_the_python_api_recovers_the_frozen_flags(tmp_path: Path, wrap: str) -> None:
    old = save_old_model(tmp_path, wrap)
    net = NewNet()
    for p in net.parameters():
        assert p.requires_grad
    report = remap.load(net, old.path, CONFIG)
    assert report.ok
    assert report.source["key"] == (None if wrap == "module" else "model")
    assert {k: p.requires_grad for k, p in net.named_parameters()} == {
        "stem.0.weight": False, "stem.0.bias": False, "stem.1.weight": False, "stem.1.bias": False,
        "proj.weight": True, "proj.bias": True, "head.weight": True, "head.bias": True,
    }  # fmt: skip
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(old.x), old.expected, rtol=0, atol=1e-6)
    if wrap != "module":  # what is not the model is described, not run
        assert report.source["entries"]["epoch"] == "3"


def test_inspect_names_the_saved_classes_and_each_keys_owner(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    old = save_old_model(tmp_path)
    assert main(["inspect", str(old.path)]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    assert f"saved classes: {old.module}.OldNet, torch.nn.modules.container.Sequential" in out
    assert "features.0.weight: parameter of torch.nn.modules.conv.Conv2d, requires_grad=False" in out
    assert "features.1.running_mean: buffer of torch.nn.modules.batchnorm.BatchNorm2d" in out
    assert "classifier.weight: parameter of torch.nn.modules.linear.Linear\n" in out


def test_from_source_on_a_state_dict_says_it_cannot_apply(tmp_path: Path) -> None:
    old = save_old_model(tmp_path)
    path = tmp_path / "state.pt"
    torch.save(old.state, path)
    with pytest.raises(CheckError) as info:
        remap.load(NewNet(), path, CONFIG)
    assert ("freeze.from_source needs a source that saved requires_grad (a whole-model pickle or a TorchScript "
            f"archive); {path} is torch-zip") in str(info.value)  # fmt: skip
