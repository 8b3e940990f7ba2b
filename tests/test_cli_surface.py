"""The command line's surface (issue 11): flags not API words, -q reasons, JSON for every
outcome, flat keys in inspect, clean warnings, help with exit codes, one name per flag."""

from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from weights import Small, perturb

from remap import cli
from remap.cli import main

SMALL = "weights:Small"


class Config:
    """Checkpoint metadata that torch.load(weights_only=True) refuses: a class it does not know."""

    lr = 0.1


def warning_small() -> torch.nn.Module:
    """A target factory that warns, as other libraries do."""
    warnings.warn("a warning from a library that is not remap", UserWarning, stacklevel=1)
    return Small()


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


@pytest.fixture
def ddp_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in perturb(Small(), seed=1).state_dict().items()}, path)
    return path


@pytest.fixture
def ok_rules(tmp_path: Path) -> Path:
    return write(tmp_path, f"version: 1\ntarget: {{model: '{SMALL}'}}\nrules:\n  - strip_prefix: module.\n", "ok.yaml")


@pytest.fixture
def bare_rules(tmp_path: Path) -> Path:
    return write(tmp_path, f"version: 1\ntarget: {{model: '{SMALL}'}}\n", "bare.yaml")


# ---------------------------------------------------------------------------- --target given a checkpoint


@pytest.mark.parametrize("target", ["../r18.pth", "{ckpt}", "{tmp}", "ckpts/resnet18", "model.safetensors", "shards.index.json"])
def test_a_checkpoint_as_target_is_a_usage_error_naming_source(tmp_path, capsys, ok_rules, ddp_ckpt, target):
    target = target.format(ckpt=ddp_ckpt, tmp=tmp_path)
    code, out, err = run(capsys, "apply", ok_rules, "--source", ddp_ckpt, "--target", target)
    assert (code, out) == (2, "")
    assert err == (
        "remap: error: --target takes a module factory (module.path:callable, e.g. torchvision.models:resnet50); "
        f"to load the checkpoint {target!r}, pass it with --source\n"
    )


def test_a_factory_as_target_still_loads(capsys, ok_rules, ddp_ckpt):
    code, out, err = run(capsys, "apply", ok_rules, "--source", ddp_ckpt, "--target", SMALL, "--json")
    assert (code, err) == (0, "")
    assert json.loads(out)["totals"]["loaded"] == 8


# ---------------------------------------------------------------------------- messages speak CLI


@pytest.mark.parametrize(
    "api, cli_text",
    [
        ("no target: pass a module, give --target, or set target.model in the rules",
         "no target: give --target, or set target.model in the rules"),
        ("no source: pass one, give --source, or set source.path in the rules",
         "no source: give --source, or set source.path in the rules"),
        ("no target: set target.model in the rules, give --target on the command line, or pass a module to remap.load / remap.plan",
         "no target: set target.model in the rules, give --target on the command line"),
        ("no source: set source.path (or source.model) in the rules, give --source on the command line, "
         "or pass a source to remap.load / remap.plan",
         "no source: set source.path (or source.model) in the rules, give --source on the command line"),
        ("verify was asked for (--verify, verify=True), but the rules have no `verify` section",
         "verify was asked for (--verify), but the rules have no `verify` section"),
        ("verify was asked for, but the rules have no `verify` section", "--verify was given, but the rules have no `verify` section"),
        ("remap.load needs a module to load into; use remap.plan for a mapping of shapes",
         "the target factory (--target or target.model) must return a torch.nn.Module to load into"),
        ("remap.load needs a torch.nn.Module to load into, found a dict; remap.plan takes a mapping of key -> shape",
         "the target factory (--target or target.model) must return a torch.nn.Module to load into"),
        ("mmap_weights maps the file into CPU memory; it cannot load onto device cuda",
         "--mmap-weights maps the file into CPU memory; it cannot load onto device cuda"),
    ],
)  # fmt: skip
def test_api_words_become_flags(api, cli_text):
    assert cli._cli_message(api, None) == cli_text


