"""The report as people read it: the text's numbers against the JSON's, for every shipped
config; ``print(report)``; sections that carry information; one row per pattern.

The JSON report written by the same run is the reference for every number the text
prints; the sources are generated here (small models of the real libraries, saved as a
user would save them), as tests/test_conversions.py does.
"""

from __future__ import annotations

import io
import json
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torchvision

import conversion_models as cm
import remap
from remap.cli import main
from remap.report.render import format_count, format_percent, format_report
from test_conversions import _hf_gpt2, pretrained_like
from test_keras_conversion import save_keras_model
from test_onnx_gguf_conversions import gguf_source, onnx_source
from test_pickled_model_conversion import save_old_model
from test_tf_conversion import tf_checkpoint
from tests.rules.test_vars_and_heads import _meta_weights

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"


# --------------------------------------------------------------------------- sources


def _save(state: dict[str, torch.Tensor], folder: Path, name: str = "ckpt.pth") -> str:
    path = folder / name
    torch.save(state, path)
    return str(path)


def _resnet18(**kwargs: Any) -> dict[str, torch.Tensor]:
    return pretrained_like(torchvision.models.resnet18(**kwargs)).state_dict()


def _timm(name: str) -> dict[str, torch.Tensor]:
    import timm

    return pretrained_like(timm.create_model(name)).state_dict()


def small_hf_gpt2() -> torch.nn.Module:
    """A factory source: a small GPT2LMHeadModel, whose state_dict holds the tied
    ``lm_head.weight`` beside ``transformer.wte.weight``."""
    return pretrained_like(_hf_gpt2())


def _gpt2_folder(folder: Path) -> str:
    small_hf_gpt2().save_pretrained(folder / "gpt2")  # model.safetensors without the tied lm_head.weight
    return str(folder / "gpt2")


def _flax_file(folder: Path) -> Path:
    from test_flax_conversion import flax_variables, save_flax

    return save_flax(folder, flax_variables())


@dataclass(frozen=True)
class Case:
    """A config run as its comment says: a generated source and the target to load into
    (None: the config's own)."""

    config: str
    source: Callable[[Path], str]
    target: str | None


CASES = {
    "hf-gpt2-state-dict": Case("hf-gpt2-to-linear.yaml", lambda d: _save(small_hf_gpt2().state_dict(), d), "conversion_models:GPT"),
    "hf-gpt2-save-pretrained": Case("hf-gpt2-to-linear.yaml", _gpt2_folder, "conversion_models:GPT"),
    "hf-gpt2-factory": Case("hf-gpt2-to-linear.yaml", lambda d: "tests.report.test_report_text:small_hf_gpt2", "conversion_models:GPT"),
    "gguf-to-hf-llama": Case("gguf-to-hf-llama.yaml", gguf_source, "test_onnx_gguf_conversions:tiny_llama"),
    "keras-to-torch": Case("keras-to-torch.yaml", save_keras_model, "test_keras_conversion:TorchNet"),
    "meta-llama-to-hf": Case("meta-llama-to-hf.yaml", lambda d: _save(_meta_weights(), d), "tests.rules.test_vars_and_heads:hf_llama"),
    "imagenet-head-subset": Case("imagenet-head-subset.yaml", lambda d: _save(_resnet18(), d), "conversion_models:resnet18_head_subset"),
    "lightning-to-module": Case("lightning-to-module.yaml",
                                lambda d: _save({"state_dict": {f"model.{k}": v for k, v in _resnet18().items()}, "epoch": 3}, d),
                                "torchvision.models:resnet18"),
    "mha-to-qkv": Case("mha-to-qkv.yaml", lambda d: _save(pretrained_like(cm.mha()).state_dict(), d), "conversion_models:QKVAttention"),
    "onnx-to-module": Case("onnx-to-module.yaml", onnx_source, "test_onnx_gguf_conversions:ConvBnNet"),
    "pickled-model-renamed-class": Case("pickled-model-renamed-class.yaml", lambda d: str(save_old_model(d).path),
                                        "test_pickled_model_conversion:NewNet"),
    "flax-to-torch": Case("flax-to-torch.yaml", lambda d: str(_flax_file(d)), "test_flax_conversion:TorchNet"),
    "tf-checkpoint-to-torch": Case("tf-checkpoint-to-torch.yaml", lambda d: str(tf_checkpoint() / "ckpt" / "ckpt-1"),
                                   "test_tf_conversion:TorchNet"),
    "qkv-to-mha": Case("qkv-to-mha.yaml", lambda d: _save(pretrained_like(cm.QKVAttention()).state_dict(), d), "conversion_models:mha"),
    "resnet-stem-in-channels": Case("resnet-stem-in-channels.yaml", lambda d: _save(_resnet18(), d), "conversion_models:resnet18_gray"),
    "timm-resnet-to-torchvision": Case("timm-resnet-to-torchvision.yaml", lambda d: _save(_timm("resnet18"), d),
                                       "torchvision.models:resnet18"),
    "timm-vit-resize-pos-embed": Case("timm-vit-resize-pos-embed.yaml", lambda d: _save(pretrained_like(cm.timm_vit()).state_dict(), d),
                                      "conversion_models:timm_vit_64"),
    "timm-vit-to-torchvision": Case("timm-vit-to-torchvision.yaml", lambda d: _save(pretrained_like(cm.timm_vit()).state_dict(), d),
                                    "conversion_models:torchvision_vit"),
    "torchvision-resnet-finetune": Case("torchvision-resnet-finetune.yaml", lambda d: _save(_resnet18(), d), "torchvision.models:resnet18"),
    "unwrap-ddp-compile": Case("unwrap-ddp-compile.yaml", lambda d: _save({f"module._orig_mod.{k}": v for k, v in _resnet18().items()}, d),
                               "torchvision.models:resnet18"),
    # a run that fails: the DDP checkpoint without the strip_prefix step it needs
    "finetune-ddp-fails": Case("torchvision-resnet-finetune.yaml", lambda d: _save({f"module.{k}": v for k, v in _resnet18().items()}, d),
                               "torchvision.models:resnet18"),
}  # fmt: skip


