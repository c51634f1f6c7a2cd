"""Probing never changes the model (DESIGN §3.3): snapshot, check and restore everything a probe could touch.

:func:`preserved` wraps every public probe. On exit it restores

* every module's train / eval mode, through the modules' own ``train()`` (an override, such as one
  that keeps BatchNorm frozen, is honoured) and only where a mode changed: parents first, so one call
  also resets the children that changed with it;
* every parameter's ``requires_grad`` flag, and the parameter and buffer objects themselves in their
  modules, should a module attribute have been reassigned;
* the global RNG state (CPU, and CUDA when initialised) — dropout in ``train_mode`` consumes it;
* buffer values (BatchNorm running statistics in ``train_mode``), compared by value with a copy: the
  BatchNorm kernel updates its running mean and variance without bumping their version counters. The
  copy is one flat tensor per dtype and device (one ``torch.cat``, one comparison), not one per buffer;

and raises :class:`ModelChangedError` if a parameter's values were written in place — a probe must
never do that. Without a copy of the parameters (the default, no extra memory) this is detected by
the tensors' version counters, which see every autograd-visible in-place write but not writes
through ``.data``; with ``copy_parameters=True`` the values are compared bitwise and restored before
raising.

The snapshot walks the module tree once and keeps each slot — (module, attribute name, tensor) — so
that checking and restoring are dictionary lookups and counter reads, without walking
``named_parameters()`` again.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["ModelSnapshot", "ModelChangedError", "preserved", "snapshot", "restore_modes"]


class ModelChangedError(RuntimeError):
    """A parameter was written in place inside a probe (a bug: probes evaluate at offsets functionally)."""


def restore_modes(modes: list[tuple[nn.Module, bool]]) -> None:
    """Put every module back in its recorded mode, ``modes`` listed parents first (``model.modules()``
    order): each module not in its mode gets ``m.train(mode)`` — which also sets its children, visited
    next and corrected where they differ — so mixed per-module modes come back exactly, with the fewest
    calls."""
    for m, training in modes:
        if m.training != training:
            m.train(training)


@dataclass
class _Parameter:
    name: str
    owner: nn.Module
    attr: str
    obj: torch.Tensor
    version: int
    requires_grad: bool
    copy: Optional[torch.Tensor]

    def replaced(self) -> bool:
        return self.owner._parameters.get(self.attr) is not self.obj

    def written(self) -> bool:
        return self.obj._version != self.version or (self.copy is not None and not torch.equal(self.obj, self.copy))


@dataclass
class _Buffer:
    name: str
    owner: nn.Module
    attr: str
    obj: torch.Tensor

    def replaced(self) -> bool:
        return self.owner._buffers.get(self.attr) is not self.obj


def _flat(buffers: list[_Buffer]) -> dict[tuple, torch.Tensor]:
    """The buffers' values as one flat tensor per (dtype, device), in order (a fresh copy)."""
    groups: dict[tuple, list[torch.Tensor]] = {}
    for b in buffers:
        groups.setdefault((b.obj.dtype, b.obj.device), []).append(b.obj.detach().reshape(-1))
    return {key: torch.cat(parts) for key, parts in groups.items()}


