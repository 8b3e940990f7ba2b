"""Build + load, the job users do every day, against the loaders people use: a Hugging Face
BERT-large-sized ``BertModel`` (335M parameters, fp32, 1.25 GiB), a Llama-style
``LlamaForCausalLM`` (hidden 2048, 16 layers, MLP 5632, 32 heads / 4 KV heads, vocabulary
32000: 836M parameters, bf16, 1.56 GiB) and a timm ViT-L (``vit_large_patch16_224``: 304M
parameters, fp32, 1.13 GiB), each from a plain checkpoint and from a ``module.``-prefixed one
(the same tensors, saved as from DistributedDataParallel), so that every loader must rename.

Each variant runs in a fresh process (imports done before the clock starts), repeats
interleaved; the clock covers build + load. ``touch s`` is measured afterwards: a read of one
element per memory page of every tensor (what a lazily mapped model pays at its first
forward). Peak memory is above the process's memory before the build, over build + load +
touch: VmHWM (``rss``), anonymous (``anon``: the model's heap) and file-backed (``file``:
mapped checkpoint pages). Each variant checks its own result: every tensor of the model equal
to the checkpoint's (values and dtype), no key missing or left on meta, every buffer equal to
the one a normal build of the real library computes.

Plain checkpoint (HF: the ``save_pretrained`` folder; timm: a safetensors file):
  peers: ``from_pretrained`` (HF) or ``timm.create_model(name, pretrained=True,
  pretrained_cfg_overlay={"file": path})`` (timm); ``hand``: the model built normally +
  safetensors ``load_file`` + ``load_state_dict``.
  remap: ``build + remap`` (built normally), ``empty_weights + remap`` (``with
  remap.empty_weights():``), the same with ``mmap_weights=True``, ``meta + remap`` (built under
  ``torch.device("meta")``).
``module.``-prefixed checkpoint (a safetensors file and a torch ``.pth`` of the same tensors):
  peers: HF ``from_pretrained(folder, key_mapping={"^module\\.": ""})``; timm
  ``pretrained_cfg_overlay`` (timm strips ``module.`` itself) and
  ``timm.models.load_checkpoint``; mmengine ``load_checkpoint(model, pth,
  revise_keys=[(r"^module\\.", "")])``; ``hand torch.load``: ``torch.load(pth, mmap=True)`` +
  ``{k.removeprefix("module."): v}`` + ``load_state_dict``.
  remap (rules ``strip_prefix: module.``): into a normally built model from the ``.pth``;
  into an ``empty_weights`` model from the safetensors file (with and without
  ``mmap_weights``) and from the ``.pth``.
Llama models are built with torch's default dtype set to bfloat16 (what ``from_pretrained``
does from the config's dtype), so every variant ends with bf16 weights. The 100k-key end to
end (``many_keys.py``) runs after the models.

    python benchmarks/build_load.py [--quick] [--models bert,llama,vit] [--repeats N]
    python benchmarks/run.py --only build_load [--quick]

``--quick``: tiny models, and the variants of one model share one process (a smoke test of the
harness; its timings and memory are not comparable).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import finish, ForeignCpu, RssSampler, Timer, gib, table, warm_file  # noqa: E402

MODELS = ("bert", "llama", "vit")
SIZES: dict[str, dict[str, Any]] = {
    "bert": {  # BERT-large: 335M parameters, 1.25 GiB fp32
        "full": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        "quick": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128),
    },
    "llama": {  # 836M parameters, 1.56 GiB bf16
        "full": dict(hidden_size=2048, num_hidden_layers=16, intermediate_size=5632, vocab_size=32000,
                     num_attention_heads=32, num_key_value_heads=4),
        "quick": dict(hidden_size=64, num_hidden_layers=2, intermediate_size=176, vocab_size=1000,
                      num_attention_heads=4, num_key_value_heads=2),
    },  # fmt: skip
    "vit": {"full": "vit_large_patch16_224", "quick": "vit_tiny_patch16_224"},  # 304M parameters, 1.13 GiB fp32
}
STRIP = {"version": 1, "rules": [{"strip_prefix": "module."}]}
TIMEOUT_S = 600
RESULT = "@@result "  # a child's result line on stdout: other libraries print there too


@dataclass(frozen=True)
class Variant:
    """One way to build + load: its row name, the checkpoint it reads, whether it is a peer."""

    name: str
    checkpoint: str  # "plain" or "module."
    peer: bool
    models: tuple[str, ...] = MODELS
    file: str = "st"  # the file it reads: "st" (safetensors) or "pth"; warmed before it runs


VARIANTS = (
    Variant("from_pretrained", "plain", True, ("bert", "llama")),
    Variant("timm pretrained_cfg_overlay", "plain", True, ("vit",)),
    Variant("hand: load_file + load_state_dict", "plain", True),
    Variant("build + remap", "plain", False),
    Variant("empty_weights + remap", "plain", False),
    Variant("empty_weights + remap mmap", "plain", False),
    Variant("meta + remap", "plain", False),
    Variant("from_pretrained key_mapping", "module.", True, ("bert", "llama")),
    Variant("timm pretrained_cfg_overlay", "module.", True, ("vit",)),
    Variant("timm load_checkpoint", "module.", True, ("vit",)),
    Variant("mmengine load_checkpoint", "module.", True, file="pth"),
    Variant("hand: torch.load mmap + rename", "module.", True, file="pth"),
    Variant("build + remap strip (.pth)", "module.", False, file="pth"),
    Variant("empty_weights + remap strip", "module.", False),
    Variant("empty_weights + remap strip mmap", "module.", False),
    Variant("empty_weights + remap strip (.pth)", "module.", False, file="pth"),
)


def variants_of(model: str) -> list[Variant]:
    """The variants that apply to ``model``, in table order."""
    return [v for v in VARIANTS if model in v.models]


def vid(v: Variant) -> str:
    """A variant's id, unique within a model: ``plain/hand: ...``."""
    return f"{v.checkpoint}/{v.name}"


