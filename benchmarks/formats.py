r"""Other frameworks' files (issue 14's measures): planning reads metadata only, loading streams.

    python benchmarks/run.py --only formats [--quick] [--repeats N] [--tmpdir DIR]
    python benchmarks/formats.py [--quick] [--size BYTES] [--formats a,b] [--variants own,remap] [--out JSON]

For every format in :data:`FORMATS` (safetensors, torch.save zip, ONNX with external data
and embedded, NumPy ``.npz``, GGUF F32 / F16 / Q8_0, Keras 3 ``.weights.h5``, Flax
``.msgpack``, a TensorFlow checkpoint) a model of many tensors of realistic shapes (a
transformer-ish stack: embedding, blocks of LayerNorm / qkv / proj / LayerNorm / fc1 / fc2
with biases, a final norm; the layout each framework uses: Keras, Flax and TF kernels are
(in, out)) is written, with the library that writes that format (safetensors, torch.save,
onnx.helper, numpy.savez, gguf.GGUFWriter, Keras itself, flax.serialization,
tf.train.Checkpoint), to a file of about ``--size`` bytes (default 1 GiB; ``--quick``
64 MiB). The target module has the reader's key names, so no rule is needed. Then, each in
a fresh subprocess:

1. **plan** — ``remap.plan(model, file)`` (what ``remap apply --dry-run`` runs) into the
   model built on ``meta``, after a warm-up plan of a tiny file of the same format (so every
   import is done) and after evicting the file's pages from the page cache
   (``fsync`` + ``posix_fadvise(DONTNEED)`` on that file only). Two counts of what the plan
   read: **read** = the bytes returned by ``read``/``pread`` syscalls (``rchar`` of
   ``/proc/self/io``, minus the bytes that reading ``/proc/self/io`` itself adds), and
   **paged** = the file's pages resident in the page cache afterwards (``mincore``): what the
   kernel fetched, with its read-ahead and any page faults of a mapping. The issue's bar:
   both under 1% of the file.
2. **load** — into a model already allocated (and written, so its pages are resident), the
   file read once beforehand (page cache warm): ``own`` is the format's own fastest loader
   into the same model (``safetensors.torch.load_file`` + ``load_state_dict``,
   ``torch.load(mmap=True)`` + ``load_state_dict``, ``onnx.load`` + ``numpy_helper.to_array``,
   ``np.load``, ``gguf.GGUFReader`` (+ ``gguf.quants.dequantize``), h5py ``dataset[()]``,
   ``flax.serialization.msgpack_restore``, ``tf.train.load_checkpoint``),
   each tensor copied into its parameter (each loader first runs once on a tiny file of the
   same format, so nothing it imports is timed); ``remap`` is ``remap.load(model, file,
   rollback=False)`` (streaming, what the issue measures), ``remap_rollback`` the default
   ``remap.load`` (which first copies the allocated model aside, to put it back if the load
   fails midway). Peak RSS above the built model: the kernel's ``VmHWM`` (reset before the
   load through ``/proc/self/clear_refs``) and ``/proc/self/status`` sampled every 2 ms
   (``_measure.RssSampler``), never ``ru_maxrss``. The issue's bars: peak at most one
   tensor (the largest) above the model, plus 8 MiB for the interpreter's own allocations,
   plus the dequantization scratch for GGUF's quantized types (the tensor's packed bytes and
   64 MiB); wall time within 1.5x of the own loader (remap / own; the same-round median when
   there are several rounds).

Every load is checked after the measurement: each model tensor equals the values written
(regenerated from their seed; for Q8_0, ``gguf.quants`` dequantizing what it quantized).
Timings are never asserted. Files are written to a temporary folder (``--tmpdir``) one
format at a time and removed after it.

Adding a format: its writer and own loader below, and one :class:`Format` line in
:data:`FORMATS`; a format whose remap reader module (or writing library) is not installed
shows as ``n/a`` rather than failing the run.

Child usage (what the parent runs)::

    python benchmarks/formats.py --make --format npz --dir DIR --size 67108864
    python benchmarks/formats.py --child plan --format npz --dir DIR --size 67108864
    python benchmarks/formats.py --child remap --format npz --dir DIR --size 67108864
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import ForeignCpu, RssSampler, Timer, warm_file  # noqa: E402

FULL_SIZE = 1 << 30
QUICK_SIZE = 64 << 20
WARM_SIZE = 1 << 18  # the tiny file planned first, so the measured plan imports nothing
MARK = "RESULT: "
RULES: dict[str, Any] = {"version": 1}  # every format is written with the target's own names
VARIANTS = ("own", "remap", "remap_rollback")
DEQUANT_SLACK = 64 << 20  # chunked dequantization scratch allowed on top of one tensor
PEAK_SLACK = 8 << 20  # the interpreter's own allocations during a load (the report, lists of keys)
CHILD_TIMEOUT = 1800  # seconds for one write or one measured child

Shape = tuple[int, ...]


# --------------------------------------------------------------------------- the model


@dataclass(frozen=True)
class Entry:
    """One tensor: ``canonical`` (the model's own name and ``cshape``), ``native`` (its name
    in the file), ``key`` (the name remap's reader gives it: the target's parameter),
    ``shape``/``dtype`` (the target parameter's), ``op`` (how the file stores the canonical
    values: "" as they are, "T" transposed, "f16" as float16, "q8_0" quantized)."""

    canonical: str
    cshape: Shape
    native: str
    key: str
    shape: Shape
    dtype: str
    op: str = ""


def dims_for(size: int) -> tuple[int, int]:
    """(hidden size, vocabulary) for a file of ``size`` bytes: wide enough for realistic shapes.

    >>> dims_for(1 << 30), dims_for(64 << 20), dims_for(1 << 20)
    ((1024, 16384), (256, 4096), (64, 1024))
    """
    dim = 1024 if size >= 256 << 20 else 256 if size >= 16 << 20 else 64
    return dim, 16 * dim


def canonical_model(size: int, bytes_per_param: float) -> list[tuple[str, Shape]]:
    """A transformer-ish stack with as many blocks as fill ``size`` bytes at ``bytes_per_param``.

    >>> m = canonical_model(1 << 20, 4.0)
    >>> m[0], m[3], len(m)
    (('embed.weight', (1024, 64)), ('blocks.0.attn.qkv.weight', (192, 64)), 51)
    """
    d, vocab = dims_for(size)
    per_block = 12 * d * d + 13 * d
    blocks = max(1, round((size / bytes_per_param - vocab * d - 2 * d) / per_block))
    out: list[tuple[str, Shape]] = [("embed.weight", (vocab, d))]
    for i in range(blocks):
        p = f"blocks.{i}"
        out += [
            (f"{p}.ln1.weight", (d,)), (f"{p}.ln1.bias", (d,)),
            (f"{p}.attn.qkv.weight", (3 * d, d)), (f"{p}.attn.qkv.bias", (3 * d,)),
            (f"{p}.attn.proj.weight", (d, d)), (f"{p}.attn.proj.bias", (d,)),
            (f"{p}.ln2.weight", (d,)), (f"{p}.ln2.bias", (d,)),
            (f"{p}.mlp.fc1.weight", (4 * d, d)), (f"{p}.mlp.fc1.bias", (4 * d,)),
            (f"{p}.mlp.fc2.weight", (d, 4 * d)), (f"{p}.mlp.fc2.bias", (d,)),
        ]  # fmt: skip
    return out + [("norm.weight", (d,)), ("norm.bias", (d,))]


def values(name: str, shape: Shape) -> Any:
    """The canonical float32 values of tensor ``name``: seeded by its name, small, all distinct
    tensors (so a misplaced or transposed tensor never passes the check)."""
    import numpy as np

    x = np.random.default_rng(zlib.crc32(name.encode())).random(shape, dtype=np.float32)
    x -= 0.5
    x *= 0.04
    return x


def stored(e: Entry) -> Any:
    """The array the writer hands its library for ``e``."""
    import numpy as np

    x = values(e.canonical, e.cshape)
    if e.op == "T":
        return np.ascontiguousarray(x.T)
    if e.op == "f16":
        return x.astype(np.float16)
    if e.op == "q8_0":
        from gguf import GGMLQuantizationType
        from gguf.quants import quantize

        return quantize(x, GGMLQuantizationType.Q8_0)
    return x


def expected(e: Entry) -> Any:
    """The values a correct load puts into ``e.key``: what the file holds, as the target's dtype."""
    if e.op == "q8_0":
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        return dequantize(stored(e), GGMLQuantizationType.Q8_0).reshape(e.shape)
    return stored(e)


