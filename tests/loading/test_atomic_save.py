"""Atomic saves: a save killed (SIGKILL) or interrupted (Ctrl-C) at any point leaves the
previous complete save or the new complete one at the path, never a part or a mix.

A child process saves the same module over and over, each time with every tensor filled
with the round number, and prints the number after each save returns. The parent kills
it at a seeded random moment, then loads what the path holds: every tensor must carry
one and the same round number, the last one reported or the one in progress.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from remap.errors import UsageError
from remap.loading.saving import atomic_path, save_state_dict, write_text_atomic
from remap.sources.readers import open_source

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL and fork semantics")

SIZE = 64 * 1024  # elements per tensor: 8 tensors of 256 KiB


def _module(value: float, n: int = 8, size: int = SIZE) -> torch.nn.Module:
    m = torch.nn.Module()
    for i in range(n):
        m.register_buffer(f"t{i}", torch.full((size,), float(value)))
    return m


def save_loop(path: str, shard: str | None, mode: str, conn: Any, stall_at: int | None = None) -> None:
    """The child: save round 0, say "ready", then save rounds 1, 2, ... saying each when done.

    ``stall_at=n``: the n-th file written after "ready" stops half-written inside its
    atomic write; the child says "stalled" and waits there to be killed.
    """
    import remap.loading.saving as saving

    torch.set_num_threads(1)
    m = _module(0)
    written: list[Path] = []
    real_write = saving._write

    def stalling(tensors: Any, target: Path, *args: Any, **kwargs: Any) -> None:
        written.append(target)
        if len(written) == stall_at:
            with saving.atomic_path(target) as tmp:
                tmp.write_bytes(b"half a tensor")
                conn.send("stalled")
                time.sleep(120)
        real_write(tensors, target, *args, **kwargs)

    def save(k: int) -> None:
        if mode == "text":
            write_text_atomic(path, f"{k:06d}" * 100_000)
            return
        for t in m.buffers():
            t.fill_(k)
        save_state_dict(m, path, max_shard_size=shard)

    save(0)
    saving._write = stalling
    conn.send("ready")
    k = 0
    try:
        while True:
            k += 1
            save(k)
            conn.send(k)
    except KeyboardInterrupt:
        conn.send(("interrupted", k))
        raise SystemExit(130) from None


@pytest.fixture(scope="module")
def ctx() -> Any:
    """A forkserver with torch and remap loaded: each child starts in milliseconds, single-threaded."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["torch", "safetensors.torch", "remap.loading.saving", "test_atomic_save"])
    return context


def _runs(ctx: Any, tmp_path: Path, name: str, shard: str | None, *, seed: int, runs: int, sig: int,
          mode: str = "state") -> list[tuple[Path, list[Any], int]]:  # fmt: skip
    """Start ``runs`` children at once and send each ``sig`` at its own seeded moment.

    Returns (target, what the child said, exit code) per child.
    """
    rng = random.Random(seed)
    children = []
    for n in range(runs):
        target = tmp_path / f"run{n}" / name
        target.parent.mkdir()
        mine, theirs = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=save_loop, args=(str(target), shard, mode, theirs), daemon=True)
        proc.start()
        theirs.close()
        children.append((target, proc, mine))
    for _, proc, conn in children:
        assert conn.poll(60) and conn.recv() == "ready", proc.exitcode
    start = time.monotonic()
    moments = sorted((rng.uniform(0.0, 0.4), n) for n in range(runs))
    for moment, n in moments:
        time.sleep(max(0.0, start + moment - time.monotonic()))
        os.kill(children[n][1].pid, sig)
    results = []
    for target, proc, conn in children:
        proc.join(60)
        said = []
        while conn.poll():
            try:
                said.append(conn.recv())
            except EOFError:
                break
        results.append((target, said, proc.exitcode))
    return results


def _last_done(said: list[Any]) -> int:
    done = [x for x in said if isinstance(x, int)]
    return done[-1] if done else 0


def _value_of(state: dict[str, torch.Tensor]) -> int:
    """The one round number every tensor carries (fails on a mix or a part)."""
    assert sorted(state) == [f"t{i}" for i in range(8)], sorted(state)
    assert len({t.numel() for t in state.values()}) == 1
    values = {float(x) for t in state.values() for x in (t.min(), t.max())}
    assert len(values) == 1, f"a mix of rounds: {sorted(values)}"
    return int(values.pop())


