"""``include: [name]``: shipped rule fragments whose steps go in front of a file's own,
named in labels and locations; errors in a fragment name its file and line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from remap.errors import RulesError
from remap.planning.planner import make_plan
from remap.rules import parse as parse_module
from remap.rules.parse import fragments, load_rules, parse_rules

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "src" / "remap" / "rules" / "fragments"
KERAS = SHIPPED / "keras-layout.yaml"


def error(rules: str | dict, filename: str = "r.yaml") -> str:
    with pytest.raises(RulesError) as exc:
        parse_rules(rules, filename=filename)
    return str(exc.value)


@pytest.fixture
def own_fragments(tmp_path, monkeypatch):
    """Fragments written by the test in place of the shipped ones: name -> text."""

    def install(**texts: str) -> Path:
        for name, text in texts.items():
            (tmp_path / f"{name}.yaml").write_text(text)
        monkeypatch.setattr(parse_module, "fragments", lambda: {p.stem: p for p in sorted(tmp_path.glob("*.yaml"))})
        parse_module._parse_text.cache_clear()  # the same rules text now includes other fragments
        return tmp_path

    yield install
    parse_module._parse_text.cache_clear()


# --------------------------------------------------------------------------- the shipped fragments


def test_shipped_fragments_are_listed_from_the_package() -> None:
    found = fragments()
    assert "keras-layout" in found and list(found) == sorted(p.stem for p in SHIPPED.glob("*.yaml"))
    assert Path(str(found["keras-layout"])).resolve() == KERAS.resolve()


def test_fragments_ship_as_package_data() -> None:
    """pyproject's package-data takes every fragment into the wheel (the glob covers them all)."""
    tomllib = pytest.importorskip("tomllib") if sys.version_info >= (3, 11) else pytest.importorskip("tomli")
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    package = ROOT / "src" / "remap" / "rules"
    shipped = {p for glob in data["remap.rules"] for p in package.glob(glob)}
    assert shipped == set(SHIPPED.glob("*.yaml")) and shipped


def test_every_line_of_keras_layout_says_why() -> None:
    lines = KERAS.read_text().splitlines()
    code = [line for line in lines if line.strip() and not line.lstrip().startswith("#")]
    assert code and all(" # " in line for line in code), [line for line in code if " # " not in line]


def test_keras_layout_on_keras_shapes() -> None:
    """The fragment on keys and shapes as the Keras reader gives them, planned onto PyTorch's."""
    source = {
        "conv2d.kernel": [3, 3, 3, 8], "conv2d.bias": [8],
        "batch_normalization.gamma": [8], "batch_normalization.beta": [8],
        "batch_normalization.moving_mean": [8], "batch_normalization.moving_variance": [8],
        "embedding.embeddings": [11, 6], "layer_normalization.gamma": [6], "layer_normalization.beta": [6],
        "dense.kernel": [8, 4], "dense.bias": [4],
    }  # fmt: skip
    target = {
        "conv2d.weight": [8, 3, 3, 3], "conv2d.bias": [8],
        "batch_normalization.weight": [8], "batch_normalization.bias": [8],
        "batch_normalization.running_mean": [8], "batch_normalization.running_var": [8],
        "embedding.weight": [11, 6], "layer_normalization.weight": [6], "layer_normalization.bias": [6],
        "dense.weight": [4, 8], "dense.bias": [4],
    }  # fmt: skip
    p = make_plan(parse_rules({"version": 1, "include": ["keras-layout"]}), source, target)
    assert p.ok, [f.message for f in p.failures]
    ops = {a.target: (a.sources, a.ops) for a in p.assignments}
    assert ops["conv2d.weight"] == (("conv2d.kernel",), ("permute(3, 2, 0, 1)",))
    assert ops["dense.weight"] == (("dense.kernel",), ("transpose(-2, -1)",))
    assert ops["batch_normalization.running_var"] == (("batch_normalization.moving_variance",), ())
    assert ops["embedding.weight"] == (("embedding.embeddings",), ())
    assert sum(1 for _, o in ops.values() if o) == 2


# --------------------------------------------------------------------------- splicing


def test_fragment_steps_come_first_and_say_where_they_are_from() -> None:
    rules = parse_rules("version: 1\ninclude: [keras-layout]\nrules:\n  - rename: {'^dense\\.': 'fc.'}\n", filename="r.yaml")
    assert rules.includes == ("keras-layout",)
    assert [(s.index, s.label, s.origin) for s in rules.steps] == [
        (1, "step 1 (transpose, from keras-layout)", "keras-layout"),
        (2, "step 2 (transpose, from keras-layout)", "keras-layout"),
        (3, "step 3 (rename, from keras-layout)", "keras-layout"),
        (4, "step 4 (rename)", None),
    ]
    assert [s.where for s in rules.steps] == [f"{KERAS}:21:5", f"{KERAS}:25:5", f"{KERAS}:28:5", "r.yaml:4:5"]


def test_include_as_one_name_and_from_a_dict() -> None:
    a = parse_rules("version: 1\ninclude: keras-layout\n")
    b = parse_rules({"version": 1, "include": ["keras-layout"]})
    assert [s.summary() for s in a.steps] == [s.summary() for s in b.steps] == [
        "transpose(-2, -1) on rank-2 keys matching '\\.kernel$'",
        "transpose(3, 2, 0, 1) on rank-4 keys matching '\\.kernel$'",
        "rename '\\.kernel$' -> '.weight'; '\\.gamma$' -> '.weight'; '\\.beta$' -> '.bias'; "
        "'\\.moving_mean$' -> '.running_mean'; '\\.moving_variance$' -> '.running_var'; '\\.embeddings$' -> '.weight'",
    ]


