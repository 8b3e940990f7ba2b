"""First touch: what filling a meta-device target's fresh memory from the file costs, route by route.

A meta-device target owns no memory until the load allocates it, so every byte of the
weights lands in pages that were never touched: each 4 KiB page is faulted in (and
zeroed by the kernel) by the copy that first writes it. This benchmark measures, side
by side, the ways to get a checkpoint's bytes into fresh tensors, on a Llama-style
safetensors file of a few hundred tensors (default 24 layers x hidden 1024, 218
tensors, 1.34 GB fp32; ``--quick``: 4 x 256, 8 MB), each variant in a fresh process
with the file in the page cache:

* ``readinto``: ``torch.empty`` per tensor, then ``preadv`` from the file into it (the
  kernel's copy faults the pages in);
* ``readinto_threads``: the same with tensors of 4 MiB and more cut into 32 MiB pieces
  read by ``torch.get_num_threads()`` threads (what remap does today);
* ``mmap_copy``: ``torch.empty`` + ``copy_`` from a view of a read-only mapping of the
  file (faults on both sides);
* ``zeros_readinto`` / ``fill_readinto`` / ``populate_readinto``: the destination faulted
  in first (``torch.zeros``; ``empty`` + ``fill_(0)``; ``madvise(MADV_POPULATE_WRITE)``),
  then read into;
* ``hugepage_readinto`` (and ``_threads``): ``madvise(MADV_HUGEPAGE)`` on every tensor of
  4 MiB and more before it is read into (what NumPy does for every array of 4 MiB and
  more); ``torch_thp_env``: torch's own ``THP_MEM_ALLOC_ENABLE=1`` (2 MiB-aligned
  allocations, madvised); ``anon_mmap_hugepage``: an anonymous mapping per large tensor,
  madvised, wrapped with ``torch.frombuffer``;
* ``one_alloc_readinto`` / ``one_alloc_hugepage``: one allocation for all tensors (views
  of it) instead of one each;
* ``fadvise_readinto``: ``posix_fadvise(SEQUENTIAL)`` + ``readahead`` on the source first;
* ``remap_meta``: ``remap.load`` into the model built on ``meta`` (the real path, which
  pre-faults each piece of a fresh tensor with ``MADV_POPULATE_WRITE``), and
  ``remap_meta_no_populate``: the same with that switched off (``POPULATE_MIN_BYTES``
  set out of reach), as it was before;
* ``page_cache_copy``: one ``readinto`` of the whole file into a preallocated, touched
  buffer: the limit (no page faults at all).

Each run reports wall time, minor/major page faults (``getrusage``), the process's
``AnonHugePages`` afterwards and its peak RSS / anonymous / file-backed memory above the
start; every run checks its tensors against ``safe_open``.

    python benchmarks/first_touch.py --make DIR [--quick]
    python benchmarks/first_touch.py --child readinto --dir DIR [--quick]
    python benchmarks/run.py --only first_touch [--quick] [--repeats N]   # the whole benchmark
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import mmap
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import ForeignCpu, RssSampler, Timer, run_status, gib, table, warm_file  # noqa: E402

FULL = {"layers": 24, "hidden": 1024, "inter": 2816, "vocab": 32000}
QUICK = {"layers": 4, "hidden": 256, "inter": 704, "vocab": 4000}
ST = "model.safetensors"
MARK = "RESULT: "
HUGE = 2 << 20  # the PMD size: a transparent huge page
LARGE = 4 << 20  # tensors from this size on are madvised (NumPy's threshold)
PIECE = 32 << 20  # remap's PIECE_BYTES
MADV_HUGEPAGE = 14
MADV_POPULATE_WRITE = 23  # Linux 5.14

VARIANTS: dict[str, str] = {
    "readinto": "torch.empty + preadv (kernel copy faults the pages)",
    "readinto_threads": "torch.empty + preadv, large tensors in 32 MiB pieces on torch's threads",
    "mmap_copy": "torch.empty + copy_ from a read-only mmap view",
    "zeros_readinto": "torch.zeros (pre-faulted) + preadv",
    "fill_readinto": "torch.empty + fill_(0) (pre-faulted) + preadv",
    "populate_readinto": "torch.empty + madvise(MADV_POPULATE_WRITE) + preadv",
    "populate_readinto_threads": "torch.empty + madvise(MADV_POPULATE_WRITE) + preadv on threads",
    "populate_piece_threads": "torch.empty, then on the threads per 32 MiB piece: MADV_POPULATE_WRITE + preadv",
    "hugepage_readinto": "torch.empty + madvise(MADV_HUGEPAGE) (>= 4 MiB) + preadv",
    "hugepage_readinto_threads": "torch.empty + madvise(MADV_HUGEPAGE) + preadv on threads",
    "torch_thp_env": "THP_MEM_ALLOC_ENABLE=1 (torch's 2 MiB-aligned + madvised) + preadv",
    "anon_mmap_hugepage": "anonymous mmap + MADV_HUGEPAGE + torch.frombuffer (>= 4 MiB) + preadv",
    "one_alloc_readinto": "one torch.empty for all tensors (views) + preadv",
    "one_alloc_hugepage": "one torch.empty + MADV_HUGEPAGE for all tensors + preadv",
    "fadvise_readinto": "posix_fadvise(SEQUENTIAL) + readahead on the file, then torch.empty + preadv",
    "remap_meta": "remap.load into the model built on meta (pieces pre-faulted by MADV_POPULATE_WRITE)",
    "remap_meta_no_populate": "remap.load into the model built on meta, pre-faulting switched off (before issue 16)",
    "page_cache_copy": "one readinto of the file into a preallocated, touched buffer (the limit)",
}
REFERENCE = "readinto"


# --------------------------------------------------------------------------- the checkpoint


def shapes(cfg: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """A Llama-style state dict's keys and shapes (fp32), in file order.

    >>> len(shapes(QUICK))
    38
    """
    h, m = cfg["hidden"], cfg["inter"]
    out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (cfg["vocab"], h)}
    for i in range(cfg["layers"]):
        p = f"layers.{i}."
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            out[f"{p}self_attn.{name}.weight"] = (h, h)
        out[f"{p}mlp.gate_proj.weight"] = (m, h)
        out[f"{p}mlp.up_proj.weight"] = (m, h)
        out[f"{p}mlp.down_proj.weight"] = (h, m)
        out[f"{p}input_layernorm.weight"] = (h,)
        out[f"{p}post_attention_layernorm.weight"] = (h,)
    out["norm.weight"] = (h,)
    return out


def make_checkpoint(folder: Path, cfg: dict[str, int]) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    save_file({k: torch.rand(s, generator=g) for k, s in shapes(cfg).items()}, str(folder / ST))


def build_meta_model(cfg: dict[str, int]) -> Any:
    """The matching module, on ``meta`` (for ``remap_meta``)."""
    import torch
    from torch import nn

    h, m = cfg["hidden"], cfg["inter"]

    class Attn(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(h, h, bias=False) for _ in range(4))

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj, self.up_proj = nn.Linear(h, m, bias=False), nn.Linear(h, m, bias=False)
            self.down_proj = nn.Linear(m, h, bias=False)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn, self.mlp = Attn(), Mlp()
            self.input_layernorm, self.post_attention_layernorm = nn.RMSNorm(h), nn.RMSNorm(h)

    class Llama(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(cfg["vocab"], h)
            self.layers = nn.ModuleList(Layer() for _ in range(cfg["layers"]))
            self.norm = nn.RMSNorm(h)

    with torch.device("meta"):
        return Llama()


def entries(path: Path) -> list[tuple[str, str, tuple[int, ...], int, int]]:
    """``(key, dtype, shape, file offset, nbytes)`` per tensor of a safetensors file, in file order."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    out = [(k, names[v["dtype"]], tuple(v["shape"]), 8 + n + v["data_offsets"][0], v["data_offsets"][1] - v["data_offsets"][0])
           for k, v in header.items()]  # fmt: skip
    return sorted(out, key=lambda e: e[3])