def test_no_source_no_target_and_no_verify_section_name_flags_not_the_api(tmp_path, capsys, ok_rules, ddp_ckpt):
    no_target = write(tmp_path, "version: 1\n", "no_target.yaml")
    cases = [
        (["apply", ok_rules], "remap: error: no source: ", "--source"),
        (["apply", no_target, "--source", ddp_ckpt], "remap: error: no target: ", "--target"),
        (["apply", ok_rules, "--source", ddp_ckpt, "--verify"], "remap: error: ", "--verify"),
    ]
    for argv, start, flag in cases:
        code, out, err = run(capsys, *argv)
        assert (code, out) == (2, ""), argv
        assert err.startswith(start) and flag in err, err
        assert not any(api in err for api in ("remap.load", "remap.plan", "pass a ", "pass one", "=True")), err


def test_a_wrong_key_flag_is_named_as_the_flag(capsys, ok_rules, ddp_ckpt):
    code, out, err = run(capsys, "inspect", ddp_ckpt, "--key", "nope")
    assert (code, out) == (3, "")
    assert err.startswith(f"remap: error: {ddp_ckpt}: --key 'nope': no entry 'nope' at the top level; found 'module.conv.weight' (tensor)")


def test_two_weight_sets_ask_for_the_key_flag(tmp_path, capsys, ok_rules):
    state = perturb(Small()).state_dict()
    path = tmp_path / "two.pth"
    torch.save({"model": {f"module.{k}": v for k, v in state.items()}, "ema": dict(state)}, path)
    prefix = f"remap: error: {path}: the checkpoint holds several sets of weights: 'model' (8 tensors) and 'ema' (8 tensors); "
    code, _, err = run(capsys, "apply", ok_rules, "--source", path)
    assert (code, err) == (3, prefix + "say which to load with --key model (or `source.key: model` in the rules)\n")
    code, _, err = run(capsys, "inspect", path)
    assert (code, err) == (3, prefix + "say which to load with --key model\n")
    assert run(capsys, "apply", ok_rules, "--source", path, "--key", "model")[0] == 0


def test_max_shard_size_names_the_flag(tmp_path, capsys, ok_rules, ddp_ckpt):
    code, out, err = run(capsys, "apply", ok_rules, "--source", ddp_ckpt, "--save", tmp_path / "o.safetensors", "--max-shard-size", "5XB")
    assert (code, out) == (2, "")
    assert err == "remap: error: --max-shard-size: expected a size such as 5GB, 500MiB or a number of bytes, found '5XB'\n"
    assert not (tmp_path / "o.safetensors").exists()


# ---------------------------------------------------------------------------- -q


def test_quiet_still_prints_each_failures_reason(capsys, bare_rules, ddp_ckpt):
    code, out, err = run(capsys, "apply", bare_rules, "--source", ddp_ckpt, "-q")
    assert (code, out) == (1, "")
    lines = err.splitlines()
    assert lines[0] == "remap: missing: 8 target key(s) would keep their initial values and are not in expect.missing"
    assert lines[1] == "remap: unused: 8 source key(s) reach no target key and are not dropped or in expect.unused"
    assert lines[-1].startswith("remap: ") and lines[-1].endswith(" the module was not touched.")
    assert len(lines) in (3, 4)  # a third check (nothing loaded) may fail too, with its own line
    assert all(line.count("\n") == 0 and "  " not in line for line in lines)


def test_quiet_on_success_prints_nothing(capsys, ok_rules, ddp_ckpt):
    assert run(capsys, "apply", ok_rules, "--source", ddp_ckpt, "-q") == (0, "", "")


# ---------------------------------------------------------------------------- --json for every outcome


