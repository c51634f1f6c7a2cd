"""The public Hessian API on digits-mlp (fp64): exact dense answers, PyHessian's numbers, and the
second-order consistency of expected loss under isotropic noise."""
import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from landscape import (Loss, dense_hessian, expected_loss, hessian_density, hessian_eigenvalues, hessian_trace,
                       plot_hessian_density, snapshot)
from helpers import reference_hessian


def fit(model, loss, steps, lr=1e-2):
    """Full-batch Adam on the loss's batches (a few steps move LoRA's B off 0; many reach a minimum)."""
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        sum(F.cross_entropy(model(x), y) * len(y) for x, y in loss.batches).div(loss.total).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model


@pytest.fixture(scope="module")
def digits(digits_task):
    """digits-mlp in fp64 on two batches (100 + 50) of digits 5–9: the task's MLP as built (pretrained
    on digits 0–4: a point with negative curvature, where magnitude-based top-k goes wrong), and the
    task's LoRA model (r = 4 on fc1, fc2, head) after 20 Adam steps, with the dense Hessian of its
    808 LoRA coordinates."""
    from peft import get_peft_model

    task = digits_task  # its build_model: a copy of the model pretrained once per session
    mlp = task.build_model().double()
    loss = Loss([(x.double(), y) for x, y in task.batches("train", 100, limit=150)])
    torch.manual_seed(0)
    lora = fit(get_peft_model(copy.deepcopy(mlp), task.lora_config(rank=4, alpha=8, dropout=0.0)), loss, 20)
    H = reference_hessian(lora, loss.batches, [n for n, p in lora.named_parameters() if p.requires_grad])
    return mlp, lora, loss, H, torch.linalg.eigvalsh(H)


def test_lanczos_top3_matches_the_dense_hessian(digits):
    _, lora, loss, H, exact = digits
    result = hessian_eigenvalues(lora, loss, "lora", k=3, tol=1e-9, progress=False)
    np.testing.assert_allclose(result.eigenvalues, exact[-3:].flip(0).numpy(), rtol=1e-5)
    names = [n for n, p in lora.named_parameters() if p.requires_grad]
    for value, direction in zip(result.eigenvalues, result.eigenvectors):  # eigenvectors, as directions
        v = torch.cat([direction[n].reshape(-1) for n in names])
        torch.testing.assert_close(H @ v, value * v, rtol=0, atol=1e-6 * exact.abs().max().item())
    assert result.num_hvp < 60 and result.converged
    frame = result.to_frame()
    assert list(frame["rank"]) == [1, 2, 3] and set(frame["space"]) == {"lora"}


def test_power_and_smallest(digits):
    _, lora, loss, _, exact = digits
    power = hessian_eigenvalues(lora, loss, "lora", k=3, method="power", tol=1e-10, maxiter=3000, progress=False)
    np.testing.assert_allclose(power.eigenvalues, exact[-3:].flip(0).numpy(), rtol=1e-5)
    assert power.num_hvp > hessian_eigenvalues(lora, loss, "lora", k=3, tol=1e-9, progress=False).num_hvp
    smallest = hessian_eigenvalues(lora, loss, "lora", k=2, which="smallest", tol=1e-9, progress=False)
    assert smallest.eigenvalues[0] < 0
    np.testing.assert_allclose(smallest.eigenvalues, exact[:2].numpy(), rtol=1e-5)


def test_hutch_plus_plus_and_density_against_the_exact_trace(digits):
    _, lora, loss, H, exact = digits
    trace = float(torch.trace(H))
    est = hessian_trace(lora, loss, "lora", method="hutch++", num_samples=90, seed=0, progress=False)
    assert est.num_hvp == 90 and est.method == "hutch++"
    assert abs(est.estimate - trace) < 3 * est.stderr
    density = hessian_density(lora, loss, "lora", num_probes=2, num_steps=30, seed=0, progress=False)
    assert density.num_hvp == 60 and density.dim == H.shape[0]
    nodes = np.concatenate(density.nodes)
    assert nodes.max() == pytest.approx(exact[-1].item(), rel=1e-6)  # extreme Ritz values converge first
    assert nodes.min() == pytest.approx(exact[0].item(), rel=1e-6)
    fig = plot_hessian_density(density)
    assert fig.axes[0].get_xlabel() == "eigenvalue"


