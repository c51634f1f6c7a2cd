"""The review of the Hessian code (issue 11): product backends on their own, the front-ends' shared
run, one "is this a Loss" check, and ``Loss.mode`` going through the modules' ``train()``."""
import inspect
import re

import numpy as np
import pytest
import torch
from torch import nn

from helpers import make_linear_lora, reference_hessian
from landscape import Loss, expected_loss, hessian_eigenvalues, loss_line, loss_plane, space
from landscape.hessian.operator import HessianOperator, rank_batches, run_on_hessian
from landscape.hessian.products import BACKENDS, make_backend
from landscape.worst_case import worst_case_sharpness


def batches(sizes=(5, 3, 4), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 12, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g))
            for n in sizes]


@pytest.fixture(scope="module")
def lora64():
    return make_linear_lora().double().eval()


def count_forwards(model):
    """A list that grows by one entry per forward pass of ``model``, and the hook's handle."""
    calls = []
    return calls, model.register_forward_hook(lambda *_: calls.append(1))


# --- the product backends on their own ------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_backend_over_some_batches_is_their_weighted_hessian(lora64, backend):
    """H_B v = Σ_{b∈B} (n_b/N) H_b v for a subset B (one rank's share): (N_B/N) times B's own Hessian."""
    data, loss = batches(), Loss(batches())
    sp = space(lora64, "lora")
    share = rank_batches(loss, torch.device("cpu"), shard=False)[::2]  # batches 0 and 2
    v = sp.from_vector(torch.from_numpy(np.random.default_rng(0).standard_normal(sp.dim)))
    with loss.mode(lora64):
        got = sp.to_vector(make_backend(backend, loss, sp)(v, share))
    subset = [data[0], data[2]]
    want = reference_hessian(lora64, subset, sp.names) @ sp.to_vector(v) * (9 / loss.total)
    tol = 1e-6 if backend == "finite-difference" else 1e-10
    torch.testing.assert_close(got, want, rtol=0, atol=tol * float(want.abs().max()))


def test_kept_graphs_serve_every_product_of_a_session(lora64):
    op = HessianOperator(lora64, Loss(batches()), "lora")
    calls, handle = count_forwards(lora64)
    try:
        with op.session():
            op.matmat(np.eye(op.shape[0])[:, :4])
    finally:
        handle.remove()
    assert len(calls) == 3  # one forward per batch, for 4 products


def test_a_new_session_rebuilds_the_released_graphs(lora64):
    op = HessianOperator(lora64, Loss(batches()), "lora")
    calls, handle = count_forwards(lora64)
    try:
        for _ in range(2):
            with op.session():
                op.matvec(np.ones(op.shape[0]))
    finally:
        handle.remove()
    assert len(calls) == 6


# --- the front-ends' shared run -------------------------------------------------------------------
def test_run_on_hessian_returns_the_result_the_operator_and_the_time(lora64):
    run = run_on_hessian(lora64, Loss(batches()), "merged", lambda op: op.matvec(np.ones(op.shape[0])),
                         name="one product", progress=False)
    assert run.space == "merged" and run.operator.products == 1 and run.seconds > 0
    assert run.result.shape == (run.operator.shape[0],)


def too_big(n):
    raise ValueError(f"{n} coordinates: too big")


def test_run_on_hessian_checks_the_dimension_before_any_forward_pass(lora64):
    calls, handle = count_forwards(lora64)
    try:
        with pytest.raises(ValueError, match="too big"):
            run_on_hessian(lora64, Loss(batches()), "lora", lambda op: op.matvec(np.ones(op.shape[0])), name="x",
                           check=too_big)
    finally:
        handle.remove()
    assert calls == []


def test_the_eigenvalue_docstring_names_only_options_the_operator_takes():
    """Every ``option`` listed for ``**operator_options`` is a parameter of HessianOperator (the list once
    said ``attention`` for ``switch_attention``)."""
    doc = inspect.getdoc(hessian_eigenvalues)
    listed = set(re.findall(r"``(\w+)``", doc[doc.index("**operator_options"):].split("\n\n")[0]))
    assert listed and listed <= set(inspect.signature(HessianOperator).parameters)


