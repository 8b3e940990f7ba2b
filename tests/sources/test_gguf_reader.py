"""GGUF reader (issue 14): files written by the ``gguf`` package's own GGUFWriter, read back
through ``remap.sources.gguf_reader`` and compared with what the ``gguf`` package reads
(``GGUFReader`` + ``gguf.quants.dequantize``) and with the arrays that were written.
Hostile files (truncated, bit-flipped, lying) must end in SourceError or a clean load."""

from __future__ import annotations

import json
import math
import os
import struct
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

np = pytest.importorskip("numpy")
gguf = pytest.importorskip("gguf")

from gguf import GGMLQuantizationType as Q  # noqa: E402

from remap.errors import SourceError  # noqa: E402
from remap.sources import gguf_reader as G  # noqa: E402
from remap.sources.readers import _Reader  # noqa: E402

TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64"}  # fmt: skip


def write_gguf(path: Path, tensors: dict[str, Any], *, kv: dict[str, Any] | None = None,
               endianess: Any = None, arch: str = "llama") -> Path:  # fmt: skip
    """``tensors``: name -> array (stored as its dtype) or (packed bytes, GGML type)."""
    extra = {} if endianess is None else {"endianess": endianess}
    w = gguf.GGUFWriter(str(path), arch, **extra)
    if kv and "general.alignment" in kv:
        w.data_alignment = kv["general.alignment"]  # the writer pads by this attribute, not by the key
    for key, value in (kv or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, list):
            w.add_array(key, value)
        else:
            w.add_uint32(key, value)
    for name, value in tensors.items():
        if isinstance(value, tuple):
            w.add_tensor(name, value[0], raw_dtype=value[1])
        else:
            w.add_tensor(name, value)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def open_gguf(path: Path, **kw: Any) -> Any:
    return G.open_reader(path, key=None, trust_pickle=False, **kw)


def library_view(path: Path) -> dict[str, tuple[tuple[int, ...], str, np.ndarray]]:
    """What the gguf package itself reads: name -> (PyTorch-order shape, GGML type, float/plain values)."""
    reader = gguf.GGUFReader(str(path))
    out = {}
    for t in reader.tensors:
        shape = tuple(reversed([int(d) for d in t.shape]))
        if t.tensor_type.name in TORCH_DTYPES and t.tensor_type != Q.BF16:
            values = np.array(t.data).reshape(shape)
        else:
            with np.errstate(all="ignore"):  # random k-quant scales may make NaN
                values = np.asarray(gguf.quants.dequantize(np.array(t.data), t.tensor_type), dtype=np.float32)
            values = values.reshape(shape)
        out[t.name] = (shape, t.tensor_type.name, values)
    return out


def check_reader(reader: _Reader, path: Path, dequantize_to: str = "float32") -> None:
    """The _Reader contract, against the gguf package's own reading of the same file."""
    assert isinstance(reader, _Reader)
    lib = library_view(path)
    assert list(reader.meta) == list(lib)  # file order
    for key, (shape, qtype, values) in lib.items():
        meta = reader.meta[key]
        assert meta.shape == shape, key
        assert meta.dtype == TORCH_DTYPES.get(qtype, dequantize_to), key
        got = reader.read(key)
        assert isinstance(got, torch.Tensor) and got.is_contiguous()
        assert tuple(got.shape) == shape and str(got.dtype) == f"torch.{meta.dtype}"
        assert got.untyped_storage().nbytes() == got.numel() * got.element_size()  # owns its memory, nothing more
        if qtype in TORCH_DTYPES and qtype != "BF16":
            np.testing.assert_array_equal(got.numpy(), values)
        else:
            expected = torch.from_numpy(values).to(got.dtype)
            assert torch.equal(got, expected) or torch.allclose(got.float(), expected.float(), equal_nan=True, atol=0, rtol=0)
        if qtype in TORCH_DTYPES:
            assert key not in reader.entries
            span = reader.span(key)
            assert span is not None and span.shape == shape and span.dtype == meta.dtype
            with open(path, "rb") as f:
                f.seek(span.offset)
                raw = bytearray(f.read(span.nbytes))
            assert torch.equal(torch.frombuffer(raw, dtype=got.dtype).reshape(shape), got) if raw else got.numel() == 0
        else:
            assert reader.entries[key] == f"{qtype}, dequantized to {dequantize_to} at read"
            assert reader.span(key) is None
    reader.release()
    reader.release()  # twice is harmless
    if lib:  # a read after release opens the file again
        key = next(iter(lib))
        assert tuple(reader.read(key).shape) == lib[key][0]
        reader.release()


