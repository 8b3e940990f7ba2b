"""DCP folders end to end through the command line (issue 19, item 3, one process): `remap
inspect` on a checkpoint torch's dcp.save wrote, `remap apply` with renames from it into a
module, a dry run that reads no data, and `output.save: out.dcp` read back by torch's own
dcp.load."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from weights import Small, perturb

from remap.cli import main

dcp = pytest.importorskip("torch.distributed.checkpoint")

SMALL = "weights:Small"


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def dcp_save(state: dict, folder: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(folder), no_dist=True)
    return folder


def dcp_load(folder: Path, like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {k: torch.empty_like(v) for k, v in like.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.load(out, checkpoint_id=str(folder), no_dist=True)
    return out


@pytest.fixture
def trained(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A training checkpoint as torchtitan-like trainers write it: the model under other names
    (``backbone.*``, ``head.*``), its optimizer state and a step counter beside it."""
    model = perturb(Small(), seed=3)
    names = {"conv": "backbone.conv", "bn": "backbone.norm", "fc": "head"}
    sd = {names[k.split(".")[0]] + k[len(k.split(".")[0]) :]: v for k, v in model.state_dict().items()}
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 3, 8, 8)).sum().backward()
    opt.step()
    folder = dcp_save({"model": sd, "optimizer": opt.state_dict(), "train_state": {"step": 7}}, tmp_path / "step-7")
    return folder, {k: v.clone() for k, v in model.state_dict().items()}


def rules(tmp_path: Path, folder: Path, extra: str = "") -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(f"version: 1\nsource: {{path: {folder}}}\ntarget: {{model: '{SMALL}'}}\n"
                    "rules:\n  - rename: {'^backbone\\.conv\\.': 'conv.', '^backbone\\.norm\\.': 'bn.', '^head\\.': 'fc.'}\n"
                    f"{extra}")  # fmt: skip
    return path


def test_inspect_lists_the_weights_and_the_rest(capsys, trained):
    folder, _ = trained
    code, out, err = run(capsys, "inspect", folder)
    assert (code, err) == (0, "")
    assert "(dcp)" in out and "model (auto-detected)" in out
    assert "optimizer:" in out and "train_state: 1 value (not read)" in out


def test_inspect_json_keys_shapes_dtypes(capsys, trained):
    folder, expected = trained
    code, out, _ = run(capsys, "inspect", folder, "--json")
    assert code == 0
    listed = json.loads(out)
    assert listed["source"]["format"] == "dcp" and listed["source"]["key"] == "model"
    names = {"conv": "backbone.conv", "bn": "backbone.norm", "fc": "head"}
    want = {names[k.split(".")[0]] + k[len(k.split(".")[0]):]: v for k, v in expected.items()}
    assert {k: (v["shape"], v["dtype"]) for k, v in listed["keys"].items()} == {
        k: (list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in want.items()
    }


def test_apply_with_renames_loads_every_value(tmp_path, capsys, trained):
    folder, expected = trained
    out_report = tmp_path / "report.json"
    code, out, err = run(capsys, "apply", rules(tmp_path, folder), "--report", out_report, "--save", tmp_path / "out.pt")
    assert (code, err) == (0, ""), out
    report = json.loads(out_report.read_text())
    assert report["ok"] and report["totals"]["loaded"] == len(expected)
    loaded = torch.load(tmp_path / "out.pt", weights_only=True)
    for k, v in expected.items():
        assert torch.equal(loaded[k], v), k


def test_dry_run_reads_no_data(tmp_path, capsys, trained):
    """The data files are zeroed (same size): planning and a dry run succeed, a real apply fails
    with the file named, and the module it would load is untouched."""
    folder, _ = trained
    data = next(folder.glob("*.distcp"))
    data.write_bytes(b"\x00" * data.stat().st_size)
    code, out, err = run(capsys, "apply", rules(tmp_path, folder), "--dry-run")
    assert (code, err) == (0, ""), out
    code, out, err = run(capsys, "apply", rules(tmp_path, folder))
    assert code == 3 and data.name in err and "corrupt" in err


def test_output_save_dcp_reads_back_with_torch_dcp_load(tmp_path, capsys, trained):
    folder, expected = trained
    path = rules(tmp_path, folder, "output: {save: out.dcp}\n")
    code, out, err = run(capsys, "apply", path)
    assert (code, err) == (0, ""), out
    saved = tmp_path / "out.dcp"
    assert (saved / ".metadata").is_file()
    back = dcp_load(saved, expected)
    for k, v in expected.items():
        assert torch.equal(back[k], v), k
    # saved again: the folder is replaced whole, nothing of remap's temporaries is left
    code, _, err = run(capsys, "apply", path)
    assert (code, err) == (0, "")
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    assert all(torch.equal(dcp_load(saved, expected)[k], v) for k, v in expected.items())
    # and it is a source like any other
    code, out, _ = run(capsys, "inspect", saved, "--flat")
    assert code == 0 and "fc.weight" in out


def test_save_into_a_folder_that_is_no_dcp_checkpoint_is_refused_before_loading(tmp_path, capsys, trained):
    folder, _ = trained
    precious = tmp_path / "work.dcp"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    code, out, err = run(capsys, "apply", rules(tmp_path, folder), "--save", precious)
    assert code == 2 and "no .metadata" in err
    assert (precious / "notes.txt").read_text() == "keep me"


def test_save_dcp_with_max_shard_size_is_a_usage_error(tmp_path, capsys, trained):
    folder, _ = trained
    code, _, err = run(capsys, "apply", rules(tmp_path, folder), "--save", tmp_path / "o.dcp", "--max-shard-size", "1MB")
    assert code == 2 and "max_shard_size" in err
