"""Make the shipped Keras reference: a small Keras 3 model saved as ``keras_small.keras`` and its
outputs recorded BY KERAS on a seeded batch, in ``keras_small_reference.safetensors``.

    KERAS_BACKEND=torch python tests/data/make_keras_reference.py

The model is configs/keras-to-torch.yaml's (the layer names Keras gives in a fresh session),
narrower so that both files stay a few KB: Conv2D(4) BN ReLU Conv2D(8) BN ReLU GAP Dense(5)
on 6x5 RGB images. Its PyTorch port is :class:`KerasPort`. Keras takes NHWC images, the port
NCHW: the reference holds the input as the port takes it (``input.0``: NCHW) and the outputs
Keras computed from the same numbers in NHWC. tests/verifying/test_reference.py converts the
.keras file with remap and verifies the port against the reference.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
KERAS_FILE = HERE / "keras_small.keras"
REFERENCE = HERE / "keras_small_reference.safetensors"
SEED = 0
INPUT_NHWC = (3, 6, 5, 3)


class KerasPort(nn.Module):
    """The PyTorch port of the Keras model (NCHW input; Keras's BatchNormalization epsilon 1e-3)."""

    def __init__(self, eps: float = 1e-3) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4, eps=eps, momentum=0.01)
        self.conv2 = nn.Conv2d(4, 8, 3)
        self.bn2 = nn.BatchNorm2d(8, eps=eps, momentum=0.01)
        self.fc = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


def keras_model():  # type: ignore[no-untyped-def]
    """The Keras model, with random weights and BatchNorm statistics far from 0 and 1."""
    import numpy as np

    os.environ.setdefault("KERAS_BACKEND", "torch")
    import keras

    keras.backend.clear_session()  # layer names count from zero, as in a fresh process
    keras.utils.set_random_seed(SEED)
    layers = keras.layers
    model = keras.Sequential([
        keras.Input(INPUT_NHWC[1:]),
        layers.Conv2D(4, 3, padding="same"), layers.BatchNormalization(), layers.ReLU(),
        layers.Conv2D(8, 3, padding="valid"), layers.BatchNormalization(), layers.ReLU(),
        layers.GlobalAveragePooling2D(), layers.Dense(5),
    ])  # fmt: skip
    rng = np.random.default_rng(SEED)
    for layer in model.layers:
        if isinstance(layer, layers.BatchNormalization):
            n = layer.gamma.shape[0]
            layer.set_weights([rng.uniform(0.5, 1.5, n), rng.normal(0, 0.5, n), rng.normal(0, 0.5, n), rng.uniform(0.5, 2.0, n)])
        elif layer.weights:
            layer.set_weights([rng.normal(0, 0.3, w.shape).astype("float32") for w in layer.get_weights()])
    return model


def main() -> None:
    import keras
    import numpy as np

    from remap.verifying.reference import write_reference

    keras_model().save(KERAS_FILE)
    model = keras.models.load_model(KERAS_FILE)  # the file, not the object in memory, is what gets recorded
    x = np.random.default_rng(SEED + 1).normal(size=INPUT_NHWC).astype("float32")
    y = model.predict(x, verbose=0)
    write_reference(REFERENCE, inputs=[x.transpose(0, 3, 1, 2)], outputs=y,
                    settings={"framework": f"keras {keras.__version__} ({keras.backend.backend()} backend)",
                              "model": KERAS_FILE.name, "seed": SEED + 1, "input": "NHWC normal(0, 1), stored NCHW",
                              "dtype": "float32"})  # fmt: skip
    print(f"wrote {KERAS_FILE} ({KERAS_FILE.stat().st_size} bytes) and {REFERENCE} ({REFERENCE.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