def test_same_numbers_as_pyhessian(digits):
    """PyHessian (Yao et al. 2020) on the same model and batch, all parameters trainable (our 'all'
    space), in fp64 (its probes use the default dtype). Its top-k is by magnitude: its third "top"
    eigenvalue is our most negative one. Its normalization divides by ‖v‖ + 1e-6, so its unit vectors
    have norm 1/(1 + 1e-6) and its Rayleigh quotients are low by a factor (1 + 1e-6)⁻² — a relative
    error of 2e-6 that no tolerance removes."""
    pyhessian = pytest.importorskip("pyhessian")
    mlp, _, loss, _, _ = digits
    data = loss.batches[0]
    ours = hessian_eigenvalues(mlp, Loss([data]), "all", k=2, tol=1e-10, progress=False).eigenvalues
    ours_min = hessian_eigenvalues(mlp, Loss([data]), "all", k=1, which="smallest", tol=1e-10,
                                   progress=False).eigenvalues[0]
    ours_trace = hessian_trace(mlp, Loss([data]), "all", num_samples=99, seed=0, progress=False)
    default, rng = torch.get_default_dtype(), torch.get_rng_state()
    torch.set_default_dtype(torch.float64)
    try:
        torch.manual_seed(0)
        engine = pyhessian.hessian(copy.deepcopy(mlp), torch.nn.CrossEntropyLoss(), data=data, cuda=False)
        values, _ = engine.eigenvalues(top_n=3, tol=1e-10, maxIter=1000)
        samples = engine.trace(maxIter=200, tol=-np.inf)  # tol=-inf: all 200 samples (its rule misfires for tr < 0)
    finally:
        torch.set_default_dtype(default)
        torch.set_rng_state(rng)
    np.testing.assert_allclose(values[:2], ours, rtol=1e-5)
    np.testing.assert_allclose(values[:2], ours / (1 + 1e-6) ** 2, rtol=1e-8)  # the whole difference
    assert ours_min < 0 < ours[1] and values[2] == pytest.approx(ours_min, rel=1e-5)
    theirs, theirs_se = np.mean(samples), np.std(samples, ddof=1) / np.sqrt(len(samples))
    assert abs(theirs - ours_trace.estimate) < 3 * np.hypot(theirs_se, ours_trace.stderr)


def test_probes_leave_the_model_unchanged(digits):
    _, lora, loss, _, _ = digits
    model = copy.deepcopy(lora).train()
    before = snapshot(model, copy_parameters=True)
    hessian_eigenvalues(model, loss, "merged", k=1, tol=1e-3, progress=False)
    hessian_eigenvalues(model, loss, "lora", k=1, method="power", tol=1e-3, progress=False)
    hessian_trace(model, loss, "tangent", num_samples=6, progress=False)
    hessian_density(model, loss, "all", num_probes=1, num_steps=3, progress=False)
    assert before.changes(model) == [] and model.training
    assert all(p.grad is None for p in model.parameters())


def test_expected_loss_is_half_sigma_squared_trace(digits):
    """DESIGN §4: at small σ, E L(θ + ε) − L(θ) ≈ ½σ²·tr H for ε ~ N(0, σ²I) — near a minimum, where
    the gradient's share of the Monte Carlo noise is small (the MLP fine-tuned on the batches)."""
    mlp, _, loss, _, _ = digits
    model = fit(copy.deepcopy(mlp), loss, 200)
    trace = hessian_trace(model, loss, "all", num_samples=60, seed=0, progress=False)
    assert trace.stderr < 0.05 * abs(trace.estimate)
    sigma = 0.01
    row = expected_loss(model, loss, space="all", sigmas=[sigma], noise="isotropic", max_samples=64,
                        progress=False).iloc[0]
    assert row["ci_low"] < 0.5 * sigma**2 * trace.estimate < row["ci_high"]
    assert row["ci_low"] > 0  # the interval is informative: it excludes zero curvature


def test_dense_size_limit_and_bad_input(digits):
    mlp, _, loss, _, _ = digits
    with pytest.raises(ValueError, match="max_dim=1000"):
        dense_hessian(mlp, loss, "all", max_dim=1000)
    with pytest.raises(ValueError, match="k=3466"):
        hessian_eigenvalues(mlp, loss, "all", k=3466)
    with pytest.raises(ValueError, match="unknown eigenvalue method 'arnoldi'"):
        hessian_eigenvalues(mlp, loss, "all", method="arnoldi")
    with pytest.raises(ValueError, match="unknown trace method 'exact'"):
        hessian_trace(mlp, loss, "all", method="exact")
    with pytest.raises(ValueError, match="num_steps"):
        hessian_density(mlp, loss, "all", num_steps=0)
