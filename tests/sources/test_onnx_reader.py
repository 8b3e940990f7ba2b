"""ONNX sources (issue 14): models written by ``torch.onnx.export`` and ``onnx.save_model``
(embedded and external data, typed fields), read from the protobuf without loading the data,
compared with ``onnx.numpy_helper.to_array`` and the exported module's parameters; hostile
files end in a SourceError (exit 3) or a clean load."""

from __future__ import annotations

import io
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch

from remap.errors import SourceError
from remap.loading.streaming import read_tensor
from remap.sources import onnx_reader
from remap.sources.onnx_reader import ONNX_DTYPES, open_reader, sniff
from remap.sources.readers import _describe, _FileSource

np = pytest.importorskip("numpy")
onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402


class Net(torch.nn.Module):
    """Conv+BatchNorm (folded on export: graph-internal ``onnx::Conv_N`` names), a second
    conv and a linear layer (kept under their parameter names)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 4, 3)
        self.bn1 = torch.nn.BatchNorm2d(4)
        self.conv2 = torch.nn.Conv2d(4, 2, 1)
        self.fc = torch.nn.Linear(2 * 6 * 6, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(self.conv2(x)).flatten(1))


def head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(512)


def source_error(fn, *args, **kwargs) -> SourceError:
    with pytest.raises(SourceError) as info:
        fn(*args, **kwargs)
    assert info.value.exit_code == 3
    return info.value


def as_source(reader) -> _FileSource:
    """The reader as open_source would wrap it: streaming reads go through span() where it has one."""
    return _FileSource(dict.fromkeys(reader.meta, reader), dict(reader.meta), _describe("file", format="onnx"), str(reader.path))


def library_arrays(path: Path) -> dict[str, np.ndarray]:
    """Every initializer as onnx itself reads it (external data included)."""
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


def torch_dtype_name(t: TensorProto) -> str:
    return str(helper.tensor_dtype_to_np_dtype(t.data_type))


def same(tensor: torch.Tensor, array: np.ndarray) -> bool:
    """Equal bytes (bfloat16 and float8 arrays come as ml_dtypes, which torch cannot take)."""
    flat = tensor.contiguous().reshape(-1)
    return flat.view(torch.uint8).numpy().tobytes() == np.ascontiguousarray(array).tobytes()


def check_reader(path: Path) -> onnx_reader.OnnxReader:
    """meta equals onnx's dims and types; read (direct and streamed) equals numpy_helper's arrays."""
    reader = open_reader(path, key=None, trust_pickle=False)
    model = onnx.load(str(path), load_external_data=False)
    assert list(reader.meta) == [t.name for t in model.graph.initializer]
    for t in model.graph.initializer:
        meta = reader.meta[t.name]
        assert meta.shape == tuple(t.dims), t.name
        assert meta.dtype == torch_dtype_name(t), t.name
    source = as_source(reader)
    for key, array in library_arrays(path).items():
        for tensor in (reader.read(key), read_tensor(source, key)):
            assert tensor.dtype == getattr(torch, reader.meta[key].dtype), key
            assert tuple(tensor.shape) == array.shape, key
            assert same(tensor, array), key
        got = reader.read(key)
        assert got.is_contiguous()
        assert got.untyped_storage().nbytes() == got.numel() * got.element_size()  # owns exactly its memory
    source.close()
    return reader


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Net]:
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.bn1.running_mean.uniform_(-1, 1)
        net.bn1.running_var.uniform_(0.5, 2)
    path = tmp_path_factory.mktemp("onnx") / "net.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), str(path), dynamo=False)
    return path, net


@pytest.fixture
def model_file(exported: tuple[Path, Net], tmp_path: Path) -> Path:
    """A private copy of the exported model, free to damage."""
    path = tmp_path / "net.onnx"
    path.write_bytes(exported[0].read_bytes())
    return path


@pytest.fixture
def external(exported: tuple[Path, Net], tmp_path: Path) -> Path:
    """The exported model saved again with every tensor in one external file, w.data."""
    model = onnx.load(str(exported[0]))
    path = tmp_path / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="w.data", size_threshold=0)
    assert (tmp_path / "w.data").stat().st_size > 0
    return path


def typed_model(path: Path, tensors: list[TensorProto], nodes: list | None = None) -> Path:
    """A model whose initializers are the given TensorProtos (kept in typed fields, not raw_data)."""
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])]
    nodes = nodes if nodes is not None else [helper.make_node("Identity", ["x"], ["y"], name="id")]
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=tensors)
    onnx.save_model(helper.make_model(graph), str(path))
    return path


# ---------------------------------------------------------------------------- detection


def test_sniff_accepts_an_exported_model_and_refuses_the_rest(exported: tuple[Path, Net], tmp_path: Path) -> None:
    path = exported[0]
    assert sniff(head(path), path)
    assert sniff(head(path), Path("x.ONNX"))
    assert not sniff(head(path), Path("net.bin"))  # no magic number: the suffix is required
    assert not sniff(b"", path)
    assert not sniff(b"\x08", path)
    assert not sniff(b"PK\x03\x04" + bytes(100), path)  # a zip (torch.save) named .onnx
    assert not sniff((16).to_bytes(8, "little") + b'{"a":{}}', path)  # a safetensors file named .onnx
    assert not sniff(b"\x08\x80\x80\x80\x80\x80\x80\x80\x80\x80\x80", path)  # a runaway varint
    assert not sniff(b"\x08\x07\x0b", path)  # field 1 then a group start: not a ModelProto


def test_key_does_not_apply(exported: tuple[Path, Net]) -> None:
    err = source_error(open_reader, exported[0], key="state_dict", trust_pickle=False)
    assert "does not apply" in str(err)


def test_dtype_table_agrees_with_onnx() -> None:
    for code, (name, width) in ONNX_DTYPES.items():
        np_dtype = helper.tensor_dtype_to_np_dtype(code)
        assert str(np_dtype) == name, code
        assert np.dtype(np_dtype).itemsize == width, code
        assert isinstance(getattr(torch, name), torch.dtype)


# ---------------------------------------------------------------------------- reading


def test_exported_model_matches_onnx_and_the_module(exported: tuple[Path, Net]) -> None:
    path, net = exported
    reader = check_reader(path)
    params = net.state_dict()
    named = [k for k in reader.meta if k in params]
    assert {"conv2.weight", "conv2.bias", "fc.weight", "fc.bias"} <= set(named)
    for key in named:
        assert torch.equal(reader.read(key), params[key]), key
    # conv1 and bn1 are folded into graph-internal initializers: the entries say who reads them
    internal = [k for k in reader.meta if k.startswith("onnx::")]
    assert len(internal) == 2
    assert {reader.entries[k] for k in internal} == {"input 1 of Conv /conv1/Conv", "input 2 of Conv /conv1/Conv"}
    assert reader.entries["fc.weight"] == "input 1 of Gemm /fc/Gemm"
    assert reader.consumers["conv2.bias"][0][1:] == ("Conv", "/conv2/Conv", 2)
    # graph order: conv1's folded weight and bias first, the linear layer last
    assert reader.order[:2] == sorted(internal, key=lambda k: reader.consumers[k][0][3])
    assert reader.order[-2:] == ["fc.weight", "fc.bias"]
    reader.release()


def test_external_data_matches_onnx(external: Path, exported: tuple[Path, Net]) -> None:
    reader = check_reader(external)
    embedded = open_reader(exported[0], key=None, trust_pickle=False)
    assert reader.meta == embedded.meta
    assert reader.entries == embedded.entries
    for key in reader.meta:
        span = reader.span(key)
        assert span is not None and Path(span.path) == (external.parent / "w.data").resolve()
        assert torch.equal(reader.read(key), embedded.read(key))
    reader.release()
    embedded.release()


def test_external_data_in_a_subfolder_and_one_file_per_tensor(exported: tuple[Path, Net], tmp_path: Path) -> None:
    model = onnx.load(str(exported[0]))
    path = tmp_path / "sub.onnx"
    (tmp_path / "data").mkdir()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location="data/w.bin", size_threshold=0)
    check_reader(path).release()
    model = onnx.load(str(exported[0]))
    path = tmp_path / "many" / "m.onnx"
    path.parent.mkdir()
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=False, size_threshold=0)
    check_reader(path).release()


def test_typed_fields_and_many_dtypes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    arrays = {
        "f32": rng.standard_normal((2, 3)).astype(np.float32),
        "f64": rng.standard_normal(4),
        "f16": rng.standard_normal((3,)).astype(np.float16),
        "i64": np.array([1, -2, 1 << 40], dtype=np.int64),
        "i8": np.array([-128, 5, 127], dtype=np.int8),
        "u8": np.array([[0, 255]], dtype=np.uint8),
        "u64": np.array([1, 2**63 + 5], dtype=np.uint64),
        "mask": np.array([True, False, True]),
        "scalar": np.array(2.5, dtype=np.float32),
        "empty": np.zeros((0, 2), dtype=np.float32),
    }
    tensors = [numpy_helper.from_array(a, name) for name, a in arrays.items()]  # raw_data
    tensors += [
        helper.make_tensor("t_f32", TensorProto.FLOAT, [2, 2], [1.0, -2.0, 3.5, 0.25]),  # float_data
        helper.make_tensor("t_f16", TensorProto.FLOAT16, [3], np.array([1, 0.5, -3], dtype=np.float16)),  # int32_data
        helper.make_tensor("t_bf16", TensorProto.BFLOAT16, [2], [1.5, -2.0]),
        helper.make_tensor("t_i64", TensorProto.INT64, [3], [7, -8, 1 << 50]),  # int64_data
        helper.make_tensor("t_bool", TensorProto.BOOL, [2], [True, False]),
        helper.make_tensor("t_f64", TensorProto.DOUBLE, [2], [1e300, -0.5]),  # double_data
        helper.make_tensor("t_u32", TensorProto.UINT32, [2], [4_000_000_000, 3]),  # uint64_data
        helper.make_tensor("t_f8", TensorProto.FLOAT8E4M3FN, [2], [1.0, -0.5]),
        helper.make_tensor("t_raw_bf16", TensorProto.BFLOAT16, [2], np.array([0x3FC0, 0xC000], dtype=np.uint16).tobytes(), raw=True),
        helper.make_tensor("t_c64", TensorProto.COMPLEX64, [2], [1 + 2j, -3j]),  # float_data, pairs
        helper.make_tensor("t_fnuz", TensorProto.FLOAT8E5M2FNUZ, [2], bytes([0x40, 0xC0]), raw=True),
        helper.make_tensor("t_e8m0", TensorProto.FLOAT8E8M0, [3], bytes([127, 128, 1]), raw=True),
        helper.make_tensor("t_raw_bool", TensorProto.BOOL, [3], bytes([0, 1, 1]), raw=True),
    ]
    path = typed_model(tmp_path / "typed.onnx", tensors)
    reader = check_reader(path)
    assert reader.read("t_bf16").tolist() == [1.5, -2.0]
    assert reader.read("t_raw_bf16").tolist() == [1.5, -2.0]
    assert reader.read("t_bool").tolist() == [True, False]
    assert reader.read("t_f8").float().tolist() == [1.0, -0.5]
    assert reader.entries["t_f32"] == "used by no top-level node"
    reader.release()


def test_metadata_reads_a_sliver_of_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Planning from a model with its data embedded reads well under 1% of the file."""
    big = [numpy_helper.from_array(np.full((256, 1024), i, dtype=np.float32), f"w{i}") for i in range(8)]  # 8 MiB
    nodes = [helper.make_node("Add", ["x", f"w{i}"], [f"y{i}"], name=f"/add{i}") for i in range(8)]
    nodes.append(helper.make_node("Identity", ["x"], ["y"], name="id"))
    path = typed_model(tmp_path / "big.onnx", big, nodes)
    counted = {"bytes": 0}
    real_open = open

    class Counting(io.RawIOBase):
        def __init__(self, *args, **kwargs) -> None:
            self.f = real_open(*args, **kwargs)

        def read(self, n: int = -1) -> bytes:
            out = self.f.read(n)
            counted["bytes"] += len(out)
            return out

        def readinto(self, b) -> int:
            n = self.f.readinto(b)
            counted["bytes"] += n or 0
            return n

        def seek(self, *args) -> int:
            return self.f.seek(*args)

        def fileno(self) -> int:
            return self.f.fileno()

        def close(self) -> None:
            self.f.close()

    monkeypatch.setattr(onnx_reader, "open", Counting, raising=False)
    reader = open_reader(path, key=None, trust_pickle=False)
    assert counted["bytes"] < path.stat().st_size // 100, counted
    assert reader.meta["w3"].shape == (256, 1024)
    assert reader.entries["w3"] == "input 1 of Add /add3"
    before = counted["bytes"]
    assert reader.read("w5").unique().tolist() == [5.0]
    assert counted["bytes"] - before == 256 * 1024 * 4  # one bounded read of that tensor only
    reader.release()


