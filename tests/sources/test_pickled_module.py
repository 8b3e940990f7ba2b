"""Whole-model pickles (``torch.save(model)``) read without running anything from the file:
keys, values and saved requires_grad compared with the real module's ``state_dict()``;
checkpoints nesting a module; hostile files (payloads that would write a file, classes that
no longer exist, truncated and bit-flipped files) end in a SourceError or a clean load with
nothing run, no hang and bounded memory."""

from __future__ import annotations

import collections
import importlib
import io
import json
import os
import pathlib
import pickle
import random
import subprocess
import sys
import textwrap
import uuid
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from weights import Small, Tied, perturb

import remap
from remap.errors import SourceError
from remap.loading.streaming import read_tensor
from remap.sources import pickled_module
from remap.sources.pickled_module import Storages, inert_load
from remap.sources.readers import open_source

TRUST = "`source.trust_pickle: true` in the rules or `--trust-pickle` on the command line"
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def source_error(fn: Any, *args: Any, **kwargs: Any) -> SourceError:
    with pytest.raises(SourceError) as info:
        fn(*args, **kwargs)
    assert info.value.exit_code == 3
    return info.value


def save(obj: Any, path: Path, legacy: bool = False) -> Path:
    torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def rewrite_record(src: Path, dst: Path, suffix: str, change: Any) -> Path:
    """Copy a torch zip archive with the record ending in ``suffix`` replaced by ``change(bytes)`` (CRC recomputed)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            zout.writestr(info, change(data) if info.filename.endswith(suffix) else data)
    return dst


# ---------------------------------------------------------------------------- models and their state_dict


class Mixed(nn.Module):
    """Everything state_dict has to get right: nesting, a frozen parameter, a missing bias,
    a non-persistent buffer, parameter containers, int and half tensors, two tensors viewing one storage."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4)) for _ in range(2)])
        self.heads = nn.ModuleDict({"a": nn.Linear(4, 2, bias=False), "b": nn.Linear(4, 3).half()})
        self.norm = nn.BatchNorm1d(4, affine=False)
        self.extra = nn.ParameterList([nn.Parameter(torch.randn(3)), nn.Parameter(torch.randn(2, 2))])
        self.table = nn.ParameterDict({"x": nn.Parameter(torch.randn(5).to(torch.bfloat16))})
        base = torch.arange(24.0)
        self.view = nn.Parameter(base[2:14].view(3, 4))
        self.register_buffer("strided", base[::5])  # same storage, every fifth element
        self.register_buffer("ids", torch.arange(6, dtype=torch.int32).reshape(2, 3))
        self.register_buffer("scratch", torch.zeros(7), persistent=False)
        self.nothing = None
        self.blocks[0][0].weight.requires_grad_(False)
        self.table["x"].requires_grad_(False)


MODELS = {"small": lambda: perturb(Small()), "tied": lambda: perturb(Tied()), "mixed": Mixed,
          "transformer": lambda: nn.TransformerEncoderLayer(8, 2, dim_feedforward=16)}  # fmt: skip


def assert_matches(src: Any, model: nn.Module) -> None:
    """Keys (in order), shapes, dtypes, values and saved requires_grad are those of the model's own state_dict."""
    state = model.state_dict()
    assert list(src.meta) == list(state)
    for key, value in state.items():
        got = src.read(key)
        assert got.dtype == value.dtype and got.shape == value.shape and torch.equal(got, value), key
        assert torch.equal(read_tensor(src, key), value), key  # through its span, as the engine reads it
    params = dict(model.named_parameters(remove_duplicate=False))
    assert src.requires_grad == {k: params[k].requires_grad for k in state if k in params}


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("name", list(MODELS))
def test_keys_values_and_flags_are_the_modules_own(tmp_path: Path, name: str, legacy: bool) -> None:
    model = MODELS[name]()
    path = save(model, tmp_path / "model.pt", legacy)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing trusted, nothing warned
        with open_source(path) as src:
            assert src.description["format"] == ("torch-module-legacy" if legacy else "torch-module")
            assert_matches(src, model)


