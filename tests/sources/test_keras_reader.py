"""The Keras reader against files Keras 3 itself wrote: ``.keras``, ``.weights.h5``, legacy ``.h5``."""

from __future__ import annotations

import os
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from remap.errors import SourceError
from remap.sources.keras_reader import EXTRA, FORMAT, H5_FORMAT, open_reader, sniff
from remap.sources.readers import _Reader

h5py = pytest.importorskip("h5py")


def _keras():
    os.environ["KERAS_BACKEND"] = "torch"  # before keras is imported: no TensorFlow needed
    return pytest.importorskip("keras")


def _open(path: Path):
    head = path.read_bytes()[:512]
    assert sniff(head, path)
    reader = open_reader(path, key=None, trust_pickle=False)
    assert isinstance(reader, _Reader)
    return reader


def _expected(model, drop_model_name: bool) -> dict[str, np.ndarray]:
    """Keras's own variable paths (dots for slashes) -> the values Keras's get_weights() returns."""
    out = {}
    for layer in model.layers:
        for var, value in zip(layer.weights, layer.get_weights(), strict=True):
            parts = var.path.split("/")
            if drop_model_name and parts[0] == model.name:
                parts = parts[1:]
            out[".".join(parts)] = value
    return out


def _check(reader, expected: dict[str, np.ndarray]) -> None:
    assert set(reader.meta) == set(expected)
    for key, value in expected.items():
        meta = reader.meta[key]
        assert meta.shape == tuple(value.shape), key
        assert meta.dtype == str(value.dtype), key
        got = reader.read(key)
        assert got.is_contiguous() and tuple(got.shape) == meta.shape
        np.testing.assert_array_equal(got.numpy(), value, err_msg=key)
    reader.release()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    keras = _keras()
    folder = tmp_path_factory.mktemp("keras")
    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(4, 3, name="conv2d"),
        keras.layers.BatchNormalization(name="batch_normalization"),  # named: automatic names count across the session
        keras.layers.Flatten(),
        keras.layers.Dense(5, name="dense_1"),
        keras.layers.Dense(2, use_bias=False, name="head"),
    ], name="seq")  # fmt: skip
    bn = model.layers[1]  # moving statistics that differ from their initial values
    bn.moving_mean.assign(np.arange(4, dtype="float32"))
    bn.moving_variance.assign(np.arange(1, 5, dtype="float32"))
    model.save(folder / "m.keras")
    model.save_weights(folder / "m.weights.h5")
    model.save(folder / "m.h5")  # legacy HDF5, as Keras 3 still writes it
    return folder, model


@pytest.fixture(scope="module")
def functional(tmp_path_factory):
    keras = _keras()
    folder = tmp_path_factory.mktemp("keras_fn")
    keras.utils.set_random_seed(1)
    inp = keras.Input((6,))
    x = keras.layers.Embedding(10, 4, name="embed")(inp)
    x = keras.layers.LSTM(3, return_sequences=True, name="lstm")(x)
    x = keras.layers.MultiHeadAttention(2, 2, name="mha")(x, x)
    x = keras.layers.LayerNormalization(center=False, name="norm")(x)
    out = keras.Sequential([keras.layers.Dense(2, name="proj")], name="inner")(x)
    model = keras.Model(inp, out, name="fn")
    model.compile("adam", "mse")
    model.fit(np.ones((4, 6)), np.ones((4, 6, 2)), verbose=0)
    model.save(folder / "f.keras")
    return folder, model


def test_keras_archive(saved):
    folder, model = saved
    reader = _open(folder / "m.keras")
    assert reader.format == FORMAT == "keras" and EXTRA == "keras"
    assert {"conv2d.kernel", "conv2d.bias", "batch_normalization.moving_variance", "dense_1.kernel", "head.kernel"} <= set(reader.meta)
    assert "head.bias" not in reader.meta
    assert reader.meta["conv2d.kernel"].shape == (3, 3, 3, 4)  # Keras's layout, not transposed
    assert reader.meta["dense_1.kernel"].shape == (144, 5)
    _check(reader, _expected(model, drop_model_name=True))