#: Shipped configs whose reports are pinned elsewhere, because a case here gives one --source.
ELSEWHERE = {
    "clip-two-towers.yaml": "tests/test_several_sources_cli.py (two sources)",
    "merge-lora.yaml": "tests/test_peft_conversion.py (base and adapter beside an adapter_config.json)",
}


def test_every_shipped_config_has_a_case() -> None:
    assert {c.config for c in CASES.values()} | set(ELSEWHERE) == {p.name for p in CONFIGS.glob("*.yaml")}


def _run(tmp_path: Path, case: Case, *flags: str) -> tuple[int, str, dict[str, Any]]:
    """``remap apply CONFIG --source S --target T --report R FLAGS``: exit code, the text printed, the JSON."""
    report = tmp_path / "report.json"
    argv = ["apply", str(CONFIGS / case.config), "--source", case.source(tmp_path), "--report", str(report), *flags]
    if case.target is not None:
        argv += ["--target", case.target]
    out = io.StringIO()
    from contextlib import redirect_stdout

    with redirect_stdout(out):
        code = main(argv)
    return code, out.getvalue(), json.loads(report.read_text())


# --------------------------------------------------------------------------- reading the text


def _blocks(text: str) -> dict[str, list[str]]:
    """The text's sections (blank-line separated), by their title's first word."""
    blocks: dict[str, list[str]] = {}
    for block in text.split("\n\n"):
        lines = block.splitlines()
        blocks[lines[0].split()[0].rstrip(":")] = lines
    return blocks


STATUS_LINE = re.compile(r"^  ([a-z_]+) +(\d+)(?:  (.*))?$")


def _status_lines(lines: list[str]) -> list[tuple[str, int, str]]:
    """``(word, count, note)`` of a section's status lines (the only lines indented by two)."""
    return [(m[1], int(m[2]), m[3] or "") for line in lines[1:] if (m := STATUS_LINE.match(line))]


def _sums(rows: list[tuple[str, int, str]]) -> Counter[str]:
    sums: Counter[str] = Counter()
    for word, n, _ in rows:
        sums[word] += n
    return sums


def _step_counts(lines: list[str]) -> list[int]:
    """The ``matched`` column of the Steps table, row by row."""
    rows = lines[2:]  # the title, the column heads
    return [int(re.sub(r"  matched nothing.*$", "", row).split()[-1]) for row in rows]


