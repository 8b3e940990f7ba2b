"""A plain torch.save checkpoint's metadata straight from the pickle scan (issue 16).

``torch_reader._meta_from_scan`` builds what ``torch.load(weights_only=True, map_location="meta")``
returns, from the stand-ins of the scan that already checked the file, for pickles that name only
ordered dicts, ``_rebuild_tensor_v2``, ``_rebuild_parameter`` and typed storages. Every reference
here is torch's own: the same file opened with the fast path switched off (``_meta_from_scan``
patched to say "not plain"), and the object tree ``torch.load`` itself makes on the meta device.
"""

from __future__ import annotations

import collections
import io
import pickle
import sys
import warnings
import zipfile
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from weights import Small, perturb

from remap.errors import SourceError
from remap.sources import torch_reader
from remap.sources.readers import open_source

# ---------------------------------------------------------------------------- checkpoints torch writes


def _views() -> dict[str, torch.Tensor]:
    base = torch.arange(24.0)
    grid = base.view(4, 6)
    return {"base": base, "slice": base[3:9], "transposed": grid.t(), "strided": base[1::3],
            "permuted": base.view(2, 3, 4).permute(2, 0, 1), "column": grid[:, 2], "expanded": base[5:6].expand(3, 4)}  # fmt: skip


def _module_state() -> dict[str, Any]:
    """A real module's state_dict: an OrderedDict with ``_metadata``, BN buffers (int64, 0-d)."""
    torch.manual_seed(0)
    return perturb(Small()).state_dict()


def _dtypes() -> dict[str, torch.Tensor]:
    kinds = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int8, torch.uint8, torch.int16,
             torch.int32, torch.int64, torch.bool, torch.complex64, torch.complex128)  # fmt: skip
    return {str(d).removeprefix("torch."): (torch.arange(6) % 3).to(d).reshape(2, 3) for d in kinds}


def _checkpoint() -> dict[str, Any]:
    tied = torch.randn(3, 2)
    model = _module_state()
    optimizer = torch.optim.Adam(nn.Linear(2, 2).parameters(), betas=(0.8, 0.9))
    nn.Linear(2, 2)(torch.ones(1, 2)).sum().backward()
    return {"epoch": 7, "lr": 0.125, "name": "run-1", "nothing": None, "flags": [True, False], "history": [1, 2.5, "x", None],
            "nested": {"deep": {"deeper": (1, (2, "three"), [4.0])}, "empty": {}},
            "model": model, "optimizer": optimizer.state_dict(), "tied": {"a": tied, "b": tied, "c": [tied, (tied,)]}}  # fmt: skip


def _deep() -> dict[str, Any]:
    """A tensor at the bottom of 10,000 dicts, lists and tuples (the pickler recurses; remap must not)."""
    bottom: Any = torch.ones(2)
    for i in range(10_000):
        bottom = {"d": bottom} if i % 3 == 0 else [bottom] if i % 3 == 1 else (bottom, i)
    return {"state_dict": {"w": torch.zeros(3)}, "deep": bottom}


CASES: dict[str, tuple[Any, str | None]] = {
    "module state_dict": (_module_state(), None),
    "dtypes": (_dtypes(), None),
    "0-d and empty": ({"scalar": torch.tensor(3.5), "int": torch.tensor(7), "empty": torch.zeros(0),
                       "empty2": torch.zeros(3, 0), "empty_view": torch.arange(5.0)[5:]}, None),  # fmt: skip
    "views of one storage": (_views(), None),
    "tied entries": ({"a": (t := torch.randn(2, 2)), "b": t, "c": t.t()}, None),
    "parameters": ({"w": nn.Parameter(torch.randn(2, 3)), "frozen": nn.Parameter(torch.randn(3), requires_grad=False),
                    "grad": torch.randn(2, requires_grad=True), "plain": torch.zeros(1)}, None),  # fmt: skip
    "parameters in a list": ({"state_dict": {"w": torch.ones(2)}, "params": [nn.Parameter(torch.ones(2)), nn.Parameter(torch.zeros(1))]},
                             None),  # fmt: skip
    "checkpoint dict": (_checkpoint(), "model"),
    "checkpoint auto-detected": ({"state_dict": _module_state(), "epoch": 3, "best": 0.5}, None),
    "nested source.key": ({"a": {"b": _views(), "n": 1}, "step": 2}, "a.b"),
}


