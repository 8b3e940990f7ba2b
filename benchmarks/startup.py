"""Command-line start-up: what one ``remap`` call costs before it does any work.

    python benchmarks/startup.py [--rounds N] [--out startup.json]

Every case is a fresh ``python -I`` process (as the ``remap`` script starts: nothing
imported, the working directory not on sys.path), timed from spawn to exit:

* ``python (empty)``: the interpreter alone;
* ``import torch``: the floor of any command that touches a tensor;
* ``remap validate``: a shipped rules file (needs neither torch nor any model library);
* ``remap inspect``: a small ``.safetensors`` file this script writes (header only, no torch);
* ``remap apply --dry-run``: that file into ``torch.nn:Linear`` (needs torch, not torchvision).

Rounds interleave the cases (each round runs every case once, in a rotated order), so a
machine that drifts affects all cases alike. Reported: the median seconds per case and
the median over rounds of each case's time over the same round's ``import torch`` (the
ratio to the floor). Every run checks its exit code and its output, and timings are
never asserted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _measure import table  # benchmarks/ is on sys.path: this script's folder, or run.py puts it there

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "torchvision-resnet-finetune.yaml"
_CLI = "import sys; from remap.cli import main; sys.exit(main(sys.argv[1:]))"
_RULES = """version: 1
target: {model: 'torch.nn:Linear', args: [4, 3]}
rules:
  - strip_prefix: a.
  - drop: '^b\\.'
expect: {missing: ['^bias$']}
"""


def _write_inputs(folder: Path) -> tuple[Path, Path]:
    """A two-tensor safetensors file and rules that load it into Linear(4, 3), written without torch."""
    import struct

    header = {"a.weight": {"dtype": "F32", "shape": [3, 4], "data_offsets": [0, 48]},
              "b.bias": {"dtype": "F32", "shape": [3], "data_offsets": [48, 60]}}  # fmt: skip
    raw = json.dumps(header).encode()
    small = folder / "small.safetensors"
    small.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(60))
    rules = folder / "linear.yaml"
    rules.write_text(_RULES)
    return small, rules


def cases(folder: Path) -> dict[str, tuple[list[str], str]]:
    """Case name -> (argv, text its output must contain)."""
    small, rules = _write_inputs(folder)
    py = [sys.executable, "-I"]
    return {
        "python (empty)": ([*py, "-c", "pass"], ""),
        "import torch (floor)": ([*py, "-c", "import torch"], ""),
        "remap validate": ([*py, "-c", _CLI, "validate", str(CONFIG)], "OK, version 1"),
        "remap inspect .safetensors": ([*py, "-c", _CLI, "inspect", str(small)], "a.weight"),
        "remap apply --dry-run": ([*py, "-c", _CLI, "apply", str(rules), "--source", str(small), "--dry-run"], "dry run"),
    }


def _time(argv: list[str], expect: str, cwd: Path) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if done.returncode != 0 or expect not in done.stdout:
        raise RuntimeError(f"{argv[3:]} failed (exit {done.returncode}):\n{done.stdout}{done.stderr}")
    return seconds


def run(rounds: int = 7, progress: Any = print) -> dict[str, Any]:
    """Time every case ``rounds`` times, interleaved; medians and ratios to the torch floor."""
    with tempfile.TemporaryDirectory(prefix="remap-startup-") as tmp:
        folder = Path(tmp)
        todo = cases(folder)
        names = list(todo)
        seconds: dict[str, list[float]] = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                seconds[name].append(_time(*todo[name], cwd=folder))
            progress(f"  round {r + 1}/{rounds}: " + ", ".join(f"{n} {seconds[n][-1]:.2f}s" for n in names))
    floor = seconds["import torch (floor)"]
    return {
        "rounds": rounds,
        "cases": {
            n: {
                "median_s": statistics.median(s),
                "min_s": min(s),
                "seconds": s,
                "x_torch_per_round": statistics.median(t / f for t, f in zip(s, floor)),
            }
            for n, s in seconds.items()
        },
    }


def startup_table(result: dict[str, Any]) -> None:
    """Print the results as a table (rich when installed)."""
    rows = [[n, f"{c['median_s']:.3f}", f"{c['min_s']:.3f}", f"{c['x_torch_per_round']:.2f}x"]
            for n, c in result["cases"].items()]  # fmt: skip
    table(
        f"CLI start-up: seconds from spawn to exit (median of {result['rounds']} interleaved rounds)",
        ["case", "median s", "min s", "x import torch"],
        rows,
        ["Each case a fresh `python -I` process; x import torch: the median over rounds of the case's time "
         "over the same round's `python -c 'import torch'`.",
         "validate and inspect of a .safetensors file import no torch; apply builds a torch module, so torch is its floor."],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    ap.add_argument("--out", type=Path, help="also write the JSON results here")
    a = ap.parse_args(argv)
    result = run(a.rounds)
    print()
    startup_table(result)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
