#!/usr/bin/env python
"""Hessian probes against PyHessian, curvlinops and hessian-eigenthings, side by side in one process.

    OMP_NUM_THREADS=1 .venv/bin/python analysis_scripts/benchmarks/bench_hessian.py [--quick] [--skip-minilm]
        [--ks 1,5] [--targets 1e-3,1e-6] [--trace-m 12,102,198] [--seeds 20] [--minilm-steps 100]

Peers, installed without their dependencies (they would replace torch): ``pip install --no-deps
pyhessian curvlinops-for-pytorch hessian-eigenthings einops einconv opt-einsum backpack-for-pytorch
linear_operator``. Two models, each in the space every peer sees (every trainable parameter = our ``lora``
space with ``include_trainable=True``), one fixed batch, fp32, one thread:

* ``digits-mlp`` — the task's LoRA model after 150 training steps, the whole 5–9 train split as one batch;
* ``rt-minilm`` — MiniLM-L6 + LoRA r=8 on query/value + head after ``--minilm-steps`` steps, 16 test sentences.

Sections of ``figures/bench_hessian.md``:

1. **Top-k at equal achieved error.** Each method runs over a sweep of its own knob — the tolerance
   (ours, PyHessian's power iteration, ``scipy.sparse.linalg.eigsh`` on curvlinops' operator with
   scipy's default basis) or the number of Lanczos steps (hessian-eigenthings' ``lanczos``, which has
   no convergence test) — and for each target error the cheapest run whose achieved error
   max_i |λ_i − λ_i*| / |λ_i*| (against an fp64 reference, our Lanczos at tol 1e-10) reaches it is
   reported: products and CPU seconds (operator construction included). "ours, no check" is Lanczos
   without the search for repeated eigenvalues (what the peers do not do either).
2. **Trace at equal products** (digits only, where the dense fp64 Hessian gives the exact trace): RMS
   relative error over ``--seeds`` seeds and CPU seconds per estimate, for m = 12, 102, 198 products.
3. **A block of products**: H X for 16 columns, batched (one vectorized double backward, or ``vmap`` of
   forward-over-reverse) against the loop, CPU seconds per column, on a kept graph (warm).
4. **A cold product**: new operator, new session, one product — ours broken down (building the
   operator, entering and leaving the session, the product) and each peer's — over one gradient.

Times are CPU seconds of the process with one thread (``torch.set_num_threads(1)``: on a shared machine
this measures the work, where wall time would measure the neighbours); best of ``--repeats`` for
sections 3 and 4. ``--quick`` runs a small smoke version (digits only, fewer settings and seeds).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import os
import platform
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from flatlora import TrainConfig, get_task, run
from flatlora.io import atomic_write_text
from landscape import HessianOperator, Loss, dense_hessian, hessian_eigenvalues, hessian_trace
from landscape.hessian.linalg import as_operator, gaussian, generator

ROOT = Path(__file__).resolve().parents[2]
TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6, 1e-7, 1e-8)
PYHESSIAN_TOLS = (1e-2, 1e-3, 1e-4, 1e-5, 1e-6)  # tighter never helps (it stalls near 2e-6) and takes minutes
STEPS = (2, 3, 4, 5, 6, 8, 10, 12, 15, 20, 25, 30, 40, 50, 60, 80)  # hessian-eigenthings' Lanczos steps


class PlainTensorModel(nn.Module):
    """A Hugging Face classifier as ``model(inputs) -> logits`` for the peers: ``inputs`` stacks
    input_ids and attention_mask as (batch, 2, tokens)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=inputs[:, 0], attention_mask=inputs[:, 1]).logits


def digits_case(steps: int) -> dict:
    task = get_task("digits-mlp")
    model, _ = run(TrainConfig(task="digits-mlp", method="lora", steps=steps, seed=0), progress=False, device="cpu")
    examples = task.splits["train"]
    batch = task.collate(examples)
    return {"name": "digits-mlp", "model": model.eval(), "batch": batch, "plain": model, "plain_batch": batch,
            "shape": f"{len(examples)} × 64"}


def minilm_case(steps: int) -> dict:
    task = get_task("rt-minilm")
    model, _ = run(TrainConfig(task="rt-minilm", method="lora", steps=steps, seed=0), progress=False, device="cpu")
    batch = task.collate(task.splits["test"][:16])
    inputs = torch.stack([batch["input_ids"], batch["attention_mask"]], dim=1)
    return {"name": "rt-minilm", "model": model.eval(), "batch": batch, "plain": PlainTensorModel(model).eval(),
            "plain_batch": (inputs, batch["labels"]), "shape": f"16 × {batch['input_ids'].shape[1]} tokens"}


