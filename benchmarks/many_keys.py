"""100,000 small keys end to end: a ``module.``-prefixed checkpoint of 25,000 ``Linear(4, 4)`` +
``LayerNorm(4)`` blocks (4 keys each; a ModuleList of 100 ModuleLists of 250 blocks), loaded by
``remap.load`` with the rules ``strip_prefix: module.`` against the hand loop, which checks nothing::

    sd = load_file(path)                      # or torch.load(path, mmap=True, weights_only=True)
    model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})

Each variant runs in a fresh process (imports before the clock), repeats interleaved, from a
safetensors file and from a torch ``.pth`` of the same tensors. ``build s`` is the model's
normal construction (the same for both loops, before the clock); ``load s`` the load alone,
the ratio's base; ``empty_weights + remap`` builds under ``remap.empty_weights()`` and its
``build + load`` is compared with the hand loop's. Target (issue 16): remap <= 1.5x the hand loop.

Why nested: ``Module.load_state_dict`` filters the parent's whole state dict once per child
(torch/nn/modules/module.py, ``child_state_dict = {k: v ... if k.startswith(child_prefix)}``),
so its cost grows with children x keys: a flat ModuleList of 25,000 blocks takes minutes in the
hand loop itself, a cost no loader that calls ``load_state_dict`` avoids and no real model has.

    python benchmarks/many_keys.py [--quick] [--repeats N]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import finish, ForeignCpu, RssSampler, Timer, gib, table, warm_file  # noqa: E402
from build_load import RESULT, STRIP, spawn, summary  # noqa: E402

KEYS = {"full": 100_000, "quick": 2_000}
VARIANTS = ("hand: load_file + rename", "remap (safetensors)", "empty_weights + remap (safetensors)",
            "hand: torch.load mmap + rename", "remap (.pth)", "empty_weights + remap (.pth)")  # fmt: skip
BASE = {"remap (safetensors)": "hand: load_file + rename", "empty_weights + remap (safetensors)": "hand: load_file + rename",
        "remap (.pth)": "hand: torch.load mmap + rename", "empty_weights + remap (.pth)": "hand: torch.load mmap + rename"}  # fmt: skip


GROUP = 250  # blocks per inner ModuleList


def build(keys: int) -> Any:
    """``keys // 4`` blocks of Linear(4, 4) + LayerNorm(4), in ModuleLists of up to 250 blocks
    inside a ModuleList, built normally: ``5.249.0.weight`` is group 5, block 249, the Linear."""
    import torch

    blocks = keys // 4
    return torch.nn.ModuleList(
        torch.nn.ModuleList(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
                            for _ in range(min(GROUP, blocks - g)))
        for g in range(0, blocks, GROUP)
    )  # fmt: skip


def save(keys: int, work: Path) -> dict[str, Any]:
    """The ``module.``-prefixed checkpoint as safetensors and ``.pth`` (seeded, LayerNorms not at 1/0)."""
    import torch
    from safetensors.torch import save_file

    torch.manual_seed(0)
    sd = {"module." + k: torch.randn_like(v) for k, v in build(keys).state_dict().items()}
    save_file(sd, work / "model.safetensors")
    torch.save(sd, work / "model.pth")
    return {"keys": len(sd), "bytes": (work / "model.safetensors").stat().st_size}


def variant_fn(name: str, keys: int, work: Path) -> tuple[Callable[[], Any], Callable[[Any], None], bool]:
    """``(build, load, empty)``: how the variant builds its model and loads into it."""
    import torch
    from safetensors.torch import load_file

    import remap
    import remap.api  # noqa: F401  (remap's lazy modules load before the clock)
    import remap.loading.engine  # noqa: F401
    from remap.sources.readers import open_source  # noqa: F401

    path = work / ("model.pth" if name.endswith(("(.pth)", "mmap + rename")) else "model.safetensors")

    def hand_st(model: Any) -> None:
        sd = load_file(path)
        model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})

    def hand_torch(model: Any) -> None:
        sd = torch.load(path, mmap=True, weights_only=True)
        model.load_state_dict({k.removeprefix("module."): v for k, v in sd.items()})

    def with_remap(model: Any) -> None:
        remap.load(model, path, STRIP)

    def empty() -> Any:
        with remap.empty_weights():
            return build(keys)

    load = hand_st if name.startswith("hand: load_file") else hand_torch if name.startswith("hand") else with_remap
    if name.startswith("empty_weights"):
        return empty, load, True
    return (lambda: build(keys)), load, False


def check(model: Any, work: Path) -> list[str]:
    """Every tensor equal to the checkpoint's under its stripped name; none missing or on meta."""
    import torch
    from safetensors import safe_open

    state = model.state_dict()
    problems = [f"meta: {k}" for k, t in state.items() if t.is_meta]
    with safe_open(str(work / "model.safetensors"), "pt") as f:
        keys = {k.removeprefix("module."): k for k in f.keys()}
        problems += [f"not in the checkpoint: {k}" for k in state if k not in keys]
        for k, src in keys.items():
            if k not in state or not torch.equal(state[k], f.get_tensor(src)):
                problems.append(f"differs or missing: {k}")
    return problems