def save(obj: Any, path: Path) -> Path:
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(60_000)  # the pickler recurses through a deeply nested checkpoint
    try:
        torch.save(obj, path)
    finally:
        sys.setrecursionlimit(limit)
    return path


def open_reader(path: Path, key: str | None = None, trust_pickle: bool = False) -> Any:
    return torch_reader._TorchReader(path, "torch-zip", key=key, trust_pickle=trust_pickle)


def slow_reader(path: Path, monkeypatch: pytest.MonkeyPatch, key: str | None = None, **kw: Any) -> Any:
    """The reader as it was before the fast path: metadata from torch.load on the meta device."""
    with monkeypatch.context() as m:
        m.setattr(torch_reader, "_meta_from_scan", lambda *a: None)
        return open_reader(path, key, **kw)


@pytest.fixture
def no_meta_load(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    """Fails any torch.load on the meta device (the fast path must not need one); records the others."""
    real, calls = torch_reader._torch_load, []

    def spy(path: Path, **kw: Any) -> Any:
        calls.append(kw)
        if kw["meta"]:
            raise AssertionError("torch.load on the meta device: the fast path was not taken")
        return real(path, **kw)

    monkeypatch.setattr(torch_reader, "_torch_load", spy)
    return calls


def assert_same_reader(fast: Any, slow: Any) -> None:
    assert (fast.meta, fast.entries, fast.parts, fast.detected) == (slow.meta, slow.entries, slow.parts, slow.detected)
    assert fast.notes == slow.notes
    for key in slow.meta:
        assert fast.span(key) == slow.span(key), key
        a, b = fast.read(key), slow.read(key)
        assert (a.dtype, a.shape, a.stride(), a.storage_offset()) == (b.dtype, b.shape, b.stride(), b.storage_offset()), key
        assert torch.equal(a, b), key


# ---------------------------------------------------------------------------- the reader, both ways


@pytest.mark.parametrize("case", list(CASES))
def test_the_fast_path_opens_what_torch_load_opens(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str) -> None:
    obj, key = CASES[case]
    path = save(obj, tmp_path / "ckpt.pth")
    slow = slow_reader(path, monkeypatch, key)
    calls: list[Any] = []
    real = torch_reader._torch_load
    monkeypatch.setattr(torch_reader, "_torch_load", lambda p, **kw: (calls.append(kw["meta"]), real(p, **kw))[1])
    fast = open_reader(path, key)
    assert calls == []  # opened without torch.load
    assert_same_reader(fast, slow)
    assert all(fast.span(k) is not None for k in fast.meta)  # spans were compared, not two Nones


def test_a_deeply_nested_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_meta_load: list[Any]) -> None:
    path = save(_deep(), tmp_path / "deep.pth")
    fast = open_reader(path)
    no_meta_load.clear()
    monkeypatch.undo()
    assert_same_reader(fast, slow_reader(path, monkeypatch))


def tree_of(path: Path, *, fast: bool) -> Any:
    """The object tree: from the scan (fast) or from torch.load on the meta device."""
    if not fast:
        return torch_reader._torch_load(path, meta=True, weights_only=True, mmap=False)
    zipped = torch_reader._prescan_zip(path)
    made = torch_reader._meta_from_scan(zipped.scan, zipped.layout.data, zipped.prefix, str(path))
    assert made is not None, "the fast path refused a plain checkpoint"
    return made