def _plain(name: str, shape: Shape) -> Entry:
    return Entry(name, shape, name, name, shape, "float32")


def _npz(name: str, shape: Shape) -> Entry:
    """big_vision-style ``/``-joined member paths; remap reads them as dotted keys."""
    return Entry(name, shape, name.replace(".", "/"), name, shape, "float32")


def _gguf_f16(name: str, shape: Shape) -> Entry:
    """llama.cpp's F16 files: matrices F16, 1-d tensors (norms, biases) F32."""
    two_d = len(shape) == 2
    return Entry(name, shape, name, name, shape, "float16" if two_d else "float32", "f16" if two_d else "")


def _gguf_q8_0(name: str, shape: Shape) -> Entry:
    """Matrices Q8_0 (dequantized to float32 at read), 1-d tensors F32."""
    return Entry(name, shape, name, name, shape, "float32", "q8_0" if len(shape) == 2 else "")


_KERAS_VARS = {"ln": {"weight": "gamma", "bias": "beta"}, "embed": {"weight": "embeddings"},
               "dense": {"weight": "kernel", "bias": "bias"}}  # fmt: skip


def _keras_kind(layer: str) -> str:
    last = layer.rsplit("_", 1)[-1]
    return "ln" if last in ("ln1", "ln2", "norm") else "embed" if last == "embed" else "dense"


def _keras(name: str, shape: Shape) -> Entry:
    """Keras layers named like the model's modules (``blocks_0_attn_qkv``), Keras's variables
    (``kernel`` (in, out), ``bias``, ``gamma``/``beta``, ``embeddings``); ``native`` is the
    layer/variable path, the h5 dataset comes from the writer's record."""
    module, param = name.rsplit(".", 1)
    layer = module.replace(".", "_")
    kind = _keras_kind(layer)
    var = _KERAS_VARS[kind][param]
    dense_kernel = kind == "dense" and param == "weight"
    shape2 = tuple(reversed(shape)) if dense_kernel else shape
    return Entry(name, shape, f"{layer}/{var}", f"{layer}.{var}", shape2, "float32", "T" if dense_kernel else "")


def _flax(name: str, shape: Shape) -> Entry:
    """A Flax variables dict: ``params`` / module (``blocks_0``, ``attn_qkv``) / Flax's names
    (``kernel`` (in, out), ``bias``, ``scale``, ``embedding``); remap keys it by dots."""
    module, param = name.rsplit(".", 1)
    parts = module.split(".")
    owner = "_".join(parts[:2]) if parts[0] == "blocks" else parts[0]
    layer = "_".join(parts[2:]) if parts[0] == "blocks" else None
    kind = _keras_kind(module.replace(".", "_"))
    var = {"ln": {"weight": "scale", "bias": "bias"}, "embed": {"weight": "embedding"},
           "dense": {"weight": "kernel", "bias": "bias"}}[kind][param]  # fmt: skip
    path = ["params", owner, *([layer] if layer else []), var]
    dense_kernel = kind == "dense" and param == "weight"
    shape2 = tuple(reversed(shape)) if dense_kernel else shape
    return Entry(name, shape, "/".join(path), ".".join(path), shape2, "float32", "T" if dense_kernel else "")


_TF_VALUE = "/.ATTRIBUTES/VARIABLE_VALUE"


def _tf(name: str, shape: Shape) -> Entry:
    """A TF2 object-based checkpoint of ``tf.Module`` attributes named like Flax's layout
    (``model/blocks_0/attn_qkv/kernel``, kernel (in, out)); in the bundle each variable's
    name ends in ``/.ATTRIBUTES/VARIABLE_VALUE``, which remap drops (dots for slashes)."""
    e = _flax(name, shape)
    native = "model/" + e.native.removeprefix("params/")
    return Entry(name, shape, native + _TF_VALUE, native.replace("/", "."), e.shape, e.dtype, e.op)


