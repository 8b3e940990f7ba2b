"""What remap asks of a path before it reads one whole or writes over one.

A FIFO blocks a reader forever, ``/dev/zero`` never ends and ``/dev/urandom`` never
parses; a save over a device node would replace the node. Every place that reads a
file whole, or replaces one, asks here first, so the refusal reads the same everywhere.

>>> import tempfile, os
>>> with tempfile.TemporaryDirectory() as d:
...     p = os.path.join(d, "r.yaml")
...     _ = open(p, "w").write("version: 1\\n")
...     read_text_capped(p, limit=1024, error=ValueError, what="rules")
'version: 1\\n'
>>> file_kind(os.devnull)
'a character device'
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

__all__ = ["file_kind", "require_regular", "read_bytes_capped", "read_text_capped", "refuse_non_regular_target"]

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(path: str | os.PathLike[str]) -> str | None:
    """``None`` for a regular file (links followed), else what the path is, in words;
    ``"missing"`` when nothing is there."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "missing"
    except OSError as exc:  # a name too long, a loop of links, no permission
        return f"unreadable ({exc.strerror or exc})"
    if stat.S_ISREG(mode):
        return None
    return next((words for test, words in _KINDS if test(mode)), "not a regular file")


def require_regular(path: str | os.PathLike[str], *, error: type[Exception], what: str) -> None:
    """Raise ``error`` unless ``path`` is a regular file (a missing path is the caller's
    own error to word). ``error`` is a :class:`~remap.errors.RemapError` class."""
    kind = file_kind(path)
    if kind is not None and kind != "missing":
        raise error(f"{kind}, not a regular file: remap reads {what} only from regular files", where=str(path))  # type: ignore[call-arg]


def read_bytes_capped(path: str | os.PathLike[str], *, limit: int, error: type[Exception], what: str) -> bytes:
    """The bytes of a regular file of at most ``limit`` bytes; ``error`` otherwise."""
    require_regular(path, error=error, what=what)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size > limit:
            raise error(f"{what} is {os.fstat(f.fileno()).st_size} bytes; remap reads at most {limit}", where=str(path))  # type: ignore[call-arg]
        data = f.read(limit + 1)
    if len(data) > limit:  # grew while we read it
        raise error(f"{what} is over {limit} bytes; remap reads at most {limit}", where=str(path))  # type: ignore[call-arg]
    return data


def read_text_capped(path: str | os.PathLike[str], *, limit: int, error: type[Exception], what: str, encoding: str = "utf-8") -> str:
    """:func:`read_bytes_capped`, decoded; undecodable bytes are ``error`` too (never echoed)."""
    data = read_bytes_capped(path, limit=limit, error=error, what=what)
    try:
        return data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise error(f"{what} is not {encoding} text (invalid byte at offset {exc.start})", where=str(path)) from None  # type: ignore[call-arg]


def refuse_non_regular_target(path: str | os.PathLike[str], *, error: type[Exception], what: str) -> None:
    """A save must not replace a device node, FIFO or socket (as root, ``--save /dev/null``
    would replace ``/dev/null``): only a missing path or a regular file may be written."""
    kind = file_kind(Path(path))
    if kind is not None and kind != "missing":
        raise error(f"{kind}, not a regular file: {what} only writes new files or replaces regular ones", where=str(path))  # type: ignore[call-arg]
