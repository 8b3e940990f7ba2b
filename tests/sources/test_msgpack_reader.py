"""Flax ``.msgpack`` sources (issue 14): files written by flax itself (``to_bytes`` of a linen
model's variables, ``msgpack_serialize``), planned from their headers alone and compared with
what ``flax.serialization.msgpack_restore`` gives; hostile files end in a SourceError (exit 3)
or a clean load, without a hang or a memory bomb."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import torch

from remap.cli import main
from remap.errors import SourceError
from remap.loading.streaming import read_tensor
from remap.sources import msgpack_reader
from remap.sources.msgpack_reader import MAX_DEPTH, MAX_ITEMS, open_reader, sniff
from remap.sources.readers import _describe, _FileSource, open_source
from remap.sources.registry import detect

np = pytest.importorskip("numpy")


def flax() -> tuple[Any, Any, Any, Any]:
    """jax, jax.numpy, flax.linen and flax.serialization on the CPU, imported only here."""
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    jax = pytest.importorskip("jax")
    linen = pytest.importorskip("flax.linen")
    from flax import serialization

    return jax, jax.numpy, linen, serialization


def head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(512)


def source_error(fn, *args, **kwargs) -> SourceError:
    with pytest.raises(SourceError) as info:
        fn(*args, **kwargs)
    assert info.value.exit_code == 3
    return info.value


def as_source(reader) -> _FileSource:
    """The reader as open_source wraps it, so that streaming reads go through span()."""
    return _FileSource(dict.fromkeys(reader.meta, reader), dict(reader.meta), _describe("file", format=reader.format), str(reader.path))


def flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    """flax's restored state dict, flattened with dots: the reference for the reader's keys."""
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def linen_variables() -> dict[str, Any]:
    """A small linen model's variables after ``init`` (params and batch_stats)."""
    jax, jnp, nn, _ = flax()

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x, ids):
            x = nn.Conv(4, (3, 3))(x)
            x = nn.BatchNorm(use_running_average=True)(x)
            x = nn.Dense(3)(jnp.mean(x, axis=(1, 2)))
            return nn.LayerNorm()(x) + jnp.mean(nn.Embed(7, 3)(ids), axis=1)

    return Model().init(jax.random.PRNGKey(0), jnp.ones((1, 5, 5, 2)), jnp.zeros((1, 2), jnp.int32))


def extra_tree() -> dict[str, Any]:
    """The dtypes and structures beyond a plain float32 model."""
    import ml_dtypes

    rng = np.random.default_rng(0)
    return {
        "half": rng.normal(size=(2, 3)).astype(np.float16),
        "bf16": rng.normal(size=(4,)).astype(ml_dtypes.bfloat16),
        "ids": np.arange(-3, 9, dtype=np.int32).reshape(3, 4),
        "mask": np.array([True, False, True]),
        "scalar0d": np.asarray(2.5, dtype=np.float32),
        "empty": np.zeros((0, 3), dtype=np.float32),
        "nested": {"deeper": {"w": rng.normal(size=(2, 2)).astype(np.float64)}},
        "layers": [rng.normal(size=(3,)).astype(np.float32), {"b": np.arange(5, dtype=np.uint8)}],
        "big": rng.normal(size=(16, 25)).astype(np.float32),  # chunked below: the only array over 600 bytes
        "step": 7, "name": "run-1", "cplx": 1 + 2j, "npscalar": np.float32(0.25),
    }  # fmt: skip