# --------------------------------------------------------------------------- writers


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file())


def write_safetensors(path: Path, entries: list[Entry], **_: Any) -> None:
    import torch
    from safetensors.torch import save_file

    save_file({e.native: torch.from_numpy(stored(e)) for e in entries}, str(path))


def write_torch(path: Path, entries: list[Entry], **_: Any) -> None:
    import torch

    torch.save({e.native: torch.from_numpy(stored(e)) for e in entries}, path)


def _onnx_nodes(entries: list[Entry]) -> list[Any]:
    """A plausible graph that consumes every initializer: Gather, LayerNormalization, Gemm,
    Split (sizes from a Constant node, not an initializer), Add, Relu."""
    import numpy as np
    from onnx import helper, numpy_helper

    names = {e.canonical: e.native for e in entries}
    d = entries[0].cshape[1]  # the embedding's (vocab, d)
    node = helper.make_node
    nodes = [node("Gather", [names["embed.weight"], "input_ids"], ["h"], name="/embed/Gather")]
    h, i = "h", 0
    while f"blocks.{i}.ln1.weight" in names:
        p = f"blocks.{i}"
        n = lambda s: names[f"{p}.{s}"]  # noqa: E731
        nodes += [
            node("LayerNormalization", [h, n("ln1.weight"), n("ln1.bias")], [f"/{p}/ln1"], name=f"/{p}/ln1/LayerNormalization", epsilon=1e-5),
            node("Gemm", [f"/{p}/ln1", n("attn.qkv.weight"), n("attn.qkv.bias")], [f"/{p}/qkv"], name=f"/{p}/attn/qkv/Gemm", transB=1),
            node("Constant", [], [f"/{p}/sizes"], name=f"/{p}/attn/Constant",
                 value=numpy_helper.from_array(np.array([d, d, d], dtype=np.int64))),
            node("Split", [f"/{p}/qkv", f"/{p}/sizes"], [f"/{p}/q", f"/{p}/k", f"/{p}/v"], name=f"/{p}/attn/Split", axis=-1),
            node("Gemm", [f"/{p}/q", n("attn.proj.weight"), n("attn.proj.bias")], [f"/{p}/proj"], name=f"/{p}/attn/proj/Gemm", transB=1),
            node("Add", [h, f"/{p}/proj"], [f"/{p}/h1"], name=f"/{p}/Add"),
            node("LayerNormalization", [f"/{p}/h1", n("ln2.weight"), n("ln2.bias")], [f"/{p}/ln2"], name=f"/{p}/ln2/LayerNormalization", epsilon=1e-5),
            node("Gemm", [f"/{p}/ln2", n("mlp.fc1.weight"), n("mlp.fc1.bias")], [f"/{p}/fc1"], name=f"/{p}/mlp/fc1/Gemm", transB=1),
            node("Relu", [f"/{p}/fc1"], [f"/{p}/act"], name=f"/{p}/mlp/Relu"),
            node("Gemm", [f"/{p}/act", n("mlp.fc2.weight"), n("mlp.fc2.bias")], [f"/{p}/fc2"], name=f"/{p}/mlp/fc2/Gemm", transB=1),
            node("Add", [f"/{p}/h1", f"/{p}/fc2"], [f"/{p}/out"], name=f"/{p}/Add_1"),
        ]  # fmt: skip
        h, i = f"/{p}/out", i + 1
    nodes.append(node("LayerNormalization", [h, names["norm.weight"], names["norm.bias"]], ["logits"],
                      name="/norm/LayerNormalization", epsilon=1e-5))  # fmt: skip
    return nodes


def write_onnx(path: Path, entries: list[Entry], *, external: bool = False, **_: Any) -> None:
    """``onnx.helper`` / ``numpy_helper``; ``external``: every tensor over 1 KiB in one
    ``model.onnx.data`` file next to it (``onnx.save_model(save_as_external_data=True)``)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    d = entries[0].cshape[1]
    inits = [numpy_helper.from_array(stored(e), name=e.native) for e in entries]
    graph = helper.make_graph(
        _onnx_nodes(entries), "remap-benchmark",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["n"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", d])],
        initializer=inits,
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="remap-benchmark")
    if external:
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)  # fmt: skip
    else:
        onnx.save_model(model, str(path))


def write_npz(path: Path, entries: list[Entry], **_: Any) -> None:
    """``numpy.savez``: stored members, not compressed."""
    import numpy as np

    np.savez(path, **{e.native: stored(e) for e in entries})


def write_gguf(path: Path, entries: list[Entry], **_: Any) -> None:
    """``gguf.GGUFWriter``; quantized entries handed over packed (``raw_dtype``)."""
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("remap benchmark")
    w.add_block_count(sum(1 for e in entries if e.canonical.endswith(".ln1.weight")))
    for e in entries:
        if e.op == "q8_0":
            w.add_tensor(e.native, stored(e), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(e.native, stored(e))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def write_keras(path: Path, entries: list[Entry], *, record: Path, **_: Any) -> None:
    """Keras 3 itself (torch backend): a functional model of Embedding, LayerNormalization and
    Dense layers named like the modules, its variables assigned, ``save_weights``. ``record``
    gets h5 dataset path -> key, taken from Keras's own layers and checked value by value
    against the file (the own loader reads the datasets by it)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    import h5py
    import keras
    import numpy as np

    d, vocab = entries[0].cshape[1], entries[0].cshape[0]
    L = keras.layers  # noqa: N806
    ids = keras.Input((None,), dtype="int32")
    h = L.Embedding(vocab, d, name="embed")(ids)
    blocks = sum(1 for e in entries if e.canonical.endswith(".ln1.weight"))
    for i in range(blocks):
        p = f"blocks_{i}"
        a = L.Dense(3 * d, name=f"{p}_attn_qkv")(L.LayerNormalization(epsilon=1e-5, name=f"{p}_ln1")(h))
        h = h + L.Dense(d, name=f"{p}_attn_proj")(a[..., :d])
        f = L.Dense(4 * d, activation="relu", name=f"{p}_mlp_fc1")(L.LayerNormalization(epsilon=1e-5, name=f"{p}_ln2")(h))
        h = h + L.Dense(d, name=f"{p}_mlp_fc2")(f)
    model = keras.Model(ids, L.LayerNormalization(epsilon=1e-5, name="norm")(h))
    by_path = {e.native: e for e in entries}
    for layer in model.layers:
        for v in layer.weights:
            v.assign(stored(by_path[v.path]))
    model.save_weights(str(path))
    names: dict[str, str] = {}
    with h5py.File(path, "r") as f:
        for group in f["layers"].values():
            layer_name = group["vars"].attrs.get("name")
            if layer_name in (None, "input_layer"):
                continue
            layer = model.get_layer(layer_name)
            for n, v in enumerate(layer.weights):
                ds = group["vars"][str(n)]
                if not np.array_equal(ds[()], keras.ops.convert_to_numpy(v)):
                    raise RuntimeError(f"{ds.name} does not hold {v.path}")
                names[ds.name.lstrip("/")] = by_path[v.path].key
    if len(names) != len(entries):
        raise RuntimeError(f"{len(names)} datasets for {len(entries)} variables")
    record.write_text(json.dumps(names))


