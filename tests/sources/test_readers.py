"""Reading sources: metadata without tensor data, tensors one at a time, clear failures."""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from helpers import Config, assert_same, metas, mixed_state_dict, save, save_sharded
from weights import Small, perturb

import remap.sources.readers as sources
import remap.sources.safetensors_reader as safetensors_reader
from remap.errors import SourceError, UsageError
from remap.meta import TensorMeta
from remap.sources.readers import open_source

ACCEPTED = (
    "a torch.save file (.pt .pth .bin .ckpt .tar; a whole pickled model or a TorchScript archive too), "
    "a .safetensors file, a sharded *.safetensors.index.json or *.bin.index.json, a folder holding one, "
    "or another framework's file (ONNX, NumPy .npz/.npy, GGUF, Keras .keras/.h5, Flax .msgpack, "
    "a TensorFlow checkpoint)"
)
TRUST = "`source.trust_pickle: true` in the rules or `--trust-pickle` on the command line"


def source_error(fn, *args, **kwargs) -> SourceError:
    with pytest.raises(SourceError) as info:
        fn(*args, **kwargs)
    assert info.value.exit_code == 3
    return info.value


# ---------------------------------------------------------------------------- formats


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("torch-zip", "w.pth"), ("torch-legacy", "w.pt"), ("safetensors", "w.safetensors"),
     ("torch-zip", "w.weights"), ("safetensors", "w.data")],
)  # fmt: skip
def test_each_format_gives_metadata_and_tensors(tmp_path: Path, fmt: str, name: str) -> None:
    state = mixed_state_dict()
    path = save(state, tmp_path / name, fmt)
    with open_source(path) as src:
        assert src.meta == metas(state)
        if fmt != "safetensors":  # safetensors stores keys sorted
            assert list(src.meta) == list(state)
        assert src.description["format"] == fmt
        assert src.description["kind"] == "file"
        assert src.description["path"] == str(path)
        assert src.description["files"] == 1
        for key, tensor in state.items():
            assert_same(src.read(key), tensor)


