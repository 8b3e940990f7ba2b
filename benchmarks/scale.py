"""Scale: remap's metadata paths at 10**6 keys against the plain loops they cannot beat.

    python benchmarks/scale.py [--quick] [--keys N] [--out scale.json]
    python benchmarks/run.py --only scale [--quick]

A checkpoint of ``N`` tiny tensors (default 10**6; ``--quick`` 10**5) is what a hostile
or merely unusual file looks like to the planner: the per-key work is all there is. Each
case runs remap's path and its *floor* (the least any tool must do for the same answer),
each in its own fresh process, and reports wall seconds, peak RSS above the process's
RSS before the block, and the ratio remap / floor:

* **open** — ``open_source(path)`` of a safetensors file of ``N`` one-element tensors
  (header read, every entry checked, the data section's tiling checked) vs. reading the
  header and ``json.loads`` of it;
* **plan** — ``remap.plan(target_mapping, source_mapping, rules)`` (one
  ``strip_prefix`` step; the target a mapping key -> shape) vs. a dict comprehension
  renaming every key and a loop pairing it with its target shape;
* **records** — the per-key report records (built on first read) and
  ``report.to_json()`` vs. a dict per key and ``json.dumps``;
* **inspect** — ``inspect_source`` + ``format_tree`` vs. a loop splitting every key on
  dots into a nested dict;
* **target** — ``target_meta_of_module`` on one module holding ``N`` parameters (one in
  a thousand registered twice: tied) vs. ``state_dict(keep_vars=True)`` and a shape per key;
* **dry-run** — ``plan.apply(module, dry_run=True)`` (the check that the module is the
  planned target) vs. the same state_dict walk.

Each case checks its own result (key counts, every key loaded, the tied aliases found);
timings are never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import RssSampler, machine_info, table  # noqa: E402

FULL_KEYS = 1_000_000
QUICK_KEYS = 100_000
PREFIX = "model."
RULES = {"version": 1, "rules": [{"strip_prefix": PREFIX}]}
TIE_EVERY = 1000


def key(i: int) -> str:
    """The ``i``-th key: ``model.layers.<i>.w`` (every key a sibling: the stress case for trees)."""
    return f"{PREFIX}layers.{i}.w"


def write_file(path: Path, n: int) -> int:
    """A valid safetensors file of ``n`` float32 tensors of shape [1], written directly
    (its header built with json, as the safetensors library would); returns its size."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    for i in range(n):
        header[key(i)] = {"dtype": "F32", "shape": [1], "data_offsets": [4 * i, 4 * i + 4]}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        f.write(bytes(4 * n))
    return path.stat().st_size


# --------------------------------------------------------------------------- cases (run in a child)


def _source_shapes(n: int) -> dict[str, tuple[int, ...]]:
    return {key(i): (1,) for i in range(n)}


def _target_shapes(n: int) -> dict[str, tuple[int, ...]]:
    return {key(i)[len(PREFIX):]: (1,) for i in range(n)}


def _module(n: int) -> Any:
    """One module with ``n`` one-element parameters, and every ``TIE_EVERY``-th registered
    a second time under another name (tied); built by filling ``_parameters`` directly."""
    import torch

    m = torch.nn.Module()
    params = {f"p{i}": torch.nn.Parameter(torch.zeros(1)) for i in range(n)}
    params.update({f"tied{i}": params[f"p{i}"] for i in range(0, n, TIE_EVERY)})
    m._parameters.update(params)
    return m


def case_open(n: int, path: str) -> tuple[Callable[[], Any], Callable[[Any], str]]:
    from remap.sources.readers import open_source

    return (lambda: open_source(path)), (lambda src: "ok" if len(src.meta) == n else f"WRONG: {len(src.meta)} keys")


def floor_open(n: int, path: str) -> tuple[Callable[[], Any], Callable[[Any], str]]:
    def run() -> Any:
        with open(path, "rb") as f:
            length = int.from_bytes(f.read(8), "little")
            return json.loads(f.read(length))

    return run, lambda h: "ok" if len(h) == n + 1 else f"WRONG: {len(h)} entries"


def case_plan(n: int, path: str) -> tuple[Callable[[], Any], Callable[[Any], str]]:
    import remap

    src, tgt = _source_shapes(n), _target_shapes(n)
    return (lambda: remap.plan(tgt, src, RULES)), (lambda p: "ok" if p.ok and p.report.totals.loaded == n else "WRONG: not ok")


def floor_plan(n: int, path: str) -> tuple[Callable[[], Any], Callable[[Any], str]]:
    src, tgt = _source_shapes(n), _target_shapes(n)

    def run() -> Any:
        renamed = {k.removeprefix(PREFIX): v for k, v in src.items()}
        return [k for k, v in renamed.items() if tgt.get(k) == v]

    return run, lambda paired: "ok" if len(paired) == n else f"WRONG: {len(paired)} paired"


