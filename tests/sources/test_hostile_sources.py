"""Hostile checkpoints and indexes (issue 12): each is built here, in tmp_path, and must end in
a clear SourceError (exit code 3) or a normal load, never a crash, a hang, a memory bomb or
a foreign exception. Inputs that could kill or hang the process run in a subprocess with a
timeout, so a regression shows as a failed test, not a dead pytest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from weights import Small, perturb

import remap
from remap.cli import main
from remap.errors import SourceError
from remap.sources.readers import open_source

pytestmark = pytest.mark.hostile
np = pytest.importorskip("numpy")

ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}


def run_python(code: str, *args: str, cwd: Path, timeout: int = 120) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a crash there is a return code here)."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True,
                          env=ENV, cwd=cwd, timeout=timeout)  # fmt: skip


#: Runs remap's CLI once per argv list given as JSON, prints [[exit code, stderr], ...] and the peak RSS in MB.
CLI = """
import contextlib, io, json, sys
from remap.cli import main
def PEAK_MB():  # this process's own peak (VmHWM); ru_maxrss would include the forking parent's pages
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:"))
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    results.append([code, err.getvalue()])
print(json.dumps({"results": results, "rss_mb": PEAK_MB()}))
"""


def cli_in_subprocess(tmp_path: Path, *argvs: list[Any]) -> tuple[list[tuple[int, str]], int]:
    done = run_python(CLI, json.dumps([[str(a) for a in argv] for argv in argvs]), cwd=tmp_path)
    assert done.returncode == 0, f"the process died ({done.returncode}): {done.stderr[-2000:]}"
    out = json.loads(done.stdout.strip().splitlines()[-1])
    return [tuple(r) for r in out["results"]], out["rss_mb"]


def rules(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text("version: 1\ntarget: {model: 'weights:Small'}\n")
    return path


def rewrite_records(src: Path, dst: Path, changes: dict[str, bytes | None]) -> Path:
    """Copy a torch zip archive, replacing (or with None, dropping) records by the end of their name."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, new in changes.items():
                if info.filename.endswith(suffix):
                    data = new
            if data is not None:
                zout.writestr(info, data)
    return dst


def small_checkpoint(tmp_path: Path, name: str = "ok.pth") -> Path:
    path = tmp_path / name
    torch.save(perturb(Small()).state_dict(), path)
    return path


def every_command(tmp_path: Path, path: Path) -> list[list[Any]]:
    r = rules(tmp_path)
    return [["inspect", path], ["apply", r, "--source", path, "--dry-run"], ["apply", r, "--source", path]]


# ---------------------------------------------------------------------------- records torch trusts


@pytest.mark.parametrize(
    ("record", "value", "message"),
    [
        ("/byteorder", b"big", "the record {a}/byteorder says 'big', but this machine is little-endian: remap reads "
         "checkpoints written in its own byte order only (torch.load on the meta device crashes on any other)"),
        ("/byteorder", b"\xff\xfe", "corrupt checkpoint: the record {a}/byteorder is not ASCII text"),
        ("/.storage_alignment", b"0", "corrupt checkpoint: the record {a}/.storage_alignment must be an integer "
         "from 1 to 1048576, found '0'"),
        ("/version", b"zz", "corrupt checkpoint: the record {a}/version must be an integer from 0 to 65536, found 'zz'"),
    ],
    ids=["byteorder-big", "byteorder-binary", "alignment-zero", "version-text"],
)  # fmt: skip
def test_records_that_crash_torch_are_refused_by_every_command(tmp_path: Path, record: str, value: bytes, message: str) -> None:
    """byteorder 'big' is a SIGSEGV and storage alignment 0 a SIGFPE inside torch.load(map_location='meta')."""
    path = rewrite_records(small_checkpoint(tmp_path), tmp_path / "bad.pth", {record: value})
    results, _ = cli_in_subprocess(tmp_path, *every_command(tmp_path, path))
    expected = f"remap: error: {path}: {message.format(a='ok')}\n"
    assert results == [(3, expected)] * 3


def test_a_big_endian_shard_of_an_index_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    good = small_checkpoint(tmp_path)
    rewrite_records(good, folder / "part-1.bin", {"/byteorder": b"big"})
    keys = list(torch.load(good, weights_only=True))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(keys, "part-1.bin")}))
    results, _ = cli_in_subprocess(tmp_path, ["inspect", folder], ["apply", rules(tmp_path), "--source", folder, "--dry-run"])
    index = folder / "pytorch_model.bin.index.json"
    message = (f"remap: error: {index}: shard 'part-1.bin': {folder / 'part-1.bin'}: the record ok/byteorder says 'big', but this machine is "
               "little-endian: remap reads checkpoints written in its own byte order only (torch.load on the meta "
               "device crashes on any other)\n")  # fmt: skip
    assert results == [(3, message)] * 2