def check_text_against_json(text: str, report: dict[str, Any]) -> None:
    """Every number the text prints is the JSON's, and each section adds up to its count."""
    t = report["totals"]
    statuses = Counter(r["status"] for r in report["targets"].values())
    fates = Counter(r["fate"] for r in report["sources"].values())
    blocks = _blocks(text)

    if "Steps" in blocks:
        expected = []
        for step in report["steps"]:
            patterns = step["patterns"]
            expected += [p["matched"] for p in patterns] if len(patterns) > 1 else [step["matched"]]
        assert _step_counts(blocks["Steps"]) == expected

    target = blocks["Target"]
    m = re.fullmatch(r"Target keys: (\d+)(?: \(and (\d+) tied alias(?:es)?\))?", target[0])
    assert m, target[0]
    assert (int(m[1]), int(m[2] or 0)) == (t["target_keys"], statuses["tied"])
    rows = _status_lines(target)
    sums = _sums(rows)
    assert {w: sums[w] for w in ("loaded", "missing", "mismatched", "tied")} == {
        "loaded": t["loaded"], "missing": t["missing"], "mismatched": t["mismatched"], "tied": statuses["tied"]}  # fmt: skip
    assert sum(n for w, n in sums.items() if w != "tied") == t["target_keys"]
    if t["loaded"]:
        note = next(note for w, _, note in rows if w == "loaded")
        assert note == f"{format_count(t['loaded_elements'])} params"

    source = blocks["Source"]
    assert source[0] == f"Source keys: {t['source_keys']}"
    rows = _status_lines(source)
    sums = _sums(rows)
    assert {w: sums[w] for w in ("used", "dropped", "unused")} == {"used": t["used"], "dropped": t["dropped"], "unused": t["unused"]}
    assert sum(sums.values()) == t["source_keys"]
    used_note = next((note for w, _, note in rows if w == "used"), "")
    duplicates = re.match(r"incl\. (\d+) duplicates? of a tied parameter", used_note)
    assert (int(duplicates[1]) if duplicates else 0) == fates["duplicate"]
    assert sum(n for w, n, note in rows if w == "unused" and note.startswith("skipped")) == fates["skipped"]

    totals = blocks["Totals"]
    tied = f"; {statuses['tied']} tied alias{'es' if statuses['tied'] > 1 else ''}" if statuses["tied"] else ""
    duplicate = f" ({fates['duplicate']} duplicate{'s' if fates['duplicate'] > 1 else ''})" if fates["duplicate"] else ""
    skipped = f" ({fates['skipped']} skipped)" if fates["skipped"] else ""
    assert totals[1:] == [
        f"  target  {t['target_keys']} keys: {t['loaded']} loaded, {t['missing']} missing, {t['mismatched']} mismatched{tied}",
        f"  source  {t['source_keys']} keys: {t['used']} used{duplicate}, {t['dropped']} dropped, {t['unused']} unused{skipped}",
        f"  params  {format_count(t['param_elements'])} elements, {format_count(t['loaded_elements'])} loaded "
        f"({format_percent(t['loaded_fraction'])})",
    ]
    assert t["loaded"] + t["missing"] + t["mismatched"] == t["target_keys"]
    assert t["used"] + t["dropped"] + t["unused"] == t["source_keys"]

    froze = t["frozen_params"] or report["freeze"]["batchnorm"] != "keep"
    refused = not report["ok"] and any(f["kind"] != "verify" for f in report["failures"])
    assert ("Freeze" in blocks) == (froze and not refused)
    if "Freeze" in blocks:
        tensors = lambda n: f"{n} tensor{'' if n == 1 else 's'}"  # noqa: E731
        assert blocks["Freeze"][0] == (
            f"Freeze: frozen {format_count(t['frozen_elements'])} params ({tensors(t['frozen_params'])}), "
            f"trainable {format_count(t['trainable_elements'])} ({tensors(t['trainable_params'])})"
        )


@pytest.mark.parametrize("flags", [(), ("--dry-run",), ("--verbose",)], ids=["apply", "dry-run", "verbose"])
@pytest.mark.parametrize("name", list(CASES))
def test_text_counts_are_the_json_counts(tmp_path: Path, name: str, flags: tuple[str, ...]) -> None:
    code, text, report = _run(tmp_path, CASES[name], *flags)
    assert code == (0 if report["ok"] else 1), text
    assert report["ok"] == (name != "finetune-ddp-fails")
    check_text_against_json(text.rstrip("\n"), report)


def test_gpt2_counts_agree_with_the_tied_head(tmp_path: Path) -> None:
    """The run of the issue: 28 target keys and the tied lm_head beside them, 29 source
    keys of which one is the checked duplicate; every line says so the same way."""
    code, text, report = _run(tmp_path, CASES["hf-gpt2-factory"])
    assert code == 0 and report["source"]["kind"] == "factory"
    assert report["totals"]["target_keys"] == 28 and report["totals"]["used"] == 29
    lines = text.splitlines()
    assert "Target keys: 28 (and 1 tied alias)" in lines
    assert "  tied           1  loaded through the name they are tied to" in lines
    assert "    lm_head.weight = transformer.wte.weight" in lines
    assert "  used          29  incl. 1 duplicate of a tied parameter, checked equal" in lines
    assert "  target  28 keys: 28 loaded, 0 missing, 0 mismatched; 1 tied alias" in lines
    assert "  source  29 keys: 29 used (1 duplicate), 0 dropped, 0 unused" in lines


