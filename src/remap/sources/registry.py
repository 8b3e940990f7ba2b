"""The checkpoint formats that have a module of their own: one line each.

A format module (``remap.sources.onnx_reader``, …) holds its reader and three names:
``FORMAT`` (what ``inspect`` and the report call it), ``sniff(head, path)`` (a cheap test
of the file's first 512 bytes that imports no third-party library) and
``open_reader(path, *, key, trust_pickle)``. The module is imported only to sniff or open
a file, and its library (``onnx``, ``gguf``, ``h5py``) only inside ``open_reader``, so
the base install stays light and a missing extra is a :class:`~remap.errors.SourceError`
naming ``pip install 'remap[EXTRA]'``.

Adding a format: one file in ``sources/`` and one :class:`Format` line below. The formats
that predate this registry (``safetensors_reader``, ``torch_reader``, ``sharded``, ``hub``)
have a module each too, but ``readers`` detects and opens them itself.

>>> [f.name for f in FORMATS][:2]
['onnx', 'npz']
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["Format", "FORMATS", "detect", "open_format", "accepted", "require_extra"]


@dataclass(frozen=True)
class Format:
    """One format read by its own module: ``module`` is imported on first use."""

    name: str
    module: str
    extra: str | None
    text: str  # for messages: "an ONNX model (.onnx)"

    def load(self) -> ModuleType:
        return import_module(self.module)


FORMATS: tuple[Format, ...] = (
    Format("onnx", "remap.sources.onnx_reader", "onnx", "an ONNX model (.onnx)"),
    Format("npz", "remap.sources.numpy_reader", "numpy", "a NumPy archive or array (.npz, .npy)"),
    Format("gguf", "remap.sources.gguf_reader", "gguf", "a GGUF file (.gguf)"),
    Format("keras", "remap.sources.keras_reader", "keras", "a Keras file (.keras, .weights.h5, .h5)"),
    Format("msgpack", "remap.sources.msgpack_reader", None, "a Flax msgpack file (.msgpack)"),
    Format("tf", "remap.sources.tf_bundle_reader", None, "a TensorFlow checkpoint (.index + .data-*)"),
    Format("dcp", "remap.sources.dcp_reader", None, "a torch.distributed.checkpoint folder (.metadata + *.distcp)"),
)


def _available() -> tuple[Format, ...]:
    """The formats whose module is part of this install (a format still being written is
    simply absent, never an import error at detection time)."""
    from importlib.util import find_spec

    return tuple(f for f in FORMATS if find_spec(f.module) is not None)


def detect(head: bytes, path: Path) -> Format | None:
    """The first format whose ``sniff`` accepts the file, or None."""
    for fmt in _available():
        if fmt.load().sniff(head, path):
            return fmt
    return None


def open_format(fmt: Format, path: Path, **options: Any) -> Any:
    """Open ``path`` with ``fmt``'s reader, a ``readers._Reader`` (``options``: ``key``,
    ``trust_pickle``). The reader modules import ``readers``, which imports this registry:
    they are imported here, on first use, never at module level."""
    return fmt.load().open_reader(path, **options)


def accepted() -> str:
    """The formats of this registry, for the message that lists what remap reads."""
    return ", ".join(f.text for f in _available())


def require_extra(lib: str, fmt: str, extra: str, path: Path | None = None) -> ModuleType:
    """The module ``lib``, imported for a format's reader, or the SourceError (exit 3) naming
    the extra that installs it.

    >>> require_extra("json", "x", "x").__name__
    'json'
    """
    from ..errors import SourceError

    try:
        return import_module(lib)
    except ImportError:
        raise SourceError(f"reading {fmt} files needs the '{lib}' package: pip install 'remap[{extra}]'",
                          where=str(path) if path is not None else None) from None  # fmt: skip