def assert_same_tree(a: Any, b: Any) -> None:
    """Equal trees, walked without recursion: types, keys, values, tensors' layouts, storages and
    offsets in the file, ``_metadata``, and identity (one object in one is one object in the other)."""
    pairs: dict[int, int] = {}
    stack = [(a, b, "")]
    while stack:
        x, y, at = stack.pop()
        assert type(x) is type(y), at
        if isinstance(x, (str, int, float, bool, type(None), set)):
            assert x == y, at
            continue
        if pairs.setdefault(id(x), id(y)) != id(y):
            raise AssertionError(f"{at}: shared in one tree, not in the other")
        if isinstance(x, torch.Tensor):
            sx, sy = x.untyped_storage(), y.untyped_storage()
            assert (x.dtype, x.shape, x.stride(), x.storage_offset(), x.requires_grad, x.device) == (
                y.dtype, y.shape, y.stride(), y.storage_offset(), y.requires_grad, y.device), at  # fmt: skip
            assert (sx.nbytes(), sx._checkpoint_offset) == (sy.nbytes(), sy._checkpoint_offset), at
        elif isinstance(x, dict):
            assert list(x) == list(y), at
            stack += [(x[k], y[k], f"{at}.{k}") for k in x]
            if type(x) is not dict:  # an OrderedDict's attributes: a state_dict's _metadata
                assert vars(x).keys() == vars(y).keys(), at
                stack += [(v, vars(y)[k], f"{at}.__dict__.{k}") for k, v in vars(x).items()]
        else:
            assert isinstance(x, (list, tuple)) and len(x) == len(y), at
            stack += [(u, v, f"{at}[{i}]") for i, (u, v) in enumerate(zip(x, y))]


@pytest.mark.parametrize("case", list(CASES))
def test_the_scanned_tree_is_torch_loads_meta_tree(tmp_path: Path, case: str) -> None:
    path = save(CASES[case][0], tmp_path / "ckpt.pth")
    assert_same_tree(tree_of(path, fast=True), tree_of(path, fast=False))


def test_the_deep_tree_too(tmp_path: Path) -> None:
    path = save(_deep(), tmp_path / "deep.pth")
    assert_same_tree(tree_of(path, fast=True), tree_of(path, fast=False))


def test_identity_and_metadata_survive(tmp_path: Path) -> None:
    tree = tree_of(save(_checkpoint(), tmp_path / "c.pth"), fast=True)
    assert tree["tied"]["a"] is tree["tied"]["b"] is tree["tied"]["c"][0] is tree["tied"]["c"][1][0]
    assert type(tree["model"]) is collections.OrderedDict
    assert tree["model"]._metadata == _module_state()._metadata
    assert tree["optimizer"]["param_groups"][0]["betas"] == (0.8, 0.9)


# ---------------------------------------------------------------------------- not plain: torch.load, as before


class Custom:
    """A class a checkpoint may pickle: only trust_pickle opens it."""

    def __init__(self) -> None:
        self.value = 3


def np_array() -> Any:
    np = pytest.importorskip("numpy")
    return np.arange(3)


@pytest.mark.parametrize(
    ("extra", "trust"),
    [(np_array, False), (lambda: torch.Size([2, 3]), False), (lambda: torch.zeros(2, dtype=torch.float8_e4m3fn), False),
     (lambda: collections.Counter(a=1), False), (Custom, True)],
    ids=["numpy", "torch.Size", "float8 (UntypedStorage, v3)", "Counter", "custom class, trusted"],
)  # fmt: skip
def test_other_globals_go_through_torch_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, extra: Any, trust: bool) -> None:
    path = save({"state_dict": {"w": torch.ones(2, 2)}, "extra": extra()}, tmp_path / "other.pth")
    real, calls = torch_reader._torch_load, []
    monkeypatch.setattr(torch_reader, "_torch_load", lambda p, **kw: (calls.append(kw), real(p, **kw))[1])
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        fast = open_reader(path, trust_pickle=trust)
        slow = slow_reader(path, monkeypatch, trust_pickle=trust)
    assert calls[0] == {"meta": True, "weights_only": True, "mmap": False}
    assert calls[-1] == {"meta": True, "weights_only": not trust, "mmap": False}
    assert len([w for w in warned if "trust_pickle is set" in str(w.message)]) == (2 if trust else 0)
    if trust:  # an object's repr holds its address
        fast.entries, slow.entries = fast.entries.keys(), slow.entries.keys()
    assert_same_reader(fast, slow)