def float64(case: dict) -> tuple[nn.Module, Loss]:
    model = copy.deepcopy(case["model"]).double()
    batch = case["batch"]
    batch = tuple(t.double() if t.is_floating_point() else t for t in batch) if isinstance(batch, tuple) else batch
    return model, Loss([batch])


def reference(case: dict, k: int) -> np.ndarray:
    """The algebraically largest k eigenvalues of an fp64 copy (Lanczos, tol 1e-10)."""
    model, loss = float64(case)
    return hessian_eigenvalues(model, loss, "lora", k=k, tol=1e-10, include_trainable=True,
                               progress=False).eigenvalues


def exact_trace(case: dict) -> float:
    model, loss = float64(case)
    return float(torch.trace(dense_hessian(model, loss, "lora", include_trainable=True, progress=False)))


def cpu_timed(fn: Callable, *args, **kwargs) -> tuple:
    """(fn's result, CPU seconds of the process)."""
    start = time.process_time()
    out = fn(*args, **kwargs)
    return out, time.process_time() - start


@contextlib.contextmanager
def counted(owner, attr: str, columns: Callable = lambda *a, **k: 1):
    """Count the calls of ``owner.attr`` (each worth ``columns(*args)`` products) into the yielded list."""
    count = [0]
    original = getattr(owner, attr)

    def wrapper(*args, **kwargs):
        count[0] += columns(*args, **kwargs)
        return original(*args, **kwargs)

    setattr(owner, attr, wrapper)
    try:
        yield count
    finally:
        setattr(owner, attr, original)


