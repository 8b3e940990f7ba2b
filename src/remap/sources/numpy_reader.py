"""NumPy ``.npz`` archives and ``.npy`` arrays: big_vision's and timm's JAX ViT weights.

An ``.npz`` is a zip of ``.npy`` members named by ``/``-joined paths
(``Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel.npy``); each becomes one key with
dots for slashes (``Transformer.encoderblock_0.MlpBlock_3.Dense_0.kernel``). A bare
``.npy`` is one array, keyed by the file's stem. Only each member's ``.npy`` header is read
to plan (shape, dtype, byte order, memory order); a member's data is read when its key is.
Nothing is ever unpickled: an object array (one that needs ``allow_pickle``) is refused.

Every claimed size is checked against what the file holds before anything is allocated:
a header whose shape and dtype need more (or fewer) bytes than its member holds, a member
claiming more uncompressed bytes than deflate can produce from its compressed ones, a
member lying outside the archive. numpy reads the headers (``numpy.lib.format``); it is
an optional dependency (``pip install 'remap[numpy]'``).

NumPy has no bfloat16 or float8: JAX's bfloat16 arrays saved by ``np.savez`` hold raw
2-byte voids (``<V2``), which say nothing about what the bytes are; they are refused with
a message saying so, rather than guessed.
"""

from __future__ import annotations

import math
import struct
import sys
import zipfile
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from ..errors import SourceError
from ..meta import TensorMeta
from .readers import Span, _first_line, _Reader, _stamp
from .registry import require_extra

if TYPE_CHECKING:
    import torch

__all__ = ["FORMAT", "EXTRA", "sniff", "open_reader"]

FORMAT = "npz"  # a bare .npy is this same format module; its reader's ``format`` says "npy"
EXTRA = "numpy"  # torch does not depend on numpy

NPY_MAGIC = b"\x93NUMPY"
_LOCAL = b"PK\x03\x04"
_EMPTY_ZIP = b"PK\x05\x06"
#: deflate cannot expand data more than 1032 times; a member claiming more is lying (a zip bomb)
_DEFLATE_RATIO = 1032
_HEADER_LIMIT = 10_000  # numpy's own default max_header_size
_CHUNK = 1 << 24  # bytes read at a time into the tensor


def sniff(head: bytes, path: Path) -> bool:
    """A ``.npy`` (its magic) or a zip whose first member is a ``.npy`` (read from ``head``,
    the zip's first local header); an empty zip or one with a long first name counts when
    the file is named ``*.npz``. A torch.save zip's first member is ``…/data.pkl``.

    >>> sniff(b"\\x93NUMPY\\x01\\x00", Path("w.npy"))
    True
    >>> sniff(b"PK\\x03\\x04" + bytes(22) + b"\\x0a\\x00\\x00\\x00archive/da", Path("m.pt"))
    False
    """
    if head.startswith(NPY_MAGIC):
        return True
    if head.startswith(_EMPTY_ZIP):
        return path.suffix.lower() == ".npz"
    if not head.startswith(_LOCAL) or len(head) < 30:
        return False
    name_len = struct.unpack_from("<H", head, 26)[0]
    name = head[30 : 30 + name_len]
    if len(name) == name_len:
        return name.endswith(b".npy")
    return path.suffix.lower() == ".npz"  # a first name longer than the head: trust the suffix, open_reader checks


def open_reader(path: Path, *, key: str | None = None, trust_pickle: bool = False) -> _Reader:
    """The reader of an ``.npz`` or ``.npy`` file (``trust_pickle`` changes nothing: object arrays are always refused)."""
    if key is not None:
        raise SourceError(
            f"source.key {key!r} does not apply to a NumPy {'array' if _is_npy(path) else 'archive'}: its arrays are "
            "the weights; leave `key` out",
            where=str(path),
        )
    require_extra("numpy", FORMAT, EXTRA, path)
    return _NpyReader(path) if _is_npy(path) else _NpzReader(path)


def _is_npy(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(len(NPY_MAGIC)) == NPY_MAGIC
    except OSError as exc:
        raise SourceError(f"cannot read it: {exc.strerror or exc}", where=str(path)) from None


# ---------------------------------------------------------------------------- headers

_INTS = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}
_UINTS = {1: "uint8", 2: "uint16", 4: "uint32", 8: "uint64"}
_FLOATS = {2: "float16", 4: "float32", 8: "float64"}
_COMPLEX = {8: "complex64", 16: "complex128"}


