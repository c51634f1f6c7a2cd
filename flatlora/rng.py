"""Seeded work on the global RNG that leaves the caller's global RNG as it was (DESIGN §3.5).

The library draws its random numbers from its own ``torch.Generator``s. Some seeded work has to go
through the global RNG — transformers' and peft's initialisations take no generator, and neither do
dropout layers — and it runs inside :func:`seeded`: a fork of the global state, seeded, and put
back afterwards (also after an exception).
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["seeded", "reseed"]


@contextmanager
def seeded(seed: int, *, cuda: bool = False) -> Iterator[None]:
    """Inside: the global RNG of the CPU — and, with ``cuda``, of every CUDA device — seeded with
    ``seed``. Afterwards: the caller's states, as they were.

    ``cuda=False`` neither reads nor seeds the CUDA generators (enough for models built on the CPU,
    and it does not initialise CUDA)."""
    devices = list(range(torch.cuda.device_count())) if cuda else []
    with torch.random.fork_rng(devices=devices):
        reseed(seed, cuda=cuda)
        yield


def reseed(seed: int, *, cuda: bool = False) -> None:
    """Seed the global RNG of the CPU (and, with ``cuda``, of every CUDA device) with ``seed``; call
    it inside :func:`seeded` only, so that the caller's state comes back."""
    torch.random.default_generator.manual_seed(seed)
    if cuda:
        torch.cuda.manual_seed_all(seed)
