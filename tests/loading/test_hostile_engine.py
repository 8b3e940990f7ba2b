"""Hostile inputs against the engine: never a half-loaded module (issue 12, items 8-11).

Each test builds its hostile input itself, in ``tmp_path``: a checkpoint truncated while it
is being loaded (through the ``progress`` callback, between batches), a target whose
buffers overlap its parameters, NaN weights under ``verify``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from helpers import save, save_sharded
from torch import nn
from weights import perturb, snapshot

import remap
from remap.errors import SourceError

pytestmark = pytest.mark.hostile

RESTORED = "; the module was restored as it was before the load"


class Four(nn.Module):
    """Four float32 weights of 64 bytes each: with ``batch_bytes=1``, four batches."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4, bias=False)
        self.b = nn.Linear(4, 4, bias=False)
        self.c = nn.Linear(4, 4, bias=False)
        self.d = nn.Linear(4, 4, bias=False)


def _truncate_after(path: Path, batches: int = 1, size: int = 0):
    """A progress callback that truncates ``path`` to ``size`` bytes after ``batches`` batches."""
    seen = []

    def progress(done: int, total: int, tensors: int, count: int) -> None:
        seen.append(done)
        if len(seen) == batches:
            os.truncate(path, size)

    return progress


def _write(state: dict[str, torch.Tensor], path: Path) -> Path:
    return save(state, path, "safetensors" if path.suffix == ".safetensors" else "torch-zip")


def _ends_inside(path: Path) -> str:
    return (rf"{re.escape(str(path))}: the file ends at byte \d+, inside a tensor: it was truncated since it was planned"
            + re.escape(RESTORED) + "$")  # fmt: skip


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_during_a_direct_load_leaves_the_module_untouched(tmp_path, suffix):
    path = _write(perturb(Four(), seed=1).state_dict(), tmp_path / f"ckpt{suffix}")
    dst = perturb(Four(), seed=2)
    before = snapshot(dst)
    with pytest.raises(SourceError, match=_ends_inside(path)) as info:
        remap.load(dst, path, batch_bytes=1, progress=_truncate_after(path))
    assert info.value.exit_code == 3
    assert snapshot(dst) == before  # the first batch was written, then put back


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_truncated_during_a_cast_load_leaves_the_module_untouched(tmp_path, suffix):
    """A cast reads through a staging buffer (pread), never a mapping: an error, not SIGBUS."""
    half = {k: v.half() for k, v in perturb(Four(), seed=1).state_dict().items()}
    path = _write(half, tmp_path / f"ckpt{suffix}")
    dst = perturb(Four(), seed=2)
    before = snapshot(dst)
    rules = {"version": 1, "rules": [{"cast": {"match": ".*", "dtype": "float32"}}]}
    with pytest.raises(SourceError, match=_ends_inside(path)):
        remap.load(dst, path, rules=rules, batch_bytes=1, progress=_truncate_after(path, batches=2))
    assert snapshot(dst) == before


def test_truncating_a_later_shard_leaves_the_module_untouched(tmp_path):
    index = save_sharded(perturb(Four(), seed=1).state_dict(), tmp_path / "sharded", shards=2)
    second = index.parent / "model-00002-of-00002.safetensors"
    dst = perturb(Four(), seed=2)
    before = snapshot(dst)
    # file order: both tensors of shard 1, then shard 2: truncate shard 2 after shard 1 is loaded
    with pytest.raises(SourceError, match=_ends_inside(second)):
        remap.load(dst, index, batch_bytes=1, progress=_truncate_after(second, batches=2))
    assert snapshot(dst) == before


def test_a_file_rewritten_shorter_in_the_middle_of_a_tensor_is_refused_too(tmp_path):
    """Truncated to half its size: the read runs short inside a tensor."""
    path = _write(perturb(Four(), seed=1).state_dict(), tmp_path / "ckpt.safetensors")
    dst = perturb(Four(), seed=2)
    before = snapshot(dst)
    with pytest.raises(SourceError, match=_ends_inside(path)):
        remap.load(dst, path, batch_bytes=1, progress=_truncate_after(path, size=path.stat().st_size - 100))
    assert snapshot(dst) == before


def test_an_interrupt_during_the_load_leaves_the_module_untouched(tmp_path):
    path = _write(perturb(Four(), seed=1).state_dict(), tmp_path / "ckpt.safetensors")
    dst = perturb(Four(), seed=2)
    before = snapshot(dst)

    def interrupt(done: int, total: int, tensors: int, count: int) -> None:
        if tensors == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        remap.load(dst, path, batch_bytes=1, progress=interrupt)
    assert snapshot(dst) == before