def test_metadata_needs_no_onnx_and_typed_data_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = typed_model(tmp_path / "t.onnx", [
        numpy_helper.from_array(np.arange(3, dtype=np.float32), "raw"),
        helper.make_tensor("typed", TensorProto.FLOAT, [2], [1.0, 2.0]),
    ])  # fmt: skip
    monkeypatch.setitem(sys.modules, "onnx", None)  # `import onnx` now fails
    reader = open_reader(path, key=None, trust_pickle=False)
    assert reader.read("raw").tolist() == [0.0, 1.0, 2.0]
    err = source_error(reader.read, "typed")
    assert "needs the 'onnx' package: pip install 'remap[onnx]'" in str(err)
    reader.release()


def test_a_rewritten_file_is_refused_before_reading(model_file: Path, external: Path) -> None:
    reader = open_reader(model_file, key=None, trust_pickle=False)
    model_file.write_bytes(model_file.read_bytes() + b"\x00")
    assert "changed on disk" in str(source_error(reader.read, "fc.weight"))
    reader = open_reader(external, key=None, trust_pickle=False)
    data = external.parent / "w.data"
    data.write_bytes(data.read_bytes()[:-4] + b"\x00\x00\x00\x01")
    os.utime(data, ns=(1, 1))
    assert "changed on disk" in str(source_error(reader.read, "fc.weight"))