@contextlib.contextmanager
def seeded(seed: int):
    """The peers draw from the global RNG: seed it, and put it back afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


# --- the peers' operators ---------------------------------------------------------------------------
def curvlinops_operator(case: dict):
    from curvlinops import HessianLinearOperator

    return HessianLinearOperator(case["plain"], nn.CrossEntropyLoss(), trainable(case["plain"]), [case["plain_batch"]],
                                 check_deterministic=False)


def eigenthings_operator(case: dict):
    from hessian_eigenthings import HessianOperator as Operator, supervised_loss

    return Operator(case["plain"], [case["plain_batch"]], supervised_loss(nn.CrossEntropyLoss()))


def pyhessian_engine(case: dict):
    from pyhessian import hessian

    return hessian(case["plain"], nn.CrossEntropyLoss(), data=case["plain_batch"], cuda=False)


@contextlib.contextmanager
def pyhessian_products(model: nn.Module):
    """Count PyHessian's products (calls of the ``hessian_vector_product`` its module imported), and
    clear the graphs it leaves in every ``.grad`` of ``model`` afterwards."""
    try:
        with counted(importlib.import_module("pyhessian.hessian"), "hessian_vector_product") as count:
            yield count
    finally:
        model.zero_grad(set_to_none=True)


# --- 1. top-k -------------------------------------------------------------------------------------
def eig_ours(case: dict, k: int, tol: float, check: bool = True) -> tuple[np.ndarray, int]:
    r = hessian_eigenvalues(case["model"], Loss([case["batch"]]), "lora", k=k, tol=tol, include_trainable=True,
                            check_repeated=check, seed=0, progress=False)
    return r.eigenvalues, r.num_hvp


def eig_pyhessian(case: dict, k: int, tol: float) -> tuple[np.ndarray, int]:
    with pyhessian_products(case["plain"]) as count, seeded(0):
        values, _ = pyhessian_engine(case).eigenvalues(top_n=k, tol=tol, maxIter=300)
    return np.sort(np.array(values))[::-1], count[0]


def eig_curvlinops(case: dict, k: int, tol: float) -> tuple[np.ndarray, int]:
    """scipy's ``eigsh`` (default basis max(2k + 1, 20)) on curvlinops' operator, the start vector seeded."""
    from scipy.sparse.linalg import eigsh

    A = as_operator(curvlinops_operator(case).to_scipy())
    values, _ = eigsh(A, k=k, which="LA", tol=tol, v0=gaussian(generator(0), A.shape[0]))
    return np.sort(values)[::-1], A.products


def eig_eigenthings(case: dict, k: int, steps: int) -> tuple[np.ndarray, int]:
    from hessian_eigenthings import lanczos

    op = eigenthings_operator(case)
    with counted(op, "matvec") as count:
        result = lanczos(op, k=k, max_iter=min(steps, op.size - 1), which="LA", reorthogonalize=True, seed=0)
    return np.sort(result.eigenvalues.double().numpy())[::-1], count[0]


EIGEN = {  # label: (run(case, k, knob), knobs for k)
    "ours": (eig_ours, lambda k: TOLS),
    "ours, no check": (lambda c, k, t: eig_ours(c, k, t, check=False), lambda k: TOLS),
    "PyHessian (power)": (eig_pyhessian, lambda k: PYHESSIAN_TOLS),
    "curvlinops + eigsh": (eig_curvlinops, lambda k: TOLS),
    "hessian-eigenthings (Lanczos)": (eig_eigenthings, lambda k: [s for s in STEPS if s > k]),
}


# --- 2. trace -------------------------------------------------------------------------------------
def trace_ours(method: str) -> Callable:
    def estimate(case: dict, m: int, seed: int) -> tuple[float, int]:
        r = hessian_trace(case["model"], Loss([case["batch"]]), "lora", method=method, num_samples=m, seed=seed,
                          include_trainable=True, progress=False)
        return r.estimate, r.num_hvp
    return estimate


def trace_curvlinops(name: str) -> Callable:
    def estimate(case: dict, m: int, seed: int) -> tuple[float, int]:
        import curvlinops

        op = curvlinops_operator(case)
        with counted(op, "_matmat", lambda X: X[0].shape[-1]) as count, seeded(seed):
            value = getattr(curvlinops, name)(op, m)
        return float(value), count[0]
    return estimate


def trace_pyhessian(case: dict, m: int, seed: int) -> tuple[float, int]:
    with pyhessian_products(case["plain"]) as count, seeded(seed):
        samples = pyhessian_engine(case).trace(maxIter=m, tol=-np.inf)  # tol=-inf: all m samples
    return float(np.mean(samples)), count[0]


def trace_eigenthings(case: dict, m: int, seed: int) -> tuple[float, int]:
    from hessian_eigenthings import trace

    op = eigenthings_operator(case)
    with counted(op, "matvec") as count:
        result = trace(op, num_matvecs=m, method="hutch++", seed=seed)
    return result.estimate, count[0]


TRACE = {
    "ours, XTrace (default)": trace_ours("xtrace"),
    "ours, Hutch++": trace_ours("hutch++"),
    "ours, Hutchinson": trace_ours("hutchinson"),
    "curvlinops XTrace": trace_curvlinops("xtrace"),
    "curvlinops Hutch++": trace_curvlinops("hutchpp_trace"),
    "curvlinops Hutchinson": trace_curvlinops("hutchinson_trace"),
    "PyHessian (Hutchinson)": trace_pyhessian,
    "hessian-eigenthings Hutch++": trace_eigenthings,
}


# --- 3. blocks and 4. cold products ---------------------------------------------------------------
def best_of(repeats: int, fn: Callable) -> float:
    return min(cpu_timed(fn)[1] for _ in range(repeats))


def gradient_seconds(case: dict, repeats: int) -> float:
    """One forward and backward of the loss with respect to the trainable parameters."""
    model, (x, y) = case["plain"], case["plain_batch"]
    params = trainable(model)
    return best_of(repeats, lambda: torch.autograd.grad(nn.functional.cross_entropy(model(x), y), params))


def block_seconds(case: dict, backend: str, mode: str, columns: int, repeats: int) -> float:
    """CPU seconds per column of H X (``columns`` columns) on a kept graph, ``block_products=mode``."""
    op = HessianOperator(case["model"], Loss([case["batch"]]), "lora", include_trainable=True, backend=backend,
                         block_products=mode)
    X = np.random.default_rng(0).standard_normal((op.shape[0], columns))
    with op.session():
        op.matvec(X[:, 0])  # builds the kept graph (double backward)
        seconds = best_of(repeats, lambda: op.matmat(X)) / columns
    if op.block_fallback:
        raise RuntimeError(f"{backend}: the batched block fell back to the loop ({op.block_fallback})")
    return seconds


def cold_ours(case: dict, repeats: int) -> dict[str, float]:
    """A cold product of ours, split into building the operator, the session, and the product itself."""
    loss = Loss([case["batch"]])
    parts = {"build": [], "session": [], "product": []}
    for _ in range(repeats):
        op, build = cpu_timed(HessianOperator, case["model"], loss, "lora", include_trainable=True)
        x = np.ones(op.shape[0])
        start = time.process_time()
        with op.session():
            inside = time.process_time()
            op.matvec(x)
            done = time.process_time()
        end = time.process_time()
        parts["build"].append(build)
        parts["product"].append(done - inside)
        parts["session"].append((inside - start) + (end - done))
    best = int(np.argmin([sum(t) for t in zip(*parts.values())]))
    return {key: values[best] for key, values in parts.items()}


def cold_peers(case: dict, repeats: int) -> dict[str, float | str]:
    """CPU seconds of each peer's cold product (best of ``repeats``), or how it failed."""
    n = sum(p.numel() for p in trainable(case["plain"]))
    v = torch.ones(n)

    def pyhessian_cold():
        from pyhessian.utils import hessian_vector_product

        with pyhessian_products(case["plain"]):
            engine = pyhessian_engine(case)
            hessian_vector_product(engine.gradsH, engine.params, [torch.ones_like(p) for p in engine.params])

    runs = {"PyHessian": pyhessian_cold, "curvlinops": lambda: curvlinops_operator(case) @ v,
            "hessian-eigenthings": lambda: eigenthings_operator(case).matvec(v)}
    out = {}
    for label, fn in runs.items():
        first, seconds = attempt(label, fn)
        out[label] = first if seconds is None else min([seconds] + [cpu_timed(fn)[1] for _ in range(repeats - 1)])
    return out


