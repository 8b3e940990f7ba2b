"""Flax ``.msgpack`` files: what ``flax.serialization.to_bytes`` and ``msgpack_serialize`` write.

The file is one msgpack map, nested maps below it, with arrays as msgpack *extension*
values (flax/serialization.py, ``_MsgpackExtType``):

- code 1, an ndarray: its payload is itself msgpack, the triple ``(shape, dtype name, raw
  bytes)``, the bytes in C order and in the writing machine's byte order (little-endian on
  every machine JAX runs on; the file does not record it). The dtype is numpy's name
  (``float32``), or ml_dtypes' (``bfloat16``, ``float8_e4m3fn``), which torch shares;
- code 2, a Python complex number, and code 3, a NumPy scalar (``np.float32(0.5)``): not
  arrays; listed in ``entries`` and skipped;
- an array larger than flax's ``MAX_CHUNK_SIZE`` (1 GiB) is the map
  ``{"__msgpack_chunked_array__": True, "shape": {"0": d0, ...}, "chunks": {"0": ext, ...}}``
  of flat pieces; remap stitches the pieces back into one key.

Keys are the map keys joined with dots, from the top: a Flax variables dict
``{"params": ..., "batch_stats": ...}`` gives ``params.Dense_0.kernel`` and
``batch_stats.BatchNorm_0.mean``. The collection stays in the key, because a module's
state_dict holds both collections and the names under them may repeat (a BatchNorm has
``params.BatchNorm_0.bias`` and ``batch_stats.BatchNorm_0.mean``); the shipped
``flax-layout`` fragment maps them onto PyTorch's names. ``source.key: params`` reads one
collection only, keyed without it. A list (a msgpack array; ``to_bytes`` already writes
lists as maps keyed ``"0"``, ``"1"``, ...) gives the keys ``0``, ``1``, .... Other leaves
(ints, strings, ``None``, complex numbers, NumPy scalars, arrays of strings) are listed in
``entries`` and are not tensors; an array whose numeric dtype torch lacks (``int4``) is an
error when it is among the weights read.

**Why not the msgpack library.** ``msgpack.Unpacker`` hands an extension to ``ext_hook``
only as a ``bytes`` object holding its whole payload, so planning would read (and hold)
every array of the file. Instead a small walker here reads the msgpack headers only: for
each ndarray it reads the extension's header, the payload's shape and dtype, and the
length of its raw buffer, records where the buffer sits, and skips it without reading
it. Planning reads a few hundred bytes per array; ``read(key)`` is one bounded read of the
buffer into fresh memory. No library but torch is needed (``EXTRA`` is None).

**Hostile files.** Every length a header claims (map and list sizes, strings, binaries,
extensions, array buffers) is checked against what the file still holds before anything
is read or allocated; an array's buffer must be exactly what its shape and dtype need and
end exactly where its extension ends; nesting is at most ``MAX_DEPTH`` deep, and the file
holds at most ``MAX_ITEMS`` map entries and list items in all; map keys must be UTF-8
strings of at most ``MAX_KEY_BYTES`` bytes, and unique; bytes after the top-level map,
unknown extension codes and the byte 0xc1 (never used by msgpack) are refused. Each error
says what was found, at which key path and byte offset.
"""

from __future__ import annotations

import math
import struct
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Union

from ..errors import SourceError
from ..meta import TensorMeta
from .readers import Span, _Reader, _stamp

if TYPE_CHECKING:
    import torch

__all__ = ["FORMAT", "EXTRA", "sniff", "open_reader", "MAX_DEPTH", "MAX_ITEMS", "MAX_KEY_BYTES"]

FORMAT = "msgpack"
EXTRA = None  # the reader needs nothing but torch

MAX_DEPTH = 64  # nesting of maps and lists; a Flax tree is rarely ten deep
MAX_ITEMS = 1_000_000  # map entries plus list items in the whole file; a large model's state has tens of thousands
MAX_KEY_BYTES = 4096
MAX_DIMS = 64  # numpy's own limit on an array's rank
MAX_ENTRIES = 64  # non-array leaves listed in ``entries``; the rest are counted in a note
CHUNKED = "__msgpack_chunked_array__"

_LOOKAHEAD = 256  # bytes read ahead while walking headers: a few headers, never much of an array
_READ = 1 << 24  # bytes per read() call into a tensor