def test_float8_and_uint16_tensors(tmp_path: Path) -> None:
    """torch writes these with _rebuild_tensor_v3 (an untyped storage and a dtype global)."""
    model = nn.Module()
    model.register_buffer("f8", torch.tensor([0.5, -2.0, 3.0]).to(torch.float8_e4m3fn))
    model.register_buffer("u16", torch.tensor([1, 65535]).to(torch.uint16))
    with open_source(save(model, tmp_path / "m.pt")) as src:
        assert src.meta["f8"].dtype == "float8_e4m3fn" and src.meta["u16"].dtype == "uint16"
        assert torch.equal(src.read("f8").view(torch.uint8), model.f8.view(torch.uint8))
        assert torch.equal(src.read("u16").to(torch.int32), model.u16.to(torch.int32))


def test_the_description_names_each_keys_owner(tmp_path: Path) -> None:
    model = Mixed()
    with open_source(save(model, tmp_path / "m.pt")) as src:
        d = src.description
    assert d["notes"][0] == (
        f"whole-model pickle read without running it: saved classes: {Mixed.__module__}.Mixed, "
        "torch.nn.modules.container.ModuleList, torch.nn.modules.container.Sequential, torch.nn.modules.linear.Linear, "
        "torch.nn.modules.normalization.LayerNorm, torch.nn.modules.container.ModuleDict, "
        "torch.nn.modules.batchnorm.BatchNorm1d, torch.nn.modules.container.ParameterList, "
        "torch.nn.modules.container.ParameterDict"
    )
    assert d["entries"]["blocks.0.0.weight"] == "parameter of torch.nn.modules.linear.Linear, requires_grad=False"
    assert d["entries"]["norm.running_mean"] == "buffer of torch.nn.modules.batchnorm.BatchNorm1d"
    assert d["entries"]["view"] == f"parameter of {Mixed.__module__}.Mixed"


def test_planning_reads_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = perturb(Small())
    path = save(model, tmp_path / "m.pt")

    def refuse(*args: Any) -> None:
        raise AssertionError("tensor data read while planning")

    monkeypatch.setattr(pickled_module.StoredReader, "_bytes", refuse)
    plan = remap.plan(Small(), path, {"version": 1})
    assert plan.ok and len(plan.source_meta) == 8


# ---------------------------------------------------------------------------- checkpoints nesting a module


