"""The process group a sharded load runs in: joined from torchrun's environment, and who speaks.

``torchrun --nproc-per-node N -m remap apply rules.yaml`` starts N copies of the command line
with ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` set; :func:`torchrun_group` joins them into the
default process group (gloo on CPU, NCCL for CUDA tensors) for the duration of the command, so
that a target sharded by its factory or by ``target.shard`` loads in step on every rank. Only
rank 0 prints the report and writes report files (:func:`speaks`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

__all__ = ["rank", "speaks", "torchrun_group", "under_torchrun"]


def under_torchrun() -> bool:
    """Whether this process is one of several that torchrun (or a launcher like it) started.

    >>> import os
    >>> under_torchrun() if "WORLD_SIZE" not in os.environ else True
    False
    """
    try:
        return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ
    except ValueError:
        return False


def rank() -> int:
    """This process's rank in the default process group (0 when there is none)."""
    import torch.distributed as dist

    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def speaks() -> bool:
    """Whether this process prints and writes what the whole group produced once (rank 0)."""
    return rank() == 0


@contextlib.contextmanager
def torchrun_group() -> Iterator[bool]:
    """Join torchrun's ranks into the default process group, if this process is one of them and no
    group exists yet; yields whether it did. Leaves the group (after a barrier) on the way out."""
    import torch
    import torch.distributed as dist

    if not under_torchrun() or not dist.is_available() or dist.is_initialized():
        yield False
        return
    backend = "cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend)
    try:
        yield True
        dist.barrier()  # every rank done before any tears the group down
    finally:  # after an error no barrier: a peer waiting in a collective sees the group go and fails too
        dist.destroy_process_group()
