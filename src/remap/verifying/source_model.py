"""The source model for verify: the source architecture loaded strictly with the source
weights, tied parameters allowed under one of their names.

>>> import torch
>>> m = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
>>> m[1].weight = m[0].weight
>>> tied_aliases(m)
{'1.weight': '0.weight'}
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..errors import UsageError

__all__ = ["tied_aliases", "load_source_weights"]


def tied_aliases(module: Any) -> dict[str, str]:
    """Name -> first name, for every parameter that ``module`` holds under several names
    (one and the same Parameter object, as tied embeddings are); first names are left out.

    >>> import torch
    >>> m = torch.nn.Sequential(torch.nn.Embedding(5, 3), torch.nn.Linear(3, 5, bias=False))
    >>> m[1].weight = m[0].weight
    >>> tied_aliases(m)
    {'1.weight': '0.weight'}
    """
    first: dict[int, str] = {}
    out = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        seen = first.setdefault(id(param), name)
        if seen != name:
            out[name] = seen
    return out


def load_source_weights(model: Any, source: Any, *, what: str) -> dict[str, str]:
    """Load every tensor of ``source`` (a :class:`~remap.sources.readers.Source`) into ``model``, strictly
    but for tied parameters: a checkpoint that holds a tied parameter under one of its names
    (``save_pretrained`` writes ``transformer.wte.weight``, not the ``lm_head.weight`` tied to
    it) loads it, and copies under several names must be equal. Any other missing or
    unexpected key is a UsageError naming them, raised before a tensor is read.

    ``what`` describes the two sides for messages. Returns the aliases the source left out,
    each with the name it was loaded under.
    """
    import torch

    aliases = tied_aliases(model)
    held = set(source.meta)
    groups: dict[str, list[str]] = {}
    for alias, first in aliases.items():
        groups.setdefault(first, [first]).append(alias)
    excused = {}
    for names in groups.values():
        present = [n for n in names if n in held]
        excused.update({n: present[0] for n in names if present and n not in held})
    expected = [k for k, v in model.state_dict(keep_vars=True).items() if isinstance(v, torch.Tensor)]
    _fail_on_keys(what, [k for k in expected if k not in held and k not in excused], sorted(held - set(expected)), aliases)
    _check_tied_copies(what, source, [[n for n in names if n in held] for names in groups.values()])
    result = model.load_state_dict({k: source.read(k) for k in source.meta}, strict=False)
    _fail_on_keys(what, [k for k in result.missing_keys if k not in excused], list(result.unexpected_keys), aliases)
    return excused


def _fail_on_keys(what: str, missing: list[str], unexpected: list[str], aliases: Mapping[str, str]) -> None:
    if not missing and not unexpected:
        return
    parts = [f"{len(keys)} {label} key(s): {_some(keys)}" for label, keys in (("missing", missing), ("unexpected", unexpected)) if keys]
    tied = f" (tied parameters, which may be saved under one name: {_some([f'{a} = {b}' for a, b in aliases.items()])})" if aliases else ""
    raise UsageError(f"verify: the source weights do not load strictly into {what}: {'; '.join(parts)}{tied}; "
                     "source.model must build the architecture the checkpoint was saved from")  # fmt: skip


def _check_tied_copies(what: str, source: Any, copies: list[list[str]]) -> None:
    """Copies of one tied parameter that a checkpoint holds under several names must agree."""
    import torch

    for names in (c for c in copies if len(c) > 1):
        first = source.read(names[0])
        differ = [n for n in names[1:] if not torch.equal(source.read(n), first)]
        if differ:
            raise UsageError(f"verify: the source weights do not load into {what}: {names[0]} and {', '.join(differ)} are one tied "
                             "parameter there, but the checkpoint holds different tensors under these names")  # fmt: skip


def _some(keys: list[str], limit: int = 8) -> str:
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")
