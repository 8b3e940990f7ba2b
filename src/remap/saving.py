"""Atomic writes: a temporary file in the same folder, fsync, then rename over the target.

A write that is interrupted leaves either the old file or the new one, never a part.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "report.json")
>>> write_text_atomic(path, "{}")
>>> open(path).read()
'{}'
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import UsageError

if TYPE_CHECKING:
    import torch

__all__ = ["atomic_path", "write_text_atomic", "save_state_dict"]


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` atomically."""
    final = Path(path)
    folder = final.parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"cannot create the folder for {str(final)!r}: {exc.strerror}") from None
    if final.is_dir():
        raise UsageError(f"cannot write {str(final)!r}: it is a directory")
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def save_state_dict(module: torch.nn.Module, path: str | os.PathLike[str]) -> dict[str, str]:
    """Write ``module.state_dict()`` atomically: safetensors unless the name ends in .pt/.pth/.bin/.ckpt.

    Tied parameters are written once (safetensors refuses shared storage); the other names
    are listed in the file's metadata under ``remap.tied``. Returns a description.
    """
    import torch

    state = module.state_dict()
    writer: Callable[[Path], None]
    if Path(path).suffix in (".pt", ".pth", ".bin", ".ckpt"):
        fmt = "torch"
        writer = lambda tmp: torch.save(state, tmp)  # noqa: E731
    else:
        fmt = "safetensors"
        tensors, tied = _untie(state)

        def writer(tmp: Path) -> None:
            from safetensors.torch import save_file

            meta = {"format": "pt", "remap.tied": ",".join(f"{a}={b}" for a, b in tied.items())}
            save_file(tensors, str(tmp), metadata=meta)

    with atomic_path(path) as tmp:
        writer(tmp)
    return {"path": str(path), "format": fmt}


def _untie(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    seen: dict[tuple[int, int, tuple[int, ...]], str] = {}
    tensors, tied = {}, {}
    for key, t in state.items():
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if t.numel() and ident in seen:
            tied[key] = seen[ident]
            continue
        seen[ident] = key
        tensors[key] = t.detach().contiguous()
    return tensors, tied
