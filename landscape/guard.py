"""Probing never changes the model (DESIGN §3.3): snapshot, check and restore everything a probe could touch.

:func:`preserved` wraps every public probe. On exit it restores

* every module's train / eval mode and every parameter's ``requires_grad`` flag;
* the global RNG state (CPU, and CUDA when initialised) — dropout in ``train_mode`` consumes it;
* buffers whose values changed (BatchNorm running statistics in ``train_mode``), from a copy —
  compared by value: the BatchNorm kernel updates them without bumping their version counter;
* the parameter objects themselves, should a module attribute have been reassigned;

and raises :class:`ModelChangedError` if a parameter's values were written in place — a probe
must never do that. Without a copy of the parameters (the default, no extra memory) this is
detected by the tensors' version counters, which see every autograd-visible in-place write but
not writes through ``.data``; with ``copy_parameters=True`` the values are compared bitwise and
restored before raising.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator, Optional

import torch
from torch import nn

__all__ = ["ModelSnapshot", "ModelChangedError", "preserved", "snapshot"]


class ModelChangedError(RuntimeError):
    """A parameter was written in place inside a probe (a bug: probes evaluate at offsets functionally)."""


def _owner(model: nn.Module, qualified: str) -> tuple[nn.Module, str]:
    module_name, _, attr = qualified.rpartition(".")
    return model.get_submodule(module_name), attr


def _written(param: torch.Tensor, version: int, copy: Optional[torch.Tensor]) -> bool:
    return param._version != version or (copy is not None and not torch.equal(param, copy))


@dataclass
class ModelSnapshot:
    """What :func:`snapshot` captured; :meth:`restore` puts it back, :meth:`changes` lists differences."""

    params: dict[str, tuple[nn.Parameter, int, bool, Optional[torch.Tensor]]]  # object, version, requires_grad, copy
    buffers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # object, copy
    modes: list[tuple[nn.Module, bool]]
    cpu_rng: torch.Tensor
    cuda_rng: Optional[list[torch.Tensor]]

    def changes(self, model: nn.Module) -> list[str]:
        """Human-readable differences between the model now and the snapshot (empty: unchanged)."""
        out = []
        params = dict(model.named_parameters())
        if set(params) != set(self.params):
            out.append(f"parameter names changed: {sorted(set(params) ^ set(self.params))[:3]}")
        for name, (obj, version, flag, copy) in self.params.items():
            p = params.get(name)
            if p is None:
                continue
            if p is not obj:
                out.append(f"parameter {name} was replaced")
            elif _written(obj, version, copy):
                out.append(f"parameter {name} was written in place")
            if p.requires_grad != flag:
                out.append(f"parameter {name}: requires_grad {flag} -> {p.requires_grad}")
        buffers = dict(model.named_buffers())
        for name, (obj, copy) in self.buffers.items():
            if buffers.get(name) is not obj or not torch.equal(obj, copy):
                out.append(f"buffer {name} changed")
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
        for m, training in self.modes:
            m.training = training
        torch.set_rng_state(self.cpu_rng)
        if self.cuda_rng is not None:
            torch.cuda.set_rng_state_all(self.cuda_rng)
        written = []
        with torch.no_grad():
            params = dict(model.named_parameters())
            for name, (obj, version, flag, copy) in self.params.items():
                if params.get(name) is not obj:
                    owner, attr = _owner(model, name)
                    owner._parameters[attr] = obj
                obj.requires_grad_(flag)
                if _written(obj, version, copy):
                    written.append(name)
                    if copy is not None:
                        obj.copy_(copy)
            buffers = dict(model.named_buffers())
            for name, (obj, copy) in self.buffers.items():
                if buffers.get(name) is not obj:
                    owner, attr = _owner(model, name)
                    owner._buffers[attr] = obj
                if not torch.equal(obj, copy):
                    obj.copy_(copy)
        if written:
            raise ModelChangedError(
                f"parameter(s) {written[:3]} were written in place during a probe"
                + (" (values restored from the copy)" if self.params[written[0]][3] is not None else "")
            )


def snapshot(model: nn.Module, *, copy_parameters: bool = False) -> ModelSnapshot:
    """Capture modes, ``requires_grad`` flags, parameter versions (and values if ``copy_parameters``),
    buffer values and the global RNG state."""
    return ModelSnapshot(
        params={n: (p, p._version, p.requires_grad, p.detach().clone() if copy_parameters else None)
                for n, p in model.named_parameters()},
        buffers={n: (b, b.detach().clone()) for n, b in model.named_buffers()},
        modes=[(m, m.training) for m in model.modules()],
        cpu_rng=torch.get_rng_state(),
        cuda_rng=torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None,
    )


@contextlib.contextmanager
def preserved(model: nn.Module, *, copy_parameters: bool = False) -> Iterator[ModelSnapshot]:
    """Run a probe; afterwards the model and the global RNG state are exactly as before (see module doc)."""
    snap = snapshot(model, copy_parameters=copy_parameters)
    try:
        yield snap
    finally:
        snap.restore(model)
