"""Several named sources as one: a vision tower and a text tower, an encoder and a decoder,
a base and an adapter, planned and loaded together.

Two sources may hold equal keys (both towers have ``encoder.layers.0.mlp.fc1.weight``), so
the joined source names every key after its source: ``vision:encoder.layers.0.mlp.fc1.weight``
(:func:`namespaced`). Those names are what plans, assignments and reports carry; the rules'
steps see each key as its own source names it (:func:`split_key`). Reads, spans and checks are
handed to the source a key came from; :meth:`CombinedSource.close` closes them all.

>>> src = CombinedSource({"vision": open_source({"w": [2]}), "text": open_source({"w": [3]})})
>>> list(src.meta), src.origin("text:w")
(['vision:w', 'text:w'], ('text', 'w'))
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from ..errors import SourceError, UsageError
from ..meta import TensorMeta
from .readers import Source, Span, open_source

if TYPE_CHECKING:
    import torch

__all__ = ["CombinedSource", "SEPARATOR", "SOURCE_NAME", "namespaced", "split_key", "open_several", "check_source_name"]

#: Between a source's name and its key in a joined source's key: ``vision:embeddings.weight``.
SEPARATOR = ":"
#: What a source may be called (``sources: {NAME: ...}``, ``--source NAME=PATH``, ``from: NAME``); no SEPARATOR in it.
SOURCE_NAME = r"[A-Za-z_][A-Za-z0-9_\-]*"
_NAME_RE = re.compile(SOURCE_NAME)


def namespaced(name: str, key: str) -> str:
    """The joined source's name for ``key`` of source ``name``.

    >>> namespaced("text", "embeddings.weight")
    'text:embeddings.weight'
    """
    return f"{name}{SEPARATOR}{key}"


def split_key(key: str) -> tuple[str, str]:
    """``(source name, key in that source)`` of a joined source's key (names hold no separator).

    >>> split_key("vision:a:b")
    ('vision', 'a:b')
    """
    name, _, rest = key.partition(SEPARATOR)
    return name, rest


def check_source_name(name: Any, *, where: str = "sources") -> str:
    """``name`` when it can name a source, else :class:`~remap.errors.UsageError` saying what a name is.

    >>> check_source_name("text_tower")
    'text_tower'
    """
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise UsageError(f"{where}: a source name is a letter or _ then letters, digits, _ or -; found {name!r}")
    return name


class CombinedSource(Source):
    """Named sources joined into one: ``meta`` holds every key of every source under
    :func:`namespaced` names, in the order the sources are given; each read goes to the
    source the key came from. ``sources`` keeps the opened sources by name.

    >>> src = CombinedSource({"a": open_source({"x": [2]})})
    >>> src.names, src.description["kind"]
    (('a',), 'several')
    """

    def __init__(self, sources: Mapping[str, Source]) -> None:
        if not sources:
            raise UsageError("several sources: expected at least one named source, found none")
        self.sources = {check_source_name(n): s for n, s in sources.items()}
        meta: dict[str, TensorMeta] = {}
        self._origin: dict[str, tuple[str, str]] = {}
        for name, src in self.sources.items():
            for key, m in src.meta.items():
                joined = namespaced(name, key)
                meta[joined] = m
                self._origin[joined] = (name, key)
        description = {"kind": "several", "path": None, "format": None, "key": None, "key_detected": False,
                       "files": 0, "factory": None, "entries": {}, "notes": [], "folder": None,
                       "sources": {n: dict(s.description) for n, s in self.sources.items()}}  # fmt: skip
        super().__init__(meta, description, "sources " + ", ".join(self.sources))

    @property
    def names(self) -> tuple[str, ...]:
        """The sources' names, in order."""
        return tuple(self.sources)

    def origin(self, key: str) -> tuple[str, str]:
        """``(source name, key in that source)`` of one of this source's keys."""
        found = self._origin.get(key)
        if found is None:
            raise SourceError(f"no tensor {key!r} in these sources ({len(self.meta)} tensors)", where=self._where)
        return found

    def _read(self, key: str) -> torch.Tensor:
        name, inner = self._origin[key]
        return self.sources[name].read(inner)

    def _read_many(self, keys: list[str]) -> dict[str, torch.Tensor]:
        by_source: dict[str, dict[str, str]] = {}
        for key in keys:
            name, inner = self._origin[key]
            by_source.setdefault(name, {})[inner] = key
        out = {}
        for name, inners in by_source.items():
            out.update({inners[k]: t for k, t in self.sources[name].read_many(list(inners)).items()})
        return {k: out[k] for k in keys}

    def span(self, key: str) -> Span | None:
        name, inner = self.origin(key)
        return self.sources[name].span(inner)

    def _read_box(self, key: str, offset: tuple[int, ...], shape: tuple[int, ...]) -> torch.Tensor | None:
        name, inner = self._origin[key]
        return self.sources[name].read_box(inner, offset, shape)

    def read_checked(self, key: str) -> bool:
        name, inner = self.origin(key)
        return self.sources[name].read_checked(inner)

    def check_unchanged(self) -> None:
        for src in self.sources.values():
            src.check_unchanged()

    @property
    def requires_grad(self) -> dict[str, bool] | None:
        """The saved flags of every source that kept them, under joined names; None when none did."""
        flags = {n: s.requires_grad for n, s in self.sources.items()}
        if all(f is None for f in flags.values()):
            return None
        return {namespaced(n, k): v for n, f in flags.items() for k, v in (f or {}).items()}

    def close(self) -> None:
        """Close every source, even when one fails to; the first failure is raised after."""
        first: BaseException | None = None
        for src in self.sources.values():
            try:
                src.close()
            except Exception as exc:  # noqa: BLE001 - the others must still be closed
                first = first or exc
        if first is not None:
            raise first

    def __repr__(self) -> str:
        inner = ", ".join(f"{n}={s!r}" for n, s in self.sources.items())
        return f"<CombinedSource {inner}>"


def open_several(sources: Mapping[str, Any], opener: Callable[[str, Any], Source] | None = None) -> CombinedSource:
    """Open each named source with ``opener(name, value)`` (default: :func:`open_source` of the
    value) and join them; the ones already opened are closed when a later one fails.

    >>> open_several({"a": {"w": [2]}, "b": {"w": [2]}}).names
    ('a', 'b')
    """
    if not isinstance(sources, Mapping) or not sources:
        raise UsageError(f"several sources: expected a mapping of name -> source, found {sources!r}")
    opener = opener or (lambda name, value: open_source(value))
    opened: dict[str, Source] = {}
    try:
        for name, value in sources.items():
            check_source_name(name)
            opened[name] = opener(name, value)
        return CombinedSource(opened)
    except BaseException:
        for src in opened.values():
            try:
                src.close()
            except Exception:  # noqa: BLE001, S110 - the first failure is the one to report
                pass
        raise
