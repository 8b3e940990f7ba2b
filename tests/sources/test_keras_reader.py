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


# ---------------------------------------------------------------------------- spans (pread straight into parameters)


def _member_data_offset(path: Path) -> tuple[int, int]:
    """(where the stored weights member's bytes start in the archive, its size), from the zip's own headers."""
    with zipfile.ZipFile(path) as z:
        info = z.getinfo("model.weights.h5")
    assert info.compress_type == zipfile.ZIP_STORED  # as Keras writes it
    local = path.read_bytes()[info.header_offset : info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    return start, info.file_size


def _h5py_arrays(path: Path) -> list[tuple[tuple[int, ...], str, bytes]]:
    """Every weight dataset as h5py reads it (optimizer state left out): (shape, dtype, bytes), sorted."""
    import io

    if path.suffix == ".keras":
        with zipfile.ZipFile(path) as z:
            f = h5py.File(io.BytesIO(z.read("model.weights.h5")), "r")
    else:
        f = h5py.File(path, "r")
    out = []
    with f:
        def visit(name, obj):
            if isinstance(obj, h5py.Dataset) and not name.startswith("optimizer"):
                value = np.ascontiguousarray(obj[()])
                out.append((value.shape, str(value.dtype), value.tobytes()))
        f.visititems(visit)
    return sorted(out)


def _mirror(meta):
    """A torch module with one frozen parameter per key, in the file's own shapes and dtypes (no rules needed)."""
    import torch

    root = torch.nn.Module()
    for key, m in meta.items():
        *owners, leaf = key.split(".")
        module = root
        for name in owners:
            if not hasattr(module, name):
                module.add_module(name, torch.nn.Module())
            module = getattr(module, name)
        module.register_parameter(leaf, torch.nn.Parameter(torch.full(m.shape, 7, dtype=getattr(torch, m.dtype)),
                                                           requires_grad=False))  # fmt: skip
    return root


def _load(path: Path):
    """remap.load of ``path`` into its mirror module: (state_dict, report stats)."""
    import remap

    reader = open_reader(path, key=None, trust_pickle=False)
    module = _mirror(reader.meta)
    report = remap.load(module, str(path), rollback=False)
    assert report.ok
    return {k: v.detach().clone() for k, v in module.state_dict().items()}, report.stats


@pytest.mark.parametrize("name", ["m.weights.h5", "m.keras"])
def test_spans_are_the_keras_values(saved, name):
    folder, model = saved
    path = folder / name
    expected = _expected(model, drop_model_name=True)
    reader = _open(path)
    raw = path.read_bytes()
    start, size = _member_data_offset(path) if name.endswith(".keras") else (0, len(raw))
    for key, value in expected.items():
        span = reader.span(key)
        assert span is not None, key
        assert span.path == str(path) and span.dtype == str(value.dtype) and span.shape == value.shape
        assert start <= span.offset and span.offset + span.nbytes <= start + size, key  # inside the weights member
        got = np.frombuffer(raw[span.offset : span.offset + span.nbytes], dtype=value.dtype).reshape(value.shape)
        np.testing.assert_array_equal(got, value, err_msg=key)


@pytest.mark.parametrize("name", ["m.weights.h5", "m.keras"])
def test_load_through_spans_equals_h5py(saved, name):
    folder, model = saved
    path = folder / name
    state, stats = _load(path)
    assert stats["direct_tensors"] + stats["zero_copy_tensors"] == len(state)  # every tensor read through its span
    got = sorted((tuple(v.shape), str(v.dtype).removeprefix("torch."), v.numpy().tobytes()) for v in state.values())
    assert got == _h5py_arrays(path)
    for key, value in _expected(model, drop_model_name=True).items():
        np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)


def test_deflated_archive_has_no_spans(saved, tmp_path):
    folder, model = saved
    out = tmp_path / "deflated.keras"
    with zipfile.ZipFile(folder / "m.keras") as src, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    reader = _open(out)
    assert all(reader.span(key) is None for key in reader.meta)
    state, stats = _load(out)
    assert stats["direct_tensors"] == stats["zero_copy_tensors"] == 0
    for key, value in _expected(model, drop_model_name=True).items():
        np.testing.assert_array_equal(state[key].numpy(), value, err_msg=key)


def test_chunked_or_compressed_gets_no_span(tmp_path):
    path = tmp_path / "mixed.weights.h5"
    kernel, bias = np.arange(12, dtype="float32").reshape(3, 4), np.array([1, -2, 3, -4], dtype="float32")
    with h5py.File(path, "w") as f:
        g = f.create_group("layers/dense/vars")  # Keras's layout, written with options Keras does not use
        g.attrs["name"] = "dense"
        g.create_dataset("0", data=kernel, chunks=(1, 4), compression="gzip")
        g.create_dataset("1", data=bias, chunks=(2,))  # chunked, no filter
        g = f.create_group("layers/dense_1/vars")
        g.attrs["name"] = "dense_1"
        g["0"] = kernel.T.copy()
        g["1"] = bias[:3].copy()
    reader = _open(path)
    assert reader.span("dense.kernel") is None and reader.span("dense.bias") is None
    assert reader.span("dense_1.kernel") is not None and reader.span("dense_1.bias") is not None
    state, stats = _load(path)
    assert stats["direct_tensors"] + stats["zero_copy_tensors"] == 2
    np.testing.assert_array_equal(state["dense.kernel"].numpy(), kernel)
    np.testing.assert_array_equal(state["dense.bias"].numpy(), bias)
    np.testing.assert_array_equal(state["dense_1.kernel"].numpy(), kernel.T)
    np.testing.assert_array_equal(state["dense_1.bias"].numpy(), bias[:3])