def test_apply_json_exit_0_and_1_print_the_report(capsys, ok_rules, bare_rules, ddp_ckpt):
    code, out, _ = run(capsys, "apply", ok_rules, "--source", ddp_ckpt, "--json")
    assert code == 0 and json.loads(out)["ok"] is True
    code, out, err = run(capsys, "apply", bare_rules, "--source", ddp_ckpt, "--json", "-q")  # --json wins over -q
    report = json.loads(out)
    assert code == 1 and report["ok"] is False
    assert [f["kind"] for f in report["failures"]][:2] == ["missing", "unused"]
    assert err.startswith("remap: ") and "the module was not touched" in err


def test_apply_json_with_explain_keeps_stdout_parseable(capsys, ok_rules, ddp_ckpt):
    code, out, err = run(capsys, "apply", ok_rules, "--source", ddp_ckpt, "--dry-run", "--explain", "module.bn.weight", "--json")
    assert code == 0 and json.loads(out)["dry_run"] is True
    assert err == (
        "source 'module.bn.weight' [4] float32\n"
        "  step 1 (strip_prefix 'module.'): -> 'bn.weight'\n"
        "  => loaded into 'bn.weight'\n"
    )


def test_apply_json_exit_2_bad_rules_is_an_error_object_with_where(tmp_path, capsys, ddp_ckpt):
    rules = write(tmp_path, "version: 1\nrules:\n  - strip_prefix: module.\nexpcet:\n  missing: ['^fc\\.']\n")
    code, out, err = run(capsys, "apply", rules, "--source", ddp_ckpt, "--json")
    assert code == 2
    message = ("unknown field 'expcet' (did you mean 'expect'?); "
               "expected one of: version, source, sources, target, rules, shapes, expect, freeze, output, verify, vars")  # fmt: skip
    assert json.loads(out) == {
        "ok": False,
        "error": {"kind": "RulesError", "message": message, "exit_code": 2,
                  "where": {"text": f"{rules}:4:1", "file": str(rules), "line": 4, "column": 1}},
    }  # fmt: skip
    assert err == f"remap: error: {rules}:4:1: {message}\n"


def test_apply_json_exit_2_from_argparse(capsys, ok_rules):
    code, out, err = run(capsys, "apply", ok_rules, "--json", "--bogus")
    data = json.loads(out)
    assert code == 2
    usage = cli._parser().commands["apply"].format_usage().strip()
    assert data == {"ok": False, "error": {"kind": "UsageError", "message": "unrecognized arguments: --bogus",
                                           "exit_code": 2, "where": None, "usage": usage}}  # fmt: skip
    assert err == f"remap: error: unrecognized arguments: --bogus\n{usage}\n"
    code, out, _ = run(capsys, "apply", "--json")
    assert code == 2 and json.loads(out)["error"]["message"] == "the following arguments are required: RULES.yaml"


def test_apply_json_exit_2_checkpoint_as_target(capsys, ok_rules, ddp_ckpt):
    code, out, _ = run(capsys, "apply", ok_rules, "--source", ddp_ckpt, "--target", "../r18.pth", "--json")
    assert code == 2
    assert json.loads(out)["error"] == {
        "kind": "UsageError",
        "message": "--target takes a module factory (module.path:callable, e.g. torchvision.models:resnet50); "
                   "to load the checkpoint '../r18.pth', pass it with --source",
        "exit_code": 2, "where": None,
    }  # fmt: skip


def test_apply_json_exit_3_unreadable_source(tmp_path, capsys, ok_rules):
    missing = tmp_path / "nope.pth"
    code, out, err = run(capsys, "apply", ok_rules, "--source", missing, "--json")
    data = json.loads(out)
    assert code == 3
    assert data["ok"] is False and data["error"]["kind"] == "SourceError" and data["error"]["exit_code"] == 3
    assert err == f"remap: error: {data['error']['where']['text']}: {data['error']['message']}\n"
    assert "nope.pth" in err


