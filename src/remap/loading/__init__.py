"""Applying a plan: the engine (``engine``, the only code that writes to a module),
streaming reads (``streaming``), freezing (``freeze``), atomic saves (``saving``) and the
output check against the source model (``verify``).

May import, at module level: ``remap.errors``, ``remap.files``, ``remap.meta``, ``remap.report``, ``remap.sources``, ``remap.rules``, ``remap.planning``. Never ``diffing``, ``api``, ``cli`` (docs/architecture.md; tests/test_architecture.py keeps it so).
"""
