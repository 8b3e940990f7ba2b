"""configs/keras-to-torch.yaml end to end: a model built and saved by Keras 3 itself (torch
backend, no TensorFlow), loaded into its PyTorch port through the shipped keras-layout
fragment, and the two models' outputs compared on the same images."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import remap

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "keras-to-torch.yaml"
KERAS_NAMES = ["conv2d", "batch_normalization", "re_lu", "conv2d_1", "batch_normalization_1", "re_lu_1",
               "global_average_pooling2d", "dense"]  # fmt: skip


def _keras():
    os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported: no TensorFlow needed
    pytest.importorskip("h5py")
    return pytest.importorskip("keras")


def keras_model(seed: int = 0):
    """The model of the config's comment, as Keras names it in a fresh session, with random
    weights and BatchNorm statistics far from their initial 0 and 1."""
    keras = _keras()
    keras.backend.clear_session()  # layer names count from zero again, as in a fresh process
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input((9, 7, 3)),
        layers.Conv2D(16, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
        layers.Conv2D(32, 3, padding="valid"), layers.BatchNormalization(), layers.ReLU(),
        layers.GlobalAveragePooling2D(), layers.Dense(10),
    ])  # fmt: skip
    assert [layer.name for layer in model.layers] == KERAS_NAMES
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.gamma.assign(rng.uniform(0.5, 1.5, n).astype("float32"))
            layer.beta.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_mean.assign(rng.normal(0, 0.5, n).astype("float32"))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, n).astype("float32"))
        elif layer.weights:  # conv and dense: kernels and biases, biases non-zero
            layer.set_weights([rng.normal(0, 0.3, w.shape).astype("float32") for w in layer.get_weights()])
    return model


def save_keras_model(folder: Path) -> str:
    """The model saved as a user saves it: ``model.save("model.keras")``."""
    path = folder / "model.keras"
    keras_model().save(path)
    return str(path)


class TorchNet(nn.Module):
    """The PyTorch port the config's comment describes (NCHW input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16, eps=1e-3, momentum=0.01)
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.bn2 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def test_keras_model_loads_into_its_torch_port(tmp_path: Path) -> None:
    path = tmp_path / "model.keras"
    model = keras_model()
    model.save(path)
    reloaded = _keras().models.load_model(path)  # the file, not the object in memory, is the reference

    net = TorchNet()
    report = remap.load(net, path, rules=CONFIG)
    t = report.totals  # conv and dense: kernel and bias; BatchNorm: 4 each; the torch side adds 2 counters
    assert report.ok and t.loaded == t.used == t.source_keys == 14 and t.target_keys == 16
    assert [r.key for r in report.targets if r.status == "missing"] == ["bn1.num_batches_tracked", "bn2.num_batches_tracked"]
    assert [s.origin for s in remap.rules.load_rules(CONFIG).steps] == ["keras-layout"] * 3 + [None]

    x = np.random.default_rng(1).normal(size=(4, 9, 7, 3)).astype("float32")  # NHWC, as Keras takes images
    expected = _keras().ops.convert_to_numpy(reloaded(x, training=False))
    got = net.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).detach().numpy()  # NCHW, as PyTorch takes them
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    assert np.abs(expected).max() > 0.1  # a real signal, not zeros compared with zeros

    # each tensor is Keras's own value in PyTorch's layout
    conv, bn, dense = reloaded.layers[3], reloaded.layers[4], reloaded.layers[7]
    kernel, _ = conv.get_weights()
    assert torch.equal(net.conv2.weight, torch.from_numpy(kernel).permute(3, 2, 0, 1))
    assert torch.equal(net.fc.weight, torch.from_numpy(dense.get_weights()[0]).T)
    gamma, beta, mean, var = bn.get_weights()
    for got_t, want in ((net.bn2.weight, gamma), (net.bn2.bias, beta), (net.bn2.running_mean, mean), (net.bn2.running_var, var)):
        assert torch.equal(got_t, torch.from_numpy(want))


def test_report_names_the_fragment_steps(tmp_path: Path) -> None:
    path = save_keras_model(tmp_path)
    plan = remap.plan(TorchNet(), path, CONFIG)
    explained = plan.explain("fc.weight")
    assert "step 1 (transpose(-2, -1) on rank-2 keys matching '\\.kernel$')" in explained
    steps = {s.index: (s.summary, s.matched, s.where) for s in plan.report.steps}
    assert steps[1][:2] == ("transpose(-2, -1) on rank-2 keys matching '\\.kernel$'", 1)
    assert steps[2][:2] == ("transpose(3, 2, 0, 1) on rank-4 keys matching '\\.kernel$'", 2)
    assert steps[1][2].endswith("fragments/keras-layout.yaml:21:5")
    assert steps[4][2] == f"{CONFIG}:26:5"


def test_keras_layout_embedding_and_layer_norm(tmp_path: Path) -> None:
    """The fragment's other lines, against Keras itself: Embedding, LayerNormalization, Dense
    (a 3-d input: Dense acts on the last dim, as nn.Linear does)."""
    keras = _keras()
    keras.backend.clear_session()
    keras.utils.set_random_seed(3)
    model = keras.Sequential([keras.Input((5,), dtype="int32"), keras.layers.Embedding(11, 6),
                              keras.layers.LayerNormalization(), keras.layers.Dense(4)])  # fmt: skip
    rng = np.random.default_rng(3)
    for layer in model.layers:
        layer.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") + (1 if w.ndim == 1 else 0) for w in layer.get_weights()])
    model.save(tmp_path / "m.keras")

    net = nn.ModuleDict({"embedding": nn.Embedding(11, 6), "layer_normalization": nn.LayerNorm(6, eps=1e-3), "dense": nn.Linear(6, 4)})
    report = remap.load(net, tmp_path / "m.keras", rules={"version": 1, "include": ["keras-layout"]})
    assert report.ok and report.totals.loaded == report.totals.target_keys == 5

    ids = rng.integers(0, 11, size=(3, 5))
    expected = keras.ops.convert_to_numpy(model(ids, training=False))
    got = net["dense"](net["layer_normalization"](net["embedding"](torch.from_numpy(ids)))).detach().numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
