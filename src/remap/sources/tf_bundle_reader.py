"""TensorFlow checkpoints (tensor bundles), read without TensorFlow.

What TensorFlow writes: ``tf.train.Checkpoint.write/save``, ``tf.compat.v1.train.Saver``,
Keras on TensorFlow (``tf.train.Checkpoint(model=model, optimizer=opt)``, tf.keras 2's
``model.save_weights("x.ckpt")``) and a SavedModel's ``variables/`` all hold a *tensor
bundle*: ``PREFIX.index``, a sorted table of tensor names, and the tensors' bytes in
``PREFIX.data-00000-of-0000N``. A user may name the index, the prefix (``ckpt``, no such
file), a SavedModel folder, its ``variables/`` folder or a folder of checkpoints (the one
its ``checkpoint`` file names): :func:`resolve_path` finds the index. A data shard or TF1's
``PREFIX.meta`` is detected too and read through the index beside it.

How it is read:

- The index is a LevelDB table (an SSTable): a 48-byte footer ending in the magic
  ``0xdb4775248b80fb57`` points at the index block, which points at the data blocks; a
  block holds prefix-compressed entries and restart points and is followed by a byte
  naming its compression and a masked CRC32C. Every handle is checked to lie inside the
  file before it is read, every block's checksum is verified, keys must ascend.
  TensorFlow's bundle writer never compresses (``kNoCompression``); a block compressed
  with Snappy is refused, because no Snappy library is a dependency of remap and the
  checksum-verified blocks TensorFlow writes never need one.
- The entry under the key ``""`` is a ``BundleHeaderProto`` (shard count, byte order,
  version); every other one a ``BundleEntryProto`` (dtype, shape, shard, offset, size,
  CRC32C, slices). The two messages, and the ``TrackableObjectGraph`` below, are decoded by
  hand (varints and length-delimited fields, about forty lines): the ``protobuf`` package
  would need descriptors that only TensorFlow ships, and a hand decoder bounds every length
  against its message, so a lying field is an error here, never an allocation.
- Planning reads the index only, plus the object graph (a small string tensor, see below).
  Reading one tensor is one bounded read of ``size`` bytes at ``offset`` in its shard;
  ``size`` is checked against shape times item size, and offset plus size against the
  shard's length, when the checkpoint is opened. :meth:`span` gives the engine those bytes
  for ``pread``. TensorFlow keeps a CRC32C of each tensor; no CRC32C library is installed
  with remap and one in pure Python checks ~6 MB/s, so tensor data is not checksummed (as
  safetensors, which carries no checksum); the index blocks and the object graph are.
- Variables split into slices (a partitioned variable, or one split across shards by a
  sharding policy) are assembled from their slices on read (no span); the slices must
  tile the variable exactly. String tensors, resources, variants and quantized types are
  listed in ``entries`` and not read. A big-endian bundle is refused.
- Limits keep a hostile index from filling memory: at most :data:`MAX_INDEX_BYTES` of index
  and :data:`MAX_ENTRIES` entries, an object graph of at most :data:`MAX_GRAPH_BYTES` and
  :data:`MAX_GRAPH_NODES` objects, :data:`MAX_SLICES` slices a variable.

Keys. A TF1 name-based checkpoint keeps its names with dots for slashes (``dense/kernel``
-> ``dense.kernel``). An object-based (TF2) checkpoint holds its object graph under
``_CHECKPOINTABLE_OBJECT_GRAPH``; each variable there carries its own name (``full_name``,
``sequential/conv2d/kernel`` for Keras 3). When every weight has one and they are unique,
keys are those names with dots, less the first part when every weight's name starts with
the same one and keeps at least two parts after it (a Keras ``Sequential`` model's name):
``conv2d.kernel``, ``batch_normalization.moving_mean``, the names remap's Keras reader
gives, so ``include: keras-layout`` fits. Otherwise keys are the object paths
(``layer_with_weights-0/kernel/.ATTRIBUTES/VARIABLE_VALUE`` -> ``layer_with_weights-0.kernel``),
a weight's path never passing through an optimizer. The description's notes say which.

Weights, optimizer slots and bookkeeping are told apart. A slot: a variable the graph lists
as an optimizer's slot, a key holding ``/.OPTIMIZER_SLOT/``, a non-scalar variable that
only an optimizer holds (Keras 3's moments), or in a TF1 checkpoint a variable named under
another variable (``dense/kernel/Adam``). Bookkeeping: a scalar only an optimizer holds
(``iteration``, ``learning_rate``), or a scalar named ``save_counter``, ``global_step``,
``step``, ``epoch``, ``iter``, ``learning_rate``, ``beta1_power``... An optimizer is what a
child named ``optimizer`` points to, a node listing slot variables, or a node with a child
``_iterations`` or ``iter``. By default a checkpoint offers its weights only and
``entries`` counts what was left out; ``source.key: optimizer`` offers the optimizer
state (slots and bookkeeping), ``source.key: all`` everything.

>>> _varint(bytes([0xAC, 0x02]), 0, 2)
(300, 2)
>>> hex(crc32c(b"123456789"))
'0xe3069283'
"""

from __future__ import annotations

import ctypes
import math
import re
import struct
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

from ..errors import SourceError
from ..meta import TensorMeta
from .readers import Span, _Reader, _stamp

if TYPE_CHECKING:
    import torch

__all__ = ["FORMAT", "EXTRA", "sniff", "open_reader", "resolve_path", "crc32c", "BundleEntry", "read_bundle_index"]