def write_flax(path: Path, entries: list[Entry], **_: Any) -> None:
    """``flax.serialization.to_bytes`` of the nested variables dict."""
    from flax import serialization

    tree: dict[str, Any] = {}
    for e in entries:
        *parents, leaf = e.native.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = stored(e)
    path.write_bytes(serialization.to_bytes(tree))


def write_tf(path: Path, entries: list[Entry], **_: Any) -> None:
    """``tf.train.Checkpoint(model=...).write``: a tensor bundle, ``.index`` + one ``.data`` file."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    root = tf.Module()
    for e in entries:
        *parents, leaf = e.native.removesuffix(_TF_VALUE).split("/")[1:]
        node = root
        for part in parents:
            if not hasattr(node, part):
                setattr(node, part, tf.Module())
            node = getattr(node, part)
        setattr(node, leaf, tf.Variable(stored(e), name=leaf))
    tf.train.Checkpoint(model=root).write(str(path).removesuffix(".index"))


# --------------------------------------------------------------------------- own loaders


def _params(model: Any) -> dict[str, Any]:
    return dict(model.named_parameters())


def own_safetensors(model: Any, path: Path, entries: list[Entry]) -> None:
    from safetensors.torch import load_file

    model.load_state_dict(load_file(str(path)))


def own_torch(model: Any, path: Path, entries: list[Entry]) -> None:
    import torch

    model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True, mmap=True))


def own_onnx(model: Any, path: Path, entries: list[Entry]) -> None:
    import onnx
    import torch
    from onnx import numpy_helper

    params, key = _params(model), {e.native: e.key for e in entries}
    m = onnx.load(str(path))  # external data too
    with torch.no_grad():
        for init in m.graph.initializer:
            params[key[init.name]].copy_(torch.from_numpy(numpy_helper.to_array(init)))


def own_npz(model: Any, path: Path, entries: list[Entry]) -> None:
    import numpy as np
    import torch

    params, key = _params(model), {e.native: e.key for e in entries}
    with np.load(path) as z, torch.no_grad():
        for name in z.files:
            params[key[name]].copy_(torch.from_numpy(z[name]))


def own_gguf(model: Any, path: Path, entries: list[Entry]) -> None:
    import numpy as np
    import torch
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    params, key = _params(model), {e.native: e.key for e in entries}
    plain = (GGMLQuantizationType.F32, GGMLQuantizationType.F16)
    with torch.no_grad():
        for t in GGUFReader(path).tensors:
            data = t.data if t.tensor_type in plain else dequantize(t.data, t.tensor_type)
            p = params[key[t.name]]
            p.copy_(torch.from_numpy(np.asarray(data)).reshape(p.shape))


def own_keras(model: Any, path: Path, entries: list[Entry]) -> None:
    import h5py
    import torch

    params = _params(model)
    names = json.loads(_record(path).read_text())
    with h5py.File(path, "r") as f, torch.no_grad():
        for dataset, key in names.items():
            params[key].copy_(torch.from_numpy(f[dataset][()]))


def own_flax(model: Any, path: Path, entries: list[Entry]) -> None:
    import torch
    from flax import serialization

    params, key = _params(model), {e.native: e.key for e in entries}

    def walk(node: Any, prefix: str) -> Iterator[tuple[str, Any]]:
        for k, v in node.items():
            if isinstance(v, dict):
                yield from walk(v, f"{prefix}{k}/")
            else:
                yield f"{prefix}{k}", v

    tree = serialization.msgpack_restore(path.read_bytes())
    with torch.no_grad():
        for name, array in walk(tree, ""):
            params[key[name]].copy_(torch.from_numpy(array))


def own_tf(model: Any, path: Path, entries: list[Entry]) -> None:
    import tensorflow as tf
    import torch

    params, key = _params(model), {e.native: e.key for e in entries}
    reader = tf.train.load_checkpoint(str(path).removesuffix(".index"))
    with torch.no_grad():
        for name in reader.get_variable_to_shape_map():
            if name in key:
                params[key[name]].copy_(torch.from_numpy(reader.get_tensor(name)))


def _record(path: Path) -> Path:
    """Where a writer keeps what the own loader needs besides the file (outside the file's folder)."""
    return path.parent.parent / f"{path.parent.name}.record.json"


# --------------------------------------------------------------------------- the table of formats


@dataclass(frozen=True)
class Format:
    """One row: ``file`` is what remap opens (other files in its folder are counted too:
    ONNX external data); ``needs`` are modules that must be importable (the writing
    library and remap's reader), else the row is n/a."""

    name: str
    label: str
    file: str
    entry: Callable[[str, Shape], Entry]
    write: Callable[..., None]
    own: Callable[[Any, Path, list[Entry]], None]
    own_label: str
    needs: tuple[str, ...] = ()
    bytes_per_param: float = 4.0
    options: tuple[tuple[str, Any], ...] = ()
    env: tuple[tuple[str, str], ...] = ()

    @property
    def quantized(self) -> bool:
        return self.entry("x.weight", (32, 32)).op == "q8_0"


_ONNX = ("onnx", "remap.sources.onnx_reader")
_GGUF = ("gguf", "remap.sources.gguf_reader")
FORMATS: tuple[Format, ...] = (
    Format("safetensors", "safetensors", "model.safetensors", _plain, write_safetensors, own_safetensors, "load_file + load_state_dict"),
    Format("torch_zip", "torch.save zip (.pth)", "model.pth", _plain, write_torch, own_torch, "torch.load(mmap=True) + load_state_dict"),
    Format("onnx_external", "ONNX, external data", "model.onnx", _plain, write_onnx, own_onnx, "onnx.load + numpy_helper.to_array",
           _ONNX, options=(("external", True),)),
    Format("onnx_embedded", "ONNX, embedded (<2 GB)", "model.onnx", _plain, write_onnx, own_onnx, "onnx.load + numpy_helper.to_array", _ONNX),
    Format("npz", "NumPy .npz (stored)", "model.npz", _npz, write_npz, own_npz, "np.load, each member", ("remap.sources.numpy_reader",)),
    Format("gguf_f32", "GGUF F32", "model.gguf", _plain, write_gguf, own_gguf, "GGUFReader, each tensor", _GGUF),
    Format("gguf_f16", "GGUF F16 (1-d F32)", "model.gguf", _gguf_f16, write_gguf, own_gguf, "GGUFReader, each tensor", _GGUF, 2.0),
    Format("gguf_q8_0", "GGUF Q8_0 (1-d F32)", "model.gguf", _gguf_q8_0, write_gguf, own_gguf, "GGUFReader + gguf.quants.dequantize",
           _GGUF, 34 / 32),
    Format("keras_h5", "Keras 3 .weights.h5", "model.weights.h5", _keras, write_keras, own_keras, "h5py dataset[()]",
           ("keras", "h5py", "remap.sources.keras_reader"), env=(("KERAS_BACKEND", "torch"),)),
    Format("flax_msgpack", "Flax .msgpack", "model.msgpack", _flax, write_flax, own_flax, "flax msgpack_restore",
           ("flax", "remap.sources.msgpack_reader")),
    Format("tf_checkpoint", "TensorFlow checkpoint", "model.ckpt.index", _tf, write_tf, own_tf,
           "tf.train.load_checkpoint + get_tensor", ("tensorflow", "remap.sources.tf_bundle_reader"),
           env=(("TF_CPP_MIN_LOG_LEVEL", "2"),)),
)
NAMES = tuple(f.name for f in FORMATS)


def by_name(name: str) -> Format:
    return next(f for f in FORMATS if f.name == name)


def missing(fmt: Format) -> list[str]:
    """The modules ``fmt`` needs that this install lacks (none: it runs)."""
    from importlib.util import find_spec

    out = []
    for m in fmt.needs:
        try:
            if find_spec(m) is None:
                out.append(m)
        except ModuleNotFoundError:
            out.append(m)
    return out


def layout(fmt: Format, size: int) -> list[Entry]:
    return [fmt.entry(n, s) for n, s in canonical_model(size, fmt.bytes_per_param)]


# --------------------------------------------------------------------------- the target


def build_model(entries: list[Entry], on_meta: bool) -> Any:
    """An ``nn.Module`` whose parameters are exactly the entries' keys, shapes and dtypes
    (nested modules along the dots). Allocated targets are zeroed, so their pages are resident
    before the baseline RSS."""
    import torch

    root = torch.nn.Module()
    with torch.device("meta"):
        for e in entries:
            *path, leaf = e.key.split(".")
            m = root
            for part in path:
                if not hasattr(m, part):
                    m.add_module(part, torch.nn.Module())
                m = getattr(m, part)
            m.register_parameter(leaf, torch.nn.Parameter(torch.empty(e.shape, dtype=getattr(torch, e.dtype))))
    if not on_meta:
        root.to_empty(device="cpu")
        with torch.no_grad():
            for p in root.parameters():
                p.zero_()
    return root


def check_model(model: Any, entries: list[Entry]) -> list[str]:
    """Problems: a parameter that differs from what the file holds (the reference regenerated
    from the seed, quantized and dequantized by ``gguf.quants`` where the file is Q8_0)."""
    import torch

    params = _params(model)
    differ = [e.key for e in entries if not torch.equal(params[e.key].detach(), torch.from_numpy(expected(e)))]
    return [f"{len(differ)} of {len(entries)} tensors differ from the file (e.g. {differ[0]})"] if differ else []


def nbytes(e: Entry) -> int:
    import math

    return math.prod(e.shape) * (2 if e.dtype == "float16" else 4)


def packed_bytes(e: Entry) -> int:
    """Bytes ``e`` takes in the file."""
    import math

    n = math.prod(e.cshape)
    return n * 34 // 32 if e.op == "q8_0" else n * (2 if e.op == "f16" else 4)


# --------------------------------------------------------------------------- measuring what a plan reads


def read_io() -> dict[str, int]:
    """``/proc/self/io``: rchar (bytes returned by read syscalls), syscr, read_bytes (from storage)."""
    with open("/proc/self/io", "rb", buffering=0) as f:
        text = f.read().decode()
    return {k: int(v) for k, v in (line.split(": ") for line in text.splitlines())}


def evict(path: Path) -> None:
    """Drop this one file's pages from the page cache (written back first): the next read of
    it comes from the disk, and :func:`resident` counts what was read."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def resident(path: Path) -> int:
    """Bytes of ``path`` in the page cache (``mincore`` over a mapping that touches nothing)."""
    size = path.stat().st_size
    if not size:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    page = os.sysconf("SC_PAGE_SIZE")
    vec = (ctypes.c_ubyte * ((size + page - 1) // page))()
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, 1, 1, fd, 0)  # PROT_READ, MAP_SHARED
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), f"mmap of {path} failed")
        try:
            if libc.mincore(addr, size, vec) != 0:
                raise OSError(ctypes.get_errno(), f"mincore of {path} failed")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    flags = bytes(vec)
    return min(size, (len(flags) - flags.count(0)) * page)


# --------------------------------------------------------------------------- child side


def _preimport() -> None:
    """remap's modules, imported before anything is measured (as loading.py does); what a
    format's reader or loader imports lazily is imported by a warm-up run on the tiny file."""
    import importlib
    import pkgutil

    import safetensors.torch  # noqa: F401
    import torch  # noqa: F401

    import remap

    for m in pkgutil.walk_packages(remap.__path__, "remap."):
        if m.name != "remap.__main__":
            importlib.import_module(m.name)
    remap.parse_rules(RULES)


def _warm_path(fmt: Format, folder: Path) -> Path:
    return folder.parent / f"{folder.name}.warm" / fmt.file


def plan_child(fmt: Format, folder: Path, size: int) -> dict[str, Any]:
    """Plan the file into the model on meta, counting what it reads."""
    import remap

    _preimport()
    warm = remap.plan(build_model(layout(fmt, WARM_SIZE), on_meta=True), _warm_path(fmt, folder), RULES)
    entries = layout(fmt, size)
    model = build_model(entries, on_meta=True)
    files = _files(folder)
    for f in files:
        evict(f)
    before = {f.name: resident(f) for f in files}
    a, b = read_io(), read_io()
    own_reads = b["rchar"] - a["rchar"]  # what one read of /proc/self/io adds
    io0 = read_io()
    with Timer() as t:
        plan = remap.plan(model, folder / fmt.file, RULES)
    io1 = read_io()
    after = {f.name: resident(f) for f in files}
    sizes = {f.name: f.stat().st_size for f in files}
    return {
        "seconds": t.seconds,
        "read_bytes": max(0, io1["rchar"] - io0["rchar"] - own_reads),
        "read_calls": max(0, io1["syscr"] - io0["syscr"] - (b["syscr"] - a["syscr"])),
        "storage_bytes": io1.get("read_bytes", 0) - io0.get("read_bytes", 0),
        "paged_bytes": sum(max(0, after[n] - before[n]) for n in after),
        "resident_before": sum(before.values()),
        "files": sizes,
        "file_bytes": sum(sizes.values()),
        "plan_ok": bool(plan.ok and warm.ok),
        "planned_keys": len(plan.assignments),
        "problems": [] if plan.ok else ["plan not ok: " + "; ".join(f.message[:200] for f in plan.failures[:3])],
    }


def load_child(variant: str, fmt: Format, folder: Path, size: int) -> dict[str, Any]:
    """One measured load into an allocated model (the file warm in the page cache)."""
    import remap

    _preimport()

    def remap_load(m: Any, p: Path, _: list[Entry]) -> dict[str, Any]:
        report = remap.load(m, p, RULES, rollback=variant == "remap_rollback")
        return {"remap_ok": report.ok, "remap_loaded": report.totals.loaded}

    fn = fmt.own if variant == "own" else remap_load
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = layout(fmt, WARM_SIZE)
        fn(build_model(small, on_meta=False), _warm_path(fmt, folder), small)  # imports what the load imports
    entries = layout(fmt, size)
    model = build_model(entries, on_meta=False)
    path = folder / fmt.file
    out: dict[str, Any] = {"variant": variant, "model_bytes": sum(nbytes(e) for e in entries)}
    out["warm_seconds"] = sum(warm_file(f) for f in _files(folder))
    gc.collect()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with RssSampler() as rss, Timer() as timer:
                extra = fn(model, path, entries)
            out.update(extra or {})
            out["seconds"] = timer.seconds
            out["peak"] = rss.peak_above_base()
            out["hwm_reset"] = rss.hwm_reset
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
            out["traceback"] = traceback.format_exc()[-2000:]
    out["warnings"] = sorted({str(w.message).splitlines()[0][:200] for w in caught})
    if "error" not in out:
        out["problems"] = check_model(model, entries)
        if out.get("remap_ok") is False:
            out["problems"].append("remap report not ok")
    return out


def make(fmt: Format, folder: Path, size: int) -> dict[str, Any]:
    """Write the format's file (and the tiny warm-up file next to its folder)."""
    for dest, n in ((folder, size), (folder.parent / f"{folder.name}.warm", WARM_SIZE)):
        dest.mkdir(parents=True, exist_ok=True)
        fmt.write(dest / fmt.file, layout(fmt, n), record=_record(dest / fmt.file), **dict(fmt.options))
    entries = layout(fmt, size)
    return {"files": {f.name: f.stat().st_size for f in _files(folder)}, "tensors": len(entries)}


# --------------------------------------------------------------------------- parent side


def _spawn(args: list[str], fmt: Format, timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:
    env = {**os.environ, **dict(fmt.env)}
    try:
        proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *args], capture_output=True, text=True,
                              env=env, timeout=timeout)  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout} s: {shlex.join(args)}"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit code {proc.returncode}"]
    return {"error": f"subprocess died: {tail[0][:300]}"}