# --- the report -----------------------------------------------------------------------------------
def attempt(label: str, fn: Callable, *args) -> tuple:
    """(fn's result, CPU seconds) — for a peer, (the failure's first words, None) instead of raising: a
    peer that cannot run on a model is a result to report (ours must run)."""
    try:
        return cpu_timed(fn, *args)
    except Exception as exc:  # noqa: BLE001
        if label.startswith("ours"):
            raise
        return f"fails: `{type(exc).__name__}: {str(exc)[:60]}`", None


def eigen_rows(case: dict, ks: list[int], targets: list[float], quick: bool) -> list[str]:
    ref = reference(case, max(ks))
    runs, failed = [], {}
    jobs = [(label, k, knob) for k in ks for label, (_, knobs) in EIGEN.items()
            for knob in (knobs(k)[1:2] if quick else knobs(k))]
    for label, k, knob in tqdm(jobs, desc=f"{case['name']}: top-k", dynamic_ncols=True):
        if label in failed:
            continue
        result, seconds = attempt(label, EIGEN[label][0], case, k, knob)
        if seconds is None:
            failed[label] = result
            continue
        values, products = result
        error = float(np.max(np.abs(values[:k] - ref[:k]) / np.abs(ref[:k])))
        runs.append({"label": label, "k": k, "products": products, "seconds": seconds, "error": error})
    lines = []
    for k in ks:
        for target in targets:
            cells = []
            for label in EIGEN:
                ok = [r for r in runs if r["label"] == label and r["k"] == k and r["error"] <= target]
                best = min(ok, key=lambda r: (r["products"], r["seconds"])) if ok else None
                cells.append(failed.get(label) or (f"{best['products']} / {best['seconds']:.2f}" if best else "—"))
            lines.append(f"| {case['name']} | {k} | {target:.0e} | " + " | ".join(cells) + " |")
    return lines