def test_two_fragments_in_order_and_numbered_through(own_fragments) -> None:
    own_fragments(one="version: 1\nrules:\n  - drop: '^a$'\n", two="rules:\n  - drop: '^b$'\n  - keep: '.'\n")
    rules = parse_rules("version: 1\ninclude: [two, one]\nrules:\n  - strip_prefix: m.\n")
    assert [(s.label, s.summary()) for s in rules.steps] == [
        ("step 1 (drop, from two)", "drop '^b$'"), ("step 2 (keep, from two)", "keep '.'"),
        ("step 3 (drop, from one)", "drop '^a$'"), ("step 4 (strip_prefix)", "strip_prefix 'm.'"),
    ]  # fmt: skip


def test_an_unmatched_fragment_step_fails_naming_fragment_and_line(own_fragments) -> None:
    folder = own_fragments(strict="version: 1\nrules:\n  - transpose: {match: '\\.kernel$', rank: 4, dims: [3, 2, 0, 1]}\n")
    p = make_plan(parse_rules("version: 1\ninclude: [strict]\n"), {"dense.kernel": [2, 3]}, {"dense.kernel": [2, 3]})
    assert [f.message for f in p.failures] == [
        f"step 1 (transpose, from strict) ({folder / 'strict.yaml'}:3:5): '\\.kernel$' matched 1 key(s), but the rank filter "
        "(rank 4) removed them all: 'dense.kernel' (rank 2, float32). Fix the pattern or the filter, or add `optional: true` "
        "beside the step if that is expected."
    ]
    assert p.report.steps[0].where == f"{folder / 'strict.yaml'}:3:5"


def test_own_step_errors_count_the_fragment_steps(own_fragments) -> None:
    own_fragments(f="rules:\n  - drop: '^a$'\n")
    assert error("version: 1\ninclude: [f]\nrules:\n  - rename: {'(': x}\n") == (
        "r.yaml:4:14: step 2 (rename): bad regex '(': missing ) at position 1"
    )


# --------------------------------------------------------------------------- errors


def test_unknown_fragment_lists_the_available_ones() -> None:
    available = ", ".join(fragments())  # keras-layout, and whatever else ships
    assert "keras-layout" in available
    assert error("version: 1\ninclude: [keras-layot]\n") == (
        f"r.yaml:2:11: include: item 1: unknown fragment 'keras-layot' (did you mean 'keras-layout'?); available fragments: {available}"
    )
    assert error("version: 1\ninclude: ../../etc/passwd\n") == (
        f"r.yaml:2:10: include: unknown fragment '../../etc/passwd'; available fragments: {available}"
    )


@pytest.mark.parametrize(("text", "message"), [
    ("version: 1\ninclude: [keras-layout, keras-layout]\n", "r.yaml:2:25: include: item 2: the fragment 'keras-layout' is listed twice"),
    ("version: 1\ninclude: []\n", "r.yaml:2:10: include: expected a non-empty list, found a list []"),
    ("version: 1\ninclude: [3]\n", "r.yaml:2:11: include: item 1: expected a string, found an integer 3"),
    ("version: 1\ninclude: {a: 1}\n", "r.yaml:2:10: include: expected a string or a list, found a mapping {'a': 1}"),
    ("version: 1\nincludes: [keras-layout]\n",
     "r.yaml:2:1: unknown field 'includes' (did you mean 'include'?); "
     "expected one of: version, source, sources, target, rules, shapes, expect, freeze, output, verify, vars"),
])  # fmt: skip
def test_include_errors(text: str, message: str) -> None:
    assert error(text) == message


@pytest.mark.parametrize(("fragment", "message"), [
    ("version: 1\nrules:\n  - transpose: {match: a, rank: x}\n",
     "{path}:3:33: step 1 (transpose, from bad): field 'rank': expected an integer or a list, found a string 'x'"),
    ("rules:\n  - drop: '^a$'\n  - trasnpose: a\n",
     "{path}:3:5: step 2: unknown field 'trasnpose' (did you mean 'transpose'?); a step is one of: "
     "strip_prefix, add_prefix, rename, drop, keep, transpose, reshape, slice, pad, cast, adapt, merge, split, permute_heads, lora, dequant_blocks"),
    ("version: 1\nrules: []\nexpect: {missing: [a]}\n", "{path}:3:1: unknown field 'expect'; a fragment holds only: version, rules"),
    ("version: 2\nrules: []\n", "{path}:1:10: version: expected 1, found an integer 2"),
    ("version: 1\n", "{path}:1:1: missing required field 'rules'"),
    ("- drop: a\n", "{path}:1:1: a fragment is a mapping with `rules:`, found a list [{{'drop': 'a'}}]"),
    ("rules: [\n", "{path}:2:1: invalid YAML: expected the node content, but found '<stream end>'"),
])  # fmt: skip
def test_errors_in_a_fragment_name_its_file_and_line(own_fragments, fragment: str, message: str) -> None:
    folder = own_fragments(bad=fragment)
    assert error("version: 1\ninclude: [bad]\n") == message.format(path=folder / "bad.yaml")


def test_load_rules_with_include(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("version: 1\ninclude: [keras-layout]\nrules:\n  - rename: {'^dense\\.': 'fc.'}\n")
    rules = load_rules(path)
    assert len(rules.steps) == 4 and rules.steps[3].where == f"{path}:4:5"