def test_a_storage_larger_than_its_record_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "ok.pth"
    torch.save({"w": torch.arange(6.0)}, good)
    path = rewrite_records(good, tmp_path / "short.pth", {"/data/0": b"\0" * 8})
    with pytest.raises(SourceError) as info:
        open_source(path)
    assert str(info.value) == f"{path}: corrupt checkpoint: data.pkl gives storage '0' 24 bytes, but its record ok/data/0 holds 8"


def test_a_storage_without_a_record_is_refused(tmp_path: Path) -> None:
    good = tmp_path / "ok.pth"
    torch.save({"w": torch.arange(6.0)}, good)
    path = rewrite_records(good, tmp_path / "gone.pth", {"/data/0": None})
    with pytest.raises(SourceError) as info:
        open_source(path)
    assert str(info.value) == f"{path}: corrupt checkpoint: data.pkl names storage '0', but the archive has no record ok/data/0"


# ---------------------------------------------------------------------------- allow-listed globals that allocate


class _EmptyArray:
    """Pickles as numpy's ``_reconstruct(ndarray, shape, 'b')``: an uninitialised array of ``shape``."""

    def __init__(self, shape: tuple[int, ...], state: Any = None) -> None:
        self.shape, self.state = shape, state

    def __reduce__(self) -> Any:
        call = (np._core.multiarray._reconstruct, (np.ndarray, self.shape, b"b"))
        return call if self.state is None else (*call, self.state)


class _FromNumpy:
    """Pickles as torch's ``_rebuild_device_tensor_from_numpy(array, float64, 'cpu', False)``."""

    def __init__(self, array: Any) -> None:
        self.array = array

    def __reduce__(self) -> Any:
        return (torch._utils._rebuild_device_tensor_from_numpy, (self.array, torch.float64, "cpu", False))


def test_an_array_built_from_no_data_is_refused_before_allocating(tmp_path: Path) -> None:
    """824 bytes that made apply allocate 12 GB of uninitialised memory (and exit 0)."""
    path = tmp_path / "bomb.pth"
    state = perturb(Small()).state_dict()
    torch.save({**state, "conv.weight": _FromNumpy(_EmptyArray((1_500_000_000,)))}, path)
    assert path.stat().st_size < 10_000
    results, rss_mb = cli_in_subprocess(tmp_path, *every_command(tmp_path, path))
    message = (f"remap: error: {path}: refused a numpy array built with shape (1500000000,) from no data: numpy "
               "pickles an array as an empty one filled from the bytes in its state, so a non-empty shape here would "
               "hand out memory the file never held\n")  # fmt: skip
    assert results == [(3, message)] * 3
    assert rss_mb < 2000  # torch itself is a few hundred MB; the bomb was 12,000


def test_the_allow_list_refuses_an_array_from_no_data_inside_torch_load_too(tmp_path: Path) -> None:
    """The check in remap's allow-list, not only the scan before it: torch.load itself refuses."""
    from remap.sources import torch_reader

    path = tmp_path / "bomb.pth"
    torch.save({"w": _FromNumpy(_EmptyArray((1000,)))}, path)
    with pytest.raises(SourceError, match=r"refused a numpy array built with shape \(1000,\) from no data"):
        torch_reader._torch_load(path, meta=True, weights_only=True, mmap=False)


def test_an_object_array_with_fewer_items_than_its_shape_is_refused(tmp_path: Path) -> None:
    """numpy fills the rest with garbage pointers: reading them is a segfault (hence the subprocess)."""
    path = tmp_path / "short-object.pth"
    short = _EmptyArray((0,), (1, (1000,), np.dtype("O"), False, [1]))
    torch.save({"state_dict": perturb(Small()).state_dict(), "meta": short}, path)
    results, _ = cli_in_subprocess(tmp_path, ["inspect", path])
    assert results == [(3, f"remap: error: {path}: corrupt pickle: a numpy object array of shape (1000,) is given 1 "
                           "items; it needs exactly one per element\n")]  # fmt: skip


