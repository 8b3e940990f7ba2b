"""`remap verify`: a conversion proven after the fact (the target from output.save, against the
source model or a recorded reference), two models and checkpoints given by flags, --record;
exit 0 agree, 1 differ, 2 usage, 3 unreadable."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from remap.cli import main
from weights import Small, perturb

SMALL = "weights:Small"  # tests/ is on sys.path, so the factory is importable by name
RULES = f"""version: 1
source: {{path: src.pt, model: '{SMALL}'}}
target: {{model: '{SMALL}'}}
output: {{save: out.safetensors}}
verify: {{input: [2, 3, 8, 8]}}
"""


def run(capsys: pytest.CaptureFixture[str], *argv: object) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def converted(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> Path:
    """A rules file in tmp_path, its source checkpoint, and the conversion `remap apply` saved."""
    monkeypatch.chdir(tmp_path)
    torch.save(perturb(Small()).state_dict(), tmp_path / "src.pt")
    torch.save(perturb(Small(), seed=1).state_dict(), tmp_path / "other.pt")
    (tmp_path / "rules.yaml").write_text(RULES)
    assert run(capsys, "apply", "rules.yaml", "-q")[0] == 0
    return tmp_path / "rules.yaml"


def test_a_saved_conversion_verified_after_the_fact(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "verify", converted)
    lines = out.splitlines()
    assert (code, err) == (0, "")
    assert lines[0] == "Verify  outputs agree"
    assert lines[-3:] == ["  against the source model (source.model with the source weights)", "", "OK: outputs agree"]


def test_other_weights_differ_exit_1(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "verify", converted, "--target-weights", "other.pt", "--json")
    result = json.loads(out)
    assert (code, err, result["ok"], result["verify"]["outcome"]) == (1, "", False, "differ")
    assert result["verify"]["max_abs"] > 0.1 and result["verify"]["input"] == [2, 3, 8, 8]
    code, out, _ = run(capsys, "verify", converted, "--target-weights", "other.pt")
    assert code == 1 and out.splitlines()[-1].startswith("FAILED: outputs differ: max abs diff ")


def test_record_then_verify_against_the_reference(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "verify", converted, "--record", "ref.safetensors")
    assert (code, err) == (0, "")
    assert out.splitlines() == ["recorded ref.safetensors", "  inputs   0 [2, 3, 8, 8]", "  outputs  output [2, 5]",
                                f"  from     {SMALL} (torch {torch.__version__}, seed 0)"]  # fmt: skip
    # the reference, without the source model or its weights: a rules file naming neither
    (converted.parent / "src.pt").unlink()
    code, out, err = run(capsys, "verify", "--reference", "ref.safetensors", "--target", SMALL, "--target-weights", "out.safetensors", "--json")
    result = json.loads(out)["verify"]
    assert (code, err, result["outcome"], result["max_abs"], result["reference"]) == (0, "", "agree", 0.0, "ref.safetensors")
    code, out, _ = run(capsys, "verify", "--reference", "ref.safetensors", "--target", SMALL, "--target-weights", "other.pt")
    assert code == 1 and out.splitlines()[-1].startswith("FAILED: outputs differ: ")


def test_two_checkpoints_by_flags_alone(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    same = ["verify", "--source-model", SMALL, "--source", "src.pt", "--target", SMALL, "--input", "1,3,4,4", "--seed", "3"]
    assert run(capsys, *same, "--target-weights", "src.pt")[0] == 0
    assert run(capsys, *same, "--target-weights", "other.pt")[0] == 1
    # a tolerance wider than any change of the input can make proves nothing: within it, but inconclusive
    code, out, _ = run(capsys, *same, "--target-weights", "other.pt", "--atol", "1000", "--json")
    result = json.loads(out)["verify"]
    assert (code, result["close"], result["outcome"], result["coverage"]["input_sensitive"]) == (1, True, "inconclusive", False)
    narrow = ["--target-kwargs", '{"num_classes": 3}', "--target-weights", "other.pt"]
    code, _, err = run(capsys, *same, *narrow)
    assert code == 2 and err.startswith("remap: error: verify: the target weights 'other.pt' do not load strictly into target.model "
                                        f"{SMALL} (names must match): ")  # fmt: skip


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (["verify", "rules.yaml", "--input", "1,x"], 2,
         "--input: expected a shape such as 1,3,224,224 (whole numbers separated by commas) or JSON such as "
         "'{\"ids\": [1, 16], \"high\": 1000}'; found '1,x'"),
        (["verify", "--target", SMALL, "--target-weights", "other.pt"], 2,
         "nothing to verify against: the rules have no `verify` section (e.g. `verify: {input: [1, 3, 224, 224]}`) and no "
         "recorded reference was given with --reference REF"),
        (["verify", "--reference", "ref.safetensors", "--target", SMALL], 2,
         "verify needs the converted weights: set output.save in the rules (what `remap apply RULES.yaml` writes) or give "
         "--target-weights FILE"),
        (["verify", "--reference", "gone.safetensors", "--target", SMALL, "--target-weights", "other.pt"], 3,
         "gone.safetensors: no such file: the reference to verify against; write one with `remap verify RULES.yaml --record REF` "
         "or remap.verifying.reference.write_reference (docs/verify.md)"),
        (["verify", "--reference", "rules.yaml", "--target", SMALL, "--target-weights", "other.pt"], 3,
         "rules.yaml: not a safetensors file (Error while deserializing header: header too large); a reference is a safetensors "
         "file of inputs and outputs: write one with `remap verify RULES.yaml --record REF` or "
         "remap.verifying.reference.write_reference (docs/verify.md)"),
        (["verify", "--target", "out.safetensors"], 2,
         "--target takes a module factory (module.path:callable, e.g. torchvision.models:resnet50); to load the checkpoint "
         "'out.safetensors', pass it with --source"),
        (["verify", "rules.yaml", "--target-weights", "gone.pt"], 2,
         "verify: the converted weights 'gone.pt' (the target weights given) do not exist: convert first "
         "(`remap apply RULES.yaml` writes output.save), or give the converted file with --target-weights"),
    ],
)  # fmt: skip
def test_usage_and_unreadable_files(converted: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int, message: str) -> None:
    got, out, err = run(capsys, *argv)
    assert (got, out, err) == (code, "", f"remap: error: {message}\n")


def test_record_needs_an_input(converted: Path, capsys: pytest.CaptureFixture[str]) -> None:
    converted.write_text(RULES.replace("verify: {input: [2, 3, 8, 8]}\n", ""))
    code, out, err = run(capsys, "verify", converted, "--record", "ref.safetensors", "--json")
    assert code == 2 and json.loads(out)["error"]["message"] == (
        "--record needs the input to record: the rules' verify section must give one (e.g. `verify: {input: [1, 3, 224, 224]}`)")
    assert not (converted.parent / "ref.safetensors").exists()


def test_help_names_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "verify", "--help")
    assert code == 0 and "  1  the outputs differ, or the check is inconclusive\n" in out


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("flag", "message"),
    [
        ("--input", "remap: error: --input: the JSON is nested deeper than it can be read; expected a shape such as 1,3,224,224 or "
                    "JSON such as '{\"ids\": [1, 16], \"high\": 1000}'\n"),
        ("--target-kwargs", "remap: error: --target-kwargs: expected a JSON object, e.g. '{\"num_classes\": 10}'; found JSON nested "
                            "deeper than it can be read\n"),
    ],
)  # fmt: skip
def test_json_flags_nested_past_the_reader_are_usage_errors(capsys: pytest.CaptureFixture[str], flag: str, message: str) -> None:
    code, _, err = run(capsys, "verify", "--target", SMALL, flag, "[" * 50_000)
    assert (code, err) == (2, message)