def by_id(model: str, ident: str) -> Variant:
    return next(v for v in variants_of(model) if vid(v) == ident)


# --- files --------------------------------------------------------------------------------


def paths(work: Path) -> dict[str, Path]:
    """Where each checkpoint of one model lives in its work folder."""
    return {
        "plain_dir": work / "plain",  # HF save_pretrained folder (timm: the same file, no config)
        "plain": work / "plain" / "model.safetensors",
        "module_dir": work / "module",  # config.json + module.-prefixed model.safetensors
        "module": work / "module" / "model.safetensors",
        "pth": work / "module.pth",  # torch.save(ddp.state_dict()): the same tensors under module.
        "buffers": work / "buffers.pt",  # every buffer of a normal build: the reference
        "info": work / "info.json",
    }


@contextlib.contextmanager
def default_dtype(dtype: Any) -> Iterator[None]:
    """torch's default dtype set to ``dtype`` inside the block."""
    import torch

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def builder(model: str, info: dict[str, Any], plain_dir: Path) -> Callable[[], Any]:
    """The model's own constructor as a user calls it (random initialisation included)."""
    import torch

    if model == "vit":
        import timm

        return lambda: timm.create_model(info["timm"], pretrained=False)
    import transformers

    cls = {"bert": transformers.BertModel, "llama": transformers.LlamaForCausalLM}[model]
    config = cls.config_class.from_pretrained(plain_dir)
    dtype = getattr(torch, info["dtype"])

    def build() -> Any:
        with default_dtype(dtype):
            return cls(config)

    return build


