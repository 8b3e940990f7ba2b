"""configs/tf-checkpoint-to-torch.yaml end to end: a Keras model built, trained one step and
saved as a TensorFlow checkpoint by TensorFlow itself (in a subprocess: this process never
imports tensorflow), loaded with `remap apply` into its PyTorch port, and the port's outputs
compared with the ones TensorFlow recorded on the same images."""

from __future__ import annotations

import functools
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from torch import nn

from remap.cli import main

np = pytest.importorskip("numpy")

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "tf-checkpoint-to-torch.yaml"
ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "KERAS_BACKEND": "tensorflow"}

#: The config's model, one Adam step on random data, saved with its optimizer; its outputs recorded.
TRAIN = r"""
import os, sys
import numpy as np
import tensorflow as tf
import keras

out = sys.argv[1]
keras.utils.set_random_seed(0)
layers = keras.layers
model = keras.Sequential([
    keras.Input((9, 7, 3)),
    layers.Conv2D(16, 3, padding="same"), layers.BatchNormalization(momentum=0.0), layers.ReLU(),
    layers.Conv2D(32, 3, padding="valid"), layers.BatchNormalization(momentum=0.0), layers.ReLU(),
    layers.GlobalAveragePooling2D(), layers.Dense(10),
])  # momentum 0: one step leaves the batch's own statistics, far from the initial 0 and 1
optimizer = keras.optimizers.Adam(0.05)
model.compile(optimizer=optimizer, loss="mse")
rng = np.random.default_rng(0)
model.fit(rng.normal(1.0, 2.0, (16, 9, 7, 3)).astype("float32"), rng.normal(size=(16, 10)).astype("float32"),
          batch_size=16, epochs=1, verbose=0)
tf.train.Checkpoint(model=model, optimizer=optimizer).save(os.path.join(out, "ckpt", "ckpt"))
x = rng.normal(size=(4, 9, 7, 3)).astype("float32")
np.save(os.path.join(out, "x.npy"), x)
np.save(os.path.join(out, "y.npy"), model(x, training=False).numpy())
np.savez(os.path.join(out, "weights.npz"), **{v.path: v.numpy() for v in model.weights})
print([layer.name for layer in model.layers])
"""


class TorchNet(nn.Module):
    """The PyTorch port the config's comment describes (NCHW input)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16, eps=1e-3)
        self.conv2 = nn.Conv2d(16, 32, 3)
        self.bn2 = nn.BatchNorm2d(32, eps=1e-3)
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


@functools.cache
def tf_checkpoint() -> Path:
    """Run TRAIN once per test session (TensorFlow starts in a subprocess, ~10 s): the folder
    holding ``ckpt/ckpt-1``, the recorded input and outputs, and TensorFlow's own values."""
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed (pip install tensorflow-cpu): it writes the checkpoint read here")
    out = Path(tempfile.mkdtemp(prefix="remap-tf-conversion-"))
    done = subprocess.run([sys.executable, "-c", TRAIN, str(out)], capture_output=True, text=True, env=ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "'conv2d', 'batch_normalization', 're_lu', 'conv2d_1'" in done.stdout  # the names the config renames
    return out


def tf_values(out: Path) -> dict[str, torch.Tensor]:
    """TensorFlow's values under the reader's documented names: the variable's path without
    the model's own name (``sequential/conv2d/kernel`` -> ``conv2d.kernel``)."""
    with np.load(out / "weights.npz") as w:
        return {k.split("/", 1)[1].replace("/", "."): torch.from_numpy(w[k].copy()) for k in w.files}


@pytest.fixture(scope="module")
def trained() -> Path:
    return tf_checkpoint()


def test_tf_checkpoint_loads_into_its_torch_port(trained: Path, tmp_path: Path) -> None:
    report_path, saved = tmp_path / "report.json", tmp_path / "loaded.safetensors"
    code = main(["apply", str(CONFIG), "--source", str(trained / "ckpt" / "ckpt-1"), "--target", "test_tf_conversion:TorchNet",
                 "--report", str(report_path), "--save", str(saved), "-q"])  # fmt: skip
    assert code == 0
    report = json.loads(report_path.read_text())
    totals = report["totals"]  # conv and dense: kernel and bias; BatchNorm: 4 each; the optimizer's state left out
    assert report["ok"] and totals["loaded"] == totals["source_keys"] == 14 and totals["target_keys"] == 16

    from safetensors.torch import load_file

    net = TorchNet()
    net.load_state_dict(load_file(saved))
    x, expected = np.load(trained / "x.npy"), np.load(trained / "y.npy")
    got = net.eval()(torch.from_numpy(x).permute(0, 3, 1, 2)).detach().numpy()  # NCHW, as PyTorch takes images
    np.testing.assert_allclose(got, expected, atol=1e-4, rtol=0)
    assert np.abs(expected).max() > 0.1  # a real signal, not zeros compared with zeros

    # each tensor is TensorFlow's own value in PyTorch's layout
    with np.load(trained / "weights.npz") as w:
        assert torch.equal(net.conv2.weight, torch.from_numpy(w["sequential/conv2d_1/kernel"]).permute(3, 2, 0, 1))
        assert torch.equal(net.fc.weight, torch.from_numpy(w["sequential/dense/kernel"]).T)
        assert torch.equal(net.bn2.running_var, torch.from_numpy(w["sequential/batch_normalization_1/moving_variance"]))
        assert not torch.allclose(net.bn2.running_var, torch.ones(32), atol=0.05)  # trained statistics, not 1s


def test_the_checkpoint_folder_and_inspect(trained: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The folder works as the source too (its `checkpoint` file names ckpt-1); inspect shows the keys."""
    assert main(["apply", str(CONFIG), "--source", str(trained / "ckpt"), "--target", "test_tf_conversion:TorchNet",
                 "--dry-run", "-q"]) == 0  # fmt: skip
    assert main(["inspect", str(trained / "ckpt" / "ckpt-1")]) == 0
    out = capsys.readouterr().out
    assert "(tf)" in out and "batch_normalization_1" in out and "conv2d_1" in out
    assert "optimizer slot variables" in out and "`source.key: all`" in out