def test_a_legacy_pickle_claiming_more_storage_than_the_file_holds(tmp_path: Path) -> None:
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.arange(4.0)}, path, _use_new_zipfile_serialization=False)
    data = path.read_bytes()
    at = data.index(b"K\x04Nt")  # the persistent id ends: BININT1 4 (elements), NONE (no view), TUPLE
    path.write_bytes(data[:at] + b"J" + (2**30).to_bytes(4, "little") + data[at + 2 :])  # BININT 2**30 elements
    with pytest.raises(SourceError) as info:
        open_source(path)
    assert str(info.value) == (f"{path}: corrupt checkpoint: its pickle claims 1 storages of 4294967296 bytes in all, "
                               f"more than the whole file ({path.stat().st_size} bytes)")  # fmt: skip


# ---------------------------------------------------------------------------- tensors apply could not read


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
@pytest.mark.parametrize(
    ("value", "message"),
    [
        (torch.empty(5, device="meta"), "tensor 'fc.bias' has no data in the file (it was saved from the meta device) "
         "(torch._utils._rebuild_meta_tensor_no_storage); remap loads only tensors stored in the file"),
        (torch.eye(5).to_sparse(), "tensor 'fc.bias' is a sparse tensor, which remap cannot load; save it dense "
         "(`t.to_dense()`) (torch._utils._rebuild_sparse_tensor); remap loads only tensors stored in the file"),
    ],
    ids=["meta", "sparse"],
)  # fmt: skip
def test_a_weight_without_data_is_refused_at_planning(tmp_path: Path, capsys: pytest.CaptureFixture[str], value: torch.Tensor,
                                                     message: str, legacy: bool) -> None:  # fmt: skip
    """Dry-run passed, then apply overwrote three tensors and stopped with exit 4."""
    path = tmp_path / "w.pth"
    torch.save({**perturb(Small()).state_dict(), "fc.bias": value}, path, _use_new_zipfile_serialization=not legacy)
    model = Small()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for argv in every_command(tmp_path, path):
        assert main([str(a) for a in argv]) == 3
        assert capsys.readouterr().err == f"remap: error: {path}: {message}\n"
    with pytest.raises(SourceError):
        remap.load(model, path, {"version": 1})
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_meta_tensor_outside_the_weights_is_only_metadata(tmp_path: Path) -> None:
    path = tmp_path / "w.pth"
    torch.save({"state_dict": {"w": torch.ones(2)}, "shadow": torch.empty(3, device="meta")}, path)
    with open_source(path) as src:
        assert list(src.meta) == ["w"] and torch.equal(src.read("w"), torch.ones(2))


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_a_quantized_tensor_in_a_file_is_refused(tmp_path: Path, legacy: bool) -> None:
    path = tmp_path / "q.pth"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated
        q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    torch.save({"state_dict": {"w": torch.ones(2), "q": q}}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(SourceError) as info:
        open_source(path)
    assert str(info.value) == (f"{path}: the tensor at 'state_dict.q' is a quantized tensor, which remap cannot load; "
                               "dequantize it (`t.dequantize()`) before saving (torch._utils._rebuild_qtensor)")  # fmt: skip


def test_sparse_and_quantized_tensors_from_the_api() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # quantized tensors are deprecated
        q = torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8)
    cases = {
        "sparse_coo": (torch.eye(3).to_sparse(), "is a sparse tensor (sparse_coo), which remap cannot load; make it dense (`t.to_dense()`)"),
        "sparse_csr": (torch.eye(3).to_sparse_csr(), "is a sparse tensor (sparse_csr), which remap cannot load; make it dense (`t.to_dense()`)"),
        "quantized": (q, "is a quantized tensor, which remap cannot load; dequantize it (`t.dequantize()`) first"),
    }
    for name, (value, reason) in cases.items():
        with pytest.raises(SourceError) as info:
            open_source({"w": torch.ones(1), name: value})
        assert str(info.value) == f"source (state_dict): tensor {name!r} {reason}"
        with pytest.raises(SourceError):
            remap.load(Small(), {**perturb(Small()).state_dict(), "fc.bias": value}, {"version": 1})


# ---------------------------------------------------------------------------- foreign exceptions


def test_a_safetensors_name_that_is_not_unicode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    header = b'{"\\ud800": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}'
    path = tmp_path / "s.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 4)
    assert main(["inspect", str(path)]) == 3
    assert capsys.readouterr().err == (f"remap: error: {path}: the safetensors header has a name that is not valid "
                                       "Unicode (a lone surrogate '\\ud800' at position 0 of '\\ud800')\n")  # fmt: skip