def _torch_dtype(dtype: Any, what: str, where: str) -> str:
    """The torch name of a numpy dtype, or the SourceError saying why remap cannot load it."""
    if dtype.hasobject:
        raise SourceError(
            f"{what} is an object array (dtype {dtype.str!r}): loading it would unpickle Python objects "
            "(numpy's allow_pickle), which remap never does; save numeric arrays instead",
            where=where,
        )
    if dtype.fields is not None or dtype.subdtype is not None:
        raise SourceError(f"{what} has the structured dtype {str(dtype)!r}; remap reads numeric arrays only", where=where)
    name = {"b": {1: "bool"}, "i": _INTS, "u": _UINTS, "f": _FLOATS, "c": _COMPLEX}.get(dtype.kind, {}).get(dtype.itemsize)
    if name is not None:
        return name
    if dtype.kind == "V":
        guess = {2: " (how numpy saves ml_dtypes' bfloat16, JAX's bfloat16)", 1: " (how numpy saves ml_dtypes' float8 types)"}
        raise SourceError(
            f"{what} holds raw {dtype.itemsize}-byte values (dtype {dtype.str!r}){guess.get(dtype.itemsize, '')}: the "
            "file does not say what they are, and remap does not guess; convert the array to float32 before saving it",
            where=where,
        )
    raise SourceError(
        f"{what} has dtype {dtype.str!r} ({dtype.name}), which has no torch equivalent; expected bool, "
        "(u)int8-64, float16/32/64 or complex64/128",
        where=where,
    )


class _Array:
    """One array's header: where its data starts (within its member, or the file), how long it is."""

    __slots__ = ("meta", "fortran", "swap", "start", "nbytes")

    def __init__(self, meta: TensorMeta, fortran: bool, swap: bool, start: int, nbytes: int) -> None:
        self.meta, self.fortran, self.swap, self.start, self.nbytes = meta, fortran, swap, start, nbytes


def _read_header(f: IO[bytes], size: int, what: str, where: str) -> _Array:
    """Parse the ``.npy`` header at the start of ``f`` (``size`` bytes in all) and check
    that exactly the bytes its shape and dtype need follow it."""
    from numpy.lib import format as npy

    try:
        version = npy.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = npy.read_array_header_1_0(f, max_header_size=_HEADER_LIMIT)
        elif version == (2, 0):
            shape, fortran, dtype = npy.read_array_header_2_0(f, max_header_size=_HEADER_LIMIT)
        else:
            raise SourceError(
                f"{what} is in .npy format version {version[0]}.{version[1]}; remap reads versions 1.0 and 2.0 "
                "(3.0 exists only for structured dtypes, which remap does not read)",
                where=where,
            )
        start = f.tell()
    except SourceError:
        raise
    except Exception as exc:  # numpy raises ValueError for a malformed header; zipfile its own errors
        raise SourceError(f"{what}: not a valid .npy header: {_first_line(exc)}", where=where) from None
    dims = list(shape)
    if not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in dims):
        raise SourceError(f"{what}: shape {shape!r} in its header is not a tuple of non-negative integers", where=where)
    name = _torch_dtype(dtype, what, where)
    nbytes = math.prod(dims) * dtype.itemsize
    held = size - start
    if nbytes != held:
        shown = "[" + ", ".join(str(d) if d.bit_length() <= 64 else f"<a {d.bit_length()}-bit integer>" for d in dims) + "]"
        need = str(nbytes) if nbytes.bit_length() <= 128 else "more"
        raise SourceError(
            f"{what}: its header claims shape {shown} of {dtype.str} ({need} bytes), but {held} bytes of data "
            f"follow the header; the file is truncated, padded or its header lies",
            where=where,
        )
    swap = dtype.byteorder == (">" if sys.byteorder == "little" else "<")
    return _Array(TensorMeta(tuple(dims), name), bool(fortran), swap, start, nbytes)


