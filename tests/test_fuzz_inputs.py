"""Fuzzing of inputs through the command line: every broken input ends in a clear error.

Truncated, bit-flipped and overwritten checkpoints (safetensors, torch zip, legacy
torch, sharded), safetensors headers that lie, zero-length files, folders where files
are expected, random and mutated YAML, YAML alias bombs and catastrophic regexes: each
ends with exit 3 (source) or 2 (rules), ``remap: error: ...`` on stderr and no traceback,
or, for a mutation that leaves a well-formed file, a normal run (exit 0 or 1). Never exit
4 (an internal error), never a hang (every call runs under a deadline), and a header
that claims terabytes is refused without reading or allocating them (checked by tracking
reads, and in a subprocess under an address-space limit).

All mutations are seeded; ``REMAP_FUZZ_SCALE=20`` runs twenty times as many.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import struct
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file
from weights import Small, perturb

import remap
import remap.rules.patterns
import remap.sources.readers
import remap.sources.safetensors_reader
from remap.cli import main
from remap.errors import RemapError, RulesError, SourceError
from remap.rules.parse import parse_rules
from remap.rules.yaml_source import MAX_NODES

SCALE = float(os.environ.get("REMAP_FUZZ_SCALE", "1"))
SMALL = "weights:Small"
LOOSE = "version: 1\ntarget: {model: 'weights:Small'}\nshapes: skip\nexpect: {missing: ['.*'], unused: ['.*']}\n"

pytestmark = pytest.mark.skipif(not hasattr(signal, "setitimer"), reason="deadlines need SIGALRM")


class Hang(BaseException):
    """Raised by the deadline; a BaseException, so remap's own handlers cannot swallow it."""


@contextlib.contextmanager
def deadline(seconds: float) -> Iterator[None]:
    def expired(signum: int, frame: Any) -> None:
        raise Hang(f"no answer within {seconds}s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def cli(capsys: pytest.CaptureFixture[str], *argv: Any, seconds: float = 30) -> tuple[int, str, str]:
    """main(argv) under a deadline; checks that whatever happened, it was not a crash."""
    with deadline(seconds):
        code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code != 4, f"internal error for {argv}:\n{err}"
    assert "Traceback" not in err, err
    if code in (2, 3):
        assert err.startswith("remap: error: ") and len(err.strip()) > len("remap: error: "), err
    return code, out, err


# ---------------------------------------------------------------------------- checkpoints to break


def _state() -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in perturb(Small(), seed=2).state_dict().items()}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import argparse

    folder = tmp_path_factory.mktemp("good")
    state = _state()
    out = {"safetensors": folder / "m.safetensors", "zip": folder / "m.pth", "legacy": folder / "legacy.pth",
           "nested": folder / "nested.ckpt"}  # fmt: skip
    save_file(state, str(out["safetensors"]))
    torch.save(state, out["zip"])
    torch.save(state, out["legacy"], _use_new_zipfile_serialization=False)
    torch.save({"state_dict": state, "epoch": 3, "args": argparse.Namespace(lr=0.1)}, out["nested"])
    (folder / "loose.yaml").write_text(LOOSE)
    return out