def child(name: str, keys: int, work: Path) -> dict[str, Any]:
    """One variant in this process: build and load timed apart, peak memory, the check."""
    make, load, empty = variant_fn(name, keys, work)
    with RssSampler() as rss:
        with Timer() as tb:
            model = make()
        with Timer() as tl:
            load(model)
    problems = check(model, work)
    status = "ok" if not problems else f"WRONG ({len(problems)}): {'; '.join(problems[:3])}"
    return {"build": tb.seconds, "load": tl.seconds, "seconds": tb.seconds + tl.seconds, **rss.peak_above_base(),
            "status": status}  # fmt: skip


def run(quick: bool, repeats: int, tmpdir: str | None, progress: Callable[[str], None] = print,
        keys: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Write the checkpoint once, then every variant ``repeats`` times, interleaved, each a fresh process."""
    keys = keys or KEYS["quick" if quick else "full"]
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    with tempfile.TemporaryDirectory(dir=tmpdir) as d:
        work = Path(d)
        # --quick: one process writes the file and runs every variant: a smoke test, not a measurement
        got = spawn([__file__, "--save", str(keys), "--work", str(work), "--keys", str(keys)]
                    + (["--child", *VARIANTS] if quick else []))  # fmt: skip
        info = got.pop(0)
        if "keys" not in info:
            return {"keys": keys, "status": f"could not write the checkpoint: {info['status']}", "variants": {}}
        progress(f"many keys: {info['keys']:,} keys, {gib(info['bytes'])} GiB")
        if quick:
            for v, res in zip(VARIANTS, got + [got[-1] if got else {"status": "failed: no result printed"}] * len(VARIANTS)):
                runs[v].append(res)
        for rep in range(0 if quick else repeats):
            for v in VARIANTS:
                warm_file(work / ("model.pth" if "pth" in v or "torch.load" in v else "model.safetensors"))
                with ForeignCpu() as other:
                    res = spawn([__file__, "--child", v, "--keys", str(keys), "--work", str(work)])[-1]
                res["others"] = other.cores
                runs[v].append(res)
                progress(f"  {v} #{rep + 1}: build {res.get('build', float('nan')):.2f} s, "
                         f"load {res.get('load', float('nan')):.2f} s, {res['status'][:120]}")  # fmt: skip
    variants = {v: summary(rs) | _medians(rs) for v, rs in runs.items()}
    for v, base in BASE.items():
        b, h = variants[v], variants[base]
        if "load" in b and "load" in h:
            b["vs_hand_load"] = b["load"] / h["load"]
            b["vs_hand_total"] = b["seconds"] / h["seconds"]
    return {"keys": info["keys"], "bytes": info["bytes"], "repeats": repeats, "quick": quick, "variants": variants}


def _medians(rs: list[dict[str, Any]]) -> dict[str, float]:
    import statistics

    good = [r for r in rs if "load" in r]
    return {k: statistics.median(r[k] for r in good) for k in ("build", "load")} if good else {}


def failures(result: dict[str, Any]) -> list[str]:
    """Rows that did not load, or loaded wrong values."""
    bad = [f"many keys: {result['status']}"] if "status" in result else []
    return bad + [f"many keys {v}: {b['status']}" for v, b in result.get("variants", {}).items() if b["status"] != "ok"]


def many_keys_table(result: dict[str, Any]) -> None:
    rows = []
    for v, b in result.get("variants", {}).items():
        if "load" not in b:
            rows.append([v, *["-"] * 8, b["status"][:90]])
            continue
        f = lambda x: "-" if x is None else f"{x:.2f}x"  # noqa: E731
        rows.append([v, f"{b['build']:.2f}", f"{b['load']:.3f}", f(b.get("vs_hand_load")), f"{b['seconds']:.2f}",
                     f(b.get("vs_hand_total")), gib(b["rss"]), gib(b["anon"]), gib(b["file"]),
                     b["status"][:90] + (f" (others {b['others']:.1f})" if b.get("others", 0) > 0.3 else "")])  # fmt: skip
    table(f"{result.get('keys', 0):,} small keys under module., strip_prefix end to end; median of "
          f"{result.get('repeats')} fresh process(es) per variant"
          + (" [--quick: variants share one process; timings not comparable]" if result.get("quick") else ""),
          ["variant", "build s", "load s", "x hand (load)", "build + load s", "x hand (total)", "peak GiB", "anon GiB",
           "file GiB", "check"], rows,
          ["x hand: over the hand loop on the same file (rename comprehension + load_state_dict, no checks). "
           "Target: remap load <= 1.5x the hand loop.",
           "build: the ModuleList's normal construction (empty_weights + remap: under remap.empty_weights()); "
           "peak above the process before the build."])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"{KEYS['quick']:,} keys")
    ap.add_argument("--keys", type=int)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--tmpdir")
    ap.add_argument("--child", nargs="+", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--save", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.save:
        print(RESULT + json.dumps(save(a.save, a.work)), flush=True)
    for name in a.child or []:
        print(RESULT + json.dumps(child(name, a.keys, a.work)), flush=True)
    if a.save or a.child:
        return 0
    t0 = time.perf_counter()
    result = run(a.quick, a.repeats, a.tmpdir, keys=a.keys)
    return finish(result, many_keys_table, failures, started=t0)


if __name__ == "__main__":
    sys.exit(main())
