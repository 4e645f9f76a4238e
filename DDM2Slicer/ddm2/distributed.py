"""Several processes under torchrun: the process group, sharding, gathering and collective decisions.

``torchrun --nproc_per_node=K -m ddm2 denoise ...`` starts K copies of the command; torchrun tells each
its place through the environment (WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR/PORT). Rank 0 is the main
process: it alone writes files and speaks the progress protocol. Ranks run on CPUs with the gloo
backend, or on one GPU each (``cuda:LOCAL_RANK``) with NCCL.

Without torchrun (WORLD_SIZE unset or 1) there is no process group and every helper here is the
one-process identity: the whole range is one shard, a gather returns the rows in place, a decision is
the process's own.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import numpy as np
import torch
import torch.distributed as dist
from torch import nn


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0")) if active() else 0


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if active() else 0


def active() -> bool:
    """True in a torchrun job of more than one process."""
    return world_size() > 1


def is_main() -> bool:
    return rank() == 0


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank: each rank of a job takes the GPU of its LOCAL_RANK; CPU ranks share."""
    if device.type == "cuda" and active():
        return torch.device("cuda", local_rank())
    return device


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[None]:
    """Join the torchrun job for the duration (NCCL for a GPU device, gloo otherwise); a no-op alone."""
    if not active():
        yield
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)  # NCCL and the object collectives use the current device
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    try:
        # every rank has read and checked the run directory before rank 0 starts writing into it
        dist.barrier()
        yield
        # and every rank leaves together: the others wait while rank 0 writes the outputs, so that no
        # rank tears its gloo connections down while a peer still holds its end (a rank that left
        # early aborted once at exit, after a complete run). A rank that raises skips this; torchrun
        # then stops the others.
        dist.barrier()
    finally:
        dist.destroy_process_group()


def wrap(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``model`` in a job (gradients averaged over the ranks at every
    step; rank 0's initial weights broadcast), the model itself alone."""
    if not active():
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=device_ids)


def shard(items: np.ndarray) -> np.ndarray:
    """This rank's share of ``items``: every world_size-th one from position rank. Interleaving gives
    every rank a similar mix when the items are sorted by cost (e.g. slices by matched state)."""
    return items[rank()::world_size()]


def longest_shard(count: int) -> int:
    """Length of the longest shard of ``count`` items (rank 0's)."""
    return -(-count // world_size())


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is True on any: a decision all ranks act on at the same step
    (a rank that stopped alone would leave the others waiting in the next collective)."""
    if not active():
        return flag
    value = torch.tensor([int(flag)], device=_communication_device())
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())


def sum_all(value: float) -> float:
    """The sum of every rank's ``value``, on every rank."""
    if not active():
        return value
    total = torch.tensor([value], dtype=torch.float64, device=_communication_device())
    dist.all_reduce(total)
    return float(total.item())


def gather_rows(rows: np.ndarray, items: np.ndarray, total: int, *,
                to_all: bool) -> tuple[np.ndarray | None, list[np.ndarray] | None]:
    """Assemble the (total, ...) array whose rows ``items`` this rank computed as ``rows``.

    Returns the array and the items of every rank, on every rank (``to_all``) or on rank 0 alone
    (``(None, None)`` elsewhere). Raises RuntimeError unless the ranks' items cover 0..total-1
    exactly once.
    """
    if not active():
        return _assemble([rows], [items], total), [items]
    device = _communication_device()
    longest = longest_shard(total)  # shards differ in length: pad to the longest, cut after
    padded_rows = torch.zeros((longest, *rows.shape[1:]), dtype=torch.float32, device=device)
    padded_rows[:len(rows)] = torch.as_tensor(rows, device=device)
    padded_items = torch.full((longest,), -1, dtype=torch.int64, device=device)
    padded_items[:len(items)] = torch.as_tensor(items, device=device)
    if to_all:
        row_parts = [torch.empty_like(padded_rows) for _ in range(world_size())]
        item_parts = [torch.empty_like(padded_items) for _ in range(world_size())]
        dist.all_gather(row_parts, padded_rows)
        dist.all_gather(item_parts, padded_items)
    else:
        row_parts = [torch.empty_like(padded_rows) for _ in range(world_size())] if is_main() else None
        item_parts = [torch.empty_like(padded_items) for _ in range(world_size())] if is_main() else None
        dist.gather(padded_rows, row_parts, dst=0)
        dist.gather(padded_items, item_parts, dst=0)
        if not is_main():
            return None, None
    items_by_rank = [part.cpu().numpy() for part in item_parts]
    items_by_rank = [part[part >= 0] for part in items_by_rank]
    rows_by_rank = [part[:len(kept)].cpu().numpy() for part, kept in zip(row_parts, items_by_rank)]
    return _assemble(rows_by_rank, items_by_rank, total), items_by_rank


def gather_objects(value: Any) -> list[Any] | None:
    """Every rank's ``value`` (picklable), in rank order, on rank 0; None on the other ranks."""
    if not active():
        return [value]
    values = [None] * world_size() if is_main() else None
    dist.gather_object(value, values, dst=0)
    return values


def _communication_device() -> torch.device:
    """NCCL moves CUDA tensors only, gloo CPU tensors."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _assemble(rows_by_rank: list[np.ndarray], items_by_rank: list[np.ndarray], total: int) -> np.ndarray:
    covered = np.sort(np.concatenate(items_by_rank))
    if not np.array_equal(covered, np.arange(total)):
        raise RuntimeError(f"the ranks' shards do not cover the {total} items exactly once")
    if len(items_by_rank) == 1 and np.array_equal(items_by_rank[0], covered):
        return rows_by_rank[0]  # one process, rows in order: nothing to move (a shell can be gigabytes)
    assembled = np.empty((total, *rows_by_rank[0].shape[1:]), dtype=np.float32)
    for rows, items in zip(rows_by_rank, items_by_rank):
        assembled[items] = rows
    return assembled
