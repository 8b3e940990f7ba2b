"""Drawing reports: pinned plain text for small hand-made reports, and the size of a big one.

Reports are built straight from the dataclasses in remap.report.records; nothing here needs torch.
"""

from __future__ import annotations

import io
import math
import re

import pytest
from rich.console import Console

from remap.planning.planner import totals_of
from remap.report.render import format_count, format_percent, format_report, format_shape, print_report, verdict
from remap.report.records import (
    DROPPED,
    DUPLICATE,
    LOADED,
    MISMATCHED,
    MISSING,
    SKIPPED,
    TIED,
    UNUSED,
    USED,
    Failure,
    FreezeRecord,
    Report,
    SourceRecord,
    StepRecord,
    TargetRecord,
    Totals,
)

ANSI = re.compile(r"\x1b\[")


# ------------------------------------------------------------------ report builders


def _param(key: str, shape: tuple[int, ...], **kw: object) -> TargetRecord:
    kw.setdefault("kind", "parameter")
    return TargetRecord(key, kw.pop("status", LOADED), shape, "float32", numel=math.prod(shape), **kw)  # type: ignore[arg-type]


def _totals(targets: tuple[TargetRecord, ...], sources: tuple[SourceRecord, ...]) -> Totals:
    """The totals the planner computes from these records (a tied alias is no key of its
    own, a duplicate counts as used, a skipped key as unused): what the JSON says."""
    return totals_of(list(targets), list(sources))


def small_report() -> Report:
    """A DDP checkpoint into a model with a new head: the head is declared missing, one
    source key is left unused (undeclared) and a rename step matched nothing."""
    targets = (
        _param("conv1.weight", (64, 3, 7, 7), sources=("module.conv1.weight",), trainable=False),
        _param("bn1.weight", (64,), sources=("module.bn1.weight",), trainable=False),
        _param("bn1.bias", (64,), sources=("module.bn1.bias",), trainable=False),
        _param("bn1.running_mean", (64,), sources=("module.bn1.running_mean",), kind="buffer"),
        _param("bn1.running_var", (64,), sources=("module.bn1.running_var",), kind="buffer"),
        _param("head.weight", (10, 64), status=MISSING, declared=True, trainable=True),
        _param("head.bias", (10,), status=MISSING, declared=True, trainable=True),
    )
    sources = tuple(
        SourceRecord("module." + t.key, USED, t.shape, "float32", targets=(t.key,), final_key=t.key)
        for t in targets
        if t.status == LOADED
    ) + (
        SourceRecord("module.bn1.num_batches_tracked", DROPPED, (), "int64", final_key="bn1.num_batches_tracked", step=2, step_kind="drop"),
        SourceRecord("module.fc.weight", DROPPED, (1000, 64), "float32", final_key="fc.weight", step=2, step_kind="drop"),
        SourceRecord("module.fc.bias", DROPPED, (1000,), "float32", final_key="fc.bias", step=2, step_kind="drop"),
        SourceRecord("module.extra.scale", UNUSED, (1,), "float32", final_key="extra.scale"),
    )
    steps = (
        StepRecord(1, "strip_prefix", "strip_prefix 'module.'", 9, patterns=(("module.", 9),), where="rules.yaml:4:5"),
        StepRecord(2, "drop", r"drop '\.num_batches_tracked$', '^fc\.'", 3,
                   patterns=((r"\.num_batches_tracked$", 1), (r"^fc\.", 2)), where="rules.yaml:5:5"),  # fmt: skip
        StepRecord(3, "rename", r"rename '^encoder\.' -> 'backbone.'", 0, patterns=((r"^encoder\.", 0),), where="rules.yaml:6:5"),
    )
    failures = (
        Failure("unmatched_step", r"step 3 (rename) (rules.yaml:6:5): '^encoder\.' matched no key"),
        Failure("unused", "1 source key(s) reach no target key:\n  module.extra.scale", ("module.extra.scale",)),
    )
    return Report(
        dry_run=False,
        source={"kind": "file", "path": "ckpt/r18.pth", "format": "torch", "key": "state_dict", "key_detected": False},
        target={"kind": "module", "class": "tests.models.Tiny", "factory": "tests.models:tiny"},
        rules="rules.yaml",
        steps=steps,
        targets=targets,
        sources=sources,
        failures=failures,
        totals=_totals(targets, sources),
        freeze=FreezeRecord("frozen", ("bn1",)),
    )