# ---------------------------------------------------------------------------- hostile files


def load_all(path: Path) -> None:
    """Open and read everything, letting only SourceError out."""
    reader = open_reader(path, key=None, trust_pickle=False)
    try:
        for key in reader.meta:
            tensor = reader.read(key)
            assert tuple(tensor.shape) == reader.meta[key].shape
    finally:
        reader.release()


@pytest.mark.hostile
def test_truncated_files_are_source_errors(model_file: Path) -> None:
    data = model_file.read_bytes()
    for n in sorted({0, 1, 2, 5, 17, 100, len(data) // 3, len(data) // 2, len(data) - 40, len(data) - 1}):
        model_file.write_bytes(data[:n])
        source_error(load_all, model_file)


@pytest.mark.hostile
def test_bit_flips_end_in_a_source_error_or_a_clean_load(model_file: Path) -> None:
    data = model_file.read_bytes()
    rng = np.random.default_rng(14)
    offsets = sorted(set(rng.integers(0, len(data), 60).tolist()) | {0, 1, 2, 3, 10, len(data) - 1})
    outcomes = {"error": 0, "clean": 0}
    for offset in offsets:
        for mask in (0x01, 0x80, 0xFF):
            damaged = bytearray(data)
            damaged[offset] ^= mask
            model_file.write_bytes(bytes(damaged))
            try:
                load_all(model_file)
                outcomes["clean"] += 1
            except SourceError as exc:
                assert exc.exit_code == 3 and str(exc)
                outcomes["error"] += 1
    assert outcomes["error"] and outcomes["clean"]  # flips in the data load; flips in the structure are caught


@pytest.mark.hostile
def test_lying_sizes_are_refused(tmp_path: Path) -> None:
    t = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "w")
    t.dims[0] = 1 << 40  # raw_data holds 24 bytes
    err = source_error(open_reader, typed_model(tmp_path / "a.onnx", [t]), key=None, trust_pickle=False)
    assert "needs" in str(err) and "raw_data holds 24" in str(err)
    t = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])  # float_data: 8 bytes
    t.dims[:] = [1 << 40, 1 << 20]
    err = source_error(open_reader, typed_model(tmp_path / "b.onnx", [t]), key=None, trust_pickle=False)
    assert "claims" in str(err)
    t = helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0])
    t.dims[:] = [3]  # float_data one short: onnx refuses at read
    reader = open_reader(typed_model(tmp_path / "c.onnx", [t]), key=None, trust_pickle=False)
    source_error(reader.read, "w")
    reader.release()
    t = helper.make_tensor("w", TensorProto.FLOAT, [1], [1.0])
    t.dims[:] = [1 << 62, 1 << 62]
    source_error(open_reader, typed_model(tmp_path / "d.onnx", [t]), key=None, trust_pickle=False)
    t = numpy_helper.from_array(np.zeros(2, dtype=np.float32), "w")
    t.dims[0] = -2
    err = source_error(open_reader, typed_model(tmp_path / "e.onnx", [t]), key=None, trust_pickle=False)
    assert "negative" in str(err)


