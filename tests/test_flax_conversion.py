"""configs/flax-to-torch.yaml end to end: a flax.linen model initialised by Flax itself and saved
with ``flax.serialization.to_bytes``, loaded into its PyTorch port by ``remap apply`` (the
command line) through the shipped flax-layout fragment, and the two models' outputs compared
on the same input."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import remap
from remap.cli import main

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "flax-to-torch.yaml"
FRAGMENT = ROOT / "src" / "remap" / "rules" / "fragments" / "flax-layout.yaml"


def _flax() -> tuple[Any, Any, Any]:
    """jax, jax.numpy and flax.linen, on the CPU (imported only by the tests that use them)."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jax = pytest.importorskip("jax")
    linen = pytest.importorskip("flax.linen")
    return jax, jax.numpy, linen


def flax_net() -> Any:
    """The Flax model of the config's comment (module names as linen gives them)."""
    _, jnp, fnn = _flax()

    class Net(fnn.Module):
        @fnn.compact
        def __call__(self, x, ids):  # x: NHWC images, ids: int tokens
            x = fnn.relu(fnn.BatchNorm(use_running_average=True)(fnn.Conv(8, (3, 3))(x)))
            x = fnn.relu(fnn.BatchNorm(use_running_average=True)(fnn.Conv(16, (3, 3), padding="VALID")(x)))
            x = jnp.mean(x, axis=(1, 2)) + jnp.mean(fnn.Embed(10, 16)(ids), axis=1)
            return fnn.Dense(5)(fnn.LayerNorm()(x))

    return Net()


def flax_variables(seed: int = 0) -> dict[str, Any]:
    """``init`` with a fixed PRNG key, then every leaf moved off its initial value (Flax
    initialises biases to 0, scales and variances to 1, means to 0: a load that mixed them up
    would still agree), with a fixed numpy seed; variances stay positive."""
    jax, jnp, _ = _flax()
    variables = flax_net().init(jax.random.PRNGKey(seed), jnp.ones((1, 7, 6, 3)), jnp.zeros((1, 4), jnp.int32))
    rng = np.random.default_rng(seed)

    def move(path: tuple[Any, ...], leaf: Any) -> Any:
        noise = rng.normal(0, 0.3, leaf.shape).astype(np.float32)
        if getattr(path[-1], "key", None) == "var":
            return jnp.asarray(rng.uniform(0.5, 2.0, leaf.shape).astype(np.float32))
        return leaf + noise

    return jax.tree_util.tree_map_with_path(move, variables)


def save_flax(folder: Path, variables: dict[str, Any]) -> Path:
    """The variables saved as a Flax user saves them."""
    from flax import serialization

    path = folder / "model.msgpack"
    path.write_bytes(serialization.to_bytes(variables))
    return path


def tensor(array: Any) -> torch.Tensor:
    """A torch copy of an array flax restored (those are read-only views of the file's bytes)."""
    return torch.from_numpy(np.array(array))


