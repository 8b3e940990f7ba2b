"""Keras weights, read through h5py without Keras or TensorFlow: ``.keras`` archives, Keras 3
``.weights.h5`` files and legacy Keras 2 ``.h5`` files.

Keys name layer and variable, as Keras names its variables (``variable.path``, dots for
slashes): ``dense_1.kernel``, ``conv2d.bias``, ``batch_normalization.moving_mean``,
``lstm.lstm_cell.recurrent_kernel``, ``mha.query.kernel``, ``inner_model.dense.kernel``.

* Legacy ``.h5`` (``model.save("m.h5")``, Keras 2 ``save_weights``): each layer group lists
  its ``weight_names`` (``dense_1/kernel:0``); the key is the layer name, then the weight name
  after that layer's own segment, without ``:0``.
* Keras 3 (``model.weights.h5`` inside a ``.keras`` archive, or ``save_weights``) stores a
  layer's variables by index (``layers/dense_1/vars/0``). Each ``vars`` group carries the
  layer's name; the variable names come from the layer's class and config (the archive's
  ``config.json``; for a bare ``.weights.h5``, the class name Keras wrote into the path),
  through :data:`_VARIABLES`. A layer whose class is not listed there, or whose variable count
  does not match, keeps indices (``my_layer.0``) and says so in ``entries``.

Shapes are Keras's own (a Dense kernel is (in, out), a Conv2D kernel (kh, kw, in, out)):
nothing is transposed here; layout conventions are rule fragments a rules file includes.
Optimizer state in an archive is listed in ``entries``, not read as weights.

A ``.keras`` archive's weights member is read in place when it is stored uncompressed (as
Keras writes it): h5py reads a window of the archive, nothing is extracted. A deflated member
is read through :mod:`zipfile`'s seekable stream (slower, bounded memory, no temporary file).

A dataset whose bytes sit in the file as they are (contiguous storage, no filter, a
little-endian type equal to the tensor's own) has a :meth:`~_KerasReader.span`, so the engine
reads it with ``pread`` straight into its parameter; each span is checked to lie inside the
file (or the archive's weights member) when the file is opened. Other datasets (chunked,
compressed, big-endian, in a deflated member) are read through h5py.
"""

from __future__ import annotations

import io
import json
import math
import re
import sys
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import SourceError, UsageError
from ..meta import TensorMeta, dtype_name
from .readers import Span, _first_line, _Reader, _stamp
from .registry import require_extra

if TYPE_CHECKING:
    import torch

FORMAT = "keras"
H5_FORMAT = "keras-h5"
EXTRA = "keras"

_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"
_WEIGHTS_MEMBER = "model.weights.h5"
_MAX_CONFIG = 64 * 1024 * 1024  # config.json larger than this is not read
_MAX_DEFLATE_RATIO = 1100  # deflate cannot expand more than ~1032x: a member claiming more lies
_NOT_WEIGHTS = ("optimizer",)  # top-level Keras 3 groups that hold training state, not weights
#: Dtypes a span may map: HDF5 stores them as numpy does (bool is excluded: any byte may sit
#: in an HDF5 enum, and torch expects 0 or 1; complex is a compound type h5py converts).
_SPAN_DTYPES = ("float16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32",
                "uint64")  # fmt: skip


# ---------------------------------------------------------------------------- contract


def sniff(head: bytes, path: Path) -> bool:
    """An HDF5 file, or a zip named ``*.keras`` holding ``config.json`` and ``model.weights.h5``."""
    if head[:8] == _HDF5_MAGIC:
        return True
    if head[:4] != b"PK\x03\x04" or path.suffix.lower() != ".keras":
        return False
    try:
        with zipfile.ZipFile(path) as z:
            names = set(z.namelist())
    except Exception:  # noqa: BLE001 - any unreadable zip is simply not sniffed as Keras
        return False
    return {"config.json", _WEIGHTS_MEMBER} <= names


def open_reader(path: Path, *, key: str | None, trust_pickle: bool) -> _KerasReader:
    """A reader for a ``.keras`` archive or a Keras HDF5 file (``trust_pickle`` plays no part: nothing is unpickled)."""
    if key is not None:
        raise SourceError(
            f"source.key {key!r} does not apply to a Keras file: its weights are named by layer at the top level, "
            "so leave `key` out",
            where=str(path),
        )
    return _KerasReader(path)