class Trainer:
    """Like a Lightning or HF Trainer object: the model under .model (and the same one under .model_wrapped)."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.model_wrapped = model
        self.epoch = 3
        self.args = {"lr": 0.1}


def test_a_dict_or_an_object_nesting_the_module(tmp_path: Path) -> None:
    model = perturb(Small())
    for obj in ({"model": model, "epoch": 3}, Trainer(model), {"run": {"model": model}, "epoch": 3}):
        with open_source(save(obj, tmp_path / "c.pt")) as src:
            assert_matches(src, model)
            assert src.description["key_detected"] and src.description["key"] in ("model", "run.model")
            assert src.description["entries"]["epoch"] == "3"


def test_source_key_paths_into_objects_modules_and_dicts(tmp_path: Path) -> None:
    model = perturb(Small())
    path = save({"trainer": Trainer(model), "state_dict": model.state_dict()}, tmp_path / "c.pt")
    with open_source(path, key="trainer.model") as src:
        assert_matches(src, model)
    with open_source(path, key="trainer.model.bn") as src:  # a submodule: its own keys
        assert list(src.meta) == list(model.bn.state_dict())
    with open_source(path, key="state_dict") as src:  # a plain state_dict beside it: no flags kept there
        assert list(src.meta) == list(model.state_dict()) and src.requires_grad == {}
    err = source_error(open_source, path)
    assert str(err) == (
        f"{path}: the checkpoint holds several sets of weights: 'trainer.model' (weights.Small) and 'state_dict' "
        "(OrderedDict); say which to load with `source.key` (e.g. `key: trainer.model`)"
    )
    err = source_error(open_source, path, key="trainer.modle")
    assert "no entry 'modle' under 'trainer'" in str(err) and "did you mean 'model'" in str(err)
    assert "holds a int, expected a module or a dict of tensors" in str(source_error(open_source, path, key="trainer.epoch"))


def test_a_refused_pickle_without_a_module_is_still_refused(tmp_path: Path) -> None:
    """The inert reader reads module trees only: a state_dict next to a custom class keeps the old refusal."""
    path = save({"state_dict": perturb(Small()).state_dict(), "config": Trainer.__new__(Trainer)}, tmp_path / "c.pt")
    err = str(source_error(open_source, path))
    assert f"torch.load refused this pickle: it needs the global '{Trainer.__module__}.Trainer'" in err and TRUST in err


class Opaque:
    """Not a tensor: what a parameter slot holds when code put something else there."""


def test_what_cannot_be_read_inertly_names_what_was_met_and_how_to_opt_in(tmp_path: Path) -> None:
    model = perturb(Small())
    model.fc._parameters["scale"] = Opaque()  # bypassing register_parameter's checks
    path = save(model, tmp_path / "m.pt")
    err = source_error(open_source, path)
    assert str(err) == (
        f"{path}: the parameter 'fc.scale' of torch.nn.modules.linear.Linear is a {Opaque.__module__}.Opaque object, "
        "not a tensor remap can read. remap reads such a file only by unpickling it with torch.load, which can run "
        f"code from the file: opt in with {TRUST} if you trust it"
    )


def test_trust_pickle_reads_what_the_inert_reader_cannot(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = perturb(Small())
    path = save(model, tmp_path / "m.pt")
    monkeypatch.setattr(pickled_module, "MAX_PICKLE_BYTES", 100)  # past what it reads without running it
    err = str(source_error(open_source, path))
    assert "its pickle is " in err and "more than the 100 remap reads without running it" in err and TRUST in err
    with pytest.warns(UserWarning, match="loaded with torch.load\\(weights_only=False\\)"):
        src = open_source(path, trust_pickle=True)
    assert src.description["format"] == "torch-zip"
    assert torch.equal(src.read("fc.weight"), model.fc.weight.detach())


# ---------------------------------------------------------------------------- hostile


class Payload:
    """Unpickling this would write ``marker`` by the means ``how`` names."""

    def __init__(self, marker: Path, how: str) -> None:
        self.marker, self.how = marker, how

    def __reduce__(self) -> Any:
        if self.how == "exec":
            return exec, (f"open({str(self.marker)!r}, 'w').write('pwned')",)
        if self.how == "system":
            return os.system, (f"touch {self.marker}",)
        if self.how == "open":
            return open, (str(self.marker), "w")
        return pathlib.PosixPath.write_text, (pathlib.PosixPath(self.marker), "pwned")


class WritesOnSetstate:
    """A class that exists in the reading process and writes a file when unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __setstate__(self, state: dict[str, Any]) -> None:
        Path(state["marker"]).write_text("pwned")
        self.__dict__.update(state)


@pytest.mark.hostile
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize("how", ["exec", "system", "open", "write_text", "setstate"])
def test_a_module_carrying_a_payload_loads_and_runs_nothing(tmp_path: Path, how: str, legacy: bool) -> None:
    marker = tmp_path / "PWNED"
    model = perturb(Small())
    model.config = WritesOnSetstate(marker) if how == "setstate" else Payload(marker, how)  # in the module's __dict__
    model.fc.hook = Payload(marker, "exec") if how != "setstate" else None
    path = save(model, tmp_path / "evil.pt", legacy)
    assert not marker.exists()
    target = Small()
    report = remap.load(target, path, {"version": 1})
    assert report.ok and torch.equal(target.fc.weight, model.fc.weight)
    assert not marker.exists(), "reading the file ran its payload"
    assert "never imported or called" in report.source["notes"][1]
    with warnings.catch_warnings():  # the payload is real: torch.load, trusting the file, runs it
        warnings.simplefilter("ignore")
        torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.hostile
def test_nothing_the_file_names_is_imported(tmp_path: Path) -> None:
    """A class whose module exists but is not imported stays unimported: its code never runs."""
    name = f"evil_{uuid.uuid4().hex[:8]}"
    marker = tmp_path / "IMPORTED"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(f"""
        import torch
        open({str(marker)!r}, "w").write("imported")  # runs on import
        class Net(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.fc = torch.nn.Linear(2, 2)
    """))
    sys.path.insert(0, str(tmp_path))
    try:
        model = importlib.import_module(name).Net()
        path = save(model, tmp_path / "m.pt")
        marker.unlink()
        sys.modules.pop(name)
        with open_source(path) as src:
            assert_matches(src, model)
            assert f"saved classes: {name}.Net" in src.description["notes"][0]
        assert name not in sys.modules and not marker.exists()
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


