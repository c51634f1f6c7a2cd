"""The measure suite of the flatness-mismatch study: every sharpness measure, in several spaces, as one tidy table.

For one model and one :class:`~landscape.Loss` (the same fixed batches for every run, so runs are
paired), in each space:

* ``eigenvalue``   — the top Hessian eigenvalue(s) λ₁ … λ_k (Lanczos);
* ``trace``        — Tr H by XTrace with its standard error (skipped when ``trace_samples = 0``);
* ``expected_loss`` — ΔL(σ) = E_ε L(θ + ε) − L(θ) under Flat-LoRA's filter noise, per σ, with a
  t-interval (the same noise draws for every run: common random numbers), each draw evaluated as an
  antithetic pair ±ε so that the first-order term cancels (:mod:`landscape.noise`; issue 14.4);
* ``worst_case``   — max over ‖δ‖ ≤ ρ of L(θ + δ) − L(θ) by k ascent steps, per ρ, and beside it
  ``worst_case_first_order`` = ρ‖∇L‖, its first-order term: where the two are close, the worst
  case measures the slope of a point that is not a minimum, not its curvature (issue 14.4);
* ``line``         — L(θ + α d) − L(θ) along K filter-normalized directions (mean over directions
  at the largest |α|, and the full curves returned separately).

Spaces are the library's (:data:`landscape.space.SPACES`) and ``lora-balanced``: the LoRA space of
the same function in the balanced gauge (:func:`landscape.gauge.balanced_copy`, BᵀB = AAᵀ). The
LoRA space as trained depends on the (A·c, B/c) gauge that training happened to leave, so sharpness
there compares gauges as much as flatness; ``lora-balanced`` is the suite's default LoRA space, and
``lora`` (as trained) is there as a caveat only.

A model trained without LoRA (full fine-tuning) has no LoRA, tangent or normal space; its ``merged``
space is the set of weights LoRA adapts in the other runs (same names, same shapes), so that
"sharpness of the weights LoRA would have adapted" is compared like for like.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import asdict, dataclass, field
from typing import Optional, Sequence

import numpy as np
import pandas as pd
from torch import nn

from ..curves import loss_line
from ..gauge import balanced_copy
from ..hessian.spectrum import hessian_eigenvalues
from ..hessian.trace import hessian_trace
from ..loss import Loss
from ..noise import expected_loss
from ..space import SPACES, Space, space
from ..worst_case import worst_case_sharpness

__all__ = ["ProbeSettings", "probe_model", "probe_spaces", "positive_int", "SUITE_SPACES", "DEFAULT_SPACES"]

BALANCED = "lora-balanced"
SUITE_SPACES = (BALANCED, *SPACES)
DEFAULT_SPACES = (BALANCED, "merged", "tangent", "normal")
LORA_SPACES = ("lora", BALANCED, "merged", "tangent", "normal")


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


positive_int.__name__ = "integer >= 1"  # what argparse's message calls the type


@dataclass
class ProbeSettings:
    """What :func:`probe_model` measures, and how hard it tries."""

    spaces: Sequence[str] = DEFAULT_SPACES
    eig_k: int = 1
    eig_tol: float = 1e-3
    trace_samples: int = 0
    sigmas: Sequence[float] = (0.02, 0.05, 0.1)
    noise_max_samples: int = 16
    noise_min_samples: int = 8
    noise_antithetic: bool = True
    rhos: Sequence[float] = (0.05,)
    worst_case_steps: int = 3
    num_directions: int = 3
    alphas: int = 11
    span: float = 1.0
    seed: int = 0
    include_trainable: bool = False
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        """Check every setting before any work (a ValueError naming the setting and its range)."""
        unknown = [sp for sp in self.spaces if sp not in SUITE_SPACES]
        if unknown or not self.spaces:
            raise ValueError(f"spaces {unknown or '(none)'}: choose among {list(SUITE_SPACES)}")
        for name in ("eig_k", "noise_max_samples", "noise_min_samples", "num_directions", "alphas"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eig_tol", "span"):
            if not float(getattr(self, name)) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        for name in ("trace_samples", "worst_case_steps"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        for name in ("sigmas", "rhos"):
            bad = [v for v in getattr(self, name) if not (np.isfinite(v) and v > 0)]
            if bad or not getattr(self, name):
                raise ValueError(f"{name} must be finite and > 0, got {bad or '(none)'}")

    def as_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def add_arguments(parser, **defaults) -> None:
        """The settings (and the probe data: split, examples, batch size) as command-line options;
        ``defaults`` overrides the standard ones (the study's are cheaper)."""
        d = {"spaces": list(DEFAULT_SPACES), "examples": 64, "sigmas": [0.02, 0.05, 0.1],
             "noise_samples": 16, "directions": 3, "alphas": 11, "eig_tol": 1e-3, **defaults}
        parser.add_argument("--spaces", nargs="+", default=d["spaces"], choices=SUITE_SPACES, metavar="SPACE",
                            help=f"spaces to probe, among {', '.join(SUITE_SPACES)} ({BALANCED}: the LoRA space "
                                 "in the balanced gauge; lora: as trained, gauge-dependent)")
        parser.add_argument("--split", default="validation", choices=("train", "validation", "test"),
                            help="split whose first --examples examples are probed")
        parser.add_argument("--examples", type=positive_int, default=d["examples"],
                            help="probe examples (the first N of the split; the same for every run)")
        parser.add_argument("--batch-size", type=positive_int, default=32, help="probe batch size")
        parser.add_argument("--eig-k", type=int, default=1, help="top Hessian eigenvalues per space")
        parser.add_argument("--eig-tol", type=float, default=d["eig_tol"], help="Lanczos relative residual")
        parser.add_argument("--trace-samples", type=int, default=0, help="XTrace products per space (0: skip)")
        parser.add_argument("--sigmas", nargs="+", type=float, default=d["sigmas"], help="noise scales σ of ΔL(σ)")
        parser.add_argument("--noise-samples", type=int, default=d["noise_samples"], help="noise draws per σ (at most)")
        parser.add_argument("--antithetic", action=argparse.BooleanOptionalAction, default=True,
                            help="evaluate each noise draw as the pair ±ε, cancelling the first-order term "
                                 "(--no-antithetic: single draws)")
        parser.add_argument("--rhos", nargs="+", type=float, default=[0.05], help="worst-case radii ρ")
        parser.add_argument("--directions", type=int, default=d["directions"], help="random directions per line")
        parser.add_argument("--alphas", type=int, default=d["alphas"], help="points per line")
        parser.add_argument("--seed", type=int, default=0, help="seed of every random probe")

    @classmethod
    def from_arguments(cls, a) -> "ProbeSettings":
        """The settings given by :meth:`add_arguments`' options."""
        return cls(spaces=tuple(a.spaces), eig_k=a.eig_k, eig_tol=a.eig_tol, trace_samples=a.trace_samples,
                   sigmas=tuple(a.sigmas), noise_max_samples=a.noise_samples,
                   noise_min_samples=min(8, a.noise_samples), noise_antithetic=a.antithetic,
                   rhos=tuple(a.rhos), num_directions=a.directions,
                   alphas=a.alphas, seed=a.seed)


def probe_spaces(model: nn.Module, kinds: Sequence[str], lora_targets: Optional[Sequence[str]],
                 include_trainable: bool = False) -> dict[str, tuple[nn.Module, Space]]:
    """The spaces to probe, each with the model to probe it on: ``lora-balanced`` is the ``lora``
    space of a balanced copy of the model (built once), every other space the model's own. Without
    LoRA layers, ``merged`` becomes the weights of ``lora_targets`` (a custom space) and the LoRA-only
    spaces are left out."""
    from flatlora import UnsupportedAdapterError, lora_layers

    try:
        lora_layers(model)
        has_lora = True
    except UnsupportedAdapterError:
        has_lora = False
    balanced = balanced_copy(model) if has_lora and BALANCED in kinds else None
    spaces = {}
    for kind in kinds:
        if kind == BALANCED and balanced is not None:
            spaces[kind] = (balanced, space(balanced, "lora", include_trainable=include_trainable))
        elif has_lora or kind not in LORA_SPACES:
            spaces[kind] = (model, space(model, kind, include_trainable=include_trainable and kind in LORA_SPACES))
        elif kind == "merged" and lora_targets:
            suffixes = tuple(f".{t}.weight" for t in lora_targets)
            spaces[kind] = (model, space(model, lambda name, p, s=suffixes: ("." + name).endswith(s)))
    return spaces


def _rows(frame: pd.DataFrame, space_name: str, measure: str, x_col: Optional[str], value: str,
          err: Optional[str] = None, extra: Optional[dict] = None) -> list[dict]:
    out = []
    for _, r in frame.iterrows():
        out.append({"space": space_name, "measure": measure, "x": float(r[x_col]) if x_col else np.nan,
                    "value": float(r[value]), "err": float(r[err]) if err else np.nan, **(extra or {})})
    return out


def probe_model(model: nn.Module, loss: Loss, settings: ProbeSettings = ProbeSettings(), *,
                lora_targets: Optional[Sequence[str]] = None, progress: bool = False) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Run the suite; return (measures, curves). ``measures`` has columns space, measure, x (σ, ρ,
    eigenvalue rank or α), value, err (a standard error or an interval half-width), seconds."""
    s = settings
    rows, curves = [], []
    for name, (probed, sp) in probe_spaces(model, s.spaces, lora_targets, s.include_trainable).items():
        t0 = time.perf_counter()
        eig = hessian_eigenvalues(probed, loss, sp, k=s.eig_k, tol=s.eig_tol, seed=s.seed, progress=progress)
        rows += [{"space": name, "measure": "eigenvalue", "x": i + 1, "value": float(v), "err": np.nan,
                  "seconds": eig.seconds, "num_hvp": eig.num_hvp} for i, v in enumerate(eig.eigenvalues)]
        if s.trace_samples:
            tr = hessian_trace(probed, loss, sp, num_samples=s.trace_samples, seed=s.seed, progress=progress)
            rows.append({"space": name, "measure": "trace", "x": np.nan, "value": tr.estimate, "err": tr.stderr,
                         "seconds": tr.seconds, "num_hvp": tr.num_hvp})
        t1 = time.perf_counter()
        noise = expected_loss(probed, loss, space=sp, sigmas=list(s.sigmas), noise="filter", seed=s.seed,
                              max_samples=s.noise_max_samples, min_samples=s.noise_min_samples,
                              antithetic=s.noise_antithetic, progress=progress)
        rows += _rows(noise, name, "expected_loss", "sigma", "delta_loss", "half_width",
                      {"seconds": time.perf_counter() - t1})
        t1 = time.perf_counter()
        worst = worst_case_sharpness(probed, loss, space=sp, rho=list(s.rhos), steps=s.worst_case_steps)
        rows += _rows(worst, name, "worst_case", "rho", "sharpness", None, {"seconds": time.perf_counter() - t1})
        rows += _rows(worst.assign(first_order=worst["rho"] * worst["grad_norm"]), name, "worst_case_first_order", "rho",
                      "first_order")
        t1 = time.perf_counter()
        line = loss_line(probed, loss, space=sp, alphas=s.alphas, span=s.span, num_directions=s.num_directions,
                         seed=s.seed, progress=progress)
        base = float(line.loc[line["alpha"] == 0, "loss"].mean())
        line = line.assign(delta_loss=line["loss"] - base, space=name)
        curves.append(line)
        edge = line[np.isclose(line["alpha"].abs(), s.span)].groupby("direction")["delta_loss"].mean()
        rows.append({"space": name, "measure": "line", "x": s.span, "value": float(edge.mean()),
                     "err": float(edge.std(ddof=1)) if len(edge) > 1 else np.nan,
                     "seconds": time.perf_counter() - t1})
        rows.append({"space": name, "measure": "dim", "x": np.nan, "value": float(sp.dim), "err": np.nan,
                     "seconds": time.perf_counter() - t0})
    return pd.DataFrame(rows), (pd.concat(curves, ignore_index=True) if curves else pd.DataFrame())
