"""benchmarks/formats.py runs end to end on tiny files (behaviour only, never timing).

Two formats (a NumPy archive, read by remap straight from the file, and a Q8_0 GGUF file,
dequantized at read) go through the whole harness: written by their own libraries, planned
with the page cache evicted, loaded by their own loader and by remap, each in a fresh
process. The table keeps a row for every format, selected or not; the counts of bytes a plan
reads are integers; every loaded model equals the values written (the harness's own check,
which the last test shows can fail).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("numpy")
pytest.importorskip("gguf")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import formats  # noqa: E402

SIZE = 1 << 20
RUN = ["npz", "gguf_q8_0"]


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("formats")
    lines: list[str] = []
    out = formats.run(True, 1, str(tmp), progress=lines.append, only=RUN, variants=["own", "remap"], size=SIZE, timeout=120)
    out["progress"] = lines
    out["left_behind"] = [p.name for p in tmp.iterdir()]
    return out


def test_every_format_has_a_row(result: dict[str, Any]) -> None:
    rows = formats.rows(result)
    assert [r[0] for r in rows][: len(formats.NAMES)] == list(formats.NAMES)
    assert all(len(r) == len(formats.COLUMNS) for r in rows)
    for name in formats.NAMES:
        if name not in RUN:
            assert result["formats"][name]["status"].startswith(("skipped", "n/a")), name


def test_selected_formats_load_correctly(result: dict[str, Any]) -> None:
    for name in RUN:
        row = result["formats"][name]
        assert row["status"] == "ok", (name, row["status"], result["progress"])
        for variant in ("own", "remap"):
            run = row["runs"][variant][0]
            assert run["problems"] == [], (name, variant, run["problems"])
            assert run["peak"]["rss"] >= 0 and run["seconds"] > 0
        assert row["runs"]["remap"][0]["remap_loaded"] == row["tensors"]


def test_plan_counts_are_byte_counts(result: dict[str, Any]) -> None:
    for name in RUN:
        plan = result["formats"][name]["plan"]
        assert plan["plan_ok"] and plan["planned_keys"] == result["formats"][name]["tensors"]
        for k in ("read_bytes", "paged_bytes", "read_calls", "resident_before"):
            assert isinstance(plan[k], int) and plan[k] >= 0, (name, k, plan[k])
        assert plan["file_bytes"] == sum(plan["files"].values()) > 0
        assert 0 <= plan["read_share"] and 0 <= plan["paged_share"]


def test_files_are_removed(result: dict[str, Any]) -> None:
    assert result["left_behind"] == []


def test_the_check_catches_a_wrong_load() -> None:
    """A model left at zeros, or with one tensor of another's values, fails the harness's check."""
    import torch

    fmt = formats.by_name("gguf_q8_0")
    entries = formats.layout(fmt, 1 << 18)
    model = formats.build_model(entries, on_meta=False)
    assert formats.check_model(model, entries)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for e in entries:
            params[e.key].copy_(torch.from_numpy(formats.expected(e)))
    assert formats.check_model(model, entries) == []
    b = entries[-1]
    a = next(e for e in entries if e.shape == b.shape and e.key != b.key)
    with torch.no_grad():
        params[b.key].copy_(params[a.key])
    assert formats.check_model(model, entries)