# --------------------------------------------------------------------------- the routes (child side)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def madvise(tensor: Any, advice: int) -> None:
    """``madvise`` over the pages a tensor's bytes lie on (start rounded down, end up)."""
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    lo, hi = start & ~(mmap.PAGESIZE - 1), (end + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
    if _libc.madvise(lo, hi - lo, advice):
        raise OSError(ctypes.get_errno(), f"madvise({advice}) failed: {os.strerror(ctypes.get_errno())}")


def _bytes(tensor: Any) -> memoryview:
    n = tensor.numel() * tensor.element_size()
    return memoryview((ctypes.c_char * n).from_address(tensor.data_ptr())).cast("B")


def _pread(fd: int, offset: int, buf: memoryview) -> None:
    done = 0
    while done < len(buf):
        n = os.preadv(fd, [buf[done:]], offset + done)
        if not n:
            raise OSError(f"short read at {offset + done}")
        done += n


def _populate_pread(fd: int, offset: int, buf: memoryview) -> None:
    """Fault ``buf``'s pages in with one ``madvise(MADV_POPULATE_WRITE)``, then read into it."""
    start = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    lo, hi = start & ~(mmap.PAGESIZE - 1), (start + len(buf) + mmap.PAGESIZE - 1) & ~(mmap.PAGESIZE - 1)
    if _libc.madvise(lo, hi - lo, MADV_POPULATE_WRITE):
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    _pread(fd, offset, buf)


def fill(variant: str, path: Path, cfg: dict[str, int]) -> dict[str, Any]:
    """Load the file into fresh tensors by ``variant``'s route; key -> tensor (kept alive)."""
    import torch

    ents = entries(path)
    out: dict[str, Any] = {}
    threads = torch.get_num_threads() if variant.endswith("_threads") else 1
    pool = ThreadPoolExecutor(threads) if threads > 1 else None
    futures = []
    fd = os.open(path, os.O_RDONLY)
    try:
        if variant == "fadvise_readinto":
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        whole = None
        if variant.startswith("one_alloc"):
            size = sum((n + 63) & ~63 for *_, n in ents)
            whole = torch.empty(size, dtype=torch.uint8)
            if variant == "one_alloc_hugepage":
                madvise(whole, MADV_HUGEPAGE)
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_READ) if variant == "mmap_copy" else None
        at = 0
        for key, dtype_name, shape, offset, nbytes in ents:
            dtype = getattr(torch, dtype_name)
            if whole is not None:
                dest = whole[at : at + nbytes].view(dtype).view(shape)
                at += (nbytes + 63) & ~63
            elif variant == "zeros_readinto":
                dest = torch.zeros(shape, dtype=dtype)
            elif variant == "anon_mmap_hugepage" and nbytes >= LARGE:
                region = mmap.mmap(-1, (nbytes + HUGE - 1) // HUGE * HUGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
                region.madvise(mmap.MADV_HUGEPAGE)
                dest = torch.frombuffer(region, dtype=torch.uint8, count=nbytes).view(dtype).view(shape)
            else:
                dest = torch.empty(shape, dtype=dtype)
            if variant == "fill_readinto":
                dest.fill_(0)
            elif (variant.startswith("populate_readinto") or (variant == "populate_piece_threads" and nbytes < LARGE)) and nbytes:
                madvise(dest, MADV_POPULATE_WRITE)
            elif variant.startswith("hugepage_readinto") and nbytes >= LARGE:
                madvise(dest, MADV_HUGEPAGE)
            if mm is not None:
                with warnings.catch_warnings():
                    warnings.filterwarnings("ignore", message="The given buffer is not writable")
                    src = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=offset)
                dest.copy_(src.view(dtype).view(shape))
            elif pool is not None and nbytes >= LARGE:
                buf = _bytes(dest)
                job = _populate_pread if variant == "populate_piece_threads" else _pread
                futures += [pool.submit(job, fd, offset + lo, buf[lo : lo + PIECE]) for lo in range(0, nbytes, PIECE)]
            else:
                _pread(fd, offset, _bytes(dest))
            out[key] = dest
        for f in futures:
            f.result()
        del mm
    finally:
        if pool is not None:
            pool.shutdown()
        os.close(fd)
    return out


