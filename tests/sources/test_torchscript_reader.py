"""TorchScript archives read without running their code: keys, order, shapes, dtypes, values and
requires_grad compared with ``torch.jit.load(f).state_dict()`` (in the tests only), including the
real-world archive that the silero-vad package ships; hostile archives end in a SourceError (or
an Unsupported naming what was met, with the way to opt in) with nothing run, no hang, bounded memory."""

from __future__ import annotations

import importlib.resources
import json
import os
import re
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from weights import Small, perturb

import remap
from remap.cli import main
from remap.errors import SourceError
from remap.loading.streaming import read_tensor
from remap.sources.pickled_module import Unsupported
from remap.sources.readers import open_source

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
TRUST = "`source.trust_pickle: true` in the rules or `--trust-pickle` on the command line"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def source_error(fn: Any, *args: Any, **kwargs: Any) -> SourceError:
    with pytest.raises(SourceError) as info:
        fn(*args, **kwargs)
    assert info.value.exit_code == 3
    return info.value


def rewrite_record(src: Path, dst: Path, name: str, change: Any) -> Path:
    """Copy an archive with each record whose name matches the regex ``name`` replaced by
    ``change(bytes)`` (None drops it; CRC recomputed)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if re.search(name, info.filename):
                data = change(data)
            if data is not None:
                zout.writestr(info, data)
    return dst


def jit_save(module: nn.Module, path: Path, trace: Any = None) -> Path:
    scripted = torch.jit.trace(module, trace) if trace is not None else torch.jit.script(module)
    torch.jit.save(scripted, str(path))
    return path


def assert_like_jit(src: Any, path: Path) -> None:
    """Keys in order, shapes, dtypes, values and requires_grad as torch.jit.load gives them."""
    ref = torch.jit.load(str(path)).state_dict(keep_vars=True)
    assert list(src.meta) == list(ref)
    for key, value in ref.items():
        got = src.read(key)
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value.detach()), key
        assert torch.equal(read_tensor(src, key), value.detach()), key
    params = {k for k, _ in torch.jit.load(str(path)).named_parameters()}
    assert src.requires_grad == {k: v.requires_grad for k, v in ref.items() if k in params}


class Scripted(nn.Module):
    """Mangled classes (two Linears of different sizes), a ModuleList, a frozen parameter, a
    parameter-less bias, a non-persistent buffer (TorchScript keeps it), a plain tensor
    attribute (not state), half and int tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.seq = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 4, bias=False))
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])
        self.norm = nn.BatchNorm1d(4)
        self.emb = nn.Embedding(5, 4).half()
        self.scale = nn.Parameter(torch.full((4,), 2.0))
        self.register_buffer("ids", torch.arange(6, dtype=torch.int32))
        self.register_buffer("scratch", torch.zeros(3), persistent=False)
        self.plain = torch.ones(2)
        self.seq[0].weight.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.seq(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x) * self.scale + self.plain.sum() + torch.tensor([1.0, 2.0, 3.0, 4.0])


def test_scripted_and_traced_modules_read_as_torch_jit_load_reads_them(tmp_path: Path) -> None:
    for name, path in (("scripted", jit_save(perturb(Scripted()), tmp_path / "s.pt")),
                       ("small", jit_save(perturb(Small()), tmp_path / "small.jit")),
                       ("traced", jit_save(perturb(Small()).eval(), tmp_path / "t.pt", torch.randn(1, 3, 5, 5)))):  # fmt: skip
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # nothing trusted, nothing warned
            with open_source(path) as src:
                assert src.description["format"] == "torchscript", name
                assert_like_jit(src, path)


