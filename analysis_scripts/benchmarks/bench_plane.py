"""Benchmark: 7 × 7 and 21 × 21 loss planes with ``landscape.loss_plane`` against the ``loss-landscapes``
package's ``random_plane`` (the peer) and against as many bare no-grad forward passes, on digits-mlp
and rt-minilm, in one process.

    OMP_NUM_THREADS=1 .venv/bin/python analysis_scripts/benchmarks/bench_plane.py \
        [--models digits-mlp rt-minilm] [--grids 7 21] [--repeats 5 1] [--quick]

Our automatic mode (``batch_points=None``) decides between vmap and a loop on its first chunk and
remembers the decision per model (:mod:`landscape.evaluate`): "deciding" rows forget it before every
run (a first probe on a model), "remembered" rows keep it (every later probe).

writes ``figures/bench_plane.md``. Times are the process's CPU time with one thread
(``OMP_NUM_THREADS=1``), which on a shared machine measures the work done where wall time would
measure the neighbours' load; each is the best of ``--repeats`` runs per method (one number per
model), taken round-robin. Where ``random_plane`` fails (it divides by the norm of an all-zero parameter, such as
BERT's pooler bias), the table says so and times a naive clone-and-evaluate loop instead: one copy of
the model, θ + α d₁ + β d₂ written into it at every grid point — with the same directions as ours,
so the two planes are also compared value by value.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from flatlora import TrainConfig, batch_loss, get_task, run  # noqa: E402
from flatlora.io import atomic_write_text  # noqa: E402
from flatlora.training import prepare_model  # noqa: E402
import landscape.evaluate  # noqa: E402
from landscape import Loss, loss_plane, space, symmetric_grid  # noqa: E402
from landscape.directions import filter_normalized  # noqa: E402

BARE = "bare forward passes (no grad), one per grid point"
PEER = "loss-landscapes `random_plane` (all parameters, filter-normalized)"
NAIVE = "naive clone-and-evaluate loop (all parameters)"
OURS_ALL = 'ours, `loss_plane(space="all")`'
DECIDING = 'ours, `loss_plane(space="merged")`, automatic, deciding'


def setup(name: str):
    """(model in eval mode, one evaluation batch). digits-mlp: a trained Flat-LoRA adapter, the
    200-example test split as one batch; rt-minilm: LoRA r=8 on query/value (B = 0 as initialised)
    and 16 test sentences (dynamic padding, ≤ 64 tokens)."""
    task = get_task(name)
    if name == "digits-mlp":
        model, _ = run(TrainConfig(task=name, method="flat-lora"), task=task, progress=False)
        batch = task.batches("test", 200)[0]
    else:
        model = prepare_model(task, TrainConfig(task=name, method="lora").resolved(task))
        batch = task.batches("test", 16, limit=16)[0]
    return model.eval(), batch


def bare(model, batch, steps):
    with torch.no_grad():
        for _ in range(steps * steps):
            batch_loss(model, batch)


def loss_landscapes_plane(model, batch, steps):
    import loss_landscapes
    from loss_landscapes.metrics import Metric

    class BatchLoss(Metric):
        def __call__(self, wrapper):
            with torch.no_grad():
                return float(batch_loss(wrapper.modules[0], batch))

    return loss_landscapes.random_plane(model, BatchLoss(), distance=1, steps=steps, normalization="filter",
                                        deepcopy_model=True)


def naive_plane(model, batch, d1, d2, steps):
    """One copy of the model; at each grid point θ + α d₁ + β d₂ is written into it and evaluated."""
    clone = copy.deepcopy(model)
    params = dict(clone.named_parameters())
    theta = {n: p.detach().clone() for n, p in params.items()}
    grid = symmetric_grid(1.0, steps)
    out = np.empty((steps, steps))
    with torch.no_grad():
        for i, a in enumerate(grid):
            for j, b in enumerate(grid):
                for n, p in params.items():
                    p.copy_(theta[n]).add_(d1[n], alpha=float(a)).add_(d2[n], alpha=float(b))
                out[i, j] = float(batch_loss(clone, batch))
    return out


def deciding(run):
    """``run`` as a first probe on the model: our automatic mode's remembered decisions forgotten first."""
    def fresh():
        landscape.evaluate._DECISIONS.clear()
        return run()
    return fresh