#: numpy / ml_dtypes names (as flax writes them) -> (torch name, bytes per element)
_DTYPES = {
    "float64": ("float64", 8), "float32": ("float32", 4), "float16": ("float16", 2), "bfloat16": ("bfloat16", 2),
    "float8_e4m3fn": ("float8_e4m3fn", 1), "float8_e5m2": ("float8_e5m2", 1),
    "complex64": ("complex64", 8), "complex128": ("complex128", 16),
    "int64": ("int64", 8), "int32": ("int32", 4), "int16": ("int16", 2), "int8": ("int8", 1),
    "uint64": ("uint64", 8), "uint32": ("uint32", 4), "uint16": ("uint16", 2), "uint8": ("uint8", 1), "bool": ("bool", 1),
}  # fmt: skip
#: numpy dtype names that are not numbers (strings, dates, raw bytes): such arrays are entries, not weights
_NOT_NUMERIC = ("str", "bytes", "datetime64", "timedelta64", "void", "object")

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3
#: bytes of the big-endian length after a str, bin, list or map type byte
_WIDTHS = {0xD9: 1, 0xDA: 2, 0xDB: 4, 0xC4: 1, 0xC5: 2, 0xC6: 4, 0xDC: 2, 0xDD: 4, 0xDE: 2, 0xDF: 4}


# ---------------------------------------------------------------------------- detection


def sniff(head: bytes, path: Path) -> bool:
    """A msgpack map at byte 0 whose keys are text, in which an ndarray extension (code 1,
    its payload starting with the 3-item array ``(shape, dtype, data)``) shows within
    ``head``; when ``head`` holds no array (a first array beyond 512 bytes, a file of no
    arrays), a valid msgpack map counts when the file is named ``*.msgpack``.

    >>> sniff(b"\\x81\\xa6params\\x81\\xa1w\\xc7\\x0f\\x01\\x93\\x91\\x01\\xa7float32\\xc4\\x04\\x00\\x00\\x80?", Path("x.bin"))
    True
    >>> sniff(b"\\x80\\x02}q\\x00.", Path("model.msgpack"))  # a pickle: an empty map, then more bytes
    False
    """
    verdict = _head_verdict(head)
    return verdict == "array" or (verdict in ("whole", "cut") and path.suffix.lower() == ".msgpack")


def _str_len(head: bytes, pos: int) -> tuple[int, int] | None:
    """(length, data start) of a msgpack str header at ``pos``, or None when it is no str."""
    b = head[pos]
    if 0xA0 <= b <= 0xBF:
        return b & 0x1F, pos + 1
    width = {0xD9: 1, 0xDA: 2, 0xDB: 4}.get(b)
    if width is None:
        return None
    if pos + 1 + width > len(head):
        raise IndexError
    return int.from_bytes(head[pos + 1 : pos + 1 + width], "big"), pos + 1 + width


def _head_verdict(head: bytes) -> str | None:
    """Walk the msgpack in ``head``: ``"array"`` (an ndarray extension met), ``"whole"`` (one
    map, ending exactly at the end of ``head``, no array in it), ``"cut"`` (``head`` ends
    inside a valid map) or None (not a Flax msgpack file: no map at byte 0, a key that is not
    text, an unknown extension, bytes after the map)."""
    if not head or not (0x80 <= head[0] <= 0x8F or head[0] in (0xDE, 0xDF)):
        return None
    pos = 0
    stack: list[list[int]] = []  # [items left, 1 if a map, 1 if its next item is a key]
    keys = 0  # map keys met so far
    try:
        while True:
            if stack and stack[-1][1] and stack[-1][2]:  # a map key: printable text, the first one not empty
                found = _str_len(head, pos)
                if found is None:
                    return None
                n, pos = found
                key = head[pos : pos + n]
                if (n == 0 and not keys) or any(c < 0x20 or c == 0x7F for c in key):
                    return None
                keys += 1
                if len(key) == n:
                    key.decode("utf-8")  # UnicodeDecodeError: not text
                pos += n
                if pos > len(head):
                    return "cut"
                stack[-1][2] = 0
                continue
            b = head[pos]
            pos += 1
            if 0x80 <= b <= 0x8F or 0x90 <= b <= 0x9F or b in (0xDC, 0xDD, 0xDE, 0xDF):
                if b <= 0x9F:
                    n = b & 0x0F
                else:
                    width = 2 if b in (0xDC, 0xDE) else 4
                    if pos + width > len(head):
                        return "cut"
                    n = int.from_bytes(head[pos : pos + width], "big")
                    pos += width
                is_map = int(0x80 <= b <= 0x8F or b in (0xDE, 0xDF))
                if len(stack) >= MAX_DEPTH:
                    return "cut"  # valid so far; too deep to judge here (the reader refuses it, by name)
                if n:
                    stack.append([n, is_map, is_map])
                    continue
            elif b in (0xD4, 0xD5, 0xD6, 0xD7, 0xD8, 0xC7, 0xC8, 0xC9):  # an extension
                if b >= 0xD4:
                    n = 1 << (b - 0xD4)
                else:
                    width = 1 << (b - 0xC7)
                    if pos + width > len(head):
                        return "cut"
                    n = int.from_bytes(head[pos : pos + width], "big")
                    pos += width
                code = struct.unpack_from("b", head, pos)[0]
                if code not in (_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR):
                    return None
                if code == _EXT_NDARRAY:
                    if pos + 3 > len(head):
                        return "cut"
                    triple, shape = head[pos + 1], head[pos + 2]
                    return "array" if triple == 0x93 and (0x90 <= shape <= 0x9F or shape in (0xDC, 0xDD)) else None
                pos += 1 + n
            elif b == 0xC1:
                return None
            else:
                pos += _scalar_size(head, pos, b)
            if pos > len(head):
                return "cut"
            while stack:  # a value ended: count it in its container(s)
                top = stack[-1]
                top[0] -= 1
                top[2] = top[1]
                if top[0]:
                    break
                stack.pop()
            if not stack:
                return "whole" if pos == len(head) else None
    except IndexError:
        return "cut"
    except UnicodeDecodeError:
        return None


