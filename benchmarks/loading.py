"""Loading a checkpoint into a model: remap against the raw torch paths and the page cache.

The model is a stack of ``nn.Linear(dim, dim)`` layers (default 32 x 4096: 2.15 GB of
fp32; ``--quick``: 12 x 1024, 50 MB). One checkpoint is written twice, as safetensors
and as a torch.save zip (.pth). Every variant runs in its own fresh subprocess, so its
memory is measured cleanly:

1. import everything, build the target (allocated and written, or on ``meta``);
2. read the checkpoint file once, so the load reads from the page cache;
3. reset the kernel's peak-RSS counter, then time the load, followed by a read of one
   element per memory page of every model tensor (so a lazily mapped result pays for its
   page faults), while a thread samples ``/proc/self/status`` every ~2 ms (see
   ``_measure.RssSampler``): memory is reported above the RSS just before the load
   (after building the model);
4. self-check: every tensor of the model equals the checkpoint's (read with
   ``safe_open`` after the measurement), none is left on ``meta``.

The page-cache copy (``readinto`` of the whole file into a preallocated, touched
buffer) is the physical limit every load into an allocated model is compared with; the
same copy into freshly allocated memory (which pays a page fault per page) is the
reference for a meta-device target that ends up holding its own copy. Both copies are
single-threaded (one ``readinto``); torch copies tensors with all its threads and remap
reads with a few, so a load can beat them.

Child usage (what the parent runs; useful with ``--profile`` to see where time goes)::

    python benchmarks/loading.py --make DIR --layers 12 --dim 1024
    python benchmarks/loading.py --child remap_safetensors --dir DIR --layers 12 --dim 1024 [--profile]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import ForeignCpu, RssSampler, Timer, run_status, warm_file  # noqa: E402

FULL = {"layers": 32, "dim": 4096}
QUICK = {"layers": 12, "dim": 1024}
ST, PTH = "model.safetensors", "model.pth"
MARK = "RESULT: "

# name: (label, file, target: "alloc" | "meta" | "buffer" (preallocated) | "fresh" (allocated in the load), raw baseline?)
VARIANTS: dict[str, tuple[str, str, str, bool]] = {
    "torch_load": ("torch.load + load_state_dict", PTH, "alloc", True),
    "torch_load_mmap": ("torch.load(mmap=True) + load_state_dict", PTH, "alloc", True),
    "safetensors_load_file": ("safetensors load_file + load_state_dict", ST, "alloc", True),
    "remap_safetensors": ("remap.load(model, .safetensors)", ST, "alloc", False),
    "remap_pth": ("remap.load(model, .pth)", PTH, "alloc", False),
    "remap_no_rollback": ("remap.load(model, .safetensors, rollback=False)", ST, "alloc", False),
    "meta_assign": ("meta target: load_file + load_state_dict(assign=True)", ST, "meta", False),
    "meta_remap": ("meta target: remap.load(model, .safetensors)", ST, "meta", False),
    "meta_remap_mmap": ("meta target: remap.load(model, .safetensors, mmap_weights=True)", ST, "meta", False),
    "page_cache_copy": ("page-cache copy: readinto a preallocated buffer", ST, "buffer", False),
    "page_cache_copy_fresh": ("page-cache copy into fresh memory: allocate + readinto", ST, "fresh", False),
}


# --------------------------------------------------------------------------- child side


def build_model(layers: int, dim: int, on_meta: bool) -> Any:
    """The target: ``layers.N.weight/bias`` of N Linear(dim, dim). Allocated targets are
    written (zeros) so their pages are resident before the baseline RSS is taken."""
    import torch

    class Stack(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.layers = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(layers))

    with torch.device("meta"):
        model = Stack()
    if not on_meta:
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    return model


def _load_fn(variant: str) -> Callable[[Any, Path], Any]:
    import torch

    def torch_load(model: Any, path: Path) -> None:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    def torch_load_mmap(model: Any, path: Path) -> None:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True))

    def safetensors_load_file(model: Any, path: Path) -> None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path))

    def meta_assign(model: Any, path: Path) -> None:
        from safetensors.torch import load_file

        model.load_state_dict(load_file(path), assign=True)

    def remap_load(model: Any, path: Path) -> dict[str, Any]:
        import remap

        report = remap.load(model, path)
        return {"remap_ok": report.ok, "remap_loaded": report.totals.loaded}

    def remap_load_no_rollback(model: Any, path: Path) -> dict[str, Any]:
        import remap

        report = remap.load(model, path, rollback=False)
        return {"remap_ok": report.ok, "remap_loaded": report.totals.loaded}

    def remap_load_mmap(model: Any, path: Path) -> dict[str, Any]:
        import remap

        report = remap.load(model, path, mmap_weights=True)
        return {"remap_ok": report.ok, "remap_loaded": report.totals.loaded}

    return {
        "torch_load": torch_load,
        "torch_load_mmap": torch_load_mmap,
        "safetensors_load_file": safetensors_load_file,
        "remap_safetensors": remap_load,
        "remap_pth": remap_load,
        "remap_no_rollback": remap_load_no_rollback,
        "meta_assign": meta_assign,
        "meta_remap": remap_load,
        "meta_remap_mmap": remap_load_mmap,
    }[variant]


def touch(model: Any) -> None:
    """Read one element of every memory page of every tensor of the model, so a load that
    leaves tensors backed by a lazily faulted mapping (safetensors' mmap after
    ``assign=True``) pays for bringing them in, like every other variant."""
    import torch

    with torch.no_grad():
        for t in model.state_dict().values():
            if not t.is_meta and t.numel():
                t.reshape(-1)[:: max(1, 4096 // t.element_size())].sum()


def check_model(model: Any, st_path: Path) -> list[str]:
    """Problems with the loaded model: tensors left on meta, or differing from the checkpoint."""
    import torch
    from safetensors import safe_open

    problems = []
    state = model.state_dict()
    on_meta = [k for k, v in state.items() if v.is_meta]
    if on_meta:
        problems.append(f"{len(on_meta)} of {len(state)} tensors still on meta (e.g. {on_meta[0]})")
    with safe_open(str(st_path), framework="pt") as f:
        differ = [k for k, v in state.items() if not v.is_meta and not torch.equal(v, f.get_tensor(k))]
    if differ:
        problems.append(f"{len(differ)} tensors differ from the checkpoint (e.g. {differ[0]})")
    return problems


def child(variant: str, folder: Path, layers: int, dim: int, profile: bool = False) -> dict[str, Any]:
    """One measured load in this (fresh) process."""
    import safetensors.torch  # noqa: F401  imported before the baseline, like torch
    import torch

    import importlib
    import pkgutil

    import remap

    for m in pkgutil.walk_packages(remap.__path__, "remap."):  # remap's lazily imported modules, so no import is timed
        if m.name != "remap.__main__":
            importlib.import_module(m.name)

    remap.parse_rules({"version": 1})  # the first parse imports jsonschema (~60 ms): not timed, like `import torch`

    label, filename, target, _ = VARIANTS[variant]
    path = folder / filename
    size = path.stat().st_size
    out: dict[str, Any] = {"variant": variant, "label": label, "file_bytes": size}
    if target in ("buffer", "fresh"):
        # torch's allocator, like the model's parameters (numpy would madvise huge pages)
        holder = torch.empty(size if target == "buffer" else 0, dtype=torch.uint8).numpy()
        holder.fill(1)  # touched: resident before the baseline
        model_bytes = size
    else:
        holder = build_model(layers, dim, on_meta=target == "meta")
        model_bytes = sum(p.numel() * p.element_size() for p in holder.parameters())
    out["model_bytes"] = model_bytes
    out["warm_seconds"] = warm_file(path)
    gc.collect()

    if target in ("buffer", "fresh"):
        view = memoryview(holder)

        def fn(_: Any, p: Path) -> None:
            nonlocal holder, view
            if target == "fresh":  # allocated untouched: the copy pays the page faults
                holder = torch.empty(size, dtype=torch.uint8).numpy()
                view = memoryview(holder)
            with open(p, "rb", buffering=0) as f:
                done = 0
                while done < size:
                    n = f.readinto(view[done:])
                    if not n:
                        raise OSError(f"{p}: short read at {done} of {size}")
                    done += n
    else:
        fn = _load_fn(variant)

    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with RssSampler() as rss, Timer() as timer:
                if profiler:
                    profiler.enable()
                extra = fn(holder, path)
                if target in ("alloc", "meta"):
                    touch(holder)
                if profiler:
                    profiler.disable()
            out.update(extra or {})
            out["seconds"] = timer.seconds
            out["peak"] = rss.peak_above_base()
            out["base"] = rss.base
            out["samples"] = rss.samples
            out["hwm_reset"] = rss.hwm_reset
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            out["traceback"] = traceback.format_exc()[-2000:]
    out["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught})
    if profiler:
        import io
        import pstats

        s = io.StringIO()
        pstats.Stats(profiler, stream=s).sort_stats("cumulative").print_stats(30)
        sys.stderr.write(s.getvalue())
    if "error" not in out:
        if target in ("buffer", "fresh"):
            with open(path, "rb") as f:
                head = f.read(1 << 20)
            out["problems"] = [] if bytes(view[: len(head)]) == head else ["copied bytes differ from the file"]
        else:
            out["problems"] = check_model(holder, folder / ST)
    return out


def make_checkpoint(folder: Path, layers: int, dim: int) -> None:
    """Write the same random weights as ``model.safetensors`` and ``model.pth``."""
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    state = {}
    for i in range(layers):
        state[f"layers.{i}.weight"] = torch.rand((dim, dim), generator=g)
        state[f"layers.{i}.bias"] = torch.rand((dim,), generator=g)
    save_file(state, str(folder / ST))
    torch.save(state, folder / PTH)


# --------------------------------------------------------------------------- parent side


def _spawn(args: list[str], threads: int | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)} if threads else None
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True, env=env)


def run_variant(variant: str, folder: Path, layers: int, dim: int, threads: int | None = None) -> dict[str, Any]:
    """Run one variant in a fresh subprocess (torch with ``threads`` threads, default: its
    own choice); its result, or an error record. ``other_cores``: how many cores other
    processes kept busy meanwhile (0 on a quiet machine)."""
    with ForeignCpu() as other:
        args = ["--child", variant, "--dir", str(folder), "--layers", str(layers), "--dim", str(dim)]
        proc = _spawn(args, threads)
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return {**json.loads(line[len(MARK) :]), "other_cores": other.cores}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return {"variant": variant, "label": VARIANTS[variant][0], "error": f"subprocess died: {tail[0][:300]}",
            "other_cores": other.cores}  # fmt: skip


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Best (fastest) run per variant, with ratios to the fastest raw path and to the page-cache copy."""
    best: dict[str, dict[str, Any]] = {}
    for v, rs in runs.items():
        timed = [r for r in rs if "seconds" in r]
        pick = min(timed, key=lambda r: r["seconds"]) if timed else rs[0]
        best[v] = {**pick, "status": run_status(pick), "all_seconds": [r.get("seconds") for r in rs]}
    raw = [b for v, b in best.items() if VARIANTS[v][3] and b["status"] == "ok"]
    fastest_raw = min(raw, key=lambda r: r["seconds"]) if raw else None
    copy = best.get("page_cache_copy")
    copy_s = copy["seconds"] if copy and "seconds" in copy else None
    for b in best.values():
        if "seconds" not in b:
            continue
        b["bytes_per_second"] = b["model_bytes"] / b["seconds"]
        b["vs_fastest_raw"] = b["seconds"] / fastest_raw["seconds"] if fastest_raw else None
        b["vs_page_cache_copy"] = b["seconds"] / copy_s if copy_s else None
        b["peak_share_of_model"] = b["peak"]["rss"] / b["model_bytes"]
    for v, ratio in _paired_ratios(runs).items():
        best[v]["vs_raw_same_round_median"] = ratio
    return {"fastest_raw": fastest_raw["variant"] if fastest_raw else None, "variants": best}


