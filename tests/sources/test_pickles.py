"""Pickles: a checkpoint that would run code is refused unless trusted; harmless metadata loads.
(A pickle holding a module tree is read without running anything instead: test_pickled_module.py.)

The malicious checkpoints below write a marker file when unpickled. Without
``trust_pickle`` remap refuses them, naming the global and the way to opt in, and the
marker never appears, whatever the command (inspect, apply --dry-run, apply). With
``--trust-pickle`` / ``trust_pickle: true`` (the only way in) remap warns, and the
marker does appear: the opt-in is real.
"""

from __future__ import annotations

import argparse
import collections
import os
import pathlib
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from weights import Small, perturb

import remap
from remap.cli import main
from remap.errors import SourceError
from remap.sources.readers import open_source
from remap.sources.torch_reader import PICKLE_ALLOW_LIST

np = pytest.importorskip("numpy")

SMALL = "weights:Small"
TRUST = "`source.trust_pickle: true` in the rules or `--trust-pickle` on the command line"


class ExecPayload:
    """Unpickling this runs ``exec`` (the classic: any code at all)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",))


class SystemPayload:
    """Unpickling this runs ``os.system`` (its global is posix.system, a module torch blocks outright)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (os.system, (f"touch {self.marker}",))


class PathGadget:
    """Unpickling this calls ``PosixPath.write_text``: an allowed class must not open its methods."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> Any:
        return (pathlib.PosixPath.write_text, (pathlib.PosixPath(self.marker), "pwned"))


PAYLOADS = [(ExecPayload, "builtins.exec"), (SystemPayload, "posix.system"), (PathGadget, "builtins.getattr")]  # protocol 2 pickles a method as getattr(cls, name)


def _checkpoint(tmp_path: Path, payload: Any, legacy: bool = False) -> tuple[Path, Path]:
    marker = tmp_path / "PWNED"
    state = perturb(Small()).state_dict()
    path = tmp_path / ("legacy.pth" if legacy else "evil.pth")
    torch.save({"state_dict": state, "config": payload(marker)}, path, _use_new_zipfile_serialization=not legacy)
    assert not marker.exists()
    return path, marker


def _rules(tmp_path: Path, extra: str = "") -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(f"version: 1\ntarget: {{model: '{SMALL}'}}\n{extra}")
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: Any) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------- refused by default


@pytest.mark.parametrize(("payload", "name"), PAYLOADS, ids=["exec", "os.system", "path-gadget"])
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_code_in_a_pickle_is_refused_and_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str], payload: Any, name: str, legacy: bool) -> None:
    path, marker = _checkpoint(tmp_path, payload, legacy)
    rules = _rules(tmp_path)
    for argv in (["inspect", path], ["apply", rules, "--source", path, "--dry-run"], ["apply", rules, "--source", path],
                 ["apply", rules, "--source", path, "--explain", "fc.weight"]):  # fmt: skip
        code, out, err = run(capsys, *argv)
        assert (code, out) == (3, ""), (argv, err)
        assert err.startswith(f"remap: error: {path}: torch.load refused this pickle: ")
        assert f"the global {name!r}" in err, err
        assert "Unpickling it could run arbitrary code" in err and TRUST in err
        assert "Traceback" not in err
        assert not marker.exists(), f"{argv} ran the payload"


def test_the_python_api_refuses_too(tmp_path: Path) -> None:
    path, marker = _checkpoint(tmp_path, ExecPayload)
    for call in (lambda: open_source(path), lambda: remap.plan(Small(), path, {"version": 1}),
                 lambda: remap.load(Small(), path, {"version": 1}),
                 lambda: remap.load(Small(), path, {"version": 1, "source": {"trust_pickle": False}})):  # fmt: skip
        with pytest.raises(SourceError, match="the global 'builtins.exec'"):
            call()
    assert not marker.exists()


# ---------------------------------------------------------------------------- trusted: the only way in


def test_trust_pickle_flag_runs_it_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, marker = _checkpoint(tmp_path, ExecPayload)
    code, out, err = run(capsys, "inspect", path, "--trust-pickle")
    assert code == 0 and "state_dict" in out
    assert err == (f"remap: warning: {path}: loaded with torch.load(weights_only=False) because --trust-pickle is given; "
                   "unpickling runs code from the file\n")
    assert marker.read_text() == "pwned"  # the opt-in is real


def test_trust_pickle_in_the_rules_runs_it_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, marker = _checkpoint(tmp_path, ExecPayload)
    rules = _rules(tmp_path, f"source: {{path: {path.name}, trust_pickle: true}}\n")
    code, out, err = run(capsys, "apply", rules, "--json")
    assert code == 0, err
    assert err.startswith("remap: warning: ") and "because source.trust_pickle is set in the rules" in err
    assert marker.exists()


def test_the_cli_prints_the_trust_warning(tmp_path: Path) -> None:
    """End to end, in a fresh process: the refusal, then the warning on stderr when trusted."""
    path, marker = _checkpoint(tmp_path, ExecPayload)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    refused = subprocess.run([sys.executable, "-m", "remap", "inspect", str(path)], capture_output=True, text=True, env=env, timeout=120)
    assert refused.returncode == 3 and "the global 'builtins.exec'" in refused.stderr and "Traceback" not in refused.stderr
    assert not marker.exists()
    trusted = subprocess.run([sys.executable, "-m", "remap", "inspect", str(path), "--trust-pickle"], capture_output=True, text=True, env=env, timeout=120)
    assert trusted.returncode == 0, trusted.stderr
    assert "UserWarning" not in trusted.stderr
    assert (f"remap: warning: {path}: loaded with torch.load(weights_only=False) because --trust-pickle is given; "
            "unpickling runs code from the file") in trusted.stderr.splitlines()
    assert marker.exists()


def test_torchscript_is_read_without_trust_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                           monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    path = tmp_path / "scripted.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.save(torch.jit.script(perturb(Small())), str(path))
    code, out, err = run(capsys, "inspect", path)
    assert (code, err) == (0, "") and "torchscript" in out and "read without running its code" in out
    monkeypatch.setattr("remap.sources.torchscript_reader.MAX_CODE_BYTES", 10)  # past what it reads without running
    code, out, err = run(capsys, "inspect", path)
    assert code == 3 and "TorchScript archive that remap cannot read without running it" in err and TRUST in err
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        code, out, err = run(capsys, "inspect", path, "--trust-pickle")
    assert code == 0 and "torchscript" in out
    assert f"remap: warning: {path}: TorchScript archive loaded with torch.jit.load because --trust-pickle is given\n" in err


# ---------------------------------------------------------------------------- harmless metadata loads


HARMLESS = {
    "numbers and strings": {"epoch": 7, "lr": 0.1, "name": "run-3", "ok": True, "none": None, "tags": ["a", "b"], "pair": (1, 2.5)},
    "argparse.Namespace": argparse.Namespace(lr=0.1, arch="resnet", layers=[1, 2]),
    "numpy scalars": {"best": np.float64(0.87), "step": np.int64(1200), "f32": np.float32(2.5), "flag": np.bool_(True), "s": np.str_("x")},
    "numpy arrays": {"mean": np.array([0.485, 0.456, 0.406]), "ids": np.arange(6, dtype=np.int32).reshape(2, 3), "names": np.array(["a", "bc"]),
                     "objects": np.array(["a", None], dtype=object)},
    "pathlib paths": {"data": pathlib.PosixPath("/data/imagenet"), "pure": pathlib.PurePosixPath("a/b"), "win": pathlib.PureWindowsPath("c:/x")},
    "OrderedDict": collections.OrderedDict(a=1, b=2),
    "nested": argparse.Namespace(out=pathlib.PosixPath("runs/3"), best=np.float64(0.5), hist=collections.OrderedDict(e=np.arange(2))),
}  # fmt: skip


@pytest.mark.parametrize("extra", list(HARMLESS.values()), ids=list(HARMLESS))
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_harmless_metadata_loads_without_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: Any, legacy: bool) -> None:
    model = perturb(Small(), seed=3)
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": model.state_dict(), "meta": extra}, path, _use_new_zipfile_serialization=not legacy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no trust warning: nothing was trusted
        with open_source(path) as src:
            assert src.description["entries"]["meta"]
            assert src.description["notes"] == [] or legacy
        code, out, err = run(capsys, "inspect", path)
        assert (code, err) == (0, "")
        code, out, err = run(capsys, "apply", _rules(tmp_path), "--source", path, "--json")
        assert (code, err) == (0, "")
    target = Small()
    remap.load(target, path, {"version": 1})
    assert torch.equal(target.fc.weight, model.fc.weight)


def test_a_numpy_1_checkpoint_loads_under_numpy_2(tmp_path: Path) -> None:
    """numpy 1 pickles its scalars as numpy.core.multiarray.scalar; numpy 2 as numpy._core...."""
    path = tmp_path / "old.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "best": np.float64(0.5), "mean": np.zeros(2)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    old = data.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n")
    if old == data:
        old = data.replace(b"numpy.core.multiarray\n", b"numpy._core.multiarray\n")  # running under numpy 1: the other way round
    assert old != data
    path.write_bytes(old)
    with open_source(path) as src:
        assert src.description["entries"]["best"] in ("np.float64(0.5)", "0.5")  # numpy 2's repr, numpy 1's
        assert src.description["entries"]["mean"] == "array([0., 0.])"


def test_anything_else_names_the_global_to_allow(tmp_path: Path) -> None:
    path = tmp_path / "c.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "when": __import__("datetime").date(2024, 1, 2)}, path)
    with pytest.raises(SourceError) as info:
        open_source(path)
    assert "it needs the global 'datetime.date'" in str(info.value) and TRUST in str(info.value)
    torch.save({"state_dict": {"w": torch.ones(2)}, "arr": np.zeros(2, dtype=[("a", "f4")])}, path)  # a structured array: VoidDType
    with pytest.raises(SourceError) as info:
        open_source(path)
    assert "it needs the global 'numpy.dtypes.VoidDType'" in str(info.value)


def test_the_allow_list_is_scoped_to_remaps_loads(tmp_path: Path) -> None:
    """remap's allow-list applies to its own torch.load calls only, and keeps the caller's additions."""

    class Mine:
        pass

    torch.serialization.add_safe_globals([Mine])
    try:
        before = set(map(str, torch.serialization.get_safe_globals()))
        path = tmp_path / "ns.pth"
        torch.save({"state_dict": {"w": torch.ones(2)}, "args": argparse.Namespace(a=1)}, path)
        with open_source(path):
            pass
        assert set(map(str, torch.serialization.get_safe_globals())) == before
        with pytest.raises(Exception, match="argparse.Namespace"):
            torch.load(path, weights_only=True)  # a plain torch.load is as strict as ever
    finally:
        torch.serialization.clear_safe_globals()


def test_the_allow_list_names_only_data_types() -> None:
    assert "argparse.Namespace" in PICKLE_ALLOW_LIST and "numpy.dtype" in PICKLE_ALLOW_LIST
    for name in PICKLE_ALLOW_LIST:
        module = name.rsplit(".", 2)[0]
        assert module.split(".")[0] in ("argparse", "collections", "pathlib", "numpy"), name
    assert not any(word in name for name in PICKLE_ALLOW_LIST for word in ("exec", "eval", "system", "open", "getattr", "import", "load"))