def test_torch_metadata_is_loaded_on_the_meta_device(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save(perturb(Small()).state_dict(), tmp_path / "small.pt")
    real_load, calls = torch.load, []

    def spy(*args, **kwargs):
        out = real_load(*args, **kwargs)
        calls.append((kwargs.get("map_location"), kwargs.get("mmap"), {v.device.type for v in out.values()}))
        return out

    monkeypatch.setattr(torch, "load", spy)
    src = open_source(path)
    assert calls == []  # a plain state_dict: metadata from the pickle scan (torch_reader._meta_from_scan)
    src.read("conv.weight")
    src.read("fc.bias")  # the data load happens once, memory-mapped
    assert calls == [("cpu", True, {"cpu"})]


def test_safetensors_metadata_reads_no_tensor_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    state = mixed_state_dict()
    path = save(state, tmp_path / "w.safetensors", "safetensors")

    def refuse(p):
        raise AssertionError("tensor data read while reading metadata")

    monkeypatch.setattr(safetensors_reader, "_open_safetensors", refuse)
    src = open_source(path)
    assert src.meta == metas(state)
    monkeypatch.undo()
    assert_same(src.read("fc.weight"), state["fc.weight"])


def test_safetensors_metadata_is_in_entries(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    assert open_source(tmp_path / "w.safetensors").description["entries"] == {"format": "'pt'"}


def test_legacy_format_says_it_cannot_mmap(tmp_path: Path) -> None:
    src = open_source(save({"w": torch.ones(2)}, tmp_path / "w.pt", "torch-legacy"))
    assert src.description["notes"] == [
        "legacy torch.save format cannot be memory-mapped: the whole file is loaded on the first read"
    ]


def test_relative_paths_resolve_against_base_dir(tmp_path: Path) -> None:
    save({"w": torch.ones(2)}, tmp_path / "ckpt" / "w.pt")
    assert list(open_source("ckpt/w.pt", base_dir=tmp_path).meta) == ["w"]


def test_unknown_key_names_close_matches(tmp_path: Path) -> None:
    path = save(perturb(Small()).state_dict(), tmp_path / "small.pt")
    err = source_error(open_source(path).read, "fc.weigth")
    assert str(err) == f"{path}: no tensor 'fc.weigth' in this source (8 tensors); did you mean 'fc.weight', 'conv.weight', 'bn.weight'?"


def test_file_changed_after_planning_is_refused(tmp_path: Path) -> None:
    path = save({"w": torch.ones(2)}, tmp_path / "w.pt")
    src = open_source(path)
    save({"w": torch.ones(3)}, path)
    os.utime(path, ns=(1, 1))
    err = source_error(src.read, "w")
    assert str(err) == f"{path}: the file changed on disk since its metadata was read; plan again"


# ---------------------------------------------------------------------------- nesting

LIGHTNING = {"epoch": 3, "global_step": 120, "hyper_parameters": {"lr": 0.1}, "optimizer_states": []}


@pytest.mark.parametrize(
    ("wrap", "key", "entries"),
    [
        (lambda sd: sd, None, {}),
        (lambda sd: {"state_dict": sd}, "state_dict", {}),
        (lambda sd: {"model": sd, "optimizer": {"state": {}}}, "model", {"optimizer": "{'state': {}}"}),
        (lambda sd: {"state_dict": sd, **LIGHTNING}, "state_dict",
         {"epoch": "3", "global_step": "120", "hyper_parameters": "{'lr': 0.1}", "optimizer_states": "[]"}),
        (lambda sd: {"model": {"state_dict": sd, "arch": "small"}, "step": 5}, "model.state_dict", {"step": "5"}),
        (lambda sd: {"checkpoint": {"module": sd}}, "checkpoint.module", {}),
    ],
)  # fmt: skip
def test_nested_weights_are_found(tmp_path: Path, wrap, key: str | None, entries: dict) -> None:
    state = perturb(Small()).state_dict()
    with open_source(save(wrap(state), tmp_path / "c.ckpt")) as src:
        assert src.meta == metas(state)
        assert (src.description["key"], src.description["key_detected"]) == (key, key is not None)
        assert src.description["entries"] == entries
        assert_same(src.read("bn.running_var"), state["bn.running_var"])


def test_in_memory_checkpoint_dicts_are_searched_too() -> None:
    state = perturb(Small()).state_dict()
    src = open_source({"state_dict": state, "epoch": 2})
    assert (src.description["kind"], src.description["key"], src.description["entries"]) == ("state_dict", "state_dict", {"epoch": "2"})
    assert src.read("fc.weight") is state["fc.weight"]


def test_extra_state_entries_do_not_hide_a_state_dict(tmp_path: Path) -> None:
    path = save({"w": torch.ones(2), "norm._extra_state": {"v": 1}}, tmp_path / "w.pt")
    src = open_source(path)
    assert (list(src.meta), src.description["key"]) == (["w"], None)
    assert src.description["entries"] == {"norm._extra_state": "{'v': 1}"}


def test_top_level_tensors_with_a_few_other_entries(tmp_path: Path) -> None:
    path = save({"w": torch.ones(2), "b": torch.zeros(1), "epoch": 3}, tmp_path / "w.pt")
    src = open_source(path)
    assert (list(src.meta), src.description["key"], src.description["entries"]) == (["w", "b"], None, {"epoch": "3"})


def test_two_candidates_fail_naming_both(tmp_path: Path) -> None:
    state = perturb(Small()).state_dict()
    path = save({"model": state, "ema": {"module": state}, "epoch": 1}, tmp_path / "c.pt")
    err = source_error(open_source, path)
    assert str(err) == (
        f"{path}: the checkpoint holds several sets of weights: 'model' (8 tensors) and 'ema.module' (8 tensors); "
        "say which to load with `source.key` (e.g. `key: model`)"
    )
    assert open_source(path, key="ema.module").description["key"] == "ema.module"


def test_no_candidate_fails_listing_the_entries(tmp_path: Path) -> None:
    path = save({"backbone_weights": {"w": torch.ones(2)}, "epoch": 3, "args": [1, 2]}, tmp_path / "c.pt")
    err = source_error(open_source, path)
    assert str(err) == (
        f"{path}: no weights found: no entry named state_dict, model, model_state, model_state_dict, module, ema, "
        "model_ema, state_dict_ema, net, network, params, weights (searched two levels deep) is a dict of tensors; "
        "the checkpoint's top-level entries are 'backbone_weights' (dict, 1 tensor), 'epoch' (int), 'args' (list). "
        "Say where the weights are with `source.key` (e.g. `key: backbone_weights`)"
    )
    assert list(open_source(path, key="backbone_weights").meta) == ["w"]


@pytest.mark.parametrize(
    ("obj", "key", "message"),
    [
        ({"a": {"b": {"w": torch.ones(1)}}}, "a.c",
         "source.key 'a.c': no entry 'c' under 'a'; found 'b' (dict, 1 tensor)"),
        ({"state_dict": {"w": torch.ones(1)}, "epoch": 1}, "stat_dict",
         "source.key 'stat_dict': no entry 'stat_dict' at the top level; found 'state_dict' (dict, 1 tensor), "
         "'epoch' (int); did you mean 'state_dict'?"),
        ({"epoch": 1, "w": torch.ones(1)}, "epoch.x", "source.key 'epoch.x': 'epoch' holds a int, not a dict, so it has no entry 'x'"),
        ({"epoch": 1, "w": torch.ones(1)}, "epoch", "source.key 'epoch' holds a int, expected a dict of tensors"),
        ({"hp": {"lr": 0.1}}, "hp", "source.key 'hp' holds a dict with no tensors directly in it; found 'lr' (float)"),
        (["w"], None, "holds a list, expected a dict of tensors (a state_dict) or a checkpoint dict holding one"),
        ({}, None, "the checkpoint is an empty dict: it holds no tensors"),
    ],
)  # fmt: skip
def test_wrong_keys_and_shapes_of_checkpoint(tmp_path: Path, obj, key, message: str) -> None:
    path = save(obj, tmp_path / "c.pt")
    assert str(source_error(open_source, path, key=key)) == f"{path}: {message}"


def test_a_key_with_dots_in_an_entry_name(tmp_path: Path) -> None:
    path = save({"model.ema": {"w": torch.ones(1)}, "model": {"w": torch.ones(1)}}, tmp_path / "c.pt")
    assert open_source(path, key="model.ema").description["key"] == "model.ema"


def test_key_on_safetensors_is_refused(tmp_path: Path) -> None:
    path = save({"w": torch.ones(1)}, tmp_path / "w.safetensors", "safetensors")
    assert str(source_error(open_source, path, key="state_dict")) == (
        f"{path}: source.key 'state_dict' applies only to torch.save checkpoints; a safetensors file holds its "
        "tensors at the top level, so leave `key` out"
    )


# ---------------------------------------------------------------------------- pickles


@pytest.mark.parametrize(("extra", "name"), [(Config(), "helpers.Config"), (datetime.date(2024, 1, 2), "datetime.date")])
def test_pickled_classes_are_refused_then_trusted(tmp_path: Path, extra, name: str) -> None:
    state = perturb(Small()).state_dict()
    path = save({"state_dict": state, "config": extra}, tmp_path / "c.ckpt")
    err = source_error(open_source, path)
    assert str(err) == (
        f"{path}: torch.load refused this pickle: it needs the global {name!r}, which loading with "
        f"weights_only=True does not allow. Unpickling it could run arbitrary code. Only if you trust this file, "
        f"opt in with {TRUST}"
    )
    with pytest.warns(UserWarning, match=re.escape(f"{path}: loaded with torch.load(weights_only=False)")):
        src = open_source(path, trust_pickle=True)
    assert src.description["entries"] == {"config": repr(extra)}
    assert src.description["notes"] == ["trusted pickle: loaded with weights_only=False"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once, at open
        assert_same(src.read("fc.weight"), state["fc.weight"])


def test_trust_pickle_does_not_warn_for_a_plain_state_dict(tmp_path: Path) -> None:
    path = save({"w": torch.ones(2)}, tmp_path / "w.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert open_source(path, trust_pickle=True).description["notes"] == []


def test_a_pickled_module_stands_for_its_state_dict(tmp_path: Path) -> None:
    """Read without running it (no trust, no warning), with or without trust_pickle."""
    model = perturb(Small())
    path = tmp_path / "model.pt"
    torch.save(model, path)
    for trust in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # nothing was trusted: no warning
            src = open_source(path, trust_pickle=trust)
        assert src.description["format"] == "torch-module"
        assert src.meta == metas(model.state_dict())
        assert_same(src.read("conv.weight"), model.conv.weight.detach())
        src.close()


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_is_read_without_trust(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = perturb(Small())
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(model), str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # nothing trusted, nothing run
        src = open_source(path)
    assert src.description["format"] == "torchscript"
    assert_same(src.read("fc.weight"), model.fc.weight.detach())
    # what the inert reader cannot read (here: more code than it reads) still needs the opt-in
    monkeypatch.setattr("remap.sources.torchscript_reader.MAX_CODE_BYTES", 10)
    err = str(source_error(open_source, path))
    assert err.startswith(f"{path}: is a TorchScript archive that remap cannot read without running it: its code/ folder holds ")
    assert err.endswith(f"Only torch.jit.load reads it, which runs its code: opt in with {TRUST} if you trust it")
    with pytest.warns(UserWarning, match="TorchScript"):
        src = open_source(path, trust_pickle=True)
    assert src.description["format"] == "torchscript"
    assert_same(src.read("fc.weight"), model.fc.weight.detach())


# ---------------------------------------------------------------------------- broken files


def _truncated_zip(p: Path) -> Path:
    save({"w": torch.ones(100)}, p)
    p.write_bytes(p.read_bytes()[:200])
    return p


def _truncated_safetensors(p: Path) -> Path:
    save({"w": torch.ones(100)}, p, "safetensors")
    p.write_bytes(p.read_bytes()[:-8])
    return p


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: p, f"no such file or folder; expected {ACCEPTED}"),
        (lambda p: (p.write_bytes(b""), p)[1], f"the file is empty (0 bytes); expected {ACCEPTED}"),
        (lambda p: (p.write_bytes(b"hello, weights!!" * 4), p)[1],
         "not a checkpoint remap can read: its first bytes are neither a zip archive (torch.save), a pickle "
         f"(legacy torch.save) nor a safetensors header; expected {ACCEPTED}"),  # the bytes are never echoed
        (_truncated_zip, "looks like a torch.save zip archive but is truncated or corrupt (File is not a zip file)"),
        (_truncated_safetensors, "truncated: the tensor data ends at byte 472 but the file has 464 bytes"),
        (lambda p: (p.write_bytes((11).to_bytes(8, "little") + b'{"w": [1, 2'), p)[1],
         "the safetensors header is not valid JSON: Expecting ',' delimiter: line 1 column 12 (char 11)"),
    ],
)  # fmt: skip
def test_unreadable_files_fail_with_the_path(tmp_path: Path, make, message: str) -> None:
    path = make(tmp_path / "w.pt")
    assert str(source_error(open_source, path)) == f"{path}: {message}"


def test_a_zip_that_is_not_a_checkpoint(tmp_path: Path) -> None:
    import zipfile

    with zipfile.ZipFile(tmp_path / "w.pt", "w") as archive:
        archive.writestr("readme.txt", "hi")
    assert str(source_error(open_source, tmp_path / "w.pt")) == (
        f"{tmp_path / 'w.pt'}: is a zip archive but not a torch.save checkpoint (no data.pkl in it); expected {ACCEPTED}"
    )


# ---------------------------------------------------------------------------- shards and folders


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_sharded_index_reads_one_shard_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str) -> None:
    state = mixed_state_dict()
    index = save_sharded(state, tmp_path, shards=3, fmt=fmt)
    opened: list[str] = []
    real_open, real_load = safetensors_reader._open_safetensors, torch.load
    monkeypatch.setattr(safetensors_reader, "_open_safetensors", lambda p: (opened.append(p.name), real_open(p))[1])
    monkeypatch.setattr(torch, "load", lambda p, **kw: (opened.append(Path(p).name), real_load(p, **kw))[1])
    src = open_source(index)
    shards = sorted({p.name for p in tmp_path.iterdir() if not p.name.endswith(".json")})
    assert opened == []  # torch shards: metadata from the pickle scan, no torch.load
    assert src.meta == metas(state)
    assert src.description["format"] == ("safetensors-index" if fmt == "safetensors" else "torch-index")
    assert (src.description["files"], src.description["entries"]) == (3, {"metadata": "{'total_size': 123}"})
    opened.clear()
    for key in src.meta:  # grouped by shard: each shard is opened once
        assert_same(src.read(key), state[key])
    assert opened == shards
    src.read(next(iter(src.meta)))  # the first shard was let go: it opens again
    assert opened == [*shards, shards[0]]
    assert open_source(tmp_path).description["path"] == str(index)  # a folder finds the index


def test_missing_shard_names_index_and_shard(tmp_path: Path) -> None:
    index = save_sharded(mixed_state_dict(), tmp_path, shards=2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    assert str(source_error(open_source, index)) == (
        f"{index}: shard 'model-00002-of-00002.safetensors' (holding 3 tensors, e.g. 'bn.running_mean') is "
        f"missing: no file {tmp_path / 'model-00002-of-00002.safetensors'}"
    )


def test_index_naming_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    index = save_sharded({"a.w": torch.ones(1), "b.w": torch.ones(2)}, tmp_path, shards=2)
    data = json.loads(index.read_text())
    data["weight_map"]["c.w"] = "model-00001-of-00002.safetensors"
    index.write_text(json.dumps(data))
    assert str(source_error(open_source, index)) == (
        f"{index}: the weight_map puts 'c.w' in shard 'model-00001-of-00002.safetensors', but that shard holds "
        "no such tensor; did you mean 'a.w'?"
    )


@pytest.mark.parametrize(
    ("files", "chosen"),
    [
        (["model.safetensors", "pytorch_model.bin", "notes.txt"], "model.safetensors"),
        (["pytorch_model.bin", "other.pt"], "pytorch_model.bin"),
        (["resnet.pth", "config.json"], "resnet.pth"),
    ],
)
def test_folder_picks_the_weights_file(tmp_path: Path, files: list[str], chosen: str) -> None:
    for name in files:
        if name.endswith(".txt") or name.endswith(".json"):
            (tmp_path / name).write_text("{}")
        else:
            save({"w": torch.ones(1)}, tmp_path / name, "safetensors" if name.endswith(".safetensors") else "torch-zip")
    src = open_source(tmp_path)
    assert (src.description["path"], src.description["folder"]) == (str(tmp_path / chosen), str(tmp_path))


@pytest.mark.parametrize(
    ("files", "found"), [([], "no files"), (["a.pt", "b.pt", "c.txt"], "a.pt, b.pt, c.txt")]
)
def test_folder_without_one_weights_file(tmp_path: Path, files: list[str], found: str) -> None:
    for name in files:
        (tmp_path / name).write_bytes(b"x")
    assert str(source_error(open_source, tmp_path)) == (
        f"{tmp_path}: cannot tell which file in this folder holds the weights: found {found}; expected one of "
        "model.safetensors.index.json, model.safetensors, pytorch_model.bin.index.json, pytorch_model.bin, or "
        "exactly one *.index.json, *.safetensors, *.pt, *.pth, *.bin or *.ckpt file"
    )


# ---------------------------------------------------------------------------- in memory and factories


def test_state_dict_source_returns_the_tensors_themselves() -> None:
    state = perturb(Small()).state_dict()
    src = open_source(state)
    assert src.description == {
        "kind": "state_dict", "path": None, "format": None, "key": None, "key_detected": False, "files": 0,
        "factory": None, "entries": {}, "notes": [], "folder": None,
    }  # fmt: skip
    assert src.meta == metas(state)
    assert all(src.read(k) is v for k, v in state.items())


def test_metadata_source_has_no_data() -> None:
    src = open_source({"fc.weight": [10, 512], "fc.bias": ([10], "float16"), "x": TensorMeta((2,), "int64")})
    assert src.description["kind"] == "metadata"
    assert src.meta == {
        "fc.weight": TensorMeta((10, 512)), "fc.bias": TensorMeta((10,), "float16"), "x": TensorMeta((2,), "int64"),
    }  # fmt: skip
    assert str(source_error(src.read, "fc.bias")) == (
        "source (metadata): cannot read 'fc.bias': this source is metadata only (shapes and dtypes), "
        "it has no tensor data"
    )


def test_meta_tensors_in_a_state_dict_cannot_be_read() -> None:
    src = open_source({"w": torch.empty(2, device="meta")})
    assert src.meta == {"w": TensorMeta((2,))}
    assert str(source_error(src.read, "w")) == "source (state_dict): tensor 'w' is on the meta device: it has no data to load"


@pytest.mark.parametrize("given", [{"model": "torchvision.models:resnet18", "kwargs": {"num_classes": 10}}, "torchvision.models:resnet18"])
def test_factory_builds_on_meta_until_read(monkeypatch: pytest.MonkeyPatch, given) -> None:
    built: list[str] = []
    real_build = sources.build

    def spy(*args, **kwargs):
        module = real_build(*args, **kwargs)
        built.append(next(module.parameters()).device.type)
        return module

    monkeypatch.setattr(sources, "build", spy)
    src = open_source(given, factory_kwargs={"num_classes": 10})
    assert built == ["meta"]
    assert src.meta["fc.weight"] == TensorMeta((10, 512))
    assert len(src.meta) == 122
    assert (src.description["kind"], src.description["factory"]) == ("factory", "torchvision.models:resnet18")
    weight = src.read("conv1.weight")
    assert built == ["meta", "cpu"] and weight.shape == (64, 3, 7, 7) and weight.abs().sum() > 0
    src.read("fc.bias")
    assert built == ["meta", "cpu"]


def test_factory_failures_are_source_errors() -> None:
    err = source_error(open_source, {"model": "torchvision.models:resnet18", "kwargs": {"num_clases": 3}})
    assert str(err) == (
        "source.model: torchvision.models:resnet18(num_clases=3) raised TypeError: "
        "ResNet.__init__() got an unexpected keyword argument 'num_clases'"
    )
    err = source_error(open_source, {"model": "collections:OrderedDict"})
    assert str(err) == "source.model: collections:OrderedDict() returned a OrderedDict, expected a torch.nn.Module"


def needs_real_tensors() -> torch.nn.Module:
    """A factory that cannot run on the meta device."""
    model = torch.nn.Linear(2, 2)
    if model.weight.abs().sum().item() < 0:
        raise AssertionError
    return model


def test_factory_that_fails_on_meta_is_built_for_real() -> None:
    src = open_source({"model": needs_real_tensors})
    assert src.meta == {"weight": TensorMeta((2, 2)), "bias": TensorMeta((2,))}
    assert src.description["notes"] == [
        "built for real: it failed on the meta device (needs_real_tensors() raised RuntimeError: "
        "Tensor.item() cannot be called on meta tensors)"
    ]
    assert src.read("weight").device.type == "cpu"


def test_a_module_is_a_source() -> None:
    model = perturb(Small())
    src = open_source(model)
    assert src.meta == metas(model.state_dict())
    assert_same(src.read("fc.weight"), model.fc.weight.detach())


@pytest.mark.parametrize(
    ("source", "key", "message"),
    [
        (42, None, "a source must be a path, a state_dict, a mapping of key -> shape, a module or "
                   "{'model': 'module.path:callable'}; found int"),
        ({"w": [2]}, "", "source.key must be a non-empty string such as 'state_dict', found ''"),
    ],
)  # fmt: skip
def test_usage_errors(source, key, message: str) -> None:
    with pytest.raises(UsageError) as info:
        open_source(source, key=key)
    assert str(info.value) == message