def test_an_index_with_a_5000_digit_integer(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    index = tmp_path / "m.safetensors.index.json"
    index.write_text('{"metadata": {"total_size": ' + "9" * 5000 + '}, "weight_map": {"w": "a.safetensors"}}')
    with pytest.raises(SourceError) as info:
        open_source(index)
    assert str(info.value).startswith(f"{index}: not a valid JSON index: Exceeds the limit (4300 digits)")


def test_deep_nesting_and_unprintable_integers_in_metadata_are_shown_bounded(tmp_path: Path) -> None:
    deep: dict[str, Any] = {}
    cur = deep
    for _ in range(10_000):
        cur["a"] = {}
        cur = cur["a"]
    path = tmp_path / "deep.pth"
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(60_000)  # the pickler recurses; remap's readers must not
    try:
        torch.save({"state_dict": {"w": torch.ones(2)}, "deep": deep, "args": argparse.Namespace(lr=0.1)}, path)
    finally:
        sys.setrecursionlimit(limit)
    with open_source(path) as src:
        assert src.description["entries"] == {"deep": "{'a': {'a': {'a': {...}}}}", "args": "Namespace(lr=0.1)"}
        assert torch.equal(src.read("w"), torch.ones(2))
    # from the API (a pickle cannot hold a 5000-digit int under weights_only): repr raises ValueError
    memory = {"state_dict": {"w": torch.ones(2)}, "deep": deep, "args": argparse.Namespace(seed=10**5000, lr=0.1)}
    assert open_source(memory).description["entries"] == {
        "deep": "{'a': {'a': {'a': {...}}}}", "args": "Namespace(seed=<an integer of 16610 bits>, lr=0.1)"}


# ---------------------------------------------------------------------------- files that are not files


FIFO_CODE = """
import os, sys
from remap.errors import SourceError
from remap.sources.readers import open_source
try:
    open_source(sys.argv[1])
except SourceError as exc:
    print(exc)
"""


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("x.index.json", "{p}: a FIFO (named pipe), not a regular file: remap reads a sharded checkpoint index only from regular files"),
        ("x.pth", "{p}: a FIFO (named pipe), not a regular file: remap reads checkpoints only from regular files"),
        ("folder/model.safetensors", "{f}: model.safetensors is a FIFO (named pipe), not a regular file: remap reads "
         "checkpoints only from regular files"),
    ],
)  # fmt: skip
def test_a_fifo_is_refused_without_blocking(tmp_path: Path, name: str, message: str) -> None:
    path = tmp_path / name
    path.parent.mkdir(exist_ok=True)
    os.mkfifo(path)
    source = path.parent if name.startswith("folder/") else path
    done = run_python(FIFO_CODE, str(source), cwd=tmp_path, timeout=60)
    assert (done.returncode, done.stdout.strip()) == (0, message.format(p=path, f=path.parent)), done.stderr


def test_a_fifo_shard_is_refused(tmp_path: Path) -> None:
    os.mkfifo(tmp_path / "a.safetensors")
    index = tmp_path / "m.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "a.safetensors"}}))
    done = run_python(FIFO_CODE, str(index), cwd=tmp_path, timeout=60)
    assert done.stdout.strip() == (f"{index}: shard 'a.safetensors' (holding 1 tensors, e.g. 'w') is a FIFO (named pipe), "
                                   "not a regular file")  # fmt: skip


# ---------------------------------------------------------------------------- symlinks and indexes


def _index(folder: Path, weight_map: dict[str, str]) -> Path:
    index = folder / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": weight_map}))
    return index


def test_a_shard_under_a_linked_folder_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    save_file({"w": torch.ones(2)}, str(elsewhere / "s1.safetensors")) if elsewhere.mkdir() is None else None
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "sub").symlink_to(elsewhere)
    index = _index(ckpt, {"w": "sub/s1.safetensors"})
    with pytest.raises(SourceError) as info:
        open_source(index)
    assert str(info.value) == (f"{index}: shard 'sub/s1.safetensors' is a symbolic link (or lies under one) that leads "
                               f"outside the index's folder, to {elsewhere / 's1.safetensors'}; an index names shard files "
                               "in its own folder. If you trust this layout, say so with --trust-links "
                               "(`source.trust_links: true` in the rules, trust_links=True in Python)")  # fmt: skip
    with open_source(index, trust_links=True) as src:  # the explicit opt-in
        assert torch.equal(src.read("w"), torch.ones(2))
    # the same opt-in from the command line, the rules and the Python API
    from remap.cli import main

    rules = tmp_path / "r.yaml"
    rules.write_text(f"version: 1\nsource: {{path: {index}}}\ntarget: {{model: 'torch.nn:Module'}}\nrules: [drop: '^w$']\n"
                     "expect: {min_loaded: 0}\n")
    assert main(["apply", str(rules), "-q"]) == 3
    assert main(["apply", str(rules), "-q", "--trust-links"]) == 0
    assert main(["inspect", str(index), "--trust-links"]) == 0 and main(["inspect", str(index)]) == 3
    rules.write_text(rules.read_text().replace(f"path: {index}", f"path: {index}, trust_links: true"))
    assert main(["apply", str(rules), "-q"]) == 0
    assert remap.plan({}, index, {"version": 1, "rules": [{"drop": "^w$"}]}, trust_links=True).ok