class TorchNet(nn.Module):
    """The PyTorch port the config's comment describes (NCHW input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8, momentum=0.01)
        self.conv2 = nn.Conv2d(8, 16, 3)
        self.bn2 = nn.BatchNorm2d(16, momentum=0.01)
        self.embed = nn.Embedding(10, 16)
        self.norm = nn.LayerNorm(16, eps=1e-6)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = x.mean(dim=(2, 3)) + self.embed(ids).mean(dim=1)
        return self.fc(self.norm(x))


def test_flax_model_loads_into_its_torch_port_with_remap_apply(tmp_path: Path) -> None:
    from flax import serialization

    path = save_flax(tmp_path, flax_variables())
    reloaded = serialization.msgpack_restore(path.read_bytes())  # the file, not the objects in memory, is the reference
    saved, report_path = tmp_path / "net.safetensors", tmp_path / "report.json"
    code = main(["apply", str(CONFIG), "--source", str(path), "--target", "test_flax_conversion:TorchNet",
                 "--save", str(saved), "--report", str(report_path), "-q"])  # fmt: skip
    assert code == 0
    report = json.loads(report_path.read_text())
    totals = report["totals"]  # 2 convs, Dense, LayerNorm: 2 each; 2 BatchNorms: 4 each; Embed: 1
    assert report["ok"] and totals["loaded"] == totals["source_keys"] == 17 and totals["target_keys"] == 19
    assert sorted(k for k, t in report["targets"].items() if t["status"] == "missing") == [
        "bn1.num_batches_tracked", "bn2.num_batches_tracked"]  # fmt: skip

    net = TorchNet()
    net.load_state_dict(load_file(saved), strict=False)  # the two counters are not in the file
    rng = np.random.default_rng(1)
    x = rng.normal(size=(4, 7, 6, 3)).astype(np.float32)  # NHWC, as Flax takes images
    ids = rng.integers(0, 10, size=(4, 5)).astype(np.int32)
    expected = np.asarray(flax_net().apply(reloaded, x, ids))
    got = net.eval()(torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(ids).long()).detach().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.abs(expected).max() > 0.1  # a real signal, not zeros compared with zeros

    # each tensor is Flax's own value in PyTorch's layout
    params, stats = reloaded["params"], reloaded["batch_stats"]
    assert torch.equal(net.conv2.weight, tensor(params["Conv_1"]["kernel"]).permute(3, 2, 0, 1))
    assert torch.equal(net.fc.weight, tensor(params["Dense_0"]["kernel"]).T)
    assert torch.equal(net.embed.weight, tensor(params["Embed_0"]["embedding"]))
    assert torch.equal(net.norm.weight, tensor(params["LayerNorm_0"]["scale"]))
    for got_t, want in ((net.bn2.weight, params["BatchNorm_1"]["scale"]), (net.bn2.bias, params["BatchNorm_1"]["bias"]),
                        (net.bn2.running_mean, stats["BatchNorm_1"]["mean"]), (net.bn2.running_var, stats["BatchNorm_1"]["var"])):  # fmt: skip
        assert torch.equal(got_t, tensor(want))


def test_report_names_the_fragment_steps(tmp_path: Path) -> None:
    path = save_flax(tmp_path, flax_variables())
    plan = remap.plan(TorchNet(), path, CONFIG)
    assert [s.origin for s in remap.rules.load_rules(CONFIG).steps] == ["flax-layout"] * 4 + [None]
    steps = {s.index: (s.summary, s.matched) for s in plan.report.steps}
    assert steps[1] == ("transpose(-2, -1) on rank-2 keys matching '\\.kernel$'", 1)  # Dense_0
    assert steps[2] == ("transpose(3, 2, 0, 1) on rank-4 keys matching '\\.kernel$'", 2)  # Conv_0, Conv_1
    explained = plan.explain("bn1.running_var")
    assert "batch_stats.BatchNorm_0.var" in explained and "running_var" in explained


def test_flax_layout_alone_with_source_key_params(tmp_path: Path) -> None:
    """``source.key: params`` reads the params collection without its prefix; the fragment
    still applies (its collection steps are optional), and the statistics are simply absent."""
    path = save_flax(tmp_path, flax_variables(2))
    net = nn.ModuleDict({"Dense_0": nn.Linear(16, 5), "LayerNorm_0": nn.LayerNorm(16), "Embed_0": nn.Embedding(10, 16)})
    rules = {"version": 1, "include": ["flax-layout"], "source": {"key": "params"},
             "expect": {"unused": ["^(Conv|BatchNorm)_"]}}  # fmt: skip
    report = remap.load(net, path, rules=rules)
    assert report.ok and report.totals.loaded == report.totals.target_keys == 5
    from flax import serialization

    params = serialization.msgpack_restore(path.read_bytes())["params"]
    assert torch.equal(net["Dense_0"].weight, tensor(params["Dense_0"]["kernel"]).T)
    assert torch.equal(net["Embed_0"].weight, tensor(params["Embed_0"]["embedding"]))


def test_every_line_of_flax_layout_says_why() -> None:
    code = [line for line in FRAGMENT.read_text().splitlines() if line.strip() and not line.lstrip().startswith("#")]
    assert code and all(" # " in line for line in code), [line for line in code if " # " not in line]