@pytest.mark.hostile
def test_a_module_that_contains_itself(tmp_path: Path) -> None:
    model = nn.Module()
    model.add_module("inner", nn.Linear(2, 2))
    model.inner.add_module("loop", model)
    err = str(source_error(open_source, save(model, tmp_path / "m.pt")))
    assert err.endswith("module 'inner.loop' contains itself (a cycle in the module tree): it has no state_dict "
                        "(torch's own state_dict() would never return)")  # fmt: skip


@pytest.mark.hostile
def test_a_module_shared_exponentially_many_times_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """30 levels of a module holding the one below twice: 2**30 paths, refused after MAX_MODULES visits."""
    level = nn.Linear(1, 1)
    for _ in range(30):
        up = nn.Module()
        up.a, up.b = level, level
        level = up
    path = save(level, tmp_path / "m.pt")
    monkeypatch.setattr(pickled_module, "MAX_MODULES", 5000)
    assert "its module tree has more than 5,000 modules (a module shared many times over?)" in str(source_error(open_source, path))
    monkeypatch.setattr(pickled_module, "MAX_DEPTH", 10)
    monkeypatch.setattr(pickled_module, "MAX_MODULES", 10**6)
    assert "its modules are nested more than 10 deep" in str(source_error(open_source, path))


@pytest.mark.hostile
def test_a_view_past_its_storage_is_refused(tmp_path: Path) -> None:
    model = nn.Module()
    model.w = nn.Parameter(torch.randn(7, 5))
    good = save(model, tmp_path / "m.pt")
    bad = rewrite_record(good, tmp_path / "bad.pt", "data.pkl", lambda b: b.replace(b"K\x07K\x05\x86", b"K\x09K\x05\x86", 1))
    err = str(source_error(open_source, bad))
    assert err == (f"{bad}: corrupt checkpoint: tensor 'w' ([9, 5], stride [5, 1], offset 0) needs 180 bytes of "
                   "storage '0', which holds 140")  # fmt: skip


@pytest.mark.hostile
def test_the_unpickler_on_mutated_pickles_raises_only_source_errors() -> None:
    """300 random mutations of a module's pickle (bytes flipped, cut, dropped, spliced): each
    reads or ends in a SourceError; nothing else escapes."""
    buffer = io.BytesIO()
    pickle.dump(perturb(Small()), buffer, protocol=2)  # storages become persistent ids only in torch.save:
    data = buffer.getvalue()  # here each tensor pickles as torch's own reduce, globals and all
    rng = random.Random(7)
    outcomes = collections.Counter()
    for _ in range(300):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(bad))
            kind = rng.randrange(4)
            if kind == 0:
                bad[pos] ^= 1 << rng.randrange(8)
            elif kind == 1:
                del bad[pos:]
            elif kind == 2:
                del bad[pos : pos + rng.randint(1, 8)]
            else:
                bad[pos:pos] = data[rng.randrange(len(data)) :][: rng.randint(1, 16)]
        try:
            inert_load(io.BytesIO(bytes(bad)), Storages())
            outcomes["read"] += 1
        except SourceError:
            outcomes["error"] += 1
    assert outcomes["error"] > 100


@pytest.mark.hostile
def test_a_huge_memo_index_costs_nothing() -> None:
    """The C unpickler allocates and zeroes a memo list as long as the largest index (16 GB
    here); the inert reader's pure-Python unpickler keeps a dict."""
    loaded = inert_load(io.BytesIO(b"\x80\x02N" + b"r\xff\xff\xff\x7f" + b"0" + b"j\xff\xff\xff\x7f."), Storages())
    assert loaded.result is None
    missing = b"\x80\x02" + b"j\x00\x00\x00\x01."
    assert "Memo value not found at index 16777216" in str(source_error(inert_load, io.BytesIO(missing), Storages()))