FORMAT = "tf"
EXTRA = None  # no dependency: the table, the protobufs and the checksums are read here
MAGIC = 0xDB4775248B80FB57
_MAGIC_BYTES = MAGIC.to_bytes(8, "little")
FOOTER_LEN = 48  # two block handles padded to 40 bytes, then the magic
_TRAILER_LEN = 5  # a block's compression byte and masked CRC32C
#: The largest index read (TensorFlow writes ~50 bytes a tensor) and the most entries parsed:
#: memory stays under ~1 GB whatever an index claims.
MAX_INDEX_BYTES = 256 << 20
MAX_ENTRIES = 2_000_000
#: The largest object graph read when planning, and the most objects parsed from it (a Keras
#: model has ~15 objects a layer, ~80 bytes each).
MAX_GRAPH_BYTES = 128 << 20
MAX_GRAPH_NODES = 4_000_000
MAX_SHARDS = 100_000  # shard files are named -%05d-of-%05d
MAX_DIMS = 254  # TensorFlow's own limit on a shape's rank
MAX_SLICES = 1024  # slices of one partitioned variable
OBJECT_GRAPH = "_CHECKPOINTABLE_OBJECT_GRAPH"
_ATTR_SUFFIX = "/.ATTRIBUTES/VARIABLE_VALUE"
_SLOT_MARK = "/.OPTIMIZER_SLOT/"
_DATA_RE = re.compile(r"^(?P<prefix>.+)(\.data-(?P<shard>\d{5,})-of-(?P<count>\d{5,})|\.meta)$")  # a shard, TF1's graph
KEY_CHOICES = ("weights", "optimizer", "all")

#: TensorFlow DataType enum (types.proto) -> torch dtype name, for the types read as tensors.
DTYPES = {
    1: "float32", 2: "float64", 3: "int32", 4: "uint8", 5: "int16", 6: "int8", 8: "complex64", 9: "int64",
    10: "bool", 14: "bfloat16", 17: "uint16", 18: "complex128", 19: "float16", 22: "uint32", 23: "uint64",
    24: "float8_e5m2", 25: "float8_e4m3fn",
}  # fmt: skip
#: ... and the names of the others, which are listed in ``entries`` and not read.
OTHER_DTYPES = {
    7: "string", 11: "qint8", 12: "quint8", 13: "qint32", 15: "qint16", 16: "quint16", 20: "resource",
    21: "variant", 26: "float8_e4m3fnuz", 27: "float8_e4m3b11fnuz", 28: "float8_e5m2fnuz", 29: "int4", 30: "uint4",
    31: "int2", 32: "uint2", 33: "float4_e2m1fn",
}  # fmt: skip
_ITEMSIZE = {"float64": 8, "int64": 8, "complex64": 8, "uint64": 8, "complex128": 16, "float32": 4, "int32": 4,
             "uint32": 4, "float16": 2, "bfloat16": 2, "int16": 2, "uint16": 2}  # fmt: skip
#: Scalars that are counters and hyperparameters, not weights, by their last name part.
BOOKKEEPING = frozenset({
    "save_counter", "global_step", "step", "epoch", "iter", "iteration", "iterations", "learning_rate", "lr",
    "decay", "beta1_power", "beta2_power", "beta_1", "beta_2", "epsilon", "momentum", "rho",
})  # fmt: skip
_OPTIMIZER_CHILDREN = frozenset({"_iterations", "iter"})
#: The kinds of variable, as ``entries`` names what was left out of each, and what each source.key offers.
_KINDS = {"weight": "weights", "slot": "optimizer slot variables", "bookkeeping": "bookkeeping values (counters, hyperparameters)"}
_WANTED = {"weights": {"weight"}, "optimizer": {"slot", "bookkeeping"}, "all": set(_KINDS)}


class _Bad(Exception):
    """A malformed structure; turned into a SourceError naming the file (and key)."""


# ---------------------------------------------------------------------------- CRC32C


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_CRC_TABLE = _crc_table()