def anon_huge_bytes() -> int:
    """``AnonHugePages`` of this process (``/proc/self/smaps_rollup``), in bytes."""
    try:
        for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
            if line.startswith("AnonHugePages:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return -1


def thp_events() -> dict[str, int]:
    """The machine's transparent-huge-page and compaction counters (``/proc/vmstat``):
    huge pages given at a fault, faults that fell back to 4 KiB pages, direct compactions."""
    wanted = ("thp_fault_alloc", "thp_fault_fallback", "compact_stall")
    try:
        pairs = (line.split() for line in Path("/proc/vmstat").read_text().splitlines())
        return {k: int(v) for k, v in pairs if k in wanted}
    except OSError:
        return {}


def check(tensors: dict[str, Any], path: Path) -> list[str]:
    import torch
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        keys = list(f.keys())
        missing = [k for k in keys if k not in tensors]
        differ = [k for k in keys if k in tensors and not torch.equal(tensors[k], f.get_tensor(k))]
    problems = []
    if missing:
        problems.append(f"{len(missing)} tensors missing (e.g. {missing[0]})")
    if differ:
        problems.append(f"{len(differ)} tensors differ from the file (e.g. {differ[0]})")
    return problems


def child(variant: str, folder: Path, cfg: dict[str, int]) -> dict[str, Any]:
    """One measured fill in this (fresh) process."""
    import safetensors.torch  # noqa: F401
    import torch

    path = folder / ST
    size = path.stat().st_size
    out: dict[str, Any] = {"variant": variant, "file_bytes": size, "torch_threads": torch.get_num_threads()}
    model = None
    holder = None
    if variant.startswith("remap_meta"):
        import importlib
        import pkgutil

        import remap

        for m in pkgutil.walk_packages(remap.__path__, "remap."):
            if m.name != "remap.__main__":
                importlib.import_module(m.name)
        remap.parse_rules({"version": 1})
        model = build_meta_model(cfg)
        if variant == "remap_meta_no_populate":
            from remap.loading import streaming

            streaming.POPULATE_MIN_BYTES = 1 << 62
    elif variant == "page_cache_copy":
        holder = torch.empty(size, dtype=torch.uint8)
        holder.fill_(1)
    out["warm_seconds"] = warm_file(path)
    gc.collect()
    result: dict[str, Any] = {}
    try:
        r0, v0 = resource.getrusage(resource.RUSAGE_SELF), thp_events()
        with RssSampler() as rss, Timer() as timer:
            if variant.startswith("remap_meta"):
                import remap

                report = remap.load(model, path)
                out["remap_ok"] = report.ok
            elif variant == "page_cache_copy":
                with open(path, "rb", buffering=0) as f:
                    view, done = _bytes(holder), 0
                    while done < size:
                        n = f.readinto(view[done:])
                        if not n:
                            raise OSError("short read")
                        done += n
            else:
                result = fill(variant, path, cfg)
        r1, v1 = resource.getrusage(resource.RUSAGE_SELF), thp_events()
        out["vmstat"] = {k: v1[k] - v0.get(k, 0) for k in v1}
        out.update(seconds=timer.seconds, peak=rss.peak_above_base(), minflt=r1.ru_minflt - r0.ru_minflt,
                   majflt=r1.ru_majflt - r0.ru_majflt, anon_huge=anon_huge_bytes())  # fmt: skip
    except Exception as exc:
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        out["traceback"] = traceback.format_exc()[-2000:]
        return out
    if variant.startswith("remap_meta"):
        result = dict(model.state_dict())
        out["problems"] = check(result, path)
    elif variant == "page_cache_copy":
        with open(path, "rb") as f:
            head = f.read(1 << 20)
        out["problems"] = [] if bytes(_bytes(holder)[: len(head)]) == head else ["copied bytes differ from the file"]
    else:
        out["problems"] = check(result, path)
    return out


# --------------------------------------------------------------------------- parent side


def _spawn(args: list[str], env: dict[str, str] | None = None, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=timeout)  # fmt: skip


def run_variant(variant: str, folder: Path, quick: bool) -> dict[str, Any]:
    """One variant in a fresh subprocess; its result or an error record."""
    env = {"THP_MEM_ALLOC_ENABLE": "1"} if variant == "torch_thp_env" else None
    with ForeignCpu() as other:
        try:
            proc = _spawn(["--child", variant, "--dir", str(folder), *(["--quick"] if quick else [])], env)
        except subprocess.TimeoutExpired:
            return {"variant": variant, "error": "timed out", "other_cores": other.cores}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return {**json.loads(line[len(MARK) :]), "other_cores": other.cores}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return {"variant": variant, "error": f"subprocess died: {tail[0][:300]}", "other_cores": other.cores}


def summarise(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Per variant: the median, min and max wall time, the median over rounds of its time
    over the reference's (``readinto``) in the same round, faults and memory (median run).

    >>> r = lambda s: {"seconds": s, "minflt": 1, "majflt": 0, "anon_huge": 0, "peak": {"rss": 1, "anon": 1, "file": 0}}
    >>> s = summarise({"readinto": [r(1.0), r(2.0), r(1.0)], "x": [r(0.5), r(1.0), r(0.6)]})
    >>> s["x"]["vs_reference"], s["x"]["median_s"]
    (0.5, 0.6)
    """
    ref = runs.get(REFERENCE, [])
    out: dict[str, Any] = {}
    for v, rs in runs.items():
        timed = [r for r in rs if "seconds" in r]
        statuses = {run_status(r) for r in rs}
        entry: dict[str, Any] = {"status": "ok" if statuses == {"ok"} else "; ".join(sorted(statuses - {"ok"})),
                                 "all_seconds": [r.get("seconds") for r in rs]}  # fmt: skip
        if timed:
            secs = sorted(r["seconds"] for r in timed)
            mid = sorted(timed, key=lambda r: r["seconds"])[len(timed) // 2]
            ratios = [r["seconds"] / f["seconds"] for r, f in zip(rs, ref) if "seconds" in r and "seconds" in f]
            entry.update(median_s=statistics.median(secs), min_s=secs[0], max_s=secs[-1],
                         vs_reference=statistics.median(ratios) if ratios else None,
                         minflt=mid["minflt"], majflt=mid["majflt"], anon_huge=mid["anon_huge"], peak=mid["peak"],
                         other_cores=max(r.get("other_cores", 0.0) for r in rs))  # fmt: skip
        out[v] = entry
    return out


def run(quick: bool, repeats: int, tmpdir: str | None = None, progress: Callable[[str], None] = print,
        only: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Write the checkpoint, run every variant (or those in ``only``) ``repeats`` times,
    round robin, each in a fresh process; clean up."""
    cfg = QUICK if quick else FULL
    folder = Path(tempfile.mkdtemp(prefix="remap-first-touch-", dir=tmpdir))
    try:
        proc = _spawn(["--make", str(folder), *(["--quick"] if quick else [])])
        if proc.returncode:
            raise RuntimeError(f"writing the checkpoint failed:\n{proc.stderr[-2000:]}")
        size = (folder / ST).stat().st_size
        progress(f"  {len(shapes(cfg))} tensors, {size / 1e9:.2f} GB in {folder}")
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS if not only or v in only}
        if only and REFERENCE not in runs:
            runs = {REFERENCE: [], **runs}
        for rep in range(repeats):
            for v in runs:
                r = run_variant(v, folder, quick)
                runs[v].append(r)
                t = f"{r['seconds']:.3f}s" if "seconds" in r else "-"
                vm = r.get("vmstat", {})
                progress(f"  first touch [{rep + 1}/{repeats}] {v:26} {t:>8}  minflt {r.get('minflt', '-'):>8}  "
                         f"thp {vm.get('thp_fault_alloc', '-')}/{vm.get('thp_fault_fallback', '-')} fell back, "
                         f"{vm.get('compact_stall', '-')} stalls  others {r['other_cores']:.2f} cores  {run_status(r)[:100]}")  # fmt: skip
        return {"config": cfg, "tensors": len(shapes(cfg)), "file_bytes": size, "repeats": repeats,
                "runs": runs, "variants": summarise(runs)}  # fmt: skip
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def first_touch_table(result: dict[str, Any]) -> None:
    rows = []
    for v, b in result["variants"].items():
        if "median_s" not in b:
            rows.append([v, b["status"][:60], *["-"] * 8])
            continue
        p = b["peak"]
        rows.append([
            v, b["status"][:60], f"{b['median_s']:.3f}", f"{b['min_s']:.3f}–{b['max_s']:.3f}",
            f"{b['vs_reference']:.2f}x" if b["vs_reference"] is not None else "-",
            f"{b['minflt']:,}", str(b["majflt"]), f"{b['anon_huge'] / 2**20:.0f}",
            f"+{gib(p['rss'])} ({gib(p['anon'])} / {gib(p['file'])})", f"{b['other_cores']:.2f}",
        ])  # fmt: skip
    table(
        f"First touch: {result['tensors']} tensors, {result['file_bytes'] / 1e9:.2f} GB fp32 into fresh memory "
        f"(median of {result['repeats']}, each run a fresh process, variants interleaved)",
        ["variant", "check", "median s", "min–max s", "x readinto, per round", "minor faults", "major", "AnonHuge MiB",
         "peak RSS GiB (anon / file)", "others"],
        rows,
        ["The file is in the page cache before every timed fill; x readinto: median over rounds of the time over "
         "plain torch.empty + preadv's time in the same round.",
         "minor faults: getrusage during the fill; AnonHuge: the process's transparent huge pages afterwards.",
         "others: the most cores other processes kept busy during one run of the variant (0 on a quiet machine).",
         *(f"{v}: {d}" for v, d in VARIANTS.items() if v in result["variants"])],
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", choices=list(VARIANTS))
    ap.add_argument("--make", type=Path, help="write the checkpoint into this folder")
    ap.add_argument("--dir", type=Path)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--repeats", type=int, default=3, help="with neither --make nor --child: run it all here")
    ap.add_argument("--variants", help="comma-separated (default: all)")
    ap.add_argument("--out", type=Path, help="with neither --make nor --child: write the results as JSON here")
    a = ap.parse_args(argv)
    cfg = QUICK if a.quick else FULL
    if a.make:
        make_checkpoint(a.make, cfg)
        return 0
    if a.child:
        print(MARK + json.dumps(child(a.child, a.dir, cfg)), flush=True)
        return 0
    result = run(a.quick, a.repeats, only=a.variants.split(",") if a.variants else None,
                 progress=lambda s: print(s, flush=True))  # fmt: skip
    first_touch_table(result)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