@pytest.mark.parametrize("rules", [None, {"version": 1, "rules": [{"cast": {"match": ".*", "dtype": "float32"}}]}])
def test_a_meta_device_target_gets_its_meta_tensors_back(tmp_path, rules):
    state = perturb(Four(), seed=1).state_dict()
    path = _write(state if rules is None else {k: v.half() for k, v in state.items()}, tmp_path / "ckpt.safetensors")
    with torch.device("meta"):
        dst = Four()
    params = {k: p for k, p in dst.named_parameters()}
    with pytest.raises(SourceError, match=_ends_inside(path)):
        remap.load(dst, path, rules=rules, batch_bytes=1, progress=_truncate_after(path))
    assert {k: p for k, p in dst.named_parameters()} == params  # the very same objects
    assert all(p.device.type == "meta" for p in dst.parameters())


def test_an_interrupted_materialisation_puts_the_meta_tensors_back(tmp_path):
    """A meta target whose unloaded layer fails to initialise: what was assigned is undone."""

    class Broken(nn.Linear):
        def reset_parameters(self) -> None:
            if self.weight.device.type != "meta":
                raise RuntimeError("cannot initialise")

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4, bias=False)
            self.head = Broken(4, 2)

    path = _write({"a.weight": torch.randn(4, 4)}, tmp_path / "ckpt.safetensors")
    with torch.device("meta"):
        dst = Model()
    rules = {"version": 1, "expect": {"missing": ["^head\\."]}}
    with pytest.raises(RuntimeError, match="cannot initialise"):
        remap.load(dst, path, rules=rules)
    assert all(p.device.type == "meta" for p in dst.parameters())


def test_without_rollback_a_truncated_load_says_the_module_may_be_partly_loaded(tmp_path):
    path = _write(perturb(Four(), seed=1).state_dict(), tmp_path / "ckpt.safetensors")
    dst = perturb(Four(), seed=2)
    with pytest.raises(SourceError, match=r"inside a tensor: it was truncated since it was planned; the module may be "
                                          r"partly loaded \(rollback=False\)$"):  # fmt: skip
        remap.load(dst, path, batch_bytes=1, progress=_truncate_after(path), rollback=False)


def test_rollback_copies_only_the_loaded_tensors_and_rollback_false_copies_nothing(tmp_path, monkeypatch):
    from remap.loading import streaming

    kept = []
    original = streaming.Rollback.keep
    monkeypatch.setattr(streaming.Rollback, "keep", lambda self, t: (kept.append(tuple(t.shape)), original(self, t)))
    path = _write({"a.weight": torch.randn(4, 4)}, tmp_path / "ckpt.safetensors")
    remap.load(Four(), path, rules={"version": 1, "expect": {"missing": ["^[bcd]\\."]}})
    assert kept == [(4, 4)]  # a.weight only: b, c and d are not written
    kept.clear()
    remap.load(Four(), path, rules={"version": 1, "expect": {"missing": ["^[bcd]\\."]}}, rollback=False)
    assert kept == []


SIGBUS_SCRIPT = """
import os, sys, torch
from safetensors.torch import save_file
import remap
from remap.errors import SourceError

path = sys.argv[1]
save_file({k: torch.randn(256, 256, dtype=torch.float16) for k in "abcd"}, path)

class M(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for k in "abcd":
            self.register_parameter(k, torch.nn.Parameter(torch.zeros(256, 256)))

def cut(done, total, tensors, count):
    if tensors == 1:
        os.truncate(path, 0)

m = M()
try:
    remap.load(m, path, rules={"version": 1, "rules": [{"cast": {"match": ".*", "dtype": "float32"}}]},
               batch_bytes=1, progress=cut)
except SourceError as exc:
    print("SourceError", exc.exit_code, all(bool((p == 0).all()) for p in m.parameters()))
"""