def _scalar_size(head: bytes, pos: int, b: int) -> int:
    """Bytes after the type byte ``b`` of a scalar (int, float, nil, bool, str, bin)."""
    if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
        return 0
    if 0xA0 <= b <= 0xBF:
        return b & 0x1F
    fixed = {0xCA: 4, 0xCB: 8, 0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8, 0xD0: 1, 0xD1: 2, 0xD2: 4, 0xD3: 8}
    if b in fixed:
        return fixed[b]
    width = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}[b]  # bin, str
    if pos + width > len(head):
        raise IndexError
    return width + int.from_bytes(head[pos : pos + width], "big")


# ---------------------------------------------------------------------------- opening


def open_reader(path: Path, *, key: str | None = None, trust_pickle: bool = False) -> _MsgpackReader:
    """The reader of the Flax msgpack file ``path``; ``key`` (``"params"``) reads one subtree,
    keyed from below it (``trust_pickle`` does not apply: msgpack holds no code)."""
    return _MsgpackReader(path, key)


# ---------------------------------------------------------------------------- the tree


@dataclass(frozen=True)
class _Array:
    """One ndarray extension: where its raw bytes sit, and what they are."""

    at: int  # offset of the extension's type byte (for messages)
    offset: int  # first byte of the raw buffer
    nbytes: int
    shape: tuple[int, ...]
    stored: str  # the dtype name as written
    dtype: str | None  # torch's name, None when torch has no such dtype


@dataclass(frozen=True)
class _Chunked:
    """A ``__msgpack_chunked_array__`` map: flat pieces, one array."""

    at: int
    shape: tuple[int, ...]
    dtype: str
    parts: tuple[_Array, ...]


@dataclass(frozen=True)
class _Leaf:
    """Anything else that is not a map: a short description, and the value of a small scalar."""

    text: str
    value: Any = None


class _Map(dict):  # type: ignore[type-arg]
    """A msgpack map (or list, keyed "0", "1", ...) and the offset of its header."""

    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at


_Node = Union[_Map, _Array, _Chunked, _Leaf]


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(path) if path else "the top level"