# ---------------------------------------------------------------------------- reading


@pytest.fixture
def rng() -> Any:
    return np.random.default_rng(14)


def test_sniff(tmp_path: Path, rng: Any) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"w": rng.standard_normal((2, 32)).astype(np.float32)})
    assert G.sniff(path.read_bytes()[:512], path)
    assert not G.sniff(b"\x08\x00\x00\x00\x00\x00\x00\x00{}", tmp_path / "x.gguf")  # a name is not enough
    assert not G.sniff(b"GGU", path)
    assert G.FORMAT == "gguf" and G.EXTRA == "gguf"


def test_plain_types_read_as_stored(tmp_path: Path, rng: Any) -> None:
    a = rng.standard_normal((3, 5, 7)).astype(np.float32)
    tensors = {
        "f32": a, "f16": a.astype(np.float16), "f64": a.astype(np.float64).reshape(15, 7),
        "i8": rng.integers(-128, 127, (4, 6)).astype(np.int8), "i16": rng.integers(-999, 999, (6,)).astype(np.int16),
        "i32": rng.integers(-(2**31), 2**31 - 1, (2, 2, 2, 2)).astype(np.int32),
        "i64": rng.integers(-(2**62), 2**62, (5,)).astype(np.int64),
        "bf16": (gguf.quants.quantize(a.reshape(15, 7), Q.BF16), Q.BF16),
    }  # fmt: skip
    path = write_gguf(tmp_path / "plain.gguf", tensors)
    reader = open_gguf(path)
    check_reader(reader, path)
    for name, value in tensors.items():
        if name != "bf16":
            np.testing.assert_array_equal(reader.read(name).numpy(), value)
    assert torch.equal(reader.read("bf16"), torch.from_numpy(a.reshape(15, 7)).to(torch.bfloat16))
    assert reader.entries == {}