def test_a_custom_class_is_refused_without_trust_as_before(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save({"state_dict": {"w": torch.ones(2)}, "extra": Custom()}, tmp_path / "custom.pth")
    with pytest.raises(SourceError) as fast:
        open_reader(path)
    with pytest.raises(SourceError) as slow:
        slow_reader(path, monkeypatch)
    assert str(fast.value) == str(slow.value)
    assert "Custom" in str(fast.value) and "trust" in str(fast.value)


def test_the_scan_marks_opcodes_torch_reads_otherwise() -> None:
    def scan(data: bytes) -> Any:
        return torch_reader._scan_pickle(io.BytesIO(data))

    plain = scan(pickle.dumps({"a": [1, (2, "x")], "b": 2.5, "c": None}, protocol=2))
    assert not plain.exotic and plain.result == {"a": [1, (2, "x")], "b": 2.5, "c": None}
    assert scan(b"\x80\x02]K\x05aK\x00K\x07s.").exotic  # SETITEM into a list: pickle does it, torch refuses
    assert scan(pickle.dumps(b"bytes", protocol=3)).exotic  # BINBYTES: not in torch's weights_only opcodes


@pytest.mark.parametrize("protocol", [4, 5])
def test_the_scan_reads_framed_pickles(protocol: int) -> None:
    value = {"k": [1, 2.5, ("x" * 100_000, None)], "deep": [[["y" * 70_000]]], "n": -(2**70)}
    scan = torch_reader._scan_pickle(io.BytesIO(pickle.dumps(value, protocol=protocol)))
    assert scan.result == value and scan.exotic


# ---------------------------------------------------------------------------- hostile: crafted pickles


class _Storage:
    def __init__(self, key: str, numel: int) -> None:
        self.key, self.numel = key, numel


class _Tensor:
    """Pickles as torch.save writes a tensor, with any layout."""

    def __init__(self, storage: _Storage, offset: Any, size: Any, stride: Any) -> None:
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce__(self) -> Any:
        return torch._utils._rebuild_tensor_v2, self.args


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: Any) -> Any:
        return ("storage", torch.FloatStorage, obj.key, "cpu", obj.numel) if isinstance(obj, _Storage) else None


def crafted(tmp_path: Path, tree: Any) -> Path:
    """A torch.save archive of one 6-float storage ``0`` whose data.pkl is ``tree`` pickled."""
    good = save({"w": torch.arange(6.0)}, tmp_path / "good.pth")
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(tree)
    path = tmp_path / "crafted.pth"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, buffer.getvalue() if info.filename.endswith("/data.pkl") else zin.read(info))
    return path


def test_a_crafted_plain_pickle_takes_the_fast_path(tmp_path: Path, no_meta_load: list[Any]) -> None:
    """The crafting is right: a well-formed one opens, and reads what torch.save wrote."""
    storage = _Storage("0", 6)
    path = crafted(tmp_path, {"model": {"w": _Tensor(storage, 1, (2, 2), (1, 2))}})
    reader = open_reader(path)
    assert (reader.parts, reader.meta["w"].shape) == (["model"], (2, 2))
    assert torch.equal(reader.read("w"), torch.arange(6.0).as_strided((2, 2), (1, 2), 1))