def test_a_shard_linked_to_a_secret_never_shows_its_bytes(tmp_path: Path) -> None:
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$SECRETHASH:19000:0:99999:7:::\n")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "s1.safetensors").symlink_to(secret)
    index = _index(ckpt, {"w": "s1.safetensors"})
    for trust in (False, True):
        with pytest.raises(SourceError) as info:
            open_source(index, trust_links=trust)
        assert "$6$" not in str(info.value) and "SECRET" not in str(info.value)
    assert "leads outside the index's folder" in str(source_error_of(index))


def source_error_of(index: Path) -> SourceError:
    with pytest.raises(SourceError) as info:
        open_source(index)
    return info.value


def test_links_inside_the_index_folder_load(tmp_path: Path) -> None:
    save_file({"w": torch.ones(2)}, str(tmp_path / "real.safetensors"))
    (tmp_path / "alias.safetensors").symlink_to("real.safetensors")
    with open_source(_index(tmp_path, {"w": "alias.safetensors"})) as src:
        assert torch.equal(src.read("w"), torch.ones(2))


def test_a_hugging_face_cache_snapshot_keeps_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tests.sources.test_hub_sources import fill_cache

    state = {"a": torch.arange(3.0), "b": torch.ones(2)}
    parts = {}
    for i, key in enumerate(state):
        save_file({key: state[key]}, str(tmp_path / f"p{i}.safetensors"))
        parts[f"model-{i}.safetensors"] = (tmp_path / f"p{i}.safetensors").read_bytes()
    parts["model.safetensors.index.json"] = json.dumps({"weight_map": {"a": "model-0.safetensors", "b": "model-1.safetensors"}}).encode()
    snapshot = fill_cache(tmp_path / "hub", "org/sharded", "a" * 40, parts, ("main",))
    assert (snapshot / "model-0.safetensors").is_symlink()
    with open_source(snapshot / "model.safetensors.index.json") as src:
        assert all(torch.equal(src.read(k), v) for k, v in state.items())
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with open_source("hf://org/sharded") as src:
        assert all(torch.equal(src.read(k), v) for k, v in state.items())
    # but a snapshot link into another repo's blobs is not the cache layout
    other = fill_cache(tmp_path / "hub", "org/other", "b" * 40, {"x.safetensors": parts["model-0.safetensors"]})
    (snapshot / "stolen.safetensors").symlink_to(os.path.relpath(other / "x.safetensors", snapshot))
    index = snapshot / "hijack.index.json"
    index.write_text(json.dumps({"weight_map": {"a": "stolen.safetensors"}}))
    assert "leads outside the index's folder" in str(source_error_of(index))


def test_a_weight_map_naming_a_tensor_twice_is_refused(tmp_path: Path) -> None:
    save_file({"w": torch.ones(1)}, str(tmp_path / "a.safetensors"))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "b.safetensors"))
    index = tmp_path / "m.safetensors.index.json"
    index.write_text('{"weight_map": {"w": "a.safetensors", "w": "b.safetensors"}}')
    with pytest.raises(SourceError) as info:
        open_source(index)
    assert str(info.value) == f"{index}: not a valid JSON index: the key 'w' appears twice"


FD_CODE = """
import resource, sys, torch
resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))
from remap.sources.readers import open_source
import remap
with open_source(sys.argv[1]) as src:
    assert len(src.meta) == 300
    total = sum(float(src.read(k).sum()) for k in src.meta)
print(total)
"""


def test_hundreds_of_shards_under_a_low_open_file_limit(tmp_path: Path) -> None:
    weight_map = {}
    for i in range(300):
        save_file({f"w{i}": torch.full((2,), float(i))}, str(tmp_path / f"s{i:03d}.safetensors"))
        weight_map[f"w{i}"] = f"s{i:03d}.safetensors"
    index = _index(tmp_path, weight_map)
    done = run_python(FD_CODE, str(index), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.strip()) == 2 * sum(range(300))
