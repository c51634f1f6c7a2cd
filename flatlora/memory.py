"""Memory measures of a training step, for the benchmarks: the peak of live tensors during one
optimizer step (torch's memory profiler), and the process's peak resident memory."""
from __future__ import annotations

import resource

import torch

__all__ = ["peak_step_memory", "peak_memory_mb"]


def peak_step_memory(runner, batch, step: int, device: torch.device) -> int:
    """Peak bytes of live tensors during one optimizer step, above those live before it."""
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler import _memory_profiler as mp  # the engine behind profile.export_memory_timeline

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts, profile_memory=True, record_shapes=True, with_stack=True) as prof:
        runner.step([batch], step)
    live, peak, start = 0, 0, None
    for t, action, key, size in mp.MemoryProfile(prof.profiler.kineto_results).timeline:
        if key[0].device.type != device.type:
            continue
        if action == mp.Action.PREEXISTING:
            live += size
            continue
        if start is None:
            start = live
        if action == mp.Action.CREATE:
            live += size
        elif action == mp.Action.DESTROY:
            live -= size
        peak = max(peak, live)
    return peak - (start or 0)


def peak_memory_mb(device: torch.device) -> dict:
    """The process's peak resident memory (MiB), and on CUDA the peak allocated device memory."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    if device.type == "cuda":
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
    return out
