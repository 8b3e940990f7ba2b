"""The keras-lstm fragment end to end: an Embedding + LSTM + Dense model built and saved by
Keras 3 itself (torch backend, no TensorFlow needed), loaded into its PyTorch port with
``remap apply`` (rules that include keras-lstm and keras-layout), and the two models' outputs
compared on the same token ids. The reference is Keras's own forward pass on the reloaded file.

torch.nn.LSTM adds two biases where Keras has one: the fragment loads Keras's bias as
``bias_ih_l0``; ``bias_hh_l0`` is declared missing and the port zeroes it (the rules language
has no step that makes zeros: see the fragment's comments)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import remap
from remap.cli import main

VOCAB, DIM, UNITS, CLASSES, STEPS = 20, 6, 5, 3, 7

RULES = """\
version: 1
include: [keras-lstm, keras-layout]   # keras-lstm first: keras-layout transposes every 2-d .kernel
rules:
  - rename:
      '^embedding\\.': 'embed.'
      '^lstm\\.': 'rnn.'
      '^dense\\.': 'fc.'
expect:
  missing: ['^rnn\\.bias_hh_l0$']     # Keras has one bias; the port zeroes the second
"""


def _keras():
    os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported: no TensorFlow needed
    pytest.importorskip("h5py")
    return pytest.importorskip("keras")


def keras_model(seed: int = 0):
    """Embedding -> LSTM (last output) -> Dense, with random weights (biases far from zero)."""
    keras = _keras()
    keras.backend.clear_session()  # layer names count from zero again
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    model = keras.Sequential([keras.Input((STEPS,), dtype="int32"), layers.Embedding(VOCAB, DIM), layers.LSTM(UNITS),
                              layers.Dense(CLASSES)])  # fmt: skip
    assert [layer.name for layer in model.layers] == ["embedding", "lstm", "dense"]
    rng = np.random.default_rng(seed)
    for layer in model.layers:
        layer.set_weights([rng.normal(0, 0.5, w.shape).astype("float32") for w in layer.get_weights()])
    return model


class TorchLSTMNet(nn.Module):
    """The port: nn.Embedding, a one-layer nn.LSTM (batch first) whose last output feeds nn.Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.rnn = nn.LSTM(DIM, UNITS, batch_first=True)
        self.fc = nn.Linear(UNITS, CLASSES)
        nn.init.zeros_(self.rnn.bias_hh_l0)  # Keras's one bias loads as bias_ih_l0; the other must be zero

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(self.embed(ids))
        return self.fc(out[:, -1])


def make_port() -> nn.Module:
    return TorchLSTMNet()


def token_ids(seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, size=(4, STEPS)).astype("int32")


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """The model saved both ways a user saves it, and Keras's outputs read back from the file."""
    folder = tmp_path_factory.mktemp("keras_lstm")
    model = keras_model()
    archive, weights = folder / "model.keras", folder / "model.weights.h5"
    model.save(archive)
    model.save_weights(weights)
    keras = _keras()
    reloaded = keras.models.load_model(archive)
    expected = keras.ops.convert_to_numpy(reloaded(token_ids(), training=False))
    assert np.abs(expected).max() > 0.1  # a real signal
    return archive, weights, expected


@pytest.mark.parametrize("which", ["archive", "weights"])
def test_keras_lstm_loads_into_its_torch_port(tmp_path: Path, saved, which: str) -> None:
    archive, weights, expected = saved
    source = archive if which == "archive" else weights
    rules = tmp_path / "rules.yaml"
    rules.write_text(RULES)
    report_path, out = tmp_path / "report.json", tmp_path / "loaded.pt"
    argv = ["apply", str(rules), "--source", str(source), "--target", "test_keras_lstm_conversion:make_port",
            "--report", str(report_path), "--save", str(out), "-q"]  # fmt: skip
    assert main(argv) == 0
    report = json.loads(report_path.read_text())
    assert report["ok"] and report["totals"]["loaded"] == report["totals"]["source_keys"] == 6  # embedding 1, lstm 3, dense 2
    assert report["totals"]["target_keys"] == 7
    missing = [k for k, t in report["targets"].items() if t["status"] == "missing"]
    assert missing == ["rnn.bias_hh_l0"]

    net = TorchLSTMNet()
    net.load_state_dict(torch.load(out, weights_only=True))
    with torch.no_grad():
        got = net.eval()(torch.from_numpy(token_ids()).long()).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    with torch.no_grad():
        assert not np.allclose(TorchLSTMNet()(torch.from_numpy(token_ids()).long()).numpy(), expected, atol=1e-2)


def test_each_lstm_tensor_is_keras_s_value_in_torch_s_layout(saved) -> None:
    """Against Keras's own variables: kernels transposed, gates in the same order (no rows
    moved), the bias as bias_ih_l0; and what a non-zero bias_hh_l0 would do."""
    archive, _, expected = saved
    keras = _keras()
    lstm = keras.models.load_model(archive).layers[1]
    kernel, recurrent, bias = (np.asarray(w) for w in lstm.get_weights())
    assert kernel.shape == (DIM, 4 * UNITS) and recurrent.shape == (UNITS, 4 * UNITS)
    net = TorchLSTMNet()
    report = remap.load(net, archive, rules=RULES_DICT)
    assert report.ok
    assert torch.equal(net.rnn.weight_ih_l0, torch.from_numpy(kernel).T)
    assert torch.equal(net.rnn.weight_hh_l0, torch.from_numpy(recurrent).T)
    assert torch.equal(net.rnn.bias_ih_l0, torch.from_numpy(bias))
    assert torch.equal(net.rnn.bias_hh_l0, torch.zeros(4 * UNITS))
    with torch.no_grad():  # the second bias left as torch initialises it: not Keras's model
        nn.init.uniform_(net.rnn.bias_hh_l0, -0.5, 0.5)
        assert not np.allclose(net.eval()(torch.from_numpy(token_ids()).long()).numpy(), expected, atol=1e-3)


RULES_DICT = {"version": 1, "include": ["keras-lstm", "keras-layout"],
              "rules": [{"rename": {r"^embedding\.": "embed.", r"^lstm\.": "rnn.", r"^dense\.": "fc."}}],
              "expect": {"missing": [r"^rnn\.bias_hh_l0$"]}}  # fmt: skip


def test_fragments_in_the_wrong_order_fail_instead_of_transposing_twice(saved) -> None:
    archive, _, _ = saved
    wrong = {**RULES_DICT, "include": ["keras-layout", "keras-lstm"]}
    net = TorchLSTMNet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(remap.CheckError) as err:
        remap.load(net, archive, rules=wrong)
    assert any("(transpose, from keras-lstm)" in f["message"] and "matched no key" in f["message"] for f in err.value.report.to_dict()["failures"])
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
