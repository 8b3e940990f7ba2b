"""The TensorFlow checkpoint reader against bundles TensorFlow itself wrote (in a subprocess:
this process never imports tensorflow), and against crafted ones that lie."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from remap.cli import main
from remap.errors import SourceError
from remap.loading.streaming import read_tensor
from remap.sources.readers import open_source
from remap.sources.tf_bundle_reader import sniff

np = pytest.importorskip("numpy")

TF_ENV = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": "", "KERAS_BACKEND": "tensorflow"}

#: Writes every kind of bundle the tests read, and the values TensorFlow holds, as .npy/.json beside them.
WRITE = r"""
import json, os, sys
import numpy as np
import tensorflow as tf
import keras

out = sys.argv[1]
rng = np.random.default_rng(0)

def save_values(name, values):
    np.savez(os.path.join(out, name + ".npz"), **{k: np.asarray(v) for k, v in values.items()})

# 1. tf.train.Checkpoint of variables with known values
plain = {
    "f32": rng.normal(size=(3, 4)).astype("float32"),
    "f64": rng.normal(size=(2,)).astype("float64"),
    "f16": rng.normal(size=(5,)).astype("float16"),
    "i64": rng.integers(-2**40, 2**40, size=(2, 3)).astype("int64"),
    "i32": rng.integers(-9, 9, size=(7,)).astype("int32"),
    "u8": rng.integers(0, 255, size=(3,)).astype("uint8"),
    "flags": np.array([True, False, True]),
    "scalar": np.float32(3.5),
    "conv": rng.normal(size=(3, 3, 2, 4)).astype("float32"),
    "empty": np.zeros((0, 3), "float32"),
}
variables = {k: tf.Variable(v) for k, v in plain.items()}
bf16 = rng.normal(size=(6,)).astype("float32")
variables["bf16"] = tf.Variable(tf.constant(bf16, dtype=tf.bfloat16))
plain["bf16"] = tf.cast(variables["bf16"], tf.float32).numpy()  # the values bfloat16 holds
variables["text"] = tf.Variable("not a weight")
os.makedirs(os.path.join(out, "plain"))
tf.train.Checkpoint(**variables).write(os.path.join(out, "plain", "ckpt"))
save_values("plain", plain)

# 2. Keras 3 on TensorFlow: one training step with Adam, saved with its optimizer
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Conv2D(4, 3), keras.layers.BatchNormalization(),
                          keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(2)])
opt = keras.optimizers.Adam(1e-2)
model.compile(optimizer=opt, loss="mse")
model.fit(rng.normal(size=(8, 6, 6, 3)).astype("float32"), rng.normal(size=(8, 2)).astype("float32"), epochs=1, verbose=0)
ckpt = tf.train.Checkpoint(model=model, optimizer=opt)
ckpt.save(os.path.join(out, "keras", "ckpt"))
save_values("keras_weights", {v.path: v.numpy() for v in model.weights})
save_values("keras_optimizer", {v.path: v.numpy() for v in opt.variables})
ckpt.save(os.path.join(out, "keras", "ckpt"))  # ckpt-2, the one the folder's `checkpoint` file names
with open(os.path.join(out, "keras.json"), "w") as f:
    json.dump({"layers": [layer.name for layer in model.layers], "model": model.name}, f)

# 3. TF1 Saver, with Adam slots
graph = tf.Graph()
with graph.as_default():
    with tf.compat.v1.variable_scope("dense"):
        kernel = tf.compat.v1.get_variable("kernel", initializer=tf.constant(plain["f32"]))
        bias = tf.compat.v1.get_variable("bias", initializer=tf.constant(plain["f16"].astype("float32")))
    step = tf.compat.v1.train.AdamOptimizer(0.1).minimize(tf.reduce_sum(kernel) + tf.reduce_sum(bias * bias))
    saver = tf.compat.v1.train.Saver()
    with tf.compat.v1.Session() as session:
        session.run(tf.compat.v1.global_variables_initializer())
        session.run(step)
        saver.save(session, os.path.join(out, "tf1", "model"))
        values = {v.op.name: session.run(v) for v in tf.compat.v1.global_variables()}