@pytest.mark.parametrize("qtype", [Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1])
def test_quantized_dequantized_at_read(tmp_path: Path, rng: Any, qtype: Any) -> None:
    a = rng.standard_normal((6, 64)).astype(np.float32)
    path = write_gguf(tmp_path / "q.gguf", {"blk.0.w": (gguf.quants.quantize(a, qtype), qtype), "norm": a[0]})
    reader = open_gguf(path)
    assert reader.meta["blk.0.w"] == G.TensorMeta((6, 64), "float32")
    assert reader.entries == {"blk.0.w": f"{qtype.name}, dequantized to float32 at read"}
    assert any(qtype.name in n and "dequantized to float32" in n for n in reader.notes)
    check_reader(reader, path)
    got = reader.read("blk.0.w").numpy()
    bits = {Q.Q8_0: 8, Q.Q4_0: 4, Q.Q4_1: 4, Q.Q5_0: 5, Q.Q5_1: 5}[qtype]
    step = np.abs(a).reshape(6, 2, 32).max(-1, keepdims=True) / 2 ** (bits - 1)  # one block's quantization step
    assert (np.abs(got - a).reshape(6, 2, 32) <= step * 1.01 + 1e-6).all()  # within quantization tolerance


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K, Q.Q2_K, Q.Q3_K, Q.Q5_K, Q.IQ4_NL])
def test_k_quants_match_the_library(tmp_path: Path, rng: Any, qtype: Any) -> None:
    """gguf cannot quantize to k-quants; packed bytes (with sane f16 scales) are written as is."""
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, cols = 3, 2 * block
    packed = rng.integers(0, 256, (rows, cols // block * type_size), dtype=np.uint8)
    packed.reshape(-1, type_size)[:, :2] = np.frombuffer(np.float16(0.01).tobytes(), np.uint8)  # d (first f16)
    path = write_gguf(tmp_path / "k.gguf", {"ffn_down.weight": (packed, qtype)})
    reader = open_gguf(path)
    assert reader.meta["ffn_down.weight"].shape == (rows, cols)
    check_reader(reader, path)


def test_torch_linear_weight_keeps_its_shape(tmp_path: Path) -> None:
    """As llama.cpp's convert scripts write it: the (out, in) array as is, ne = [in, out]."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 8)
    path = write_gguf(tmp_path / "lin.gguf", {
        "fc.weight": linear.weight.detach().numpy(), "fc.bias": linear.bias.detach().numpy(),
        "fc_q.weight": (gguf.quants.quantize(linear.weight.detach().numpy(), Q.Q8_0), Q.Q8_0),
    })  # fmt: skip
    assert [int(d) for d in gguf.GGUFReader(str(path)).tensors[0].shape] == [64, 8]  # GGUF's own order
    reader = open_gguf(path)
    assert reader.meta["fc.weight"].shape == (8, 64) and reader.meta["fc_q.weight"].shape == (8, 64)
    assert torch.equal(reader.read("fc.weight"), linear.weight.detach())
    target = torch.nn.Linear(64, 8)
    target.load_state_dict({"weight": reader.read("fc_q.weight"), "bias": reader.read("fc.bias")})
    weight = linear.weight.detach()
    assert torch.allclose(target.weight.detach(), weight, atol=float(weight.abs().max()) / 100)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_dequantize_to(tmp_path: Path, rng: Any, dtype: str) -> None:
    a = rng.standard_normal((4, 96)).astype(np.float32)
    path = write_gguf(tmp_path / "q.gguf", {"w": (gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0), "b": a[0]})
    reader = open_gguf(path, dequantize_to=dtype)
    assert reader.meta["w"].dtype == dtype and reader.meta["b"].dtype == "float32"
    check_reader(reader, path, dequantize_to=dtype)
    with pytest.raises(SourceError, match="dequantize_to"):
        open_gguf(path, dequantize_to="int8")


def test_dequantized_in_chunks(tmp_path: Path, rng: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    a = rng.standard_normal((37, 64)).astype(np.float32)
    path = write_gguf(tmp_path / "q.gguf", {"w": (gguf.quants.quantize(a, Q.Q4_0), Q.Q4_0)})
    whole = open_gguf(path).read("w")
    monkeypatch.setattr(G, "DEQUANT_CHUNK", 64 * 5)  # 5 rows at a time, the last chunk short
    assert torch.equal(open_gguf(path).read("w"), whole)
    check_reader(open_gguf(path), path)


def test_metadata_and_notes(tmp_path: Path, rng: Any) -> None:
    kv = {"general.name": "tiny llama", "llama.block_count": 2, "tokenizer.ggml.tokens": ["<s>", "a", "b"] * 100,
          "llama.rope.dimension_sections": [1, 2, 3], "tokenizer.chat_template": "x" * 5000}  # fmt: skip
    path = write_gguf(tmp_path / "m.gguf", {"w": rng.standard_normal((2, 32)).astype(np.float32)}, kv=kv)
    reader = open_gguf(path)
    md = reader.metadata
    assert md["general.architecture"] == "llama" and md["general.name"] == "tiny llama"
    assert md["llama.block_count"] == 2 and md["llama.rope.dimension_sections"] == [1, 2, 3]
    assert md["tokenizer.ggml.tokens"] == "array of 300 STRING"  # described, not kept
    assert len(md["tokenizer.chat_template"]) <= 200
    assert "architecture llama, tiny llama" in reader.notes


def test_big_endian_file(tmp_path: Path, rng: Any) -> None:
    a = rng.standard_normal((4, 32)).astype(np.float32)
    tensors = {"w": a, "h": a.astype(np.float16), "i": np.arange(6, dtype=np.int64).reshape(2, 3)}
    path = write_gguf(tmp_path / "be.gguf", tensors, endianess=gguf.GGUFEndian.BIG)
    reader = open_gguf(path)
    for name, value in tensors.items():
        np.testing.assert_array_equal(reader.read(name).numpy(), value)
        assert reader.span(name) is None  # bytes on disk are not native
    assert any("big-endian" in n for n in reader.notes)
    path = write_gguf(tmp_path / "beq.gguf", {"q": (gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0)}, endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(SourceError, match="big-endian"):
        open_gguf(path)


def test_key_does_not_apply_and_missing_library(tmp_path: Path, rng: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_gguf(tmp_path / "m.gguf", {"w": rng.standard_normal((2, 32)).astype(np.float32)})
    with pytest.raises(SourceError, match="does not apply to a GGUF file") as err:
        G.open_reader(path, key="model", trust_pickle=False)
    assert err.value.exit_code == 3
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    with pytest.raises(SourceError, match=r"needs the 'gguf' package: pip install 'remap\[gguf\]'") as err:
        open_gguf(path)
    assert err.value.exit_code == 3 and err.value.where == str(path)


def test_no_data_read_at_open(tmp_path: Path, rng: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Metadata only at construction: bytes read while opening stay within the header's first chunk."""
    big = rng.standard_normal((512, 1024)).astype(np.float32)  # 2 MiB of data after a small header
    path = write_gguf(tmp_path / "m.gguf", {"a": big, "b": big})
    read = []
    real_open = open

    class Counting:
        def __init__(self, f: Any) -> None:
            self.f = f

        def read(self, n: int = -1) -> bytes:
            out = self.f.read(n)
            read.append(len(out))
            return out

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

        def __enter__(self) -> Any:
            return self

        def __exit__(self, *exc: Any) -> None:
            self.f.close()

    monkeypatch.setattr(G, "open", lambda p, mode="r": Counting(real_open(p, mode)), raising=False)
    reader = open_gguf(path)
    assert reader.meta["a"].shape == (512, 1024)
    header_end = min(i.offset for i in reader.tensors.values())
    assert sum(read) <= header_end + G._Cursor.CHUNK and header_end < 4096
    assert sum(read) < os.path.getsize(path) / 2


def test_file_changed_after_open(tmp_path: Path, rng: Any) -> None:
    a = rng.standard_normal((2, 32)).astype(np.float32)
    path = write_gguf(tmp_path / "m.gguf", {"w": a})
    reader = open_gguf(path)
    write_gguf(path, {"w": a + 1})
    with pytest.raises(SourceError, match="changed on disk"):
        reader.read("w")


# ---------------------------------------------------------------------------- hostile


def _field_offsets(path: Path) -> dict[str, int]:
    """Byte offsets of a few header fields of the first tensor, from the library's own reader."""
    reader = gguf.GGUFReader(str(path))
    t = reader.tensors[0]
    start = t.field.offset
    name = len(t.name.encode())
    n_dims = start + 8 + name
    dims = n_dims + 4
    type_at = dims + 8 * len(t.shape)
    return {"name_len": start, "n_dims": n_dims, "dims": dims, "type": type_at, "offset": type_at + 4,
            "data": int(t.data_offset), "first_kv": 24}  # fmt: skip


def _patched(path: Path, dst: Path, at: int, fmt: str, value: int) -> Path:
    data = bytearray(path.read_bytes())
    struct.pack_into(fmt, data, at, value)
    dst.write_bytes(bytes(data))
    return dst


def load_all(path: Path) -> str:
    """"ok" or the SourceError's message; any other exception fails the test."""
    try:
        reader = open_gguf(path)
        for key in reader.meta:
            t = reader.read(key)
            assert tuple(t.shape) == reader.meta[key].shape and str(t.dtype) == f"torch.{reader.meta[key].dtype}"
        reader.release()
        return "ok"
    except SourceError as exc:
        assert exc.exit_code == 3 and str(exc)
        return exc.message


@pytest.fixture
def sample(tmp_path: Path) -> Path:
    rng = np.random.default_rng(3)
    a = rng.standard_normal((4, 64)).astype(np.float32)
    return write_gguf(tmp_path / "sample.gguf", {
        "blk.0.w": a, "blk.0.q": (gguf.quants.quantize(a, Q.Q8_0), Q.Q8_0), "blk.0.h": a[0].astype(np.float16),
    }, kv={"general.name": "s", "tokenizer.ggml.tokens": ["a", "bb", "ccc"], "llama.block_count": 1})  # fmt: skip


@pytest.mark.hostile
def test_truncated_everywhere(sample: Path, tmp_path: Path) -> None:
    data = sample.read_bytes()
    cut = tmp_path / "cut.gguf"
    for n in [*range(0, 700, 3), *range(700, len(data), 37), len(data) - 1]:
        cut.write_bytes(data[:n])
        message = load_all(cut)
        assert message != "ok", n  # every tensor ends at or near the end: any cut is noticed
        assert "GGUF" in message or "truncated" in message or "past the end" in message, (n, message)


@pytest.mark.hostile
def test_bit_flips(sample: Path, tmp_path: Path) -> None:
    data = sample.read_bytes()
    header_end = min(i.offset for i in open_gguf(sample).tensors.values())
    rng = np.random.default_rng(0)
    offsets = [*range(0, header_end), *rng.integers(header_end, len(data), 60).tolist()]
    flipped = tmp_path / "flip.gguf"
    outcomes: dict[str, int] = {}
    start = time.perf_counter()
    for at in offsets:
        for bit in (0, 7):
            bad = bytearray(data)
            bad[at] ^= 1 << bit
            flipped.write_bytes(bytes(bad))
            outcome = load_all(flipped)
            outcomes["ok" if outcome == "ok" else "error"] = outcomes.get("ok" if outcome == "ok" else "error", 0) + 1
    assert outcomes.get("error", 0) > len(offsets) / 2  # most header flips are caught
    assert time.perf_counter() - start < 60  # no hang: each open is bounded by the file's size


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("field", "fmt", "value", "expected"),
    [
        ("tensor_count", "<Q", 2**62, "more than the"),
        ("kv_count", "<Q", 2**40, "more than the"),
        ("first_kv", "<Q", 2**63, "claims"),  # the first key's length
        ("name_len", "<Q", 10**12, "claims"),
        ("n_dims", "<I", 2**31, "dimensions"),
        ("dims", "<Q", 2**40, "past the end|offset"),
        ("dims", "<Q", 2**63 - 1, "larger than any tensor|block size|past the end"),
        ("type", "<I", 9999, "type id 9999"),
        ("offset", "<Q", 2**50, "data offset"),
        ("version", "<I", 1, "version 1"),
        ("version", "<I", 77, "version 77"),
        ("magic", "<I", 0, "not a GGUF file"),
    ],
)
def test_lying_claims(sample: Path, tmp_path: Path, field: str, fmt: str, value: int, expected: str) -> None:
    offsets = {**_field_offsets(sample), "tensor_count": 8, "kv_count": 16, "version": 4, "magic": 0}
    bad = _patched(sample, tmp_path / "lie.gguf", offsets[field], fmt, value)
    start = time.perf_counter()
    with pytest.raises(SourceError, match=expected) as err:
        open_gguf(bad)
    assert time.perf_counter() - start < 2
    assert err.value.exit_code == 3 and err.value.where == str(bad)


@pytest.mark.hostile
def test_lying_array_length(tmp_path: Path) -> None:
    """An array claiming 2**61 strings: GGUFReader would loop; here it is refused at once."""
    path = write_gguf(tmp_path / "a.gguf", {"w": np.zeros((2, 32), np.float32)}, kv={"tokenizer.ggml.tokens": ["a"] * 4})
    data = path.read_bytes()
    key = b"tokenizer.ggml.tokens"
    at = data.index(key) + len(key) + 4 + 4  # after the key, the value type (ARRAY) and the item type (STRING)
    assert struct.unpack_from("<Q", data, at)[0] == 4
    bad = _patched(path, tmp_path / "b.gguf", at, "<Q", 2**61)
    with pytest.raises(SourceError, match=r"claims 2,305,843,009,213,693,952 items of type STRING"):
        open_gguf(bad)
    bad = _patched(path, tmp_path / "c.gguf", data.index(b"tokenizer.ggml.tokens") + len(key), "<I", 99)
    with pytest.raises(SourceError, match="value type 99"):
        open_gguf(bad)


@pytest.mark.hostile
def test_bad_alignment_and_duplicates(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "a.gguf", {"w": np.zeros((2, 32), np.float32)}, kv={"general.alignment": 64})
    assert load_all(path) == "ok"
    data = path.read_bytes()
    at = data.index(b"general.alignment") + len(b"general.alignment") + 4
    with pytest.raises(SourceError, match="power of two"):
        open_gguf(_patched(path, tmp_path / "b.gguf", at, "<I", 48))
    with pytest.raises(SourceError, match="power of two"):
        open_gguf(_patched(path, tmp_path / "c.gguf", at, "<I", 0))
    two = write_gguf(tmp_path / "d.gguf", {"wa": np.zeros((2, 32), np.float32), "wb": np.zeros((2, 32), np.float32)})
    data = two.read_bytes().replace(b"wb", b"wa")
    (tmp_path / "e.gguf").write_bytes(data)
    with pytest.raises(SourceError, match="appears twice"):
        open_gguf(tmp_path / "e.gguf")


@pytest.mark.hostile
def test_truncated_after_open(sample: Path) -> None:
    reader = open_gguf(sample)
    size = os.path.getsize(sample)
    os.truncate(sample, size - 100)
    with pytest.raises(SourceError):  # the stamp changed: refused before any read
        reader.read("blk.0.h")


@pytest.mark.hostile
def test_huge_claim_is_refused_before_allocating(tmp_path: Path) -> None:
    """A tensor claiming 2**40 elements in a small file: refused at open, nothing allocated."""
    path = write_gguf(tmp_path / "a.gguf", {"w": np.zeros((2, 32), np.float32)})
    offsets = _field_offsets(path)
    bad = _patched(path, tmp_path / "b.gguf", offsets["dims"] + 8, "<Q", 2**34)
    with pytest.raises(SourceError, match="past the end") as err:
        open_gguf(bad)
    assert f"{math.prod((2**34, 32)) * 4 + offsets['data']:,}" in str(err.value)


def test_type_the_library_cannot_dequantize(tmp_path: Path) -> None:
    """Q8_K is llama.cpp's intermediate type, with no dequantizer in gguf-py: refused at open, by name."""
    block, type_size = gguf.GGML_QUANT_SIZES[Q.Q8_K]
    path = write_gguf(tmp_path / "k.gguf", {"odd.weight": (np.zeros((2, type_size), np.uint8), Q.Q8_K)})
    with pytest.raises(SourceError, match=r"'odd.weight' is stored as Q8_K: .*cannot dequantize Q8_K") as err:
        open_gguf(path)
    assert err.value.exit_code == 3


def test_empty_and_scalar_tensors(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "e.gguf", {"empty": np.zeros((0, 4), np.float32), "one": np.ones((1,), np.float16)})
    reader = open_gguf(path)
    assert reader.meta["empty"].shape == (0, 4) and reader.read("empty").shape == (0, 4)
    check_reader(reader, path)


# ---------------------------------------------------------------------------- metadata summary (inspect)


def llama_like_gguf(path: Path, rng: Any, *, name: str = "tiny llama", vocab: int = 300) -> Path:
    """A GGUF file with the metadata llama.cpp's converter writes, through GGUFWriter's own
    add_* methods, a Q8_0 tensor and two F32 ones."""
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name(name)
    w.add_context_length(2048)
    w.add_embedding_length(64)
    w.add_block_count(2)
    w.add_feed_forward_length(128)
    w.add_head_count(4)
    w.add_head_count_kv(2)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(16)
    w.add_rope_freq_base(500000.0)
    w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    w.add_rope_scaling_factor(2.0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("llama-bpe")
    w.add_token_list([f"t{i}" for i in range(vocab)])
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    a = rng.standard_normal((4, 32)).astype(np.float32)
    w.add_tensor("blk.0.attn_q.weight", gguf.quants.quantize(a, Q.Q8_0), raw_dtype=Q.Q8_0)
    w.add_tensor("blk.0.attn_norm.weight", a[0])
    w.add_tensor("output_norm.weight", a[1])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_metadata_summary_shows_what_was_written(tmp_path: Path, rng: Any) -> None:
    reader = open_gguf(llama_like_gguf(tmp_path / "m.gguf", rng))
    md = reader.metadata
    assert md["llama.context_length"] == 2048 and md["llama.attention.head_count_kv"] == 2
    assert md["llama.rope.freq_base"] == 500000.0 and md["llama.rope.scaling.type"] == "linear"
    assert md["general.file_type"] == int(gguf.LlamaFileType.MOSTLY_Q8_0) == 7
    assert reader.arrays["tokenizer.ggml.tokens"] == ("STRING", 300)  # the vocabulary's size, not the vocabulary
    assert reader.summary() == [
        "file type MOSTLY_Q8_0 (general.file_type 7)",
        "model: context_length 2048, embedding_length 64, block_count 2, feed_forward_length 128, head_count 4, "
        "head_count_kv 2, layer_norm_rms_epsilon 1e-05",
        "rope: dimension_count 16, freq_base 500000, scaling.type linear, scaling.factor 2",
        "tokenizer: model gpt2, pre-tokenizer llama-bpe, vocabulary 300 tokens",
    ]
    assert "GGUF v3, stored types: F32 2, Q8_0 1; quantized tensors are dequantized to float32 at read" in reader.notes
    assert set(reader.summary()) <= set(reader.notes)


def test_inspect_shows_the_summary_bounded_and_escaped(tmp_path: Path, rng: Any, capsys: pytest.CaptureFixture[str]) -> None:
    from remap.cli import main

    name = "evil\x1b]0;pwned\x07\nname" + "x" * 5000
    path = llama_like_gguf(tmp_path / "m.gguf", rng, name=name, vocab=50_000)
    assert main(["inspect", str(path)]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out and "\\x1b]0;pwned\\x07\\nname" in out
    assert "tokenizer: model gpt2, pre-tokenizer llama-bpe, vocabulary 50,000 tokens" in out
    assert "t49999" not in out and "t1" not in out  # the vocabulary itself is not shown
    assert "rope: dimension_count 16, freq_base 500000" in out and "file type MOSTLY_Q8_0" in out
    assert max(len(line) for line in out.splitlines()) < 400  # a 5000-character name is cut short
    assert main(["inspect", str(path), "--json"]) == 0
    notes = json.loads(capsys.readouterr().out)["source"]["notes"]
    assert "tokenizer: model gpt2, pre-tokenizer llama-bpe, vocabulary 50,000 tokens" in notes
    assert any(n.startswith("architecture llama, evil\x1b]0;pwned\x07\nname") for n in notes)  # JSON keeps the exact text


def test_summary_values_are_shortened(tmp_path: Path, rng: Any) -> None:
    kv = {"llama.context_length": 4096, "llama.attention.head_count": list(range(40)), "llama.rope.scaling.type": "y" * 500}
    reader = open_gguf(write_gguf(tmp_path / "m.gguf", {"w": rng.standard_normal((2, 32)).astype(np.float32)}, kv=kv))
    assert reader.metadata["llama.attention.head_count"] == "array of 40 INT32"  # a long array is described, not kept
    assert reader.arrays["llama.attention.head_count"] == ("INT32", 40)
    model, rope = reader.summary()
    assert model == "model: context_length 4096, head_count array of 40 INT32"
    assert rope == "rope: scaling.type " + "y" * 59 + "…"


#: Loads a quantized GGUF file with rollback=False and small batches into an allocated model;
#: prints the growth of the peak RSS (VmHWM) during the load, in MB.
STREAM_PEAK = """
import sys, torch
import remap
def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:"))
n, rows = int(sys.argv[2]), int(sys.argv[3])
model = torch.nn.Module()
for i in range(n):
    model.register_parameter(f"w{i}", torch.nn.Parameter(torch.zeros(rows, 1024)))
before = peak()
report = remap.load(model, sys.argv[1], rules={"version": 1}, rollback=False, batch_bytes=1 << 20)
print(report.ok, float(model.w0.abs().sum()) > 0, peak() - before)
"""


def test_quantized_tensors_stream_without_a_rollback(tmp_path: Path) -> None:
    """A quantized tensor's read is checked at open (offsets, sizes, the type tried on one
    block), so with rollback=False it streams like a span: the dequantized model (16 x 8 MiB
    of float32 here) is never held whole. Before, every tensor was read first: +128 MB."""
    import subprocess
    import sys

    n, rows = 16, 2048
    rng = np.random.default_rng(0)
    tensors = {f"w{i}": (gguf.quants.quantize(rng.standard_normal((rows, 1024), dtype=np.float32), Q.Q8_0), Q.Q8_0)
               for i in range(n)}  # fmt: skip
    path = write_gguf(tmp_path / "q.gguf", tensors)
    done = subprocess.run([sys.executable, "-c", STREAM_PEAK, str(path), str(n), str(rows)], capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    ok, loaded, grown = done.stdout.split()
    assert ok == "True" and loaded == "True"
    assert int(grown) < 48, f"the load held {grown} MB above the model: the dequantized tensors were not streamed"