@pytest.fixture(scope="module")
def flax_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``to_bytes`` of linen variables plus the extra tree, with flax's chunk size made small
    so that ``big`` (1,600 bytes) is written as a chunked array of 150 float32 per chunk."""
    _, _, _, serialization = flax()
    mp = pytest.MonkeyPatch()
    mp.setattr(serialization, "MAX_CHUNK_SIZE", 600)
    try:
        data = serialization.to_bytes({**linen_variables(), "extra": extra_tree()})
    finally:
        mp.undo()
    assert b"__msgpack_chunked_array__" in data  # flax did chunk it
    path = tmp_path_factory.mktemp("flax") / "variables.msgpack"
    path.write_bytes(data)
    return path


def reference(path: Path) -> dict[str, Any]:
    """Every leaf of the file as flax restores it (chunks stitched by flax), flattened."""
    *_, serialization = flax()
    return flat(serialization.msgpack_restore(path.read_bytes()))


def as_numpy(tensor: torch.Tensor) -> Any:
    if tensor.dtype == torch.bfloat16:
        return tensor.float().numpy()
    return tensor.contiguous().numpy()


def expected_numpy(array: Any) -> Any:
    return np.asarray(array).astype(np.float32) if array.dtype.name == "bfloat16" else np.asarray(array)


# ---------------------------------------------------------------------------- reading


def test_flax_to_bytes_reads_as_flax_restores_it(flax_file: Path) -> None:
    expected = reference(flax_file)
    reader = open_reader(flax_file)
    assert reader.format == "msgpack" and sniff(head(flax_file), flax_file)
    arrays = {k: v for k, v in expected.items() if isinstance(v, np.ndarray) and v.dtype.kind in "biufc" or
              (isinstance(v, np.ndarray) and v.dtype.name == "bfloat16")}  # fmt: skip
    assert list(reader.meta) == list(arrays)  # file order, the collection first
    assert {"params.Dense_0.kernel", "params.Conv_0.kernel", "params.BatchNorm_0.scale", "batch_stats.BatchNorm_0.mean",
            "batch_stats.BatchNorm_0.var", "params.Embed_0.embedding", "params.LayerNorm_0.scale",
            "extra.layers.0", "extra.layers.1.b", "extra.nested.deeper.w", "extra.big"} <= set(reader.meta)  # fmt: skip
    source = as_source(reader)
    for key, array in arrays.items():
        meta = reader.meta[key]
        assert meta.shape == array.shape, key
        assert meta.dtype == array.dtype.name, key  # numpy's and ml_dtypes' names are torch's
        for tensor in (reader.read(key), read_tensor(source, key)):
            assert tensor.dtype == getattr(torch, meta.dtype) and tuple(tensor.shape) == meta.shape, key
            assert np.array_equal(as_numpy(tensor), expected_numpy(array)), key
    source.close()
    reader.release()


def test_non_array_leaves_are_entries_not_tensors(flax_file: Path) -> None:
    reader = open_reader(flax_file)
    assert reader.entries == {
        "extra.step": "int 7",
        "extra.name": "'run-1'",
        "extra.cplx": "a Python complex number (not an array)",
        "extra.npscalar": "a NumPy float32 scalar (not an array)",
    }
    assert any("params (" in n and "batch_stats (" in n for n in reader.notes)
    assert any("1 array stored in chunks" in n for n in reader.notes)


def test_read_gives_fresh_memory_and_spans_are_contiguous(flax_file: Path) -> None:
    reader = open_reader(flax_file)
    kernel = reader.read("params.Dense_0.kernel")
    kernel.view(-1)[0] += 1  # the caller owns it: the next read is unchanged
    assert not torch.equal(kernel, reader.read("params.Dense_0.kernel"))
    span = reader.span("params.Conv_0.kernel")
    assert span is not None and span.shape == (3, 3, 2, 4) and span.stride == (24, 8, 4, 1) and span.nbytes == 72 * 4
    raw = flax_file.read_bytes()[span.offset : span.offset + span.nbytes]
    assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).reshape(3, 3, 2, 4), reader.read("params.Conv_0.kernel"))
    assert reader.span("extra.big") is None  # chunks lie apart in the file
    assert reader.span("extra.mask") is None  # bools are normalised by read()
    assert reader.span("extra.bf16") is not None


def test_source_key_reads_one_collection(flax_file: Path) -> None:
    reader = open_reader(flax_file, key="params")
    assert reader.parts == ["params"] and "Dense_0.kernel" in reader.meta and "BatchNorm_0.scale" in reader.meta
    assert not any(k.startswith(("params.", "batch_stats.", "BatchNorm_0.mean")) for k in reader.meta)
    assert reader.entries["batch_stats"] == "a map of 1 entry (2 arrays), not read (source.key is 'params')"
    deep = open_reader(flax_file, key="extra.nested")
    assert list(deep.meta) == ["deeper.w"]
    message = source_error(open_reader, flax_file, key="parms").message
    assert "no entry 'parms' at the top level" in message and "'params'" in message and "'batch_stats'" in message
    assert "expected a map of arrays" in source_error(open_reader, flax_file, key="extra.step").message


def test_msgpack_serialize_lists_become_index_keys(tmp_path: Path) -> None:
    *_, serialization = flax()
    tree = {"blocks": [{"w": np.ones((2, 2), np.float32)}, {"w": np.zeros((2, 2), np.float32)}], "b": [np.arange(3)]}
    path = tmp_path / "raw.msgpack"
    path.write_bytes(serialization.msgpack_serialize(tree))  # lists stay msgpack lists here
    reader = open_reader(path)
    assert list(reader.meta) == ["b.0", "blocks.0.w", "blocks.1.w"]  # jax sorts dict keys
    assert torch.equal(reader.read("blocks.1.w"), torch.zeros(2, 2)) and torch.equal(reader.read("b.0"), torch.arange(3))


def test_planning_reads_headers_only(tmp_path: Path) -> None:
    """Planning a 3 MB file reads under 1% of it, counted by the kernel (/proc/self/io rchar)."""
    if not Path("/proc/self/io").exists():
        pytest.skip("needs /proc/self/io")
    *_, serialization = flax()
    tree = {"params": {f"Dense_{i}": {"kernel": np.ones((512, 512), np.float32), "bias": np.ones(512, np.float32)}
                       for i in range(3)}}  # fmt: skip
    path = tmp_path / "big.msgpack"
    path.write_bytes(serialization.to_bytes(tree))

    def rchar() -> int:
        with open("/proc/self/io") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("rchar:"))

    before = rchar()
    reader = open_reader(path)
    read = rchar() - before - 200  # the read of /proc/self/io itself
    assert len(reader.meta) == 6 and read < path.stat().st_size // 100, read


def test_a_file_changed_after_planning_is_refused(tmp_path: Path) -> None:
    *_, serialization = flax()
    path = tmp_path / "w.msgpack"
    path.write_bytes(serialization.to_bytes({"w": np.ones(3, np.float32)}))
    reader = open_reader(path)
    path.write_bytes(serialization.to_bytes({"w": np.zeros(4, np.float32)}))
    assert "changed on disk" in source_error(reader.read, "w").message


def test_inspect_names_the_format(flax_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(flax_file), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["source"]["format"] == "msgpack" and out["source"]["entries"]["extra.step"] == "int 7"
    with open_source(flax_file) as src:
        assert src.description["format"] == "msgpack" and src.meta["params.Dense_0.kernel"].shape == (4, 3)


def test_an_array_of_strings_is_an_entry(tmp_path: Path) -> None:
    *_, serialization = flax()
    path = _write(tmp_path / "s.msgpack", serialization.to_bytes({"w": np.ones(2, np.float32), "words": np.array(["a", "bc"])}))
    reader = open_reader(path)
    assert list(reader.meta) == ["w"] and reader.entries == {"words": "an array [2] of str64 (not numbers, skipped)"}


def test_an_array_of_a_dtype_torch_lacks_is_refused_where_it_is_read(tmp_path: Path) -> None:
    import ml_dtypes

    *_, serialization = flax()
    path = tmp_path / "int4.msgpack"
    path.write_bytes(serialization.to_bytes({"params": {"w": np.ones(2, np.float32)},
                                              "quant": {"q": np.ones(4, dtype=ml_dtypes.int4)}}))  # fmt: skip
    message = source_error(open_reader, path).message
    assert "the array 'quant.q'" in message and "dtype 'int4'" in message and "no equivalent" in message
    assert list(open_reader(path, key="params").meta) == ["w"]  # elsewhere in the file it does not matter


# ---------------------------------------------------------------------------- detection


def other_formats(folder: Path) -> dict[str, Path]:
    """One small file of every other format remap reads (and an HDF5 file), written by its own library."""
    from safetensors.torch import save_file

    files = {}
    torch.save({"w": torch.ones(2)}, files.setdefault("torch-zip", folder / "m.pt"))
    torch.save({"w": torch.ones(2)}, files.setdefault("torch-legacy", folder / "legacy.pt"), _use_new_zipfile_serialization=False)
    save_file({"w": torch.ones(2)}, files.setdefault("safetensors", folder / "m.safetensors"))
    # a safetensors header whose length's low bytes read as msgpack: fixmap 5, fixstr 5 (0x85 0xa5)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header += b" " * (0xA585 - len(header))
    files["safetensors-0x85a5"] = folder / "tricky.safetensors"
    files["safetensors-0x85a5"].write_bytes(struct.pack("<Q", len(header)) + header + bytes(4))
    np.save(files.setdefault("npy", folder / "w.npy"), np.ones(3))
    np.savez(files.setdefault("npz", folder / "w.npz"), w=np.ones(3))
    gguf = pytest.importorskip("gguf")
    writer = gguf.GGUFWriter(str(files.setdefault("gguf", folder / "m.gguf")), "llama")
    writer.add_tensor("w", np.ones(4, np.float32))
    writer.write_header_to_file(), writer.write_kv_data_to_file(), writer.write_tensors_to_file(), writer.close()
    onnx = pytest.importorskip("onnx")
    graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["w"], ["y"])], "g", [],
                                   [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2])],
                                   [onnx.numpy_helper.from_array(np.ones(2, np.float32), "w")])  # fmt: skip
    onnx.save(onnx.helper.make_model(graph), files.setdefault("onnx", folder / "m.onnx"))
    h5py = pytest.importorskip("h5py")
    with h5py.File(files.setdefault("hdf5", folder / "m.weights.h5"), "w") as h5:
        h5["layers/dense/vars/0"] = np.ones((2, 2), np.float32)
    return files


def test_sniff_claims_flax_files_and_no_other_format(flax_file: Path, tmp_path: Path) -> None:
    renamed = tmp_path / "weights.bin"
    renamed.write_bytes(flax_file.read_bytes())
    assert sniff(head(renamed), renamed)  # by content, not suffix
    assert detect(head(renamed), renamed).name == "msgpack"
    for kind, path in other_formats(tmp_path).items():
        for name in (path, path.with_name("renamed.msgpack")):  # the suffix does not make a file msgpack
            assert not sniff(head(path), name), kind
        found = detect(head(path), path)
        assert found is None or found.name != "msgpack", kind


def test_sniff_uses_the_suffix_only_when_the_head_shows_no_array(tmp_path: Path) -> None:
    *_, serialization = flax()
    late = serialization.to_bytes({"config": {"name": "x" * 600}, "params": {"w": np.ones(2, np.float32)}})
    assert not sniff(late[:512], tmp_path / "m.bin") and sniff(late[:512], tmp_path / "m.msgpack")
    nothing = serialization.to_bytes({"step": 3})
    assert not sniff(nothing, tmp_path / "m.bin") and sniff(nothing, tmp_path / "m.msgpack")
    assert "holds no arrays" in source_error(open_reader, _write(tmp_path / "n.msgpack", nothing)).message
    assert not sniff(b"\x82\xa1a\x01\x05", tmp_path / "m.msgpack")  # a key that is an integer
    assert not sniff(b"\x81\xa0\xc0", tmp_path / "m.msgpack")  # an empty first key (how a safetensors length can start)
    assert not sniff(b"\x81\xa1a\xc7\x03\x07abc", tmp_path / "m.msgpack")  # extension code 7
    assert not sniff(b"\x81\xa1a\x01extra", tmp_path / "m.msgpack")  # bytes after the map


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# ---------------------------------------------------------------------------- hostile


def open_and_read_all(path: Path) -> None:
    """Open and read every tensor, by read() and by the streaming path; only SourceError may escape."""
    reader = open_reader(path)
    source = as_source(reader)
    for key in reader.meta:
        reader.read(key)
        read_tensor(source, key)
    source.close()


def ext(payload: bytes, code: int = 1) -> bytes:
    return b"\xc9" + struct.pack(">I", len(payload)) + struct.pack("b", code) + payload


def ndarray(shape: list[int], dtype: bytes, data: bytes, *, claimed: int | None = None) -> bytes:
    """An ndarray extension as flax writes it, its data length optionally lying."""
    dims = bytes([0x90 + len(shape)]) + b"".join(b"\xcf" + struct.pack(">Q", d) for d in shape)
    length = len(data) if claimed is None else claimed
    return ext(b"\x93" + dims + bytes([0xA0 + len(dtype)]) + dtype + b"\xc6" + struct.pack(">I", length) + data)


def fmap(**items: bytes) -> bytes:
    return b"\xdf" + struct.pack(">I", len(items)) + b"".join(bytes([0xA0 + len(k)]) + k.encode() + v for k, v in items.items())


@pytest.mark.hostile
def test_truncated_files_are_refused(flax_file: Path, tmp_path: Path) -> None:
    data = flax_file.read_bytes()
    for cut in sorted({1, 2, 9, 40, 100, len(data) // 3, len(data) // 2, len(data) - 9, len(data) - 1}):
        bad = _write(tmp_path / f"cut{cut}.msgpack", data[:cut])
        error = source_error(open_and_read_all, bad)
        assert str(bad) in str(error) and ("truncated" in error.message or "ended" in error.message), error.message


@pytest.mark.hostile
def test_bit_flips_end_in_a_source_error_or_a_clean_load(flax_file: Path, tmp_path: Path) -> None:
    data = flax_file.read_bytes()
    outcomes = {"error": 0, "loaded": 0}
    for i, offset in enumerate(range(0, len(data), max(1, len(data) // 150))):
        flipped = bytearray(data)
        flipped[offset] ^= 1 << (i % 8)
        bad = _write(tmp_path / f"flip{offset}.msgpack", bytes(flipped))
        try:
            open_and_read_all(bad)
            outcomes["loaded"] += 1
        except SourceError as exc:
            assert exc.exit_code == 3 and str(bad) in str(exc)
            outcomes["error"] += 1
        bad.unlink()
    assert outcomes["error"] > 0 and outcomes["loaded"] > 0  # flips in the weights' bytes load; in headers, fail


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("data", "expected"),
    [
        pytest.param(fmap(w=ndarray([2], b"float32", bytes(8), claimed=1 << 31)), "an array's data claims 2,147,483,648 bytes",
                     id="buffer length lies"),
        pytest.param(fmap(w=ndarray([1 << 40, 1 << 40], b"float32", bytes(16))),
                     "claims shape [1099511627776, 1099511627776] of float32", id="huge claimed shape"),
        pytest.param(fmap(w=ndarray([3], b"float32", bytes(8))), "claims shape [3] of float32 (12 bytes), but holds 8",
                     id="shape claims more than the data"),
        pytest.param(b"\x81\xa1w\xc9\xff\xff\xff\xf0\x01", "an extension claims 4,294,967,280 bytes", id="extension length lies"),
        pytest.param(b"\xdf\xff\xff\xff\xff\xa1w\xc0", "claims 4,294,967,295 items", id="map count lies"),
        pytest.param(b"\x81\xa1w\xdd\xff\xff\xff\xff", "claims 4,294,967,295 items", id="list count lies"),
        pytest.param(b"\x81\xdb\xff\xff\xff\xff", "a map key claims 4,294,967,295 bytes", id="key length lies"),
        pytest.param(b"\x81\xa1w\xc6\x7f\xff\xff\xff", "a binary value claims 2,147,483,647 bytes", id="binary length lies"),
        pytest.param(fmap(w=ext(b"\x00", code=9)), "extension of type 9, which Flax does not write", id="unknown ext code"),
        pytest.param(b"\x81\x05\xc0", "a map key is an integer, not a string", id="integer key"),
        pytest.param(b"\x81\xa2\xff\xfe\xc0", "not valid UTF-8", id="bad utf-8 key"),
        pytest.param(b"\x82\xa1w\xc0\xa1w\xc0", "holds the key 'w' twice", id="duplicate key"),
        pytest.param(b"\x81\xa1w\xc1", "0xc1, which msgpack never uses", id="byte 0xc1"),
        pytest.param(fmap(w=ndarray([2], b"float32", bytes(8))) + b"junk", "4 bytes follow the end of the top-level map",
                     id="trailing bytes"),
        pytest.param(fmap(w=ext(b"\x92\x90\xa7float32")), "expected the list (shape, dtype, data)", id="ndarray of 2 items"),
        pytest.param(fmap(w=ext(b"\x93\x91\xff\xa7float32\xc4\x00")), "shape holds an integer, expected a non-negative",
                     id="negative dim"),
        pytest.param(fmap(w=ext(b"\x93\xdc\x01\x00" + b"\x01" * 256 + b"\xa7float32\xc4\x04" + bytes(4))),
                     "claims 256 dimensions", id="too many dims"),
        pytest.param(fmap(w=fmap(__msgpack_chunked_array__=b"\xc3", shape=fmap(**{"0": b"\xce\xff\xff\xff\xff"}),
                                 chunks=fmap(**{"0": ndarray([2], b"float32", bytes(8))}))),
                     "claims shape [4294967295] (4,294,967,295 elements), but its chunks hold 2", id="chunked shape lies"),
        pytest.param(fmap(w=fmap(__msgpack_chunked_array__=b"\xc3", shape=fmap(**{"0": b"\x02"}), chunks=fmap())),
                     "its chunks are a map of 0 entries", id="chunked without chunks"),
        pytest.param(fmap(w=fmap(__msgpack_chunked_array__=b"\xc3", shape=b"\x02", chunks=fmap(), more=b"\xc0")),
                     "expected exactly", id="chunked with other keys"),
    ],
)
def test_lying_and_malformed_files_are_refused(tmp_path: Path, data: bytes, expected: str) -> None:
    path = _write(tmp_path / "bad.msgpack", data)
    error = source_error(open_and_read_all, path)
    assert expected in error.message and error.where == str(path), error.message


@pytest.mark.hostile
def test_errors_name_the_key_path_and_offset(tmp_path: Path) -> None:
    data = fmap(params=fmap(Dense_0=fmap(kernel=ndarray([3], b"float32", bytes(8)))))
    message = source_error(open_reader, _write(tmp_path / "m.msgpack", data)).message
    offset = data.index(b"\xc9")
    assert message.endswith(f"(at params.Dense_0.kernel, byte {offset})"), message


@pytest.mark.hostile
def test_bombs_fail_fast_in_bounded_memory(tmp_path: Path) -> None:
    """Deep nesting, a huge item count and lying sizes, through ``remap inspect`` in a fresh
    process with a timeout: exit 3 each, and the process's peak memory stays near torch's own."""
    bombs = {
        "deep-maps": b"\x81\xa1a" * 1_000_000 + b"\xc0",
        "deep-lists": b"\x81\xa1a" + b"\x91" * 1_000_000 + b"\xc0",
        "many-items": b"\xdf" + struct.pack(">I", MAX_ITEMS + 1) + b"\xa1a\xc0" * (MAX_ITEMS + 1),
        "huge-shape": fmap(w=ndarray([1 << 62, 1 << 62], b"bfloat16", bytes(2))),
        "lying-buffer": fmap(w=ndarray([1 << 30], b"float32", bytes(64), claimed=1 << 32 - 1)),
    }
    paths = [_write(tmp_path / f"{name}.msgpack", data) for name, data in bombs.items()]
    code = textwrap.dedent("""
        import contextlib, io, json, sys
        from remap.cli import main
        results = []
        for path in sys.argv[1:]:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                results.append([main(["inspect", path]), err.getvalue()])
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:"))
        print(json.dumps({"results": results, "rss_mb": peak}))
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code, *map(str, paths)], capture_output=True, text=True, env=env,
                          timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    messages = dict(zip(bombs, out["results"]))
    assert all(code == 3 for code, _ in messages.values()), messages
    assert f"nest more than {MAX_DEPTH} deep" in messages["deep-maps"][1]
    assert f"nest more than {MAX_DEPTH} deep" in messages["deep-lists"][1]
    assert f"more than {MAX_ITEMS:,} map entries" in messages["many-items"][1]
    assert "claims shape" in messages["huge-shape"][1] and "claims" in messages["lying-buffer"][1]
    assert out["rss_mb"] < 2000  # torch itself is a few hundred MB


