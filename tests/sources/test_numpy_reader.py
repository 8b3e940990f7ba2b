"""NumPy ``.npz`` / ``.npy`` sources (issue 14): files written by numpy itself, read lazily,
compared with ``np.load``; hostile files end in a SourceError (exit 3) or a clean load."""

from __future__ import annotations

import struct
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from remap.errors import SourceError
from remap.loading.streaming import read_tensor
from remap.sources import numpy_reader
from remap.sources.numpy_reader import open_reader, sniff
from remap.sources.readers import _describe, _FileSource

np = pytest.importorskip("numpy")

#: big_vision / timm JAX ViT style names, and the dtypes the issue names (plus the awkward ones)
ARRAYS = {
    "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel": np.arange(12, dtype=np.float32).reshape(3, 4) / 7,
    "Transformer/encoderblock_0/MlpBlock_3/Dense_0/bias": np.linspace(-1, 1, 4, dtype=np.float32),
    "Transformer/encoder_norm/scale": np.ones(4, dtype=np.float16) * 1.5,
    "embedding/kernel": np.arange(2 * 3 * 1 * 4, dtype=np.float32).reshape(2, 3, 1, 4),
    "pos_ids": np.arange(5, dtype=np.int64),
    "mask": np.array([True, False, True]),
    "big_endian": np.arange(6, dtype=">f4").reshape(2, 3),
    "fortran": np.asfortranarray(np.arange(24, dtype=np.float64).reshape(2, 3, 4)),
    "complex_be": np.array([1 + 2j, -3.5j], dtype=">c8"),
    "small_ints": np.array([[1, 2], [3, 250]], dtype=np.uint8),
    "u16": np.array([1, 65535], dtype=np.uint16),
    "scalar": np.float32(3.25),
    "empty": np.zeros((0, 3), dtype=np.float32),
}
TORCH_NAMES = {
    "float32": "float32", "float16": "float16", "float64": "float64", "int64": "int64", "bool": "bool",
    "complex64": "complex64", "uint8": "uint8", "uint16": "uint16",
}  # fmt: skip


def dotted(name: str) -> str:
    return name.replace("/", ".")


def head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(512)


def source_error(fn, *args, **kwargs) -> SourceError:
    with pytest.raises(SourceError) as info:
        fn(*args, **kwargs)
    assert info.value.exit_code == 3
    return info.value


def as_source(reader) -> _FileSource:
    """The reader as open_source would wrap it, so that streaming reads go through span() where it has one."""
    return _FileSource(dict.fromkeys(reader.meta, reader), dict(reader.meta), _describe("file", format=reader.format), str(reader.path))