@dataclass
class ModelSnapshot:
    """What :func:`snapshot` captured; :meth:`restore` puts it back, :meth:`changes` lists differences."""

    params: list[_Parameter]
    buffers: list[_Buffer]
    buffer_values: dict[tuple, torch.Tensor]  # (dtype, device) -> the buffers' values, flat, in order
    modes: list[tuple[nn.Module, bool]]
    cpu_rng: torch.Tensor
    cuda_rng: Optional[list[torch.Tensor]]

    def _changed_buffers(self) -> list[tuple[_Buffer, torch.Tensor]]:
        """(buffer, its value at the snapshot, flat) for every buffer whose value changed — one comparison
        per dtype and device when none did."""
        now = _flat(self.buffers)
        if all(torch.equal(now[key], self.buffer_values[key]) for key in now):
            return []
        changed, offsets = [], dict.fromkeys(now, 0)
        for b in self.buffers:
            key, size = (b.obj.dtype, b.obj.device), b.obj.numel()
            if not torch.equal(b.obj.reshape(-1), self.buffer_values[key][offsets[key] : offsets[key] + size]):
                changed.append((b, self.buffer_values[key][offsets[key] : offsets[key] + size]))
            offsets[key] += size
        return changed

    def changes(self, model: nn.Module) -> list[str]:
        """Human-readable differences between the model now and the snapshot (empty: unchanged)."""
        out = []
        names = {(prefix + "." if prefix else "") + attr for prefix, m in model.named_modules()
                 for attr, p in m._parameters.items() if p is not None}
        known = {p.name for p in self.params}
        if names != known:
            out.append(f"parameter names changed: {sorted(names ^ known)[:3]}")
        for p in self.params:
            if p.replaced():
                out.append(f"parameter {p.name} was replaced")
            elif p.written():
                out.append(f"parameter {p.name} was written in place")
            if p.obj.requires_grad != p.requires_grad:
                out.append(f"parameter {p.name}: requires_grad {p.requires_grad} -> {p.obj.requires_grad}")
        replaced = [b for b in self.buffers if b.replaced()]
        out += [f"buffer {b.name} was replaced" for b in replaced]
        out += [f"buffer {b.name} changed" for b, _ in self._changed_buffers() if b not in replaced]
        out += [f"module {type(m).__name__}: training {t} -> {m.training}" for m, t in self.modes if m.training != t]
        if not torch.equal(torch.get_rng_state(), self.cpu_rng):
            out.append("global CPU RNG state changed")
        if self.cuda_rng is not None and any(
            not torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), self.cuda_rng)
        ):
            out.append("global CUDA RNG state changed")
        return out

    def restore(self, model: nn.Module) -> None:
        """Put back modes, flags, RNG state, buffers and parameter objects; raise
        :class:`ModelChangedError` if parameter values were written (after restoring them if copied)."""
        restore_modes(self.modes)
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        written = []
        with torch.no_grad():
            for p in self.params:
                if p.replaced():
                    p.owner._parameters[p.attr] = p.obj
                if p.obj.requires_grad != p.requires_grad:
                    p.obj.requires_grad_(p.requires_grad)
                if p.written():
                    written.append(p.name)
                    if p.copy is not None:
                        p.obj.copy_(p.copy)
            for b in self.buffers:
                if b.replaced():
                    b.owner._buffers[b.attr] = b.obj
            for b, value in self._changed_buffers():
                b.obj.copy_(value.view_as(b.obj))
        if written:
            raise ModelChangedError(
                f"parameter(s) {written[:3]} were written in place during a probe"
                + (" (values restored from the copy)" if self.params[0].copy is not None else "")
            )


def snapshot(model: nn.Module, *, copy_parameters: bool = False) -> ModelSnapshot:
    """Capture modes, ``requires_grad`` flags, parameter versions (and values if ``copy_parameters``),
    buffer values and the global RNG state, in one walk of the module tree."""
    params, buffers, modes = [], [], []
    for prefix, m in model.named_modules():
        modes.append((m, m.training))
        dot = prefix + "." if prefix else ""
        params += [_Parameter(dot + attr, m, attr, p, p._version, p.requires_grad,
                              p.detach().clone() if copy_parameters else None)
                   for attr, p in m._parameters.items() if p is not None]
        buffers += [_Buffer(dot + attr, m, attr, b) for attr, b in m._buffers.items() if b is not None]
    return ModelSnapshot(params=params, buffers=buffers, buffer_values=_flat(buffers), modes=modes,
                         cpu_rng=torch.get_rng_state(),
                         cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None)


@contextlib.contextmanager
def preserved(model: nn.Module, *, copy_parameters: bool = False) -> Iterator[ModelSnapshot]:
    """Run a probe; afterwards the model and the global RNG state are exactly as before (see module doc)."""
    snap = snapshot(model, copy_parameters=copy_parameters)
    try:
        yield snap
    finally:
        snap.restore(model)