def test_a_cast_load_of_a_file_truncated_meanwhile_does_not_kill_the_process(tmp_path):
    """Once a mapped read: SIGBUS killed the process. In a subprocess, so a regression kills only it."""
    script = tmp_path / "cut.py"
    script.write_text(textwrap.dedent(SIGBUS_SCRIPT))
    done = subprocess.run([sys.executable, str(script), str(tmp_path / "ckpt.safetensors")], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.strip() == "SourceError 3 True"


# --------------------------------------------------------------------------- targets whose memory overlaps


class PartView(nn.Module):
    """A buffer that is a view of the second half of a parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(8))
        self.register_buffer("tail", self.w.detach()[4:])


class WholeAlias(nn.Module):
    """A buffer that is the whole parameter under another name: a tied alias."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(8))
        self.register_buffer("alias", self.w.detach())


class SparseBuffer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(8))
        self.register_buffer("mask", torch.eye(3).to_sparse())


OVERLAP = ("target: target keys 'w' and 'tail' overlap in memory without being one tensor (one is a view of part of the "
           "other): loading both would let one overwrite the other; make one of them a non-persistent buffer "
           "(register_buffer(..., persistent=False)) or compute it from the other")  # fmt: skip


def test_a_buffer_viewing_part_of_a_parameter_is_refused_before_anything_is_read(tmp_path):
    path = save({"w": torch.arange(8.0), "tail": torch.tensor([40.0, 50, 60, 70])}, tmp_path / "ckpt.pth")
    dst = PartView()
    before = snapshot(dst)
    with pytest.raises(remap.TargetError) as info:
        remap.load(dst, path)
    assert str(info.value) == OVERLAP and info.value.exit_code == 3
    assert snapshot(dst) == before
    with pytest.raises(remap.TargetError, match=re.escape(OVERLAP)):
        remap.plan(dst, path)  # planning (a dry run) refuses it too


def test_a_buffer_viewing_part_of_a_parameter_exits_3_on_the_command_line_with_save(tmp_path, capsys):
    from remap.cli import main

    path = save({"w": torch.arange(8.0), "tail": torch.arange(4.0)}, tmp_path / "ckpt.pth")
    (tmp_path / "rules.yaml").write_text("version: 1\n")
    code = main(["apply", str(tmp_path / "rules.yaml"), "--source", str(path), "--target", "tests.loading.test_hostile_engine:PartView",
                 "--save", str(tmp_path / "out.safetensors")])  # fmt: skip
    assert code == 3, capsys.readouterr()
    assert "target keys 'w' and 'tail' overlap in memory" in capsys.readouterr().err
    assert not (tmp_path / "out.safetensors").exists()