def _paired_ratios(runs: dict[str, list[dict[str, Any]]]) -> dict[str, float]:
    """Per variant, the median over rounds of its time over the fastest raw path's time in
    the same round: the rounds run the variants one after the other, so a round shares the
    machine's state of the moment (best-of times can come from different moments).

    >>> ok = lambda s: {"seconds": s}
    >>> _paired_ratios({"safetensors_load_file": [ok(1.0), ok(2.0)], "remap_safetensors": [ok(1.1), ok(1.0)]})["remap_safetensors"]
    0.8
    """
    rounds = max((len(rs) for rs in runs.values()), default=0)
    fastest = []
    for n in range(rounds):
        raw = [rs[n]["seconds"] for v, rs in runs.items() if VARIANTS[v][3] and n < len(rs) and "seconds" in rs[n]
               and run_status(rs[n]) == "ok"]  # fmt: skip
        fastest.append(min(raw) if raw else None)
    out = {}
    for v, rs in runs.items():
        ratios = sorted(r["seconds"] / f for r, f in zip(rs, fastest) if f and "seconds" in r)
        if ratios:
            mid = len(ratios) // 2
            out[v] = ratios[mid] if len(ratios) % 2 else (ratios[mid - 1] + ratios[mid]) / 2
    return out


def run(quick: bool, repeats: int, tmpdir: str | None = None, progress: Callable[[str], None] = print,
        only: list[str] | None = None, threads: int | None = None) -> dict[str, Any]:  # fmt: skip
    """Write the checkpoint, run every variant (or those in ``only``) ``repeats`` times
    (round robin), clean up."""
    size = QUICK if quick else FULL
    layers, dim = size["layers"], size["dim"]
    folder = Path(tempfile.mkdtemp(prefix="remap-bench-", dir=tmpdir))
    try:
        progress(f"  writing a {layers} x Linear({dim}, {dim}) checkpoint (.safetensors and .pth) to {folder}")
        proc = _spawn(["--make", str(folder), "--layers", str(layers), "--dim", str(dim)])
        if proc.returncode:
            raise RuntimeError(f"writing the checkpoint failed:\n{proc.stderr[-2000:]}")
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS if not only or v in only}
        for rep in range(repeats):
            for v in runs:
                r = run_variant(v, folder, layers, dim, threads)
                runs[v].append(r)
                t = f"{r['seconds']:.3f}s" if "seconds" in r else "-"
                peak = f"+{r['peak']['rss'] / 2**30:.2f} GiB" if "peak" in r else ""
                progress(f"  loading [{rep + 1}/{repeats}] {v:22} {t:>8} {peak:>12}  others {r['other_cores']:.2f} cores  "
                         f"{run_status(r)[:100]}")  # fmt: skip
        summary = summarise(runs)
        return {"layers": layers, "dim": dim, "repeats": repeats, "threads": threads, "runs": runs, **summary}
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=[v for v, spec in VARIANTS.items()])
    ap.add_argument("--make", type=Path, help="write the checkpoint into this folder")
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--layers", type=int, default=QUICK["layers"])
    ap.add_argument("--dim", type=int, default=QUICK["dim"])
    ap.add_argument("--profile", action="store_true", help="cProfile the load; top 30 to stderr")
    a = ap.parse_args(argv)
    if a.make:
        make_checkpoint(a.make, a.layers, a.dim)
        return 0
    if a.child:
        result = child(a.child, a.dir, a.layers, a.dim, profile=a.profile)
        print(MARK + json.dumps(result), flush=True)
        return 0
    ap.error("give --make or --child (the whole benchmark is benchmarks/run.py)")
    return 2


if __name__ == "__main__":
    sys.exit(main())
