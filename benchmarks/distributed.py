"""A ~2 GB checkpoint into a 2-rank FSDP2 model: remap against torch's two distributed paths.

The model is Llama-shaped (``model.embed_tokens``, ``model.layers.N.self_attn.{q,k,v,o}_proj``,
``.mlp.{gate,up,down}_proj``, two RMSNorms per layer, ``model.norm``, ``lm_head``; hidden 2048,
4 KV heads of 128, MLP 5632, vocabulary 32000, 8 layers: 492M parameters, 1.97 GB fp32; its
largest tensor, the embedding, 262 MB). ``--quick``: hidden 384, 6 layers, 50 MB. It is built on
``meta``, ``fully_shard`` per layer and at the root on a 1-D CPU mesh, then ``to_empty`` and
zeroed (its shard resident) before the clock starts. The checkpoint is one ``module.``-free
``model.safetensors`` (HF names), written once before the runs, in a folder of its own.

Variants (each run is a fresh group of gloo ranks on CPU, ``torch.multiprocessing``, file store,
one torch thread per rank; the file is read once beforehand so every run reads the page cache):

* ``torch_broadcast``: rank 0 ``safetensors.torch.load_file`` (mmap), the others ``{}``, then
  ``set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True,
  broadcast_from_rank0=True))``;
* ``torch_dcp_hf``: ``dcp.load(model.state_dict(), storage_reader=HuggingFaceStorageReader(folder))``
  (each rank's slices of each tensor through safetensors' mmap ``get_slice``);
* ``remap``: ``remap.load(model, path)`` (no rules: the names already match); it keeps a copy of
  the rank's shard to put back if the load fails (``rollback``, on by default), so its peak above
  the shard includes that copy; ``remap_no_rollback``: the same with ``rollback=False``.

Per rank: ``seconds``, the load alone (ranks leave a barrier together, then each times its own
load); bytes it read from the checkpoint, from the kernel's counters for this process:
``rchar`` (``/proc/self/io``: bytes passed to ``read``/``pread``, page cache hits included; gloo
receives with ``recv``, which it does not count; the sampler thread's own ``/proc`` reads are
subtracted) plus ``mapped`` (the peak rise of ``RssFile``: file pages mapped into the process,
which is how an mmap reader reads; it also counts code pages first touched during the load, a
noise floor of a few MB that the ``rchar``-only reader shows), and ``asked``, what the reader
itself says it requested (load_file: every tensor; DCP: the bytes of its read items; remap: its
report's per-rank ``bytes_read``); peak memory above the rank's shard (VmHWM and ``RssAnon`` /
``RssFile`` sampled every 2 ms, over the RSS with the shard resident). The group's wall time is
the slowest rank's. Each rank then checks its result: every tensor, gathered one at a time
(``full_tensor``), equal to the checkpoint's.

Targets (issue 19): bytes read per rank <= 1.1 x checkpoint / N; peak above the shard <= the
largest tensor; wall time <= the faster torch path's.

    python benchmarks/distributed.py [--quick] [--repeats N] [--variants a,b] [--out results.json]
    python benchmarks/run.py --only distributed [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import finish, ForeignCpu, RssSampler, Timer, gib, table, warm_file  # noqa: E402

SIZES = {
    "full": {"dim": 2048, "kv": 512, "mlp": 5632, "vocab": 32000, "layers": 8},  # 492M parameters, 1.97 GB
    "quick": {"dim": 384, "kv": 96, "mlp": 1024, "vocab": 4000, "layers": 6},  # 12.4M parameters, 50 MB
}
VARIANTS: dict[str, str] = {
    "torch_broadcast": "rank 0 load_file + set_model_state_dict(full_state_dict, broadcast_from_rank0)",
    "torch_dcp_hf": "dcp.load(model.state_dict(), HuggingFaceStorageReader(folder))",
    "remap": "remap.load(model, model.safetensors)",
    "remap_no_rollback": "remap.load(model, model.safetensors, rollback=False)",
}
TORCH = ("torch_broadcast", "torch_dcp_hf")
ST = "model.safetensors"
WORLD = 2
TIMEOUT_S = {"quick": 180, "full": 900}


# --------------------------------------------------------------------------- the model and the file


def build_llama(size: str) -> Any:
    """The Llama-shaped model of ``size`` on the meta device (HF parameter names).

    >>> sum(p.numel() for p in build_llama("quick").parameters())
    12366720
    """
    import torch
    from torch import nn

    s = SIZES[size]

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(s["dim"], s["dim"], bias=False)
            self.k_proj = nn.Linear(s["dim"], s["kv"], bias=False)
            self.v_proj = nn.Linear(s["dim"], s["kv"], bias=False)
            self.o_proj = nn.Linear(s["dim"], s["dim"], bias=False)

    class Mlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = nn.Linear(s["dim"], s["mlp"], bias=False)
            self.up_proj = nn.Linear(s["dim"], s["mlp"], bias=False)
            self.down_proj = nn.Linear(s["mlp"], s["dim"], bias=False)

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.self_attn = Attention()
            self.mlp = Mlp()
            self.input_layernorm = nn.RMSNorm(s["dim"])
            self.post_attention_layernorm = nn.RMSNorm(s["dim"])

    class Inner(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(s["vocab"], s["dim"])
            self.layers = nn.ModuleList(Layer() for _ in range(s["layers"]))
            self.norm = nn.RMSNorm(s["dim"])

    class Llama(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = Inner()
            self.lm_head = nn.Linear(s["dim"], s["vocab"], bias=False)

    with torch.device("meta"):
        return Llama()


def make_checkpoint(size: str, folder: Path) -> dict[str, Any]:
    """Write ``folder/model.safetensors`` (seeded values for every parameter); its description."""
    import torch
    from safetensors.torch import save_file

    model = build_llama(size)
    gen = torch.Generator().manual_seed(0)
    sd = {k: torch.randn(p.shape, generator=gen) * 0.02 for k, p in model.named_parameters()}
    folder.mkdir(parents=True, exist_ok=True)
    save_file(sd, folder / ST, metadata={"format": "pt"})
    sizes = [t.nbytes for t in sd.values()]
    return {"size": size, "bytes": (folder / ST).stat().st_size, "tensor_bytes": sum(sizes), "tensors": len(sd),
            "largest_tensor": max(sizes), "params": sum(t.numel() for t in sd.values())}  # fmt: skip


def shard_model(size: str, world: int) -> Any:
    """The model built on meta, ``fully_shard`` per layer and at the root, ``to_empty`` on CPU and
    zeroed, so its shard is resident before the baseline is taken."""
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = build_llama(size)
    mesh = init_device_mesh("cpu", (world,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().zero_()
    return model


# --------------------------------------------------------------------------- measuring (in a rank)


def read_io(path: str = "/proc/self/io") -> dict[str, int]:
    """The counters of ``/proc/self/io`` (or a thread's), in bytes."""
    out = {}
    with open(path, "rb") as f:
        for line in f:
            k, _, v = line.partition(b":")
            out[k.decode()] = int(v)
    return out


class IoRssSampler(RssSampler):
    """:class:`RssSampler` that also knows the bytes its own thread read (``own_rchar``: its
    ``/proc`` reads, to subtract from the process's ``rchar``)."""

    own_rchar = 0

    def _run(self) -> None:
        start = read_io("/proc/thread-self/io")["rchar"]
        super()._run()
        self._sample()  # __exit__'s last sample, taken here so it is counted too
        self.own_rchar = read_io("/proc/thread-self/io")["rchar"] - start

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def load_fn(variant: str, model: Any, folder: Path, rank: int) -> Callable[[], dict[str, Any]]:
    """The load of ``variant`` (imports done here, before the clock); it returns what the reader
    says it asked for."""
    path = folder / ST
    if variant == "torch_broadcast":
        from safetensors.torch import load_file
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        def broadcast() -> dict[str, Any]:
            sd = load_file(path) if rank == 0 else {}
            asked = sum(t.nbytes for t in sd.values())
            set_model_state_dict(model, sd, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
            del sd
            return {"asked": asked}

        return broadcast
    if variant == "torch_dcp_hf":
        import math

        import torch.distributed.checkpoint as dcp

        class Counting(dcp.HuggingFaceStorageReader):
            asked = 0

            def read_data(self, plan: Any, planner: Any) -> Any:
                for item in plan.items:
                    info = self.storage_data[item.storage_index]
                    self.asked += math.prod(item.lengths) * info.dtype.itemsize
                return super().read_data(plan, planner)

        def dcp_load() -> dict[str, Any]:
            reader = Counting(str(folder))
            dcp.load(model.state_dict(), storage_reader=reader)
            return {"asked": reader.asked}

        return dcp_load
    import remap
    import remap.api  # noqa: F401  (remap's lazy modules load before the clock)
    import remap.loading.engine  # noqa: F401
    from remap.sources.readers import open_source  # noqa: F401

    try:
        import remap.loading.sharded  # noqa: F401
    except ImportError:
        pass

    def remap_load() -> dict[str, Any]:
        report = remap.load(model, path, rollback=variant != "remap_no_rollback")
        ranks = report.stats.get("ranks") if isinstance(getattr(report, "stats", None), dict) else None
        mine = ranks[rank] if isinstance(ranks, list) and len(ranks) > rank else None
        return {"asked": mine.get("bytes_read") if isinstance(mine, dict) else None, "remap_ok": report.ok,
                "remap_ranks": ranks}  # fmt: skip

    return remap_load


def check(model: Any, folder: Path) -> list[str]:
    """Problems with the loaded model: a tensor (gathered with ``full_tensor``, one at a time, on
    every rank) differing from the checkpoint's, or a key missing on either side."""
    import torch
    from safetensors import safe_open

    problems = []
    state = model.state_dict()
    with safe_open(str(folder / ST), "pt") as f:
        keys = set(f.keys())
        problems += [f"not in the checkpoint: {k}" for k in state if k not in keys]
        problems += [f"not in the model: {k}" for k in sorted(keys - set(state))]
        for k in sorted(set(state) & keys):  # same order on every rank: full_tensor is a collective
            t = state[k]
            got = t.full_tensor() if hasattr(t, "full_tensor") else t
            if not torch.equal(got, f.get_tensor(k)):
                problems.append(f"differs: {k}")
            del got
    return problems


def rank_run(rank: int, world: int, variant: str, size: str, folder: Path) -> dict[str, Any]:
    """One rank of one run: build, shard, load under the clock and the samplers, check."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    model = shard_model(size, world)
    shard = sum(p.to_local().nbytes for p in model.parameters())
    fn = load_fn(variant, model, folder, rank)
    gc.collect()
    dist.barrier()
    io0 = read_io()
    extra: dict[str, Any] = {}
    error = None
    with IoRssSampler() as rss, Timer() as t:
        try:
            extra = fn()
        except Exception as exc:  # noqa: BLE001 - recorded as the variant's status
            error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            extra = {"traceback": traceback.format_exc()[-3000:]}
    io1 = read_io()
    peak = rss.peak_above_base()
    out: dict[str, Any] = {
        "rank": rank, "seconds": t.seconds, "shard_bytes": shard,
        "rchar": io1["rchar"] - io0["rchar"] - rss.own_rchar, "disk_read_bytes": io1["read_bytes"] - io0["read_bytes"],
        # The file pages at the RSS high-water mark (VmHWM, kept by the kernel) are at least its rise less
        # the anon peak: a short-lived mapping the 2 ms sampler misses on a busy machine still counts.
        "mapped": max(0, peak["file"], peak["rss"] - peak["anon"]), "peak": peak, "samples": rss.samples, **extra,
    }  # fmt: skip
    out["bytes_read"] = out["rchar"] + out["mapped"]
    oks: list[Any] = [None] * world
    dist.all_gather_object(oks, error is None)
    if error is not None:
        out["status"] = f"failed: {error}"
    elif not all(oks):
        out["status"] = "failed: on another rank"
    else:
        problems = check(model, folder)
        out["status"] = "ok" if not problems and extra.get("remap_ok", True) else "WRONG: " + "; ".join(
            problems[:5] or ["remap report not ok"])
    return out


def _worker(rank: int, world: int, variant: str, size: str, folder: str, store: str) -> None:
    import warnings

    import torch.distributed as dist

    warnings.simplefilter("ignore")
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        result = rank_run(rank, world, variant, size, Path(folder))
    except BaseException as exc:  # noqa: BLE001 - reported to the parent
        result = {"rank": rank, "status": f"failed: {type(exc).__name__}: {str(exc)[:300]}",
                  "traceback": traceback.format_exc()[-3000:]}  # fmt: skip
    Path(folder, f"rank{rank}.json").write_text(json.dumps(result))
    try:
        dist.barrier()
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


# --------------------------------------------------------------------------- the parent


def launch(variant: str, size: str, folder: Path, world: int, timeout: float) -> list[dict[str, Any]]:
    """One run of ``variant``: a fresh process that spawns ``world`` ranks; each rank's result."""
    for old in folder.glob("rank*.json"):
        old.unlink()
    store = folder.parent / f"store.{variant}.{time.monotonic_ns()}"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, __file__, "--ranks", variant, "--size", size, "--dir", str(folder), "--store", str(store),
           "--world", str(world)]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
        why = None
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        why = f"failed: timed out after {timeout:.0f} s"
    store.unlink(missing_ok=True)
    results = []
    for rank in range(world):
        p = folder / f"rank{rank}.json"
        r = json.loads(p.read_text()) if p.exists() else {"rank": rank, "status": why or "failed: no result"}
        if why and r["status"] == "ok":
            r["status"] = why
        if r["status"] != "ok" and "output" not in r:
            r["output"] = output[-2000:]
        results.append(r)
    return results


def group(ranks: list[dict[str, Any]]) -> dict[str, Any]:
    """One run's figures over its ranks: the slowest rank's time, the largest bytes and peaks."""
    status = next((r["status"] for r in ranks if r["status"] != "ok"), "ok")
    out: dict[str, Any] = {"status": status}
    if all("seconds" in r for r in ranks):
        out.update({
            "seconds": max(r["seconds"] for r in ranks),
            "bytes_read": max(r["bytes_read"] for r in ranks),
            "peak_above_shard": max(r["peak"]["rss"] for r in ranks),
        })  # fmt: skip
    return out


def summarise(runs: list[list[dict[str, Any]]], ckpt: dict[str, Any], world: int) -> dict[str, Any]:
    """A variant over its repeats: median wall, the largest bytes and peaks; per rank, the median
    run's figures; the targets' verdicts (all but the wall, which :func:`ratios` adds)."""
    groups = [group(r) for r in runs]
    status = next((g["status"] for g in groups if g["status"] != "ok"), "ok")
    out: dict[str, Any] = {"status": status, "runs": len(runs)}
    good = [(g, r) for g, r in zip(groups, runs) if "seconds" in g]
    if not good:
        out["ranks"] = runs[-1]
        return out
    good.sort(key=lambda gr: gr[0]["seconds"])
    median_run = good[len(good) // 2][1]
    out["seconds"] = statistics.median(g["seconds"] for g, _ in good)
    out["bytes_read"] = max(g["bytes_read"] for g, _ in good)
    out["peak_above_shard"] = max(g["peak_above_shard"] for g, _ in good)
    out["ranks"] = median_run
    share = ckpt["bytes"] / world
    out["bytes_read_over_share"] = out["bytes_read"] / share
    out["peak_over_largest_tensor"] = out["peak_above_shard"] / ckpt["largest_tensor"]
    out["targets"] = {"bytes_read": out["bytes_read"] <= 1.1 * share,
                      "peak_above_shard": out["peak_above_shard"] <= ckpt["largest_tensor"]}  # fmt: skip
    return out


def ratios(variants: dict[str, dict[str, Any]]) -> str | None:
    """Each variant's wall over the faster working torch path's (in place); that path's name."""
    ok = [v for v in TORCH if variants.get(v, {}).get("status") == "ok"]
    if not ok:
        return None
    best = min(ok, key=lambda v: variants[v]["seconds"])
    for b in variants.values():
        if "seconds" in b:
            b["vs_fastest_torch"] = b["seconds"] / variants[best]["seconds"]
            b.setdefault("targets", {})["wall"] = b["seconds"] <= variants[best]["seconds"]
    return best


def run(quick: bool, repeats: int, tmpdir: str | None, progress: Callable[[str], None] = print,
        only: list[str] | None = None, world: int = WORLD) -> dict[str, Any]:  # fmt: skip
    """Write the checkpoint once, then every variant ``repeats`` times, interleaved, each a fresh
    group of ``world`` ranks; the results (the files are removed at the end)."""
    size = "quick" if quick else "full"
    chosen = [v for v in VARIANTS if only is None or v in only]
    runs: dict[str, list[list[dict[str, Any]]]] = {v: [] for v in chosen}
    others: dict[str, list[float]] = {v: [] for v in chosen}
    with tempfile.TemporaryDirectory(dir=tmpdir) as d:
        folder = Path(d) / "ckpt"
        made = subprocess.run([sys.executable, __file__, "--make", str(folder), "--size", size], capture_output=True,
                              text=True, timeout=TIMEOUT_S[size])  # fmt: skip
        if made.returncode != 0:
            return {"status": f"could not write the checkpoint: {made.stderr.strip()[-300:]}", "variants": {}}
        ckpt = json.loads(made.stdout.strip().splitlines()[-1])
        progress(f"checkpoint: {ckpt['params'] / 1e6:.0f}M parameters, {ckpt['tensors']} tensors, {gib(ckpt['bytes'])} GiB, "
                 f"largest tensor {ckpt['largest_tensor'] / 2**20:.0f} MiB; {world} ranks")  # fmt: skip
        for rep in range(repeats):
            for v in chosen:
                warm_file(folder / ST)
                with ForeignCpu() as other:
                    ranks = launch(v, size, folder, world, TIMEOUT_S[size])
                runs[v].append(ranks)
                others[v].append(other.cores)
                g = group(ranks)
                progress(f"  {v} #{rep + 1}: {g.get('seconds', float('nan')):.2f} s, read "
                         + ", ".join(f"{r.get('bytes_read', 0) / 2**20:.0f}" for r in ranks) + " MiB per rank, "
                         f"{g['status'][:200]}")  # fmt: skip
    variants = {v: summarise(runs[v], ckpt, world) for v in chosen}
    for v in chosen:
        variants[v]["others"] = statistics.median(others[v])
    best = ratios(variants)
    return {"quick": quick, "repeats": repeats, "world": world, "checkpoint": ckpt, "fastest_torch": best,
            "variants": variants}  # fmt: skip


def failures(result: dict[str, Any]) -> list[str]:
    """Rows that did not load, or loaded wrong."""
    bad = [result["status"]] if "status" in result else []
    for v, b in result.get("variants", {}).items():
        if b["status"] != "ok":
            bad.append(f"{v}: {b['status']}")
    return bad


def _met(b: dict[str, Any], key: str) -> str:
    t = b.get("targets", {})
    return "-" if key not in t else ("met" if t[key] else "MISSED")


def distributed_table(result: dict[str, Any]) -> None:
    """The table of one run's results, then per-rank detail."""
    ckpt = result.get("checkpoint", {})
    world = result.get("world", WORLD)
    rows = []
    for v, b in result.get("variants", {}).items():
        if "seconds" not in b:
            rows.append([v, b["status"][:100], *["-"] * 8])
            continue
        rows.append([
            v, b["status"][:60], f"{b['seconds']:.2f}", f"{b.get('vs_fastest_torch', float('nan')):.2f}x", _met(b, "wall"),
            f"{b['bytes_read'] / 2**20:.0f} ({b['bytes_read_over_share']:.2f}x)", _met(b, "bytes_read"),
            f"{b['peak_above_shard'] / 2**20:.0f} ({b['peak_over_largest_tensor']:.2f}x)", _met(b, "peak_above_shard"),
            f"{b.get('others', 0):.2f}",
        ])  # fmt: skip
    share = ckpt.get("bytes", 0) / world
    table(f"FSDP2 load, {world} gloo ranks on CPU: {ckpt.get('params', 0) / 1e6:.0f}M parameters, {gib(ckpt.get('bytes', 0))} GiB "
          f"fp32 safetensors; median of {result.get('repeats')} run(s), each a fresh group of processes"
          + (" [--quick: a smoke test]" if result.get("quick") else ""),
          ["variant", "check", "wall s", "x torch", "wall target", "max read MiB (x share)", "read target",
           "max peak MiB (x largest)", "peak target", "others"], rows,
          [f"wall: the slowest rank's load (ranks start together); x torch: over the faster torch path "
           f"({result.get('fastest_torch')}); target: <= 1.",
           f"read: the most any rank read from the checkpoint (rchar: read/pread bytes, + the peak rise of RssFile: "
           f"mmap'd pages); share = checkpoint / {world} = {share / 2**20:.0f} MiB; target: <= 1.1x.",
           f"peak: the most any rank's RSS rose above its resident shard during the load (VmHWM); largest tensor = "
           f"{ckpt.get('largest_tensor', 0) / 2**20:.0f} MiB; target: <= 1x.",
           "others: cores other processes kept busy during the run (0 on a quiet machine)."])  # fmt: skip
    rows = []
    for v, b in result.get("variants", {}).items():
        for r in b.get("ranks", []):
            if "seconds" not in r:
                continue
            asked = r.get("asked")
            rows.append([v, str(r["rank"]), f"{r['seconds']:.2f}", f"{r['rchar'] / 2**20:.0f}", f"{r['mapped'] / 2**20:.0f}",
                         "-" if asked is None else f"{asked / 2**20:.0f}", f"{r['peak']['rss'] / 2**20:.0f}",
                         f"{r['peak']['anon'] / 2**20:.0f}", f"{r['peak']['file'] / 2**20:.0f}",
                         f"{r['shard_bytes'] / 2**20:.0f}"])  # fmt: skip
    table("Per rank (the median run)", ["variant", "rank", "load s", "rchar MiB", "mapped MiB", "asked MiB", "peak MiB",
          "anon MiB", "file MiB", "shard MiB"], rows,
          ["rchar: bytes passed to read/pread during the load (/proc/self/io; gloo's recv is not counted; the "
           "sampler's own /proc reads subtracted); mapped: peak rise of RssFile (mmap'd checkpoint pages, plus code "
           "pages first touched), at least VmHWM's rise less the anon peak (a mapping too brief for the sampler); asked: what the reader says it requested (load_file: every tensor; DCP: its read "
           "items; remap: report.stats['ranks'][rank]['bytes_read']).",
           "peak: VmHWM above the RSS with the shard resident; anon and file: each its own maximum (sampled every 2 ms)."])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="a 50 MB checkpoint: a smoke test")
    ap.add_argument("--repeats", type=int, help="runs per variant, interleaved (default 3; --quick 1)")
    ap.add_argument("--variants", help="comma-separated, of: " + ", ".join(VARIANTS))
    ap.add_argument("--tmpdir", help="where the checkpoint is written (default: the system's temp dir)")
    ap.add_argument("--out", type=Path, help="write the JSON results here")
    ap.add_argument("--show", type=Path, metavar="JSON", help="print the tables of an earlier run and exit")
    ap.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--ranks", help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--dir", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--world", type=int, default=WORLD, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.make:
        print(json.dumps(make_checkpoint(a.size, a.make)), flush=True)
        return 0
    if a.ranks:
        import torch.multiprocessing as mp

        mp.spawn(_worker, args=(a.world, a.ranks, a.size, a.dir, a.store), nprocs=a.world, join=True)
        return 0
    if a.show:
        distributed_table(json.loads(a.show.read_text()))
        return 0
    only = a.variants.split(",") if a.variants else None
    unknown = set(only or ()) - set(VARIANTS)
    if unknown:
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}")
    t0 = time.perf_counter()
    result = run(a.quick, a.repeats or (1 if a.quick else 3), a.tmpdir, only=only)
    return finish(result, distributed_table, failures, started=t0, out=a.out)


if __name__ == "__main__":
    sys.exit(main())