@pytest.mark.hostile
def test_lying_external_data_is_refused(external: Path) -> None:
    model = onnx.load(str(external), load_external_data=False)
    data = external.parent / "w.data"

    def with_entry(name: str, **values: str) -> Path:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        t = next(t for t in m.graph.initializer if t.name == "fc.weight")
        entries = {e.key: e.value for e in t.external_data} | values
        del t.external_data[:]
        for k, v in entries.items():
            t.external_data.add(key=k, value=v)
        path = external.parent / name
        path.write_bytes(m.SerializeToString())
        return path

    size = data.stat().st_size
    assert "outside" in str(source_error(open_reader, with_entry("a.onnx", length=str(size + 4)), key=None, trust_pickle=False))
    assert "outside" in str(source_error(open_reader, with_entry("b.onnx", offset=str(size)), key=None, trust_pickle=False))
    assert "needs" in str(source_error(open_reader, with_entry("c.onnx", length="8"), key=None, trust_pickle=False))
    assert "integer" in str(source_error(open_reader, with_entry("d.onnx", offset="-4"), key=None, trust_pickle=False))
    assert "cannot be read" in str(source_error(open_reader, with_entry("e.onnx", location="missing.data"), key=None, trust_pickle=False))
    # the data file truncated after planning: a SourceError when read, not a short tensor
    reader = open_reader(external, key=None, trust_pickle=False)
    data.write_bytes(data.read_bytes()[:100])
    source_error(reader.read, "fc.weight")
    source_error(open_reader, external, key=None, trust_pickle=False)