@pytest.fixture(params=["savez", "savez_compressed"])
def npz(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    path = tmp_path / "vit.npz"
    getattr(np, request.param)(path, **ARRAYS)
    return path


def check_against_numpy(path: Path, reader) -> None:
    """meta and read() (and the streaming read through span()) equal what np.load gives."""
    with np.load(path, allow_pickle=False) as ref:
        expected = {dotted(name.removesuffix(".npy")): ref[name] for name in ref.files}
    assert list(reader.meta) == list(expected)
    source = as_source(reader)
    for key, array in expected.items():
        meta = reader.meta[key]
        assert meta.shape == tuple(array.shape), key
        assert meta.dtype == TORCH_NAMES[array.dtype.name], key
        for tensor in (reader.read(key), read_tensor(source, key)):
            assert tensor.dtype == getattr(torch, meta.dtype), key
            assert tuple(tensor.shape) == meta.shape, key
            assert np.array_equal(tensor.contiguous().numpy(), array), key
        got = reader.read(key)
        assert got.is_contiguous()
        if got.numel():  # owns its memory: writing to it leaves the file and the next read alone
            got.view(-1)[0] = 0 if meta.dtype != "bool" else not bool(got.view(-1)[0])
            assert np.array_equal(reader.read(key).numpy(), array), key
    source.close()
    reader.release()


# ---------------------------------------------------------------------------- reading


def test_an_npz_reads_as_numpy_does(npz: Path) -> None:
    assert sniff(head(npz), npz)
    reader = open_reader(npz, key=None, trust_pickle=False)
    assert reader.format == "npz"
    assert "Transformer.encoderblock_0.MlpBlock_3.Dense_0.kernel" in reader.meta
    check_against_numpy(npz, reader)


def test_metadata_reads_no_tensor_data(npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(numpy_reader, "_fill", lambda *a: calls.append(a))
    reader = open_reader(npz, key=None, trust_pickle=False)
    assert len(reader.meta) == len(ARRAYS) and calls == []


def test_stored_members_map_in_place_and_compressed_ones_do_not(tmp_path: Path) -> None:
    np.savez(tmp_path / "s.npz", w=np.ones((2, 3), dtype=np.float32), be=np.ones(2, dtype=">f4"))
    np.savez_compressed(tmp_path / "c.npz", w=np.ones((2, 3), dtype=np.float32))
    stored = open_reader(tmp_path / "s.npz", key=None, trust_pickle=False)
    span = stored.span("w")
    assert span is not None and span.nbytes == 24 and span.shape == (2, 3) and span.stride == (3, 1)
    assert stored.span("be") is None
    assert open_reader(tmp_path / "c.npz", key=None, trust_pickle=False).span("w") is None


@pytest.mark.parametrize("name", ["scalar", "fortran", "big_endian", "mask", "embedding/kernel", "empty", "u16"])
def test_a_bare_npy_is_one_tensor_named_by_its_stem(tmp_path: Path, name: str) -> None:
    path = tmp_path / "patch_embed.weight.npy"
    np.save(path, ARRAYS[name])
    assert sniff(head(path), path)
    reader = open_reader(path, key=None, trust_pickle=False)
    assert reader.format == "npy" and list(reader.meta) == ["patch_embed.weight"]
    expected = np.load(path, allow_pickle=False)
    assert reader.meta["patch_embed.weight"].shape == expected.shape
    for tensor in (reader.read("patch_embed.weight"), read_tensor(as_source(reader), "patch_embed.weight")):
        assert np.array_equal(tensor.contiguous().numpy(), expected)
        assert tensor.dtype == getattr(torch, TORCH_NAMES[expected.dtype.name])


def test_sniff_tells_npz_from_torch_zips_and_others(tmp_path: Path) -> None:
    torch.save({"w": torch.ones(2)}, tmp_path / "model.pt")
    (tmp_path / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    np.savez(tmp_path / "weights.bin", w=np.ones(2))  # np.savez adds .npz
    np.savez(tmp_path / "empty.npz")
    assert not sniff(head(tmp_path / "model.pt"), tmp_path / "model.pt")
    assert not sniff(head(tmp_path / "model.safetensors"), tmp_path / "model.safetensors")
    assert sniff(head(tmp_path / "weights.bin.npz"), tmp_path / "renamed.bin")  # by content, not suffix
    assert sniff(head(tmp_path / "empty.npz"), tmp_path / "empty.npz")
    assert "holds no arrays" in source_error(open_reader, tmp_path / "empty.npz", key=None, trust_pickle=False).message


def test_a_key_does_not_apply(npz: Path) -> None:
    error = source_error(open_reader, npz, key="params", trust_pickle=False)
    assert "source.key 'params' does not apply" in error.message and error.where == str(npz)


def test_without_numpy_the_error_names_the_extra(npz: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "numpy", None)
    error = source_error(open_reader, npz, key=None, trust_pickle=False)
    assert "pip install 'remap[numpy]'" in error.message and error.where == str(npz)


def test_a_file_changed_after_planning_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.npz"
    np.savez(path, w=np.ones(3))
    reader = open_reader(path, key=None, trust_pickle=False)
    np.savez(path, w=np.zeros(3))
    assert "changed on disk" in source_error(reader.read, "w").message


# ---------------------------------------------------------------------------- refused


class WritesAFile:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


def test_an_object_array_is_refused_and_never_unpickled(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    np.savez(tmp_path / "o.npz", w=np.ones(2), obj=np.array([WritesAFile(str(marker))], dtype=object))
    np.save(tmp_path / "o.npy", np.array([WritesAFile(str(marker))], dtype=object), allow_pickle=True)
    for path in (tmp_path / "o.npz", tmp_path / "o.npy"):
        error = source_error(open_reader, path, key=None, trust_pickle=True)
        assert "object array" in error.message and "unpickle" in error.message
    assert not marker.exists()


def test_bfloat16_saved_by_numpy_is_refused_not_guessed(tmp_path: Path) -> None:
    ml_dtypes = pytest.importorskip("ml_dtypes")
    np.savez(tmp_path / "bf.npz", w=np.ones(3, dtype=ml_dtypes.bfloat16))
    error = source_error(open_reader, tmp_path / "bf.npz", key=None, trust_pickle=False)
    assert "(dtype '|V2')" in error.message and "bfloat16" in error.message and "member 'w.npy'" in error.message


@pytest.mark.parametrize(
    ("array", "message"),
    [
        (np.array(["a", "b"]), "no torch equivalent"),
        (np.zeros(2, dtype=[("x", "<f4"), ("y", "<i4")]), "structured dtype"),
        (np.array(["2020-01-01"], dtype="datetime64[D]"), "no torch equivalent"),
    ],
)
def test_non_numeric_arrays_are_refused(tmp_path: Path, array, message: str) -> None:
    np.savez(tmp_path / "x.npz", x=array)
    assert message in source_error(open_reader, tmp_path / "x.npz", key=None, trust_pickle=False).message


def test_a_zip_of_other_files_and_colliding_names_are_refused(tmp_path: Path) -> None:
    with zipfile.ZipFile(tmp_path / "mixed.npz", "w") as z:
        z.writestr("w.npy", npy_bytes(np.ones(2)))
        z.writestr("notes.txt", "hello")
    assert "not .npy arrays ('notes.txt')" in source_error(open_reader, tmp_path / "mixed.npz", key=None, trust_pickle=False).message
    with zipfile.ZipFile(tmp_path / "clash.npz", "w") as z:
        z.writestr("a/b.npy", npy_bytes(np.ones(2)))
        z.writestr("a.b.npy", npy_bytes(np.zeros(2)))
    message = source_error(open_reader, tmp_path / "clash.npz", key=None, trust_pickle=False).message
    assert "'a/b.npy' and 'a.b.npy' both name the key 'a.b'" in message


# ---------------------------------------------------------------------------- hostile


def npy_bytes(array, *, shape=None) -> bytes:
    """An .npy of ``array``, its header claiming ``shape`` when given (a lying header)."""
    import io

    from numpy.lib import format as npy

    buf = io.BytesIO()
    header = npy.header_data_from_array_1_0(array)
    if shape is not None:
        header["shape"] = shape
    npy.write_array_header_1_0(buf, header)
    buf.write(array.tobytes())
    return buf.getvalue()


def open_and_read_all(path: Path) -> None:
    """Open and read every tensor, by read() and by the streaming path; only SourceError may escape."""
    reader = open_reader(path, key=None, trust_pickle=False)
    source = as_source(reader)
    for key in reader.meta:
        reader.read(key)
        read_tensor(source, key)
    source.close()


@pytest.mark.hostile
@pytest.mark.parametrize("suffix", ["npz", "npz-compressed", "npy"])
def test_truncated_files_are_refused(tmp_path: Path, suffix: str) -> None:
    good = tmp_path / f"good.{suffix[:3]}"
    if suffix == "npy":
        np.save(good, ARRAYS["fortran"])
    else:
        (np.savez if suffix == "npz" else np.savez_compressed)(good, **ARRAYS)
    data = good.read_bytes()
    for cut in sorted({1, 7, 20, 64, len(data) // 3, len(data) // 2, len(data) - 30, len(data) - 1}):
        bad = tmp_path / f"cut{cut}.{suffix[:3]}"
        bad.write_bytes(data[:cut])
        error = source_error(open_and_read_all, bad)
        assert str(bad) in str(error)


@pytest.mark.hostile
@pytest.mark.parametrize("suffix", ["npz", "npz-compressed", "npy"])
def test_bit_flips_end_in_a_source_error_or_a_clean_load(tmp_path: Path, suffix: str) -> None:
    good = tmp_path / f"good.{suffix[:3]}"
    arrays = {k: ARRAYS[k] for k in ("Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel", "mask", "big_endian", "fortran")}
    if suffix == "npy":
        np.save(good, ARRAYS["Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel"])
    else:
        (np.savez if suffix == "npz" else np.savez_compressed)(good, **arrays)
    data = good.read_bytes()
    outcomes = {"error": 0, "loaded": 0}
    for i, offset in enumerate(range(0, len(data), max(1, len(data) // 97))):
        flipped = bytearray(data)
        flipped[offset] ^= 1 << (i % 8)
        bad = tmp_path / f"flip{offset}.{suffix[:3]}"
        bad.write_bytes(bytes(flipped))
        try:
            open_and_read_all(bad)
            outcomes["loaded"] += 1
        except SourceError as exc:
            assert exc.exit_code == 3 and str(bad) in str(exc)
            outcomes["error"] += 1
        bad.unlink()
    assert outcomes["error"] > 0


@pytest.mark.hostile
def test_a_header_claiming_more_than_the_member_holds_is_refused_before_allocating(tmp_path: Path) -> None:
    lie = npy_bytes(np.ones(4, dtype=np.float32), shape=(1_000_000_000, 1_000_000))  # 4 PB
    with zipfile.ZipFile(tmp_path / "lie.npz", "w") as z:
        z.writestr("w.npy", lie)
    (tmp_path / "lie.npy").write_bytes(lie)
    for path, what in ((tmp_path / "lie.npz", "member 'w.npy'"), (tmp_path / "lie.npy", "the array 'lie'")):
        message = source_error(open_reader, path, key=None, trust_pickle=False).message
        assert what in message and "claims shape [1000000000, 1000000] of <f4 (4000000000000000 bytes)" in message
        assert "but 16 bytes of data follow the header" in message
    short = npy_bytes(np.ones(4, dtype=np.float32), shape=(2,))  # claims less than it holds
    (tmp_path / "short.npy").write_bytes(short)
    assert "8 bytes), but 16 bytes" in source_error(open_reader, tmp_path / "short.npy", key=None, trust_pickle=False).message


@pytest.mark.hostile
def test_a_member_claiming_more_than_deflate_can_produce_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("w.npy", npy_bytes(np.ones(4, dtype=np.float32)))
    data = bytearray(path.read_bytes())
    central = data.rindex(b"PK\x01\x02")
    struct.pack_into("<I", data, central + 24, 0xFFFF_FFF0)  # uncompressed size: 4 GB
    path.write_bytes(bytes(data))
    message = source_error(open_reader, path, key=None, trust_pickle=False).message
    assert "more than deflate can produce" in message


@pytest.mark.hostile
def test_a_huge_header_is_refused(tmp_path: Path) -> None:
    body = b"{'descr': '<f4', 'fortran_order': False, 'shape': (1,), " + b" " * 200_000 + b"}\n"
    (tmp_path / "h.npy").write_bytes(b"\x93NUMPY\x02\x00" + struct.pack("<I", len(body)) + body + bytes(4))
    assert "not a valid .npy header" in source_error(open_reader, tmp_path / "h.npy", key=None, trust_pickle=False).message


@pytest.mark.hostile
def test_sniff_decides_from_the_head_alone(tmp_path: Path) -> None:
    # the paths do not exist: sniff never opens them
    assert sniff(b"\x93NUMPY\x01\x00", tmp_path / "missing.npy")
    assert not sniff(b"PK\x03\x04", tmp_path / "missing.npz")