SMALL_REPORT_TEXT = r"""
NOT LOADED  ckpt/r18.pth (torch, key "state_dict") -> tests.models:tiny
rules: rules.yaml

Steps
  #  step                                matched
  1  strip_prefix 'module.'                    9
  2  drop '\.num_batches_tracked$'             1
          '^fc\.'                              2
  3  rename '^encoder\.' -> 'backbone.'        0  matched nothing (rules.yaml:6:5)

Target keys: 7
  loaded         5  9.5K params
    module.* -> *  (5 keys)
      conv1.weight
      bn1.{bias, running_mean, running_var, weight}
  missing        2  declared
    head.{bias, weight}

Source keys: 9
  used           5
  dropped        3
    by step 2 (drop): 3 keys
      module.bn1.num_batches_tracked
      module.fc.{bias, weight}
  unused         1  not declared
    module.extra.scale -> extra.scale

Totals
  target  7 keys: 5 loaded, 2 missing, 0 mismatched
  source  9 keys: 5 used, 3 dropped, 1 unused
  params  10.2K elements, 9.5K loaded (93.6%)

Failures (2)
  unmatched_step: step 3 (rename) (rules.yaml:6:5): '^encoder\.' matched no key
  unused: 1 source key(s) reach no target key:
      module.extra.scale

FAILED: 2 checks failed (unmatched_step, unused)
""".strip("\n")


def transfer_report() -> Report:
    """A conversion between two implementations: renames, a split, a merge, an op, shape
    mismatches (one declared), a tied alias, skipped and duplicate sources; dry run, OK."""
    targets: list[TargetRecord] = []
    sources: list[SourceRecord] = []
    for i in range(4):
        for p in ("weight", "bias"):
            qkv = f"blocks.{i}.attn.qkv.{p}"
            for name in ("q", "k"):
                targets.append(_param(f"blocks.{i}.attn.{name}.{p}", (8,), sources=(qkv,), ops=("split",), trainable=True))
            old = "gamma" if p == "weight" else "beta"
            targets.append(_param(f"blocks.{i}.norm.{p}", (8,), sources=(f"blocks.{i}.ln.{old}",), trainable=True))
            sources.append(SourceRecord(qkv, USED, (16,), "float32", targets=(f"blocks.{i}.attn.q.{p}", f"blocks.{i}.attn.k.{p}")))
            sources.append(SourceRecord(f"blocks.{i}.ln.{old}", USED, (8,), "float32", targets=(f"blocks.{i}.norm.{p}",)))
        fc = f"blocks.{i}.mlp.fc.weight"
        targets.append(_param(fc, (8, 8), sources=(fc,), ops=("transpose",), trainable=True))
        sources.append(SourceRecord(fc, USED, (8, 8), "float32", targets=(fc,)))
        merged = tuple(f"blocks.{i}.proj.{x}_proj.weight" for x in "qkv")
        targets.append(_param(f"blocks.{i}.proj.in_proj_weight", (24, 8), sources=merged, ops=("merge",), trainable=True))
        sources.extend(SourceRecord(m, USED, (8, 8), "float32", targets=(f"blocks.{i}.proj.in_proj_weight",)) for m in merged)
    targets += [
        _param("pos_embed", (1, 197, 768), status=MISMATCHED, sources=("pos_embed",), source_shape=(1, 577, 768), declared=True),
        _param("head.weight", (10, 768), status=MISMATCHED, sources=("classifier.weight",), source_shape=(1000, 768), declared=True),
        _param("lm_head.weight", (10, 8), status=TIED, tied_to="embed.weight"),
    ]
    sources += [
        SourceRecord("pos_embed", SKIPPED, (1, 577, 768), "float32", targets=("pos_embed",)),
        SourceRecord("classifier.weight", SKIPPED, (1000, 768), "float32", targets=("head.weight",), final_key="head.weight"),
        SourceRecord("lm_head.weight", DUPLICATE, (10, 8), "float32", targets=("lm_head.weight",)),
        SourceRecord("dist_token", UNUSED, (1, 1, 768), "float32", final_key="dist_token", declared=True),
    ]
    return Report(
        dry_run=True,
        source={"kind": "factory", "factory": "timm.models:vit_tiny"},
        target={"kind": "metadata", "keys": len(targets)},
        targets=tuple(targets),
        sources=tuple(sources),
        warnings=("8 tensor(s) will be cast from float16 to float32 by load_state_dict",),
        totals=_totals(tuple(targets), tuple(sources)),
    )