def test_json_exit_4_a_bug_is_an_error_object_too(capsys, monkeypatch, ok_rules):
    def broken(args: argparse.Namespace, out: Any) -> int:
        raise ZeroDivisionError("division by zero")

    monkeypatch.setitem(cli._COMMANDS, "validate", broken)
    code, out, err = run(capsys, "validate", ok_rules, "--json")
    assert code == 4
    assert json.loads(out)["error"] == {
        "kind": "InternalError", "exit_code": 4, "where": None,
        "message": "ZeroDivisionError: division by zero; this is a bug in remap; please report it with the command and rules file",
    }  # fmt: skip
    assert "Traceback" in err and err.endswith("remap: internal error: this is a bug in remap; please report it with the command and rules file\n")


def test_validate_json(tmp_path, capsys):
    rules = write(tmp_path, "version: 1\nrules:\n  - strip_prefix: [module., _orig_mod.]\n    optional: true\n  - drop: '^fc\\.'\n")
    code, out, err = run(capsys, "validate", rules, "--json")
    assert (code, err) == (0, "")
    assert json.loads(out) == {
        "ok": True, "rules": str(rules), "version": 1,
        "steps": [{"index": 1, "kind": "strip_prefix", "summary": "strip_prefix 'module.', '_orig_mod.'", "optional": True, "from": None},
                  {"index": 2, "kind": "drop", "summary": "drop '^fc\\.'", "optional": False, "from": None}],
    }  # fmt: skip
    bad = write(tmp_path, "version: 1\nrules:\n  - rename: {from: '(', to: x}\n", "bad.yaml")
    code, out, _ = run(capsys, "validate", bad, "--json")
    assert code == 2
    assert json.loads(out)["error"] == {
        "kind": "RulesError", "message": "step 1 (rename): field 'from': bad regex '(': missing ) at position 1", "exit_code": 2,
        "where": {"text": f"{bad}:3:20", "file": str(bad), "line": 3, "column": 20},
    }  # fmt: skip


def test_inspect_and_diff_json_errors(tmp_path, capsys, ddp_ckpt):
    code, out, _ = run(capsys, "inspect", tmp_path / "nope.safetensors", "--json")
    assert code == 3 and json.loads(out)["error"]["kind"] == "SourceError"
    code, out, _ = run(capsys, "diff", ddp_ckpt, SMALL, "--target-kwargs", "[3]", "--json")
    assert code == 2 and json.loads(out)["error"]["message"] == (
        "--target-kwargs: expected a JSON object, e.g. '{\"num_classes\": 10}'; found '[3]', a JSON list"
    )


# ---------------------------------------------------------------------------- inspect: flat keys


def _nested_checkpoint(tmp_path: Path) -> Path:
    blocks = {f"blocks.{i}.{n}.weight": torch.randn(4, 4) for i in range(3) for n in ("q", "k")}
    state = {**blocks, "head.weight": torch.randn(2, 4), "head.bias": torch.zeros(2, dtype=torch.float16),
             "steps": torch.tensor(7)}  # fmt: skip
    path = tmp_path / "nested.ckpt"
    torch.save({"state_dict": state, "epoch": 3}, path)
    return path