def _mutants(data: bytes, seed: int, count: int) -> Iterator[tuple[str, bytes]]:
    """Seeded mutants: bit flips, truncations (every header offset, then spread), overwrites, splices."""
    rng = random.Random(seed)
    n = len(data)
    for i in range(count):
        b = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            off = rng.randrange(n)
            b[off] ^= 1 << rng.randrange(8)
        yield f"flip{i}", bytes(b)
    cuts = sorted({*range(0, min(n, 160), 3), *(rng.randrange(n) for _ in range(count))})
    for cut in cuts:
        yield f"cut{cut}", data[:cut]
    for i in range(count // 2):
        b = bytearray(data)
        off = rng.randrange(n)
        b[off : off + 8] = bytes(rng.randrange(256) for _ in range(8))
        yield f"overwrite{i}", bytes(b)
    for i in range(count // 4):  # a chunk of the file duplicated or removed
        a, z = sorted(rng.randrange(n) for _ in range(2))
        yield f"splice{i}", data[:a] + data[a:z] * rng.randint(0, 2) + data[z:]


SEEDS = {"safetensors": 1, "zip": 2, "legacy": 3, "nested": 4}


@pytest.mark.parametrize("fmt", list(SEEDS))
def test_mutated_checkpoints_end_in_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, Path], fmt: str) -> None:
    good = files[fmt]
    rules = good.parent / "loose.yaml"
    data = good.read_bytes()
    outcomes: dict[tuple[str, int], int] = {}
    for name, mutant in _mutants(data, seed=SEEDS[fmt], count=int(40 * SCALE)):
        path = tmp_path / f"{name}{good.suffix}"
        path.write_bytes(mutant)
        code, _, err = cli(capsys, "inspect", path)
        assert code in (0, 3), (name, code, err)
        if code == 3:
            assert str(path) in err, err
        outcomes["inspect", code] = outcomes.get(("inspect", code), 0) + 1
        code, _, err = cli(capsys, "apply", rules, "--source", path, "-q")
        assert code in (0, 1, 3), (name, code, err)
        outcomes["apply", code] = outcomes.get(("apply", code), 0) + 1
        path.unlink()
    assert outcomes.get(("inspect", 3)) and outcomes.get(("apply", 3)), outcomes  # most mutants are refused


def test_mutated_shards_and_index_end_in_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    from helpers import save_sharded

    rules = files["zip"].parent / "loose.yaml"
    rng = random.Random(11)
    for n in range(int(12 * SCALE)):
        folder = tmp_path / f"s{n}"
        index = save_sharded(_state(), folder, shards=2, fmt=rng.choice(["safetensors", "torch"]))
        victim = rng.choice([index, *sorted(p for p in folder.iterdir() if p != index)])
        data = bytearray(victim.read_bytes())
        if rng.random() < 0.5:
            data = data[: rng.randrange(len(data))]
        else:
            for _ in range(rng.randint(1, 3)):
                data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        victim.write_bytes(bytes(data))
        for argv in (["inspect", folder], ["inspect", index], ["apply", rules, "--source", folder, "-q"]):
            code, _, err = cli(capsys, *argv)
            assert code in (0, 1, 3), (argv, err)


# ---------------------------------------------------------------------------- files that are not files


def test_empty_files_and_folders_where_files_are_expected(tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    rules = files["zip"].parent / "loose.yaml"
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    folder = tmp_path / "dir.pth"
    folder.mkdir()
    nested = tmp_path / "nested"
    (nested / "model.safetensors").mkdir(parents=True)  # a folder named like the weights file
    for source in (empty, folder, nested, tmp_path / "missing.pt"):
        for argv in (["inspect", source], ["apply", rules, "--source", source], ["apply", rules, "--source", source, "--dry-run"]):
            code, out, err = cli(capsys, *argv)
            assert code == 3, (argv, err)
    empty_rules = tmp_path / "empty.yaml"
    empty_rules.write_text("")
    for bad_rules in (empty_rules, folder, tmp_path / "missing.yaml"):
        for argv in (["validate", bad_rules], ["apply", bad_rules, "--source", files["zip"]]):
            code, out, err = cli(capsys, *argv)
            assert code == 2, (argv, err)
            assert str(bad_rules) in err


def test_outputs_that_are_folders_are_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    rules = files["zip"].parent / "loose.yaml"
    folder = tmp_path / "out.safetensors"
    folder.mkdir()
    for flag in ("--save", "--report"):
        code, _, err = cli(capsys, "apply", rules, "--source", files["zip"], flag, folder)
        assert code == 2 and "a folder, not a regular file" in err, err
    assert list(folder.iterdir()) == []


def test_a_shard_that_is_a_folder_or_a_device(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    index = tmp_path / "model.safetensors.index.json"
    (tmp_path / "shard-a").mkdir()
    index.write_text(json.dumps({"weight_map": {"a": "shard-a", "b": "/dev/zero", "c": "../../../etc/passwd"}}))
    code, _, err = cli(capsys, "inspect", index)
    assert code == 3 and "is a folder, not a regular file" in err


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_an_index_naming_a_file_outside_its_folder_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], shard: str) -> None:
    (tmp_path / "outside.safetensors").write_bytes(b"secret bytes, not weights")
    index = tmp_path / "ckpt" / "model.safetensors.index.json"
    index.parent.mkdir()
    index.write_text(json.dumps({"weight_map": {"a": shard}}))
    code, _, err = cli(capsys, "inspect", index)
    assert code == 3 and "lies outside the index's folder" in err and "secret" not in err