def test_bfloat16_span(tmp_path):
    import torch

    path = tmp_path / "bf16.weights.h5"
    values = torch.arange(6, dtype=torch.bfloat16).reshape(2, 3) / 3
    with h5py.File(path, "w") as f:
        g = f.create_group("layers/dense/vars")
        g.attrs["name"] = "dense"
        g.create_dataset("0", data=values.view(torch.uint16).numpy().view("V2")).attrs["dtype"] = "bfloat16"
    assert _open(path).span("dense.kernel") is not None
    state, _ = _load(path)
    assert torch.equal(state["dense.kernel"], values)


def _point_past(data: bytearray, offset: int, where: int) -> bytes:
    """``data`` with the (single) 8-byte address ``offset`` in a dataset's layout message replaced by ``where``."""
    old = offset.to_bytes(8, "little")
    assert data.count(old) == 1
    i = data.find(old)
    data[i : i + 8] = where.to_bytes(8, "little")
    return bytes(data)


@pytest.mark.hostile
def test_dataset_offset_past_the_end(tmp_path):
    path = tmp_path / "lying.weights.h5"
    with h5py.File(path, "w") as f:
        g = f.create_group("layers/dense/vars")
        g.attrs["name"] = "dense"
        g["0"] = np.arange(12, dtype="float32").reshape(3, 4)
        g["1"] = np.zeros(4, "float32")
    with h5py.File(path, "r") as f:
        offset = f["layers/dense/vars/0"].id.get_offset()
    data = bytearray(path.read_bytes())
    for where in (len(data) - 8, len(data) + 4096, 1 << 40):
        path.write_bytes(_point_past(bytearray(data), offset, where))
        with pytest.raises(SourceError):
            open_reader(path, key=None, trust_pickle=False)


@pytest.mark.hostile
def test_archive_dataset_offset_past_the_member(saved, tmp_path):
    folder, _ = saved
    source = folder / "m.keras"
    start, size = _member_data_offset(source)
    span = _open(source).span("dense_1.kernel")
    data = bytearray(source.read_bytes())
    path = tmp_path / "lying.keras"
    # into the archive's own bytes after the member (config.json, the central directory): inside the file, not the member
    path.write_bytes(_point_past(data, span.offset - start, size - span.nbytes // 2))
    with pytest.raises(SourceError):
        open_reader(path, key=None, trust_pickle=False)


class _Lying:
    """A real h5py dataset whose storage address is replaced (HDF5 itself refuses such a file
    at open, so the reader's own bound is reached only this way)."""

    def __init__(self, ds, offset: int) -> None:
        self._ds, self._offset = ds, offset

    def __getattr__(self, name):
        return getattr(self._ds, name)

    @property
    def id(self):
        outer = self

        class _Id:
            def __getattr__(self, name):
                return getattr(outer._ds.id, name)

            def get_offset(self):
                return outer._offset

        return _Id()


@pytest.mark.hostile
@pytest.mark.parametrize("name", ["m.weights.h5", "m.keras"])
def test_reader_bounds_every_span(saved, name):
    folder, _ = saved
    reader = open_reader(folder / name, key=None, trust_pickle=False)
    limit = reader._limit  # the bytes the HDF5 data may span: the file, or the archive's weights member
    h5py_file = reader._open(h5py)
    try:
        ds = h5py_file["layers/dense_1/vars/0"] if "layers/dense_1/vars/0" in h5py_file else None
        assert ds is not None
        nbytes = ds.id.get_storage_size()
        assert reader._span_of(_Lying(ds, limit - nbytes), "d", nbytes, "float32") is not None  # the last bytes: fine
        for offset in (limit - nbytes + 1, limit, -1):
            with pytest.raises(SourceError, match="holds"):
                reader._span_of(_Lying(ds, offset), "d", nbytes, "float32")
    finally:
        h5py_file.close()
        reader.release()


def test_a_type_h5py_converts_gets_no_span(tmp_path):
    path = tmp_path / "bits.weights.h5"
    values = np.array([[-2048, -1, 0], [1, 7, 2047]], dtype="int16")
    twelve_bits = h5py.h5t.py_create(np.dtype("<i2")).copy()
    twelve_bits.set_precision(12)  # 2-byte items whose bytes are not numpy's: h5py converts them
    with h5py.File(path, "w") as f:
        g = f.create_group("layers/embedding/vars")
        g.attrs["name"] = "embedding"
        ds = h5py.Dataset(h5py.h5d.create(g.id, b"0", twelve_bits, h5py.h5s.create_simple(values.shape)))
        ds[...] = values
    reader = _open(path)
    assert reader.meta["embedding.embeddings"].dtype == "int16" and reader.span("embedding.embeddings") is None
    state, _ = _load(path)
    np.testing.assert_array_equal(state["embedding.embeddings"].numpy(), values)