def test_inspect_json_lists_the_real_keys(tmp_path, capsys):
    path = _nested_checkpoint(tmp_path)
    code, out, err = run(capsys, "inspect", path, "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    real = torch.load(path, weights_only=True)["state_dict"]
    assert list(data["keys"]) == list(real)  # the real names, in the file's order: no folding
    assert data["keys"] == {
        k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."), "numel": v.numel()} for k, v in real.items()
    }
    assert data["totals"] == {"tensors": len(real), "numel": sum(v.numel() for v in real.values()),
                              "bytes": sum(v.numel() * v.element_size() for v in real.values())}  # fmt: skip
    assert data["source"]["key"] == "state_dict" and "nodes" not in data


def test_inspect_flat_prints_one_real_key_per_line(tmp_path, capsys):
    code, out, err = run(capsys, "inspect", _nested_checkpoint(tmp_path), "--flat")
    assert (code, err) == (0, "")
    assert out == """\
blocks.0.q.weight  [4, 4]  float32
blocks.0.k.weight  [4, 4]  float32
blocks.1.q.weight  [4, 4]  float32
blocks.1.k.weight  [4, 4]  float32
blocks.2.q.weight  [4, 4]  float32
blocks.2.k.weight  [4, 4]  float32
head.weight        [2, 4]  float32
head.bias          [2]     float16
steps              []      int64
"""


def test_inspect_flat_and_depth_exclude_each_other(tmp_path, capsys, ddp_ckpt):
    code, out, err = run(capsys, "inspect", ddp_ckpt, "--flat", "--depth", "1")
    assert (code, out) == (2, "")
    usage = cli._parser().commands["inspect"].format_usage().strip()
    assert err == f"remap: error: argument --depth: not allowed with argument --flat\n{usage}\n"


# ---------------------------------------------------------------------------- warnings


def test_trust_pickle_warns_in_one_clean_line(tmp_path, capsys):
    path = tmp_path / "trusted.pth"
    torch.save({"state_dict": perturb(Small()).state_dict(), "config": Config()}, path)
    code, _, err = run(capsys, "inspect", path)
    assert code == 3 and "test_cli_surface.Config" in err
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, out, err = run(capsys, "inspect", path, "--trust-pickle", "--flat")
    assert code == 0 and out.startswith("conv.weight")
    assert err == (
        f"remap: warning: {path}: loaded with torch.load(weights_only=False) because --trust-pickle is given; "
        "unpickling runs code from the file\n"
    )
    assert caught == []  # shown as remap's line, not as a Python warning


def test_trust_pickle_from_the_rules_says_so(tmp_path, capsys):
    path = tmp_path / "trusted.pth"
    torch.save({"state_dict": perturb(Small()).state_dict(), "config": Config()}, path)
    rules = write(tmp_path, f"version: 1\ntarget: {{model: '{SMALL}'}}\nsource: {{path: {path.name}, trust_pickle: true}}\n")
    code, _, err = run(capsys, "apply", rules, "--dry-run", "-q")
    assert code == 0
    assert err == (
        f"remap: warning: {path}: loaded with torch.load(weights_only=False) because source.trust_pickle is set in the rules; "
        "unpickling runs code from the file\n"
    )


def test_other_libraries_warnings_are_left_alone(tmp_path, capsys, ddp_ckpt):
    rules = write(tmp_path, "version: 1\ntarget: {model: 'test_cli_surface:warning_small'}\nrules:\n  - strip_prefix: module.\n")
    with pytest.warns(UserWarning, match="a warning from a library that is not remap"):
        code, _, err = run(capsys, "apply", rules, "--source", ddp_ckpt, "--dry-run", "-q")
    assert (code, err) == (0, "")


# ---------------------------------------------------------------------------- help, flags, usage


@pytest.mark.parametrize("command", [[], ["apply"], ["validate"], ["inspect"], ["diff"]])
def test_help_shows_exit_codes_and_examples(capsys, command):
    code, out, _ = run(capsys, *command, "--help")
    assert code == 0
    assert "\nexit codes:\n  0  " in out and "\n  2  bad rules or usage\n" in out and "\n  4  internal error" in out
    assert "\nexamples:\n  remap " in out
    if command == ["apply"]:
        assert "\n  1  a check failed" in out and "without --save" in out.lower().replace("\n", " ")


def test_every_positional_argument_has_help():
    parser = cli._parser()
    for name, sub in [("remap", parser), *parser.commands.items()]:
        positionals = [a for a in sub._actions if not a.option_strings and not isinstance(a, argparse._HelpAction)]
        assert positionals, name
        assert all(a.help and a.help.strip() for a in positionals), name


def _small_ckpt(tmp_path: Path, num_classes: int) -> tuple[Path, dict[str, torch.Tensor]]:
    state = perturb(Small(num_classes=num_classes), seed=2).state_dict()
    path = tmp_path / "small3.pth"
    torch.save({f"module.{k}": v for k, v in state.items()}, path)
    return path, state


@pytest.mark.parametrize("flag, value", [("--target-kwargs", '{"num_classes": 3}'), ("--target-args", "[3]")])
def test_apply_target_args_and_kwargs_replace_the_rules(tmp_path, capsys, ok_rules, flag, value):
    path, state = _small_ckpt(tmp_path, num_classes=3)
    code, _, _ = run(capsys, "apply", ok_rules, "--source", path, "-q")
    assert code == 1  # the rules' Small() has 5 classes: the head does not fit
    saved = tmp_path / "out.safetensors"
    code, _, err = run(capsys, "apply", ok_rules, "--source", path, flag, value, "--save", saved, "-q")
    assert (code, err) == (0, "")
    loaded = load_file(str(saved))
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], v) for k, v in state.items())


