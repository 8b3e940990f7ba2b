"""safetensors files: names, shapes and dtypes from the JSON header, tensor data through ``safe_open``.

The header is parsed and checked here (every entry well-formed, the tensors tiling the
data section exactly) without importing torch or the safetensors library; tensor data is
read only on the first :meth:`_SafetensorsReader.read`, or mapped straight from the
:class:`~remap.sources.readers.Span` of each tensor.

>>> _header_entry("w", {"dtype": "F16", "shape": [2, 3], "data_offsets": [0, 12]}, "model.safetensors")
('F16', (2, 3), 0, 12)
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from itertools import repeat
from operator import is_
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..collector import collector_paused
from ..errors import SourceError
from ..meta import TensorMeta, itemsize
from .readers import Span, _check_names, _is_int, _Reader, _short, _stamp, _unique_keys

if TYPE_CHECKING:
    import torch

__all__ = ["MAX_SAFETENSORS_HEADER"]

_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8",
    "U64": "uint64", "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2", "F8_E8M0": "float8_e8m0fnu",
    "C64": "complex64", "C128": "complex128",
}  # fmt: skip
#: safetensors' own limit on the JSON header; a longer one is refused before it is read.
MAX_SAFETENSORS_HEADER = 100_000_000


def _header_entry(key: str, info: Any, where: str) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype code, shape, start, stop) of one header entry, every field checked."""
    expected = 'expected {"dtype": "F32", "shape": [d, ...], "data_offsets": [start, stop]}'
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
        raise SourceError(f"tensor {key!r}: malformed header entry {_short(info)}, {expected}", where=where)
    code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(code, str) or code not in _SAFETENSORS_DTYPES:
        raise SourceError(
            f"tensor {key!r} has dtype {_short(code)}, which remap cannot read; known: {', '.join(_SAFETENSORS_DTYPES)}",
            where=where,
        )
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise SourceError(f"tensor {key!r}: shape {_short(shape)} is not a list of non-negative integers", where=where)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise SourceError(
            f"tensor {key!r}: data_offsets {_short(offsets)} is not a pair of non-negative integers [start, stop]",
            where=where,
        )
    start, stop = offsets
    if stop < start:
        raise SourceError(f"tensor {key!r}: data_offsets [{start}, {stop}] end before they start", where=where)
    nbytes = math.prod(shape) * itemsize(_SAFETENSORS_DTYPES[code])
    if stop - start != nbytes:
        raise SourceError(
            f"tensor {key!r}: shape {list(shape)} of {code} is {nbytes} bytes, but data_offsets [{start}, {stop}] "
            f"hold {stop - start}",
            where=where,
        )
    return code, tuple(shape), start, stop


def _known_entry(info: Any, known: Mapping[tuple[str, tuple[int, ...]], tuple[TensorMeta, int]]) -> tuple[TensorMeta, int, int] | None:
    """(meta, start, stop) of a header entry whose dtype and shape were already checked
    (in ``known``) and whose data_offsets hold exactly that many bytes; None for anything
    else, which :func:`_header_entry` then checks (and names what is wrong)."""
    if type(info) is not dict or len(info) != 3:
        return None
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if type(shape) is not list or type(offsets) is not list or len(offsets) != 2:
        return None
    try:
        found = known.get((info.get("dtype"), tuple(shape)))  # type: ignore[arg-type]
    except TypeError:  # an unhashable dimension: not a shape
        return None
    start, stop = offsets
    if found is None or type(start) is not int or type(stop) is not int or start < 0 or stop - start != found[1]:
        return None
    if not all(map(is_, map(type, shape), repeat(int))):  # True and 1.0 hash as 1 does; only ints are sizes
        return None
    return found[0], start, stop


def _load_header_json(raw: bytes) -> Any:
    """The parsed header, refusing an object that names a key twice, as
    ``object_pairs_hook=_unique_keys`` does, without calling the hook per object.

    Each key of a valid JSON text is followed by one ``:`` outside strings, so with ``C``
    the colons in the text, ``S`` those inside strings and ``P`` the keys written,
    ``C = P + S``; the parsed objects hold ``K <= P`` keys, fewer exactly when a key was
    written twice (or in an object not counted here). Without backslashes in the text a
    parsed string is its text, so colons counted in some parsed strings are at most
    ``S``; ``C - that == K`` then proves ``K == P``: no duplicate. Anything else (a
    backslash and a colon in a string, objects nested deeper than an entry, a parse error)
    parses again with the hook, which raises the same errors it always did.
    """
    text = raw.decode("utf-8")
    try:
        parsed = json.loads(text)
    except (ValueError, RecursionError):
        parsed = None
    if type(parsed) is dict and _no_duplicates(raw, parsed):
        return parsed
    return json.loads(text, object_pairs_hook=_unique_keys)


def _no_duplicates(raw: bytes, header: dict[str, Any]) -> bool:
    """Whether the colons of ``raw`` account for every key of ``header`` and its objects'
    keys, so that no key of them was written twice (see :func:`_load_header_json`)."""
    values = [v for v in header.values() if type(v) is dict]
    keys = len(header) + sum(map(len, values))
    colons = raw.count(b":")
    if colons == keys:
        return True
    if b"\\" in raw:
        return False
    in_names = sum(map(str.count, header, repeat(":")))
    in_values = sum(s.count(":") for v in values for s in v.values() if type(s) is str)
    in_keys = sum(k.count(":") for v in values for k in v)
    return colons - in_names - in_values - in_keys == keys