@pytest.mark.hostile
def test_external_data_outside_the_models_folder_is_refused(external: Path, tmp_path: Path) -> None:
    model = onnx.load(str(external), load_external_data=False)
    folder = tmp_path / "inner"
    folder.mkdir()
    outside = tmp_path / "secret.bin"
    outside.write_bytes(bytes(4096))
    (folder / "link.data").symlink_to(outside)
    for location in ("../secret.bin", str(outside), "link.data", "/etc/passwd", "sub/../../secret.bin"):
        m = onnx.ModelProto()
        m.CopyFrom(model)
        for t in m.graph.initializer:
            for e in t.external_data:
                if e.key == "location":
                    e.value = location
        path = folder / "m.onnx"
        path.write_bytes(m.SerializeToString())
        err = source_error(open_reader, path, key=None, trust_pickle=False)
        assert "outside the model's folder" in str(err) or "not a path relative" in str(err), location


@pytest.mark.hostile
def test_malformed_structures_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "x.onnx"
    cases = {
        b"": "empty",
        b"\x08\x07": "no graph",
        b"\x08\x07\x3a\x10\x2a\x05": "claims",  # graph of 16 bytes, 2 present
        b"\x08\x07\x3a\x02\x0b\x00": "wire type 3",  # a group
        b"\x08" + b"\xff" * 11: "longer than 10 bytes",
        b"\x08\x07\x00": "field number 0",
        b"\x08\x07\x3a\x04\x2a\x02\x42\x00": "no name",  # an initializer with an empty name
    }
    for raw, words in cases.items():
        path.write_bytes(raw)
        assert words in str(source_error(open_reader, path, key=None, trust_pickle=False)), raw