def test_weights_h5_names_from_paths(saved):
    folder, model = saved
    reader = _open(folder / "m.weights.h5")
    assert reader.format == H5_FORMAT
    _check(reader, _expected(model, drop_model_name=True))


def test_legacy_h5(saved):
    folder, model = saved
    reader = _open(folder / "m.h5")
    assert reader.format == H5_FORMAT and any("legacy" in n for n in reader.notes)
    assert list(reader.meta)[:2] == ["conv2d.kernel", "conv2d.bias"]  # the model's layer order
    _check(reader, _expected(model, drop_model_name=True))


def test_nested_layers_and_optimizer(functional):
    folder, model = functional
    reader = _open(folder / "f.keras")
    expected = _expected(model, drop_model_name=False)
    assert {"lstm.lstm_cell.recurrent_kernel", "mha.query.kernel", "mha.attention_output.bias", "norm.gamma",
            "inner.proj.kernel", "embed.embeddings"} <= set(expected)  # fmt: skip
    assert "norm.beta" not in expected
    assert "optimizer" in reader.entries and not any(k.startswith("optimizer") for k in reader.meta)
    _check(reader, expected)


def test_deflated_archive_reads_the_same(saved, tmp_path):
    folder, model = saved
    out = tmp_path / "deflated.keras"
    with zipfile.ZipFile(folder / "m.keras") as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    _check(_open(out), _expected(model, drop_model_name=True))


def test_unknown_layer_keeps_indices(tmp_path):
    path = tmp_path / "custom.weights.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("layers/my_block/vars")
        g.attrs["name"] = "block"
        g["0"] = np.ones((2, 3), "float32")
        g["1"] = np.zeros((3,), "float16")
        bn = f.create_group("layers/batch_normalization/vars")  # 3 variables: gamma or beta left out, unknown which
        bn.attrs["name"] = "bn"
        for i in range(3):
            bn[str(i)] = np.full((2,), i, "float32")
    reader = _open(path)
    assert set(reader.meta) == {"block.0", "block.1", "bn.0", "bn.1", "bn.2"}
    assert reader.meta["block.1"].dtype == "float16"
    assert "index" in reader.entries["block"] and "index" in reader.entries["bn"]
    assert reader.read("bn.2").tolist() == [2.0, 2.0]


def test_bfloat16_marked_dataset(tmp_path):
    import torch

    path = tmp_path / "bf16.weights.h5"
    values = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3)
    with h5py.File(path, "w") as f:
        g = f.create_group("layers/dense/vars")
        g.attrs["name"] = "dense"
        ds = g.create_dataset("0", data=values.view(torch.uint16).numpy().view("V2"))
        ds.attrs["dtype"] = "bfloat16"
    reader = _open(path)
    assert reader.meta == {"dense.kernel": reader.meta["dense.kernel"]} and reader.meta["dense.kernel"].dtype == "bfloat16"
    assert torch.equal(reader.read("dense.kernel"), values)


def test_key_does_not_apply(saved):
    folder, _ = saved
    with pytest.raises(SourceError, match="does not apply"):
        open_reader(folder / "m.keras", key="model", trust_pickle=False)


def test_sniff(saved, tmp_path):
    folder, _ = saved
    assert not sniff(b"PK\x03\x04rest", tmp_path / "x.pt")
    plain = tmp_path / "other.keras"
    with zipfile.ZipFile(plain, "w") as z:
        z.writestr("data.pkl", b"x")
    assert not sniff(plain.read_bytes()[:512], plain)
    assert not sniff(b"\x80\x02", tmp_path / "x.h5")


def test_hdf5_that_is_not_keras(tmp_path):
    path = tmp_path / "data.h5"
    with h5py.File(path, "w") as f:
        f["x"] = np.ones(3)
    with pytest.raises(SourceError, match="not Keras weights"):
        open_reader(path, key=None, trust_pickle=False)


