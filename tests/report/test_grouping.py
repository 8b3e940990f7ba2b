"""Folding key lists: exact strings for every fold, and the folds that must not happen."""

from __future__ import annotations

import time

import pytest

from remap.report.grouping import KeyGroup, fold_keys, format_indices, group_counts, group_keys


def _nested(stages: dict[int, int], leaf: str = "norm.weight") -> list[str]:
    return [f"stages.{s}.blocks.{b}.{leaf}" for s, n in stages.items() for b in range(n)]


GROUPING_CASES = [
    pytest.param([], [], id="empty"),
    pytest.param(["fc.weight"], ["fc.weight"], id="single key"),
    pytest.param(["weight", "bias"], ["weight", "bias"], id="no dots stay apart"),
    pytest.param(["0", "1", "2"], ["0", "1", "2"], id="no dots, integers, stay apart"),
    pytest.param(["fc.weight", "fc.bias"], ["fc.{bias, weight}"], id="siblings sorted"),
    pytest.param(
        ["conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "fc.weight"],
        ["conv1.weight", "bn1.{bias, running_mean, weight}", "fc.weight"],
        id="siblings keep first-appearance order",
    ),
    pytest.param(
        ["a.x", "b.y", "a.z"],
        ["a.{x, z}", "b.y"],
        id="siblings apart in the input still fold at the first one",
    ),
    pytest.param(
        [f"layers.{i}.attn.qkv.{p}" for i in range(12) for p in ("weight", "bias")],
        ["layers.{0..11}.attn.qkv.{bias, weight}"],
        id="contiguous run",
    ),
    pytest.param(["blocks.0.w", "blocks.2.w", "blocks.5.w"], ["blocks.{0, 2, 5}.w"], id="non-contiguous"),
    pytest.param(
        [f"h.{i}.w" for i in (0, 1, 2, 3, 7)],
        ["h.{0..3, 7}.w"],
        id="mixed run and single",
    ),
    pytest.param(["h.0.w", "h.1.w"], ["h.{0, 1}.w"], id="two in a row are listed, not a range"),
    pytest.param(["h.3.w"], ["h.3.w"], id="one index stays literal"),
    pytest.param(["layers.0.x", "layers.1.y"], ["layers.0.x", "layers.1.y"], id="different structure: no fold"),
    pytest.param(
        ["layers.0.x", "layers.0.y", "layers.1.x"],
        ["layers.0.{x, y}", "layers.1.x"],
        id="index 1 lacks y: no fold",
    ),
    pytest.param(
        _nested({0: 3, 1: 3, 2: 3, 3: 3}),
        ["stages.{0..3}.blocks.{0..2}.norm.weight"],
        id="nested complete",
    ),
    pytest.param(
        _nested({0: 3, 1: 3, 2: 3, 3: 2}),
        ["stages.{0..2}.blocks.{0..2}.norm.weight", "stages.3.blocks.{0, 1}.norm.weight"],
        id="nested, last stage shorter, kept apart",
    ),
    pytest.param(
        _nested({0: 2, 1: 2, 2: 4, 3: 4}),
        ["stages.{0, 1}.blocks.{0, 1}.norm.weight", "stages.{2, 3}.blocks.{0..3}.norm.weight"],
        id="nested, two shapes of stage",
    ),
    pytest.param(
        [f"pos.{i}" for i in (0, 1, 2, 10)],
        ["pos.{0..2, 10}"],
        id="integer leaves sort as numbers",
    ),
    pytest.param(["x.7", "x.07"], ["x.{7, 07}"], id="07 is a name, not 7"),
    pytest.param(["a.b", "a.b"], ["a.b"], id="duplicates collapse"),
    pytest.param(["a..b", "a..c"], ["a..{b, c}"], id="empty components kept"),
    pytest.param(
        [f"layer1.{b}.{m}.{p}" for b in range(3) for m in ("conv1", "bn1") for p in ("weight", "bias")]
        + ["layer1.0.downsample.0.weight"],
        ["layer1.{0..2}.conv1.{bias, weight}", "layer1.{0..2}.bn1.{bias, weight}", "layer1.0.downsample.0.weight"],
        id="resnet block with a downsample in block 0 only",
    ),
    pytest.param(
        [f"m.layers.{i}.experts.{e}.w" for i in range(2) for e in range(4)] + ["m.layers.2.experts.0.w"],
        ["m.layers.{0, 1}.experts.{0..3}.w", "m.layers.2.experts.0.w"],
        id="nested, a lone inner index stays literal",
    ),
]


@pytest.mark.parametrize(("keys", "expected"), GROUPING_CASES)
def test_group_keys(keys: list[str], expected: list[str]) -> None:
    assert group_keys(keys) == expected


@pytest.mark.parametrize(("keys", "expected"), GROUPING_CASES)
def test_every_key_in_exactly_one_group(keys: list[str], expected: list[str]) -> None:
    groups = fold_keys(keys)
    flat = [k for g in groups for k in g.keys]
    assert sorted(flat) == sorted(set(keys))
    assert [g.text for g in groups] == expected


@pytest.mark.parametrize(
    ("indices", "expected"),
    [([], ""), ([4], "4"), ([0, 1], "0, 1"), ([0, 1, 2], "0..2"), ([5, 0, 2, 1, 3, 9, 10, 11], "0..3, 5, 9..11")],
)
def test_format_indices(indices: list[int], expected: str) -> None:
    assert format_indices(indices) == expected


def test_group_counts_and_members() -> None:
    keys = ["a.0.w", "a.1.w", "b", "a.2.w"]
    assert group_counts(keys) == [("a.{0..2}.w", 3), ("b", 1)]
    assert fold_keys(keys)[0] == KeyGroup("a.{0..2}.w", ("a.0.w", "a.1.w", "a.2.w"))


def test_accepts_any_iterable() -> None:
    assert group_keys(f"l.{i}.w" for i in range(3)) == ["l.{0..2}.w"]


def test_folds_are_honest_on_a_ragged_model() -> None:
    """Expanding every folded text gives back exactly the keys it stands for."""
    keys = [f"s.{s}.b.{b}.{p}" for s in range(5) for b in range(s + 1) for p in ("w", "b")] + ["s.2.extra"]
    for group in fold_keys(keys):
        assert sorted(_expand(group.text)) == sorted(group.keys), group.text


def _expand(text: str) -> list[str]:
    """Expand ``a.{0..2}.{x, y}`` into every key it names (test helper)."""
    head, brace, rest = text.partition("{")
    if not brace:
        return [text]
    inside, _, tail = rest.partition("}")
    options: list[str] = []
    for part in inside.split(", "):
        lo, dots, hi = part.partition("..")
        if dots:
            options.extend(str(i) for i in range(int(lo), int(hi) + 1))
        else:
            options.append(part)
    return [head + o + t for o in options for t in _expand(tail)]


@pytest.mark.parametrize(
    "keys",
    [
        pytest.param([f"blocks.{i}.mlp.experts.{e}.{w}.weight" for i in range(40) for e in range(128) for w in "ud"][:10_000], id="moe"),
        pytest.param([f"k{i}.x{i % 7}.{i % 13}.w" for i in range(10_000)], id="nothing folds"),
    ],
)
def test_ten_thousand_keys_are_fast(keys: list[str]) -> None:
    best = min(_timed(keys) for _ in range(2))
    assert best < 0.5  # typically 30-50 ms; generous for loaded CI machines


def _timed(keys: list[str]) -> float:
    start = time.perf_counter()
    group_keys(keys)
    return time.perf_counter() - start
