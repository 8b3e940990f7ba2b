"""Start-up: each command imports only what it needs (behaviour, not timing).

Every case runs the command line in a fresh ``python -I`` (as the ``remap`` script runs:
the working directory is not on sys.path, and nothing is imported beforehand), then
prints which heavy packages ended up in ``sys.modules``. The timings themselves are
measured by ``benchmarks/startup.py``.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import save_sharded
from safetensors.torch import save_file

CONFIGS = Path(__file__).resolve().parent.parent / "configs"
HEAVY = ("torch", "torchvision", "timm", "transformers", "huggingface_hub", "numpy")
_RUN = (
    "import json, sys\n"
    "from remap.cli import main\n"
    "code = main(sys.argv[1:])\n"
    f"heavy = sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r}))\n"
    "print('MODULES ' + json.dumps({'code': code, 'heavy': heavy}))\n"
)


def run_cli(*argv: str, cwd: Path) -> tuple[int, list[str], str]:
    """(exit code, heavy packages imported, output) of ``remap ARGV`` in a fresh interpreter."""
    done = subprocess.run([sys.executable, "-I", "-c", _RUN, *argv], cwd=cwd, capture_output=True, text=True, timeout=300)
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("MODULES "), done.stdout + done.stderr
    result = json.loads(last.removeprefix("MODULES "))
    return result["code"], result["heavy"], done.stdout + done.stderr


@pytest.fixture
def small(tmp_path: Path) -> Path:
    path = tmp_path / "small.safetensors"
    save_file({"a.weight": torch.ones(3, 4), "b.bias": torch.zeros(3)}, str(path))
    return path


def test_import_remap_imports_no_heavy_package(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-I", "-c", f"import sys, remap; print(sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))"],
        cwd=tmp_path, capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert done.stdout.strip() == "[]"


@pytest.mark.parametrize("config", sorted(p.name for p in CONFIGS.glob("*.yaml")))
def test_validate_needs_no_torch(config: str, tmp_path: Path) -> None:
    code, heavy, output = run_cli("validate", str(CONFIGS / config), cwd=tmp_path)
    assert (code, heavy) == (0, []), output


def test_inspect_of_safetensors_needs_no_torch(small: Path, tmp_path: Path) -> None:
    index = save_sharded({"a.weight": torch.ones(3, 4), "b.bias": torch.zeros(3)}, tmp_path / "sharded")
    for path in (small, index, index.parent):
        code, heavy, output = run_cli("inspect", str(path), cwd=tmp_path)
        assert (code, heavy) == (0, []), output
        assert "a.weight" in output.replace("{", "").replace("}", "")


LINEAR_RULES = """version: 1
target: {model: 'torch.nn:Linear', args: [4, 3]}
rules:
  - strip_prefix: a.
  - drop: '^b\\.'
expect: {missing: ['^bias$']}
"""


def test_a_torch_factory_imports_no_torchvision(small: Path, tmp_path: Path) -> None:
    rules = tmp_path / "r.yaml"
    rules.write_text(LINEAR_RULES)
    code, heavy, output = run_cli("apply", str(rules), "--source", str(small), "--dry-run", cwd=tmp_path)
    assert (code, heavy) == (0, ["numpy", "torch"]), output  # torch imports numpy itself


def test_a_model_in_the_working_directory_loads_from_the_command_line(small: Path, tmp_path: Path) -> None:
    """`remap apply r.yaml --target mymodels:New`, run from the folder holding mymodels.py."""
    (tmp_path / "mymodels.py").write_text("import torch\n\n\ndef New(*args):\n    return torch.nn.Linear(*args)\n")
    rules = tmp_path / "r.yaml"
    rules.write_text(LINEAR_RULES)
    code, heavy, output = run_cli("apply", str(rules), "--source", str(small), "--target", "mymodels:New", cwd=tmp_path)
    assert code == 0 and "torchvision" not in heavy, output
    code, _, output = run_cli("apply", str(rules), "--source", str(small), "--target", "mymodels:New", cwd=CONFIGS)
    assert code == 3 and (
        f"cannot import module 'mymodels': no module named 'mymodels' in the working directory {CONFIGS} or on "
        "sys.path; run remap from the folder that holds mymodels.py"
    ) in output, output


def test_torchvision_is_imported_through_the_shim_when_a_factory_needs_it(tmp_path: Path) -> None:
    """timm imports torchvision itself: the op-schema shim must still run first (no conftest here)."""
    rules = tmp_path / "r.yaml"
    factory = "{model: 'timm:create_model', args: [test_resnet]}"
    rules.write_text(f"version: 1\nsource: {factory}\ntarget: {factory}\n")
    code, heavy, output = run_cli("apply", str(rules), "--dry-run", cwd=tmp_path)
    assert code == 0, output
    assert {"timm", "torchvision", "torch"} <= set(heavy), output