def _fill(f: IO[bytes], array: _Array, what: str, where: str) -> torch.Tensor:
    """Read ``array.nbytes`` bytes from ``f`` (positioned at the data) into a new tensor of its shape and dtype."""
    import torch

    raw = torch.empty(array.nbytes, dtype=torch.uint8)
    view = memoryview(raw.numpy()) if array.nbytes else memoryview(b"")
    done = 0
    while done < array.nbytes:
        n = f.readinto(view[done : done + _CHUNK])  # type: ignore[attr-defined]
        if not n:
            raise SourceError(
                f"{what}: the data ended after {done} of {array.nbytes} bytes; the file is truncated", where=where
            )
        done += n
    meta = array.meta
    if array.swap:
        unit = _itemsize(meta.dtype) // (2 if meta.dtype.startswith("complex") else 1)  # a complex's two parts swap apart
        raw = raw.view(-1, unit).flip(1).reshape(-1)  # to this machine's byte order
    if meta.dtype == "bool":
        tensor = raw != 0  # a byte other than 0 or 1 (a flipped bit) is still a bool
    else:
        tensor = raw.view(getattr(torch, meta.dtype))
    if array.fortran and len(meta.shape) > 1:
        return tensor.reshape(meta.shape[::-1]).permute(*reversed(range(len(meta.shape)))).contiguous()
    return tensor.reshape(meta.shape)


def _itemsize(dtype: str) -> int:
    from ..meta import itemsize

    return itemsize(dtype)


def _strides(array: _Array) -> tuple[int, ...]:
    shape = array.meta.shape
    if array.fortran:
        return tuple(math.prod(shape[:i]) for i in range(len(shape)))
    return tuple(math.prod(shape[i + 1 :]) for i in range(len(shape)))


# ---------------------------------------------------------------------------- .npy


class _NpyReader(_Reader):
    """A bare ``.npy``: one array, keyed by the file's stem."""

    format = "npy"

    def __init__(self, path: Path) -> None:
        self.path, self._stamp, self.entries = path, _stamp(path), {}
        self.key = path.name.removesuffix(".npy") if path.name.endswith(".npy") else path.stem or path.name
        where = str(path)
        try:
            with open(path, "rb") as f:
                self._array = _read_header(f, self._stamp[0], f"the array {self.key!r}", where)
        except OSError as exc:
            raise SourceError(f"cannot read it: {exc.strerror or exc}", where=where) from None
        self.meta = {self.key: self._array.meta}

    def span(self, key: str) -> Span | None:
        a = self._array
        if a.swap or a.meta.dtype == "bool":
            return None  # other byte order, or bools that read() normalises to 0/1
        return Span(str(self.path), a.start, a.nbytes, a.meta.dtype, a.meta.shape, _strides(a))

    def read(self, key: str) -> torch.Tensor:
        self._check_unchanged()
        try:
            with open(self.path, "rb") as f:
                f.seek(self._array.start)
                return _fill(f, self._array, f"the array {key!r}", str(self.path))
        except OSError as exc:
            raise self._fail_read(key, exc) from None

    def release(self) -> None:
        pass


# ---------------------------------------------------------------------------- .npz