def save(model: str, size: str, work: Path) -> dict[str, Any]:
    """Build ``model`` normally (seeded), write its checkpoints and reference buffers; its info."""
    import torch
    from safetensors.torch import load_file, save_file

    from remap.sources.factories import ensure_torchvision

    ensure_torchvision()
    p = paths(work)
    torch.manual_seed(0)
    if model == "vit":
        import timm

        info: dict[str, Any] = {"timm": SIZES["vit"][size], "dtype": "float32"}
        m = timm.create_model(info["timm"], pretrained=False)
        p["plain_dir"].mkdir(parents=True)
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, p["plain"], metadata={"format": "pt"})
    else:
        import transformers

        info = {"dtype": "bfloat16" if model == "llama" else "float32"}
        cls = {"bert": transformers.BertModel, "llama": transformers.LlamaForCausalLM}[model]
        config = cls.config_class(**SIZES[model][size], dtype=info["dtype"])
        with default_dtype(getattr(torch, info["dtype"])):
            m = cls(config)
        m.save_pretrained(p["plain_dir"])
    info["params"] = sum(t.numel() for t in m.parameters())
    torch.save({k: b.clone() for k, b in m.named_buffers()}, p["buffers"])
    del m
    sd = load_file(p["plain"])
    p["module_dir"].mkdir()
    if (p["plain_dir"] / "config.json").exists():
        (p["module_dir"] / "config.json").write_bytes((p["plain_dir"] / "config.json").read_bytes())
    prefixed = {"module." + k: v for k, v in sd.items()}
    save_file(prefixed, p["module"], metadata={"format": "pt"})
    torch.save(prefixed, p["pth"])
    info["bytes"] = p["plain"].stat().st_size
    info["tensors"] = len(sd)
    del sd, prefixed
    p["info"].write_text(json.dumps(info))
    return info


# --- the variants (in the child) -----------------------------------------------------------


def variant_fn(model: str, v: Variant, work: Path) -> Callable[[], Any]:
    """The build + load of ``v``: a function returning the loaded model (imports done here)."""
    import torch

    import remap
    import remap.api  # noqa: F401  (remap's lazy modules load before the clock)
    import remap.loading.engine  # noqa: F401
    from remap.sources.readers import open_source  # noqa: F401

    p = paths(work)
    info = json.loads(p["info"].read_text())
    build = builder(model, info, p["plain_dir"])
    st = p["plain"] if v.checkpoint == "plain" else p["module"]
    rules = None if v.checkpoint == "plain" else STRIP
    if model != "vit":
        import transformers

        cls = {"bert": transformers.BertModel, "llama": transformers.LlamaForCausalLM}[model]
    if model == "vit" or v.name.startswith("timm"):
        import timm
        import timm.models

    def remap_into(make: Callable[[], Any], path: Path, **kw: Any) -> Callable[[], Any]:
        def run() -> Any:
            m = make()
            remap.load(m, path, rules, **kw)
            return m

        return run

    def empty() -> Any:
        with remap.empty_weights():
            return build()

    def meta() -> Any:
        with torch.device("meta"):
            return build()

    def hand_st() -> Any:
        from safetensors.torch import load_file

        m = build()
        m.load_state_dict(load_file(st))
        return m

    def hand_torch() -> Any:
        m = build()
        sd = torch.load(p["pth"], mmap=True, weights_only=True)
        m.load_state_dict({k.removeprefix("module."): t for k, t in sd.items()})
        return m

    def mmengine() -> Any:
        from mmengine.runner import load_checkpoint

        m = build()
        load_checkpoint(m, str(p["pth"]), map_location="cpu", revise_keys=[(r"^module\.", "")])
        return m

    def timm_load_checkpoint() -> Any:
        m = build()
        timm.models.load_checkpoint(m, str(st))
        return m

    if v.name == "mmengine load_checkpoint":
        from mmengine.runner import load_checkpoint  # noqa: F401  (imported before the clock)
    return {
        "from_pretrained": lambda: cls.from_pretrained(p["plain_dir"]),
        "from_pretrained key_mapping": lambda: cls.from_pretrained(p["module_dir"], key_mapping={r"^module\.": ""}),
        "timm pretrained_cfg_overlay": lambda: timm.create_model(
            info["timm"], pretrained=True, pretrained_cfg_overlay={"file": str(st)}),
        "timm load_checkpoint": timm_load_checkpoint,
        "hand: load_file + load_state_dict": hand_st,
        "hand: torch.load mmap + rename": hand_torch,
        "mmengine load_checkpoint": mmengine,
        "build + remap": remap_into(build, st),
        "empty_weights + remap": remap_into(empty, st),
        "empty_weights + remap mmap": remap_into(empty, st, mmap_weights=True),
        "meta + remap": remap_into(meta, st),
        "build + remap strip (.pth)": remap_into(build, p["pth"]),
        "empty_weights + remap strip": remap_into(empty, st),
        "empty_weights + remap strip mmap": remap_into(empty, st, mmap_weights=True),
        "empty_weights + remap strip (.pth)": remap_into(empty, p["pth"]),
    }[v.name]  # fmt: skip