def resnet50_report(*, prefix: str = "module.") -> Report:
    """torchvision's resnet50 (320 keys) from a DDP checkpoint into a 10-class model."""
    keys: list[tuple[str, tuple[int, ...]]] = [("conv1.weight", (64, 3, 7, 7)), *_bn("bn1", 64)]
    cin = 64
    for layer, (blocks, width) in enumerate([(3, 64), (4, 128), (6, 256), (3, 512)], 1):
        for b in range(blocks):
            p = f"layer{layer}.{b}"
            keys += [(f"{p}.conv1.weight", (width, cin if b == 0 else 4 * width, 1, 1)), *_bn(f"{p}.bn1", width)]
            keys += [(f"{p}.conv2.weight", (width, width, 3, 3)), *_bn(f"{p}.bn2", width)]
            keys += [(f"{p}.conv3.weight", (4 * width, width, 1, 1)), *_bn(f"{p}.bn3", 4 * width)]
            if b == 0:
                keys += [(f"{p}.downsample.0.weight", (4 * width, cin, 1, 1)), *_bn(f"{p}.downsample.1", 4 * width)]
        cin = 4 * width
    targets: list[TargetRecord] = []
    sources: list[SourceRecord] = []
    for key, shape in keys:
        kind = "buffer" if "running" in key or "num_batches" in key else "parameter"
        targets.append(_param(key, shape, sources=(prefix + key,), kind=kind, trainable=False if kind == "parameter" else None))
        sources.append(SourceRecord(prefix + key, USED, shape, "float32", targets=(key,), final_key=key))
    targets += [_param("fc.weight", (10, 2048), status=MISSING, declared=True, trainable=True),
                _param("fc.bias", (10,), status=MISSING, declared=True, trainable=True)]  # fmt: skip
    sources += [SourceRecord(prefix + "fc.weight", DROPPED, (1000, 2048), "float32", final_key="fc.weight", step=2, step_kind="drop"),
                SourceRecord(prefix + "fc.bias", DROPPED, (1000,), "float32", final_key="fc.bias", step=2, step_kind="drop")]  # fmt: skip
    steps = (StepRecord(1, "strip_prefix", f"strip_prefix '{prefix}'", 320), StepRecord(2, "drop", r"drop '^fc\.'", 2))
    return Report(
        dry_run=True,
        source={"kind": "file", "path": "ckpt/resnet50.pth", "format": "torch", "key": "state_dict", "key_detected": True},
        target={"kind": "module", "class": "torchvision.models.resnet.ResNet", "factory": "torchvision.models:resnet50"},
        rules="configs/resnet50.yaml",
        steps=steps,
        targets=tuple(targets),
        sources=tuple(sources),
        totals=_totals(tuple(targets), tuple(sources)),
        freeze=FreezeRecord("frozen", tuple(k.removesuffix(".running_mean") for k, _ in keys if k.endswith(".running_mean"))),
    )


def _bn(prefix: str, c: int) -> list[tuple[str, tuple[int, ...]]]:
    names = ("weight", "bias", "running_mean", "running_var")
    return [(f"{prefix}.{n}", (c,)) for n in names] + [(f"{prefix}.num_batches_tracked", ())]


# ------------------------------------------------------------------------ the tests


def test_small_report_pinned() -> None:
    assert format_report(small_report()) == SMALL_REPORT_TEXT


