"""The command line through main(argv): exit codes, messages, outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from weights import Small, perturb

from remap.sources import readers as sources
from remap.sources import safetensors_reader
from remap.cli import main

SMALL = "weights:Small"  # tests/ is on sys.path, so the factory is importable by name


@pytest.fixture
def ddp_ckpt(tmp_path: Path) -> Path:
    path = tmp_path / "ddp.pth"
    torch.save({f"module.{k}": v for k, v in perturb(Small(), seed=1).state_dict().items()}, path)
    return path


def write(tmp_path: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_apply_ok_exit_0_and_json_report(tmp_path, capsys, ddp_ckpt):
    rules = write(tmp_path, f"version: 1\ntarget: {{model: '{SMALL}'}}\nrules:\n  - strip_prefix: module.\n")
    code, out, err = run(capsys, "apply", rules, "--source", ddp_ckpt, "--json", "--report", tmp_path / "r.json")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["ok"] and report["totals"]["loaded"] == 8
    assert report["targets"]["fc.weight"]["sources"] == ["module.fc.weight"]
    assert json.loads((tmp_path / "r.json").read_text()) == report


def test_forgotten_prefix_fails_with_exit_1_and_lists_the_keys(tmp_path, capsys, ddp_ckpt):
    rules = write(tmp_path, f"version: 1\ntarget: {{model: '{SMALL}'}}\n")
    code, out, err = run(capsys, "apply", rules, "--source", ddp_ckpt)
    assert code == 1
    assert err == "remap: 2 check(s) failed (missing, unused); the module was not touched.\n"
    assert "module.fc.{bias, weight}" in out and "  fc.{bias, weight}" in out
    assert "add `- strip_prefix: module.` to rules" in out


def test_misspelt_section_exit_2_with_line_column_and_suggestion(tmp_path, capsys, ddp_ckpt):
    rules = write(tmp_path, "version: 1\nrules:\n  - strip_prefix: module.\nexpcet:\n  missing: ['^fc\\.']\n")
    code, out, err = run(capsys, "apply", rules, "--source", ddp_ckpt)
    assert (code, out) == (2, "")
    assert err == (
        f"remap: error: {rules}:4:1: unknown field 'expcet' (did you mean 'expect'?); "
        "expected one of: version, source, sources, target, rules, shapes, expect, freeze, output, verify, vars\n"
    )


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["apply", "{rules}", "--source", "{tmp}/nope.pth"], 3, "nope.pth"),
        (["apply", "{rules}", "--source", "{tmp}/empty"], 3, "remap: error: "),
        (["apply", "{tmp}/missing.yaml"], 2, "no such rules file"),
        (["apply", "{rules}", "--source", "{ckpt}", "--target", "nosuchpkg.models:Net"], 3, "nosuchpkg"),
        (["apply", "{rules}", "--source", "{ckpt}", "--target", "not a spec"], 3, "module.path:callable"),
        (["apply"], 2, "the following arguments are required: RULES.yaml"),
        (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
        (["apply", "{rules}"], 2, "no source"),
        (["inspect", "{tmp}/nope.safetensors"], 3, "nope.safetensors"),
    ],
)
def test_user_errors_map_to_exit_codes_without_traceback(tmp_path, capsys, ddp_ckpt, argv, code, message):
    rules = write(tmp_path, f"version: 1\ntarget: {{model: '{SMALL}'}}\n")
    (tmp_path / "empty").mkdir()
    argv = [a.format(rules=rules, tmp=tmp_path, ckpt=ddp_ckpt) for a in argv]
    got, out, err = run(capsys, *argv)
    assert got == code
    assert message in err and "Traceback" not in err + out


def test_validate_lists_steps(tmp_path, capsys):
    rules = write(tmp_path, "version: 1\nrules:\n  - strip_prefix: [module., _orig_mod.]\n    optional: true\n  - drop: '^fc\\.'\n")
    code, out, _ = run(capsys, "validate", rules)
    assert code == 0
    assert out == f"{rules}: OK, version 1, 2 step(s)\n  1. strip_prefix 'module.', '_orig_mod.' (optional)\n  2. drop '^fc\\.'\n"


def test_validate_bad_rules_exit_2(tmp_path, capsys):
    rules = write(tmp_path, "version: 1\nrules:\n  - rename: {from: '(', to: x}\n")
    code, out, err = run(capsys, "validate", rules)
    assert code == 2
    assert err == f"remap: error: {rules}:3:20: step 1 (rename): field 'from': bad regex '(': missing ) at position 1\n"


def test_explain_prints_the_journey(tmp_path, capsys, ddp_ckpt):
    rules = write(tmp_path, f"version: 1\ntarget: {{model: '{SMALL}'}}\nrules:\n  - strip_prefix: module.\n")
    code, out, _ = run(capsys, "apply", rules, "--source", ddp_ckpt, "--dry-run", "--explain", "module.bn.weight", "-q")
    assert code == 0
    assert out == (
        "source 'module.bn.weight' [4] float32\n"
        "  step 1 (strip_prefix 'module.'): -> 'bn.weight'\n"
        "  => loaded into 'bn.weight'\n"
    )


def big_state(n_blocks: int = 60) -> dict[str, torch.Tensor]:
    """A 300-key state_dict: 60 blocks of 5 tensors."""
    return {f"blocks.{i}.{name}": torch.randn(8, 8) for i in range(n_blocks) for name in ("q", "k", "v", "o", "norm")}


class Blocks(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = torch.nn.ModuleList(torch.nn.ParameterDict({n: torch.nn.Parameter(torch.zeros(8, 8)) for n in ("q", "k", "v", "o", "norm")}) for _ in range(60))


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_dry_run_on_300_keys_reads_no_tensor_data(tmp_path, capsys, monkeypatch, suffix):
    from safetensors.torch import save_file

    path = tmp_path / f"big{suffix}"
    state = big_state()
    save_file(state, path) if suffix == ".safetensors" else torch.save(state, path)
    monkeypatch.setattr(sources.Source, "read", lambda self, key: pytest.fail(f"dry run read {key}"))
    monkeypatch.setattr(safetensors_reader, "_open_safetensors", lambda path: pytest.fail("dry run opened tensor data"))
    rules = write(tmp_path, "version: 1\ntarget: {model: 'test_cli:Blocks'}\n")
    code, out, _ = run(capsys, "apply", rules, "--source", path, "--dry-run", "--json")
    report = json.loads(out)
    assert code == 0 and report["dry_run"] and report["totals"]["loaded"] == 300


def test_inspect_shows_a_tree(capsys, ddp_ckpt):
    code, out, _ = run(capsys, "inspect", ddp_ckpt)
    assert code == 0
    assert "module" in out and "fc" in out and "[5, 4]" in out


def test_inspect_json(capsys, ddp_ckpt):
    code, out, _ = run(capsys, "inspect", ddp_ckpt, "--json")
    assert code == 0 and json.loads(out)


def test_version(capsys):
    code, out, _ = run(capsys, "--version")
    assert (code, out) == (0, "remap 0.1.0\n")


def test_mmap_weights_converts_without_copying(tmp_path, capsys):
    """``--mmap-weights`` with a meta-device target: the weights saved are the file's."""
    from safetensors.torch import load_file, save_file

    src = {f"module.{k}": v.contiguous() for k, v in perturb(Small(), seed=3).state_dict().items()}
    save_file(src, str(tmp_path / "ddp.safetensors"))
    rules = write(tmp_path, f"version: 1\ntarget: {{model: '{SMALL}', device: meta}}\nrules:\n  - strip_prefix: module.\n")
    out_path = tmp_path / "out.safetensors"
    code, out, err = run(capsys, "apply", rules, "--source", tmp_path / "ddp.safetensors", "--mmap-weights", "--save", out_path, "--json")
    assert (code, err) == (0, "")
    report = json.loads(out)
    assert report["stats"]["mmap_weights_tensors"] == report["totals"]["loaded"] == len(src)
    saved = load_file(str(out_path))
    assert saved.keys() == {k.removeprefix("module.") for k in src}
    assert all(torch.equal(saved[k.removeprefix("module.")], v) for k, v in src.items())


