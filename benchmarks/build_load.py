"""Build + load, the job users do every day: a Hugging Face BertModel from its own
``save_pretrained`` folder, each way in a fresh process (imports done before the clock starts).

Variants: ``from_pretrained`` (transformers); ``build+remap`` (``BertModel(config)``, random
initialisation included, then ``remap.load``); ``empty+remap`` (``with remap.empty_weights():``
then ``remap.load``); ``meta+remap`` (built under ``torch.device("meta")``, buffers computed by
``_init_weights``); ``empty+remap mmap`` (``mmap_weights=True``: the weights stay views of
the file's pages, as transformers 5's ``from_pretrained`` keeps them); ``hand`` (``BertModel(config)`` + safetensors ``load_file`` +
``load_state_dict``). Peak memory is above the process's memory before the build: VmHWM
(``rss``), anonymous (``anon``: the model) and file-backed (``file``: mapped checkpoint pages).

    python benchmarks/build_load.py [--size large|base|tiny] [--repeats N]
    python benchmarks/run.py --only build_load [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import RssSampler, Timer, gib, table, warm_file  # noqa: E402

SIZES = {  # BERT-large: 335M parameters, 1.3 GB fp32
    "large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
    "base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
}
VARIANTS = ("from_pretrained", "build+remap", "empty+remap", "empty+remap mmap", "meta+remap", "hand")
TIMEOUT_S = 600


def _config(size: str) -> Any:
    import transformers

    return transformers.BertConfig(**SIZES[size])


def _variant(name: str, folder: Path) -> Callable[[], Any]:
    """The build + load of ``name``: a function returning the loaded model."""
    import torch
    import transformers

    import remap
    import remap.api  # noqa: F401  (remap's lazy modules and transformers' model module load before the clock)
    import remap.loading.engine  # noqa: F401
    from remap.sources.readers import open_source  # noqa: F401

    BertModel = transformers.BertModel
    config = transformers.BertConfig.from_pretrained(folder)
    weights = folder / "model.safetensors"

    def from_pretrained() -> Any:
        return BertModel.from_pretrained(folder)

    def build_remap() -> Any:
        model = BertModel(config)
        remap.load(model, weights)
        return model

    def empty_remap() -> Any:
        with remap.empty_weights():
            model = BertModel(config)
        remap.load(model, weights)
        return model

    def empty_remap_mmap() -> Any:
        with remap.empty_weights():
            model = BertModel(config)
        remap.load(model, weights, mmap_weights=True)
        return model

    def meta_remap() -> Any:
        with torch.device("meta"):
            model = BertModel(config)
        remap.load(model, weights)
        return model

    def hand() -> Any:
        from safetensors.torch import load_file

        model = BertModel(config)
        model.load_state_dict(load_file(weights), strict=False)
        return model

    return {"from_pretrained": from_pretrained, "build+remap": build_remap, "empty+remap": empty_remap,
            "empty+remap mmap": empty_remap_mmap, "meta+remap": meta_remap, "hand": hand}[name]  # fmt: skip


def child(name: str, folder: Path) -> dict[str, Any]:
    """One variant in this (fresh) process: seconds, peak memory above start, and a check of the result."""
    from remap.sources.factories import ensure_torchvision

    ensure_torchvision()
    import torch
    from safetensors import safe_open

    fn = _variant(name, folder)
    with RssSampler() as rss, Timer() as t:
        model = fn()
    peak = rss.peak_above_base()
    state = model.state_dict()
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        wrong = [k for k in f.keys() if k in state and not torch.equal(state[k], f.get_tensor(k))]
    meta = [k for k, v in [*model.named_parameters(), *model.named_buffers()] if v.is_meta]
    ok = not wrong and not meta and torch.equal(model.embeddings.position_ids, torch.arange(config_len(model)).expand(1, -1))
    return {"seconds": t.seconds, **peak, "status": "ok" if ok else f"WRONG: {(wrong + meta)[:3]}"}


def config_len(model: Any) -> int:
    return int(model.config.max_position_embeddings)


def run(quick: bool, repeats: int, tmpdir: str | None, progress: Callable[[str], None] = print,
        size: str | None = None) -> dict[str, Any]:  # fmt: skip
    """Save the model once, then every variant ``repeats`` times, interleaved, each in a fresh process."""
    from remap.sources.factories import ensure_torchvision

    ensure_torchvision()
    import torch
    import transformers

    size = size or ("tiny" if quick else "large")
    with tempfile.TemporaryDirectory(dir=tmpdir) as d:
        folder = Path(d) / "bert"
        torch.manual_seed(0)
        model = transformers.BertModel(_config(size))
        params = sum(p.numel() for p in model.parameters())
        model.save_pretrained(folder)
        del model
        warm_file(folder / "model.safetensors")
        progress(f"BertModel ({size}): {params / 1e6:.0f}M parameters, {gib((folder / 'model.safetensors').stat().st_size)} GiB")
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for r in range(repeats):
            for v in VARIANTS:
                runs[v].append(_spawn(v, folder))
                progress(f"  {v} #{r + 1}: {runs[v][-1].get('seconds', float('nan')):.2f} s, {runs[v][-1]['status']}")
    variants = {v: _summary(rs) for v, rs in runs.items()}
    return {"size": size, "params": params, "repeats": repeats, "variants": variants}


def _spawn(variant: str, folder: Path) -> dict[str, Any]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TRANSFORMERS_VERBOSITY": "error"}
    cmd = [sys.executable, __file__, "--child", variant, "--folder", str(folder)]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    except subprocess.TimeoutExpired:
        return {"status": f"timed out after {TIMEOUT_S} s"}
    if p.returncode != 0:
        return {"status": f"failed: {(p.stderr.strip().splitlines() or ['?'])[-1][:200]}"}
    return json.loads(p.stdout.strip().splitlines()[-1])


def _summary(rs: list[dict[str, Any]]) -> dict[str, Any]:
    good = [r for r in rs if "seconds" in r]
    if not good:
        return {"status": rs[-1]["status"]}
    status = next((r["status"] for r in good if r["status"] != "ok"), "ok")
    return {"status": status, "seconds": statistics.median(r["seconds"] for r in good),
            **{k: max(r[k] for r in good) for k in ("rss", "anon", "file")}}  # fmt: skip


def build_load_table(result: dict[str, Any]) -> None:
    vs = result["variants"]
    base = vs.get("from_pretrained", {})
    rows = []
    for v, b in vs.items():
        if "seconds" not in b:
            rows.append([v, "-", "-", "-", "-", "-", "-", b["status"][:50]])
            continue
        ratio = f"{b['seconds'] / base['seconds']:.2f}x" if "seconds" in base else "-"
        mem = f"{b['rss'] / base['rss']:.2f}x" if base.get("rss") else "-"
        rows.append([v, f"{b['seconds']:.2f}", ratio, gib(b["rss"]), mem, gib(b["anon"]), gib(b["file"]), b["status"]])
    table(f"Build + load: HF BertModel ({result['size']}, {result['params'] / 1e6:.0f}M parameters), median of "
          f"{result['repeats']} fresh process(es)",
          ["variant", "wall s", "vs from_pretrained", "peak GiB", "vs from_pretrained", "anon GiB", "file GiB", "check"], rows,
          ["Peak memory above the process before the build (VmHWM); anon: heap (the model), file: mapped checkpoint pages.",
           "Imports happen before the clock starts; the checkpoint is in the page cache."])  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="large")
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--tmpdir")
    ap.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.folder)))
        return 0
    t0 = time.perf_counter()
    result = run(False, a.repeats, a.tmpdir, size=a.size)
    build_load_table(result)
    print(f"\n{time.perf_counter() - t0:.0f} s")
    return 0 if all(b["status"] == "ok" for b in result["variants"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