@pytest.mark.parametrize(
    "line",
    [
        "DRY RUN  timm.models:vit_tiny -> metadata (35 keys)",
        "Steps: none (keys keep their names)",
        "  loaded        32  1.2K params",
        "    blocks.{0..3}.attn.q.{bias, weight} <- blocks.{0..3}.attn.qkv.{bias, weight}  [split]",
        "    blocks.{0..3}.attn.k.{bias, weight} <- blocks.{0..3}.attn.qkv.{bias, weight}  [split]",
        # gamma/beta stay on lines of their own: one folded line would hide which became which
        "    blocks.{0..3}.norm.weight <- blocks.{0..3}.ln.gamma",
        "    blocks.{0..3}.norm.bias <- blocks.{0..3}.ln.beta",
        "    same name  (4 keys)",
        "      blocks.{0..3}.mlp.fc.weight  [transpose]",
        "    blocks.{0..3}.proj.in_proj_weight",
        "      <- blocks.{0..3}.proj.q_proj.weight + blocks.{0..3}.proj.k_proj.weight + blocks.{0..3}.proj.v_proj.weight  [merge]",
        "Target keys: 34 (and 1 tied alias)",
        "  tied           1  loaded through the name they are tied to",
        "    lm_head.weight = embed.weight",
        "  mismatched     2  declared",
        "    pos_embed: checkpoint [1, 577, 768] vs model [1, 197, 768]",
        "    head.weight <- classifier.weight: checkpoint [1000, 768] vs model [10, 768]",
        "Source keys: 36",
        "  used          33  incl. 1 duplicate of a tied parameter, checked equal",
        "  unused         1  declared",
        "    dist_token",
        "  unused         2  skipped: shape differs from the target's",
        "    classifier.weight -> head.weight",
        "  target  34 keys: 32 loaded, 0 missing, 2 mismatched; 1 tied alias",
        "  source  36 keys: 33 used (1 duplicate), 0 dropped, 3 unused (2 skipped)",
        "  params  160.2K elements, 1.2K loaded (0.8%)",  # the tied alias's elements are its first name's
        "Warnings (1)",
        "  8 tensor(s) will be cast from float16 to float32 by load_state_dict",
        "OK: would load as declared (dry run)",
    ],
)
def test_transfer_report_lines(line: str) -> None:
    assert line in format_report(transfer_report()).splitlines()


def test_lines_in_order() -> None:
    lines = format_report(transfer_report()).splitlines()
    order = ["Steps: none", "Target keys: 34", "Source keys: 36", "Totals", "Warnings (1)", "OK: "]
    positions = [next(i for i, line in enumerate(lines) if line.startswith(head)) for head in order]
    assert positions == sorted(positions)
    assert lines[-1] == "OK: would load as declared (dry run)"


def test_resnet50_fits_a_screen() -> None:
    report = resnet50_report()
    assert len(report.targets) == 320 and len(report.sources) == 320
    lines = format_report(report).splitlines()
    assert len(lines) <= 60, "\n".join(lines)
    assert max(len(line) for line in lines) <= 100
    assert "    module.* -> *  (318 keys)" in lines
    assert "      layer1.{0..2}.bn1.{bias, num_batches_tracked, running_mean, running_var, weight}" in lines
    assert "      … and 15 more (verbose shows all)" in lines
    assert "Freeze: frozen 23.5M params (159 tensors), trainable 20.5K (2 tensors)" in lines
    assert "  batchnorm: frozen (53 modules)" in lines
    assert "  params  23.5M elements, 23.5M loaded (99.9%)" in lines


def test_resnet50_verbose_shows_every_group() -> None:
    text = format_report(resnet50_report(), verbose=True)
    assert "more (verbose shows all)" not in text
    assert "      layer4.{0..2}.bn3.{bias, num_batches_tracked, running_mean, running_var, weight}" in text.splitlines()


def test_same_names_are_counted_not_listed() -> None:
    lines = format_report(resnet50_report(prefix="")).splitlines()
    assert "    same name  (318 keys)" in lines
    assert not any(line.startswith("      layer1") for line in lines)
    assert len(lines) < 30
    verbose = format_report(resnet50_report(prefix=""), verbose=True).splitlines()
    assert "      layer1.{0..2}.conv1.weight" in verbose


def test_plain_text_has_no_ansi() -> None:
    for report in (small_report(), transfer_report(), resnet50_report()):
        for verbose in (False, True):
            assert not ANSI.search(format_report(report, verbose=verbose))


def test_width_cuts_the_step_column_only() -> None:
    lines = format_report(small_report(), width=40).splitlines()
    assert "  2  drop '\\.num_batches_tra…        1" in lines
    assert "          '^fc\\.'                    2" in lines
    assert "  3  rename '^encoder\\.' -> …        0  matched nothing (rules.yaml:6:5)" in lines
    assert "      module.bn1.num_batches_tracked" in lines  # keys are never cut


