"""Applying a plan: the engine (``engine``, the only code that writes to a module),
streaming reads (``streaming``), freezing (``freeze``), atomic saves (``saving``), optimizer
state (``optimizer``) and building without weights (``empty``). Verifying a load is ``remap.verifying``.

May import, at module level: ``remap.errors``, ``remap.files``, ``remap.meta``, ``remap.report``, ``remap.sources``, ``remap.rules``, ``remap.planning``. Never ``diffing``, ``api``, ``cli`` (docs/architecture.md; tests/test_architecture.py keeps it so).
"""
