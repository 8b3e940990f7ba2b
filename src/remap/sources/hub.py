"""Hugging Face model repos already in the local hub cache: ``hf://org/name[@revision]``.

A repo's snapshot folder is found as huggingface_hub finds it (nothing is downloaded) and
opened like a local folder (:func:`~remap.sources.readers._open_path`).

>>> parse_hub_ref("hf-hub:org/name").revision
'main'
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from ..errors import SourceError
from .readers import WEIGHT_SUFFIXES, Source, _open_path

__all__ = ["HubRef", "parse_hub_ref", "hf_cache_dir", "HUB_PREFIXES", "HUB_EXTRA"]

#: How a source names a Hugging Face repo explicitly: ``hf://org/name[@revision]`` (timm writes ``hf-hub:``).
HUB_PREFIXES = ("hf://", "hf-hub:")
HUB_EXTRA = "pip install 'remap[hub]'"
_REPO_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)(?:@(?P<revision>[\w.-]+(?:/[\w.-]+)*))?$")
_HASH_RE = re.compile(r"^[0-9a-f]{40}$")


@dataclass(frozen=True)
class HubRef:
    """A Hugging Face model repo and revision, as a source names it.

    >>> parse_hub_ref("hf://timm/resnet18.a1_in1k@main")
    HubRef(repo='timm/resnet18.a1_in1k', revision='main', text='hf://timm/resnet18.a1_in1k@main')
    """

    repo: str
    revision: str
    text: str


def parse_hub_ref(text: str) -> HubRef | None:
    """The repo a source string names: ``hf://org/name[@rev]`` (or ``hf-hub:``); None for anything else.

    A bare ``org/name`` is not parsed here: :func:`open_source` looks it up only when no
    such local path exists (see :func:`_bare_hub_ref`).
    """
    prefix = next((p for p in HUB_PREFIXES if text.startswith(p)), None)
    if prefix is None:
        return None
    found = _REPO_RE.match(text[len(prefix) :])
    if found is None:
        raise SourceError(
            f"expected {prefix}org/name or {prefix}org/name@revision (a Hugging Face model repo, e.g. "
            f"{prefix}timm/resnet18.a1_in1k), found {text!r}",
            where="source",
        )
    return HubRef(found["repo"], found["revision"] or "main", text)


def _bare_hub_ref(text: str) -> HubRef | None:
    """``org/name[@rev]`` that could be a repo: one slash, no weight-file suffix, not ./ or ~/."""
    found = _REPO_RE.match(text)
    if found is None or text.endswith((*WEIGHT_SUFFIXES, ".json", ".tar")):
        return None
    return HubRef(found["repo"], found["revision"] or "main", text)


def hf_cache_dir() -> Path:
    """The hub cache folder, found as huggingface_hub finds it, from the environment as it is now.

    ``HF_HUB_CACHE`` (or the older ``HUGGINGFACE_HUB_CACHE``), else ``$HF_HOME/hub``, else
    ``$XDG_CACHE_HOME/huggingface/hub``, else ``~/.cache/huggingface/hub``.
    """
    env = os.environ
    folder = env.get("HF_HUB_CACHE") or env.get("HUGGINGFACE_HUB_CACHE")
    if not folder:
        home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
        folder = os.path.join(home, "hub")
    return Path(os.path.expandvars(folder)).expanduser()


def _repo_folder(ref: HubRef, cache: Path) -> Path:
    return cache / ("models--" + ref.repo.replace("/", "--"))


def _cached_revisions(folder: Path) -> str:
    """``"refs main -> 1a2b…; snapshots 1a2b…"``: what the cache holds for one repo."""
    refs_dir, snaps_dir = folder / "refs", folder / "snapshots"
    refs = sorted(p.relative_to(refs_dir).as_posix() for p in refs_dir.rglob("*") if p.is_file()) if refs_dir.is_dir() else []
    snaps = sorted(p.name for p in snaps_dir.iterdir() if p.is_dir()) if snaps_dir.is_dir() else []
    pointed = [f"{r} -> {(refs_dir / r).read_text(encoding='utf-8', errors='replace').strip()[:12]}" for r in refs]
    return f"refs: {', '.join(pointed) or 'none'}; snapshots: {', '.join(snaps[:5]) or 'none'}" + (
        f" and {len(snaps) - 5} more" if len(snaps) > 5 else ""
    )


def _not_cached(ref: HubRef, cache: Path) -> str:
    """Why ``ref`` is not in ``cache``: no such repo there, or not at that revision."""
    folder = _repo_folder(ref, cache)
    fetch = f"`hf download {ref.repo}" + (f" --revision {ref.revision}`" if ref.revision != "main" else "`")
    if not folder.is_dir():
        return (
            f"no Hugging Face repo {ref.repo!r} in the local cache {cache} (no folder {folder.name} there); remap "
            f"reads only files already downloaded: fetch them first ({fetch}), or point HF_HUB_CACHE (or HF_HOME) "
            "at the cache that holds them"
        )
    kind = "commit" if _HASH_RE.match(ref.revision) else "revision"
    return (
        f"Hugging Face repo {ref.repo!r} is in the local cache {cache}, but not at {kind} {ref.revision!r} "
        f"({_cached_revisions(folder)}); fetch it first ({fetch}), or name a cached revision with @"
    )


def _hub_snapshot(ref: HubRef, cache: Path) -> Path | None:
    """The snapshot folder of ``ref`` in ``cache``, or None when the cache does not hold it."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise SourceError(
            f"huggingface_hub is not installed, and remap needs it to find Hugging Face repo {ref.repo!r} in the "
            f"local cache: {HUB_EXTRA}",
            where=ref.text,
        ) from None
    try:
        folder = snapshot_download(ref.repo, revision=ref.revision, cache_dir=cache, local_files_only=True)
    except (OSError, ValueError):  # LocalEntryNotFoundError is an OSError, HFValidationError a ValueError
        return None
    return Path(folder)


def _open_hub(ref: HubRef, *, key: str | None, trust_pickle: bool, tried: Path | None = None) -> Source:
    """Open a repo's snapshot in the local Hugging Face cache, like a local folder.

    ``tried`` is the local path looked for first (a bare ``org/name``): the error, when
    the cache does not hold the repo either, names both.
    """
    cache = hf_cache_dir()
    try:
        folder = _hub_snapshot(ref, cache)
    except SourceError as exc:
        if tried is None:
            raise
        raise SourceError(f"no such file or folder {tried}, and {exc.message}", where=ref.text) from None
    if folder is None:
        reason = _not_cached(ref, cache)
        if tried is not None:
            reason = f"no such file or folder {tried}, and {reason}"
        raise SourceError(reason, where=ref.text)
    source = _open_path(folder, key=key, trust_pickle=trust_pickle)
    source.description["notes"].append(
        f"Hugging Face repo {ref.repo} at {ref.revision} (snapshot {folder.name}) from the local cache {cache}"
    )
    return source
