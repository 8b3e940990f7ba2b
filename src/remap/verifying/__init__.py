"""Proving a conversion: run the source model and the loaded target on the same input and
compare (``run``), with the inputs (``inputs``), the comparison (``compare``) and the source
model loaded strictly from its weights (``source_model``).

May import, at module level: ``remap.errors``, ``remap.files``, ``remap.meta``, ``remap.report``,
``remap.sources``, ``remap.rules``, ``remap.planning``, ``remap.loading``. Never ``exporting``,
``diffing``, ``api``, ``cli`` (docs/architecture.md; tests/test_architecture.py keeps it so).
"""