# --------------------------------------------------------------------------- sections that carry information


def test_no_freeze_section_without_freeze_rules(tmp_path: Path) -> None:
    code, text, report = _run(tmp_path, CASES["unwrap-ddp-compile"])
    assert code == 0 and report["freeze"] == {"batchnorm": "keep", "batchnorm_modules": []}
    assert not any(line.startswith(("Freeze", "  batchnorm:")) for line in text.splitlines())


def test_freeze_section_when_it_froze(tmp_path: Path) -> None:
    code, text, report = _run(tmp_path, CASES["torchvision-resnet-finetune"])
    assert code == 0
    lines = text.splitlines()
    i = lines.index("Freeze: frozen 11.2M params (60 tensors), trainable 5.1K (2 tensors)")
    assert lines[i + 1 : i + 3] == ["  trainable: fc.{bias, weight}", "  batchnorm: frozen (20 modules)"]
    assert report["totals"]["frozen_params"] == 60 and len(report["freeze"]["batchnorm_modules"]) == 20


def test_no_freeze_section_on_a_refused_run(tmp_path: Path) -> None:
    """The DDP checkpoint fails before the module is touched: nothing was frozen."""
    code, text, report = _run(tmp_path, CASES["finetune-ddp-fails"])
    assert code == 1 and report["totals"]["loaded"] == 0
    assert "Freeze" not in text
    assert text.splitlines()[0].startswith("NOT LOADED  ")


def test_header_shows_the_factory_call() -> None:
    report = remap.report.records.Report(
        dry_run=True,
        source={"kind": "factory", "factory": "timm:create_model", "args": ["resnet18"], "kwargs": {"pretrained": False}},
        target={"kind": "module", "class": "timm.models.resnet.ResNet", "factory": "timm:create_model",
                "args": ["resnet18"], "kwargs": {"num_classes": 10}},
    )  # fmt: skip
    assert format_report(report).splitlines()[0] == (
        "DRY RUN  timm:create_model('resnet18', pretrained=False) -> timm:create_model('resnet18', num_classes=10)"
    )


# --------------------------------------------------------------------------- a Report in Python


def _vit_report() -> remap.Report:
    return remap.load(cm.torchvision_vit(), pretrained_like(cm.timm_vit()).state_dict(), rules=CONFIGS / "timm-vit-to-torchvision.yaml")


def test_print_report_is_the_cli_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = _vit_report()
    print(report)
    out = capsys.readouterr().out
    assert out == format_report(report) + "\n"
    # the module was passed in, not built from the rules' target.model: the header names its class
    assert out.splitlines()[0] == "APPLIED  state_dict -> torchvision.models.vision_transformer.VisionTransformer"
    assert out.splitlines()[-1] == "OK: loaded as declared"
    assert len(out) < 5000


def test_repr_is_one_line() -> None:
    report = _vit_report()
    assert repr(report) == "<Report ok: 32 of 32 target keys loaded; 32 source keys: 32 used, 0 dropped, 0 unused>"
    rules = {"version": 1, "rules": [{"rename": {"^a\\.": "x.", "^typo\\.": "y."}}]}
    failed = remap.plan({"x.w": (2,)}, {"a.w": (2,), "b.w": (2,)}, rules).report
    assert repr(failed) == (
        "<Report FAILED (unmatched_step, unused), dry run: 1 of 1 target keys loaded; 2 source keys: 1 used, 0 dropped, 1 unused>"
    )


def test_rich_draws_the_report_in_colour() -> None:
    from rich.console import Console

    report = _vit_report()
    console = Console(file=io.StringIO(), width=100, force_terminal=True, color_system="standard", record=True)
    console.print(report)
    assert console.export_text(clear=False).rstrip("\n") == format_report(report)
    assert "\x1b[1;32mOK: loaded as declared\x1b[0m" in console.file.getvalue()  # type: ignore[attr-defined]