@pytest.mark.hostile
def test_a_file_truncated_after_planning_is_refused_at_read(flax_file: Path, tmp_path: Path) -> None:
    path = _write(tmp_path / "m.msgpack", flax_file.read_bytes())
    reader = open_reader(path)
    reader._stamp = None  # pretend the change went unnoticed: the read itself must still fail cleanly
    reader._check_unchanged = lambda: None
    with open(path, "r+b") as f:
        f.truncate(reader.span("params.Dense_0.kernel").offset + 4)
    error = source_error(reader.read, "params.Dense_0.kernel")
    assert "truncated" in error.message


@pytest.mark.hostile
def test_inspect_exits_3_on_a_damaged_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path / "m.msgpack", fmap(w=ndarray([3], b"float32", bytes(8))))
    assert main(["inspect", str(path)]) == 3
    assert "claims shape [3] of float32" in capsys.readouterr().err


def test_no_library_but_torch_is_imported_to_plan_or_read(tmp_path: Path) -> None:
    """The reader needs no extra: opening and reading a file in a fresh process imports
    neither msgpack nor ml_dtypes, jax or flax."""
    path = _write(tmp_path / "w.msgpack", fmap(params=fmap(w=ndarray([2], b"float32", struct.pack("<2f", 1.5, -2)))))
    code = textwrap.dedent("""
        import sys
        from pathlib import Path
        from remap.sources.msgpack_reader import open_reader
        print(open_reader(Path(sys.argv[1])).read("params.w").tolist())
        print(sorted(n for n in ("msgpack", "jax", "flax", "ml_dtypes") if n in sys.modules))  # (torch brings numpy)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["[1.5, -2.0]", "[]"] and msgpack_reader.EXTRA is None