def _load(target: Path, sharded: bool) -> dict[str, torch.Tensor]:
    if sharded:
        index = target.parent / f"{target.name}.index.json"
        weight_map = json.loads(index.read_text())["weight_map"]
        for shard in set(weight_map.values()):
            assert (target.parent / shard).is_file(), f"the index names {shard}, which is missing"
        with open_source(index) as src:
            return {k: src.read(k).clone() for k in src.meta}
    if target.suffix in (".pt", ".bin"):
        return torch.load(target, weights_only=True)
    return load_file(target)


@pytest.mark.parametrize(
    ("name", "shard", "seed"),
    [("model.safetensors", None, 1), ("model.pt", None, 2), ("model.safetensors", "600KB", 3), ("model.bin", "800KB", 4)],
    ids=["safetensors", "torch", "sharded-safetensors", "sharded-torch"],
)
def test_sigkill_mid_save_leaves_the_old_or_the_new_save(ctx: Any, tmp_path: Path, name: str, shard: str | None, seed: int) -> None:
    sharded = shard is not None
    for target, said, code in _runs(ctx, tmp_path, name, shard, seed=seed, runs=4, sig=signal.SIGKILL):
        assert code == -signal.SIGKILL
        last = _last_done(said)
        assert _value_of(_load(target, sharded)) in (last, last + 1), last
        # a normal save over whatever the kill left is complete, and so is the folder's view of it
        save_state_dict(_module(99), target, max_shard_size=shard)
        assert _value_of(_load(target, sharded)) == 99
        with open_source(target.parent) as src:
            assert {float(src.read(k)[0]) for k in src.meta} == {99.0}


@pytest.mark.parametrize(("name", "shard", "stall_at"), [("model.safetensors", None, 1), ("model.pt", None, 3),
                                                      ("model.safetensors", "600KB", 1), ("model.safetensors", "600KB", 3),
                                                      ("model.bin", "800KB", 2)])  # fmt: skip
def test_sigkill_inside_a_write_leaves_the_old_save(ctx: Any, tmp_path: Path, name: str, shard: str | None, stall_at: int) -> None:
    """Killed for certain in the middle of a file: of the only file, or of the n-th shard
    (earlier shards of the new set complete, the index not yet written)."""
    target = tmp_path / name
    mine, theirs = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=save_loop, args=(str(target), shard, "state", theirs, stall_at), daemon=True)
    proc.start()
    theirs.close()
    said = [mine.recv()]
    while said[-1] != "stalled":
        assert mine.poll(60), said
        said.append(mine.recv())
    assert said[0] == "ready", said
    assert any(p.name.endswith(".tmp") for p in tmp_path.iterdir())  # caught half-way through a file
    proc.kill()
    proc.join(60)
    expected = (stall_at - 1) if shard is None else 0  # whole rounds done before the stalled file
    assert _value_of(_load(target, shard is not None)) == expected


def test_sigkill_mid_write_text_leaves_the_old_or_the_new_text(ctx: Any, tmp_path: Path) -> None:
    for target, said, code in _runs(ctx, tmp_path, "report.json", None, seed=5, runs=4, sig=signal.SIGKILL, mode="text"):
        assert code == -signal.SIGKILL
        last = _last_done(said)
        text = target.read_text()
        assert len(text) == 600_000 and text == text[:6] * 100_000
        assert int(text[:6]) in (last, last + 1)


@pytest.mark.parametrize(("name", "shard", "seed"), [("model.safetensors", None, 6), ("model.safetensors", "600KB", 7), ("model.pt", None, 8)],
                         ids=["single", "sharded", "torch"])  # fmt: skip
def test_ctrl_c_mid_save_keeps_the_old_file_and_removes_the_temporary(ctx: Any, tmp_path: Path, name: str, shard: str | None, seed: int) -> None:
    sharded = shard is not None
    for target, said, code in _runs(ctx, tmp_path, name, shard, seed=seed, runs=4, sig=signal.SIGINT):
        assert code == 130 and said[-1][0] == "interrupted", said
        last = _last_done(said)
        assert _value_of(_load(target, sharded)) in (last, last + 1)
        leftovers = [p.name for p in target.parent.iterdir() if p.name.endswith(".tmp")]
        assert leftovers == [], leftovers


def test_keyboard_interrupt_inside_the_write_keeps_the_old_file(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    m = torch.nn.Linear(3, 2)
    save_state_dict(m, path)
    before = path.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"half a fi")
            raise KeyboardInterrupt
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]