# ---------------------------------------------------------------------------- archive window


class _Window(io.RawIOBase):
    """Bytes ``[start, start + size)`` of an open file, as a seekable read-only file (for h5py)."""

    def __init__(self, f: Any, start: int, size: int) -> None:
        super().__init__()
        self._f, self._start, self._size, self._pos = f, start, size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._size}[whence]
        if base + offset < 0:
            raise OSError("seek before the start of the member")
        self._pos = base + offset
        return self._pos

    def readinto(self, b: Any) -> int:
        n = max(0, min(len(b), self._size - self._pos))
        if n == 0:
            return 0
        self._f.seek(self._start + self._pos)
        got = self._f.readinto(memoryview(b)[:n])
        self._pos += got
        return got

    def close(self) -> None:
        try:
            self._f.close()
        finally:
            super().close()


def _member(path: Path) -> tuple[zipfile.ZipInfo, int, int]:
    """The weights member of a ``.keras`` archive: (info, data offset, file size)."""
    size = path.stat().st_size
    with zipfile.ZipFile(path) as z:
        try:
            info = z.getinfo(_WEIGHTS_MEMBER)
        except KeyError:
            names = ", ".join(z.namelist()[:8]) or "nothing"
            raise SourceError(
                f"a .keras archive holds its weights in {_WEIGHTS_MEMBER!r}, but this one holds {names}", where=str(path)
            ) from None
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)
    if len(local) < 30 or local[:4] != b"PK\x03\x04":
        raise SourceError(f"no zip local header for {_WEIGHTS_MEMBER!r} at byte {info.header_offset}", where=str(path))
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little") + int.from_bytes(local[28:30], "little")
    if start + info.compress_size > size:
        raise SourceError(
            f"{_WEIGHTS_MEMBER!r} claims {info.compress_size} bytes from byte {start}, but the file ends at byte {size} "
            "(truncated?)",
            where=str(path),
        )
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise SourceError(
            f"{_WEIGHTS_MEMBER!r} is stored uncompressed but claims {info.file_size} bytes in {info.compress_size}",
            where=str(path),
        )
    if info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 65536:
        raise SourceError(
            f"{_WEIGHTS_MEMBER!r} claims to expand from {info.compress_size} to {info.file_size} bytes, more than any "
            "compression allows",
            where=str(path),
        )
    return info, start, info.file_size


def _read_config(path: Path) -> tuple[Any, list[str]]:
    """The archive's ``config.json`` (None when absent or unreadable, with a note saying so)."""
    try:
        with zipfile.ZipFile(path) as z:
            info = z.getinfo("config.json")
            if info.file_size > _MAX_CONFIG:
                return None, [f"config.json ({info.file_size} bytes) is too large to read; variables are named by class"]
            with z.open(info) as f:
                text = f.read(_MAX_CONFIG + 1)
        return json.loads(text), []
    except KeyError:
        return None, ["the archive holds no config.json; variables are named from the class names in the weights file"]
    except Exception as exc:  # noqa: BLE001 - a damaged config costs names, not the weights
        return None, [f"config.json cannot be read ({type(exc).__name__}: {_first_line(exc)}); variables are named from "
                      "the class names in the weights file"]  # fmt: skip


# ---------------------------------------------------------------------------- variable names


