"""Run a function on N local gloo ranks (``torch.multiprocessing``) and collect what each returns.

    from ranks import run_ranks
    results = run_ranks("loading.dist_cases:fsdp_load", 2, tmp_path, args=("x",))

``TARGET`` is ``module:function`` importable with ``tests/`` on the path; it is called as
``function(rank, world, workdir, *args)`` after ``init_process_group("gloo")`` (a file store
in ``workdir``), and its return value (anything ``torch.save`` can write) comes back in rank
order. A rank that raises has its traceback returned as a :class:`RankFailed`; the whole run is
killed after ``timeout`` seconds (a rank stuck in a collective its peer never joined) and
:class:`RanksTimedOut` says so with every rank's output. Ranks meet at a barrier and leave with
``os._exit`` after ``destroy_process_group``: gloo's threads can abort a rank in interpreter
teardown ("terminate called without an active exception").
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_FAILED = "__rank_failed__"


@dataclass
class RankFailed:
    """What a rank raised: its exception type name, message and traceback."""

    type: str
    message: str
    traceback: str


class RanksTimedOut(AssertionError):
    pass


def run_ranks(target: str, nprocs: int, workdir: Path, *, args: tuple[Any, ...] = (), timeout: float = 240,
              env: dict[str, str] | None = None) -> list[Any]:
    """Run ``target`` on ``nprocs`` gloo ranks; its return values (or :class:`RankFailed`) in rank order."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    for old in workdir.glob("rank*.result"):
        old.unlink()
    store = workdir / f"store.{os.getpid()}.{len(list(workdir.iterdir()))}"
    paths = os.pathsep.join([str(HERE), str(HERE.parent), *sys.path])
    full_env = {**os.environ, "PYTHONPATH": paths, "OMP_NUM_THREADS": "1", **(env or {})}
    command = [sys.executable, str(Path(__file__)), target, str(nprocs), str(workdir), str(store), json.dumps(list(args))]
    proc = subprocess.Popen(command, cwd=workdir, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)  # fmt: skip
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        raise RanksTimedOut(f"{target} on {nprocs} ranks ran past {timeout} s; output:\n{output[-4000:]}") from None
    import torch

    results = []
    for rank in range(nprocs):
        path = workdir / f"rank{rank}.result"
        if not path.exists():
            raise AssertionError(f"{target}: rank {rank} left no result (exit {proc.returncode}); output:\n{output[-4000:]}")
        result = torch.load(path, weights_only=False)
        results.append(RankFailed(*result[_FAILED]) if isinstance(result, dict) and _FAILED in result else result)
    return results


def _worker(rank: int, target: str, world: int, workdir: str, store: str, args: list[Any]) -> None:
    import importlib
    import warnings

    import torch
    import torch.distributed as dist

    warnings.simplefilter("ignore")
    os.environ.update({"RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank)})
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    module, _, name = target.partition(":")
    try:
        result: Any = getattr(importlib.import_module(module), name)(rank, world, Path(workdir), *args)
    except BaseException as exc:  # noqa: BLE001 - reported to the test, which decides
        result = {_FAILED: (type(exc).__name__, str(exc), traceback.format_exc())}  # plain data: __main__ differs here
    torch.save(result, Path(workdir) / f"rank{rank}.result")
    try:
        dist.barrier()
        dist.destroy_process_group()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    import torch.multiprocessing as mp

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    _target, _world, _workdir, _store, _args = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], json.loads(sys.argv[5])
    mp.spawn(_worker, args=(_target, _world, _workdir, _store, _args), nprocs=_world, join=True)