def test_overlapping_slices_of_one_storage_are_refused_whatever_their_order():
    class Slices(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            base = torch.zeros(10)
            self.register_buffer("b", base[3:8])
            self.register_buffer("a", base[0:4])
            self.register_buffer("c", base[8:])  # touches neither: alone it would be fine

    with pytest.raises(remap.TargetError, match="^target: target keys 'a' and 'b' overlap in memory"):
        remap.plan(Slices(), {"a": [4], "b": [5], "c": [2]})


def test_disjoint_views_of_one_storage_load_each_their_part(tmp_path):
    class Halves(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            base = torch.zeros(8)
            self.register_buffer("lo", base[:4])
            self.register_buffer("hi", base[4:])

    dst = Halves()
    remap.load(dst, {"lo": torch.arange(4.0), "hi": torch.arange(4.0) + 4})
    assert torch.equal(dst.lo, torch.arange(4.0)) and torch.equal(dst.hi, torch.arange(4.0) + 4)


def test_a_buffer_aliasing_a_whole_parameter_is_a_tied_alias_loaded_once_and_saved(tmp_path):
    dst = WholeAlias()
    out = tmp_path / "out.safetensors"
    report = remap.load(dst, {"w": torch.arange(8.0)}, save=out)
    assert [(t.key, t.status) for t in report.targets] == [("w", "loaded"), ("alias", "tied")]
    assert torch.equal(dst.alias, torch.arange(8.0)) and dst.alias.data_ptr() == dst.w.data_ptr()
    from safetensors.torch import load_file

    assert torch.equal(load_file(out)["w"], torch.arange(8.0))


def test_a_sparse_target_buffer_is_a_target_error():
    with pytest.raises(remap.TargetError) as info:
        remap.plan(SparseBuffer(), {"w": [8], "mask": [3, 3]})
    assert str(info.value) == ("target: target key 'mask' is a sparse_coo tensor: remap loads only dense (strided) tensors; "
                               "make it dense, or a non-persistent buffer")  # fmt: skip
    assert info.value.exit_code == 3


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_a_quantized_target_tensor_is_a_target_error():
    class Quantized(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("q", torch.quantize_per_tensor(torch.ones(4), 0.1, 0, torch.qint8))

    with pytest.raises(remap.TargetError, match=r"^target: target key 'q' is a quantized \(qint8\) tensor: remap loads only dense"):
        remap.plan(Quantized(), {"q": [4]})


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA build with a GPU can load onto cuda")
def test_a_device_this_build_lacks_is_a_usage_error_before_anything_is_read(tmp_path):
    path = save(perturb(Four(), seed=1).state_dict(), tmp_path / "ckpt.pth")
    with torch.device("meta"):
        dst = Four()
    with pytest.raises(remap.UsageError) as info:
        remap.load(dst, path, device="cuda")
    assert str(info.value) == "cannot load onto device 'cuda': Torch not compiled with CUDA enabled"
    assert info.value.exit_code == 2
    assert all(p.device.type == "meta" for p in dst.parameters())
    with pytest.raises(remap.UsageError, match="^cannot load onto device 'nonsense': "):
        remap.load(dst, path, device="nonsense")


# --------------------------------------------------------------------------- verify with NaN and Inf


class Special(nn.Module):
    """A model whose output holds NaN, +Inf and -Inf wherever its weights do."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


def _special_weights() -> dict[str, torch.Tensor]:
    return {"scale": torch.tensor([1.0, float("nan"), float("inf"), float("-inf"), float("nan"), 2.0])}


VERIFY_RULES = {"version": 1, "source": {"model": "tests.loading.test_hostile_engine:Special"}, "verify": {"input": [2, 6]}}


def test_verify_of_nan_weights_loaded_unchanged_passes_and_counts_them(tmp_path):
    path = save(_special_weights(), tmp_path / "ckpt.pth")
    report = remap.load(Special(), path, rules=VERIFY_RULES, verify=True)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))  # the seeded input verify makes
    reference = x * _special_weights()["scale"]  # what the real model computes
    assert report.verify["ok"] is True
    assert report.verify["nan_matched"] == int(reference.isnan().sum()) == 4
    assert report.verify["inf_matched"] == int(reference.isinf().sum()) == 4
    assert report.verify["nonfinite_mismatched"] == 0 and report.verify["max_abs"] == 0.0
    from remap.report.render import format_report

    assert "over 1 tensor(s); 4 NaN and 4 Inf position(s) matched" in format_report(report)


def test_verify_fails_where_nan_or_inf_move(tmp_path):
    path = save(_special_weights(), tmp_path / "ckpt.pth")
    swap = {"slice": {"match": "^scale$", "dim": 0, "index": [0, 1, 3, 2, 4, 5]}}  # +Inf and -Inf swap places in the target
    with pytest.raises(remap.VerifyError) as info:
        remap.load(Special(), path, rules={**VERIFY_RULES, "rules": [swap]}, verify=True)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))  # the seeded input verify makes
    source, target = x * _special_weights()["scale"], x * _special_weights()["scale"][[0, 1, 3, 2, 4, 5]]
    assert info.value.exit_code == 1
    assert str(info.value) == (
        "verify: outputs differ: 4 position(s) hold NaN or Inf on one side and not the same value on the other "
        f"(first at output[0, 2]: source {float(source[0, 2])!r}, target {float(target[0, 2])!r}); "
        "4 NaN and 0 Inf position(s) matched; the weights were loaded"
    )
    assert info.value.report.verify["nonfinite_mismatched"] == 4 and info.value.report.verify["ok"] is False


def test_verify_fails_where_one_side_is_nan_and_the_other_finite(tmp_path):
    path = save(_special_weights(), tmp_path / "ckpt.pth")
    swap = {"slice": {"match": "^scale$", "dim": 0, "index": [1, 0, 2, 3, 4, 5]}}  # the first NaN and 1.0 swap places
    with pytest.raises(remap.VerifyError) as info:
        remap.load(Special(), path, rules={**VERIFY_RULES, "rules": [swap]}, verify=True)
    x = torch.randn(2, 6, generator=torch.Generator().manual_seed(0))
    assert str(info.value) == (
        "verify: outputs differ: 4 position(s) hold NaN or Inf on one side and not the same value on the other "
        f"(first at output[0, 0]: source {float(x[0, 0])!r}, target nan); 2 NaN and 4 Inf position(s) matched; "
        "the weights were loaded"
    )


# --------------------------------------------------------------------------- fuzz: truncation at any moment

FUZZ_EXAMPLES = max(1, int(30 * float(os.environ.get("REMAP_FUZZ_SCALE", "1"))))


@settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(suffix=st.sampled_from([".safetensors", ".pth"]), cast=st.booleans(), meta=st.booleans(),
       after=st.integers(1, 4), keep=st.floats(0, 1), batch_bytes=st.sampled_from([1, 100, 200]))  # fmt: skip
def test_fuzz_a_file_truncated_after_any_batch_loads_whole_or_leaves_the_module_as_it_was(
    tmp_path, suffix, cast, meta, after, keep, batch_bytes
):
    """Whatever the format, read path (direct or staged through a cast), target (allocated or
    meta) and moment: the load either completes with the file's values or fails with a
    SourceError and the module exactly as before."""
    folder = tmp_path / f"{suffix}{cast}{meta}{after}{keep}{batch_bytes}"
    folder.mkdir()
    state = perturb(Four(), seed=1).state_dict()
    path = _write({k: v.half() for k, v in state.items()} if cast else state, folder / f"ckpt{suffix}")
    rules = {"version": 1, "rules": [{"cast": {"match": ".*", "dtype": "float32"}}]} if cast else None
    if meta:
        with torch.device("meta"):
            dst = Four()
    else:
        dst = perturb(Four(), seed=2)
    before = {k: p for k, p in dst.named_parameters()} if meta else snapshot(dst)
    cut = _truncate_after(path, batches=after, size=int(path.stat().st_size * keep))
    try:
        remap.load(dst, path, rules=rules, batch_bytes=batch_bytes, progress=cut)
    except SourceError as exc:
        assert str(exc).endswith(RESTORED)
        assert ({k: p for k, p in dst.named_parameters()} if meta else snapshot(dst)) == before
    else:  # cut after the last batch, or to a size that still held the rest
        expected = {k: v.half().float() if cast else v for k, v in state.items()}
        assert all(torch.equal(dst.state_dict()[k], v) for k, v in expected.items())


SHARDS_UNDER_A_LIMIT = """
import resource, sys, torch
resource.setrlimit(resource.RLIMIT_NOFILE, (100, 100))
import remap

class Many(torch.nn.Module):
    def __init__(self):
        super().__init__()
        for i in range(300):
            self.register_parameter(f"w{i}", torch.nn.Parameter(torch.zeros(2)))

model = Many()
rules = {"version": 1, "rules": [{"cast": {"match": "^w1", "dtype": "float64"}}, {"cast": {"match": "^w1", "dtype": "float32"}}]}
report = remap.load(model, sys.argv[1], rules=rules, batch_bytes=64)
print(report.totals.loaded, sum(float(p.sum()) for p in model.parameters()))
"""


@pytest.mark.hostile
def test_a_load_of_hundreds_of_shards_stays_under_a_low_open_file_limit(tmp_path):
    """Direct and staged reads open shards as they need them, at most a quarter of the limit at once."""
    from safetensors.torch import save_file

    weight_map = {}
    for i in range(300):
        save_file({f"w{i}": torch.full((2,), float(i))}, str(tmp_path / f"s{i:03d}.safetensors"))
        weight_map[f"w{i}"] = f"s{i:03d}.safetensors"
    index = tmp_path / "model.safetensors.index.json"
    index.write_text(__import__("json").dumps({"metadata": {}, "weight_map": weight_map}))
    done = subprocess.run([sys.executable, "-c", SHARDS_UNDER_A_LIMIT, str(index)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["300", str(float(2 * sum(range(300))))]


def test_the_command_line_passes_no_rollback_through(tmp_path, monkeypatch, capsys):
    """--no-rollback reaches remap.load as rollback=False; without it rollback stays on."""
    from remap import api
    from remap.cli import main

    seen = []
    real = api.load

    def spy(*args, **kwargs):
        seen.append(kwargs["rollback"])
        return real(*args, **kwargs)

    monkeypatch.setattr(api, "load", spy)
    path = save({"weight": torch.ones(2, 2), "bias": torch.zeros(2)}, tmp_path / "ckpt.pth")
    rules = tmp_path / "r.yaml"
    rules.write_text("version: 1\ntarget: {model: 'torch.nn:Linear', args: [2, 2]}\n")
    assert main(["apply", str(rules), "--source", str(path), "-q"]) == 0
    assert main(["apply", str(rules), "--source", str(path), "-q", "--no-rollback"]) == 0
    assert seen == [True, False]
