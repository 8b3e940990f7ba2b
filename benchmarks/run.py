"""remap benchmarks: one command, every measurement side by side, a table of ratios, JSON.

    python benchmarks/run.py [--quick] [--out results.json] [--only planning|loading|startup|scale|formats|build_load|many_keys|first_touch|distributed] [--repeats N]
    python benchmarks/run.py --show results.json      # the tables of an earlier run

* planning throughput (``planning.py``): remap's planner against the rule-by-rule loop
  (mmengine ``revise_keys``) and the first-match loop (transformers ``key_mapping``) on
  ResNet-, LLM- and MoE-like key sets of 300, 7,000 and 100,000 keys x 1, 10, 50 rules,
  in this process;
* loading (``loading.py``): a ~2 GB fp32 checkpoint into an allocated model and into a
  meta-device model, remap against the raw torch paths and the page-cache copy, each in
  its own fresh subprocess;
* command-line start-up (``startup.py``): ``remap validate``, ``remap inspect`` of a small
  safetensors file and ``remap apply --dry-run`` against ``python -c "import torch"``, each
  a fresh process, in interleaved rounds;
* scale (``scale.py``, only with ``--only scale``): open, plan, report records, inspect and
  target metadata at 10**6 keys (``--quick``: 10**5) against the plain loops they cannot beat;
* formats (``formats.py``, only with ``--only formats``; results in ``results_formats.json``):
  a ~1 GiB file (``--quick``: 64 MiB) of each format remap reads (safetensors, torch zip,
  ONNX, .npz, GGUF F32/F16/Q8_0, Keras .weights.h5, Flax .msgpack, TF checkpoint): bytes a
  plan reads, and remap.load against the format's own loader (time, peak memory above the model).
* build + load (``build_load.py``, only with ``--only build_load``; results in ``results_build_load.json``):
  a BERT-large-sized HF BertModel, a ~1.6 GiB bf16 LlamaForCausalLM and a timm ViT-L (``--quick``: tiny
  ones, the variants of a model sharing one process), each from a plain and a ``module.``-prefixed checkpoint:
  from_pretrained (+ key_mapping), timm's pretrained_cfg_overlay / load_checkpoint, mmengine load_checkpoint
  with revise_keys (skipped when not installed), the hand loops, and remap.load into a model built normally,
  under empty_weights (with and without mmap_weights) and on meta; then 100,000 small keys end to end
  (``many_keys.py``: strip_prefix against the hand rename loop). Each a fresh process, ratios against the
  fastest peer; ``--only many_keys`` runs the last part alone.
* first touch (``first_touch.py``, only with ``--only first_touch``; results in ``results_first_touch.json``):
  filling a meta target's fresh memory from a 1.36 GB file of 218 tensors, route by route (faults, pre-faulting, huge pages).
* distributed (``distributed.py``, only with ``--only distributed``; results in ``results_distributed.json``):
  a 1.97 GB checkpoint (``--quick``: 50 MB) into a 2-rank FSDP2 Llama-shaped model on gloo/CPU: remap.load
  against set_model_state_dict(broadcast_from_rank0) and dcp.load(HuggingFaceStorageReader); per-rank bytes
  read, peak memory above the shard, wall time, and issue 19's targets met or missed.

``--quick`` runs small sizes (300 and 3,000 keys; a 50 MB checkpoint; one repeat) to
smoke-test the harness. Timings are never asserted; every case checks its own result
(the same key mapping from all three planners; a loaded model equal to the checkpoint).
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import build_load  # noqa: E402
import distributed  # noqa: E402
import first_touch  # noqa: E402
import formats  # noqa: E402
import loading  # noqa: E402
import many_keys  # noqa: E402
import planning  # noqa: E402
import scale  # noqa: E402
import startup  # noqa: E402
from _measure import ForeignCpu, gib, machine_info, remap_commit, table  # noqa: E402


def _cores(r: dict[str, Any]) -> str:
    return f"{r['other_cores']:.2f}" if "other_cores" in r else "?"


def planning_table(results: list[dict[str, Any]]) -> None:
    rows = []
    for r in results:
        s, ratio = r["seconds"], r["ratio"]
        rows.append([
            r["family"], f"{r['keys']:,}", str(r["rules"]),
            f"{s['remap']:.4f}", f"{s['rule_by_rule']:.4f}", f"{s['first_match']:.4f}",
            f"{ratio['rule_by_rule/remap']:.2f}x", f"{ratio['first_match/remap']:.2f}x",
            f"{r['remap_us_per_key']:.1f}", f"{s.get('records', float('nan')):.3f}", "yes" if r["same_mapping"] else "NO", _cores(r),
        ])  # fmt: skip
    table(
        "Planning: seconds (best of up to 5 runs within 0.5 s) and speed-up of remap over each loop",
        ["family", "keys", "rules", "remap s", "rule-by-rule s", "first-match s", "rbr/remap", "fm/remap",
         "remap µs/key", "records s", "same mapping", "others"],
        rows,
        ["rule-by-rule: mmengine revise_keys (re.sub over every key, rule after rule); "
         "first-match: transformers key_mapping (per key, first acting pattern, break).",
         "remap: make_plan only (rules parsed beforehand, metadata as sources give it); ratio > 1 means remap is faster. "
         "records: building the report's per-key records afterwards (once, on first read). "
         "'same mapping': all three give every key the same final name (or drop it).",
         "others: cores that other processes kept busy during the case (0 on a quiet machine)."],
    )  # fmt: skip


def loading_table(result: dict[str, Any]) -> None:
    rows = []
    for v, b in result["variants"].items():
        if "seconds" not in b:
            rows.append([v, b["status"][:60], *["-"] * 9])
            continue
        p = b["peak"]
        fmt = lambda x: f"{x:.2f}x" if x is not None else "-"  # noqa: E731
        rows.append([
            v, b["status"][:60], f"{b['seconds']:.3f}", fmt(b["vs_fastest_raw"]), fmt(b.get("vs_raw_same_round_median")),
            fmt(b["vs_page_cache_copy"]),
            f"+{gib(p['rss'])} ({100 * b['peak_share_of_model']:.0f}%)", f"+{gib(p['anon'])}", f"+{gib(p['file'])}",
            f"{b['bytes_per_second'] / 1e9:.2f}", _cores(b),
        ])  # fmt: skip
    any_b = next(iter(result["variants"].values()))
    model_gb = any_b.get("model_bytes", 0) / 1e9
    table(
        f"Loading {result['layers']} x Linear({result['dim']}, {result['dim']}) fp32 = {model_gb:.2f} GB "
        f"(best of {result['repeats']}, each run a fresh process"
        + (f", {result['threads']} torch threads)" if result.get("threads") else ")"),
        ["variant", "check", "wall s", "x fastest raw", "x raw, per round", "x page copy", "peak RSS GiB (% model)", "anon GiB",
         "file GiB", "GB/s", "others"],
        rows,
        ["Every file is read once before its timed load: all variants read from the page cache.",
         "Wall time = the load plus a read of one element per memory page of every model tensor (lazily "
         "mapped results pay their page faults).",
         "x fastest raw: best time over the best time of the fastest raw path; x raw, per round: the median over "
         "rounds of the time over the fastest raw path's time in the same round (robust to the machine's state "
         "drifting between rounds).",
         "Peak RSS above the RSS after building the model (meta targets: before the load); anon = heap, "
         "file = mapped file pages; each is its own maximum (VmHWM reset, /proc/self/status sampled every 2 ms).",
         f"fastest raw path: {result['fastest_raw']}; page copy: one readinto of the whole file into a preallocated, "
         "touched buffer (page_cache_copy_fresh: into memory allocated during the load, which pays a page fault per page); "
         "both single-threaded, while torch copies with all its threads.",
         "others: cores that other processes kept busy during that run (0 on a quiet machine).",
         "meta_assign keeps safetensors' mmap, and meta_remap_mmap remap's (mmap_weights=True, opt-in): their "
         "tensors are the page-cache pages mapped copy-on-write (file RSS), nothing is copied."],
    )  # fmt: skip


def show(out: dict[str, Any]) -> None:
    """The tables of one run's results."""
    if "planning" in out:
        planning_table(out["planning"])
    if "loading" in out:
        loading_table(out["loading"])
    if "startup" in out:
        startup.startup_table(out["startup"])
    if "scale" in out:
        scale.scale_table(out["scale"])
    if "formats" in out:
        formats.formats_table(out["formats"])
    if "build_load" in out:
        build_load.build_load_table(out["build_load"])
    if "many_keys" in out:
        many_keys.many_keys_table(out["many_keys"])
    if "first_touch" in out:
        first_touch.first_touch_table(out["first_touch"])
    if "distributed" in out:
        distributed.distributed_table(out["distributed"])
    start, end = out.get("machine", {}).get("remap_commit"), out.get("remap_commit_at_end")
    if start != end:
        print(f"\nWARNING: remap's source changed during the run ({start} -> {end}): the results may mix versions.")
    elif (start or "").endswith("+dirty"):
        print(f"\nnote: measured remap {start}: uncommitted changes to src/ were included.")
    cores = out.get("machine", {}).get("cores")
    busy = {k: v["cores"] for k, v in out.get("other_processes_cpu", {}).items() if v["cores"] > 0.1}
    if busy:
        print("\nWARNING: other processes kept " + ", ".join(f"{c:.2f} of {cores} cores busy during {k}"
              for k, c in busy.items()) + "; timings are slower than on a quiet machine.")  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes, one repeat: a smoke test of the harness")
    ap.add_argument("--out", type=Path, help="where to write the JSON results (default: benchmarks/results.json; "
                    "with --only formats, benchmarks/results_formats.json)")  # fmt: skip
    ap.add_argument("--only", choices=["planning", "loading", "startup", "scale", "formats", "build_load", "many_keys", "first_touch",
                                       "distributed"],
                    help="run one part only (scale and formats run only when named here)")
    ap.add_argument("--repeats", type=int, help="loading runs per variant (default 5; --quick 1)")
    ap.add_argument("--variants", help="loading variants to run, comma-separated (default: all): "
                    + ", ".join(loading.VARIANTS))
    ap.add_argument("--threads", type=int, help="torch threads in the loading subprocesses (OMP_NUM_THREADS; "
                    "default: torch's choice)")
    ap.add_argument("--tmpdir", help="where the checkpoint files are written (default: the system's temp dir)")
    ap.add_argument("--show", type=Path, metavar="JSON", help="print the tables of an earlier run's results and exit")
    a = ap.parse_args(argv)
    unknown = set(a.variants.split(",")) - set(loading.VARIANTS) if a.variants else set()
    if unknown:
        ap.error(f"unknown variants: {', '.join(sorted(unknown))}")
    if a.show:
        saved = json.loads(a.show.read_text())
        print(f"$ {saved['command']}")
        show(saved)
        return 0
    repeats = a.repeats or (1 if a.quick else 5)
    named = {"formats": "results_formats.json", "build_load": "results_build_load.json", "many_keys": "results_many_keys.json",
             "first_touch": "results_first_touch.json", "distributed": "results_distributed.json"}
    a.out = a.out or Path(__file__).resolve().parent / named.get(a.only or "", "results.json")

    command = shlex.join([Path(sys.executable).name, *sys.argv])
    info = machine_info()
    print(f"$ {command}")
    print(
        f"machine: {info.get('cores')} cores ({info.get('cores_usable')} usable), {gib(info.get('ram_bytes', 0))} GiB RAM, "
        f"{info.get('cpu', '?')}; python {info['python']}, torch {info['torch']} ({info.get('torch_threads')} threads), "
        f"safetensors {info['safetensors']}, "
        f"remap {info['remap']} ({info.get('remap_commit', '?')})"
    )
    out: dict[str, Any] = {"command": command, "quick": a.quick, "machine": info, "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    t0 = time.perf_counter()
    for part in ("planning", "loading", "startup", "scale", "formats", "build_load", "many_keys", "first_touch", "distributed"):
        if a.only != part and (a.only is not None or part in ("scale", "formats", "build_load", "many_keys", "first_touch",
                                                             "distributed")):
            continue
        print(f"\n{part} ...", flush=True)
        with ForeignCpu() as other:
            if part == "planning":
                out[part] = planning.run(a.quick, progress=lambda s: print(s, flush=True))
            elif part == "startup":
                out[part] = startup.run(3 if a.quick else 7, progress=lambda s: print(s, flush=True))
            elif part == "scale":
                out[part] = scale.run(a.quick, progress=lambda s: print(s, flush=True))
            elif part == "build_load":
                out[part] = build_load.run(a.quick, a.repeats or 1, a.tmpdir, progress=lambda s: print(s, flush=True))
            elif part == "first_touch":
                out[part] = first_touch.run(a.quick, a.repeats or (1 if a.quick else 5), a.tmpdir,
                                            progress=lambda s: print(s, flush=True))  # fmt: skip
            elif part == "distributed":
                out[part] = distributed.run(a.quick, a.repeats or (1 if a.quick else 3), a.tmpdir,
                                            progress=lambda s: print(s, flush=True))  # fmt: skip
            elif part == "many_keys":
                out[part] = many_keys.run(a.quick, a.repeats or (1 if a.quick else 3), a.tmpdir,
                                          progress=lambda s: print(s, flush=True))  # fmt: skip
            elif part == "formats":
                out[part] = formats.run(a.quick, a.repeats or (1 if a.quick else 3), a.tmpdir,
                                        progress=lambda s: print(s, flush=True))  # fmt: skip
            else:
                only = a.variants.split(",") if a.variants else None
                out[part] = loading.run(a.quick, repeats, a.tmpdir, progress=lambda s: print(s, flush=True),
                                        only=only, threads=a.threads)  # fmt: skip
        out.setdefault("other_processes_cpu", {})[part] = {"core_seconds": other.seconds, "cores": other.cores}
    out["seconds"] = time.perf_counter() - t0
    out["remap_commit_at_end"] = remap_commit()

    print()
    show(out)
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"\nresults: {a.out}  ({out['seconds']:.0f} s)")
    failed = [r for r in out.get("planning", []) if not r["same_mapping"]]
    failed += [b for b in out.get("loading", {}).get("variants", {}).values() if b["status"].startswith("WRONG")]
    failed += [r for r in out.get("scale", {}).get("cases", {}).values() if "ok" != r["remap"]["check"] or "ok" != r["floor"]["check"]]
    failed += [r for r in out.get("formats", {}).get("formats", {}).values() if r["status"].startswith("WRONG")]
    failed += build_load.failures(out.get("build_load", {})) + distributed.failures(out.get("distributed", {})) + many_keys.failures(out.get("many_keys", {"variants": {}}))
    failed += [r for r in out.get("first_touch", {}).get("variants", {}).values() if r["status"].startswith("WRONG")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