def test_ipython_and_jupyter_show_the_summary() -> None:
    report = _vit_report()
    html = report._repr_html_()
    assert html.startswith("<pre") and "OK: loaded as declared" in html and "color" in html

    class Printer:
        def __init__(self) -> None:
            self.text_out = ""

        def text(self, s: str) -> None:
            self.text_out += s

    printer = Printer()
    report._repr_pretty_(printer, cycle=False)
    assert printer.text_out == str(report)


def test_report_module_does_not_import_rich() -> None:
    import subprocess
    import sys

    code = "import sys, remap.report.records; print('rich' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# --------------------------------------------------------------------------- many patterns


VIT_RULES = CONFIGS / "timm-vit-to-torchvision.yaml"


def test_steps_table_has_a_row_per_pattern() -> None:
    report = _vit_report()
    lines = format_report(report, width=120).splitlines()
    i = lines.index("Steps")
    assert lines[i + 1 : i + 15] == [
        "  #  step                                                                  matched",
        "  1  rename '^blocks\\.(\\d+)\\.' -> 'encoder.layers.encoder_layer_\\1.'            24",
        "  2  rename '\\.norm1\\.' -> '.ln_1.'                                              4",
        "            '\\.attn\\.qkv\\.(weight|bias)$' -> '.self_attention.in_proj_\\1'        4",
        "            '\\.attn\\.proj\\.' -> '.self_attention.out_proj.'                      4",
        "            '\\.norm2\\.' -> '.ln_2.'                                              4",
        "            '\\.mlp\\.fc1\\.' -> '.mlp.0.'                                          4",
        "            '\\.mlp\\.fc2\\.' -> '.mlp.3.'                                          4",
        "  3  rename '^cls_token$' -> 'class_token'                                       1",
        "            '^pos_embed$' -> 'encoder.pos_embedding'                             1",
        "            '^patch_embed\\.proj\\.' -> 'conv_proj.'                               2",
        "            '^norm\\.' -> 'encoder.ln.'                                           2",
        "            '^head\\.' -> 'heads.head.'                                           2",
        "",
    ]
    assert [[p["matched"] for p in s["patterns"]] for s in report.to_dict()["steps"]] == [[24], [4] * 6, [1, 1, 2, 2, 2]]


def test_a_dead_pattern_among_many_is_its_own_row() -> None:
    rules = {"version": 1, "rules": [{"rename": {"^a\\.": "x.", "^typo\\.": "y.", "^b\\.": "z."}}]}
    plan = remap.plan({"x.w": (2,), "z.w": (2,)}, {"a.w": (2,), "b.w": (2,)}, rules)
    lines = format_report(plan.report).splitlines()
    i = lines.index("Steps")
    assert lines[i + 1 : i + 5] == [
        "  #  step                      matched",
        "  1  rename '^a\\.' -> 'x.'           1",
        "            '^typo\\.' -> 'y.'        0  matched nothing",
        "            '^b\\.' -> 'z.'           1",
    ]


def test_explain_names_only_the_pattern_that_acted() -> None:
    plan = remap.plan(cm.torchvision_vit(), pretrained_like(cm.timm_vit()).state_dict(), VIT_RULES)
    assert plan.explain("blocks.1.attn.qkv.weight") == "\n".join([
        "source 'blocks.1.attn.qkv.weight' [192, 64] float32",
        "  step 1 (rename '^blocks\\.(\\d+)\\.' -> 'encoder.layers.encoder_layer_\\1.'): -> 'encoder.layers.encoder_layer_1.attn.qkv.weight'",
        "  step 2 (rename '\\.attn\\.qkv\\.(weight|bias)$' -> '.self_attention.in_proj_\\1', pattern 2 of 6): "
        "-> 'encoder.layers.encoder_layer_1.self_attention.in_proj_weight'",
        "  => loaded into 'encoder.layers.encoder_layer_1.self_attention.in_proj_weight'",
    ])  # fmt: skip


def test_explain_of_a_drop_names_the_pattern_that_dropped() -> None:
    rules = {"version": 1, "rules": [{"drop": ["^a\\.", "^b\\."]}, {"transpose": ["^x$", "^c\\.w$"]}]}
    plan = remap.plan({"c.w": (3, 2)}, {"a.w": (2,), "b.w": (2,), "c.w": (2, 3)}, rules)
    assert plan.explain("b.w") == "source 'b.w' [2] float32\n  => dropped by step 1 (drop '^b\\.', pattern 2 of 2)"
    assert plan.explain("c.w").splitlines()[-2:] == [
        "  step 2 (transpose(-2, -1) on '^c\\.w$', pattern 2 of 2): (tensor op)",
        "  => loaded into 'c.w'",
    ]