def case_records(n: int, path: str) -> tuple[Callable[[], Any], Callable[[Any], str]]:
    import remap

    plan = remap.plan(_target_shapes(n), _source_shapes(n), RULES)

    def run() -> Any:
        report = plan.report
        return len(report.targets), len(report.sources), len(report.to_json())

    return run, lambda r: "ok" if r[:2] == (n, n) else f"WRONG: {r[:2]}"


def floor_records(n: int, path: str) -> tuple[Callable[[], Any], Callable[[Any], str]]:
    src = _source_shapes(n)

    def run() -> Any:
        targets = {k.removeprefix(PREFIX): {"status": "loaded", "shape": list(s), "dtype": "float32", "sources": [k]}
                   for k, s in src.items()}  # fmt: skip
        sources = {k: {"fate": "used", "shape": list(s), "dtype": "float32"} for k, s in src.items()}
        return len(targets), len(sources), len(json.dumps({"targets": targets, "sources": sources}))

    return run, lambda r: "ok" if r[:2] == (n, n) else f"WRONG: {r[:2]}"


def case_inspect(n: int, path: str) -> tuple[Callable[[], Any], Callable[[Any], str]]:
    from remap.sources.readers import open_source
    from remap.sources.tree import format_tree, inspect_source

    src = open_source(path)

    def run() -> Any:
        tree = inspect_source(src)
        return tree, format_tree(tree)

    return run, lambda r: "ok" if r[0].tensors == n else f"WRONG: {r[0].tensors} tensors"


def floor_inspect(n: int, path: str) -> tuple[Callable[[], Any], Callable[[Any], str]]:
    from remap.sources.readers import open_source

    meta = open_source(path).meta

    def run() -> Any:
        root: dict[str, Any] = {}
        for k in meta:
            node = root
            for part in k.split("."):
                node = node.setdefault(part, {})
        return root

    return run, lambda root: "ok" if len(root["model"]["layers"]) == n else "WRONG"


def case_target(n: int, path: str) -> tuple[Callable[[], Any], Callable[[Any], str]]:
    from remap.meta import target_meta_of_module

    m = _module(n)
    ties = len(range(0, n, TIE_EVERY))

    def check(meta: Any) -> str:
        tied = sum(1 for v in meta.values() if v.tied_to is not None)
        return "ok" if len(meta) == n + ties and tied == ties else f"WRONG: {len(meta)} keys, {tied} tied"

    return (lambda: target_meta_of_module(m)), check


def floor_target(n: int, path: str) -> tuple[Callable[[], Any], Callable[[Any], str]]:
    m = _module(n)
    ties = len(range(0, n, TIE_EVERY))

    def run() -> Any:
        return {k: (tuple(t.shape), t.dtype) for k, t in m.state_dict(keep_vars=True).items()}

    return run, lambda r: "ok" if len(r) == n + ties else f"WRONG: {len(r)} keys"


def case_dry_run(n: int, path: str) -> tuple[Callable[[], Any], Callable[[Any], str]]:
    import remap

    m = _module(n)
    plan = remap.plan(m, {k: (1,) for k in m.state_dict(keep_vars=True)}, {"version": 1})
    return (lambda: plan.apply(m, dry_run=True)), (lambda r: "ok" if r.ok and r.dry_run else "WRONG: not ok")


floor_dry_run = floor_target

CASES: dict[str, tuple[str, Callable[..., Any], Callable[..., Any]]] = {
    "open": ("open_source(safetensors)", case_open, floor_open),
    "plan": ("remap.plan(mapping target)", case_plan, floor_plan),
    "records": ("report records + to_json", case_records, floor_records),
    "inspect": ("inspect_source + format_tree", case_inspect, floor_inspect),
    "target": ("target_meta_of_module", case_target, floor_target),
    "dry-run": ("plan.apply(dry_run=True)", case_dry_run, floor_dry_run),
}


def _warm() -> None:
    """Import what remap imports on first use and run each path once on a few keys, so
    a case times the per-key work, not first-call imports."""
    import torch

    import remap
    from remap.meta import target_meta_of_module
    from remap.sources.tree import format_tree, inspect_source

    plan = remap.plan(_target_shapes(10), _source_shapes(10), RULES)
    plan.report.to_json()
    format_tree(inspect_source(plan.source))
    target_meta_of_module(torch.nn.Linear(2, 2))