class _Walker:
    """Reads the msgpack headers of a file with small positioned reads, never an array's bytes.

    ``pos`` is an absolute offset; ``take`` and ``skip`` refuse to pass the end of the file
    (a truncated file, or a length that lies), before reading anything.
    """

    def __init__(self, f: IO[bytes], size: int, where: str) -> None:
        self.f, self.size, self.where = f, size, where
        self.pos = 0
        self.items = 0
        self._buf, self._buf_at = b"", 0  # bytes read ahead, and the offset of their first byte

    def fail(self, message: str, path: tuple[str, ...], at: int) -> SourceError:
        return SourceError(f"{message} (at {_dotted(path)!s}, byte {at:,})", where=self.where)

    def take(self, n: int, what: str, path: tuple[str, ...]) -> bytes:
        if self.pos + n > self.size:
            raise self.fail(self._past_end(n, what), path, self.pos)
        start = self.pos - self._buf_at
        if start < 0 or start + n > len(self._buf):
            self.f.seek(self.pos)
            self._buf = self.f.read(max(n, min(_LOOKAHEAD, self.size - self.pos)))
            self._buf_at, start = self.pos, 0
            if len(self._buf) < n:
                raise self.fail(f"the file ended while reading {what}; it is truncated", path, self.pos)
        self.pos += n
        return self._buf[start : start + n]

    def skip(self, n: int, what: str, path: tuple[str, ...]) -> None:
        if self.pos + n > self.size:
            raise self.fail(self._past_end(n, what), path, self.pos)
        self.pos += n

    def _past_end(self, n: int, what: str) -> str:
        return (
            f"{what} claims {n:,} bytes from byte {self.pos:,}, but the file ends at byte {self.size:,}; "
            "the file is truncated or the length lies"
        )

    def byte(self, what: str, path: tuple[str, ...]) -> int:
        return self.take(1, what, path)[0]

    def uint(self, width: int, what: str, path: tuple[str, ...]) -> int:
        return int.from_bytes(self.take(width, what, path), "big")

    def count(self, n: int, per_item: int, what: str, path: tuple[str, ...], at: int) -> None:
        """Check a container's claimed size against the bytes left and the file's item budget."""
        left = self.size - self.pos
        if n * per_item > left:
            raise self.fail(
                f"{what} claims {n:,} items, more than the {left:,} bytes left in the file can hold "
                "(the file is truncated or the count lies)",
                path,
                at,
            )
        self.items += n
        if self.items > MAX_ITEMS:
            raise self.fail(
                f"the file holds more than {MAX_ITEMS:,} map entries and list items; a Flax checkpoint holds far "
                "fewer, so remap stops here rather than build the tree",
                path,
                at,
            )

    # ------------------------------------------------------------------------ values

    def value(self, path: tuple[str, ...], depth: int) -> _Node:
        at = self.pos
        b = self.byte("a value's type byte", path)
        if b <= 0x7F:
            return _Leaf(f"int {b}", b)
        if b >= 0xE0:
            return _Leaf(f"int {b - 0x100}", b - 0x100)
        if b <= 0x8F or b in (0xDE, 0xDF):
            n = b & 0x0F if b <= 0x8F else self.uint(2 if b == 0xDE else 4, "a map's size", path)
            return self.map(n, path, depth, at)
        if b <= 0x9F or b in (0xDC, 0xDD):
            n = b & 0x0F if b <= 0x9F else self.uint(2 if b == 0xDC else 4, "a list's size", path)
            return self.list(n, path, depth, at)
        if b <= 0xBF or b in (0xD9, 0xDA, 0xDB):
            n = b & 0x1F if b <= 0xBF else self.uint({0xD9: 1, 0xDA: 2, 0xDB: 4}[b], "a string's length", path)
            return self.text(n, path)
        if b == 0xC0:
            return _Leaf("None")
        if b in (0xC2, 0xC3):
            return _Leaf(str(b == 0xC3), b == 0xC3)
        if b in (0xC4, 0xC5, 0xC6):
            n = self.uint(1 << (b - 0xC4), "a binary's length", path)
            self.skip(n, "a binary value", path)
            return _Leaf(f"{n:,} bytes of binary data")
        if b in (0xCA, 0xCB):
            number = struct.unpack(">f" if b == 0xCA else ">d", self.take(4 if b == 0xCA else 8, "a float", path))[0]
            return _Leaf(f"float {number!r}", number)
        if 0xCC <= b <= 0xD3:
            width = 1 << ((b - 0xCC) % 4)
            number = int.from_bytes(self.take(width, "an integer", path), "big", signed=b >= 0xD0)
            return _Leaf(f"int {number}", number)
        if b in (0xC7, 0xC8, 0xC9) or 0xD4 <= b <= 0xD8:
            n = 1 << (b - 0xD4) if b >= 0xD4 else self.uint(1 << (b - 0xC7), "an extension's length", path)
            code = struct.unpack("b", self.take(1, "an extension's type code", path))[0]
            if self.pos + n > self.size:
                raise self.fail(self._past_end(n, "an extension"), path, at)
            return self.extension(code, n, path, at)
        raise self.fail("found the byte 0xc1, which msgpack never uses; the file is damaged", path, at)

    def map(self, n: int, path: tuple[str, ...], depth: int, at: int) -> _Node:
        if depth >= MAX_DEPTH:
            raise self.fail(f"maps and lists nest more than {MAX_DEPTH} deep; a Flax checkpoint nests far less", path, at)
        self.count(n, 2, f"a map of {n:,} entries", path, at)
        node = _Map(at)
        for _ in range(n):
            key_at = self.pos
            key = self.key(path)
            if key in node:
                raise self.fail(f"the map holds the key {key!r} twice", path, key_at)
            node[key] = self.value((*path, key), depth + 1)
        if CHUNKED in node:
            return self.chunked(node, path)
        return node

    def list(self, n: int, path: tuple[str, ...], depth: int, at: int) -> _Map:
        if depth >= MAX_DEPTH:
            raise self.fail(f"maps and lists nest more than {MAX_DEPTH} deep; a Flax checkpoint nests far less", path, at)
        self.count(n, 1, f"a list of {n:,} items", path, at)
        node = _Map(at)
        for i in range(n):
            node[str(i)] = self.value((*path, str(i)), depth + 1)
        return node

    def key(self, path: tuple[str, ...]) -> str:
        at = self.pos
        b = self.byte("a map key", path)
        if 0xA0 <= b <= 0xBF:
            n = b & 0x1F
        elif b in (0xD9, 0xDA, 0xDB):
            n = self.uint({0xD9: 1, 0xDA: 2, 0xDB: 4}[b], "a key's length", path)
        else:
            raise self.fail(f"a map key is {_kind(b)}, not a string; Flax writes string keys only", path, at)
        if n > MAX_KEY_BYTES:
            raise self.fail(f"a map key claims {n:,} bytes; remap reads keys of at most {MAX_KEY_BYTES:,}", path, at)
        raw = self.take(n, "a map key", path)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"a map key is not valid UTF-8 text ({raw[:40]!r})", path, at) from None

    def text(self, n: int, path: tuple[str, ...]) -> _Leaf:
        if n > 60:
            self.skip(n, "a string", path)
            return _Leaf(f"a string of {n:,} bytes")
        raw = self.take(n, "a string", path)
        return _Leaf(repr(raw.decode("utf-8", errors="replace")))

    # ------------------------------------------------------------------------ extensions

    def extension(self, code: int, n: int, path: tuple[str, ...], at: int) -> _Node:
        if code == _EXT_NDARRAY:
            return self.ndarray(n, path, at)
        if code == _EXT_COMPLEX:
            self.skip(n, "a complex number", path)
            return _Leaf("a Python complex number (not an array)")
        if code == _EXT_NPSCALAR:
            scalar = self.ndarray(n, path, at)
            return _Leaf(f"a NumPy {scalar.stored} scalar (not an array)")
        raise self.fail(
            f"a msgpack extension of type {code}, which Flax does not write (it writes 1: ndarray, "
            "2: complex number, 3: NumPy scalar); the file is damaged or not Flax's",
            path,
            at,
        )

    def list_len(self, b: int, what: str, path: tuple[str, ...]) -> int | None:
        """The item count of a list header starting with ``b``, or None when ``b`` starts no list."""
        if 0x90 <= b <= 0x9F:
            return b & 0x0F
        return self.uint(_WIDTHS[b], what, path) if b in (0xDC, 0xDD) else None

    def blob_len(self, b: int, what: str, path: tuple[str, ...]) -> int | None:
        """The length of a str or bin header starting with ``b``, or None when ``b`` starts neither."""
        if 0xA0 <= b <= 0xBF:
            return b & 0x1F
        return self.uint(_WIDTHS[b], what, path) if b in (0xD9, 0xDA, 0xDB, 0xC4, 0xC5, 0xC6) else None

    def ndarray(self, n: int, path: tuple[str, ...], at: int) -> _Array:
        """The payload ``(shape, dtype name, raw bytes)`` of an ndarray extension of ``n``
        bytes starting at ``self.pos``: everything but the raw bytes is read."""
        end, what = self.pos + n, "an array's header"
        b = self.byte(what, path)
        size = self.list_len(b, what, path)
        if size != 3:
            of = f" of {size} items" if size is not None else ""
            raise self.fail(f"an ndarray extension holds {_kind(b)}{of}, expected the list (shape, dtype, data) that "
                            "Flax writes", path, at)  # fmt: skip
        b = self.byte(what, path)
        dims = self.list_len(b, what, path)
        if dims is None:
            raise self.fail(f"an array's shape is {_kind(b)}, expected a list of sizes", path, at)
        if dims > MAX_DIMS:
            raise self.fail(f"an array's shape claims {dims:,} dimensions; numpy allows at most {MAX_DIMS}", path, at)
        shape = tuple(self.size_item(path, at) for _ in range(dims))
        b = self.byte(what, path)
        length = self.blob_len(b, what, path)
        if length is None or length > 64:
            of = f" of {length:,} bytes" if length is not None else ""
            raise self.fail(f"an array's dtype is {_kind(b)}{of}, expected a short name such as 'float32'", path, at)
        stored = self.take(length, what, path).decode("ascii", errors="replace")
        b = self.byte(what, path)
        nbytes = self.blob_len(b, what, path)
        if nbytes is None:
            raise self.fail(f"an array's data is {_kind(b)}, expected binary data", path, at)
        offset = self.pos
        if offset + nbytes != end:
            raise self.fail(
                f"an array's data claims {nbytes:,} bytes from byte {offset:,}, but its extension ends at byte "
                f"{end:,}; the file is damaged or a length lies",
                path,
                at,
            )
        self.skip(nbytes, "an array's data", path)
        known = _DTYPES.get(stored)
        if known is not None:
            need = math.prod(shape) * known[1]
            if need != nbytes:
                shown = "[" + ", ".join(map(str, shape)) + "]"
                raise self.fail(
                    f"an array claims shape {shown} of {stored} ({need:,} bytes), but holds {nbytes:,} bytes of data; "
                    "the file is damaged or its header lies",
                    path,
                    at,
                )
        return _Array(at, offset, nbytes, shape, stored, known[0] if known else None)

    def size_item(self, path: tuple[str, ...], at: int) -> int:
        """One dimension of a shape: a non-negative msgpack integer."""
        b = self.byte("an array's shape", path)
        if b <= 0x7F:
            return b
        if 0xCC <= b <= 0xD3:
            width = 1 << ((b - 0xCC) % 4)
            d = int.from_bytes(self.take(width, "an array's shape", path), "big", signed=b >= 0xD0)
            if d >= 0:
                return d
        raise self.fail(f"an array's shape holds {_kind(b)}, expected a non-negative integer", path, at)

    def chunked(self, node: _Map, path: tuple[str, ...]) -> _Chunked:
        """Flax's ``{"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {...}}``, checked."""
        at = node.at
        what = "a chunked array (__msgpack_chunked_array__)"
        if set(node) != {CHUNKED, "shape", "chunks"}:
            raise self.fail(f"{what} holds the keys {sorted(node)}, expected exactly {CHUNKED!r}, 'shape' and 'chunks'", path, at)
        flag, dims, chunks = node[CHUNKED], node["shape"], node["chunks"]
        if not (isinstance(flag, _Leaf) and flag.value is True):
            raise self.fail(f"{what}: its {CHUNKED!r} entry is {_describe(flag)}, expected True", path, at)
        if not isinstance(dims, _Map) or list(dims) != [str(i) for i in range(len(dims))] or not all(
            isinstance(d, _Leaf) and type(d.value) is int and d.value >= 0 for d in dims.values()
        ):
            raise self.fail(f"{what}: its shape is {_describe(dims)}, expected a map of sizes keyed '0', '1', ...", path, at)
        if not isinstance(chunks, _Map) or not chunks or list(chunks) != [str(i) for i in range(len(chunks))]:
            raise self.fail(f"{what}: its chunks are {_describe(chunks)}, expected a map of arrays keyed '0', '1', ...", path, at)
        parts: list[_Array] = []
        for i, part in enumerate(chunks.values()):
            if not isinstance(part, _Array) or len(part.shape) != 1 or (parts and part.stored != parts[0].stored):
                raise self.fail(f"{what}: chunk {i} is {_describe(part)}, expected a flat array of the first chunk's dtype",
                                path, at)  # fmt: skip
            parts.append(part)
        shape = tuple(d.value for d in dims.values())
        first = parts[0]
        if first.dtype is None:
            raise self.fail(f"{what} holds dtype {first.stored!r}, which torch has no equivalent of", path, at)
        total = sum(p.shape[0] for p in parts)
        if total != math.prod(shape):
            raise self.fail(f"{what} claims shape {list(shape)} ({math.prod(shape):,} elements), but its chunks hold "
                            f"{total:,}; the file is damaged or its header lies", path, at)  # fmt: skip
        return _Chunked(at, shape, first.dtype, tuple(parts))