def bench(name: str, repeats: int, grids: list[int]) -> list[dict]:
    """Time every method ``repeats`` times per grid, round-robin (so that a change of load hits all alike);
    keep the best."""
    model, batch = setup(name)
    loss = Loss([batch])
    spaces = {kind: space(model, kind) for kind in ("all", "merged", "lora")}
    gen = torch.Generator().manual_seed(0)
    d1, d2 = filter_normalized(spaces["all"], gen), filter_normalized(spaces["all"], gen)
    rows = []
    for steps in grids:
        def plane(kind, **kw):
            return lambda: loss_plane(model, loss, space=spaces[kind], grid=steps, progress=False, **kw)

        methods = {  # label -> (run, the space of ours)
            BARE: (lambda: bare(model, batch, steps), None),
            PEER: (lambda: loss_landscapes_plane(model, batch, steps), None),
            NAIVE: (lambda: naive_plane(model, batch, d1, d2, steps), None),
            OURS_ALL: (plane("all", directions=(d1, d2)), spaces["all"]),
            DECIDING: (deciding(plane("merged")), spaces["merged"]),
            'ours, `loss_plane(space="merged")`, automatic, remembered': (plane("merged"), spaces["merged"]),
            'ours, `loss_plane(space="merged", batch_points=1)`': (plane("merged", batch_points=1), spaces["merged"]),
            'ours, `loss_plane(space="lora")`, automatic, deciding': (deciding(plane("lora")), spaces["lora"]),
        }
        rows += _time(name, steps, methods, repeats)
    return rows


def _time(name: str, steps: int, methods: dict, repeats: int) -> list[dict]:
    times = {label: [] for label in methods}
    results, notes = {}, {PEER: "grid shifted by one step, no origin; sets `requires_grad=False` (on its deep copy here)"}
    for _ in range(repeats):
        for label, (fn, _) in methods.items():
            if notes.get(label, "").startswith("fails"):
                continue
            t0 = time.process_time()
            try:
                results[label] = fn()
            except Exception as exc:  # noqa: BLE001 — the peer's failure is a result to report
                if label != PEER:
                    raise
                notes[label] = f"fails: `{type(exc).__name__}: {str(exc)[:80]}`"
                print(f"{name}: {label}: {notes[label]}", file=sys.stderr, flush=True)
                continue
            times[label].append(time.process_time() - t0)
            print(f"{name} {steps}×{steps}: {label}: {times[label][-1]:.2f} s", file=sys.stderr, flush=True)
    for label, (_, sp) in methods.items():
        if sp is not None:
            notes[label] = f"dim {sp.dim:,}; {_mode(results[label])}"
    ours = results[OURS_ALL].sort_values(["alpha", "beta"])["loss"].to_numpy()
    notes[OURS_ALL] += f"; max \\|ours − naive\\| = {np.abs(ours - results[NAIVE].ravel()).max():.1e}"
    t_bare = min(times[BARE])
    return [{"model": name, "grid": f"{steps} × {steps}", "method": label, "time": min(t) if t else float("nan"),
             "ratio": (min(t) if t else float("nan")) / t_bare, "note": notes.get(label, "")}
            for label, t in times.items()]


def _mode(frame) -> str:
    """How the plane's points were evaluated (the frame's ``attrs``)."""
    if frame.attrs["vectorized"]:
        return f"vmap, {frame.attrs['points_per_forward']} points per forward"
    return "loop" + (f" ({frame.attrs['loop_reason']})" if frame.attrs["loop_reason"] else "")


def table(rows: list[dict], args) -> str:
    lines = [
        "Loss planes. Time: CPU seconds of the process (one thread, so that the load of other jobs "
        f"on the shared machine does not count), best of {'/'.join(map(str, args.repeats))} runs per method "
        f"(round-robin; per model in order); {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
        f"load average at start {args.load}.",
        "",
        "| model | grid | method | CPU time (s) | × bare forwards | note |",
        "|---|---|---|---:|---:|---|",
    ]
    for r in rows:
        t = "—" if np.isnan(r["time"]) else f"{r['time']:.2f}"
        x = "—" if np.isnan(r["ratio"]) else f"{r['ratio']:.2f}"
        lines.append(f"| {r['model']} | {r['grid']} | {r['method']} | {t} | {x} | {r['note']} |")
    lines += ["", "Made by `OMP_NUM_THREADS=1 .venv/bin/python analysis_scripts/benchmarks/bench_plane.py "
              f"--models {' '.join(args.models)} --grids {' '.join(map(str, args.grids))} "
              f"--repeats {' '.join(map(str, args.repeats))}`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["digits-mlp", "rt-minilm"])
    parser.add_argument("--repeats", type=int, nargs="+", default=[5, 1],
                        help="runs per method, one number per model (or one for all); the best is kept")
    parser.add_argument("--grids", type=int, nargs="+", default=[7, 21], help="grid points per axis (odd)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: digits-mlp, a 3 × 3 grid, once; writes nothing")
    parser.add_argument("--out", default="figures/bench_plane.md")
    args = parser.parse_args()
    if args.quick:
        args.models, args.grids, args.repeats, args.out = ["digits-mlp"], [3], [1], None
    torch.set_num_threads(1)  # CPU time then measures the work (see the module docstring)
    args.load = " ".join(f"{x:.1f}" for x in os.getloadavg())
    if len(args.repeats) not in (1, len(args.models)):
        parser.error("give one --repeats value, or one per model")
    repeats = args.repeats * len(args.models) if len(args.repeats) == 1 else args.repeats
    rows = []
    for name, k in zip(args.models, repeats):
        rows += bench(name, k, args.grids)
        print(table(rows, args), flush=True)
    if args.out:
        atomic_write_text(Path(args.out), table(rows, args))


if __name__ == "__main__":
    main()