# --- one check for "is this a Loss" ---------------------------------------------------------------
PROBES = {  # name: (call with a model and a would-be loss, the name the message starts with)
    "HessianOperator": (lambda m, x: HessianOperator(m, x), "HessianOperator"),
    "hessian_eigenvalues": (lambda m, x: hessian_eigenvalues(m, x), "HessianOperator"),
    "loss_line": (lambda m, x: loss_line(m, x), "loss_line"),
    "loss_plane": (lambda m, x: loss_plane(m, x), "loss_plane"),
    "expected_loss": (lambda m, x: expected_loss(m, x, sigmas=[0.1]), "expected_loss"),
    "worst_case_sharpness": (lambda m, x: worst_case_sharpness(m, x, rho=0.1), "worst_case_sharpness"),
}


@pytest.mark.parametrize("name", PROBES)
def test_a_probe_given_batches_instead_of_a_loss_says_what_to_pass(lora64, name):
    call, where = PROBES[name]
    with pytest.raises(TypeError, match=rf"{where}: loss must be a landscape.Loss.*Loss\(task.batches"):
        call(lora64, batches())


# --- Loss.mode through train() --------------------------------------------------------------------
class Recording(nn.Module):
    """A module whose ``train()`` records its calls, and (like a frozen-BatchNorm override) keeps ``frozen`` in eval."""

    def __init__(self):
        super().__init__()
        self.frozen, self.live = nn.Dropout(0.5), nn.Dropout(0.5)
        self.calls = []

    def train(self, mode=True):
        self.calls.append(mode)
        super().train(mode)
        self.frozen.eval()
        return self


def test_loss_mode_restores_through_an_overridden_train():
    model = Recording().train()
    model.calls.clear()
    with Loss(batches(), train_mode=False).mode(model):
        assert not model.training
    assert model.calls == [False, True]


@pytest.mark.parametrize("train_mode", [False, True])
def test_loss_mode_restores_mixed_modes_exactly(train_mode):
    model = nn.Sequential(nn.Sequential(nn.Dropout(), nn.Dropout()), nn.Dropout(), Recording())
    model.eval()
    model[0].train()
    model[0][1].eval()
    model[2].live.train()
    before = [m.training for m in model.modules()]
    with Loss(batches(), train_mode=train_mode).mode(model):
        pass
    assert [m.training for m in model.modules()] == before


# --- issue 12.12: finite differences checked once against double backward ------------------------
def _mlp(activation):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(64, 8, generator=g), torch.randint(0, 3, (64,), generator=g))]
    return nn.Sequential(nn.Linear(8, 32), activation, nn.Linear(32, 3)).eval(), Loss(data)


def test_finite_differences_on_a_relu_network_warn():
    """fp32 ReLU MLP, default fd_step: the step crosses kinks, and the first product's check says so and
    names the cause (here the product is 203% off the double-backward one)."""
    model, loss = _mlp(nn.ReLU())
    op = HessianOperator(model, loss, "all", backend="finite-difference")
    with op.session(progress=False), pytest.warns(UserWarning, match="piecewise-linear"):
        op @ np.random.default_rng(0).standard_normal(op.shape[0])
    assert op.hvp.check_error > 1.0


def test_a_lanczos_that_fails_on_suspect_products_names_them():
    """Lanczos on finite differences across ReLU kinks (an operator that is not even linear) may not
    converge — it did not on one CI machine at tol 1e-6. Its error then names the products' check, not
    only the basis size; maxiter=0 makes the failure certain here."""
    model, loss = _mlp(nn.ReLU())
    with pytest.warns(UserWarning, match="piecewise-linear"), \
            pytest.raises(RuntimeError, match="products are suspect.*piecewise-linear"):
        hessian_eigenvalues(model, loss, "all", k=1, backend="finite-difference", progress=False,
                            tol=1e-12, maxiter=0)


def test_finite_differences_on_a_smooth_network_pass_the_check_silently(recwarn):
    model, loss = _mlp(nn.Tanh())
    fd = hessian_eigenvalues(model, loss, "all", k=1, backend="finite-difference", progress=False)
    exact = hessian_eigenvalues(model, loss, "all", k=1, progress=False)
    assert not [w for w in recwarn if "finite-difference" in str(w.message)]
    assert fd.eigenvalues[0] == pytest.approx(exact.eigenvalues[0], rel=1e-3)
