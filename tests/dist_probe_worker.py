"""Run every probe on a small LoRA model of the digits task and pickle what it returns.

    python tests/dist_probe_worker.py OUT                                   # one process
    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_probe_worker.py OUT

Each rank writes OUT/rank{r}.pkl; tests/test_distributed_probes.py compares them with one process.
"""
import pickle
import sys
from pathlib import Path

import torch

from flatlora import TrainConfig, distributed, get_task, prepare_model
from landscape import (Loss, expected_loss, hessian_density, hessian_eigenvalues, hessian_trace, loss_line,
                       loss_plane)
from landscape.worst_case import worst_case_sharpness


def main(out: Path) -> None:
    distributed.ensure_initialized()  # join the process group torchrun describes
    task = get_task("digits-mlp")
    cfg = TrainConfig(task="digits-mlp", method="lora", lora_dropout=0.0).resolved(task)
    model = prepare_model(task, cfg).eval()
    with torch.no_grad():  # B = 0 at init: give the adapter values so that s·B·A is not zero
        g = torch.Generator().manual_seed(1)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    loss = Loss(task.batches("validation", 32, limit=160))  # 5 batches: uneven shards on 2 ranks
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    results = {
        "line": loss_line(model, loss, space="merged", alphas=7, num_directions=3, seed=3, batch_points=2,
                          results_path=out / "line.json", progress=False),
        "plane": loss_plane(model, loss, space="lora", grid=5, seed=4, results_path=out / "plane.json", progress=False),
        "noise": expected_loss(model, loss, space="merged", sigmas=[0.05, 0.2], max_samples=13, min_samples=4,
                               batch_points=2, seed=5, progress=False),
        "eig": hessian_eigenvalues(model, loss, "lora", k=2, tol=1e-8, progress=False).eigenvalues,
        "power": hessian_eigenvalues(model, loss, "merged", method="power", tol=1e-6, progress=False).eigenvalues,
        "density": hessian_density(model, loss, "lora", num_probes=2, num_steps=8, progress=False).to_frame(),
        "hutchinson": hessian_trace(model, loss, "lora", method="hutchinson", num_samples=6, progress=False),
        "hutch++": hessian_trace(model, loss, "merged", num_samples=9, progress=False),
        "worst": worst_case_sharpness(model, loss, space="merged", rho=[0.05], steps=3),
    }
    results["unchanged"] = all(torch.equal(before[n], p) for n, p in model.state_dict().items())
    results["world_size"] = distributed.world_size()
    for key in ("hutchinson", "hutch++"):
        t = results[key]
        results[key] = (t.estimate, t.stderr, t.num_hvp)
    with open(out / f"rank{distributed.rank()}.pkl", "wb") as f:
        pickle.dump(results, f)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