# ---------------------------------------------------------------------------- successful saves leave nothing behind


@pytest.mark.parametrize("name", ["model.safetensors", "model.pt"])
def test_a_successful_save_leaves_no_temporary_file(tmp_path: Path, name: str) -> None:
    save_state_dict(_module(1.0), tmp_path / name)
    save_state_dict(_module(2.0), tmp_path / name)  # replacing an existing file
    write_text_atomic(tmp_path / "report.json", "{}")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "report.json"])


def test_a_sharded_save_over_a_sharded_save_never_overwrites_a_published_shard(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While the old index is in place, the files it names are never written: the new set
    takes other names, and the old one is removed after the new index is published."""
    path = tmp_path / "model.safetensors"
    first = save_state_dict(_module(1.0), path, max_shard_size="1100KB")
    assert first["shards"] == [f"model-0000{n}-of-00002.safetensors" for n in (1, 2)]
    import remap.loading.saving as saving

    written: list[str] = []
    real_write = saving._write

    def spy(tensors, p, *args, **kwargs):
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert p.name not in set(index["weight_map"].values()), f"{p.name} is named by the published index"
        written.append(p.name)
        return real_write(tensors, p, *args, **kwargs)

    monkeypatch.setattr(saving, "_write", spy)
    second = save_state_dict(_module(2.0), path, max_shard_size="1100KB")
    assert written == second["shards"] and set(second["shards"]).isdisjoint(first["shards"])
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*second["shards"], "model.safetensors.index.json"])
    assert _value_of(_load(path, sharded=True)) == 2
    third = save_state_dict(_module(3.0), path, max_shard_size="1100KB")  # back to the plain names
    assert third["shards"] == first["shards"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*third["shards"], "model.safetensors.index.json"])
    assert _value_of(_load(path, sharded=True)) == 3


def test_switching_between_single_and_sharded_saves_leaves_no_stale_set(tmp_path: Path) -> None:
    """A folder's index is found before its single file: a single-file save retires the
    index of an earlier sharded save, and a sharded save removes the earlier single file."""
    path = tmp_path / "model.safetensors"
    save_state_dict(_module(1.0), path, max_shard_size="1100KB")
    save_state_dict(_module(2.0), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with open_source(tmp_path) as src:  # the folder resolves to the new single file
        assert src.description["format"] == "safetensors" and float(src.read("t0")[0]) == 2.0
    save_state_dict(_module(3.0), path, max_shard_size="1100KB")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
    )
    with open_source(tmp_path) as src:
        assert float(src.read("t7")[0]) == 3.0


def test_a_sharded_save_does_not_remove_files_it_did_not_write(tmp_path: Path) -> None:
    path = tmp_path / "model.safetensors"
    save_state_dict(_module(1.0), path, max_shard_size="1100KB")
    index = tmp_path / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    data["weight_map"]["extra"] = "../outside.safetensors"
    data["weight_map"]["other"] = "notes.safetensors"
    index.write_text(json.dumps(data))
    (tmp_path / "notes.safetensors").write_bytes(b"keep me")
    save_state_dict(_module(2.0), path, max_shard_size="1100KB")
    assert (tmp_path / "notes.safetensors").read_bytes() == b"keep me"


def test_saved_files_get_the_usual_permissions(tmp_path: Path) -> None:
    umask = os.umask(0o022)
    try:
        save_state_dict(_module(1.0, n=1), tmp_path / "new.safetensors")
        write_text_atomic(tmp_path / "r.json", "{}")
        assert (tmp_path / "new.safetensors").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
        assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o644
        (tmp_path / "new.safetensors").chmod(0o640)
        save_state_dict(_module(2.0, n=1), tmp_path / "new.safetensors")
        assert (tmp_path / "new.safetensors").stat().st_mode & 0o777 == 0o640  # a replaced file keeps its own
    finally:
        os.umask(umask)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_folder_is_a_usage_error(tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(UsageError, match="cannot write"):
            save_state_dict(_module(1.0, n=1), folder / "m.safetensors")
    finally:
        folder.chmod(0o700)


def test_an_os_error_while_writing_is_a_usage_error_and_cleans_up(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    write_text_atomic(path, "old")
    with pytest.raises(UsageError, match=r"cannot write .*r\.json.*No space left on device"):
        with atomic_path(path):
            raise OSError(28, "No space left on device")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["r.json"]