def status(r: dict[str, Any]) -> str:
    if "error" in r:
        return "n/a: " + r["error"]
    if r.get("problems"):
        return "WRONG: " + "; ".join(r["problems"])
    return "ok"


def _median(xs: list[float]) -> float | None:
    xs = sorted(xs)
    if not xs:
        return None
    mid = len(xs) // 2
    return xs[mid] if len(xs) % 2 else (xs[mid - 1] + xs[mid]) / 2


def summarise(fmt: Format, size: int, made: dict[str, Any], plan: dict[str, Any], runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """One format's row: plan fractions, best times, peaks against one tensor, ratios and verdicts."""
    entries = layout(fmt, size)
    largest = max(entries, key=nbytes)
    allowance = nbytes(largest) + PEAK_SLACK + (packed_bytes(largest) + DEQUANT_SLACK if fmt.quantized else 0)
    file_bytes = sum(made["files"].values())
    row: dict[str, Any] = {
        "label": fmt.label, "own_label": fmt.own_label, "status": "ok", "files": made["files"], "file_bytes": file_bytes,
        "tensors": len(entries), "model_bytes": sum(nbytes(e) for e in entries), "largest_tensor": largest.key,
        "largest_tensor_bytes": nbytes(largest), "peak_allowance_bytes": allowance, "plan": {**plan, "status": status(plan)},
        "runs": runs, "variants": {},
    }  # fmt: skip
    if "error" not in plan:
        row["plan"]["read_share"] = plan["read_bytes"] / file_bytes
        row["plan"]["paged_share"] = plan["paged_bytes"] / file_bytes
        row["plan"]["under_1pct"] = max(plan["read_bytes"], plan["paged_bytes"]) < 0.01 * file_bytes
    own_best = None
    for v, rs in runs.items():
        timed = [r for r in rs if "seconds" in r and status(r) == "ok"]
        best = min(timed, key=lambda r: r["seconds"]) if timed else (rs[0] if rs else {"error": "not run"})
        b = {"status": status(best), "all_seconds": [r.get("seconds") for r in rs]}
        if "seconds" in best:
            peak = max(r["peak"]["rss"] for r in timed)
            b.update(seconds=best["seconds"], peak_rss=peak, peak_anon=max(r["peak"]["anon"] for r in timed),
                     peak_file=max(r["peak"]["file"] for r in timed), peak_tensors=peak / nbytes(largest),
                     peak_within=peak <= allowance)  # fmt: skip
        row["variants"][v] = b
        if v == "own" and "seconds" in b:
            own_best = b["seconds"]
    own_runs = runs.get("own", [])
    for v, b in row["variants"].items():
        if v == "own" or "seconds" not in b or own_best is None:
            continue
        b["vs_own"] = b["seconds"] / own_best
        paired = [r["seconds"] / o["seconds"] for r, o in zip(runs[v], own_runs)
                  if "seconds" in r and "seconds" in o and status(r) == status(o) == "ok"]  # fmt: skip
        b["vs_own_same_round_median"] = _median(paired)
        ratio = b["vs_own_same_round_median"] if len(paired) > 1 else b["vs_own"]
        b["time_within"] = ratio is not None and ratio <= 1.5
    bad = [s for s in [row["plan"]["status"], *(b["status"] for b in row["variants"].values())] if s != "ok"]
    row["status"] = bad[0] if bad else "ok"
    return row


def run(quick: bool, repeats: int, tmpdir: str | None = None, progress: Callable[[str], None] = print,
        only: list[str] | None = None, variants: list[str] | None = None, size: int | None = None,
        timeout: float = CHILD_TIMEOUT) -> dict[str, Any]:  # fmt: skip
    """Every format in turn (or those in ``only``): write it, plan it, load it ``repeats``
    rounds of ``variants`` (round robin, each a fresh process given ``timeout`` seconds),
    remove it. Formats not run keep a row saying why."""
    size = size or (QUICK_SIZE if quick else FULL_SIZE)
    variants = list(variants or VARIANTS)
    root = Path(tempfile.mkdtemp(prefix="remap-formats-", dir=tmpdir))
    rows: dict[str, Any] = {}
    try:
        for fmt in FORMATS:
            if only and fmt.name not in only:
                rows[fmt.name] = {"label": fmt.label, "status": "skipped: not selected"}
                continue
            lacking = missing(fmt)
            if lacking:
                rows[fmt.name] = {"label": fmt.label, "status": f"n/a: not installed: {', '.join(lacking)}"}
                progress(f"  {fmt.name:14} n/a: {', '.join(lacking)} not installed")
                continue
            rows[fmt.name] = _run_format(fmt, root, size, repeats, variants, progress, timeout)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"size": size, "repeats": repeats, "variants": variants, "formats": rows}