def trace_rows(case: dict, ms: list[int], seeds: int) -> list[str]:
    exact = exact_trace(case)
    lines = []
    for m in ms:
        cells = []
        for label, estimate in tqdm(TRACE.items(), desc=f"{case['name']}: trace, m = {m}", dynamic_ncols=True):
            runs = [attempt(label, estimate, case, m, seed) for seed in range(seeds)]
            if runs[0][1] is None:
                cells.append(runs[0][0])
                continue
            errors = np.array([value for (value, _), _ in runs]) - exact
            products = {p for (_, p), _ in runs}
            cells.append(f"{np.sqrt(np.mean(errors ** 2)) / abs(exact):.1e} / {np.mean([s for _, s in runs]):.2f}"
                         + ("" if products == {m} else f" ({'/'.join(map(str, sorted(products)))} hvp)"))
        lines.append(f"| {case['name']} | {m} | {exact:.2f} | " + " | ".join(cells) + " |")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: digits only, few settings and seeds")
    p.add_argument("--ks", default="1,5")
    p.add_argument("--targets", default="1e-3,1e-6", help="achieved errors for the equal-accuracy table")
    p.add_argument("--trace-m", default="12,102,198")
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--columns", type=int, default=16, help="columns of the block in section 3")
    p.add_argument("--digits-steps", type=int, default=150)
    p.add_argument("--minilm-steps", type=int, default=100)
    p.add_argument("--skip-minilm", action="store_true")
    p.add_argument("--out", help="default figures/bench_hessian.md; --quick writes nothing unless given")
    a = p.parse_args()
    if a.quick:
        a.ks, a.targets, a.trace_m, a.seeds, a.repeats, a.columns = "1,2", "1e-3", "12", 2, 1, 4
        a.digits_steps, a.skip_minilm = 20, True
    elif a.out is None:
        a.out = str(ROOT / "figures" / "bench_hessian.md")
    torch.set_num_threads(1)  # CPU time then measures the work (see the module docstring)
    ks, targets = [int(k) for k in a.ks.split(",")], [float(t) for t in a.targets.split(",")]
    ms = [int(m) for m in a.trace_m.split(",")]
    load = os.getloadavg()[0]
    cases = [digits_case(a.digits_steps)] + ([] if a.skip_minilm else [minilm_case(a.minilm_steps)])
    dims = {c["name"]: HessianOperator(c["model"], Loss([c["batch"]]), "lora", include_trainable=True).shape[0]
            for c in cases}
    for c in cases:
        if dims[c["name"]] != sum(p.numel() for p in trainable(c["plain"])):
            raise RuntimeError(f"{c['name']}: our space and the peers' parameters differ in size")

    command = ("OMP_NUM_THREADS=1 .venv/bin/python analysis_scripts/benchmarks/bench_hessian.py"
               + (" --quick" if a.quick else f" --ks {a.ks} --targets {a.targets} --trace-m {a.trace_m} --seeds "
                  f"{a.seeds} --repeats {a.repeats} --columns {a.columns} --digits-steps {a.digits_steps}"
                  + (" --skip-minilm" if a.skip_minilm else f" --minilm-steps {a.minilm_steps}")))
    lines = [
        "# Hessian probes against PyHessian, curvlinops and hessian-eigenthings",
        "",
        f"`{command}` — torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} thread, fp32; every trainable parameter ("
        + ", ".join(f"{c['name']}: {dims[c['name']]:,} coordinates, batch {c['shape']}" for c in cases)
        + f"). Times: CPU seconds of the process. 1-minute load average {load:.1f} at the start on "
        f"{os.cpu_count()} cores.",
        "",
        "## 1. Top-k at equal achieved error",
        "",
        "Products / CPU seconds of the cheapest run (over each method's knob: tolerance, or hessian-eigenthings' "
        "number of Lanczos steps) whose error max |λᵢ − λᵢ*| / |λᵢ*| against the fp64 reference is at most the "
        "target; — : no run reached it. \"ours, no check\": without the search for repeated eigenvalues.",
        "",
        "| model | k | target | " + " | ".join(EIGEN) + " |",
        "|---|---|---|" + "---|" * len(EIGEN),
    ]
    for c in cases:
        lines += eigen_rows(c, ks, targets, a.quick)
    lines += [
        "",
        f"## 2. Trace at equal products (digits-mlp, exact trace from the dense fp64 Hessian, {a.seeds} seeds)",
        "",
        "RMS relative error / CPU seconds per estimate.",
        "",
        "| model | m | exact trace | " + " | ".join(TRACE) + " |",
        "|---|---|---|" + "---|" * len(TRACE),
    ]
    lines += trace_rows(cases[0], ms, a.seeds)
    lines += [
        "",
        f"## 3. A block of {a.columns} products, batched against the loop",
        "",
        "CPU seconds per column on a kept graph; the gradient column is one forward and backward.",
        "",
        "| model | gradient | double-backward batched | double-backward loop | func batched | func loop |",
        "|---|---|---|---|---|---|",
    ]
    grads = {}
    for c in cases:
        grads[c["name"]] = gradient_seconds(c, a.repeats)
        cells = [f"{block_seconds(c, b, mode, a.columns, a.repeats):.4f}" for b in ("double-backward", "func")
                 for mode in ("batched", "loop")]
        lines.append(f"| {c['name']} | {grads[c['name']]:.4f} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## 4. A cold product (new operator, new session, one product), in gradients",
        "",
        "| model | gradient (s) | ours | ours: build | ours: session | ours: product | PyHessian | curvlinops "
        "| hessian-eigenthings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for c in cases:
        g = grads[c["name"]]
        ours = cold_ours(c, a.repeats)
        peers = cold_peers(c, a.repeats)
        lines.append(f"| {c['name']} | {g:.4f} | {sum(ours.values()) / g:.2f} | "
                     + " | ".join(f"{ours[key] / g:.2f}" for key in ("build", "session", "product")) + " | "
                     + " | ".join(peers[key] if isinstance(peers[key], str) else f"{peers[key] / g:.2f}"
                                  for key in ("PyHessian", "curvlinops", "hessian-eigenthings"))
                     + " |")
    lines.append("")
    if a.out:
        atomic_write_text(a.out, "\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
