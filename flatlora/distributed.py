"""The one place that knows ``torch.distributed``: process group, rank, sharding and collectives.

Launched by ``torchrun`` (or ``accelerate launch``), every process sees ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in its environment. Joining the process group is one explicit step: a script calls
:func:`ensure_initialized` at its start (:func:`flatlora.run` and every script in
``analysis_scripts/`` do), which starts the default group from that environment once (gloo on CPU,
nccl when CUDA is available, then ``cuda:LOCAL_RANK`` as the current device); a process group the
user started already is used as it is. Reading the rank never starts anything: :func:`rank` and
:func:`world_size` read the group when there is one, else the launcher's environment, so a
constructor such as :class:`~flatlora.FlatLoRA` may ask for them at any time. A collective asked for
under a launcher whose group was never joined fails with a message that says to call
:func:`ensure_initialized`. Without a launcher every function here is the single-process identity:
rank 0 of 1.

Work is split by striding: item i goes to rank i mod W (:func:`shard`), which balances uneven
costs and keeps every rank's share deterministic, so an interrupted run resumes per shard.

Data-parallel training (:func:`flatlora.run`, the runners) uses :func:`wrap_ddp`, :func:`main_only`
(rank 0 does it; every rank gets its result, or its exception) and :func:`mean_over_ranks` /
:func:`all_ranks` (one number or one decision shared by all ranks).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, TypeVar

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["ensure_initialized", "is_distributed", "rank", "world_size", "is_main", "device", "shard",
           "shard_path", "all_gather_objects", "all_reduce_sum_", "all_reduce_mean_", "broadcast_object", "barrier",
           "mean_over_ranks", "all_ranks", "main_only", "wrap_ddp"]

T = TypeVar("T")


def _group_ready() -> bool:
    return dist.is_available() and dist.is_initialized()


def ensure_initialized(backend: str | None = None) -> bool:
    """Join the process group that ``torchrun`` set the environment up for; True when running with
    more than one process.

    Idempotent: a group that exists already (started here before, or by the user) is used as it is.
    Under a launcher it reads ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` and ``MASTER_ADDR`` /
    ``MASTER_PORT``; ``backend`` defaults to nccl with CUDA (and makes ``cuda:LOCAL_RANK`` the
    current device), else gloo. In one process it does nothing and returns False."""
    if _group_ready():
        return dist.get_world_size() > 1
    if not dist.is_available() or world_size() <= 1:
        return False
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend or ("nccl" if use_cuda else "gloo"))
    return True


def rank() -> int:
    """This process's rank: the group's when there is one, else the launcher's ``RANK`` (0 without
    one). A plain read: it never starts a process group."""
    return dist.get_rank() if _group_ready() else int(os.environ.get("RANK", "0"))


def world_size() -> int:
    """The number of processes: the group's when there is one, else the launcher's ``WORLD_SIZE``
    (1 without one). A plain read: it never starts a process group."""
    return dist.get_world_size() if _group_ready() else int(os.environ.get("WORLD_SIZE", "1"))


def is_distributed() -> bool:
    """More than one process (a plain read, like :func:`world_size`)."""
    return world_size() > 1


def _collective() -> bool:
    """True when a collective must talk to the other ranks; False in one process. Several processes
    without a joined group is an error that says how to join it."""
    if not is_distributed():
        return False
    if not _group_ready():
        raise RuntimeError(
            f"this is rank {rank()} of {world_size()} processes (from the launcher's environment), but the "
            "process group was never joined; call flatlora.distributed.ensure_initialized() at the start of "
            "the script"
        )
    return True


def is_main() -> bool:
    """Rank 0 (or a single process): the one that writes shared outputs and prints."""
    return rank() == 0


def device(default: str | None = None) -> torch.device:
    """This process's device: ``cuda:LOCAL_RANK`` under a launcher with CUDA, else ``default`` or
    cuda/cpu by availability."""
    if default is not None:
        return torch.device(default)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")) if is_distributed() else 0)
    return torch.device("cpu")


def shard(items: Sequence[T]) -> list[T]:
    """This rank's items: every W-th, starting at its rank."""
    return list(items)[rank() :: world_size()]


def shard_path(path: str | os.PathLike) -> Path:
    """``name.ext`` → ``name.rank{r}-of-{W}.ext`` under several processes (unchanged in one): each
    rank's partial results in a file of its own."""
    path = Path(path)
    if not is_distributed():
        return path
    return path.with_name(f"{path.stem}.rank{rank()}-of-{world_size()}{path.suffix}")


def all_gather_objects(obj: Any) -> list[Any]:
    """``[obj of rank 0, obj of rank 1, …]`` on every rank (picklable objects)."""
    if not _collective():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Σ over ranks, in place, as one flat message (of one dtype; nccl needs CUDA tensors)."""
    if not _collective() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset : offset + t.numel()].view_as(t))
        offset += t.numel()


def all_reduce_mean_(tensors: Sequence[torch.Tensor]) -> None:
    """Mean over ranks, in place."""
    if not _collective():
        return
    all_reduce_sum_(tensors)
    for t in tensors:
        t.div_(world_size())


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank."""
    if not _collective():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def barrier() -> None:
    if _collective():
        dist.barrier()


def _scalar(value: float) -> torch.Tensor:
    """A one-element tensor on the device the backend communicates from (CUDA for nccl)."""
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    return torch.tensor([float(value)], dtype=torch.float64, device=dev)


def mean_over_ranks(value: float) -> float:
    """The mean of a number over the ranks (the number itself in one process)."""
    if not _collective():
        return float(value)
    t = _scalar(value)
    all_reduce_mean_([t])
    return float(t)


def all_ranks(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on every rank: one decision that all ranks share."""
    if not _collective():
        return bool(flag)
    t = _scalar(bool(flag))
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def main_only(fn: Callable[[], T]) -> T:
    """``fn()`` run by rank 0 alone; its result on every rank, or the exception it raised raised on
    every rank (the others wait for it: a barrier)."""
    if not _collective():
        return fn()
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except Exception as e:  # raised again below, on every rank
            error = e
    result, error = broadcast_object((result, error))
    if error is not None:
        raise error
    return result


def wrap_ddp(model: nn.Module) -> Optional[nn.parallel.DistributedDataParallel]:
    """``model`` in ``DistributedDataParallel`` under several processes, else None.

    DDP broadcasts rank 0's parameters and buffers once, here, and in every backward that is not
    under ``no_sync()`` averages the gradients over the ranks. ``model`` must already be on this
    process's :func:`device` (one device per process)."""
    if not _collective():
        return None
    return nn.parallel.DistributedDataParallel(model)