def _run_format(fmt: Format, root: Path, size: int, repeats: int, variants: list[str],
                progress: Callable[[str], None], timeout: float) -> dict[str, Any]:  # fmt: skip
    folder = root / fmt.name
    common = ["--format", fmt.name, "--dir", str(folder), "--size", str(size)]
    try:
        t0 = time.perf_counter()
        made = _spawn(["--make", *common], fmt, timeout)
        if "error" in made:
            progress(f"  {fmt.name:14} writing failed: {made['error']}")
            return {"label": fmt.label, "status": "n/a: writing failed: " + made["error"]}
        progress(f"  {fmt.name:14} wrote {sum(made['files'].values()) / 2**20:,.0f} MiB, {made['tensors']} tensors "
                 f"({time.perf_counter() - t0:.0f} s)")  # fmt: skip
        with ForeignCpu() as other:
            plan = _spawn(["--child", "plan", *common], fmt, timeout)
        plan["other_cores"] = other.cores
        if "read_bytes" in plan:
            progress(f"  {fmt.name:14} plan read {plan['read_bytes']:,} B, paged {plan['paged_bytes']:,} B of "
                     f"{plan['file_bytes']:,} ({plan['seconds']:.3f} s)  {status(plan)[:100]}")  # fmt: skip
        else:
            progress(f"  {fmt.name:14} plan {status(plan)[:200]}")
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
        for rep in range(repeats):
            for v in variants:
                with ForeignCpu() as other:
                    r = _spawn(["--child", v, *common], fmt, timeout)
                r["other_cores"] = other.cores
                runs[v].append(r)
                t = f"{r['seconds']:.3f}s" if "seconds" in r else "-"
                peak = f"+{r['peak']['rss'] / 2**20:,.0f} MiB" if "peak" in r else ""
                progress(f"  {fmt.name:14} [{rep + 1}/{repeats}] {v:15} {t:>8} {peak:>12}  others {other.cores:.2f} cores  "
                         f"{status(r)[:100]}")  # fmt: skip
        return summarise(fmt, size, made, plan, runs)
    finally:
        for p in (folder, root / f"{fmt.name}.warm"):
            shutil.rmtree(p, ignore_errors=True)
        for p in root.glob(f"{fmt.name}*.record.json"):
            p.unlink()


