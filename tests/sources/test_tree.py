"""`remap inspect`: the key tree of a source, its totals and its collapsed repeats."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from helpers import save
from weights import Small, perturb

from remap.sources.readers import open_source
from remap.sources.tree import flat_to_dict, format_flat, format_tree, inspect_source, itemsize, tree_to_dict


def test_small_checkpoint_tree_text(tmp_path: Path) -> None:
    path = save({"state_dict": perturb(Small()).state_dict(), "epoch": 3, "hp": {"lr": 0.1}}, tmp_path / "s.ckpt")
    text = format_tree(inspect_source(open_source(path)))
    assert text == f"""\
source   {path}  (torch-zip)
key      state_dict (auto-detected)
entries  epoch: 3
         hp: {{'lr': 0.1}}
tensors  8 · 150 elements · 604 B
         float32  7 tensors  149 elements  596 B
         int64    1 tensor     1 element     8 B

├── conv.weight                                    [4, 3, 3, 3]  float32  108
├── bn                                                                     17  5 tensors
│   ├── {{weight,bias,running_mean,running_var}} ×4  [4]           float32   16
│   └── num_batches_tracked                        []            int64      1
└── fc                                                                     25  2 tensors
    ├── weight                                     [5, 4]        float32   20
    └── bias                                       [5]           float32    5"""


def _blocks(n: int) -> dict[str, list[int]]:
    meta = {"embed.weight": [100, 8]}
    for i in range(n):
        meta |= {f"blocks.{i}.attn.qkv.weight": [24, 8], f"blocks.{i}.attn.qkv.bias": [24],
                 f"blocks.{i}.mlp.fc1.weight": [32, 8], f"blocks.{i}.mlp.fc2.weight": [8, 32],
                 f"blocks.{i}.norm.weight": [8], f"blocks.{i}.norm.bias": [8]}  # fmt: skip
    return meta | {"head.weight": [10, 8]}


def test_numbered_repeats_collapse() -> None:
    text = format_tree(inspect_source(open_source(_blocks(12))))
    assert text == """\
source   in-memory metadata
tensors  74 · 9,808 elements · 38.3 KiB
         float32  74 tensors  9,808 elements  38.3 KiB

├── embed.weight               [100, 8]  float32    800
├── blocks.{0..11} ×12                            8,928  72 tensors  (each: 744 in 6 tensors)
│   ├── attn.qkv                                    216  2 tensors
│   │   ├── weight             [24, 8]   float32    192
│   │   └── bias               [24]      float32     24
│   ├── mlp                                         512  2 tensors
│   │   ├── fc1.weight         [32, 8]   float32    256
│   │   └── fc2.weight         [8, 32]   float32    256
│   └── norm.{weight,bias} ×2  [8]       float32     16
└── head.weight                [10, 8]   float32     80"""


def test_300_keys_fit_a_screen_and_a_differing_block_stays_apart() -> None:
    meta = _blocks(50)
    meta["blocks.7.norm.bias"] = [9]
    lines = format_tree(inspect_source(open_source(meta))).splitlines()
    assert len(meta) == 302 and len(lines) == 33
    blocks = [line.split("── ")[1] for line in lines if line.startswith(("│   ├── ", "│   └── "))]
    assert [b.split()[0] for b in blocks] == ["{0..6}", "7", "{8..49}"]
    assert "│   │       └── bias               [9]       float32       9" in lines


def test_safetensors_order_and_non_contiguous_runs() -> None:
    keys = {f"h.{i}.w": [2] for i in (0, 1, 10, 11, 2, 3, 4, 5, 6, 7, 8, 9)} | {"g.0.w": [2], "g.2.w": [2], "g.4.w": [2]}
    lines = format_tree(inspect_source(open_source(keys))).splitlines()
    assert lines[-2:] == ["├── h.{0..11}.w ×12  [2]  float32  24", "└── g.{0,2,4}.w ×3   [2]  float32   6"]


def test_max_depth_hides_deeper_levels() -> None:
    text = format_tree(inspect_source(open_source(_blocks(2))), max_depth=1)
    assert text.splitlines()[4:] == [
        "├── embed.weight      [100, 8]  float32    800",
        "├── blocks.{0..1} ×2                     1,488  12 tensors  (each: 744 in 6 tensors)  …",
        "└── head.weight       [10, 8]   float32     80",
    ]


def test_tree_to_dict_is_json() -> None:
    src = open_source({"a.0.w": ([2, 3], "bfloat16"), "a.1.w": ([2, 3], "bfloat16"), "b": [4]})
    data = json.loads(json.dumps(tree_to_dict(inspect_source(src))))
    assert data["totals"] == {"tensors": 3, "numel": 16, "bytes": 40}
    assert data["dtypes"] == {"bfloat16": {"tensors": 2, "numel": 12, "bytes": 24}, "float32": {"tensors": 1, "numel": 4, "bytes": 16}}
    assert data["nodes"] == [
        {"name": "a.{0..1}.w", "key": "a.{0..1}.w", "repeat": 2, "members": ["0", "1"], "tensors": 2,
         "numel": 12, "bytes": 24, "shape": [2, 3], "dtype": "bfloat16"},
        {"name": "b", "key": "b", "repeat": 1, "tensors": 1, "numel": 4, "bytes": 16, "shape": [4], "dtype": "float32"},
    ]  # fmt: skip
    assert data["source"]["kind"] == "metadata"


def test_factory_tree_reads_no_weights() -> None:
    tree = inspect_source(open_source("torchvision.models:resnet18"))
    assert (tree.tensors, tree.numel) == (122, 11_699_132)
    text = format_tree(tree)
    assert text.splitlines()[0] == "source   factory torchvision.models:resnet18"
    assert "├── layer1.{0..1} ×2" in text


def test_itemsize() -> None:
    assert [itemsize(d) for d in ("float32", "bfloat16", "bool", "float8_e4m3fn", "complex64")] == [4, 2, 1, 1, 8]
    assert itemsize(str(torch.float8_e4m3fnuz).removeprefix("torch.")) == 1
    assert itemsize("nonsense") == 0


def test_flat_forms_keep_every_real_key_the_tree_folds() -> None:
    meta = _blocks(3)
    tree = inspect_source(open_source(meta))
    data = json.loads(json.dumps(flat_to_dict(tree)))
    assert list(data["keys"]) == list(meta)
    assert all(data["keys"][k] == {"shape": shape, "dtype": "float32", "numel": torch.Size(shape).numel()} for k, shape in meta.items())
    assert data["totals"] == tree_to_dict(tree)["totals"]
    lines = format_flat(tree).splitlines()
    assert [line.split()[0] for line in lines] == list(meta)
    assert lines[1] == "blocks.0.attn.qkv.weight  [24, 8]   float32"
    assert format_flat(inspect_source(open_source({}))) == "(no tensors)"