def test_an_index_that_is_not_an_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for n, text in enumerate(["", "[]", "{", '{"weight_map": 3}', '{"weight_map": {"a": 1}}', "\x00\xff", "[" * 100_000, '{"weight_map": {}}']):
        index = tmp_path / f"m{n}.safetensors.index.json"
        index.write_bytes(text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text)
        code, _, err = cli(capsys, "inspect", index)
        assert code in (0, 3), err


# ---------------------------------------------------------------------------- safetensors headers that lie


def _safetensors(path: Path, header: Any, data: bytes = b"", *, length: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


F32 = lambda start, stop, shape=(1,): {"dtype": "F32", "shape": list(shape), "data_offsets": [start, stop]}  # noqa: E731

LIES = {
    "overlapping": ({"a": F32(0, 4), "b": F32(0, 4)}, b"\0" * 8, "overlaps the tensor before it"),
    "overlapping-partly": ({"a": F32(0, 8, (2,)), "b": F32(4, 12, (2,))}, b"\0" * 12, "overlaps the tensor before it"),
    "gap": ({"a": F32(4, 8)}, b"\0" * 8, "leaves bytes 0..4 unclaimed"),
    "out-of-the-file": ({"a": F32(0, 4), "b": F32(4, 400, (99,))}, b"\0" * 8, "truncated: the tensor data ends at byte"),
    "trailing-bytes": ({"a": F32(0, 4)}, b"\0" * 9, "5 trailing bytes belong to no tensor"),
    "negative": ({"a": F32(-4, 0)}, b"\0" * 4, "is not a pair of non-negative integers"),
    "end-before-start": ({"a": F32(8, 4), "b": F32(0, 8, (2,))}, b"\0" * 8, "end before they start"),
    "shape-vs-bytes": ({"a": F32(0, 8, (3,))}, b"\0" * 8, "shape [3] of F32 is 12 bytes, but data_offsets [0, 8] hold 8"),
    "huge-shape": ({"a": F32(0, 4, (1 << 40, 1 << 40))}, b"\0" * 4, "bytes, but data_offsets [0, 4] hold 4"),
    "unknown-dtype": ({"a": {"dtype": "F128", "shape": [1], "data_offsets": [0, 16]}}, b"\0" * 16, "has dtype 'F128', which remap cannot read"),
    "dtype-not-a-string": ({"a": {"dtype": ["F32"], "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4, "which remap cannot read"),
    "float-offsets": ({"a": F32(0.0, 4.0)}, b"\0" * 4, "is not a pair of non-negative integers"),
    "bool-shape": ({"a": {"dtype": "F32", "shape": [True], "data_offsets": [0, 4]}}, b"\0" * 4, "is not a list of non-negative integers"),
    "string-shape": ({"a": {"dtype": "F32", "shape": "12", "data_offsets": [0, 4]}}, b"\0" * 4, "is not a list of non-negative integers"),
    "negative-dim": ({"a": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, "is not a list of non-negative integers"),
    "three-offsets": ({"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4, 8]}}, b"\0" * 4, "is not a pair"),
    "missing-field": ({"a": {"dtype": "F32", "shape": [1]}}, b"\0" * 4, "malformed header entry"),
    "entry-not-an-object": ({"a": [0, 4]}, b"\0" * 4, "malformed header entry"),
    "header-a-list": ([1, 2], b"", "not a checkpoint remap can read"),  # the format sniff wants a '{'
    "entry-a-number": (b'{"a": 1}', b"", "malformed header entry"),
    "duplicate-key": (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}',
                      b"\0" * 4, "the key 'a' appears twice"),
    "not-utf8": (b'{"\xff": 1}', b"", "not valid JSON"),
    "deep-json": (b'{"a":' + b"[" * 50_000 + b"]" * 50_000 + b"}", b"", "nested too deeply"),
    "not-json": (b"{hello", b"", "not valid JSON"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(LIES))
def test_safetensors_headers_that_lie_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    header, data, message = LIES[case]
    path = _safetensors(tmp_path / "lie.safetensors", header, data)
    rules = tmp_path / "r.yaml"
    rules.write_text(LOOSE)
    for argv in (["inspect", path], ["apply", rules, "--source", path], ["apply", rules, "--source", path, "--dry-run"]):
        code, out, err = cli(capsys, *argv)
        assert code == 3, (argv, err)
        assert err.startswith(f"remap: error: {path}: ") and message in err, err
    with pytest.raises(SourceError):
        remap.sources.readers.open_source(path)


def test_a_header_that_is_not_an_object_read_directly(tmp_path: Path) -> None:
    path = _safetensors(tmp_path / "list.safetensors", [1, 2])
    with pytest.raises(SourceError, match="the safetensors header is a JSON list, expected an object"):
        remap.sources.safetensors_reader._read_safetensors_header(path)


class _CountingFile:
    """A file whose reads are counted: every read asks for a bounded number of bytes."""

    def __init__(self, f: Any, log: list[int]) -> None:
        self._f, self._log = f, log

    def read(self, n: int = -1) -> bytes:
        assert n is not None and n >= 0, "an unbounded read"
        self._log.append(n)
        return self._f.read(n)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _CountingFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self._f.close()


@pytest.mark.parametrize(
    ("length", "size", "message"),
    [
        (1 << 40, 64, "the header claims 1099511627776 bytes but only"),
        ((1 << 64) - 1, 64, "the header claims 18446744073709551615 bytes"),
        (remap.sources.safetensors_reader.MAX_SAFETENSORS_HEADER + 1, remap.sources.safetensors_reader.MAX_SAFETENSORS_HEADER + 64, "more than the 100000000 safetensors allows"),
    ],
    ids=["terabyte", "2**64-1", "over-100MB-in-a-large-file"],
)
def test_a_header_claiming_too_much_is_refused_before_reading_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, length: int, size: int, message: str) -> None:
    path = tmp_path / "big.safetensors"
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", length) + b'{"a": 1}')
        f.truncate(size)  # sparse: a large file costs nothing
    reads: list[int] = []
    real_open = open
    monkeypatch.setattr(remap.sources.readers, "open", lambda *a, **k: _CountingFile(real_open(*a, **k), reads), raising=False)
    monkeypatch.setattr(remap.sources.safetensors_reader, "open", lambda *a, **k: _CountingFile(real_open(*a, **k), reads), raising=False)
    with pytest.raises(SourceError) as info:
        remap.sources.safetensors_reader._read_safetensors_header(path)
    assert message in str(info.value)
    assert sum(reads) <= 8, reads  # the length field, and nothing it claims
    with pytest.raises(SourceError):
        remap.sources.readers.open_source(path)
    assert sum(reads) <= 8 + 512 + 8, reads  # the format sniff's first 512 bytes, then the length field


def test_reads_never_exceed_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, files: dict[str, Path]) -> None:
    """Over many mutants of a safetensors file, the header reader asks for no byte past the end."""
    reads: list[int] = []
    real_open = open
    monkeypatch.setattr(remap.sources.safetensors_reader, "open", lambda *a, **k: _CountingFile(real_open(*a, **k), reads), raising=False)
    data = files["safetensors"].read_bytes()
    for name, mutant in _mutants(data, seed=5, count=int(60 * SCALE)):
        path = tmp_path / "m.safetensors"
        path.write_bytes(mutant)
        reads.clear()
        with contextlib.suppress(SourceError):
            remap.sources.safetensors_reader._read_safetensors_header(path)
        assert sum(reads) <= len(mutant) + 8, (name, reads, len(mutant))


# ---------------------------------------------------------------------------- bounded memory, in a subprocess

LIMITED = r"""
import contextlib, io, json, resource, sys
from remap.cli import main
import torch
vm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
limit = vm + (768 << 20)  # what the process holds now, plus 768 MiB
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
results = []
for argv in json.loads(sys.argv[1]):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(argv)
    results.append([code, err.getvalue()])
print(json.dumps(results))
"""


def _lying_zip(src: Path, dst: Path, numel: int) -> Path:
    """A torch zip checkpoint whose pickle says its first storage holds ``numel`` elements."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/data.pkl"):  # ('storage', FloatStorage, '0', 'cpu', <numel>): the numel follows 'cpu'
                at = data.index(b"X\x03\x00\x00\x00cpuq") + 10
                data = data[:at] + b"J" + struct.pack("<i", numel) + data[data.index(b"t", at) :]
            zout.writestr(info, data)
    return dst


def _lying_legacy(src: Path, dst: Path, numel: int) -> Path:
    data = src.read_bytes()
    at = data.index(b"X\x03\x00\x00\x00cpuq") + 10
    end = data.index(b"N", at)  # the numel, then None (no view metadata) in the legacy persistent id
    dst.write_bytes(data[:at] + b"\x8a\x08" + numel.to_bytes(8, "little") + data[end:])
    return dst


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs /proc for the address-space baseline")
def test_claims_of_terabytes_end_in_a_clear_error_under_a_memory_limit(tmp_path: Path, files: dict[str, Path]) -> None:
    tb = 1 << 40
    cases = {
        "header": _safetensors(tmp_path / "h.safetensors", b'{"a": 1}', length=tb),
        "tensor": _safetensors(tmp_path / "t.safetensors", {"a": F32(0, tb, (tb // 4,))}, b"\0" * 16),
        "zip-storage": _lying_zip(files["zip"], tmp_path / "z.pth", 2**31 - 1),
        "legacy-storage": _lying_legacy(files["legacy"], tmp_path / "l.pth", tb),
    }
    rules = files["zip"].parent / "loose.yaml"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    runs = [(name, path, argv) for name, path in cases.items() for argv in (["inspect", path], ["apply", rules, "--source", path, "-q"])]
    argvs = json.dumps([[str(a) for a in argv] for _, _, argv in runs])
    proc = subprocess.run([sys.executable, "-c", LIMITED, argvs], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for (name, path, argv), (code, err) in zip(runs, json.loads(proc.stdout)):
        assert code == 3, (name, argv, code, err[-2000:])
        assert err.startswith(f"remap: error: {path}: ") and "Traceback" not in err, err


def test_a_zip_checkpoint_whose_pickle_lies_about_a_storage_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    """The engine maps tensor bytes straight from the archive: a storage bigger than its
    record would read the next records' bytes, so it is an error, not a load."""
    rules = files["zip"].parent / "loose.yaml"
    for numel in (200, 2**31 - 1):
        path = _lying_zip(files["zip"], tmp_path / f"lie{numel}.pth", numel)
        code, _, err = cli(capsys, "apply", rules, "--source", path)
        assert code == 3 and "corrupt checkpoint: data.pkl gives storage" in err and "but its record" in err, err


def test_a_recompressed_zip_checkpoint_loads_the_right_values(tmp_path: Path, files: dict[str, Path]) -> None:
    """A checkpoint re-zipped with compression cannot be mapped: it is read through torch.load."""
    path = tmp_path / "deflated.pth"
    with zipfile.ZipFile(files["zip"]) as zin, zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    model = Small()
    report = remap.load(model, path, {"version": 1})
    assert report.ok and report.stats["zero_copy_tensors"] == 0
    assert all(torch.equal(model.state_dict()[k], v) for k, v in _state().items())


# ---------------------------------------------------------------------------- YAML

VALID = f"""\
version: 1
target: {{model: '{SMALL}'}}
rules:
  - strip_prefix: module.
  - rename: {{'^features\\.(\\d+)\\.': 'layers.\\1.'}}
    optional: true
  - drop: ['\\.num_batches_tracked$']
shapes: {{default: error, skip: ['^fc\\.']}}
expect: {{missing: ['^fc\\.', 'num_batches_tracked'], min_loaded: 0.5}}
freeze: {{params: ['.*'], except: ['^fc\\.'], batchnorm: frozen}}
"""
TOKENS = list("ab:- \n\t{}[],&*!|>'\"#%@`?.\\1") + ["\x00", "\ufeff", "!!int ", "!!binary ", "<<: ", "&a ", "*a", "---\n", "...\n",
                                                   "!!python/object:os.system ", "!!timestamp ", "2001-13-45", "version: 1\n", "rules:\n"]  # fmt: skip


def _yaml_cases(seed: int, count: int) -> Iterator[str]:
    rng = random.Random(seed)
    for _ in range(count):  # random token soup
        yield "".join(rng.choice(TOKENS) for _ in range(rng.randint(0, 40)))
    for _ in range(count):  # the valid rules, edited at random
        text = VALID
        for _ in range(rng.randint(1, 5)):
            pos = rng.randrange(len(text) + 1)
            text = text[:pos] + rng.choice(["", *TOKENS]) + text[pos + rng.randint(0, 3) :]
        yield text


def test_random_and_mutated_yaml_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, Path]) -> None:
    rules = tmp_path / "rules.yaml"
    assert parse_rules(VALID)
    counts: dict[int, int] = {}
    for n, text in enumerate(_yaml_cases(seed=3, count=int(80 * SCALE))):
        rules.write_text(text, encoding="utf-8", errors="surrogatepass")
        code, _, err = cli(capsys, "validate", rules)
        assert code in (0, 2), (text, err)
        counts[code] = counts.get(code, 0) + 1
        if code == 0 and n % 4 == 0:
            code, _, err = cli(capsys, "apply", rules, "--source", files["zip"], "--dry-run")
            assert code in (0, 1, 2, 3), (text, err)
    assert counts.get(2, 0) > counts.get(0, 0)


def test_bytes_that_are_not_utf8_in_a_rules_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_bytes(b"version: 1\nrules: [{drop: '\xff\xfe'}]\n")
    code, _, err = cli(capsys, "validate", rules)
    assert code == 2 and "cannot read the rules file" in err


def _laughs(levels: int, width: int = 10) -> str:
    lines = ['a0: &a0 ["lol"]']
    for i in range(1, levels):
        lines.append(f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]")
    return "version: 1\nsource:\n  kwargs:\n    " + "\n    ".join(lines) + "\n"


@pytest.mark.parametrize("levels", [6, 10])  # 10**6 and 10**10 nodes ("a billion laughs")
def test_a_yaml_alias_bomb_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str], files: dict[str, Path], levels: int) -> None:
    rules = tmp_path / "bomb.yaml"
    rules.write_text(_laughs(levels))
    for argv in (["validate", rules], ["apply", rules, "--source", files["zip"], "--target", SMALL]):
        code, out, err = cli(capsys, *argv, seconds=20)
        assert code == 2, err
        assert f"the document expands to more than {MAX_NODES} nodes (aliases?); refusing to build it" in err


def test_a_small_alias_expansion_is_fine(tmp_path: Path) -> None:
    assert parse_rules("version: 1\nexpect:\n  missing: &m ['^fc\\.']\n  unused: *m\n").expect.unused == ("^fc\\.",)


def test_a_recursive_alias_and_deep_nesting_are_refused() -> None:
    for text in ("version: 1\nsource: &s {kwargs: *s}\n", "version: 1\nrules: " + "[" * 20_000 + "]" * 20_000 + "\n"):
        with deadline(20), pytest.raises(RulesError) as info:
            parse_rules(text)
        assert str(info.value)


# ---------------------------------------------------------------------------- catastrophic regexes

EVIL = "(a|aa)+$"
KEY = "a" * 40 + "!"


@pytest.fixture
def quick_timeout(monkeypatch: pytest.MonkeyPatch) -> float:
    monkeypatch.setattr(remap.rules.patterns, "REGEX_TIMEOUT", 0.05)
    return 0.05


CATASTROPHIC = {
    "drop": {"rules": [{"drop": EVIL}]},
    "keep": {"rules": [{"keep": EVIL}]},
    "rename": {"rules": [{"rename": {EVIL: "x"}}]},
    "rename-after-an-op": {"rules": [{"transpose": "^nothing$", "optional": True}, {"rename": {EVIL: "x"}}]},
    "add_prefix": {"rules": [{"add_prefix": {"prefix": "x.", "match": EVIL}}]},
    "transpose": {"rules": [{"transpose": EVIL}]},
    "merge": {"rules": [{"merge": {"match": EVIL, "into": "m", "order": ["a", "aa"]}}]},
    "split": {"rules": [{"split": {"match": EVIL, "into": ["p", "q"]}}]},
    "expect.missing": {"expect": {"missing": [EVIL]}},
    "expect.unused": {"expect": {"unused": [EVIL]}},
    "freeze.params": {"freeze": {"params": [EVIL]}},
    "freeze.except": {"freeze": {"params": [".*"], "except": [EVIL]}},
    "shapes.skip": {"shapes": {"skip": [EVIL]}},
}


@pytest.mark.parametrize("where", list(CATASTROPHIC))
def test_a_catastrophic_regex_fails_naming_it_through_make_plan(quick_timeout: float, where: str) -> None:
    rules = parse_rules({"version": 1, **CATASTROPHIC[where]})
    source = {KEY: [2], "b": [2]}
    target = {KEY + "x": [2], "c": [3]} if where != "expect.missing" else {KEY: [2], "b": [2], "zz": [1]}
    if where == "expect.missing":
        source = {"b": [2]}
    if where == "shapes.skip":
        target = {KEY: [3], "b": [2]}
    if where in ("freeze.params", "freeze.except"):
        target = {KEY: [2], "b": [2]}
    with deadline(10), pytest.raises(RemapError) as info:
        remap.make_plan(rules, source, target)
    assert isinstance(info.value, RulesError) and info.value.exit_code == 2
    assert f"regex '{EVIL}' took more than {quick_timeout}s on key '{KEY}" in str(info.value)


def test_a_catastrophic_regex_fails_naming_it_through_the_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], quick_timeout: float) -> None:
    source = tmp_path / "w.safetensors"
    save_file({KEY: torch.zeros(2), "fc.weight": torch.zeros(5, 4)}, str(source))
    for section in ("rules:\n  - drop: '(a|aa)+$'\n", "expect:\n  unused: ['(a|aa)+$']\n"):
        rules = tmp_path / "rules.yaml"
        rules.write_text(f"version: 1\ntarget: {{model: '{SMALL}'}}\n{section}")
        for extra in ([], ["--dry-run"]):
            code, out, err = cli(capsys, "apply", rules, "--source", source, *extra, seconds=20)
            assert code == 2, err
            assert f"regex '{EVIL}' took more than {quick_timeout}s on key '{KEY}'" in err