def child(name: str, which: str, n: int, path: str) -> dict[str, Any]:
    """Set up case ``name`` (``which`` = remap or floor), then time and measure one run of it."""
    _, remap_case, floor_case = CASES[name]
    _warm()
    run, check = (remap_case if which == "remap" else floor_case)(n, path)
    with RssSampler() as rss:
        t0 = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - t0
    return {"seconds": seconds, "peak": rss.peak_above_base(), "check": check(result)}


# --------------------------------------------------------------------------- driver


def _spawn(name: str, which: str, n: int, path: Path, timeout: float) -> dict[str, Any]:
    cmd = [sys.executable, __file__, "--child", name, which, "--keys", str(n), "--file", str(path)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"check": f"TIMEOUT after {timeout:.0f} s"}
    if done.returncode != 0:
        return {"check": f"FAILED: {(done.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(quick: bool, keys: int | None = None, progress: Callable[[str], None] = print, only: list[str] | None = None,
        timeout: float = 600) -> dict[str, Any]:  # fmt: skip
    """Every case at ``keys`` keys (default 10**6, ``quick`` 10**5); the results as a dict."""
    n = keys or (QUICK_KEYS if quick else FULL_KEYS)
    out: dict[str, Any] = {"keys": n, "cases": {}}
    with tempfile.TemporaryDirectory(prefix="remap-scale-") as tmp:
        path = Path(tmp) / "tiny.safetensors"
        t0 = time.perf_counter()
        out["file_bytes"] = write_file(path, n)
        progress(f"  wrote {out['file_bytes'] / 1e6:.0f} MB, {n:,} tensors ({time.perf_counter() - t0:.1f} s)")
        for name in only or CASES:
            row: dict[str, Any] = {"what": CASES[name][0]}
            for which in ("remap", "floor"):
                row[which] = _spawn(name, which, n, path, timeout)
            r, f = row["remap"], row["floor"]
            if "seconds" in r and "seconds" in f:
                row["ratio"] = r["seconds"] / f["seconds"] if f["seconds"] else float("inf")
            progress(f"  {name}: remap {r.get('seconds', float('nan')):.2f} s, floor {f.get('seconds', float('nan')):.2f} s  "
                     f"({r['check']}, {f['check']})")  # fmt: skip
            out["cases"][name] = row
    return out


def scale_table(result: dict[str, Any]) -> None:
    rows = []
    for name, row in result["cases"].items():
        r, f = row["remap"], row["floor"]
        mib = lambda b: f"{b['peak']['rss'] / 2**20:.0f}" if "peak" in b else "-"  # noqa: E731
        secs = lambda b: f"{b['seconds']:.3f}" if "seconds" in b else "-"  # noqa: E731
        ratio = f"{row['ratio']:.2f}x" if "ratio" in row else "-"
        check = r["check"] if r["check"] != "ok" else f["check"]
        rows.append([name, row["what"], secs(r), secs(f), ratio, mib(r), mib(f), check[:60]])
    table(
        f"Scale: {result['keys']:,} keys (a {result['file_bytes'] / 1e6:.0f} MB safetensors file of one-element tensors); "
        "each side a fresh process",
        ["case", "remap path", "remap s", "floor s", "remap/floor", "remap MiB", "floor MiB", "check"],
        rows,
        ["floor: the least any tool does for the same answer (json.loads of the header; a dict comprehension; "
         "a dict per key + json.dumps; a split loop; a state_dict walk).",
         "MiB: peak RSS above the RSS after the case's setup (VmHWM reset, /proc/self/status sampled every 2 ms)."],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_KEYS:,} keys instead of {FULL_KEYS:,}")
    ap.add_argument("--keys", type=int, help="number of keys (overrides --quick)")
    ap.add_argument("--only", help="cases to run, comma-separated: " + ", ".join(CASES))
    ap.add_argument("--out", type=Path, help="write the JSON results here")
    ap.add_argument("--timeout", type=float, default=600, help="seconds each side of a case may take (default 600)")
    ap.add_argument("--child", nargs=2, metavar=("CASE", "SIDE"), help=argparse.SUPPRESS)
    ap.add_argument("--file", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.keys, a.file)))
        return 0
    only = a.only.split(",") if a.only else None
    if only and set(only) - set(CASES):
        ap.error(f"unknown cases: {', '.join(sorted(set(only) - set(CASES)))}; known: {', '.join(CASES)}")
    info = machine_info()
    print(f"$ {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"remap {info['remap']} ({info.get('remap_commit')}) from {os.path.dirname(__import__('remap').__file__)}")
    result = run(a.quick, a.keys, only=only, timeout=a.timeout)
    scale_table(result)
    if a.out:
        a.out.write_text(json.dumps({"machine": info, **result}, indent=1) + "\n")
    bad = [n for n, row in result["cases"].items() if row["remap"]["check"] != "ok" or row["floor"]["check"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