@pytest.mark.hostile
def test_extension_codes_are_refused() -> None:
    """EXT opcodes name globals through the reading process's copyreg registry, never the file."""
    err = source_error(inert_load, io.BytesIO(b"\x80\x02\x82\x01."), Storages())
    assert "extension registry" in str(err)


#: Reads each damaged copy of a file in a fresh interpreter (under a 3 GB address-space limit,
#: see test_the_torch_prescan_of_a_huge_memo_index): prints how many ended in a SourceError
#: and how many read completely, and the peak RSS.
FUZZ = """
import json, random, resource, sys, warnings, zipfile
from pathlib import Path
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
warnings.simplefilter("ignore")
from remap.errors import SourceError
from remap.sources.readers import open_source
path, mode, count = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
data, rng, done = path.read_bytes(), random.Random(11), {"error": 0, "read": 0}

def rewrite(record, change):
    with zipfile.ZipFile(path) as zin, zipfile.ZipFile(bad, "w") as zout:
        for info in zin.infolist():
            raw = zin.read(info)
            zout.writestr(info, change(raw) if info.filename.endswith(record) else raw)

def flip(raw):
    raw = bytearray(raw)
    raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
    return bytes(raw)

for i in range(count):
    bad = path.with_name(f"bad{i}{path.suffix}")
    if mode == "truncate":
        bad.write_bytes(data[: (len(data) * i) // count])
    elif mode == "flip":
        bad.write_bytes(flip(data))
    else:  # flip a byte of this record, its CRC made to match
        rewrite(mode, flip)
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


def fuzz(path: Path, mode: str, count: int) -> dict[str, int]:
    """Run :data:`FUZZ` on ``path``: ``mode`` is truncate, flip (a bit anywhere) or a record's
    name (a bit of that record, its CRC fixed, so that the pickle itself is what is damaged)."""
    done = subprocess.run([sys.executable, "-c", FUZZ, str(path), mode, str(count)], capture_output=True, text=True,
                          env=ENV, cwd=path.parent, timeout=300)  # fmt: skip
    assert done.returncode == 0, f"the process failed ({done.returncode}): {done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.hostile
@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_truncated_files_end_in_a_source_error(tmp_path: Path, legacy: bool) -> None:
    path = save(Mixed(), tmp_path / "m.pt", legacy)
    done = fuzz(path, "truncate", 30)
    assert done["read"] == 0 and done["error"] == 30 and done["rss_mb"] < 1000, done


@pytest.mark.hostile
@pytest.mark.parametrize(("legacy", "mode"), [(False, "flip"), (False, "data.pkl"), (True, "flip")],
                         ids=["zip", "zip-pickle-crc-fixed", "legacy"])  # fmt: skip
def test_bit_flipped_files_end_in_a_source_error_or_a_clean_read(tmp_path: Path, legacy: bool, mode: str) -> None:
    """Each damaged copy is a SourceError or a clean read, within bounded memory (the prescan's
    memo is a dict: see test_the_torch_prescan_of_a_huge_memo_index)."""
    path = save(Mixed(), tmp_path / "m.pt", legacy)
    done = fuzz(path, mode, 24)
    assert done["read"] + done["error"] == 24 and done["error"] > 0, done
    assert done["rss_mb"] < 1000, done


#: Opens one file and prints the growth of the peak RSS, in MB.
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


@pytest.mark.hostile
def test_the_torch_prescan_of_a_huge_memo_index(tmp_path: Path) -> None:
    model = Mixed()
    good = save(model, tmp_path / "m.pt")
    data = zipfile.ZipFile(good).read("m/data.pkl")
    at = data.index(b"r", data.index(b"r\x00\x01\x00\x00"))  # the first LONG_BINPUT (index 256)
    bomb = data[: at + 4] + b"\x01" + data[at + 5 :]  # its high byte: index 2**24 + 256
    path = rewrite_record(good, tmp_path / "bomb.pt", "data.pkl", lambda _: bomb)
    assert inert_load(io.BytesIO(bomb), Storages()) is not None  # the inert reader's own unpickler: a dict, nothing to fill
    done = subprocess.run([sys.executable, "-c", PEAK, str(path)], capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 0, done.stderr
    assert int(done.stdout.strip().splitlines()[-1]) < 100, "the prescan zero-filled a memo list of 2**25 entries"