def _kind(b: int) -> str:
    """What a msgpack type byte starts, for messages."""
    if b <= 0x7F or b >= 0xE0 or 0xCC <= b <= 0xD3:
        return "an integer"
    if b <= 0x8F or b in (0xDE, 0xDF):
        return "a map"
    if b <= 0x9F or b in (0xDC, 0xDD):
        return "a list"
    if b <= 0xBF or b in (0xD9, 0xDA, 0xDB):
        return "a string"
    names = {0xC0: "None", 0xC1: "the unused byte 0xc1", 0xC2: "a bool", 0xC3: "a bool", 0xCA: "a float", 0xCB: "a float"}
    if b in names:
        return names[b]
    return "binary data" if b in (0xC4, 0xC5, 0xC6) else "an extension"


def _describe(node: Any) -> str:
    if isinstance(node, _Leaf):
        return node.text
    if isinstance(node, _Array):
        return f"an array {list(node.shape)} of {node.stored}"
    if isinstance(node, _Chunked):
        return f"a chunked array {list(node.shape)} of {node.dtype}"
    n, arrays = len(node), _count_arrays(node)
    return f"a map of {n:,} {'entry' if n == 1 else 'entries'} ({arrays:,} {'array' if arrays == 1 else 'arrays'})"


def _count_arrays(node: Any) -> int:
    if isinstance(node, _Map):
        return sum(_count_arrays(v) for v in node.values())
    return int(isinstance(node, (_Array, _Chunked)))