def test_missing_h5py_names_the_extra(saved, monkeypatch):
    folder, _ = saved
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(SourceError, match=r"pip install 'remap\[keras\]'") as info:
        open_reader(folder / "m.h5", key=None, trust_pickle=False)
    assert info.value.exit_code == 3


# ---------------------------------------------------------------------------- hostile


def _load_all(path: Path) -> None:
    """Open and read every tensor: a clean load or a SourceError, nothing else."""
    try:
        reader = open_reader(path, key=None, trust_pickle=False)
        try:
            for key in reader.meta:
                reader.read(key)
        finally:
            reader.release()
    except SourceError:
        pass


@pytest.mark.hostile
@pytest.mark.parametrize("name", ["m.keras", "m.weights.h5", "m.h5"])
def test_truncated(saved, tmp_path, name):
    data = (saved[0] / name).read_bytes()
    for cut in (len(data) // 4, len(data) // 2, len(data) - 100):
        path = tmp_path / f"cut{cut}{name}"
        path.write_bytes(data[:cut])
        with pytest.raises(SourceError):
            reader = open_reader(path, key=None, trust_pickle=False)
            for key in reader.meta:
                reader.read(key)


@pytest.mark.hostile
@pytest.mark.parametrize("name", ["m.keras", "m.weights.h5", "m.h5"])
def test_bit_flips(saved, tmp_path, name):
    data = (saved[0] / name).read_bytes()
    rng = np.random.default_rng(0)
    offsets = sorted({*rng.integers(0, len(data), 24).tolist(), 9, 40, 100, 600, 2000})
    for offset in offsets:
        if offset >= len(data):
            continue
        flipped = bytearray(data)
        flipped[offset] ^= 0x5A
        path = tmp_path / f"flip{offset}{name}"
        path.write_bytes(bytes(flipped))
        _load_all(path)


@pytest.mark.hostile
def test_lying_size(tmp_path):
    path = tmp_path / "huge.weights.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("layers/dense/vars")
        g.attrs["name"] = "dense"
        g.create_dataset("0", shape=(200_000, 50_000), dtype="float32", chunks=(1, 1024))  # 40 GB, never written
    assert path.stat().st_size < 100_000
    with pytest.raises(SourceError, match="more than the"):
        open_reader(path, key=None, trust_pickle=False)


@pytest.mark.hostile
def test_external_data_refused(tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(b"\x00" * 64)
    path = tmp_path / "ext.weights.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("layers/dense/vars")
        g.attrs["name"] = "dense"
        g.create_dataset("0", shape=(16,), dtype="float32", external=[(str(outside), 0, 64)])
    with pytest.raises(SourceError, match="other files"):
        open_reader(path, key=None, trust_pickle=False)


@pytest.mark.hostile
def test_archive_member_claims_more_than_the_file(saved, tmp_path):
    data = bytearray((saved[0] / "m.keras").read_bytes())
    path = tmp_path / "lying.keras"
    with zipfile.ZipFile(saved[0] / "m.keras") as z:
        info = z.getinfo("model.weights.h5")
    start = 0  # the central directory's sizes for the weights member: compressed and uncompressed
    while (start := data.find(b"PK\x01\x02", start)) >= 0:
        name_len = int.from_bytes(data[start + 28 : start + 30], "little")
        if data[start + 46 : start + 46 + name_len] == b"model.weights.h5":
            data[start + 20 : start + 28] = (info.compress_size * 50).to_bytes(4, "little") * 2
        start += 4
    path.write_bytes(bytes(data))
    with pytest.raises(SourceError):
        open_reader(path, key=None, trust_pickle=False)


@pytest.mark.hostile
def test_changed_file_is_refused(saved, tmp_path):
    path = tmp_path / "m.h5"
    path.write_bytes((saved[0] / "m.h5").read_bytes())
    reader = open_reader(path, key=None, trust_pickle=False)
    path.write_bytes(path.read_bytes() + b"\x00")
    with pytest.raises(SourceError, match="changed on disk"):
        reader.read("conv2d.kernel")