# --------------------------------------------------------------------------- the table


COLUMNS = ["format", "check", "file MiB", "tensors", "plan read", "plan paged", "plan s", "own s", "remap s",
           "remap/own", "+rollback/own", "remap peak (tensors)", "own peak (tensors)", "rollback peak", "bars"]  # fmt: skip


def _mib(n: float) -> str:
    return f"{n / 2**20:,.0f}"


def _bars(row: dict[str, Any]) -> str:
    """Which of the issue's bars the row misses: plan <1%, remap peak <= a tensor, remap wall <= 1.5x."""
    plan, rv = row.get("plan", {}), row.get("variants", {}).get("remap", {})
    misses = []
    if plan.get("under_1pct") is False:
        misses.append("plan")
    if rv.get("peak_within") is False:
        misses.append("peak")
    if rv.get("time_within") is False:
        misses.append("time")
    known = "under_1pct" in plan and "peak_within" in rv and "time_within" in rv
    return ("miss: " + ", ".join(misses)) if misses else ("met" if known else "-")


def rows(result: dict[str, Any]) -> list[list[str]]:
    """One row per format of :data:`FORMATS` (and any other in the results), run or not."""
    out = []
    names = list(dict.fromkeys([*NAMES, *result.get("formats", {})]))
    for name in names:
        row = result.get("formats", {}).get(name, {"status": "skipped: not in these results"})
        if "plan" not in row:
            out.append([name, row["status"][:60], *["-"] * (len(COLUMNS) - 2)])
            continue
        plan, var = row["plan"], row["variants"]
        pct = lambda k: f"{100 * plan[k]:.3f}%" if k in plan else "-"  # noqa: E731
        sec = lambda v: f"{var[v]['seconds']:.3f}" if "seconds" in var.get(v, {}) else "-"  # noqa: E731

        def ratio(v: str) -> str:
            b = var.get(v, {})
            if "vs_own" not in b:
                return "-"
            med = b.get("vs_own_same_round_median")
            return f"{b['vs_own']:.2f}x" + (f" ({med:.2f}x)" if med is not None and len(b["all_seconds"]) > 1 else "")

        def peak(v: str) -> str:
            b = var.get(v, {})
            return f"+{_mib(b['peak_rss'])} ({b['peak_tensors']:.2f})" if "peak_rss" in b else "-"

        out.append([
            name, row["status"][:60], _mib(row["file_bytes"]), str(row["tensors"]), pct("read_share"), pct("paged_share"),
            f"{plan['seconds']:.3f}" if "seconds" in plan else "-", sec("own"), sec("remap"), ratio("remap"),
            ratio("remap_rollback"), peak("remap"), peak("own"), peak("remap_rollback"), _bars(row),
        ])  # fmt: skip
    return out