def _snake(name: str) -> str:
    """Keras's ``naming.to_snake_case``: ``Conv2DTranspose`` -> ``conv2d_transpose``."""
    name = re.sub(r"\W+", "", name)
    name = re.sub("(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub("([a-z])([A-Z])", r"\1_\2", name).lower()


def _flag(cfg: dict[str, Any], name: str, default: bool) -> bool:
    value = cfg.get(name, default)
    return value if isinstance(value, bool) else default


def _kernel_bias(cfg: dict[str, Any]) -> list[str]:
    return ["kernel"] + (["bias"] if _flag(cfg, "use_bias", True) else [])


def _batch_norm(cfg: dict[str, Any]) -> list[str]:
    return (["gamma"] if _flag(cfg, "scale", True) else []) + (["beta"] if _flag(cfg, "center", True) else []) + [
        "moving_mean", "moving_variance"]  # fmt: skip


def _layer_norm(cfg: dict[str, Any]) -> list[str]:
    rms = _flag(cfg, "rms_scaling", False)
    return (["gamma"] if _flag(cfg, "scale", True) or rms else []) + (
        ["beta"] if _flag(cfg, "center", True) and not rms else [])  # fmt: skip


def _group_norm(cfg: dict[str, Any]) -> list[str]:
    return (["gamma"] if _flag(cfg, "scale", True) else []) + (["beta"] if _flag(cfg, "center", True) else [])


def _einsum(cfg: dict[str, Any]) -> list[str]:
    return ["kernel"] + (["bias"] if cfg.get("bias_axes") else [])


def _cell(cfg: dict[str, Any]) -> list[str]:
    return ["kernel", "recurrent_kernel"] + (["bias"] if _flag(cfg, "use_bias", True) else [])


#: Keras 3 layer class -> its saved variables in order, from the layer's config
#: (Keras saves trainable variables, then non-trainable ones, each in creation order).
_VARIABLES: dict[str, tuple[Any, tuple[str, ...]]] = {
    **{c: (_kernel_bias, ("use_bias",)) for c in (
        "Dense", "Conv1D", "Conv2D", "Conv3D", "Conv1DTranspose", "Conv2DTranspose", "Conv3DTranspose",
        "DepthwiseConv1D", "DepthwiseConv2D")},  # fmt: skip
    **{c: (lambda cfg: ["depthwise_kernel", "pointwise_kernel"] + (["bias"] if _flag(cfg, "use_bias", True) else []),
           ("use_bias",)) for c in ("SeparableConv1D", "SeparableConv2D")},  # fmt: skip
    "EinsumDense": (_einsum, ()),
    "BatchNormalization": (_batch_norm, ("scale", "center")),
    "LayerNormalization": (_layer_norm, ("scale", "center", "rms_scaling")),
    "GroupNormalization": (_group_norm, ("scale", "center")),
    "Embedding": (lambda cfg: ["embeddings"], ()),
    "PReLU": (lambda cfg: ["alpha"], ()),
    **{c: (_cell, ("use_bias",)) for c in ("LSTMCell", "GRUCell", "SimpleRNNCell")},
}
_BY_SNAKE = {_snake(c): c for c in _VARIABLES} | {"lstm": "LSTM", "gru": "GRU", "simple_rnn": "SimpleRNN",
                                                  "multi_head_attention": "MultiHeadAttention"}  # fmt: skip
#: A sub-layer that a layer builds itself (absent from the config): (parent class, attribute) -> class.
_SUBLAYERS = {
    **{(rnn, "cell"): f"{rnn}Cell" for rnn in ("LSTM", "GRU", "SimpleRNN")},
    **{("MultiHeadAttention", a): "EinsumDense" for a in ("query_dense", "key_dense", "value_dense", "output_dense",
                                                           "_query_dense", "_key_dense", "_value_dense", "_output_dense")},
}  # fmt: skip


def _variable_names(cls: str | None, cfg: dict[str, Any] | None, n: int) -> list[str] | None:
    """The names of a layer's ``n`` saved variables, or None where they cannot be known for certain."""
    if cls not in _VARIABLES:
        return None
    names_of, flags = _VARIABLES[cls]
    if cfg is not None:
        names = names_of(cfg)
        return names if len(names) == n else None
    # no config: every setting of the flags that matters, and only an unambiguous count names them
    found = {tuple(names_of(dict(zip(flags, bits)))) for bits in _bit_settings(len(flags))}
    fit = [names for names in found if len(names) == n]
    return list(fit[0]) if len(fit) == 1 else None


def _bit_settings(k: int) -> list[tuple[bool, ...]]:
    return [tuple(bool(i >> j & 1) for j in range(k)) for i in range(2**k)]


def _config_layers(config: Any) -> dict[str, list[tuple[str, dict[str, Any]]]]:
    """Layer name -> [(class, config)] for every layer the config names, at any depth."""
    out: dict[str, list[tuple[str, dict[str, Any]]]] = {}
    stack, seen = [config], 0
    while stack and seen < 1_000_000:
        node = stack.pop()
        seen += 1
        if isinstance(node, dict):
            cfg = node.get("config")
            if isinstance(node.get("class_name"), str) and isinstance(cfg, dict) and isinstance(cfg.get("name"), str):
                out.setdefault(cfg["name"], []).append((node["class_name"], cfg))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return out


# ---------------------------------------------------------------------------- the reader


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        try:
            return value.decode("utf-8")
        except UnicodeDecodeError:
            return None
    return value if isinstance(value, str) else None


class _KerasReader(_Reader):
    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp = _stamp(path)
        self.meta: dict[str, TensorMeta] = {}
        self.entries: dict[str, str] = {}
        self.notes: list[str] = []
        self._where: dict[str, tuple[str, bool]] = {}  # key -> (dataset path, stored as bfloat16)
        self._spans: dict[str, tuple[int, int]] = {}  # key -> (offset in the file, bytes), where mappable
        self._base: int | None = None  # where the HDF5 bytes start in the file; None: a deflated member
        self._h5: Any = None
        self._stream: Any = None
        h5py = require_extra("h5py", FORMAT, EXTRA, path)
        with open(path, "rb") as f:
            self._archive = f.read(4) == b"PK\x03\x04"
        config: Any = None
        if self._archive:
            self.format = FORMAT
            config, self.notes = _read_config(path)
        else:
            self.format = H5_FORMAT
        try:
            h5 = self._open(h5py)
        except SourceError:
            raise
        except Exception as exc:  # noqa: BLE001 - h5py raises OSError, ValueError, KeyError... on damaged files
            raise SourceError(f"not a readable HDF5 file: {type(exc).__name__}: {_first_line(exc)}",
                              where=str(path)) from None  # fmt: skip
        self._h5 = h5  # closed below, with its stream, by release()
        try:
            self._limit = self._data_limit()
            if "model_weights" in h5 or "layer_names" in h5.attrs:
                self._read_legacy(h5)
            elif "layers" in h5 or "vars" in h5:
                self._read_keras3(h5, config)
            else:
                groups = ", ".join(repr(k) for k in list(h5.keys())[:8]) or "nothing"
                raise SourceError(
                    "an HDF5 file, but not Keras weights: expected a Keras 3 layout (layers/<layer>/vars/<i>) or a "
                    f"legacy Keras one (model_weights/<layer>/... with layer_names); its top level holds {groups}",
                    where=str(path),
                )
        except SourceError:
            self.release()
            raise
        except Exception as exc:  # noqa: BLE001 - damaged metadata deep in the file
            self.release()
            raise SourceError(f"damaged Keras HDF5 metadata: {type(exc).__name__}: {_first_line(exc)}",
                              where=str(path)) from None  # fmt: skip
        self.release()
        if not self.meta:
            raise SourceError("a Keras file with no weights in it (was the model built before it was saved?)",
                              where=str(path))  # fmt: skip

    # --- opening

    def _data_limit(self) -> int:
        return self._member_size if self._archive else self._stamp[0]

    def _open(self, h5py: Any) -> Any:
        if not self._archive:
            with open(self.path, "rb") as f:
                if f.read(8) != _HDF5_MAGIC:
                    raise SourceError("neither an HDF5 file nor a .keras archive", where=str(self.path))
            self._base = 0
            return h5py.File(self.path, "r")
        try:
            info, start, self._member_size = _member(self.path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise SourceError(f"a damaged .keras archive: {_first_line(exc)}", where=str(self.path)) from None
        if info.compress_type == zipfile.ZIP_STORED:
            self._base = start
            stream: Any = _Window(open(self.path, "rb"), start, info.file_size)
        else:
            self._base = None
            self._zip = zipfile.ZipFile(self.path)
            try:
                stream = self._zip.open(info)
            except Exception:
                self._zip.close()
                raise
        self._stream = stream
        try:
            head = stream.read(8)
            stream.seek(0)
            if head != _HDF5_MAGIC:
                raise SourceError(f"the archive's {_WEIGHTS_MEMBER!r} is not an HDF5 file", where=str(self.path))
            return h5py.File(stream, "r")
        except Exception:
            self._close_stream()
            raise

    # --- metadata

    def _add(self, key: str, ds: Any, shown: str) -> None:
        """One dataset as a tensor, after checking it can be read safely and within bounds."""
        import h5py

        if not isinstance(ds, h5py.Dataset):
            raise SourceError(f"{shown} is a {type(ds).__name__}, expected a dataset (an array)", where=str(self.path))
        if ds.is_virtual or ds.external:
            raise SourceError(f"{shown} keeps its data in other files (an external or virtual dataset); remap reads "
                              "only the file it was given", where=str(self.path))  # fmt: skip
        bf16 = _text(ds.attrs.get("dtype")) == "bfloat16" if "dtype" in ds.attrs else False
        if bf16:
            if ds.dtype.itemsize != 2:
                raise SourceError(f"{shown} is marked bfloat16 but holds {ds.dtype.itemsize}-byte items",
                                  where=str(self.path))  # fmt: skip
            dtype = "bfloat16"
        else:
            try:
                dtype = dtype_name(str(ds.dtype))
            except UsageError:
                self.entries[key] = f"dataset of {ds.dtype} {list(ds.shape)}, not a tensor dtype: not read"
                return
        shape = tuple(int(d) for d in ds.shape) if ds.shape is not None else None
        if shape is None:
            self.entries[key] = "an empty HDF5 dataset (no shape): not read"
            return
        nbytes = math.prod(shape) * ds.dtype.itemsize
        if nbytes > self._limit:
            raise SourceError(
                f"{shown} claims shape {list(shape)} of {dtype} ({nbytes} bytes), more than the "
                f"{self._limit} bytes the {'weights member' if self._archive else 'file'} holds",
                where=str(self.path),
            )
        if key in self.meta:
            raise SourceError(f"two datasets are both named {key!r} (the second is {shown})", where=str(self.path))
        self.meta[key] = TensorMeta(shape, dtype)
        self._where[key] = (ds.name, bf16)
        at = self._span_of(ds, shown, nbytes, dtype)
        if at is not None:
            self._spans[key] = at

    def _span_of(self, ds: Any, shown: str, nbytes: int, dtype: str) -> tuple[int, int] | None:
        """(offset in the file, bytes) of a dataset whose bytes are the tensor's as they sit in the
        file; None where h5py must assemble or convert them. A span outside the file (or the
        archive's weights member) is a SourceError.

        Offered for contiguous, unfiltered storage of a little-endian type equal to the one torch
        maps (HDF5's own type compared, so a custom precision or bit layout is converted by h5py),
        or of 2-byte opaque items marked bfloat16 (raw bytes either way).
        """
        import h5py

        if self._base is None or nbytes == 0 or sys.byteorder != "little":
            return None
        dcpl = ds.id.get_create_plist()  # contiguous means not chunked (nor compact, nor virtual)
        if dcpl.get_layout() != h5py.h5d.CONTIGUOUS or dcpl.get_nfilters():
            return None  # chunked (compressed or not): h5py assembles the chunks
        stored = ds.id.get_type()
        if dtype == "bfloat16":
            if stored.get_class() != h5py.h5t.OPAQUE or stored.get_size() != 2:
                return None
        elif dtype not in _SPAN_DTYPES or stored != h5py.h5t.py_create(_np_dtype(dtype)):
            return None
        offset = ds.id.get_offset()
        if offset is None:
            return None  # never written: h5py gives the fill value
        size = ds.id.get_storage_size()
        what = "the weights member" if self._archive else "the file"
        if size != nbytes:
            raise SourceError(f"{shown} claims shape {list(ds.shape)} of {dtype} ({nbytes} bytes), but its contiguous "
                              f"storage holds {size} bytes", where=str(self.path))  # fmt: skip
        if offset < 0 or offset + nbytes > self._limit:
            raise SourceError(
                f"{shown} claims its {nbytes} bytes sit at bytes {offset}..{offset + nbytes} of {what}, which holds "
                f"{self._limit} bytes (truncated or forged?)",
                where=str(self.path),
            )
        return self._base + offset, nbytes

    def _read_legacy(self, h5: Any) -> None:
        g = h5["model_weights"] if "model_weights" in h5 else h5
        version = _text(g.attrs.get("keras_version")) or _text(h5.attrs.get("keras_version"))
        backend = _text(g.attrs.get("backend")) or _text(h5.attrs.get("backend"))
        self.notes.append("legacy Keras HDF5 (model_weights/<layer>/<weight>)"
                          + (f", written by Keras {version}" if version else "") + (f" ({backend} backend)" if backend else ""))  # fmt: skip
        layers = self._names(g.attrs.get("layer_names"), "layer_names", g.name)
        for layer in layers:
            if layer not in g:
                raise SourceError(f"layer_names lists {layer!r}, but {g.name} has no such group", where=str(self.path))
            lg = g[layer]
            for weight in self._names(lg.attrs.get("weight_names"), "weight_names", lg.name):
                parts = [p for p in weight.removesuffix(":0").split("/") if p]
                if layer in parts:
                    parts = parts[parts.index(layer) + 1 :]
                key = ".".join([layer, *parts])
                if weight not in lg:
                    raise SourceError(f"layer {layer!r} lists weight {weight!r}, but holds no such dataset",
                                      where=str(self.path))  # fmt: skip
                self._add(key, lg[weight], f"{lg.name}/{weight}")
        if "optimizer_weights" in h5:
            self.entries["optimizer_weights"] = "optimizer state: not read as weights"

    def _names(self, value: Any, what: str, where: str) -> list[str]:
        if value is None:
            raise SourceError(f"{where} has no {what} attribute, which legacy Keras files always write", where=str(self.path))
        items = list(value) if hasattr(value, "__iter__") and not isinstance(value, (str, bytes)) else [value]
        if len(items) and hasattr(value, "dtype") and value.dtype.kind == "f":  # Keras writes an empty float array
            items = []
        out = [_text(v) for v in items]
        if any(v is None for v in out):
            raise SourceError(f"{where}: {what} holds something other than text", where=str(self.path))
        return out  # type: ignore[return-value]

    def _read_keras3(self, h5: Any, config: Any) -> None:
        import h5py

        self.notes.append("Keras 3 weights (layers/<layer>/vars/<i>)" + (
            "" if self._archive else "; variables named from the class names Keras wrote into the paths"))  # fmt: skip
        by_name = _config_layers(config) if config is not None else {}
        groups: list[tuple[list[str], Any]] = []  # (path segments, vars group)

        def visit(name: str, obj: Any) -> None:
            if isinstance(obj, h5py.Group) and name.split("/")[-1] == "vars":
                groups.append((name.split("/")[:-1], obj))

        h5.visititems(visit)
        if "vars" in h5 and isinstance(h5["vars"], h5py.Group):
            groups.insert(0, ([], h5["vars"]))
        for segments, vg in groups:
            if segments[:1] and segments[0] in _NOT_WEIGHTS:
                if segments == [segments[0]]:
                    kind = _text(vg.attrs.get("name")) or segments[0]
                    self.entries[segments[0]] = f"{kind} state, {len(vg)} variables: not read as weights"
                continue
            n = len(vg)
            if n == 0:
                continue
            prefix, layer = self._prefix(h5, segments, vg)
            cls, cfg = self._class_of(h5, segments, layer, by_name)
            indices = [str(i) for i in range(n)]
            if sorted(vg.keys(), key=lambda s: (len(s), s)) != indices:
                raise SourceError(f"{vg.name} holds {', '.join(list(vg.keys())[:6])}; Keras 3 names variables 0, 1, …",
                                  where=str(self.path))  # fmt: skip
            names = _variable_names(cls, cfg, n)
            if names is None:
                names = indices
                what = f"class {cls}" if cls else "an unknown class"
                self.entries[".".join(prefix) or "(model)"] = (
                    f"{what}: {n} variables named by index ({', '.join(indices[:6])}{'…' if n > 6 else ''}); "
                    "their names are not known for this layer")  # fmt: skip
            for i, var in zip(indices, names):
                self._add(".".join([*prefix, var]) if prefix else f"{layer or 'model'}.{var}", vg[i], f"{vg.name}/{i}")

    def _prefix(self, h5: Any, segments: list[str], vg: Any) -> tuple[list[str], str | None]:
        """The key's layer part: each layer's own name (its ``vars`` name), container segments dropped."""
        out: list[str] = []
        for depth, seg in enumerate(segments):
            path = "/".join(segments[: depth + 1])
            if seg == "layers" or re.fullmatch(r"container(_\d+)?", seg):
                continue
            inner = f"{path}/vars"
            name = _text(h5[inner].attrs.get("name")) if inner in h5 else None
            out.append(name if name and "." not in name and "/" not in name else seg)
        layer = _text(vg.attrs.get("name"))
        return out, layer

    def _class_of(self, h5: Any, segments: list[str], layer: str | None, by_name: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None]:
        """The layer's class and config, where the archive's config (or Keras's path naming) says it."""
        if not segments:
            return None, None
        seg, parent = segments[-1], segments[-2] if len(segments) > 1 else "layers"
        if parent == "layers" or re.fullmatch(r"container(_\d+)?", parent):  # an entry of a layer list
            found = by_name.get(layer or "", [])
            classes = {c for c, _ in found}
            if len(found) == 1:
                return found[0]
            if len(classes) == 1:
                return next(iter(classes)), None
            guess = _BY_SNAKE.get(re.sub(r"_\d+$", "", seg))
            if found or guess is None:
                return None, None
            return guess, None
        # a sub-layer its parent builds: its class follows from the parent's
        parent_cls, parent_cfg = self._class_of(h5, segments[:-1], _text(h5["/".join(segments[:-1]) + "/vars"].attrs.get(
            "name")) if "/".join(segments[:-1]) + "/vars" in h5 else None, by_name)  # fmt: skip
        sub = _SUBLAYERS.get((parent_cls or "", seg))
        if sub is None:
            return None, None
        if sub == "EinsumDense":  # MultiHeadAttention's projections: a bias when the attention uses one
            return sub, None if parent_cfg is None else {"bias_axes": "b" if _flag(parent_cfg, "use_bias", True) else None}
        return sub, parent_cfg

    # --- data

    def span(self, key: str) -> Span | None:
        """Where ``key``'s bytes sit in the file, checked at open (None: read it with :meth:`read`).

        Example: ``reader.span("dense.kernel")`` of a Keras 3 ``m.weights.h5`` is
        ``Span(path='m.weights.h5', offset=2048, nbytes=80, dtype='float32', shape=(4, 5), stride=(5, 1))``;
        a chunked or compressed dataset's is None.
        """
        at = self._spans.get(key)
        if at is None:
            return None
        meta = self.meta[key]
        stride = tuple(math.prod(meta.shape[i + 1 :]) for i in range(len(meta.shape)))
        return Span(str(self.path), at[0], at[1], meta.dtype, meta.shape, stride)

    def read(self, key: str) -> torch.Tensor:
        import torch

        if key not in self._where:
            raise SourceError(f"no tensor {key!r} in this file", where=str(self.path))
        if self._h5 is None:
            self._check_unchanged()
            h5py = require_extra("h5py", FORMAT, EXTRA, self.path)
            try:
                self._h5 = self._open(h5py)
            except SourceError:
                raise
            except Exception as exc:  # noqa: BLE001
                raise self._fail_read(key, exc) from None
        name, bf16 = self._where[key]
        meta = self.meta[key]
        try:
            ds = self._h5[name]
            if tuple(ds.shape or ()) != meta.shape:
                raise ValueError(f"its shape is now {list(ds.shape or ())}, planned {list(meta.shape)}")
            arr = ds[...]
        except Exception as exc:  # noqa: BLE001 - h5py/HDF5 errors on damaged data
            raise self._fail_read(key, exc) from None
        import numpy as np

        arr = np.ascontiguousarray(arr)
        if bf16:
            return torch.from_numpy(arr.view(np.uint16).copy()).view(torch.bfloat16)
        if not arr.flags.writeable or not arr.flags.owndata:
            arr = arr.copy()
        return torch.from_numpy(arr)

    def release(self) -> None:
        if self._h5 is not None:
            try:
                self._h5.close()
            except Exception:  # noqa: BLE001 - closing a damaged file must not fail the release
                pass
            self._h5 = None
        self._close_stream()

    def _close_stream(self) -> None:
        for attr in ("_stream", "_zip"):
            handle = getattr(self, attr, None)
            setattr(self, attr, None)
            if handle is not None:
                try:
                    handle.close()
                except Exception:  # noqa: BLE001
                    pass


def _np_dtype(name: str) -> Any:
    """The little-endian numpy dtype of a torch dtype name (``"float32"`` -> ``<f4``)."""
    import numpy as np

    return np.dtype(name).newbyteorder("<")