def test_long_arrow_lines_break_before_the_arrow() -> None:
    lines = format_report(transfer_report(), width=80).splitlines()
    assert "    blocks.{0..3}.attn.q.{bias, weight}" in lines
    assert "      <- blocks.{0..3}.attn.qkv.{bias, weight}  [split]" in lines


def test_optional_step_that_matched_nothing_is_not_red_flagged() -> None:
    report = Report(dry_run=True, steps=(StepRecord(1, "drop", "drop 'x'", 0, optional=True),))
    assert "  1  drop 'x'        0  matched nothing (optional)" in format_report(report).splitlines()


def test_pattern_that_matched_nothing_is_named() -> None:
    step = StepRecord(1, "drop", "drop 'a', 'b'", 3, patterns=(("a", 3), ("b", 0)), where="r.yaml:2:3")
    lines = format_report(Report(dry_run=True, steps=(step,))).splitlines()
    assert lines[lines.index("Steps") + 1 :][:3] == [
        "  #  step      matched",
        "  1  drop 'a'        3",
        "          'b'        0  matched nothing (r.yaml:2:3)",
    ]


def test_a_summary_of_another_form_stays_one_row() -> None:
    """Patterns the summary does not end with (a report from elsewhere): the step stays
    whole, and the pattern that matched nothing is named in its note."""
    step = StepRecord(1, "drop", "drop some keys", 3, patterns=(("a", 3), ("b", 0)), where="r.yaml:2:3")
    lines = format_report(Report(dry_run=True, steps=(step,))).splitlines()
    assert "  1  drop some keys        3  matched nothing: b (r.yaml:2:3)" in lines


def test_missing_not_declared_and_unknown_status() -> None:
    targets = (
        _param("encoder.layers.0.w", (2,), status=MISSING),
        _param("encoder.layers.1.w", (2,), status=MISSING),
        _param("head.w", (2,), status=MISSING, declared=True),
        _param("extra.w", (2,), status="reinitialised"),
    )
    lines = format_report(Report(dry_run=True, targets=targets)).splitlines()
    i = lines.index("  missing        2  not declared")
    assert lines[i + 1] == "    encoder.layers.{0, 1}.w"
    assert lines.index("  missing        1  declared") < i  # declared first, the failing ones last
    assert "  reinitialised     1" in lines and "    extra.w" in lines  # a newer status is shown, not hidden


def test_long_lists_are_capped_unless_verbose() -> None:
    targets = tuple(_param(f"head{i}.w", (1,), status=MISSING) for i in range(30))
    lines = format_report(Report(dry_run=True, targets=targets)).splitlines()
    assert "    head19.w" in lines and "    head20.w" not in lines
    assert "    … and 10 more (verbose shows all)" in lines
    assert "    head29.w" in format_report(Report(dry_run=True, targets=targets), verbose=True).splitlines()


def test_dropped_grouped_by_step() -> None:
    sources = (
        SourceRecord("a.num_batches_tracked", DROPPED, (), "int64", step=1, step_kind="drop"),
        SourceRecord("b.num_batches_tracked", DROPPED, (), "int64", step=1, step_kind="drop"),
        SourceRecord("fc.weight", DROPPED, (2,), "float32", step=3, step_kind="keep"),
    )
    lines = format_report(Report(dry_run=True, sources=sources)).splitlines()
    assert lines[lines.index("  dropped        3") + 1 :][:4] == [
        "    by step 1 (drop): 2 keys",
        "      a.num_batches_tracked",
        "      b.num_batches_tracked",
        "    by step 3 (keep): fc.weight",
    ]


def test_failure_keys_shown_when_verbose() -> None:
    report = Report(dry_run=False, failures=(Failure("collision", "two keys end on x.w", ("a.w", "b.w")),))
    assert "    keys: a.w, b.w" not in format_report(report).splitlines()
    assert "    keys: a.w, b.w" in format_report(report, verbose=True).splitlines()


def test_empty_report_renders() -> None:
    """A report with no source or target description still says what it is."""
    text = format_report(Report.empty(dry_run=False))
    assert text.splitlines()[0] == "APPLIED  source -> target"
    assert text.splitlines()[-1] == "OK: loaded as declared"