def formats_table(result: dict[str, Any]) -> None:
    from _measure import table

    table(
        f"Formats: a ~{result['size'] / 2**20:,.0f} MiB file of each, planned and loaded into an allocated model "
        f"(best of {result['repeats']}, each run a fresh process)",
        COLUMNS, rows(result),
        ["plan read: bytes returned by read syscalls during remap.plan (rchar) / file size; plan paged: the file's "
         "pages the kernel brought into the page cache meanwhile (evicted before; read-ahead and mmap faults "
         "included) / file size. Bar: both < 1%.",
         "own: the format's own loader into the same model (safetensors load_file, torch.load(mmap=True), onnx.load + "
         "numpy_helper, np.load, gguf GGUFReader (+ dequantize), h5py); remap: remap.load(rollback=False); "
         "+rollback: remap.load as by default (a host copy of the model to put it back on failure).",
         "x/own: best time over the own loader's best (in brackets: the median over rounds of the same-round ratio). "
         "Bar: remap <= 1.5x.",
         "peak: RSS above the built model, MiB (in brackets: in units of the largest tensor). Bar: remap <= 1 tensor "
         "+ 8 MiB (GGUF quantized: + the tensor's packed bytes + 64 MiB scratch).",
         "bars: the issue's bars that remap (rollback=False) misses. Timings are noisy when other processes share "
         "the cores (see the progress lines' 'others')."],
    )  # fmt: skip


# --------------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"~{QUICK_SIZE >> 20} MiB files, one round")
    ap.add_argument("--size", type=int, help=f"file size in bytes (default {FULL_SIZE:,}; --quick {QUICK_SIZE:,})")
    ap.add_argument("--formats", help="formats to run, comma-separated (default: all): " + ", ".join(NAMES))
    ap.add_argument("--variants", help="load variants, comma-separated (default: all): " + ", ".join(VARIANTS))
    ap.add_argument("--repeats", type=int, help="rounds of load variants (default 3; --quick 1)")
    ap.add_argument("--tmpdir", help="where the files are written (default: the system's temp dir)")
    ap.add_argument("--out", type=Path, help="write the JSON results here")
    ap.add_argument("--make", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child", choices=["plan", *VARIANTS], help=argparse.SUPPRESS)
    ap.add_argument("--format", choices=NAMES, help=argparse.SUPPRESS)
    ap.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    size = a.size or (QUICK_SIZE if a.quick else FULL_SIZE)
    if a.make or a.child:
        fmt = by_name(a.format)
        for k, v in fmt.env:
            os.environ.setdefault(k, v)
        try:
            if a.make:
                result = make(fmt, a.dir, size)
            elif a.child == "plan":
                result = plan_child(fmt, a.dir, size)
            else:
                result = load_child(a.child, fmt, a.dir, size)
        except Exception as exc:
            result = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                      "traceback": traceback.format_exc()[-2000:]}  # fmt: skip
        print(MARK + json.dumps(result), flush=True)
        return 0
    only = a.formats.split(",") if a.formats else None
    variants = a.variants.split(",") if a.variants else None
    bad = sorted(set(only or ()) - set(NAMES)) + sorted(set(variants or ()) - set(VARIANTS))
    if bad:
        ap.error(f"unknown formats or variants: {', '.join(bad)}")
    result = run(a.quick, a.repeats or (1 if a.quick else 3), a.tmpdir, only=only, variants=variants, size=size)
    formats_table(result)
    if a.out:
        a.out.write_text(json.dumps(result, indent=1) + "\n")
    return 1 if any(r["status"].startswith("WRONG") for r in result["formats"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