_ALLOCATED = Small()


def allocated_small() -> Small:
    """A factory whose module has its memory even under remap.empty_weights (a copy of one built before)."""
    import copy

    return copy.deepcopy(_ALLOCATED)


def test_mmap_weights_works_on_a_target_remap_builds(tmp_path, capsys, ddp_ckpt):
    rules = write(tmp_path, f"version: 1\ntarget: {{model: '{SMALL}'}}\nrules:\n  - strip_prefix: module.\n")
    code, out, err = run(capsys, "apply", rules, "--source", ddp_ckpt, "--mmap-weights", "--json")
    assert (code, err) == (0, "")  # built under remap.empty_weights: its parameters were on meta
    assert json.loads(out)["stats"]["mmap_weights_tensors"] > 0


def test_mmap_weights_needs_a_meta_target(tmp_path, capsys, ddp_ckpt):
    rules = write(tmp_path, "version: 1\ntarget: {model: 'test_cli:allocated_small'}\nrules:\n  - strip_prefix: module.\n")
    code, out, err = run(capsys, "apply", rules, "--source", ddp_ckpt, "--mmap-weights")
    assert (code, out) == (2, "")
    assert err == ("remap: error: --mmap-weights keeps the file's pages as the weights of a meta-device target; "
                   "this target already has its memory: set `device: meta` under `target:` in the rules\n")
