"""Fuzzing the records torch.load trusts (issue 12): any value of a torch zip archive's small
records, and any storage size, ends in a load or a SourceError, never a crash. The examples
run in a child process, so a SIGSEGV or SIGFPE there is a failed test here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.hostile
SCALE = int(os.environ.get("REMAP_FUZZ_SCALE", "1"))

CHILD = """
import io, sys, zipfile
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from remap.errors import SourceError
from remap.sources.readers import open_source

buf = io.BytesIO()
torch.save({"w": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}, buf)
ORIGINAL = buf.getvalue()
RECORDS = ["byteorder", ".storage_alignment", ".format_version", "version", "data/0", "data/1"]
text = st.one_of(st.sampled_from([b"little", b"big", b"0", b"-1", b"64", b"3", b"99", b"", b"1" * 30]), st.binary(max_size=12))

@settings(max_examples=int(sys.argv[1]), deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(changes=st.dictionaries(st.sampled_from(RECORDS), text, min_size=1, max_size=3))
def check(changes):
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(ORIGINAL)) as zin, zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            inner = info.filename.split("/", 1)[1]
            zout.writestr(info, changes.get(inner, zin.read(info)))
    path = sys.argv[2]
    with open(path, "wb") as f:
        f.write(out.getvalue())
    try:
        with open_source(path) as src:
            for key in src.meta:
                src.read(key)
    except SourceError:
        pass

check()
print("done")
"""


def test_any_record_value_is_a_load_or_a_source_error(tmp_path: Path) -> None:
    pytest.importorskip("hypothesis")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(CHILD), str(60 * SCALE), str(tmp_path / "f.pth")],
                          capture_output=True, text=True, env=env, timeout=300 * SCALE)  # fmt: skip
    assert done.returncode == 0 and done.stdout.strip().endswith("done"), f"rc {done.returncode}: {done.stderr[-3000:]}"