@pytest.mark.parametrize(
    ("kinds", "expected"),
    [
        ((), "OK: loaded as declared"),
        (("missing",), "FAILED: 1 check failed (missing)"),
        (("missing", "unused"), "FAILED: 2 checks failed (missing, unused)"),
        (("unmatched_step", "unmatched_step", "missing"), "FAILED: 3 checks failed (unmatched_step, missing)"),
    ],
)
def test_verdict(kinds: tuple[str, ...], expected: str) -> None:
    report = Report(dry_run=False, failures=tuple(Failure(k, "m") for k in kinds))
    assert verdict(report) == expected
    assert format_report(report).splitlines()[-1] == expected


@pytest.mark.parametrize(
    ("n", "expected"),
    [(0, "0"), (7, "7"), (999, "999"), (1000, "1K"), (5120, "5.1K"), (23_512_000, "23.5M"),
     (25_557_032, "25.6M"), (999_999, "1M"), (1_300_000_000, "1.3B")],  # fmt: skip
)
def test_format_count(n: int, expected: str) -> None:
    assert format_count(n) == expected


def test_format_shape_and_percent() -> None:
    assert format_shape((1000, 512)) == "[1000, 512]"
    assert format_shape(()) == "[]"
    assert format_percent(1.0) == "100%"
    assert format_percent(0.99999) == "99.9%"  # a shortfall never reads as 100%
    assert format_percent(0.0) == "0.0%"


# ------------------------------------------------------------------------------ rich


def _rich(report: Report, *, terminal: bool, verbose: bool = False) -> Console:
    console = Console(file=io.StringIO(), width=100, force_terminal=terminal, color_system="standard" if terminal else None, record=True)
    print_report(report, console=console, verbose=verbose)
    return console


@pytest.mark.parametrize("make", [small_report, transfer_report, resnet50_report])
def test_rich_shows_the_same_content(make) -> None:  # type: ignore[no-untyped-def]
    console = _rich(make(), terminal=True)
    assert console.export_text(clear=False).rstrip("\n") == format_report(make())


def test_rich_colours_by_status() -> None:
    console = _rich(small_report(), terminal=True)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert ANSI.search(out)
    assert "\x1b[1;31mFAILED: 2 checks failed (unmatched_step, unused)\x1b[0m" in out
    assert "\x1b[32mloaded    \x1b[0m" in out  # green
    assert "\x1b[33mmissing   \x1b[0m" in out  # declared: yellow
    assert "\x1b[1;31munused    \x1b[0m" in out  # not declared: red
    ok = _rich(transfer_report(), terminal=True).file.getvalue()  # type: ignore[attr-defined]
    assert "\x1b[1;32mOK: would load as declared (dry run)\x1b[0m" in ok


def test_rich_without_a_terminal_writes_no_ansi() -> None:
    console = _rich(small_report(), terminal=False)
    assert not ANSI.search(console.file.getvalue())  # type: ignore[attr-defined]


def _renamed_report(pairs: list[tuple[str, str]]) -> Report:
    """Every ``(source, target)`` loaded as it is, under its new name."""
    targets = tuple(_param(new, (4,), sources=(old,), trainable=True) for old, new in pairs)
    sources = tuple(SourceRecord(old, USED, (4,), "float32", targets=(new,), final_key=new) for old, new in pairs)
    return Report(dry_run=True, targets=targets, sources=sources, totals=_totals(targets, sources))


def test_an_index_carried_over_folds_across_layers() -> None:
    """Layers moved into pipeline chunks (a constant index added in front): one line per
    chunk and kind, every layer folded, the constant kept as it is."""
    pairs = [(f"model.layers.{i}.self_attn.q_proj.weight", f"chunks.{i // 4}.layers.{i}.attention.wq.weight") for i in range(8)]
    lines = format_report(_renamed_report(pairs), width=200).splitlines()
    assert "    chunks.0.layers.{0..3}.attention.wq.weight <- model.layers.{0..3}.self_attn.q_proj.weight" in lines
    assert "    chunks.1.layers.{4..7}.attention.wq.weight <- model.layers.{4..7}.self_attn.q_proj.weight" in lines


def test_a_changed_index_is_never_folded_away() -> None:
    """Two layers swapped: folding both sides would read as if nothing moved."""
    lines = format_report(_renamed_report([("layers.0.w", "blocks.1.w"), ("layers.1.w", "blocks.0.w")]), width=200).splitlines()
    assert "    blocks.1.w <- layers.0.w" in lines and "    blocks.0.w <- layers.1.w" in lines