def test_rules_kwargs_are_replaced_not_merged(tmp_path, capsys):
    path, _ = _small_ckpt(tmp_path, num_classes=3)
    rules = write(tmp_path, f"version: 1\ntarget: {{model: '{SMALL}', kwargs: {{in_ch: 3, num_classes: 7}}}}\nrules:\n  - strip_prefix: module.\n")
    assert run(capsys, "apply", rules, "--source", path, "--target-kwargs", '{"num_classes": 3}', "-q")[0] == 0
    assert run(capsys, "apply", rules, "--source", path, "--target-kwargs", '{"in_ch": 1}', "-q")[0] == 1


@pytest.mark.parametrize(
    "flag, value, expected",
    [
        ("--target-kwargs", "{num_classes: 3}",
         "--target-kwargs: expected a JSON object, e.g. '{\"num_classes\": 10}'; found '{num_classes: 3}', which is not JSON "
         "(Expecting property name enclosed in double quotes: line 1 column 2 (char 1))"),
        ("--target-kwargs", "[3]", "--target-kwargs: expected a JSON object, e.g. '{\"num_classes\": 10}'; found '[3]', a JSON list"),
        ("--target-args", "3", "--target-args: expected a JSON list, e.g. '[\"resnet18\"]'; found '3', a JSON int"),
        ("--target-args", '{"a": 1}', "--target-args: expected a JSON list, e.g. '[\"resnet18\"]'; found '{\"a\": 1}', a JSON dict"),
    ],
)  # fmt: skip
def test_bad_target_json_is_exit_2(capsys, ok_rules, ddp_ckpt, flag, value, expected):
    code, out, err = run(capsys, "apply", ok_rules, "--source", ddp_ckpt, flag, value)
    assert (code, out, err) == (2, "", f"remap: error: {expected}\n")


@pytest.mark.parametrize("flag", ["--key", "--source-key"])
def test_diff_takes_key_and_the_old_source_key_alias(tmp_path, capsys, flag):
    path = tmp_path / "train.ckpt"
    torch.save({"state_dict": perturb(Small()).state_dict(), "optimizer": {"lr": 0.1}}, path)
    code, out, err = run(capsys, "diff", path, SMALL, flag, "state_dict", "--json")
    assert (code, err) == (0, "")
    data = json.loads(out)
    assert data["source"]["key"] == "state_dict" and len(data["pairs"]) == 8
    code, out, err = run(capsys, "diff", path, SMALL, flag, "nope")
    assert code == 3 and "--key 'nope': no entry 'nope' at the top level" in err


def test_diff_target_args(tmp_path, capsys):
    path, _ = _small_ckpt(tmp_path, num_classes=3)
    code, out, _ = run(capsys, "diff", path, SMALL, "--target-args", "[3]", "--json")
    assert code == 0
    assert json.loads(out)["target"]["args"] == [3]


def test_unknown_option_after_a_subcommand_shows_its_usage(tmp_path, capsys, ok_rules):
    code, out, err = run(capsys, "validate", ok_rules, "--source", "y")
    assert (code, out) == (2, "")
    assert err == "remap: error: unrecognized arguments: --source y\nusage: remap validate [-h] [--json] RULES.yaml\n"