# ---------------------------------------------------------------------------- the reader


class _MsgpackReader(_Reader):
    """A Flax msgpack file: ``meta`` from the headers at construction, each array's bytes on ``read``."""

    format = FORMAT

    def __init__(self, path: Path, key: str | None = None) -> None:
        self.path, self._stamp = path, _stamp(path)
        self.meta: dict[str, TensorMeta] = {}
        self.entries: dict[str, str] = {}
        self.notes: list[str] = []
        self.parts: list[str] = []
        self._arrays: dict[str, _Array | _Chunked] = {}
        self._file: IO[bytes] | None = None
        where = str(path)
        try:
            with open(path, "rb", buffering=0) as f:
                walker = _Walker(f, self._stamp[0], where)
                if self._stamp[0] == 0 or walker.byte("the first byte", ()) not in (*range(0x80, 0x90), 0xDE, 0xDF):
                    raise SourceError("not a Flax msgpack file: it does not start with a msgpack map", where=where)
                walker.pos = 0
                tree = walker.value((), 0)
                if walker.pos != walker.size:
                    raise SourceError(
                        f"{walker.size - walker.pos:,} bytes follow the end of the top-level map at byte {walker.pos:,}; "
                        "a Flax msgpack file is exactly one map (the file is damaged or two files were joined)",
                        where=where,
                    )
        except OSError as exc:
            raise SourceError(f"cannot read it: {exc.strerror or exc}", where=where) from None
        if not isinstance(tree, _Map):  # the first byte is a map's: a chunked array is the only other outcome
            raise SourceError("the file is one chunked array, not a map of arrays; remap reads Flax state dicts", where=where)
        self._flatten(self._select(tree, key), (), [], set())
        if not self.meta:
            raise SourceError(
                "the file holds no arrays" + (f" under source.key {key!r}" if key else "")
                + (f"; it holds {', '.join(f'{k!r} ({v})' for k, v in list(self.entries.items())[:8])}" if self.entries else ""),
                where=where,
            )  # fmt: skip
        self._note(tree, key)

    # ------------------------------------------------------------------------ planning

    def _select(self, tree: _Map, key: str | None) -> _Map:
        """The subtree ``key`` ("params", "a.b") names; a map key may itself contain dots."""
        if key is None:
            return tree
        parts, node, i = key.split("."), tree, 0
        while i < len(parts):
            for j in range(len(parts), i, -1):
                name = ".".join(parts[i:j])
                if name in node:
                    break
            else:
                at = f"under {'.'.join(self.parts)!r}" if self.parts else "at the top level"
                found = ", ".join(f"{k!r} ({_describe(v)})" for k, v in list(node.items())[:12])
                raise SourceError(f"source.key {key!r}: no entry {parts[i]!r} {at}; found {found or 'nothing'}",
                                  where=str(self.path))  # fmt: skip
            self.parts.append(name)
            node, i = node[name], j
            if not isinstance(node, _Map):
                raise SourceError(f"source.key {key!r} names {_describe(node)}, expected a map of arrays", where=str(self.path))
        for name, value in tree.items():
            if name != self.parts[0]:
                self.entries[name] = f"{_describe(value)}, not read (source.key is {key!r})"
        return node

    def _flatten(self, node: _Map, path: tuple[str, ...], others: list[str], seen: set[str]) -> None:
        """Keys for the arrays under ``node``; other leaves go to ``entries`` (the first
        ``MAX_ENTRIES``) or ``others``; ``seen`` holds every leaf's key, to refuse two alike."""
        for name, value in node.items():
            sub = (*path, name)
            key = ".".join(sub)
            if isinstance(value, _Map):
                self._flatten(value, sub, others, seen)
                continue
            if key in seen:
                raise SourceError(
                    f"two entries both give the key {key!r} (a map key holding a dot, such as {'.'.join(sub[-2:])!r} "
                    "next to a nested map); remap cannot tell them apart",
                    where=str(self.path),
                )
            seen.add(key)
            if isinstance(value, _Array) and value.dtype is None:
                if value.stored.startswith(_NOT_NUMERIC):
                    value = _Leaf(f"an array {list(value.shape)} of {value.stored} (not numbers, skipped)")
                else:
                    raise SourceError(
                        f"the array {key!r} (byte {value.at:,}) has dtype {value.stored!r}, which torch has no "
                        f"equivalent of; expected one of {', '.join(_DTYPES)}. Convert it before saving, or read "
                        "another subtree with source.key",
                        where=str(self.path),
                    )
            if isinstance(value, _Leaf):
                if len(self.entries) < MAX_ENTRIES:
                    self.entries[key] = value.text
                else:
                    others.append(key)
                continue
            self._arrays[key] = value
            self.meta[key] = TensorMeta(value.shape, value.dtype)  # type: ignore[arg-type]  # checked above
        if not path and others:
            self.notes.append(f"{len(others):,} more entries that are not arrays, not listed (e.g. {others[0]!r})")

    def _note(self, tree: _Map, key: str | None) -> None:
        if key is None and tree and all(isinstance(v, _Map) for v in tree.values()):
            shown = ", ".join(f"{name} ({_count_arrays(v):,} arrays)" for name, v in tree.items())
            self.notes.append(f"top-level maps (Flax collections): {shown}; keys start with them (params.Dense_0.kernel)")
        chunked = sum(isinstance(a, _Chunked) for a in self._arrays.values())
        if chunked:
            what = "array" if chunked == 1 else "arrays"
            self.notes.append(f"{chunked} {what} stored in chunks (Flax's {CHUNKED}), each read as one tensor")

    # ------------------------------------------------------------------------ reading

    def span(self, key: str) -> Span | None:
        a = self._arrays[key]
        if isinstance(a, _Chunked):
            if len(a.parts) > 1:
                return None  # the pieces are apart in the file
            a = _Array(a.at, a.parts[0].offset, a.parts[0].nbytes, a.shape, a.parts[0].stored, a.dtype)
        if a.dtype == "bool" or sys.byteorder != "little":
            return None  # bools that read() normalises to 0/1; a big-endian machine swaps
        stride = tuple(math.prod(a.shape[i + 1 :]) for i in range(len(a.shape)))
        return Span(str(self.path), a.offset, a.nbytes, a.dtype, a.shape, stride)  # type: ignore[arg-type]

    def read(self, key: str) -> torch.Tensor:
        import torch

        self._check_unchanged()
        a = self._arrays[key]
        parts = a.parts if isinstance(a, _Chunked) else (a,)
        nbytes = sum(p.nbytes for p in parts)
        try:
            if self._file is None:
                self._file = open(self.path, "rb", buffering=0)  # noqa: SIM115 - kept open until release()
            buf = bytearray(nbytes)
            view, done = memoryview(buf), 0
            for part in parts:
                self._file.seek(part.offset)
                end = done + part.nbytes
                while done < end:
                    n = self._file.readinto(view[done : min(end, done + _READ)])
                    if not n:
                        raise SourceError(
                            f"the data of {key!r} ended after {done:,} of {nbytes:,} bytes; the file is truncated",
                            where=str(self.path),
                        )
                    done += n
        except OSError as exc:
            raise self._fail_read(key, exc) from None
        dtype: str = a.dtype  # type: ignore[assignment]  # numeric: checked when planning
        raw = torch.frombuffer(buf, dtype=torch.uint8) if nbytes else torch.empty(0, dtype=torch.uint8)
        if sys.byteorder != "little" and dtype != "bool":
            unit = _DTYPES[dtype][1] // (2 if dtype.startswith("complex") else 1)
            raw = raw.view(-1, unit).flip(1).reshape(-1)
        tensor = raw != 0 if dtype == "bool" else raw.view(getattr(torch, dtype))
        return tensor.reshape(a.shape)

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