def crc32c(data: bytes | memoryview, crc: int = 0) -> int:
    """CRC32C (Castagnoli) of ``data``, continuing ``crc``; pure Python, ~6 MB/s.

    >>> crc32c(b"")
    0
    """
    table, crc = _CRC_TABLE, crc ^ 0xFFFFFFFF
    for b in bytes(data):
        crc = table[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _mask(crc: int) -> int:
    """The masked form LevelDB and TensorFlow store (a CRC of data holding CRCs stays strong)."""
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


# ---------------------------------------------------------------------------- protobuf wire format


def _varint(buf: bytes, i: int, end: int) -> tuple[int, int]:
    """(value, next offset) of the varint at ``buf[i]``, which must end before ``end``."""
    value = shift = 0
    while True:
        if i >= end:
            raise _Bad("a varint runs past the end of its field")
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i
        shift += 7
        if shift > 63:
            raise _Bad("a varint longer than 10 bytes")


def _fields(buf: bytes, what: str) -> Iterator[tuple[int, int, int | bytes]]:
    """The (field number, wire type, value) of a protobuf message; lengths bounded by ``buf``."""
    i, end = 0, len(buf)
    while i < end:
        tag, i = _varint(buf, i, end)
        number, wire = tag >> 3, tag & 7
        if number == 0:
            raise _Bad(f"{what}: field number 0")
        if wire == 0:
            value, i = _varint(buf, i, end)
            yield number, wire, value
        elif wire == 2:
            n, i = _varint(buf, i, end)
            if n > end - i:
                raise _Bad(f"{what}: field {number} claims {n} bytes, {end - i} remain")
            yield number, wire, buf[i : i + n]
            i += n
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if n > end - i:
                raise _Bad(f"{what}: field {number} runs past the end of the message")
            yield number, wire, int.from_bytes(buf[i : i + n], "little")
            i += n
        else:
            raise _Bad(f"{what}: field {number} has wire type {wire}, which these messages never use")


def _int(value: int | bytes, what: str) -> int:
    if not isinstance(value, int):
        raise _Bad(f"{what} is not a number")
    return value - (1 << 64) if value >= 1 << 63 else value  # int64 in two's complement


def _text(value: int | bytes, what: str) -> str:
    if not isinstance(value, bytes):
        raise _Bad(f"{what} is not text")
    try:
        return value.decode("utf-8")
    except UnicodeDecodeError:
        raise _Bad(f"{what} is not UTF-8 text") from None


# ---------------------------------------------------------------------------- the table (SSTable)


def _block(f: BinaryIO, offset: int, size: int, limit: int, what: str) -> bytes:
    """A block's contents, checked: inside ``[0, limit)``, uncompressed, its CRC32C right."""
    if offset < 0 or size < 0 or offset + size + _TRAILER_LEN > limit:
        raise _Bad(f"{what} claims bytes {offset}..{offset + size + _TRAILER_LEN}, past the table's end ({limit})")
    f.seek(offset)
    raw = f.read(size + _TRAILER_LEN)
    if len(raw) != size + _TRAILER_LEN:
        raise _Bad(f"{what}: the file ended early")
    kind, stored = raw[size], int.from_bytes(raw[size + 1 :], "little")
    if _mask(crc32c(raw[: size + 1])) != stored:
        raise _Bad(f"{what} fails its checksum (CRC32C): the file is damaged")
    if kind == 1:
        raise _Bad(
            f"{what} is compressed with Snappy; TensorFlow writes tensor bundles uncompressed, and remap reads only "
            "those (no Snappy decoder is a dependency of remap)"
        )
    if kind != 0:
        raise _Bad(f"{what} names compression type {kind}; expected 0 (none)")
    return raw[:size]


def _entries(block: bytes, what: str) -> Iterator[tuple[bytes, bytes]]:
    """The (key, value) pairs of a block: prefix-compressed keys, then restart offsets."""
    if len(block) < 4:
        raise _Bad(f"{what} is too short ({len(block)} bytes) to hold its restart count")
    restarts = int.from_bytes(block[-4:], "little")
    end = len(block) - 4 - 4 * restarts
    if restarts < 1 or end < 0:
        raise _Bad(f"{what} claims {restarts} restart points, which do not fit its {len(block)} bytes")
    i, key = 0, b""
    while i < end:
        shared, i = _varint(block, i, end)
        unshared, i = _varint(block, i, end)
        length, i = _varint(block, i, end)
        if shared > len(key) or unshared + length > end - i:
            raise _Bad(f"{what}: an entry claims more bytes than the block holds")
        key = key[:shared] + block[i : i + unshared]
        i += unshared
        yield key, block[i : i + length]
        i += length


def _handle(value: bytes) -> tuple[int, int]:
    offset, i = _varint(value, 0, len(value))
    size, _ = _varint(value, i, len(value))
    return offset, size


def _table(path: Path) -> list[tuple[bytes, bytes]]:
    """Every (key, value) of the index file, in order; keys ascending, blocks checksummed."""
    size = path.stat().st_size
    if size < FOOTER_LEN:
        raise _Bad(f"the file has {size} bytes, fewer than the 48 of a table's footer: truncated, or not an index")
    if size > MAX_INDEX_BYTES:
        raise _Bad(f"the index has {size} bytes, more than the {MAX_INDEX_BYTES} remap reads")
    with open(path, "rb") as f:
        f.seek(size - FOOTER_LEN)
        footer = f.read(FOOTER_LEN)
        if footer[-8:] != _MAGIC_BYTES:
            raise _Bad(
                "no table magic (0xdb4775248b80fb57) in its last 8 bytes: the index is truncated, damaged, "
                "or not a TensorFlow checkpoint index"
            )
        meta_at, i = _varint(footer, 0, 40)
        meta_size, i = _varint(footer, i, 40)
        index_at, i = _varint(footer, i, 40)
        index_size, _ = _varint(footer, i, 40)
        limit = size - FOOTER_LEN
        _block(f, meta_at, meta_size, limit, "the metaindex block")  # empty in a bundle: only checked
        out: list[tuple[bytes, bytes]] = []
        for n, (_, value) in enumerate(_entries(_block(f, index_at, index_size, limit, "the index block"), "the index block")):
            at, length = _handle(value)
            what = f"data block {n}"
            for key, val in _entries(_block(f, at, length, limit, what), what):
                if len(out) >= MAX_ENTRIES:
                    raise _Bad(f"the index holds more than {MAX_ENTRIES} entries, more than remap reads")
                if out and key <= out[-1][0]:
                    raise _Bad(f"{what}: key {_show(key)} does not come after {_show(out[-1][0])}; the index is damaged")
                out.append((key, val))
    return out


def _show(key: bytes) -> str:
    return repr(key.decode("utf-8", "backslashreplace")[:120])


# ---------------------------------------------------------------------------- bundle entries


@dataclass(frozen=True, slots=True)
class BundleEntry:
    """One ``BundleEntryProto``: where a tensor's bytes are (``slices``: its slices' extents)."""

    name: str
    dtype: int
    shape: tuple[int, ...]
    shard: int
    offset: int
    size: int
    crc32c: int
    slices: tuple[tuple[tuple[int, int], ...], ...] = ()  # per slice, per dim: (start, length or -1 for all)

    @property
    def dtype_name(self) -> str:
        return DTYPES.get(self.dtype) or OTHER_DTYPES.get(self.dtype) or f"DataType {self.dtype}"


def _shape(buf: bytes, what: str) -> tuple[int, ...]:
    dims = []
    for number, _, value in _fields(buf, what):
        if number == 2:
            size = 0
            for n2, _, v2 in _fields(value if isinstance(value, bytes) else b"", what):
                if n2 == 1:
                    size = _int(v2, f"{what}: a dimension")
            if size < 0:
                raise _Bad(f"{what} has a dimension of unknown size ({size}); a saved tensor's shape is known")
            dims.append(size)
        elif number == 3 and value:
            raise _Bad(f"{what} has an unknown rank; a saved tensor's shape is known")
    if len(dims) > MAX_DIMS:
        raise _Bad(f"{what} has {len(dims)} dimensions, more than TensorFlow's {MAX_DIMS}")
    return tuple(dims)


def _slice(buf: bytes, rank: int, what: str) -> tuple[tuple[int, int], ...]:
    extents = []
    for number, _, value in _fields(buf, what):
        if number == 1:
            start, length = 0, -1
            for n2, _, v2 in _fields(value if isinstance(value, bytes) else b"", what):
                if n2 == 1:
                    start = _int(v2, f"{what}: a start")
                elif n2 == 2:
                    length = _int(v2, f"{what}: a length")
            extents.append((start, length))
    if len(extents) != rank:
        raise _Bad(f"{what} has {len(extents)} extents for a tensor of rank {rank}")
    return tuple(extents)


def _entry(name: str, buf: bytes) -> BundleEntry:
    what = f"the entry of {name!r}"
    dtype, shape, shard, offset, size, crc, slices = 0, b"", 0, 0, 0, 0, []
    for number, _, value in _fields(buf, what):
        if number == 1:
            dtype = _int(value, f"{what}: dtype")
        elif number == 2:
            shape = value if isinstance(value, bytes) else b""
        elif number == 3:
            shard = _int(value, f"{what}: shard_id")
        elif number == 4:
            offset = _int(value, f"{what}: offset")
        elif number == 5:
            size = _int(value, f"{what}: size")
        elif number == 6:
            crc = _int(value, f"{what}: crc32c")
        elif number == 7:
            slices.append(value if isinstance(value, bytes) else b"")
    dims = _shape(shape, f"{what}: shape")
    if shard < 0 or offset < 0 or size < 0:
        raise _Bad(f"{what} has a negative shard, offset or size ({shard}, {offset}, {size})")
    if len(slices) > MAX_SLICES:
        raise _Bad(f"{what} is split into {len(slices)} slices, more than the {MAX_SLICES} remap reads")
    return BundleEntry(name, dtype, dims, shard, offset, size, crc, tuple(_slice(s, len(dims), what) for s in slices))


@dataclass(frozen=True)
class BundleIndex:
    """What an index holds: shard count, entries by name, slice entries by encoded key."""

    shards: int
    entries: dict[str, BundleEntry]
    slice_entries: dict[bytes, BundleEntry]


def read_bundle_index(path: Path) -> BundleIndex:
    """Parse ``PREFIX.index``: header and entries, every structure checked (SourceError otherwise)."""
    where = str(path)
    try:
        table = _table(path)
        if not table or table[0][0] != b"":
            raise _Bad("its first entry is not the bundle header (key ''): not a TensorFlow tensor bundle")
        shards = _header(table[0][1])
        entries, slice_entries = {}, {}
        for key, value in table[1:]:
            if key.startswith(b"\x00"):  # a slice of a partitioned variable, named by its extents
                slice_entries[key] = _entry(_show(key), value)
                continue
            try:
                name = key.decode("utf-8")
            except UnicodeDecodeError:
                raise _Bad(f"the key {_show(key)} is not UTF-8 text") from None
            entries[name] = _entry(name, value)
    except _Bad as exc:
        raise SourceError(str(exc), where=where) from None
    except OSError as exc:
        raise SourceError(f"cannot read it: {exc.strerror or exc}", where=where) from None
    return BundleIndex(shards, entries, slice_entries)


def _header(buf: bytes) -> int:
    """The shard count of a ``BundleHeaderProto``, its byte order and version checked."""
    shards, endianness, min_consumer = 1, 0, 0
    for number, _, value in _fields(buf, "the bundle header"):
        if number == 1:
            shards = _int(value, "the header's num_shards")
        elif number == 2:
            endianness = _int(value, "the header's endianness")
        elif number == 3 and isinstance(value, bytes):
            for n2, _, v2 in _fields(value, "the header's version"):
                if n2 == 2:
                    min_consumer = _int(v2, "the header's min_consumer")
    if endianness != 0:
        raise _Bad("the bundle was written big-endian; remap reads little-endian bundles (what x86 and ARM write)")
    if min_consumer > 1:
        raise _Bad(f"the bundle needs a reader of format version {min_consumer}; remap reads version 1")
    if not 1 <= shards <= MAX_SHARDS:
        raise _Bad(f"the header claims {shards} data shards; expected 1 to {MAX_SHARDS}")
    return shards


# ---------------------------------------------------------------------------- slice keys (OrderedCode)


def _ordered_unsigned(value: int) -> bytes:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big") if value else b""
    return bytes([len(raw)]) + raw


_SIGNED_HEADERS = [(0, 0), (0x80, 0), (0xC0, 0), (0xE0, 0), (0xF0, 0), (0xF8, 0), (0xFC, 0), (0xFE, 0), (0xFF, 0),
                   (0xFF, 0x80), (0xFF, 0xC0)]  # fmt: skip


def _ordered_signed(value: int) -> bytes:
    """TensorFlow's OrderedCode ``WriteSignedNumIncreasing``.

    >>> _ordered_signed(0), _ordered_signed(7), _ordered_signed(-1), _ordered_signed(100)
    (b'\\x80', b'\\x87', b'\\x7f', b'\\xc0d')
    """
    x = ~value if value < 0 else value
    n = -(-(x.bit_length() + 1) // 7)
    if n == 1:
        return bytes([(0x80 ^ value) & 0xFF])
    raw = bytearray(value.to_bytes(10, "big", signed=True)[10 - n :])
    raw[0] ^= _SIGNED_HEADERS[n][0]
    raw[1] ^= _SIGNED_HEADERS[n][1]
    return bytes(raw)


def slice_key(name: str, extents: tuple[tuple[int, int], ...]) -> bytes:
    """The index key of one slice of ``name`` (TensorFlow's ``EncodeTensorNameSlice``)."""
    escaped = name.encode("utf-8").replace(b"\xff", b"\xff\x00").replace(b"\x00", b"\x00\xff")
    out = [_ordered_unsigned(0), escaped, b"\x00\x01", _ordered_unsigned(len(extents))]
    for start, length in extents:
        out += [_ordered_signed(start), _ordered_signed(length)]
    return b"".join(out)


# ---------------------------------------------------------------------------- the object graph


class _Node:
    """One object: its children, its variables' (full_name, checkpoint key), the node ids of
    the slot variables it lists. Empty ones (most of a Keras graph) share empty tuples."""

    __slots__ = ("children", "variables", "slots")

    def __init__(self) -> None:
        self.children: list[tuple[str, int]] | tuple[()] = ()
        self.variables: list[tuple[str, str]] | tuple[()] = ()
        self.slots: list[int] | tuple[()] = ()


def _graph(buf: bytes) -> list[_Node]:
    """A ``TrackableObjectGraph``: its nodes, with children, variables and slot variables."""
    nodes = []
    for number, _, value in _fields(buf, "the object graph"):
        if number != 1 or not isinstance(value, bytes):
            continue
        if len(nodes) >= MAX_GRAPH_NODES:
            raise _Bad(f"the object graph holds more than {MAX_GRAPH_NODES} objects, more than remap reads")
        node = _Node()
        for n2, _, v2 in _fields(value, "an object of the graph"):
            if not isinstance(v2, bytes) or n2 not in (1, 2, 3):
                continue
            parts = {n3: v3 for n3, _, v3 in _fields(v2, "an object of the graph")}
            if n2 == 1:
                node.children = node.children or []
                node.children.append((_text(parts.get(2, b""), "a child's name"), _int(parts.get(1, 0), "a child's id")))
            elif n2 == 2 and parts.get(1) == b"VARIABLE_VALUE":
                node.variables = node.variables or []
                node.variables.append((_text(parts.get(2, b""), "a full_name"), _text(parts.get(3, b""), "a checkpoint_key")))
            elif n2 == 3:
                node.slots = node.slots or []
                node.slots.append(_int(parts.get(3, 0), "a slot variable's id"))
        nodes.append(node)
    for node in nodes:
        for _, child in (*node.children, *((None, s) for s in node.slots)):
            if not 0 <= child < len(nodes):
                raise _Bad(f"the object graph names object {child}, but holds {len(nodes)} objects")
    return nodes


@dataclass
class _Var:
    """One variable of the checkpoint, as the engine will see it."""

    entry: BundleEntry
    kind: str  # "weight", "slot" or "bookkeeping"
    full_name: str = ""
    path: str = ""  # object path, / separated, never through an optimizer for a weight


def _string_scalar(raw: bytes, crc: int, what: str) -> bytes:
    """The bytes of a scalar string tensor as a bundle stores it: a varint length, the masked
    CRC32C of that length, the bytes. TensorFlow's checksum runs over the length as a uint32
    (uint64 past 4 GiB), the length's checksum and the bytes."""
    n, i = _varint(raw, 0, len(raw))
    if i + 4 + n != len(raw):
        raise _Bad(f"{what}: a string of {n} bytes does not fill its {len(raw)}")
    length = struct.pack("<I" if n <= 0xFFFFFFFF else "<Q", n)
    if _mask(crc32c(raw[i:], crc32c(length))) != crc:
        raise _Bad(f"{what} fails its checksum (CRC32C): the data file is damaged")
    return raw[i + 4 :]


def _classify_graph(nodes: list[_Node], entries: dict[str, BundleEntry]) -> dict[str, _Var]:
    """Each checkpoint key the graph names -> its variable, sorted into weights, slots, bookkeeping."""
    optimizers = {child for node in nodes for name, child in node.children if name == "optimizer"}
    optimizers |= {i for i, node in enumerate(nodes) if node.slots or _OPTIMIZER_CHILDREN & {n for n, _ in node.children}}
    slot_nodes = {s for node in nodes for s in node.slots}
    paths: dict[int, str] = {0: ""}  # shortest object path of each node reached without entering an optimizer
    queue = deque([0])
    while queue:
        at = queue.popleft()
        for name, child in nodes[at].children:
            if child not in paths and child not in optimizers:
                paths[child] = f"{paths[at]}/{name}" if paths[at] else name
                queue.append(child)
    out: dict[str, _Var] = {}
    for i, node in enumerate(nodes):
        for full_name, key in node.variables:
            entry = entries.get(key)
            if entry is None:
                continue  # a variable the graph tracks without a value in this checkpoint
            scalar = entry.shape == ()
            last = (full_name or key.removesuffix(_ATTR_SUFFIX)).rsplit("/", 1)[-1]
            if i in slot_nodes or _SLOT_MARK in key:
                kind = "slot"
            elif i in paths:
                kind = "bookkeeping" if scalar and last in BOOKKEEPING else "weight"
            else:  # held only by an optimizer
                kind = "bookkeeping" if scalar else "slot"
            path = paths.get(i) or key.removesuffix(_ATTR_SUFFIX)
            out[key] = _Var(entry, kind, full_name, path)
    return out


def _classify_names(entries: dict[str, BundleEntry]) -> dict[str, _Var]:
    """A name-based (TF1) checkpoint: a variable named under another one is its optimizer slot."""
    out = {}
    for name, entry in entries.items():
        parent = name.rpartition("/")[0]
        if parent and parent in entries:
            kind = "slot"
        elif entry.shape == () and name.rsplit("/", 1)[-1] in BOOKKEEPING:
            kind = "bookkeeping"
        else:
            kind = "weight"
        out[name] = _Var(entry, kind, "", name)
    return out


def _model_prefix(names: list[str]) -> str | None:
    """The first part every weight's name shares, when each keeps two parts or more without it."""
    parts = [n.split("/") for n in names]
    if not parts or any(len(p) < 3 for p in parts):
        return None
    first = {p[0] for p in parts}
    return first.pop() if len(first) == 1 else None


def _dotted(variables: dict[str, _Var]) -> dict[str, _Var]:
    """Each variable by its path with dots for slashes; two paths that become one key are an error."""
    out: dict[str, _Var] = {}
    for var in variables.values():
        key = var.path.replace("/", ".")
        if key in out:
            raise _Bad(f"the variables {out[key].entry.name!r} and {var.entry.name!r} both become the key {key!r} "
                       "once slashes are dots; remap cannot tell them apart")
        out[key] = var
    return out


def _name(variables: dict[str, _Var], graph: bool) -> tuple[dict[str, _Var], str]:
    """Keys (dotted) for every variable, and the note that says how they were named."""
    if not graph:
        return _dotted(variables), "names: the checkpoint's own (dense/kernel -> dense.kernel)"
    weights = [v for v in variables.values() if v.kind == "weight"]
    full = [v.full_name for v in weights]
    if weights and all(full) and len(set(full)) == len(full):
        prefix = _model_prefix(full)

        def own(v: _Var) -> str:
            name = v.full_name.removeprefix(f"{prefix}/") if prefix else v.full_name
            return name.replace("/", ".")

        keys = {own(v): v for v in weights}
        for v in variables.values():
            if v.kind != "weight":
                key = own(v) if v.full_name else ""
                keys[key if key and key not in keys else v.path.replace("/", ".")] = v
        if len(keys) == len(variables):
            left = f", less the model name {prefix!r} they all start with" if prefix else ""
            return keys, f"names: each variable's own name in the checkpoint's object graph (its full_name){left}"
    keys = _dotted(variables)
    missing = sum(not v.full_name for v in weights)
    why = f"{missing} weights have no name of their own" if missing else "the variables' own names are not unique"
    return keys, "names: object paths (a/b/.ATTRIBUTES/VARIABLE_VALUE -> a.b)" + (f", because {why}" if weights else "")


# ---------------------------------------------------------------------------- finding the index


def _index_of_data(path: Path) -> Path | None:
    found = _DATA_RE.match(path.name)
    return path.with_name(found["prefix"] + ".index") if found else None


def resolve_path(path: Path) -> Path | None:
    """The ``.index`` that ``path`` stands for, or None when it is no TensorFlow layout:
    a checkpoint prefix (``ckpt`` for ``ckpt.index``), a SavedModel folder, its
    ``variables/`` folder, or a folder of checkpoints (the one its ``checkpoint`` file
    names, else its only ``*.index``).

    >>> resolve_path(Path("/nonexistent/ckpt")) is None
    True
    """
    if not path.exists():
        index = path.with_name(path.name + ".index")
        return index if path.name and index.is_file() else None
    if not path.is_dir():
        return None
    for candidate in (path / "variables" / "variables.index", path / "variables.index"):
        if candidate.is_file():
            return candidate
    named = _latest(path)
    if named is not None:
        return named
    indexes = [p for p in path.iterdir() if p.name.endswith(".index") and p.is_file()]
    return indexes[0] if len(indexes) == 1 else None


def _latest(folder: Path) -> Path | None:
    """The index of the checkpoint that the folder's ``checkpoint`` file names (model_checkpoint_path)."""
    state = folder / "checkpoint"
    try:
        if not state.is_file() or state.stat().st_size > 1 << 20:
            return None
        text = state.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = re.search(r'^model_checkpoint_path:\s*"((?:[^"\\]|\\.)*)"', text, re.M)
    if not found:
        return None
    index = folder / (Path(found[1]).name + ".index")  # TF1 wrote absolute paths: the name is what counts
    return index if index.is_file() else None


# ---------------------------------------------------------------------------- detection and opening


def sniff(head: bytes, path: Path) -> bool:
    """A table whose last 8 bytes are the magic; a ``*.index`` whose first entry looks like
    a bundle header (so a truncated one gets this reader's message); a data shard whose
    ``.index`` lies beside it.

    >>> sniff(b"\\x00\\x00\\x04\\x08\\x01\\x1a\\x02", Path("ckpt.index"))
    True
    """
    data_index = _index_of_data(path)
    if data_index is not None and data_index.is_file():
        return True
    if path.name.endswith(".index") and len(head) >= 4 and head[:2] == b"\x00\x00" and head[3] in (0x08, 0x10, 0x1A):
        return True
    try:
        with open(path, "rb") as f:
            f.seek(0, 2)
            if f.tell() < FOOTER_LEN:
                return False
            f.seek(-8, 2)
            return f.read(8) == _MAGIC_BYTES
    except OSError:
        return False


def open_reader(path: Path, *, key: str | None = None, trust_pickle: bool = False) -> _Reader:
    """The reader of the bundle whose index is ``path`` (or whose data shard it is).

    ``key``: ``weights`` (the default), ``optimizer`` (slots and bookkeeping) or ``all``.
    ``trust_pickle`` changes nothing: a bundle holds no pickles.
    """
    if key is not None and key not in KEY_CHOICES:
        raise SourceError(
            f"source.key {key!r} does not apply to a TensorFlow checkpoint; expected one of {', '.join(KEY_CHOICES)} "
            "(weights is the default), or leave `key` out",
            where=str(path),
        )
    index = _index_of_data(path) or path
    return _BundleReader(index, key or "weights", data_file=path if index != path else None)


class _BundleReader(_Reader):
    """A tensor bundle: ``meta`` from its index, each tensor one bounded read from its shard."""

    format = FORMAT

    def __init__(self, path: Path, include: str, data_file: Path | None = None) -> None:
        self.path, self._stamp, self.entries, self.notes = path, _stamp(path), {}, []
        self.parts = [] if include == "weights" else [include]  # shown as the source's key
        where = str(path)
        bundle = read_bundle_index(path)
        self._slices = bundle.slice_entries
        prefix = path.name.removesuffix(".index")
        self._shard_paths = [path.with_name(f"{prefix}.data-{i:05d}-of-{bundle.shards:05d}") for i in range(bundle.shards)]
        self._shard_sizes: dict[int, tuple[int, ...]] = {}  # shard -> its stamp, for the shards read
        if data_file is not None:
            self.notes.append(f"{data_file.name} belongs to the checkpoint {prefix}: read through its index {path.name}")
        try:
            variables, skipped, graph = self._variables(bundle)
            keyed, how = _name(variables, graph)
        except _Bad as exc:
            raise SourceError(str(exc), where=where) from None
        self.notes.append(how)
        wanted = _WANTED[include]
        self.meta: dict[str, TensorMeta] = {}
        self._vars: dict[str, _Var] = {}
        for key in sorted(keyed):
            var = keyed[key]
            if var.kind in wanted:
                self._check_bytes(var.entry, where)
                self.meta[key] = TensorMeta(var.entry.shape, DTYPES[var.entry.dtype])
                self._vars[key] = var
        left = {kind: sorted(k for k, v in keyed.items() if v.kind == kind) for kind in _KINDS if kind not in wanted}
        for kind, keys in left.items():
            if keys:
                shown = ", ".join(keys[:4]) + (", …" if len(keys) > 4 else "")
                self.entries[f"({_KINDS[kind]})"] = f"{len(keys)} left out ({shown}); `source.key: all` includes them"
        self.entries.update(skipped)
        if not self.meta:
            found = ", ".join(f"{len(v)} {_KINDS[k]}" for k, v in left.items() if v) or "no variables"
            raise SourceError(f"the checkpoint offers no tensors under source.key {include!r}: it holds {found}",
                              where=where)

    # -------------------------------------------------------------- planning

    def _variables(self, bundle: BundleIndex) -> tuple[dict[str, _Var], dict[str, str], bool]:
        """The readable variables by checkpoint key, what was skipped and why, whether a graph named them."""
        skipped: dict[str, str] = {}
        readable: dict[str, BundleEntry] = {}
        strings = 0
        for name, entry in bundle.entries.items():
            if entry.dtype in DTYPES:
                readable[name] = entry
            elif entry.dtype == 7 and not name.endswith(_ATTR_SUFFIX):
                strings += name != OBJECT_GRAPH  # object configs and other metadata kept as text
            else:
                skipped[name.removesuffix(_ATTR_SUFFIX).replace("/", ".")] = (
                    f"a {entry.dtype_name} tensor {list(entry.shape)}: not a weight remap can read, not read")
        if strings:
            skipped["(metadata strings)"] = f"{strings} string values (object configs and the like): not read"
        graph_entry = bundle.entries.get(OBJECT_GRAPH)
        if graph_entry is None:
            return _classify_names(readable), skipped, False
        nodes = _graph(self._graph_bytes(graph_entry))
        skipped[OBJECT_GRAPH] = f"the object graph ({len(nodes)} objects): used to name and sort the variables"
        variables = _classify_graph(nodes, readable)
        for name, entry in readable.items():
            if name not in variables:  # a value the graph does not name: kept by its own name
                variables[name] = _classify_names({name: entry})[name]
        return variables, skipped, True

    def _graph_bytes(self, entry: BundleEntry) -> bytes:
        if entry.dtype != 7 or entry.shape != () or entry.slices:
            raise _Bad(f"{OBJECT_GRAPH} is a {entry.dtype_name} tensor {list(entry.shape)}; expected a scalar string")
        if entry.size > MAX_GRAPH_BYTES:
            raise _Bad(f"{OBJECT_GRAPH} claims {entry.size} bytes, more than the {MAX_GRAPH_BYTES} remap reads")
        return _string_scalar(self._bytes(entry, OBJECT_GRAPH), entry.crc32c, OBJECT_GRAPH)

    def _shard(self, entry: BundleEntry, name: str) -> Path:
        """The data file of ``entry``, which must exist and hold its bytes."""
        if entry.shard >= len(self._shard_paths):
            raise _Bad(f"{name!r} lies in shard {entry.shard}, but the header says {len(self._shard_paths)} shards")
        shard = self._shard_paths[entry.shard]
        if entry.shard not in self._shard_sizes:
            try:
                self._shard_sizes[entry.shard] = _stamp(shard)
            except FileNotFoundError:
                raise _Bad(f"the data shard {shard.name} (holding {name!r}) is missing: no file {shard}") from None
            except OSError as exc:
                raise _Bad(f"the data shard {shard.name} cannot be read: {exc.strerror or exc}") from None
        length = self._shard_sizes[entry.shard][0]
        if entry.offset + entry.size > length:
            raise _Bad(
                f"{name!r} claims bytes {entry.offset}..{entry.offset + entry.size} of {shard.name}, which has "
                f"{length} bytes: the shard is truncated or the index lies"
            )
        return shard

    def _bytes(self, entry: BundleEntry, name: str) -> bytes:
        shard = self._shard(entry, name)
        with open(shard, "rb") as f:
            f.seek(entry.offset)
            raw = f.read(entry.size)
        if len(raw) != entry.size:
            raise _Bad(f"{shard.name} ended before the {entry.size} bytes of {name!r}")
        return raw

    def _check_bytes(self, entry: BundleEntry, where: str) -> None:
        """The entry's size is its shape's, and its bytes (or its slices' bytes) lie in existing shards."""
        try:
            if entry.slices:
                self._check_slices(entry)
                return
            need = math.prod(entry.shape) * (_ITEMSIZE.get(DTYPES[entry.dtype], 1))
            if entry.size != need:
                raise _Bad(
                    f"{entry.name!r}: shape {list(entry.shape)} of {DTYPES[entry.dtype]} needs {need} bytes, but the "
                    f"index says {entry.size}; the index lies or is damaged"
                )
            self._shard(entry, entry.name)
        except _Bad as exc:
            raise SourceError(str(exc), where=where) from None

    def _check_slices(self, entry: BundleEntry) -> None:
        """Every slice lies inside the tensor, none overlaps another, together they cover it,
        and each one's entry is in the index with the slice's shape and dtype."""
        boxes = []
        for extents in entry.slices:
            box = []
            for (start, length), dim in zip(extents, entry.shape, strict=True):
                stop = dim if length == -1 else start + length
                if start < 0 or length < -1 or stop > dim:
                    raise _Bad(f"{entry.name!r}: a slice {list(extents)} lies outside its shape {list(entry.shape)}")
                box.append((start, stop))
            boxes.append(box)
            part = self._slices.get(slice_key(entry.name, extents))
            shape = tuple(b - a for a, b in box)
            if part is None:
                raise _Bad(f"{entry.name!r}: its slice {list(extents)} has no entry in the index")
            if part.shape != shape or part.dtype != entry.dtype or part.slices:
                raise _Bad(f"{entry.name!r}: its slice {list(extents)} holds {part.dtype_name} {list(part.shape)}, "
                           f"expected {entry.dtype_name} {list(shape)}")
            self._check_bytes(part, str(self.path))
        for i, a in enumerate(boxes):
            for b in boxes[:i]:
                if all(x0 < y1 and y0 < x1 for (x0, x1), (y0, y1) in zip(a, b)):
                    raise _Bad(f"{entry.name!r}: two of its slices overlap ({a} and {b})")
        if sum(math.prod(y - x for x, y in box) for box in boxes) != math.prod(entry.shape):
            raise _Bad(f"{entry.name!r}: its {len(boxes)} slices do not cover its shape {list(entry.shape)}")

    # -------------------------------------------------------------- reading

    def _check_unchanged(self) -> None:
        super()._check_unchanged()
        for shard, stamp in self._shard_sizes.items():
            try:
                now = _stamp(self._shard_paths[shard])
            except OSError as exc:
                raise SourceError(f"cannot read it any more: {exc.strerror or exc}", where=str(self._shard_paths[shard])) from None
            if now != stamp:
                raise SourceError("the file changed on disk since its metadata was read; plan again",
                                  where=str(self._shard_paths[shard]))

    def span(self, key: str) -> Span | None:
        var = self._vars[key]
        entry, dtype = var.entry, DTYPES[var.entry.dtype]
        if entry.slices or dtype == "bool":
            return None  # assembled from slices, or bools read() makes 0/1
        shape = entry.shape
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        return Span(str(self._shard_paths[entry.shard]), entry.offset, entry.size, dtype, shape, stride)

    def read(self, key: str) -> torch.Tensor:
        self._check_unchanged()
        var = self._vars[key]
        try:
            if not var.entry.slices:
                return self._tensor(var.entry)
            import torch

            out = torch.empty(var.entry.shape, dtype=getattr(torch, DTYPES[var.entry.dtype]))
            for extents in var.entry.slices:
                part = self._tensor(self._slices[slice_key(var.entry.name, extents)])
                view = out
                for dim, (start, length) in enumerate(extents):
                    view = view.narrow(dim, start, out.shape[dim] if length == -1 else length)
                view.copy_(part)
            return out
        except _Bad as exc:
            raise SourceError(f"cannot read tensor {key!r}: {exc}", where=str(self.path)) from None
        except OSError as exc:
            raise self._fail_read(key, exc) from None

    def _tensor(self, entry: BundleEntry) -> torch.Tensor:
        """One entry's bytes as a tensor: one read of ``size`` bytes at ``offset``."""
        import torch

        dtype = DTYPES[entry.dtype]
        shard = self._shard_paths[entry.shard]
        raw = torch.empty(entry.size, dtype=torch.uint8)
        if entry.size:
            view = memoryview((ctypes.c_char * entry.size).from_address(raw.data_ptr())).cast("B")
            with open(shard, "rb") as f:
                f.seek(entry.offset)
                done = 0
                while done < entry.size:
                    n = f.readinto(view[done:])
                    if not n:
                        raise _Bad(f"{shard.name} ended after {done} of the {entry.size} bytes at {entry.offset}")
                    done += n
        if dtype == "bool":
            return (raw != 0).reshape(entry.shape)
        return raw.view(getattr(torch, dtype)).reshape(entry.shape)

    def release(self) -> None:
        pass