@pytest.mark.hostile
@pytest.mark.parametrize(
    ("numel", "offset", "size", "stride", "problem"),
    [
        (6, 0, (4, 4), (4, 1), "of shape (4, 4) with strides (4, 1) at storage offset 0 reaches element 16 of its "
         "storage, which holds 6"),
        (6, 5, (2,), (1,), "of shape (2,) with strides (1,) at storage offset 5 reaches element 7 of its storage, which holds 6"),
        (6, 0, (2, 3), (0, 3), "of shape (2, 3) with strides (0, 3) at storage offset 0 reaches element 7 of its storage, "
         "which holds 6"),
        (6, 0, (-1,), (1,), "has shape (-1,), expected a tuple of non-negative integers"),
        (6, 0, (2.0,), (1,), "has shape (2.0,), expected a tuple of non-negative integers"),
        (6, 0, ("2",), (1,), "has shape ('2',), expected a tuple of non-negative integers"),
        (6, 0, (2,), (-1,), "of shape (2,) has strides (-1,), expected one non-negative integer per dimension"),
        (6, 0, (2, 2), (1,), "of shape (2, 2) has strides (1,), expected one non-negative integer per dimension"),
        (6, -1, (2,), (1,), "has storage offset -1, expected a non-negative integer"),
        (6, 0, (2**64, 2**64), (1, 1), "of shape (18446744073709551616, 18446744073709551616) with strides (1, 1) at "
         "storage offset 0 reaches element 36893488147419103231 of its storage, which holds 6"),
    ],
    ids=["too-big", "offset-past-end", "stride-past-end", "negative-size", "float-size", "str-size", "negative-stride",
         "stride-count", "negative-offset", "huge"],
)  # fmt: skip
def test_a_tensor_its_storage_cannot_hold(tmp_path: Path, numel: int, offset: Any, size: Any, stride: Any, problem: str) -> None:
    path = crafted(tmp_path, {"model": {"layer": {"w": _Tensor(_Storage("0", numel), offset, size, stride)}}})
    with pytest.raises(SourceError) as info:
        open_reader(path)
    assert str(info.value) == f"{path}: corrupt checkpoint: the tensor at 'model.layer.w' {problem}"


@pytest.mark.hostile
def test_a_storage_bigger_than_its_record(tmp_path: Path) -> None:
    path = crafted(tmp_path, {"w": _Tensor(_Storage("0", 100), 0, (10,), (1,))})
    with pytest.raises(SourceError) as info:
        open_reader(path)
    assert str(info.value) == f"{path}: corrupt checkpoint: data.pkl gives storage '0' 400 bytes, but its record good/data/0 holds 24"


@pytest.mark.hostile
def test_a_storage_outside_a_rebuild_call_is_left_to_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A bare storage in the tree is not plain: torch.load reads it, as before (and it is no weight)."""
    path = crafted(tmp_path, {"model": {"w": _Tensor(_Storage("0", 6), 0, (6,), (1,))}, "raw": _Storage("0", 6)})
    calls: list[Any] = []
    real = torch_reader._torch_load
    monkeypatch.setattr(torch_reader, "_torch_load", lambda p, **kw: (calls.append(kw["meta"]), real(p, **kw))[1])
    reader = open_reader(path)
    assert calls == [True] and list(reader.meta) == ["w"]


@pytest.mark.hostile
def test_hooks_or_tensor_metadata_are_left_to_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hooked = _Tensor(_Storage("0", 6), 0, (6,), (1,))
    hooked.args = (*hooked.args[:5], collections.OrderedDict(h=1))
    tagged = _Tensor(_Storage("0", 6), 0, (6,), (1,))
    tagged.args = (*tagged.args, {"tag": 1})
    path = crafted(tmp_path, {"w": hooked})
    assert torch_reader._meta_from_scan(*_scanned(path)) is None
    path = crafted(tmp_path, {"w": tagged})
    assert torch_reader._meta_from_scan(*_scanned(path)) is None


def _scanned(path: Path) -> tuple[Any, ...]:
    zipped = torch_reader._prescan_zip(path)
    return zipped.scan, zipped.layout.data, zipped.prefix, str(path)


@pytest.mark.hostile
def test_a_rezipped_checkpoint_gets_spans_at_its_real_offsets(tmp_path: Path) -> None:
    """Offsets come from the archive's own headers, not from miniz's layout rules."""
    good = save({"a": torch.arange(6.0), "b": torch.arange(4.0) + 10}, tmp_path / "good.pth")
    path = tmp_path / "rezipped.pth"
    with zipfile.ZipFile(good) as zin, zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, zin.read(info))
    with open_source(path) as src:
        for key, want in {"a": torch.arange(6.0), "b": torch.arange(4.0) + 10}.items():
            span = src.span(key)
            assert span is not None
            with open(path, "rb") as f:
                f.seek(span.offset)
                assert torch.equal(torch.frombuffer(bytearray(f.read(span.nbytes)), dtype=torch.float32), want)