@pytest.mark.hostile
def test_unreadable_element_types_duplicates_and_sparse_are_refused(tmp_path: Path) -> None:
    s = helper.make_tensor("s", TensorProto.STRING, [1], [b"hello"])
    assert "STRING" in str(source_error(open_reader, typed_model(tmp_path / "s.onnx", [s]), key=None, trust_pickle=False))
    a = numpy_helper.from_array(np.zeros(2, dtype=np.float32), "w")
    b = numpy_helper.from_array(np.ones(2, dtype=np.float32), "w")
    path = tmp_path / "dup.onnx"
    graph = helper.make_graph([], "g", [], [], initializer=[a, b])
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert "two initializers" in str(source_error(open_reader, path, key=None, trust_pickle=False))
    values = numpy_helper.from_array(np.array([1.0], dtype=np.float32), "sp")
    indices = numpy_helper.from_array(np.array([0], dtype=np.int64), "sp_i")
    sparse = helper.make_sparse_tensor(values, indices, [3])
    graph = helper.make_graph([], "g", [], [], sparse_initializer=[sparse])
    path = tmp_path / "sparse.onnx"
    path.write_bytes(helper.make_model(graph).SerializeToString())
    assert "sparse" in str(source_error(open_reader, path, key=None, trust_pickle=False))


def test_consumers_are_found_through_identity_nodes(tmp_path: Path) -> None:
    """torch.onnx.export reads a deduplicated initializer through Identity nodes: the entry
    names the nodes that use it, not the Identity."""
    tensors = [numpy_helper.from_array(np.ones((2, 2), dtype=np.float32), n) for n in ("w", "loop", "lone")]
    nodes = [
        helper.make_node("Identity", ["w"], ["w_a"], name="Identity_0"),
        helper.make_node("Identity", ["w"], ["w_b"], name="Identity_1"),
        helper.make_node("Identity", ["loop"], ["loop"], name="self_loop"),  # a cycle: walked once
        helper.make_node("MatMul", ["x", "w_a"], ["h"], name="/a/MatMul"),
        helper.make_node("MatMul", ["h", "w_b"], ["y"], name=""),
    ]
    path = typed_model(tmp_path / "id.onnx", tensors, nodes)
    reader = open_reader(path, key=None, trust_pickle=False)
    assert reader.entries["w"] == "input 1 of MatMul /a/MatMul; input 1 of MatMul (node #4)"
    assert reader.entries["loop"] == "used by no top-level node"
    assert reader.entries["lone"] == "used by no top-level node"
    assert reader.order == ["w", "loop", "lone"]


@pytest.mark.hostile
def test_data_cut_short_under_a_reader_is_a_source_error(external: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Even past the changed-file check, a short read is a SourceError, never a short tensor."""
    reader = open_reader(external, key=None, trust_pickle=False)
    monkeypatch.setattr(reader, "_check_unchanged", lambda: None)
    data = external.parent / "w.data"
    data.write_bytes(data.read_bytes()[:10])
    key = max(reader.meta, key=lambda k: reader.meta[k].numel)
    assert "the file ends after" in str(source_error(reader.read, key))
    reader.release()