def _read_safetensors_header(path: Path) -> tuple[dict[str, TensorMeta], dict[str, str], dict[str, tuple[int, int]]]:
    """:func:`_parse_safetensors_header` with the cyclic garbage collector paused: the
    parsed header is a dict and a list or two per tensor that all live until the entries
    are checked, and the collector would rescan them again and again (half the time of a
    header of a million tensors) while freeing nothing."""
    with collector_paused():
        return _parse_safetensors_header(path)


def _parse_safetensors_header(path: Path) -> tuple[dict[str, TensorMeta], dict[str, str], dict[str, tuple[int, int]]]:
    """Names, shapes and dtypes from a safetensors header, without touching tensor data.

    The header is checked as strictly as the safetensors library checks it, because the
    engine maps tensor bytes straight from these offsets: every entry well-formed, each
    tensor's byte length equal to its shape times its dtype's size, and the tensors
    tiling the data section exactly (no gap, no overlap, nothing past the end of the file).
    Nothing longer than the file, and no header above :data:`MAX_SAFETENSORS_HEADER`, is read.
    """
    where, size = str(path), path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SourceError(
                f"truncated safetensors file: {size} bytes, too short for the 8-byte header length", where=where
            )
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise SourceError(
                f"truncated or not a safetensors file: the header claims {length} bytes but only {size - 8} follow",
                where=where,
            )
        if length > MAX_SAFETENSORS_HEADER:
            raise SourceError(
                f"the safetensors header claims {length} bytes, more than the {MAX_SAFETENSORS_HEADER} safetensors allows",
                where=where,
            )
        raw = f.read(length)
    try:
        header = _load_header_json(raw)
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError is a ValueError, as is a duplicate key
        raise SourceError(f"the safetensors header is not valid JSON: {exc}", where=where) from None
    except RecursionError:
        raise SourceError("the safetensors header is not valid JSON: it is nested too deeply", where=where) from None
    if not isinstance(header, dict):
        raise SourceError(f"the safetensors header is a JSON {type(header).__name__}, expected an object", where=where)
    extra = header.pop("__metadata__", None) or {}
    _check_names(header, "the safetensors header", where)
    meta, spans, ranges = {}, {}, []
    known: dict[tuple[str, tuple[int, ...]], tuple[TensorMeta, int]] = {}  # checked (dtype code, shape) -> (meta, bytes)
    for key, info in header.items():
        entry = _known_entry(info, known)
        if entry is None:
            code, shape, start, stop = _header_entry(key, info, where)
            entry_meta = TensorMeta(shape, _SAFETENSORS_DTYPES[code])
            known[(code, shape)] = (entry_meta, stop - start)
        else:
            entry_meta, start, stop = entry
        meta[key] = entry_meta
        spans[key] = (8 + length + start, stop - start)
        ranges.append((start, stop, key))
    end = 0
    for start, stop, key in sorted(ranges):
        if start != end:
            what = "overlaps the tensor before it" if start < end else f"leaves bytes {end}..{start} unclaimed"
            raise SourceError(
                f"tensor {key!r}: data_offsets [{start}, {stop}] {what}; the tensors must tile the data section",
                where=where,
            )
        end = stop
    if 8 + length + end > size:
        raise SourceError(
            f"truncated: the tensor data ends at byte {8 + length + end} but the file has {size} bytes", where=where
        )
    if 8 + length + end < size:
        raise SourceError(
            f"the tensor data ends at byte {8 + length + end} but the file has {size} bytes: "
            f"{size - 8 - length - end} trailing bytes belong to no tensor",
            where=where,
        )
    entries = {str(k): _short(v) for k, v in extra.items()} if isinstance(extra, dict) else {}
    return meta, entries, spans


def _open_safetensors(path: Path) -> Any:
    """A ``safe_open`` handle on ``path`` (the only way tensor data is read)."""
    from safetensors import safe_open

    return safe_open(str(path), framework="pt", device="cpu")


class _SafetensorsReader(_Reader):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = _stamp(path)
        self.meta, self.entries, self._spans = _read_safetensors_header(path)
        self._handle: Any = None

    def span(self, key: str) -> Span | None:
        meta = self.meta[key]
        offset, nbytes = self._spans[key]
        stride = tuple(math.prod(meta.shape[i + 1 :]) for i in range(len(meta.shape)))
        return Span(str(self.path), offset, nbytes, meta.dtype, meta.shape, stride)

    def read(self, key: str) -> torch.Tensor:
        if self._handle is None:
            self._check_unchanged()
            try:
                self._handle = _open_safetensors(self.path)
            except Exception as exc:  # safetensors raises its own error types
                raise self._fail_read(key, exc) from None
        try:
            return self._handle.get_tensor(key)
        except Exception as exc:
            raise self._fail_read(key, exc) from None

    def release(self) -> None:
        self._handle = None