class _NpzReader(_Reader):
    """An ``.npz``: a zip of ``.npy`` members; ``a/b/c.npy`` is the key ``a.b.c``."""

    format = "npz"

    def __init__(self, path: Path) -> None:
        self.path, self._stamp, self.entries = path, _stamp(path), {}
        self.meta: dict[str, TensorMeta] = {}
        self._members: dict[str, tuple[zipfile.ZipInfo, _Array, int | None]] = {}  # key -> (member, header, data offset in the file if stored)
        self._zip: zipfile.ZipFile | None = None
        where = str(path)
        try:
            with open(path, "rb") as fp, zipfile.ZipFile(fp) as zf:
                self._scan(zf, fp, where)
        except SourceError:
            raise
        except Exception as exc:  # BadZipFile, EOFError, struct.error, OSError, ...: a damaged archive
            raise SourceError(f"not a readable .npz (zip) archive: {type(exc).__name__}: {_first_line(exc)}", where=where) from None
        if not self.meta:
            raise SourceError("the .npz archive holds no arrays", where=where)

    def _scan(self, zf: zipfile.ZipFile, fp: IO[bytes], where: str) -> None:
        size = self._stamp[0]
        infos = zf.infolist()
        names: dict[str, str] = {}  # key -> member name
        others = [i.filename for i in infos if not i.filename.endswith(".npy") and not i.is_dir()]
        if others:
            shown = ", ".join(repr(n) for n in others[:5]) + (f" and {len(others) - 5} more" if len(others) > 5 else "")
            raise SourceError(
                f"this zip holds members that are not .npy arrays ({shown}); an .npz holds only .npy members "
                "(a torch.save zip holds data.pkl)",
                where=where,
            )
        for info in infos:
            if info.is_dir():
                continue
            member = info.filename
            what = f"member {member!r}"
            key = member.removesuffix(".npy").replace("/", ".")
            if key in names:
                other = names[key]
                raise SourceError(
                    f"members {other!r} and {member!r} both name the key {key!r}"
                    + ("" if other != member else " (the archive holds that member twice)"),
                    where=where,
                )
            names[key] = member
            if info.flag_bits & 0x1:
                raise SourceError(f"{what} is encrypted", where=where)
            if info.compress_type == zipfile.ZIP_STORED:
                if info.compress_size != info.file_size:
                    raise SourceError(
                        f"{what} is stored uncompressed but claims {info.file_size} bytes from {info.compress_size} "
                        "stored ones",
                        where=where,
                    )
            elif info.compress_type == zipfile.ZIP_DEFLATED:
                if info.file_size > info.compress_size * _DEFLATE_RATIO + 4096:
                    raise SourceError(
                        f"{what} claims {info.file_size} bytes uncompressed from {info.compress_size} compressed "
                        f"ones, more than deflate can produce (at most {_DEFLATE_RATIO} times); the archive lies",
                        where=where,
                    )
            else:
                raise SourceError(
                    f"{what} is compressed with zip method {info.compress_type}; numpy writes stored or deflated "
                    "members, which are what remap reads",
                    where=where,
                )
            if info.header_offset + 30 + info.compress_size > size:
                raise SourceError(
                    f"{what} claims {info.compress_size} bytes at offset {info.header_offset}, past the end of the "
                    f"file ({size} bytes); the file is truncated",
                    where=where,
                )
            with zf.open(info) as f:  # the .npy header only, never the data
                array = _read_header(f, info.file_size, what, where)
            at = self._data_offset(fp, info, where) + array.start if info.compress_type == zipfile.ZIP_STORED else None
            self.meta[key] = array.meta
            self._members[key] = (info, array, at)

    @staticmethod
    def _data_offset(fp: IO[bytes], info: zipfile.ZipInfo, where: str) -> int:
        """Where a stored member's bytes start in the file (after its local header)."""
        fp.seek(info.header_offset)
        local = fp.read(30)
        if len(local) != 30 or not local.startswith(_LOCAL):
            raise SourceError(f"member {info.filename!r}: no local zip header at offset {info.header_offset}", where=where)
        name_len, extra_len = struct.unpack_from("<HH", local, 26)
        return info.header_offset + 30 + name_len + extra_len

    def span(self, key: str) -> Span | None:
        info, a, at = self._members[key]
        if at is None or a.swap or a.meta.dtype == "bool":
            return None  # deflated, in the other byte order, or bools read() normalises to 0/1
        return Span(str(self.path), at, a.nbytes, a.meta.dtype, a.meta.shape, _strides(a))

    def read(self, key: str) -> torch.Tensor:
        self._check_unchanged()
        info, array, _ = self._members[key]
        what, where = f"member {info.filename!r}", str(self.path)
        try:
            if self._zip is None:
                self._zip = zipfile.ZipFile(self.path)
            with self._zip.open(info) as f:
                f.read(array.start)  # the header, parsed when planning
                tensor = _fill(f, array, what, where)
                if f.read(1):  # also where zipfile checks the member's CRC
                    raise SourceError(f"{what} holds more data than its header says", where=where)
            return tensor
        except SourceError:
            raise
        except Exception as exc:  # BadZipFile (a bad CRC), zlib.error, EOFError, OSError
            raise self._fail_read(key, exc) from None

    def release(self) -> None:
        if self._zip is not None:
            self._zip.close()
            self._zip = None