def test_torch_jit_load_is_never_called(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = jit_save(perturb(Scripted()), tmp_path / "s.pt")
    ref = {k: v.clone() for k, v in torch.jit.load(str(path)).state_dict().items()}

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("torch.jit.load was called")

    monkeypatch.setattr(torch.jit, "load", refuse)
    with open_source(path) as src:
        for key, value in ref.items():
            assert torch.equal(src.read(key), value)
        notes = src.description["notes"]
    assert notes[0].startswith(f"TorchScript archive read without running its code: saved classes: {Scripted.__module__}.Scripted, "
                               "torch.nn.modules.container.Sequential, torch.nn.modules.linear.Linear, ")  # fmt: skip


def silero_vad_jit() -> Path:
    pytest.importorskip("silero_vad")
    path = importlib.resources.files("silero_vad") / "data" / "silero_vad.jit"
    if not path.is_file():
        pytest.skip("this silero-vad ships no silero_vad.jit")
    return Path(str(path))


def test_the_silero_vad_archive(tmp_path: Path) -> None:
    """A model zoo's TorchScript file: custom classes (vad.model...), mangled names, LSTMCell,
    frozen parameters; its 16 kHz and 8 kHz models under ``_model`` and ``_model_8k``."""
    path = silero_vad_jit()
    with open_source(path) as src:
        assert_like_jit(src, path)
        assert len(src.meta) == 30
        assert "vad.model.vad_annotator.VADRNNJITMerge" in src.description["notes"][0]
        assert src.description["notes"][1] == "1 tensor constant in constants.pkl (used by its code, not part of its state_dict)"
        assert src.description["entries"]["_model.encoder.0.reparam_conv.weight"] == (
            "parameter of torch.nn.modules.conv.Conv1d, requires_grad=False"
        )
    with open_source(path, key="_model") as src:  # one of its two models, without the prefix
        ref = torch.jit.load(str(path))._model.state_dict()
        assert list(src.meta) == list(ref)
        assert all(torch.equal(src.read(k), v) for k, v in ref.items())


def test_inspect_and_apply_without_trust(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    model = perturb(Small())
    model.conv.weight.requires_grad_(False)
    path = jit_save(model, tmp_path / "model.jit")
    assert main(["inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    assert err == "" and "(torchscript)" in out and "saved classes: weights.Small" in out
    assert "conv.weight: parameter of torch.nn.modules.conv.Conv2d, requires_grad=False" in out
    target = Small()
    report = remap.load(target, path, {"version": 1, "freeze": {"from_source": True}})
    assert report.ok and torch.equal(target.fc.weight, model.fc.weight)
    assert {k: p.requires_grad for k, p in target.named_parameters()} == {
        "conv.weight": False, "bn.weight": True, "bn.bias": True, "fc.weight": True, "fc.bias": True}  # fmt: skip
    with torch.no_grad():
        x = torch.randn(2, 3, 6, 6)
        torch.testing.assert_close(target.eval()(x), model.eval()(x), rtol=0, atol=0)


# ---------------------------------------------------------------------------- hostile


@pytest.mark.hostile
def test_a_payload_spliced_into_data_pkl_runs_nothing(tmp_path: Path) -> None:
    """An attribute whose value is exec(...) (what torch.jit.load would never build) is read as a stand-in."""
    marker = tmp_path / "PWNED"
    good = jit_save(perturb(Small()), tmp_path / "s.pt")
    payload = b"X\x04\x00\x00\x00evilcbuiltins\nexec\n(V" + f"open({str(marker)!r}, 'w').write('x')".encode() + b"\ntR"

    def splice(data: bytes) -> bytes:
        end = data.rindex(b"ub")  # the top module's last SETITEMS, then its BUILD
        return data[:end] + payload + data[end:]

    bad = rewrite_record(good, tmp_path / "bad.pt", "/data.pkl$", splice)
    with open_source(bad) as src:
        assert list(src.meta) == list(Small().state_dict())
        for key in src.meta:
            src.read(key)
    assert not marker.exists()


#: The code of Linear: its class is mangled (linear/___torch_mangle_N.py) when other Linears were scripted first.
LINEAR_CODE = r"/code/__torch__/torch/nn/modules/linear(/___torch_mangle_\d+)?\.py$"


@pytest.mark.hostile
def test_a_class_missing_from_the_code_names_what_was_met(tmp_path: Path) -> None:
    good = jit_save(perturb(Small()), tmp_path / "s.pt")
    bad = rewrite_record(good, tmp_path / "bad.pt", LINEAR_CODE, lambda _: None)
    err = source_error(open_source, bad)
    assert isinstance(err, Unsupported)
    assert re.fullmatch(
        re.escape(f"{bad}: is a TorchScript archive that remap cannot read without running it: the module class ")
        + r"__torch__\.torch\.nn\.modules\.linear(\.___torch_mangle_\d+)?\.Linear"
        + re.escape(" has no definition in the archive's code/, so its parameters cannot be told from its buffers. Only "
                    f"torch.jit.load reads it, which runs its code: opt in with {TRUST} if you trust it"),
        str(err),
    ), str(err)


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("suffix", "change", "message"),
    [
        ("/byteorder$", lambda _: b"big", "the record s/byteorder says 'big', but this machine is little-endian"),
        ("/data.pkl$", lambda _: None, "is a TorchScript archive that remap cannot read without running it: it has no s/data.pkl"),
        ("/data/0$", lambda d: d[:2], "corrupt checkpoint: storage '0' of tensor 'conv.weight' needs 432 bytes but its record holds 2"),
        ("/data/0$", lambda _: None, "corrupt checkpoint: tensor 'conv.weight' names storage '0', which the file does not hold"),
        (LINEAR_CODE, lambda d: d.replace(b'"bias", ]', b'"bias", "gone", ]'), "declares 'gone', which its module in data.pkl lacks"),
        ("/data.pkl$", lambda d: d[: len(d) // 2], "corrupt pickle: it ends before its last opcode (the file is truncated)"),
    ],
    ids=["big-endian", "no-data-pkl", "short-storage", "no-storage", "undeclared", "half-a-pickle"],
)  # fmt: skip
def test_broken_archives_say_what_is_wrong(tmp_path: Path, suffix: str, change: Any, message: str) -> None:
    good = jit_save(perturb(Small()), tmp_path / "s.pt")
    bad = rewrite_record(good, tmp_path / "bad.pt", suffix, change)
    assert message in str(source_error(open_source, bad))


@pytest.mark.hostile
def test_a_huge_memo_index_in_data_pkl(tmp_path: Path) -> None:
    """LONG_BINPUT 2**26: CPython's C unpickler would zero-fill a memo list of 2**27 entries (1 GB);
    the inert reader's stores one entry."""
    good = jit_save(perturb(Small()), tmp_path / "s.pt")
    bad = rewrite_record(good, tmp_path / "bad.pt", "/data.pkl$", lambda d: d.replace(b"q\x00", b"r\x00\x00\x00\x04", 1))
    done = subprocess.run([sys.executable, "-c", PEAK, str(bad)], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.split()[-1]) < 50, done.stderr  # a clean read or a SourceError, in a few MB


#: Opens one file and prints the growth of the peak RSS, in MB (errors on stderr).
PEAK = """
import sys, warnings
import torch
warnings.simplefilter("ignore")
from remap.errors import SourceError
from remap.sources.readers import open_source
def peak():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:"))
before = peak()
try:
    open_source(sys.argv[1]).close()
except SourceError as exc:
    print(exc, file=sys.stderr)
print(peak() - before)
"""

#: Damages an archive ``count`` times (truncated, or one bit of data.pkl flipped with its CRC
#: fixed) and reads each copy in full: prints the outcomes and the peak RSS, in MB.
FUZZ = """
import json, random, resource, sys, warnings, zipfile
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
warnings.simplefilter("ignore")
from remap.errors import SourceError
from remap.sources.readers import open_source
path, mode, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
data, rng, done = path.read_bytes(), random.Random(5), {"error": 0, "read": 0}
for i in range(count):
    bad = path.with_name(f"bad{i}.pt")
    if mode == "truncate":
        bad.write_bytes(data[: (len(data) * i) // count])
    else:
        with zipfile.ZipFile(path) as zin, zipfile.ZipFile(bad, "w") as zout:
            for info in zin.infolist():
                raw = bytearray(zin.read(info))
                if info.filename.endswith("/data.pkl"):
                    raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
                zout.writestr(info, bytes(raw))
    try:
        with open_source(bad) as src:
            for key in src.meta:
                src.read(key)
        done["read"] += 1
    except SourceError:
        done["error"] += 1
    bad.unlink()
with open("/proc/self/status") as f:
    done["rss_mb"] = next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:"))
print(json.dumps(done))
"""


@pytest.mark.hostile
@pytest.mark.parametrize("mode", ["truncate", "flip"])
def test_damaged_archives_end_in_a_source_error_or_a_clean_read(tmp_path: Path, mode: str) -> None:
    path = jit_save(perturb(Scripted()), tmp_path / "s.pt")
    done = subprocess.run([sys.executable, "-c", FUZZ, str(path), mode, "60"], capture_output=True, text=True,
                          env=ENV, cwd=tmp_path, timeout=300)  # fmt: skip
    assert done.returncode == 0, f"the process failed ({done.returncode}): {done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["read"] + result["error"] == 60 and result["rss_mb"] < 1000, result
    if mode == "truncate":
        assert result["error"] == 60, result
    else:
        assert result["error"] > 10, result
