"""ONNX models: the graph's initializers, named, shaped and typed from the protobuf alone.

An ``.onnx`` file is one protobuf ``ModelProto``; its weights are the ``initializer``
tensors of the top-level graph, their bytes either inside the file (``raw_data`` or a typed
field such as ``float_data``) or in external data files beside it (``data_location:
EXTERNAL`` with ``location``/``offset``/``length``). ``onnx.load`` would read every byte of the
file, so the metadata is taken by a small protobuf scanner instead: it reads field headers,
names, dims and types, and *seeks past* tensor bytes, so planning reads a few kilobytes of a
gigabyte model. Tensor data is read at :meth:`OnnxReader.read` time with one bounded read
(``raw_data``, embedded or external), or, for the rare tensor kept in typed fields, by handing
that one ``TensorProto``'s bytes to ``onnx.numpy_helper.to_array``.

Keys are the initializer names as the graph spells them (``conv1.weight``, or a graph-internal
``onnx::Conv_123``); ``entries[key]`` names the nodes that consume each one (``input 1 of Conv
/conv1/Conv``, looking through the ``Identity`` nodes an exporter puts before a shared
initializer) and :attr:`OnnxReader.order` lists the keys in the order the graph first uses
them, evidence for aligning graph-internal names with a module's.

Everything the scanner meets is checked against the file: every length inside its message,
every message inside the file, tensor byte counts against shape times dtype, external files
inside the model's folder (symlinks resolved) and their byte ranges inside those files. A
file that fails any check is a :class:`~remap.errors.SourceError`; nothing in it is run.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SourceError
from ..meta import MAX_SIZE, TensorMeta
from .readers import Span, _Reader, _stamp
from .registry import require_extra

if TYPE_CHECKING:
    import torch

FORMAT = "onnx"
EXTRA = "onnx"

__all__ = ["FORMAT", "EXTRA", "sniff", "open_reader", "OnnxReader", "ONNX_DTYPES"]

#: ONNX ``TensorProto.DataType`` -> (torch dtype name, bytes per element), for every element
#: type a torch tensor can hold. STRING, the 2/4/6-bit types and UNDEFINED are refused.
ONNX_DTYPES: dict[int, tuple[str, int]] = {
    1: ("float32", 4), 2: ("uint8", 1), 3: ("int8", 1), 4: ("uint16", 2), 5: ("int16", 2),
    6: ("int32", 4), 7: ("int64", 8), 9: ("bool", 1), 10: ("float16", 2), 11: ("float64", 8),
    12: ("uint32", 4), 13: ("uint64", 8), 14: ("complex64", 8), 15: ("complex128", 16),
    16: ("bfloat16", 2), 17: ("float8_e4m3fn", 1), 18: ("float8_e4m3fnuz", 1), 19: ("float8_e5m2", 1),
    20: ("float8_e5m2fnuz", 1), 24: ("float8_e8m0fnu", 1),
}  # fmt: skip
_ONNX_TYPE_NAMES = {
    0: "UNDEFINED", 8: "STRING", 21: "UINT4", 22: "INT4", 23: "FLOAT4E2M1", 25: "UINT2", 26: "INT2",
    27: "FLOAT6E2M3", 28: "FLOAT6E3M2",
}  # fmt: skip

#: Dtypes whose raw bytes the engine may map in place (Span); the others go through read().
_SPAN_DTYPES = {
    "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "uint16", "uint32",
    "uint64", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
}  # fmt: skip

# Field numbers (onnx.proto).
_MODEL_GRAPH = 7
_GRAPH_NODE, _GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER = 1, 5, 15
_NODE_INPUT, _NODE_OUTPUT, _NODE_NAME, _NODE_OP_TYPE = 1, 2, 3, 4
#: Ops that pass a tensor through unchanged: their consumers are the initializer's consumers
#: (``torch.onnx.export`` reads a deduplicated initializer through ``Identity`` nodes).
_PASS_THROUGH = {"Identity"}
_T_DIMS, _T_DATA_TYPE, _T_SEGMENT, _T_NAME, _T_RAW, _T_EXTERNAL, _T_LOCATION = 1, 2, 3, 8, 9, 13, 14
_T_TYPED = {4: "float_data", 5: "int32_data", 6: "string_data", 7: "int64_data", 10: "double_data", 11: "uint64_data"}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL

#: Longest name, op type or external-data entry the scanner reads (real ones are far shorter).
MAX_STRING = 1 << 20
#: Most node inputs looked at per initializer when finding its consumers (a graph built to
#: make the walk quadratic stops here; real initializers have a handful of readers).
_MAX_WALK = 256
#: Most consumers named in one ``entries`` line.
_SHOWN_CONSUMERS = 3
#: ModelProto's field numbers, for :func:`sniff`.
_MODEL_FIELDS = {1, 2, 3, 4, 5, 6, 7, 8, 14, 20, 25, 26}


# ---------------------------------------------------------------------------- detection


def _varint(buf: bytes, i: int) -> tuple[int, int] | None:
    """(value, next index) of the varint at ``buf[i]``, or None."""
    value = 0
    for k in range(10):
        if i + k >= len(buf):
            return None
        b = buf[i + k]
        value |= (b & 0x7F) << (7 * k)
        if not b & 0x80:
            return value, i + k + 1
    return None


def sniff(head: bytes, path: Path) -> bool:
    """An ``.onnx`` file whose first bytes are a ModelProto's ``ir_version`` field.

    ONNX has no magic number: the suffix is required, and the head must start with field 1
    as a varint (``0x08``) holding a plausible IR version, followed by the header of another
    ModelProto field.
    """
    if path.suffix.lower() != ".onnx" or len(head) < 2 or head[0] != 0x08:
        return False
    parsed = _varint(head, 1)
    if parsed is None or not 1 <= parsed[0] <= 64:
        return False
    _, i = parsed
    if i == len(head):
        return True  # a file holding nothing but ir_version: let the reader say what is missing
    tag = _varint(head, i)
    return tag is not None and tag[0] >> 3 in _MODEL_FIELDS and tag[0] & 7 in (0, 2)


# ---------------------------------------------------------------------------- protobuf scanning


class _Scanner:
    """Protobuf wire format read from a file with bounded, seeking reads.

    ``pos`` is an absolute file offset; every read names the end of the message it is in,
    and nothing past that end (or past the file) is read. Skipped fields are never read.
    """

    def __init__(self, f: Any, size: int, where: str) -> None:
        self.f, self.size, self.where = f, size, where
        self.pos = 0
        self._buf, self._base = b"", 0
        self._chunk = 512

    def fail(self, what: str) -> SourceError:
        return SourceError(f"not a valid ONNX protobuf: {what} (at byte {self.pos})", where=self.where)

    def _window(self, n: int) -> tuple[bytes, int]:
        """The buffer and the index of ``pos`` in it, holding up to ``n`` bytes from ``pos``."""
        i = self.pos - self._base
        if 0 <= i and i + n <= len(self._buf):
            return self._buf, i
        sequential = self.pos == self._base + len(self._buf)
        self._chunk = min(self._chunk * 2, 1 << 20) if sequential else 512  # grow on dense runs, small after a seek
        self.f.seek(self.pos)
        self._buf, self._base = self.f.read(max(n, self._chunk)), self.pos
        return self._buf, 0

    def varint(self, end: int) -> int:
        buf, i = self._window(10)
        value = 0
        for k in range(10):
            if self.pos + k >= end or i + k >= len(buf):
                raise self.fail(f"a number runs past the end of its message (byte {end})")
            b = buf[i + k]
            value |= (b & 0x7F) << (7 * k)
            if not b & 0x80:
                self.pos += k + 1
                return value
        raise self.fail("a number is longer than 10 bytes")

    def tag(self, end: int) -> tuple[int, int]:
        key = self.varint(end)
        field, wire = key >> 3, key & 7
        if field == 0:
            raise self.fail("field number 0")
        if wire in (3, 4) or wire > 5:
            raise self.fail(f"wire type {wire} (field {field})")
        return field, wire

    def length(self, end: int) -> int:
        n = self.varint(end)
        if n > end - self.pos:
            raise self.fail(f"a field claims {n} bytes but its message has {end - self.pos} left")
        return n

    def sub(self, end: int) -> int:
        """Reads a length; the end of the submessage (or bytes) that follows."""
        n = self.length(end)
        return self.pos + n

    def skip(self, wire: int, end: int) -> None:
        n = {0: None, 1: 8, 2: -1, 5: 4}[wire]
        if n is None:
            self.varint(end)
            return
        if n < 0:
            n = self.length(end)
        if n > end - self.pos:
            raise self.fail(f"a field needs {n} bytes but its message has {end - self.pos} left")
        self.pos += n

    def take(self, n: int) -> bytes:
        buf, i = self._window(n)
        out = buf[i : i + n]
        if len(out) != n:
            raise self.fail(f"the file ends after {len(out)} of {n} bytes")
        self.pos += n
        return out

    def text(self, wire: int, end: int, what: str) -> str:
        if wire != 2:
            raise self.fail(f"{what} has wire type {wire}, expected a length-delimited string")
        n = self.length(end)
        if n > MAX_STRING:
            raise self.fail(f"{what} is {n} bytes long, more than the {MAX_STRING} remap reads")
        raw = self.take(n)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise self.fail(f"{what} is not UTF-8 text: {exc}") from None

    def fields(self, end: int) -> Iterator[tuple[int, int]]:
        """(field, wire type) of each field up to ``end``; the caller consumes or skips each value."""
        while self.pos < end:
            yield self.tag(end)
        if self.pos != end:
            raise self.fail(f"a message ends at byte {self.pos}, past its declared end {end}")


class _Init:
    """What the scanner found about one initializer."""

    __slots__ = ("name", "dims", "data_type", "raw", "typed", "external", "location", "segment", "message")

    def __init__(self, message: tuple[int, int]) -> None:
        self.name: str | None = None
        self.dims: list[int] = []
        self.data_type = 0
        self.raw: tuple[int, int] | None = None  # (offset, length) of raw_data
        self.typed: dict[str, int] = {}  # typed data field -> bytes it takes
        self.external: dict[str, str] = {}
        self.location = 0
        self.segment = False
        self.message = message  # (offset, length) of the whole TensorProto


def _scan_tensor(s: _Scanner, end: int, start: int) -> _Init:
    t = _Init((start, end - start))
    for field, wire in s.fields(end):
        if field == _T_DIMS:
            if wire == 0:
                t.dims.append(s.varint(end))
            elif wire == 2:  # packed
                stop = s.sub(end)
                while s.pos < stop:
                    t.dims.append(s.varint(stop))
            else:
                raise s.fail(f"dims has wire type {wire}")
            if len(t.dims) > 64:
                raise s.fail("a tensor with more than 64 dims")
        elif field == _T_DATA_TYPE and wire == 0:
            t.data_type = s.varint(end)
        elif field == _T_NAME:
            t.name = s.text(wire, end, "an initializer name")
        elif field == _T_RAW and wire == 2:
            n = s.length(end)
            t.raw = (s.pos, n)
            s.pos += n  # the tensor's bytes: never read here
        elif field == _T_LOCATION and wire == 0:
            t.location = s.varint(end)
        elif field == _T_EXTERNAL and wire == 2:
            stop = s.sub(end)
            k = v = ""
            for f2, w2 in s.fields(stop):
                if f2 == 1:
                    k = s.text(w2, stop, "an external_data key")
                elif f2 == 2:
                    v = s.text(w2, stop, "an external_data value")
                else:
                    s.skip(w2, stop)
            t.external[k] = v
        elif field == _T_SEGMENT:
            t.segment = True
            s.skip(wire, end)
        elif field in _T_TYPED:
            before = s.pos
            s.skip(wire, end)
            t.typed[_T_TYPED[field]] = t.typed.get(_T_TYPED[field], 0) + s.pos - before
        else:
            s.skip(wire, end)
    return t


def _scan_node(s: _Scanner, end: int) -> tuple[str, str, list[str], list[str]]:
    op, name, inputs, outputs = "", "", [], []
    for field, wire in s.fields(end):
        if field == _NODE_INPUT:
            inputs.append(s.text(wire, end, "a node input"))
        elif field == _NODE_OUTPUT:
            outputs.append(s.text(wire, end, "a node output"))
        elif field == _NODE_NAME:
            name = s.text(wire, end, "a node name")
        elif field == _NODE_OP_TYPE:
            op = s.text(wire, end, "a node op_type")
        else:
            s.skip(wire, end)  # attributes (a Constant's tensor, subgraphs): not read
    return op, name, inputs, outputs


def _scan_model(path: Path) -> tuple[list[_Init], list[tuple[str, str, list[str], list[str]]], int]:
    """Initializers, top-level nodes and the number of sparse initializers of the model."""
    where = str(path)
    inits: list[_Init] = []
    nodes: list[tuple[str, str, list[str], list[str]]] = []
    sparse = graphs = 0
    with open(path, "rb", buffering=0) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise SourceError("the file is empty: expected an ONNX model", where=where)
        s = _Scanner(f, size, where)
        for field, wire in s.fields(size):
            if field != _MODEL_GRAPH or wire != 2:
                s.skip(wire, size)
                continue
            graphs += 1
            end = s.sub(size)
            for gfield, gwire in s.fields(end):
                if gfield == _GRAPH_NODE and gwire == 2:
                    stop = s.sub(end)
                    nodes.append(_scan_node(s, stop))
                elif gfield == _GRAPH_INITIALIZER and gwire == 2:
                    n = s.length(end)
                    inits.append(_scan_tensor(s, s.pos + n, s.pos))
                elif gfield == _GRAPH_SPARSE_INITIALIZER:
                    sparse += 1
                    s.skip(gwire, end)
                else:
                    s.skip(gwire, end)
    if not graphs:
        raise SourceError("no graph found: the file is not an ONNX model (ModelProto field 7 is missing)", where=where)
    return inits, nodes, sparse


# ---------------------------------------------------------------------------- the reader


def _inside(base: Path, location: str, key: str, where: str) -> Path:
    """The external data file ``location`` names, refused unless it lies inside ``base``."""
    if not location:
        raise SourceError(f"tensor {key!r}: external data without a 'location'", where=where)
    if "\x00" in location or os.path.isabs(location) or location.startswith(("/", "\\")):
        raise SourceError(
            f"tensor {key!r}: external data location {location!r} is not a path relative to the model's folder",
            where=where,
        )
    target = (base / location).resolve()
    if not target.is_relative_to(base):
        raise SourceError(
            f"tensor {key!r}: external data location {location!r} resolves to {str(target)!r}, "
            f"outside the model's folder {str(base)!r}; refused",
            where=where,
        )
    return target


def _int_field(info: dict[str, str], name: str, key: str, where: str) -> int | None:
    text = info.get(name)
    if text is None or text == "":
        return None
    if not text.isdigit() or len(text) > 20:
        raise SourceError(f"tensor {key!r}: external data {name} {text[:40]!r} is not a non-negative integer", where=where)
    return int(text)


def _consumers(names: Iterable[str], nodes: list[tuple[str, str, list[str], list[str]]]) -> dict[str, list[tuple[int, str, str, int]]]:
    """For each name, the (node index, op_type, node name, input index) of the top-level nodes
    reading it, in graph order, looking through pass-through nodes (``Identity``) to the
    nodes that read their output."""
    readers: dict[str, list[tuple[int, int]]] = {}
    for index, (_, _, inputs, _) in enumerate(nodes):
        for slot, value in enumerate(inputs):
            if value:
                readers.setdefault(value, []).append((index, slot))
    out: dict[str, list[tuple[int, str, str, int]]] = {}
    for name in names:
        uses: list[tuple[int, str, str, int]] = []
        seen, todo, budget = {name}, [name], _MAX_WALK
        while todo and budget > 0:
            for index, slot in readers.get(todo.pop(), ()):
                budget -= 1
                if budget < 0:
                    break
                op, node_name, _, outputs = nodes[index]
                if op in _PASS_THROUGH and outputs:
                    fresh = [v for v in outputs if v not in seen]  # a cycle (a hostile graph) is walked once
                    seen.update(fresh)
                    todo.extend(fresh)
                else:
                    uses.append((index, op, node_name, slot))
        out[name] = sorted(set(uses))
    return out


def _consumers_text(uses: list[tuple[int, str, str, int]]) -> str:
    if not uses:
        return "used by no top-level node"
    parts = [f"input {slot} of {op or '?'} {name or f'(node #{index})'}" for index, op, name, slot in uses[:_SHOWN_CONSUMERS]]
    more = f" and {len(uses) - _SHOWN_CONSUMERS} more" if len(uses) > _SHOWN_CONSUMERS else ""
    return "; ".join(parts) + more


class OnnxReader(_Reader):
    """The initializers of one ONNX model: ``meta`` from the protobuf scan, data on :meth:`read`.

    ``consumers[key]`` lists ``(node index, op_type, node name, input index)`` for each
    top-level node reading the initializer; ``order`` holds the keys by first use in the
    graph (then the unused ones, in file order).
    """

    format = FORMAT

    def __init__(self, path: Path) -> None:
        self.path = path
        where = str(path)
        try:
            self._stamp = _stamp(path)
            inits, nodes, sparse = _scan_model(path)
        except OSError as exc:
            raise SourceError(f"cannot read the ONNX file: {exc.strerror or exc}", where=where) from None
        if sparse:
            raise SourceError(
                f"the graph holds {sparse} sparse initializer(s), which remap does not read; "
                "densify them (onnx's sparse-to-dense) and save again",
                where=where,
            )
        base = path.parent.resolve()
        self.meta: dict[str, TensorMeta] = {}
        self.entries: dict[str, str] = {}
        self._data: dict[str, tuple[str, Path, int, int] | tuple[str, tuple[int, int]]] = {}
        self._externals: dict[Path, tuple[int, ...]] = {}
        for t in inits:
            self._check_tensor(t, base, where)
        users = _consumers(self.meta, nodes)
        self.consumers = users
        for k, uses in users.items():
            self.entries[k] = _consumers_text(uses)
        used = sorted((uses[0][0], uses[0][3], i, k) for i, (k, uses) in enumerate(users.items()) if uses)
        self.order = [k for *_, k in used] + [k for k, uses in users.items() if not uses]
        self._files: dict[Path, Any] = {}

    def _check_tensor(self, t: _Init, base: Path, where: str) -> None:
        if not t.name:
            raise SourceError(f"an initializer (bytes {t.message[0]}..{sum(t.message)}) has no name", where=where)
        key = t.name
        if key in self.meta:
            raise SourceError(f"two initializers are named {key!r}", where=where)
        if t.data_type not in ONNX_DTYPES:
            kind = _ONNX_TYPE_NAMES.get(t.data_type, f"unknown element type {t.data_type}")
            raise SourceError(
                f"tensor {key!r}: element type {kind} has no torch dtype; expected one of "
                + ", ".join(name for name, _ in ONNX_DTYPES.values()),
                where=where,
            )
        dtype, width = ONNX_DTYPES[t.data_type]
        shape = tuple(t.dims)
        if any(d >= 1 << 63 for d in shape):
            raise SourceError(f"tensor {key!r}: negative dimension in dims (shape {[d - (1 << 64) if d >= 1 << 63 else d for d in shape]})", where=where)
        if any(d > MAX_SIZE for d in shape) or math.prod(shape) > MAX_SIZE:
            raise SourceError(f"tensor {key!r}: shape {list(shape)} is larger than any tensor can be", where=where)
        numel = math.prod(shape)
        nbytes = numel * width
        if t.segment:
            raise SourceError(f"tensor {key!r} is segmented, which ONNX itself does not read", where=where)
        if t.location == _EXTERNAL:
            if t.raw is not None or t.typed:
                raise SourceError(f"tensor {key!r} is marked EXTERNAL but also holds data in the file", where=where)
            target = _inside(base, t.external.get("location", ""), key, where)
            try:
                st = target.stat()
            except OSError as exc:
                raise SourceError(
                    f"tensor {key!r}: its external data file {t.external.get('location')!r} cannot be read: "
                    f"{exc.strerror or exc}",
                    where=where,
                ) from None
            if not target.is_file():
                raise SourceError(f"tensor {key!r}: its external data {str(target)!r} is not a regular file", where=where)
            offset = _int_field(t.external, "offset", key, where) or 0
            length = _int_field(t.external, "length", key, where)
            have = st.st_size - offset if length is None else length
            if offset + (length or 0) > st.st_size or have < 0:
                raise SourceError(
                    f"tensor {key!r}: external data bytes {offset}..{offset + (length or 0)} lie outside "
                    f"{t.external.get('location')!r} ({st.st_size} bytes): truncated or lying",
                    where=where,
                )
            if have != nbytes:
                raise SourceError(
                    f"tensor {key!r}: shape {list(shape)} of {dtype} needs {nbytes} bytes, but its external data "
                    f"holds {have}",
                    where=where,
                )
            self._externals.setdefault(target, (st.st_size, st.st_ino, st.st_mtime_ns, st.st_ctime_ns))
            self._data[key] = ("raw", target, offset, nbytes)
        elif t.location != 0:
            raise SourceError(f"tensor {key!r}: unknown data_location {t.location}", where=where)
        elif t.raw is not None:
            if t.typed:
                raise SourceError(f"tensor {key!r} holds both raw_data and {', '.join(t.typed)}", where=where)
            if t.raw[1] != nbytes:
                raise SourceError(
                    f"tensor {key!r}: shape {list(shape)} of {dtype} needs {nbytes} bytes, but its raw_data holds "
                    f"{t.raw[1]}",
                    where=where,
                )
            self._data[key] = ("raw", self.path, t.raw[0], nbytes)
        elif t.typed:
            held = sum(t.typed.values())
            if numel > held:  # every element takes at least one byte on the wire
                raise SourceError(
                    f"tensor {key!r}: shape {list(shape)} claims {numel} elements, but its "
                    f"{', '.join(t.typed)} hold only {held} bytes",
                    where=where,
                )
            self._data[key] = ("proto", t.message)
        elif numel:
            raise SourceError(f"tensor {key!r}: shape {list(shape)} but the tensor holds no data", where=where)
        else:
            self._data[key] = ("raw", self.path, 0, 0)
        self.meta[key] = TensorMeta(shape, dtype)

    # ------------------------------------------------------------------ data

    def _check_unchanged(self) -> None:
        super()._check_unchanged()
        for target, stamp in self._externals.items():
            try:
                now = _stamp(target)
            except OSError as exc:
                raise SourceError(f"cannot read it any more: {exc.strerror or exc}", where=str(target)) from None
            if now != stamp:
                raise SourceError(
                    "the external data file changed on disk since its metadata was read; plan again", where=str(target)
                )

    def span(self, key: str) -> Span | None:
        entry = self._data[key]
        if entry[0] != "raw" or sys.byteorder != "little" or self.meta[key].dtype not in _SPAN_DTYPES:
            return None  # bool bytes are normalised by read(); the rarer float8s are not mapped by the engine
        _, target, offset, nbytes = entry
        shape = self.meta[key].shape
        stride = tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))
        return Span(str(target), offset, nbytes, self.meta[key].dtype, shape, stride)

    def _file(self, target: Path) -> Any:
        f = self._files.get(target)
        if f is None:
            try:
                f = self._files[target] = open(target, "rb", buffering=0)  # noqa: SIM115 - closed by release()
            except OSError as exc:
                raise SourceError(f"cannot open the file for reading: {exc.strerror or exc}", where=str(target)) from None
        return f

    def _bytes(self, key: str, target: Path, offset: int, nbytes: int) -> torch.Tensor:
        """``nbytes`` from ``offset`` of ``target`` into a fresh uint8 tensor (one bounded read)."""
        import torch

        raw = torch.empty(nbytes, dtype=torch.uint8)
        if not nbytes:
            return raw
        view, got = memoryview(raw.numpy()), 0
        f = self._file(target)
        try:
            f.seek(offset)
            while got < nbytes:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
        except OSError as exc:
            raise SourceError(f"cannot read tensor {key!r}: {exc.strerror or exc}", where=str(target)) from None
        if got != nbytes:
            raise SourceError(
                f"cannot read tensor {key!r}: the file ends after {got} of its {nbytes} bytes (from byte {offset})",
                where=str(target),
            )
        return raw

    def read(self, key: str) -> torch.Tensor:
        import torch

        self._check_unchanged()
        meta = self.meta[key]
        entry = self._data[key]
        if entry[0] == "raw":
            _, target, offset, nbytes = entry
            raw = self._bytes(key, target, offset, nbytes)
            if meta.dtype == "bool":
                return (raw != 0).reshape(meta.shape)  # any non-zero byte is true, as numpy reads it
        else:
            raw = self._from_proto(key, entry[1])
        out = raw.view(getattr(torch, meta.dtype)).reshape(meta.shape)
        if sys.byteorder != "little" and out.element_size() > 1:
            out = torch.from_numpy(out.numpy().byteswap())  # ONNX stores little-endian
        return out

    def _from_proto(self, key: str, message: tuple[int, int]) -> torch.Tensor:
        """One TensorProto kept in typed fields, decoded by onnx itself; its bytes as uint8."""
        import numpy as np
        import torch

        onnx = require_extra("onnx", FORMAT, EXTRA, self.path)
        from onnx import numpy_helper

        data = self._bytes(key, self.path, *message).numpy().tobytes()
        meta = self.meta[key]
        try:
            proto = onnx.TensorProto.FromString(data)
            array = np.ascontiguousarray(numpy_helper.to_array(proto))
        except Exception as exc:  # DecodeError, ValueError from a size that does not fit the shape, ...
            raise self._fail_read(key, exc) from None
        width = dict(ONNX_DTYPES.values())[meta.dtype]
        if tuple(array.shape) != meta.shape or array.dtype.itemsize != width:
            raise SourceError(
                f"cannot read tensor {key!r}: onnx decoded {array.dtype} {list(array.shape)}, "
                f"expected {meta.dtype} {list(meta.shape)}",
                where=str(self.path),
            )
        return torch.from_numpy(array.reshape(-1).view(np.uint8).copy())

    def release(self) -> None:
        files, self._files = self._files, {}
        for f in files.values():
            f.close()


def open_reader(path: Path, *, key: str | None, trust_pickle: bool) -> OnnxReader:
    """The reader of one ONNX model (``key`` does not apply; ``trust_pickle`` is not needed)."""
    del trust_pickle  # an ONNX file holds no pickle
    if key is not None:
        raise SourceError(
            f"source.key {key!r} does not apply to an ONNX model: its initializers are the weights", where=str(path)
        )
    return OnnxReader(path)
