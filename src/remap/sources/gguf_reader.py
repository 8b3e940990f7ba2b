"""GGUF files (llama.cpp's format): tensor names, shapes and types from the header, data on read.

The header is parsed here, with every count and length checked against the file's size
before anything is allocated (the ``gguf`` package's own ``GGUFReader`` maps the whole file
and trusts the counts it finds: a lying array length makes it loop for ever). The ``gguf``
package is still needed: for its table of tensor types and to dequantize.

- Keys are the file's tensor names as they are (``token_embd.weight``, ``blk.0.attn_q.weight``).
- Shapes are given in PyTorch's order: GGUF stores ``ne`` fastest-varying first, so a torch
  ``Linear`` weight (out, in) is stored as ``ne = [in, out]`` and comes back (out, in).
- F32, F16, BF16, F64 and I8..I64 tensors keep their dtype; quantized tensors (Q8_0, Q4_K,
  Q6_K, ...) are dequantized at read time, to float32 unless ``dequantize_to`` says float16
  or bfloat16, and ``entries[key]`` names the stored type.
- The key/value metadata is kept in ``metadata`` (strings cut short, long arrays described,
  never kept; ``arrays`` gives every array's item type and length, the vocabulary's size
  among them), and summarised in ``notes`` for ``inspect`` (:meth:`_GGUFReader.summary`: file
  type, context length, sizes and head counts, rope settings, tokenizer and vocabulary size,
  tensors per stored type); ``inspect`` escapes what a terminal would act on.
- Tensor data is read with plain reads into fresh memory (no mapping: a file truncated
  meanwhile is a SourceError, not a SIGBUS); quantized data is dequantized in row chunks, so
  the scratch beyond the result and its packed bytes stays small.

>>> sniff(b"GGUF\\x03\\x00\\x00\\x00", Path("model.gguf"))
True
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from ..errors import SourceError
from ..meta import TensorMeta
from .readers import Span, _first_line, _Reader, _stamp
from .registry import require_extra

if TYPE_CHECKING:
    import torch

__all__ = ["FORMAT", "EXTRA", "sniff", "open_reader", "GGUFTensor"]

FORMAT = "gguf"
EXTRA = "gguf"
MAGIC = b"GGUF"

#: ggml's limit on a tensor's dimensions is 4; a little room is left, more is a corrupt header.
MAX_DIMS = 8
#: Nesting of arrays inside arrays (the spec allows it; files use one level).
MAX_ARRAY_DEPTH = 3
#: Elements dequantized at a time: the float32 scratch beyond the result stays near 16 MiB.
DEQUANT_CHUNK = 1 << 22
#: What dequantized tensors may become.
DEQUANT_DTYPES = ("float32", "float16", "bfloat16")
#: GGUF value types: id -> (name, struct code, size); STRING (8) and ARRAY (9) have no fixed size.
_SCALARS = {
    0: ("UINT8", "B", 1), 1: ("INT8", "b", 1), 2: ("UINT16", "H", 2), 3: ("INT16", "h", 2),
    4: ("UINT32", "I", 4), 5: ("INT32", "i", 4), 6: ("FLOAT32", "f", 4), 7: ("BOOL", "?", 1),
    10: ("UINT64", "Q", 8), 11: ("INT64", "q", 8), 12: ("FLOAT64", "d", 8),
}  # fmt: skip
_STRING, _ARRAY = 8, 9
#: Stored types read as they are: GGML type name -> torch dtype name.
_PLAIN = {
    "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
    "I8": "int8", "I16": "int16", "I32": "int32", "I64": "int64",
}  # fmt: skip
_MAX_SIZE = 2**63 - 1
_SHOWN = 200  # longest metadata string kept
#: ``{arch}.`` keys that :meth:`_GGUFReader.summary` shows, in this order.
_SIZE_KEYS = ("context_length", "embedding_length", "block_count", "feed_forward_length", "attention.head_count",
              "attention.head_count_kv", "attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon",
              "expert_count", "expert_used_count", "vocab_size")  # fmt: skip
_MAX_ROPE = 12  # rope settings shown (a file has a handful)
_SHOWN_TEXT = 60  # longest metadata string in a summary line
_SHOWN_ITEMS = 8  # items of a metadata list in a summary line


def _shown(value: Any) -> str:
    """A metadata value for a summary line: short strings, floats as ``%g``, lists cut.

    >>> _shown(10000.0), _shown([1, 2, 3]), _shown(list(range(20))), _shown("x" * 100)[-3:]
    ('10000', '[1, 2, 3]', '[0, 1, 2, 3, 4, 5, 6, 7, … 20 items]', 'xx…')
    """
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list):
        items = ", ".join(_shown(v) for v in value[:_SHOWN_ITEMS])
        return f"[{items}{f', … {len(value)} items' if len(value) > _SHOWN_ITEMS else ''}]"
    text = str(value)
    return text if len(text) <= _SHOWN_TEXT else text[: _SHOWN_TEXT - 1] + "…"


def _file_type_name(value: int) -> str:
    """``7`` -> ``MOSTLY_Q8_0`` (gguf's LlamaFileType), or ``unknown`` for a value it does not name."""
    try:
        from gguf.constants import LlamaFileType

        return LlamaFileType(value).name
    except (ImportError, ValueError):
        return "unknown"


def sniff(head: bytes, path: Path) -> bool:
    """A GGUF file starts with the four bytes ``GGUF``."""
    return head[:4] == MAGIC


def open_reader(
    path: Path, *, key: str | None = None, trust_pickle: bool = False, dequantize_to: str = "float32"
) -> _GGUFReader:
    """A reader of the GGUF file ``path`` (``trust_pickle`` does not apply: GGUF holds no code).

    ``dequantize_to`` is the dtype quantized tensors become: float32 (the default), float16
    or bfloat16.
    """
    if key is not None:
        raise SourceError(f"source.key {key!r} does not apply to a GGUF file (its tensors are not nested); leave `key` out",
                          where=str(path))  # fmt: skip
    if dequantize_to not in DEQUANT_DTYPES:
        raise SourceError(f"dequantize_to must be one of {', '.join(DEQUANT_DTYPES)}, found {dequantize_to!r}",
                          where=str(path))  # fmt: skip
    require_extra("gguf", FORMAT, EXTRA, path)
    return _GGUFReader(path, dequantize_to)


@dataclass(frozen=True)
class GGUFTensor:
    """Where one tensor sits and how it is stored."""

    type_name: str  # the GGML type: "F32", "Q4_K", ...
    type_id: int
    ne: tuple[int, ...]  # GGUF's order: fastest-varying first
    offset: int  # absolute, in the file
    nbytes: int

    @property
    def shape(self) -> tuple[int, ...]:
        """PyTorch's order."""
        return tuple(reversed(self.ne))

    @property
    def quantized(self) -> bool:
        return self.type_name not in _PLAIN


class _Cursor:
    """Reads the header front to back; every length is checked against the file's size first."""

    CHUNK = 1 << 16

    def __init__(self, f: BinaryIO, size: int, where: str) -> None:
        self.f, self.size, self.where = f, size, where
        self.order = "<"
        self.buf, self.base, self.pos = b"", 0, 0

    @property
    def offset(self) -> int:
        return self.base + self.pos

    @property
    def left(self) -> int:
        return self.size - self.offset

    def fail(self, message: str) -> SourceError:
        return SourceError(f"{message} (at byte {self.offset:,} of the header)", where=self.where)

    def take(self, n: int, what: str) -> bytes:
        if n > self.left:
            raise self.fail(
                f"truncated or corrupt GGUF header: {what} needs {n:,} bytes, but the file ends "
                f"{self.left:,} bytes further (it is {self.size:,} bytes)"
            )
        if self.pos + n > len(self.buf):
            self.f.seek(self.offset)
            self.base, self.pos = self.offset, 0
            self.buf = self.f.read(max(n, self.CHUNK))
            if len(self.buf) < n:
                raise self.fail(f"the file is shorter than when it was opened: {what} could not be read")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def skip(self, n: int, what: str) -> None:
        if n > self.left:
            raise self.fail(
                f"truncated or corrupt GGUF header: {what} needs {n:,} bytes, but the file ends "
                f"{self.left:,} bytes further (it is {self.size:,} bytes)"
            )
        if self.pos + n <= len(self.buf):
            self.pos += n
        else:
            self.base, self.pos, self.buf = self.offset + n, 0, b""

    def scalar(self, code: str, size: int, what: str) -> Any:
        if self.pos + size <= len(self.buf):  # the common case, without a slice
            (value,) = struct.unpack_from(self.order + code, self.buf, self.pos)
            self.pos += size
            return value
        return struct.unpack(self.order + code, self.take(size, what))[0]

    def u32(self, what: str) -> int:
        return self.scalar("I", 4, what)

    def u64(self, what: str) -> int:
        return self.scalar("Q", 8, what)

    def string(self, what: str, *, keep: bool = True) -> bytes | None:
        n = self.u64(f"the length of {what}")
        if n > self.left:
            raise self.fail(
                f"corrupt GGUF header: {what} claims {n:,} bytes, but only {self.left:,} bytes of the file remain"
            )
        if not keep:
            self.skip(n, what)
            return None
        return self.take(n, what)


def _text(raw: bytes, what: str, cur: _Cursor) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise cur.fail(f"corrupt GGUF header: {what} is not UTF-8 ({exc.reason} at byte {exc.start}: {raw[:60]!r})") from None


def _min_size(vtype: int) -> int:
    """The fewest bytes one value of ``vtype`` takes."""
    if vtype in _SCALARS:
        return _SCALARS[vtype][2]
    return 8 if vtype == _STRING else 12  # a string's length; an array's item type and count


def _type_name(vtype: int) -> str:
    return _SCALARS[vtype][0] if vtype in _SCALARS else {_STRING: "STRING", _ARRAY: "ARRAY"}.get(vtype, str(vtype))


def _value(cur: _Cursor, vtype: int, key: str, depth: int = 0, arrays: dict[str, tuple[str, int]] | None = None) -> Any:
    """One metadata value: scalars and strings (cut to :data:`_SHOWN` characters) as they are,
    arrays as a short description (short scalar arrays as a list); long arrays are skipped, not
    kept. ``arrays`` gets (item type, length) of a top-level array."""
    if vtype in _SCALARS:
        _, code, size = _SCALARS[vtype]
        return cur.scalar(code, size, f"the value of {key!r}")
    if vtype == _STRING:
        n = cur.u64(f"the length of the value of {key!r}")
        if n > cur.left:
            raise cur.fail(f"corrupt GGUF header: the string value of {key!r} claims {n:,} bytes, "
                           f"but only {cur.left:,} bytes of the file remain")  # fmt: skip
        raw = cur.take(min(n, 4 * _SHOWN), f"the value of {key!r}")
        cur.skip(n - len(raw), f"the value of {key!r}")
        text = raw.decode("utf-8", errors="replace")
        return text if n == len(raw) and len(text) <= _SHOWN else text[: _SHOWN - 1] + "…"
    if vtype != _ARRAY:
        raise cur.fail(f"corrupt GGUF header: metadata {key!r} has value type {vtype}, expected 0 to 12")
    if depth >= MAX_ARRAY_DEPTH:
        raise cur.fail(f"corrupt GGUF header: metadata {key!r} nests arrays more than {MAX_ARRAY_DEPTH} deep")
    itype = cur.u32(f"the item type of {key!r}")
    count = cur.u64(f"the length of {key!r}")
    if itype not in _SCALARS and itype not in (_STRING, _ARRAY):
        raise cur.fail(f"corrupt GGUF header: array {key!r} has item type {itype}, expected 0 to 12")
    if arrays is not None:
        arrays[key] = (_type_name(itype), count)
    if count * _min_size(itype) > cur.left:
        raise cur.fail(
            f"corrupt GGUF header: array {key!r} claims {count:,} items of type {_type_name(itype)} "
            f"(at least {count * _min_size(itype):,} bytes), but only {cur.left:,} bytes of the file remain"
        )
    if itype in _SCALARS:
        _, code, size = _SCALARS[itype]
        if count <= 16:
            raw = cur.take(count * size, f"the items of {key!r}")
            return list(struct.unpack(f"{cur.order}{count}{code}", raw))
        cur.skip(count * size, f"the items of {key!r}")
    elif itype == _STRING:  # a tokenizer's vocabulary: 10^5 strings, skipped in the buffer where they lie whole
        unpack = struct.Struct(cur.order + "Q").unpack_from
        for _ in range(count):
            buf, pos = cur.buf, cur.pos
            if pos + 8 <= len(buf):
                (n,) = unpack(buf, pos)
                if pos + 8 + n <= len(buf):
                    cur.pos = pos + 8 + n
                    continue
            cur.string(f"an item of {key!r}", keep=False)
    else:
        for _ in range(count):
            _value(cur, _ARRAY, key, depth + 1)
    return f"array of {count:,} {_type_name(itype)}"


class _GGUFReader(_Reader):
    """One GGUF file: ``meta`` from the header at construction, tensor data on :meth:`read`."""

    #: Every tensor's offset and size is checked against the file at open, and each quantized
    #: type is tried on one block there: a read fails only as a span's read would, so the
    #: engine streams dequantized tensors batch by batch even without a rollback.
    checked_reads = True

    def __init__(self, path: Path, dequantize_to: str = "float32") -> None:
        self.path, self._stamp, self.dequantize_to = path, _stamp(path), dequantize_to
        self._handle: BinaryIO | None = None
        self._big_endian = False
        self.meta, self.entries, self.notes = {}, {}, []
        #: The file's key/value metadata (``general.architecture``, ``llama.block_count``, ...): long
        #: strings cut short, arrays described (``"array of 32,000 STRING"``), not kept.
        self.metadata: dict[str, Any] = {}
        #: key -> (item type, length) of each array in the metadata (``tokenizer.ggml.tokens``:
        #: ``("STRING", 32000)``), whether it was kept or only described.
        self.arrays: dict[str, tuple[str, int]] = {}
        #: key -> where and how each tensor is stored.
        self.tensors: dict[str, GGUFTensor] = {}
        where = str(path)
        try:
            with open(path, "rb") as f:
                self._parse(_Cursor(f, self._stamp[0], where))
        except OSError as exc:
            raise SourceError(f"cannot read it: {exc.strerror or exc}", where=where) from None

    # ------------------------------------------------------------------ header

    def _parse(self, cur: _Cursor) -> None:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        magic = cur.take(4, "the magic bytes") if cur.size >= 4 else b""
        if magic != MAGIC:
            raise SourceError(f"not a GGUF file: it starts with {magic!r}, expected b'GGUF'", where=cur.where)
        raw = cur.take(4, "the version")
        version = struct.unpack("<I", raw)[0]
        if version & 0xFFFF == 0 and version:  # written on a big-endian machine
            cur.order, version = ">", struct.unpack(">I", raw)[0]
        if version not in (2, 3):
            raise cur.fail(
                f"GGUF version {version} is not supported: remap reads versions 2 and 3"
                + (" (version 1, from 2023, used 32-bit counts: convert it again with a current llama.cpp)" if version == 1 else "")
            )
        self._big_endian = cur.order == ">"
        if self._big_endian:
            self.notes.append("a big-endian GGUF file: plain tensors are byte-swapped at read")
        n_tensors = cur.u64("the tensor count")
        n_kv = cur.u64("the metadata count")
        if n_kv * 13 > cur.left or n_tensors * 24 > cur.left:  # the smallest entry of each takes 13 and 24 bytes
            raise cur.fail(
                f"corrupt GGUF header: it claims {n_tensors:,} tensors and {n_kv:,} metadata entries, "
                f"more than the {cur.size:,}-byte file can hold"
            )
        alignment = 32
        for _ in range(n_kv):
            name = _text(cur.string("a metadata key"), "a metadata key", cur)  # type: ignore[arg-type]
            if name in self.metadata:
                raise cur.fail(f"corrupt GGUF header: the metadata key {name!r} appears twice")
            vtype = cur.u32(f"the value type of {name!r}")
            self.metadata[name] = _value(cur, vtype, name, arrays=self.arrays)
            if name == "general.alignment":
                alignment = self.metadata[name]
                if vtype != 4 or alignment == 0 or alignment & (alignment - 1):
                    raise cur.fail(f"corrupt GGUF header: general.alignment is {alignment!r} ({_type_name(vtype)}), "
                                   "expected a power of two stored as UINT32")  # fmt: skip
        infos: list[tuple[str, tuple[int, ...], int, int]] = []
        for i in range(n_tensors):
            name = _text(cur.string(f"the name of tensor {i}"), f"the name of tensor {i}", cur)  # type: ignore[arg-type]
            if not name:
                raise cur.fail(f"corrupt GGUF header: tensor {i} has an empty name")
            n_dims = cur.u32(f"the dimension count of {name!r}")
            if n_dims > MAX_DIMS:
                raise cur.fail(f"corrupt GGUF header: tensor {name!r} claims {n_dims:,} dimensions, at most {MAX_DIMS} expected")
            ne = tuple(cur.u64(f"the dimensions of {name!r}") for _ in range(n_dims))
            type_id = cur.u32(f"the type of {name!r}")
            offset = cur.u64(f"the data offset of {name!r}")
            infos.append((name, ne, type_id, offset))
        data_start = -(-cur.offset // alignment) * alignment
        running = 0
        unknown: dict[str, str] = {}
        for name, ne, type_id, offset in infos:
            if name in self.tensors:
                raise SourceError(where=cur.where, message=f"corrupt GGUF header: the tensor name {name!r} appears twice")
            try:
                qtype = GGMLQuantizationType(type_id)
                block, type_size = GGML_QUANT_SIZES[qtype]
            except (ValueError, KeyError):
                raise SourceError(where=cur.where, message=
                    f"tensor {name!r} has type id {type_id}, which the installed gguf package ({_gguf_version()}) does "
                    "not know: a corrupt header, or a type newer than it (pip install -U gguf)"
                ) from None
            shape_text = "×".join(map(str, reversed(ne))) or "scalar"
            numel = math.prod(ne)
            if numel > _MAX_SIZE:
                raise SourceError(where=cur.where, message=f"corrupt GGUF header: tensor {name!r} claims shape {shape_text}, larger than any tensor can be")
            row = ne[0] if ne else 1
            if row % block:
                raise SourceError(where=cur.where, message=f"corrupt GGUF header: tensor {name!r} ({qtype.name}, shape {shape_text}) has rows of {row:,} "
                               f"elements, not a multiple of the {qtype.name} block size {block}")  # fmt: skip
            nbytes = numel // block * type_size
            if offset != running:
                raise SourceError(where=cur.where, message=
                    f"corrupt GGUF header: tensor {name!r} claims data offset {offset:,}, expected {running:,} (tensors "
                    f"follow one another in header order, each padded to {alignment} bytes)"
                )
            end = data_start + offset + nbytes
            if end > cur.size:
                raise SourceError(where=cur.where, message=
                    f"tensor {name!r} ({qtype.name}, shape {shape_text}) claims bytes {data_start + offset:,} to {end:,}, "
                    f"past the end of the {cur.size:,}-byte file: truncated or corrupt"
                )
            running = offset + -(-nbytes // alignment) * alignment
            info = GGUFTensor(qtype.name, type_id, ne, data_start + offset, nbytes)
            self.tensors[name] = info
            dtype = _PLAIN.get(qtype.name)
            if dtype is None:
                dtype = self.dequantize_to
                self.entries[name] = f"{qtype.name}, dequantized to {dtype} at read"
                if qtype.name not in unknown:
                    unknown[qtype.name] = _can_dequantize(qtype)
                if unknown[qtype.name]:
                    raise SourceError(where=cur.where, message=f"tensor {name!r} is stored as {qtype.name}: {unknown[qtype.name]}")
            if cur.order == ">" and info.quantized:
                raise SourceError(where=cur.where, message=f"tensor {name!r} is stored as {qtype.name} in a big-endian file; remap dequantizes "
                               "little-endian files only")  # fmt: skip
            self.meta[name] = TensorMeta(info.shape, dtype)
        self._add_notes(version)

    def _add_notes(self, version: int) -> None:
        """What ``inspect`` shows under the file: stored types, architecture, split."""
        stored: dict[str, int] = {}
        for info in self.tensors.values():
            stored[info.type_name] = stored.get(info.type_name, 0) + 1
        if stored:
            kinds = ", ".join(f"{t} {n}" for t, n in sorted(stored.items(), key=lambda kv: -kv[1]))
            quantized = any(t not in _PLAIN for t in stored)
            after = f"; quantized tensors are dequantized to {self.dequantize_to} at read" if quantized else ""
            self.notes.append(f"GGUF v{version}, stored types: {kinds}{after}")
        arch, name = self.metadata.get("general.architecture"), self.metadata.get("general.name")
        if isinstance(arch, str):
            self.notes.append(f"architecture {arch}" + (f", {name}" if isinstance(name, str) else ""))
        self.notes += self.summary()
        count, no = self.metadata.get("split.count"), self.metadata.get("split.no")
        if isinstance(count, int) and count > 1:
            which = no + 1 if isinstance(no, int) else "?"
            self.notes.append(f"split {which} of {count}: the other files of the split hold more tensors")

    def summary(self) -> list[str]:
        """What the metadata says about the model, one short line per topic, for ``inspect``:
        file type, sizes (context length, embedding, blocks, heads), rope settings, tokenizer
        model and vocabulary size. Values are shortened (:func:`_shown`); lines without a
        value are left out. The exact values are in :attr:`metadata`.

        A file whose header says ``general.file_type = 7`` and ``llama.context_length = 2048``
        gives ``file type MOSTLY_Q8_0 (general.file_type 7)`` and ``model: context_length 2048``.
        """
        md = self.metadata
        lines = []
        file_type = md.get("general.file_type")
        if isinstance(file_type, int) and not isinstance(file_type, bool):
            lines.append(f"file type {_file_type_name(file_type)} (general.file_type {file_type})")
        arch = md.get("general.architecture")
        if isinstance(arch, str) and arch:
            sizes = [(k, md.get(f"{arch}.{k}")) for k in _SIZE_KEYS]
            shown = [f"{k.removeprefix('attention.')} {_shown(v)}" for k, v in sizes if v is not None]
            if shown:
                lines.append("model: " + ", ".join(shown))
            rope = [(k, v) for k, v in md.items() if k.startswith(f"{arch}.rope.")][:_MAX_ROPE]
            if rope:
                lines.append("rope: " + ", ".join(f"{k.removeprefix(f'{arch}.rope.')} {_shown(v)}" for k, v in rope))
        tok = [f"model {_shown(md['tokenizer.ggml.model'])}"] if "tokenizer.ggml.model" in md else []
        if "tokenizer.ggml.pre" in md:
            tok.append(f"pre-tokenizer {_shown(md['tokenizer.ggml.pre'])}")
        vocab = self.arrays.get("tokenizer.ggml.tokens")
        if vocab is not None:
            tok.append(f"vocabulary {vocab[1]:,} tokens")
        if tok:
            lines.append("tokenizer: " + ", ".join(tok))
        return lines

    # ------------------------------------------------------------------ data

    def span(self, key: str) -> Span | None:
        """Plain little-endian tensors can be read straight from the file."""
        info = self.tensors[key]
        if info.quantized or self._big_endian:
            return None
        shape = info.shape
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        return Span(str(self.path), info.offset, info.nbytes, self.meta[key].dtype, shape, stride)

    def read(self, key: str) -> torch.Tensor:
        import torch

        info = self.tensors.get(key)
        if info is None:
            raise SourceError(f"no tensor {key!r} in this GGUF file", where=str(self.path))
        self._check_unchanged()
        try:
            if self._handle is None:
                self._handle = open(self.path, "rb")
            raw = torch.empty(info.nbytes, dtype=torch.uint8)
            self._read_into(self._handle, raw, info, key)
        except OSError as exc:
            raise SourceError(f"cannot read tensor {key!r}: {exc.strerror or exc}", where=str(self.path)) from None
        if not info.quantized:
            dtype = getattr(torch, _PLAIN[info.type_name])
            if self._big_endian and raw.numel():
                size = torch.empty((), dtype=dtype).element_size()
                if size > 1:
                    raw.numpy().view(f"u{size}").byteswap(inplace=True)
            return raw.view(dtype).reshape(info.shape)
        try:
            return self._dequantize(raw, info)
        except SourceError:
            raise
        except Exception as exc:  # gguf's dequantizers raise what numpy raises
            raise SourceError(f"cannot dequantize tensor {key!r} ({info.type_name}): {type(exc).__name__}: "
                              f"{_first_line(exc)}", where=str(self.path)) from None  # fmt: skip

    def _read_into(self, handle: BinaryIO, raw: torch.Tensor, info: GGUFTensor, key: str) -> None:
        view = memoryview(raw.numpy()).cast("B")
        handle.seek(info.offset)
        done = 0
        while done < info.nbytes:
            n = handle.readinto(view[done:])
            if not n:
                raise SourceError(
                    f"cannot read tensor {key!r}: the file ends {done:,} bytes into its {info.nbytes:,} bytes "
                    f"(at byte {info.offset + done:,}): it was truncated after it was opened",
                    where=str(self.path),
                )
            done += n

    def _dequantize(self, raw: torch.Tensor, info: GGUFTensor) -> torch.Tensor:
        import warnings

        import torch
        from gguf.constants import GGMLQuantizationType
        from gguf.quants import dequantize

        qtype = GGMLQuantizationType(info.type_id)
        out = torch.empty(info.shape, dtype=getattr(torch, self.dequantize_to))
        if not out.numel():
            return out
        row = info.ne[0] if info.ne else 1
        rows = out.numel() // row
        packed = raw.numpy().reshape(rows, info.nbytes // rows)
        flat = out.view(rows, row)
        step = max(1, DEQUANT_CHUNK // row)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # overflow in a corrupt block's scale: the values say so
            for r in range(0, rows, step):
                values = dequantize(packed[r : r + step], qtype)
                flat[r : r + step].copy_(torch.from_numpy(values.reshape(-1, row)))
        return out

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


def _gguf_version() -> str:
    try:
        from importlib.metadata import version

        return f"gguf {version('gguf')}"
    except Exception:  # noqa: BLE001 - only for a message
        return "gguf"


_DEQUANTIZABLE: dict[str, str] = {}


def _can_dequantize(qtype: Any) -> str:
    """``""`` when the gguf package dequantizes ``qtype``, else why not (tried on one zero block)."""
    if qtype.name not in _DEQUANTIZABLE:
        import numpy as np
        from gguf.constants import GGML_QUANT_SIZES
        from gguf.quants import dequantize

        block, type_size = GGML_QUANT_SIZES[qtype]
        try:
            out = dequantize(np.zeros((1, type_size), dtype=np.uint8), qtype)
            ok = out.size == block
            _DEQUANTIZABLE[qtype.name] = "" if ok else "the installed gguf package dequantizes it to the wrong size"
        except NotImplementedError:
            _DEQUANTIZABLE[qtype.name] = f"the installed gguf package ({_gguf_version()}) cannot dequantize {qtype.name}"
        except Exception as exc:  # noqa: BLE001 - reported, not raised
            _DEQUANTIZABLE[qtype.name] = f"the gguf package fails to dequantize it ({type(exc).__name__}: {_first_line(exc)})"
    return _DEQUANTIZABLE[qtype.name]
