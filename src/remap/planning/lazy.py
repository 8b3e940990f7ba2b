"""Sequences and mappings built on first use.

A plan of 100,000 keys holds one report record, one fate and one assignment per key;
building them costs more than planning itself, and a caller that only asks ``plan.ok``
never reads them. These containers run their builder once, on first access, and then
behave as the tuple or dict it returned (equal to it, picklable as it).

>>> calls = []
>>> seq = LazySequence(lambda: calls.append(1) or (1, 2))
>>> len(calls)
0
>>> len(seq), seq == (1, 2), len(calls)
(2, True, 1)
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar, overload

__all__ = ["LazySequence", "LazyMapping"]

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")


class LazySequence(Sequence[T]):
    """A tuple built by ``build()`` when first read."""

    __slots__ = ("_build", "_data")

    def __init__(self, build: Callable[[], Iterable[T]]) -> None:
        self._build: Callable[[], Iterable[T]] | None = build
        self._data: tuple[T, ...] | None = None

    def _items(self) -> tuple[T, ...]:
        if self._data is None:
            build, self._build = self._build, None
            self._data = tuple(build()) if build is not None else ()
        return self._data

    @overload
    def __getitem__(self, index: int) -> T: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[T, ...]: ...
    def __getitem__(self, index: int | slice) -> T | tuple[T, ...]:
        return self._items()[index]

    def __len__(self) -> int:
        return len(self._items())

    def __iter__(self) -> Iterator[T]:
        return iter(self._items())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, (LazySequence, tuple, list)):
            return self._items() == tuple(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._items())

    def __reduce__(self) -> tuple[Any, ...]:
        return (tuple, (self._items(),))


class LazyMapping(Mapping[K, V]):
    """A dict built by ``build()`` when first read; ``length``, when given, is its length
    known beforehand (``len`` then builds nothing).

    >>> m = LazyMapping(lambda: {"a": 1}, length=1)
    >>> len(m), m._data is None, m["a"]
    (1, True, 1)
    """

    __slots__ = ("_build", "_data", "_length")

    def __init__(self, build: Callable[[], Mapping[K, V]], *, length: int | None = None) -> None:
        self._build: Callable[[], Mapping[K, V]] | None = build
        self._data: dict[K, V] | None = None
        self._length = length

    def _dict(self) -> dict[K, V]:
        if self._data is None:
            build, self._build = self._build, None
            data = build() if build is not None else {}
            self._data = data if type(data) is dict else dict(data)
            if self._length is not None and self._length != len(self._data):
                raise ValueError(f"LazyMapping: built {len(self._data)} entries, {self._length} were announced")
        return self._data

    def __getitem__(self, key: K) -> V:
        return self._dict()[key]

    def get(self, key: K, default: Any = None) -> Any:
        return self._dict().get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._dict()

    def __len__(self) -> int:
        return self._length if self._length is not None and self._data is None else len(self._dict())

    def __iter__(self) -> Iterator[K]:
        return iter(self._dict())

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Mapping):
            return self._dict() == dict(other)
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return repr(self._dict())

    def __reduce__(self) -> tuple[Any, ...]:
        return (dict, (self._dict(),))
