"""Planning, pure: no tensor data is read and no module is touched. The planner
(``planner``: ``make_plan``, ``Plan``), the name pass that runs the name steps once per key
shape (``name_pass``), lazily built records (``lazy``), a key's journey (``explain``).
``Plan.apply`` imports ``remap.loading.engine`` inside the method: the one late, upward import.

May import, at module level: ``remap.errors``, ``remap.files``, ``remap.meta``, ``remap.report``, ``remap.sources``, ``remap.rules``. Never ``loading``, ``diffing``, ``api``, ``cli`` (docs/architecture.md; tests/test_architecture.py keeps it so).
"""
