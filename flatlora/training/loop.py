"""The plain-PyTorch training loop: :func:`train_loop` for any model and any
:class:`~flatlora.methods.StepRunner`, fed by :func:`micro_batches` (seeded, resumable, sharded
over ranks)."""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np
import torch
from tqdm.auto import tqdm

from ..batches import batch_to
from ..methods import StepRunner
from ..tasks import Task

__all__ = ["micro_batches", "train_loop"]


def micro_batches(task: Task, batch_size: int, seed: int, split: str = "train", *, rank: int = 0,
                  world_size: int = 1) -> Callable[[int], Any]:
    """``k -> the k-th micro-batch``: epochs of a seeded shuffle (a fresh order each epoch, the
    incomplete last batch dropped). Deterministic in (seed, k), so a resumed run sees the same data.

    Sharded over ``world_size`` W processes, the global micro-batch k is the one a single process
    gets with batch W · ``batch_size``, and ``rank`` r collates its slice [r·b, (r+1)·b)."""
    examples = task.splits[split]
    global_batch = world_size * batch_size
    per_epoch = len(examples) // global_batch
    orders: dict[int, np.ndarray] = {}

    def get(k: int) -> Any:
        epoch, pos = divmod(k, per_epoch)
        if epoch not in orders:
            orders.clear()
            orders[epoch] = np.random.default_rng([seed, epoch]).permutation(len(examples))
        start = pos * global_batch + rank * batch_size
        idx = orders[epoch][start : start + batch_size]
        return task.collate([examples[i] for i in idx])

    get.per_epoch = per_epoch
    return get


def train_loop(
    runner: StepRunner,
    batch_at: Callable[[int], Any],
    steps: int,
    *,
    grad_accum: int = 1,
    start_step: int = 0,
    device: Optional[torch.device] = None,
    progress: bool = True,
    on_step: Optional[Callable[[int, float], None]] = None,
) -> list[float]:
    """Run optimizer steps ``start_step … steps-1``; step t uses micro-batches t·k … t·k+k−1
    (k = ``grad_accum``). Returns the losses of the steps run. ``on_step(t, loss)`` after each."""
    runner.model.train()
    losses = []
    bar = tqdm(range(start_step, steps), desc="train", disable=not progress, initial=start_step, total=steps,
               dynamic_ncols=True)
    for t in bar:
        mbs = [batch_at(t * grad_accum + j) for j in range(grad_accum)]
        if device is not None:
            mbs = [batch_to(b, device) for b in mbs]
        loss = runner.step(mbs, t)
        losses.append(loss)
        bar.set_postfix(loss=f"{loss:.4f}")
        if on_step is not None:
            on_step(t, loss)
    return losses