save_values("tf1", values)

# 4. a SavedModel
module = tf.Module()
module.w = tf.Variable(plain["conv"])
module.b = tf.Variable(plain["i64"])
tf.saved_model.save(module, os.path.join(out, "saved_model"))

# 5. several data shards, one variable split into slices across them
sharded = {f"v{i}": rng.normal(size=(8,)).astype("float32") for i in range(6)}
policy = tf.train.experimental.MaxShardSizePolicy(max_shard_size=100)
tf.train.Checkpoint(**{k: tf.Variable(v) for k, v in sharded.items()}).write(
    os.path.join(out, "sharded", "ckpt"), options=tf.train.CheckpointOptions(experimental_sharding_callback=policy))
save_values("sharded", sharded)
"""


def _tensorflow() -> None:
    if importlib.util.find_spec("tensorflow") is None:
        pytest.skip("tensorflow is not installed (pip install tensorflow-cpu): it writes the checkpoints read here")


@pytest.fixture(scope="module")
def tf_files(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every bundle of :data:`WRITE`, written by TensorFlow once for this module."""
    _tensorflow()
    out = tmp_path_factory.mktemp("tf")
    done = subprocess.run([sys.executable, "-c", WRITE, str(out)], capture_output=True, text=True, env=TF_ENV, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def _values(folder: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(folder / f"{name}.npz") as z:
        return {k: z[k] for k in z.files}


def _check(source, expected: dict[str, np.ndarray]) -> None:
    """Every key's metadata and value (read() and the engine's span read) are TensorFlow's."""
    assert set(source.meta) == set(expected)
    for key, value in expected.items():
        meta = source.meta[key]
        assert meta.shape == value.shape, key
        got = source.read(key)
        assert tuple(got.shape) == value.shape and str(got.dtype).removeprefix("torch.") == meta.dtype, key
        want = torch.from_numpy(np.array(value, order="C")).to(got.dtype)  # (ascontiguousarray makes a scalar 1-d)
        assert torch.equal(got, want), key
        assert torch.equal(read_tensor(source, key), want), key  # through the span the engine reads with pread


# ---------------------------------------------------------------------------- what TensorFlow wrote


def test_a_checkpoint_of_variables(tf_files: Path) -> None:
    expected = _values(tf_files, "plain")
    with open_source(tf_files / "plain" / "ckpt") as src:  # the prefix: no such file
        assert src.description["format"] == "tf" and src.description["path"].endswith("ckpt.index")
        _check(src, expected)
        dtypes = {k: m.dtype for k, m in src.meta.items()}
        assert dtypes == {"f32": "float32", "f64": "float64", "f16": "float16", "bf16": "bfloat16", "i64": "int64",
                          "i32": "int32", "u8": "uint8", "flags": "bool", "scalar": "float32", "conv": "float32",
                          "empty": "float32"}  # fmt: skip
        assert src.span("flags") is None and src.span("conv").shape == (3, 3, 2, 4)
        assert "string" in src.description["entries"]["text"]  # a string variable: listed, not read
        assert "_CHECKPOINTABLE_OBJECT_GRAPH" in src.description["entries"]


def test_every_way_to_name_a_checkpoint(tf_files: Path, tmp_path: Path) -> None:
    plain = tf_files / "plain"
    for path in (plain / "ckpt", plain / "ckpt.index", plain / "ckpt.data-00000-of-00001", plain):
        with open_source(path) as src:
            assert src.description["format"] == "tf" and "conv" in src.meta, path
    with open_source(tf_files / "keras") as src:  # a folder of checkpoints: the one its `checkpoint` file names
        assert src.description["path"].endswith("ckpt-2.index")
    for path in (tf_files / "saved_model", tf_files / "saved_model" / "variables"):
        with open_source(path) as src:
            assert src.description["path"].endswith("variables.index"), path
    renamed = shutil.copy(plain / "ckpt.index", tmp_path / "renamed.bin")
    head = Path(renamed).read_bytes()[:512]
    assert sniff(head, plain / "ckpt.index") and sniff(head, Path(renamed))  # the magic, not the name
    with open_source(str(tf_files / "plain" / "ckpt")) as src:  # a string path, as the CLI and the rules give it
        assert "f32" in src.meta


def test_a_keras_checkpoint_names_layers_and_leaves_the_optimizer_out(tf_files: Path) -> None:
    names = json.loads((tf_files / "keras.json").read_text())
    weights = _values(tf_files, "keras_weights")  # Keras paths: sequential/conv2d/kernel
    expected = {k.removeprefix(names["model"] + "/").replace("/", "."): v for k, v in weights.items()}
    assert {k.split(".")[0] for k in expected} == {"conv2d", "batch_normalization", "dense"}
    with open_source(tf_files / "keras" / "ckpt-1") as src:
        _check(src, expected)
        entries = src.description["entries"]
        assert entries["(optimizer slot variables)"].startswith("12 left out")  # Adam's m and v of 6 weights
        assert entries["(bookkeeping values (counters, hyperparameters))"].startswith("3 left out")
        assert any("full_name" in n and "'sequential'" in n for n in src.description["notes"])
    optimizer = _values(tf_files, "keras_optimizer")  # adam/iteration, adam/sequential_conv2d_kernel_momentum, ...
    with open_source(tf_files / "keras" / "ckpt-1", key="optimizer") as src:
        _check(src, {k.replace("/", "."): v for k, v in optimizer.items()} | {"save_counter": np.int64(1)})
    with open_source(tf_files / "keras" / "ckpt-1", key="all") as src:
        assert len(src.meta) == len(expected) + len(optimizer) + 1
        assert int(src.read("adam.iteration")) == 1  # one training step
    with pytest.raises(SourceError, match="expected one of weights, optimizer, all"):
        open_source(tf_files / "keras" / "ckpt-1", key="model")


def test_a_tf1_saver_checkpoint(tf_files: Path) -> None:
    values = {k.replace("/", "."): v for k, v in _values(tf_files, "tf1").items()}
    weights = {k: v for k, v in values.items() if k in ("dense.kernel", "dense.bias")}
    with open_source(tf_files / "tf1" / "model.meta") as src:  # TF1's graph file names its checkpoint too
        assert src.description["path"].endswith("model.meta") and set(src.meta) == set(weights)
    with open_source(tf_files / "tf1" / "model") as src:
        _check(src, weights)
        assert src.description["entries"]["(optimizer slot variables)"].startswith("4 left out")
    with open_source(tf_files / "tf1" / "model", key="all") as src:
        _check(src, values)  # dense.kernel.Adam, dense.kernel.Adam_1, beta1_power, ...
        assert {"dense.kernel.Adam", "dense.bias.Adam_1", "beta1_power"} <= set(src.meta)


def test_a_saved_model(tf_files: Path) -> None:
    plain = _values(tf_files, "plain")
    with open_source(tf_files / "saved_model") as src:
        _check(src, {"w": plain["conv"], "b": plain["i64"]})


def test_shards_and_a_variable_in_slices(tf_files: Path) -> None:
    folder = tf_files / "sharded"
    assert len(list(folder.glob("ckpt.data-*"))) >= 2
    with open_source(folder / "ckpt") as src:
        _check(src, _values(tf_files, "sharded"))
        sliced = [k for k in src.meta if src.span(k) is None]
        assert sliced  # the policy split a variable across shards: assembled from its slices
        shards = {src.span(k).path for k in src.meta if src.span(k) is not None}
        assert len(shards) >= 2


def test_inspect_shows_the_format_and_keys(tf_files: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["inspect", str(tf_files / "keras" / "ckpt-1")]) == 0
    out = capsys.readouterr().out
    assert "(tf)" in out and "conv2d" in out and "moving_variance" in out and "12 left out" in out
    assert main(["inspect", str(tf_files / "keras" / "ckpt-1"), "--key", "all"]) == 0
    out = capsys.readouterr().out
    assert "adam" in out and "momentum" in out and "save_counter" in out and "iteration" in out


# ---------------------------------------------------------------------------- crafted bundles


def _crc32c(data: bytes) -> int:
    """CRC32C, written here from the polynomial (remap's own is what is tested)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> int:
    crc = _crc32c(data)
    return ((((crc >> 15) | (crc << 17)) & 0xFFFFFFFF) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def _field(number: int, value: int | bytes) -> bytes:
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    return _varint(number << 3) + _varint(value)


def _block(entries: list[tuple[bytes, bytes]]) -> bytes:
    body = b"".join(_varint(0) + _varint(len(k)) + _varint(len(v)) + k + v for k, v in entries)
    body += struct.pack("<II", 0, 1)  # one restart point, at 0
    return body + b"\x00" + struct.pack("<I", _masked(body + b"\x00"))


def write_bundle(prefix: Path, tensors: dict[str, dict], shards: int = 1, data: bytes | None = None,
                 data_files: int = 1) -> Path:
    """A bundle as TensorFlow lays one out: ``tensors`` maps a name to its entry's fields
    (dtype, shape, offset, size; all honest by default) and its bytes."""
    blob, entries = bytearray(), []
    for name, t in sorted(tensors.items()):
        raw = t.get("bytes", b"")
        shape = b"".join(_field(2, _field(1, d)) for d in t["shape"])
        fields = _field(1, t.get("dtype", 1)) + _field(2, shape) + _field(3, t.get("shard", 0))
        fields += _field(4, t.get("offset", len(blob))) + _field(5, t.get("size", len(raw)))
        entries.append((name.encode(), fields))
        blob += raw
    header = _field(1, shards) + _field(3, _field(1, 1))
    body = _block([(b"", header), *entries])
    index = _block([(entries[-1][0] if entries else b"", _varint(0) + _varint(len(body) - 5))])
    meta = _block([])
    table = body + meta + index
    footer = _varint(len(body)) + _varint(len(meta) - 5) + _varint(len(body) + len(meta)) + _varint(len(index) - 5)
    footer = footer.ljust(40, b"\x00") + struct.pack("<Q", 0xDB4775248B80FB57)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    Path(f"{prefix}.index").write_bytes(table + footer)
    for i in range(min(data_files, shards)):  # the data of shard 0 only: a header may claim any count
        Path(f"{prefix}.data-{i:05d}-of-{shards:05d}").write_bytes(bytes(blob) if data is None else data)
    return Path(f"{prefix}.index")


def _f32(values: list[float]) -> dict:
    return {"shape": [len(values)], "bytes": struct.pack(f"<{len(values)}f", *values)}


def test_a_crafted_bundle_reads_as_written(tmp_path: Path) -> None:
    """The writer above makes bundles remap reads (so the lies below are the only fault)."""
    write_bundle(tmp_path / "ok", {"a/b": _f32([1.0, 2.0]), "c": {"shape": [2, 2], "dtype": 9, "bytes": struct.pack("<4q", 1, 2, 3, -4)}})
    with open_source(tmp_path / "ok") as src:
        assert src.read("a.b").tolist() == [1.0, 2.0] and src.read("c").tolist() == [[1, 2], [3, -4]]


def test_the_crafted_writer_matches_tensorflow(tf_files: Path, tmp_path: Path) -> None:
    """The test's own CRC32C and block layout agree with a table TensorFlow wrote."""
    raw = (tf_files / "sharded" / "ckpt.index").read_bytes()
    assert struct.unpack("<Q", raw[-8:])[0] == 0xDB4775248B80FB57
    meta_at, i = _read_varint(raw[-48:], 0)
    meta_len, i = _read_varint(raw[-48:], i)
    index_at, i = _read_varint(raw[-48:], i)
    index_len, _ = _read_varint(raw[-48:], i)
    for at, length in ((0, meta_at - 5), (meta_at, meta_len), (index_at, index_len)):  # one data block, metaindex, index
        block = raw[at : at + length + 5]
        assert block[length] == 0 and struct.unpack("<I", block[-4:])[0] == _masked(block[:-4]), at


def _read_varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[i]
        i += 1
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, i


HOSTILE = {
    "past the end": ({"w": {**_f32([1.0, 2.0]), "offset": 4}}, "claims bytes 4..12 of ok.data-00000-of-00001, which has 8"),
    "a lying shape": ({"w": {**_f32([1.0, 2.0]), "shape": [1000]}}, r"shape \[1000\] of float32 needs 4000 bytes, but the index says 8"),
    "an enormous shape": ({"w": {**_f32([1.0]), "shape": [2**62, 2**62]}}, r"of float32 needs \d{30,} bytes, but the index says 4"),
    "a shard beyond the count": ({"w": {**_f32([1.0]), "shard": 3}}, "lies in shard 3, but the header says 1 shards"),
    "an unknown dimension": ({"w": {**_f32([1.0]), "shape": [-1]}}, "dimension of unknown size"),
}


@pytest.mark.hostile
@pytest.mark.parametrize("case", HOSTILE)
def test_an_entry_that_lies_is_refused(tmp_path: Path, case: str, capsys: pytest.CaptureFixture[str]) -> None:
    tensors, message = HOSTILE[case]
    write_bundle(tmp_path / "ok", tensors)
    with pytest.raises(SourceError, match=message):
        open_source(tmp_path / "ok")
    assert main(["inspect", str(tmp_path / "ok")]) == 3
    assert "ok.index" in capsys.readouterr().err


@pytest.mark.hostile
def test_a_missing_data_shard_is_refused(tf_files: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tf_files / "sharded", tmp_path / "sharded")
    (folder / "ckpt.data-00001-of-00002").unlink()
    with pytest.raises(SourceError, match=r"the data shard ckpt.data-00001-of-00002 \(holding '.*'\) is missing"):
        open_source(folder / "ckpt")


@pytest.mark.hostile
def test_a_truncated_index_is_refused(tf_files: Path, tmp_path: Path) -> None:
    raw = (tf_files / "keras" / "ckpt-1.index").read_bytes()
    for keep in (1, 10, len(raw) // 2, len(raw) - 48, len(raw) - 1):
        path = tmp_path / f"cut{keep}.index"
        path.write_bytes(raw[:keep])
        shutil.copy(tf_files / "keras" / "ckpt-1.data-00000-of-00001", tmp_path / f"cut{keep}.data-00000-of-00001")
        with pytest.raises(SourceError) as caught:
            open_source(path)
        assert f"cut{keep}.index" in str(caught.value)
        assert "truncated" in str(caught.value) or "magic" in str(caught.value), caught.value


@pytest.mark.hostile
def test_a_truncated_data_shard_is_refused(tf_files: Path, tmp_path: Path) -> None:
    folder = shutil.copytree(tf_files / "plain", tmp_path / "plain")
    data = folder / "ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:100])
    with pytest.raises(SourceError, match=r"which has 100 bytes: the shard is truncated or the index lies"):
        open_source(folder / "ckpt")


@pytest.mark.hostile
def test_every_bit_flip_in_an_index_is_an_error_or_harmless(tf_files: Path, tmp_path: Path) -> None:
    """Each single flipped byte of a real index: a SourceError, or (in the footer's padding
    and the skipped metaindex handle) the same tensors, never another exception."""
    shutil.copytree(tf_files / "plain", tmp_path / "plain")
    index = tmp_path / "plain" / "ckpt.index"
    raw = index.read_bytes()
    with open_source(index) as src:
        want = dict(src.meta)
    kept = []
    for at in range(len(raw)):
        index.write_bytes(raw[:at] + bytes([raw[at] ^ 0x10]) + raw[at + 1 :])
        try:
            with open_source(index) as src:
                assert src.meta == want, at
            kept.append(at)
        except SourceError:
            pass
    # every block is checksummed; only the footer's padding after the two block handles is free
    footer = len(raw) - 48
    handles_end = footer + len(b"".join(_varint(v) for v in _footer_handles(raw)))
    assert kept and all(handles_end <= at < len(raw) - 8 for at in kept), kept


def _footer_handles(raw: bytes) -> list[int]:
    values, i = [], 0
    for _ in range(4):
        value, i = _read_varint(raw[-48:], i)
        values.append(value)
    return values


@pytest.mark.hostile
def test_hostile_bundles_end_in_exit_3_in_bounded_memory(tmp_path: Path) -> None:
    """Through the CLI in a fresh process: each exits 3, none allocates what it claims."""
    write_bundle(tmp_path / "huge", {"w": {**_f32([1.0]), "shape": [2**31, 2**31]}})
    write_bundle(tmp_path / "far", {"w": {**_f32([1.0]), "offset": 2**60}})
    write_bundle(tmp_path / "shards", {"w": _f32([1.0])}, shards=10**9, data_files=0)
    script = textwrap.dedent("""
        import contextlib, io, json, sys
        from remap.cli import main
        codes = []
        for path in sys.argv[1:]:
            with contextlib.redirect_stderr(io.StringIO()) as err, contextlib.redirect_stdout(io.StringIO()):
                codes.append([main(["inspect", path]), err.getvalue()])
        with open("/proc/self/status") as f:
            peak = next(int(line.split()[1]) // 1024 for line in f if line.startswith("VmHWM:"))
        print(json.dumps({"codes": codes, "peak_mb": peak}))
    """)
    paths = [str(tmp_path / n) for n in ("huge", "far", "shards")]
    done = subprocess.run([sys.executable, "-c", script, *paths], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})  # fmt: skip
    out = json.loads(done.stdout.strip().splitlines()[-1])
    assert [c for c, _ in out["codes"]] == [3, 3, 3], out
    assert "needs" in out["codes"][0][1] and "claims bytes" in out["codes"][1][1] and "1000000000 data shards" in out["codes"][2][1]
    assert out["peak_mb"] < 2000


@pytest.mark.hostile
def test_a_block_claiming_more_restarts_than_it_holds(tmp_path: Path) -> None:
    index = write_bundle(tmp_path / "r", {"w": _f32([1.0])})
    raw = index.read_bytes()
    footer = raw[-48:]
    data_len, _ = _read_varint(footer, 0)
    data_len -= 5  # the first block's contents end with its restart count
    body = raw[:data_len - 4] + struct.pack("<I", 0xFFFFFFFF)
    index.write_bytes(body + b"\x00" + struct.pack("<I", _masked(body + b"\x00")) + raw[data_len + 5 :])
    with pytest.raises(SourceError, match="claims 4294967295 restart points"):
        open_source(index)


@pytest.mark.hostile
def test_a_snappy_block_is_refused_by_name(tmp_path: Path) -> None:
    index = write_bundle(tmp_path / "s", {"w": _f32([1.0])})
    raw = index.read_bytes()
    data_len = _read_varint(raw[-48:], 0)[0] - 5
    body = raw[:data_len] + b"\x01"
    index.write_bytes(body + struct.pack("<I", _masked(body)) + raw[data_len + 5 :])
    with pytest.raises(SourceError, match="compressed with Snappy"):
        open_source(index)


def test_a_prefix_that_is_no_checkpoint_keeps_the_old_message(tmp_path: Path) -> None:
    with pytest.raises(SourceError, match="no such file or folder"):
        open_source(tmp_path / "nothing")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["inspect", str(tmp_path / "nothing")]) == 3


@pytest.mark.hostile
def test_counts_beyond_the_limits_are_refused_before_parsing_them(tf_files: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An index of more entries, or an object graph of more objects, than remap reads (the
    limits, lowered here, keep a hostile index of tiny entries from filling memory)."""
    import remap.sources.tf_bundle_reader as reader

    monkeypatch.setattr(reader, "MAX_ENTRIES", 5)
    with pytest.raises(SourceError, match="more than 5 entries"):
        open_source(tf_files / "plain" / "ckpt")
    monkeypatch.setattr(reader, "MAX_ENTRIES", 10**6)
    monkeypatch.setattr(reader, "MAX_GRAPH_NODES", 3)
    with pytest.raises(SourceError, match="more than 3 objects"):
        open_source(tf_files / "plain" / "ckpt")


@pytest.mark.hostile
def test_two_names_that_become_one_key_are_refused(tmp_path: Path) -> None:
    write_bundle(tmp_path / "d", {"a/b": _f32([1.0]), "a.b": _f32([2.0])})
    with pytest.raises(SourceError, match="the variables 'a.b' and 'a/b' both become the key 'a.b'"):
        open_source(tmp_path / "d")
