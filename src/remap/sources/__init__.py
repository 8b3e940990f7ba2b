"""Reading checkpoints without running them, and building modules: the readers behind
one ``Source`` interface (``readers``: ``open_source``, detection by content; one module per
format: ``torch_reader``, ``safetensors_reader``, ``sharded``, ``hub`` and those ``registry``
lists), ``module:callable`` factories (``factories``), and ``remap inspect``'s key tree (``tree``).

May import, at module level: ``remap.errors``, ``remap.files``, ``remap.meta``, ``remap.report``. Never ``rules``, ``planning``, ``loading``, ``diffing``, ``api``, ``cli`` (docs/architecture.md; tests/test_architecture.py keeps it so).

``remap.sources`` was a module before the packages; its names (and the others below) stay importable from here, loaded on first use so that importing one submodule never imports its siblings.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..exports import lazy_exports

_EXPORTS = {
    "Source": "readers",
    "open_source": "readers",
    "CANDIDATE_KEYS": "readers",
    "FOLDER_FILES": "readers",
    "ACCEPTED_FORMATS": "readers",
    "PICKLE_ALLOW_LIST": "torch_reader",
    "HubRef": "hub",
    "parse_hub_ref": "hub",
    "hf_cache_dir": "hub",
}
__all__ = list(_EXPORTS)

if TYPE_CHECKING:
    from .readers import (
        Source as Source,
        open_source as open_source,
        CANDIDATE_KEYS as CANDIDATE_KEYS,
        FOLDER_FILES as FOLDER_FILES,
        ACCEPTED_FORMATS as ACCEPTED_FORMATS,
    )
    from .torch_reader import PICKLE_ALLOW_LIST as PICKLE_ALLOW_LIST
    from .hub import (
        HubRef as HubRef,
        parse_hub_ref as parse_hub_ref,
        hf_cache_dir as hf_cache_dir,
    )


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