def touch(model: Any) -> None:
    """Read one element of every memory page of every tensor (a mapped model's page faults)."""
    import torch

    with torch.no_grad():
        for t in model.state_dict().values():
            if not t.is_meta and t.numel():
                t.reshape(-1)[:: max(1, 4096 // t.element_size())].sum()


def check(model: Any, work: Path) -> list[str]:
    """Problems with a loaded model: a tensor differing from the plain checkpoint's (values or
    dtype), a key missing on either side, a tensor on meta, a buffer differing from a normal build's."""
    import torch
    from safetensors import safe_open

    p = paths(work)
    state = model.state_dict()
    problems = [f"meta: {n}" for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    with safe_open(str(p["plain"]), "pt") as f:
        keys = set(f.keys())
        problems += [f"not in the checkpoint: {k}" for k in state if k not in keys]
        problems += [f"not in the model: {k}" for k in keys if k not in state]
        for k in sorted(keys & set(state)):
            want = f.get_tensor(k)
            got = state[k]
            if got.is_meta or got.dtype != want.dtype or got.shape != want.shape or not torch.equal(got, want):
                problems.append(f"differs: {k}")
    ref = torch.load(p["buffers"], weights_only=True)
    bufs = dict(model.named_buffers())
    problems += [f"buffer missing: {k}" for k in ref if k not in bufs]
    for k, b in bufs.items():
        r = ref.get(k)
        if r is None or b.is_meta or b.dtype != r.dtype or b.shape != r.shape or not torch.equal(b, r):
            problems.append(f"buffer differs: {k}")
    return problems


def child(model: str, ident: str, work: Path) -> dict[str, Any]:
    """One variant in this process: seconds, peak memory above start, and a check of the result."""
    from remap.sources.factories import ensure_torchvision

    ensure_torchvision()
    v = by_id(model, ident)
    try:
        fn = variant_fn(model, v, work)
    except ImportError as exc:
        return {"status": f"not installed: {exc.name or exc}" + (": pip install mmengine" if "mmengine" in str(exc) else "")}
    with RssSampler() as rss:
        with Timer() as t:
            m = fn()
        with Timer() as tt:
            touch(m)
    problems = check(m, work)
    out = {"seconds": t.seconds, "touch": tt.seconds, **rss.peak_above_base()}
    out["status"] = "ok" if not problems else f"WRONG ({len(problems)}): {'; '.join(problems[:3])}"
    return out


# --- the parent -----------------------------------------------------------------------------


def spawn(args: list[str], timeout: float = TIMEOUT_S) -> list[dict[str, Any]]:
    """Run ``__file__``-style child ``args`` in a fresh process; its result lines (or one failure)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error",
           "TQDM_DISABLE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}  # fmt: skip
    try:
        p = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return [{"status": f"failed: timed out after {timeout:.0f} s"}]
    results = [json.loads(line[len(RESULT):]) for line in p.stdout.splitlines() if line.startswith(RESULT)]
    if p.returncode != 0:
        last = (p.stderr.strip().splitlines() or p.stdout.strip().splitlines() or ["?"])[-1]
        results.append({"status": f"failed: {last[:300]}"})
    return results or [{"status": "failed: no result printed"}]


def summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median seconds, maximum memory over the repeats; the first status that is not ok."""
    good = [r for r in rs if "seconds" in r]
    status = next((r["status"] for r in rs if r["status"] != "ok"), "ok")
    if not good:
        return {"status": status}
    out = {"status": status, "runs": len(good)}
    for k in ("seconds", "touch", "others"):
        if all(k in r for r in good):
            out[k] = statistics.median(r[k] for r in good)
    out.update({k: max(r[k] for r in good) for k in ("rss", "anon", "file")})
    return out


def ratios(variants: dict[str, dict[str, Any]], checkpoints: dict[str, str], peers: set[str]) -> None:
    """Each variant's time over the fastest working peer's on the same checkpoint (in place)."""
    for ckpt in set(checkpoints.values()):
        ok = [i for i in peers if checkpoints[i] == ckpt and variants[i].get("status") == "ok" and "seconds" in variants[i]]
        if not ok:
            continue
        best = min(ok, key=lambda i: variants[i]["seconds"])
        ready = min(ok, key=lambda i: variants[i]["seconds"] + variants[i]["touch"])
        for i, b in variants.items():
            if checkpoints[i] == ckpt and "seconds" in b:
                b["fastest_peer"] = best
                b["vs_peer"] = b["seconds"] / variants[best]["seconds"]
                b["vs_peer_rss"] = b["rss"] / variants[best]["rss"] if variants[best]["rss"] > 0 else None
                b["vs_peer_ready"] = (b["seconds"] + b["touch"]) / (variants[ready]["seconds"] + variants[ready]["touch"])


def run_model(model: str, quick: bool, repeats: int, tmpdir: str | None, progress: Callable[[str], None],
              only: list[str] | None = None) -> dict[str, Any]:  # fmt: skip
    """Save ``model``'s checkpoints once, then every variant ``repeats`` times, interleaved."""
    size = "quick" if quick else "full"
    chosen = [v for v in variants_of(model) if only is None or vid(v) in only or v.name in only]
    missing_mmengine = importlib.util.find_spec("mmengine") is None
    runs: dict[str, list[dict[str, Any]]] = {vid(v): [] for v in chosen}
    todo = [v for v in chosen if not (v.name.startswith("mmengine") and missing_mmengine)]
    for v in chosen:
        if v not in todo:
            runs[vid(v)].append({"status": "not installed: pip install mmengine"})
    with tempfile.TemporaryDirectory(dir=tmpdir) as d:
        work = Path(d)
        save_args = [__file__, "--save", model, "--size", size, "--work", str(work)]
        # --quick: one process writes the files and runs every variant: a smoke test, not a measurement
        got = spawn(save_args + (["--child", model, *[vid(v) for v in todo]] if quick else []))
        info = got.pop(0)
        if "params" not in info:
            return {"status": f"could not write the checkpoints: {info['status']}", "variants": {}}
        desc = info.get("timm") or f"{'BertModel' if model == 'bert' else 'LlamaForCausalLM'} ({size})"
        progress(f"{model}: {desc}, {info['params'] / 1e6:.0f}M parameters, {info['dtype']}, {gib(info['bytes'])} GiB")
        p = paths(work)
        if quick:
            for v, res in zip(todo, got + [got[-1] if got else {"status": "failed: no result printed"}] * len(todo)):
                runs[vid(v)].append(res)
        for rep in range(0 if quick else repeats):
            for v in todo:
                warm_file(p["pth"] if v.file == "pth" else p["plain"] if v.checkpoint == "plain" else p["module"])
                with ForeignCpu() as other:
                    res = spawn([__file__, "--child", model, vid(v), "--work", str(work)])[-1]
                res["others"] = other.cores
                runs[vid(v)].append(res)
                progress(f"  {vid(v)} #{rep + 1}: {res.get('seconds', float('nan')):.2f} s "
                         f"(+{res.get('touch', float('nan')):.2f} s touch), {res['status'][:120]}")  # fmt: skip
    variants = {i: summary(rs) for i, rs in runs.items()}
    ratios(variants, {vid(v): v.checkpoint for v in chosen}, {vid(v) for v in chosen if v.peer})
    return {"desc": desc, "size": size, **info, "variants": variants}


def run(quick: bool, repeats: int, tmpdir: str | None, progress: Callable[[str], None] = print,
        models: list[str] | None = None, only: list[str] | None = None, many_keys: bool = True) -> dict[str, Any]:  # fmt: skip
    """Every model (one at a time: its files are deleted before the next), then the 100k-key end to end."""
    out: dict[str, Any] = {"quick": quick, "repeats": repeats, "models": {}}
    for model in models or MODELS:
        out["models"][model] = run_model(model, quick, repeats, tmpdir, progress, only)
    if many_keys:
        import many_keys as mk

        out["many_keys"] = mk.run(quick, repeats, tmpdir, progress)
    return out


def failures(result: dict[str, Any]) -> list[str]:
    """Rows whose result is wrong, and remap rows that did not load (a peer that fails is
    recorded, not a failure of the run)."""
    bad = []
    for model, m in result.get("models", {}).items():
        if "status" in m:
            bad.append(f"{model}: {m['status']}")
        for i, b in m.get("variants", {}).items():
            if b["status"].startswith("WRONG") or ("remap" in i and b["status"] != "ok"):
                bad.append(f"{model} {i}: {b['status']}")
    if "many_keys" in result:
        import many_keys as mk

        bad += mk.failures(result["many_keys"])
    return bad


def _f(x: float | None, fmt: str = "{:.2f}x") -> str:
    return "-" if x is None else fmt.format(x)


def build_load_table(result: dict[str, Any]) -> None:
    """One table per model, then the 100k-key table."""
    for model, m in result.get("models", {}).items():
        rows = []
        for i, b in m["variants"].items():
            ckpt, name = i.split("/", 1)
            if "seconds" not in b:
                rows.append([name, ckpt, *["-"] * 8, b["status"][:90]])
                continue
            rows.append([name, ckpt, f"{b['seconds']:.2f}", _f(b.get("vs_peer")), f"{b['touch']:.2f}",
                         _f(b.get("vs_peer_ready")), gib(b["rss"]), _f(b.get("vs_peer_rss")), gib(b["anon"]),
                         gib(b["file"]), b["status"][:90] + (f" (others {b['others']:.1f})" if b.get("others", 0) > 0.3 else "")])  # fmt: skip
        peers = sorted({b["fastest_peer"].split("/", 1)[1] for b in m["variants"].values() if "fastest_peer" in b})
        table(f"Build + load: {m.get('desc', model)}, {m.get('params', 0) / 1e6:.0f}M parameters, {m.get('dtype')}, "
              f"{gib(m.get('bytes', 0))} GiB; median of {result['repeats']} fresh process(es) per variant"
              + (" [--quick: variants share one process; timings not comparable]" if result.get("quick") else ""),
              ["variant", "checkpoint", "wall s", "x peer", "touch s", "x peer ready", "peak GiB", "x peer", "anon GiB",
               "file GiB", "check"], rows,
              ["wall: build + load (imports before the clock; the file in the page cache). x peer: over the fastest peer on "
               "the same checkpoint (" + ", ".join(peers) + "); ready: wall + touch (one read per memory page of every "
               "tensor, what a mapped model pays at its first forward).",
               "Peak above the process before the build, over build + load + touch (VmHWM); anon: heap (the model), "
               "file: mapped checkpoint pages. check: every tensor equals the checkpoint's, every buffer a normal build's.",
               "others: cores other processes kept busy during the run (shown above 0.3)."])  # fmt: skip
    if "many_keys" in result:
        import many_keys as mk

        mk.many_keys_table(result["many_keys"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny models, one process per model: a smoke test")
    ap.add_argument("--models", help="comma-separated, of: " + ", ".join(MODELS))
    ap.add_argument("--variants", help="comma-separated variant names or ids (checkpoint/name)")
    ap.add_argument("--no-many-keys", action="store_true", help="skip the 100k-key end to end")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tmpdir")
    ap.add_argument("--out", type=Path, help="write the JSON results here")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--save", choices=MODELS, help=argparse.SUPPRESS)
    ap.add_argument("--size", help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.save:
        print(RESULT + json.dumps(save(a.save, a.size, a.work)), flush=True)
    if a.child:
        for ident in a.child[1:]:
            print(RESULT + json.dumps(child(a.child[0], ident, a.work)), flush=True)
    if a.save or a.child:
        return 0
    t0 = time.perf_counter()
    models = a.models.split(",") if a.models else None
    result = run(a.quick, a.repeats, a.tmpdir, models=models, only=a.variants.split(",") if a.variants else None,
                 many_keys=not a.no_many_keys)  # fmt: skip
    return finish(result, build_load_table, failures, started=t0, out=a.out)


if __name__ == "__main__":
    sys.exit(main())
