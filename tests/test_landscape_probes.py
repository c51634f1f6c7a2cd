"""Probes against exact answers on a quadratic loss, grids, resumption, errors before any work, and
the guarantee that no probe changes the model (also with BatchNorm and dropout in train mode)."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from landscape import (Loss, SpaceError, expected_loss, loss_line, loss_plane, space, summarize, symmetric_grid,
                       worst_case_sharpness)
from landscape import directions as D
from landscape.evaluate import PointEvaluator

N, IN, OUT = 40, 6, 3


class Quadratic:
    """Linear regression with MSE through one LoRA-adapted layer: in the merged weight W' (m×n),
    L(W' + Δ) = L + ⟨g, Δ⟩ + ½ ΔᵀHΔ exactly, with g = 2RᵀX/(Nm), ΔᵀHΔ = 2‖XΔᵀ‖²/(Nm)."""

    def __init__(self, seed=0):
        from peft import LoraConfig, get_peft_model

        torch.manual_seed(seed)
        self.model = get_peft_model(nn.Sequential(nn.Linear(IN, OUT)), LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            self.model.base_model.model[0].lora_B["default"].weight.copy_(torch.randn(OUT, 2, generator=g) * 0.3)
        self.x = torch.randn(N, IN, generator=g, dtype=torch.float64).float()
        self.y = torch.randn(N, OUT, generator=g)
        self.loss = Loss([(self.x[:25], self.y[:25]), (self.x[25:], self.y[25:])], criterion=F.mse_loss)
        self.view_name = space(self.model, "merged").names[0]
        with torch.no_grad():
            resid = self.model(self.x) - self.y
        self.g = (2 * resid.t() @ self.x / (N * OUT)).double()
        self.x64 = self.x.double()

    def hess(self, d):  # ΔᵀHΔ
        return float(2 * (self.x64 @ d.double().t()).pow(2).sum() / (N * OUT))

    def increase(self, d):  # L(θ + Δ) − L(θ)
        return float((self.g * d.double()).sum()) + 0.5 * self.hess(d)

    def hessian_matrix(self):  # H on vec(Δ) row-major: I_m ⊗ 2XᵀX/(Nm)
        return torch.kron(torch.eye(OUT, dtype=torch.float64), 2 * self.x64.t() @ self.x64 / (N * OUT))


@pytest.fixture(scope="module")
def quad():
    return Quadratic()


def _direction(sp, seed):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(s, generator=g) for n, s in sp.shapes.items()}


@pytest.mark.parametrize("kind", ["merged", "tangent"])
def test_loss_line_is_the_exact_quadratic(quad, kind):
    sp = space(quad.model, kind)
    d = _direction(sp, 3)
    frame = loss_line(quad.model, quad.loss, space=sp, direction=d, alphas=np.linspace(-2, 2, 9), progress=False)
    pd_ = sp.project(d)[quad.view_name]  # tangent: the probe moves along P_T d
    base = quad.loss(quad.model)
    for alpha, value in zip(frame["alpha"], frame["loss"]):
        assert value - base == pytest.approx(quad.increase(alpha * pd_), rel=2e-4, abs=1e-5)


def test_loss_plane_puts_each_point_where_it_belongs(quad):
    sp = space(quad.model, "merged")
    d1, d2 = _direction(sp, 4), _direction(sp, 5)
    alphas, betas = [-1.0, 0.0, 0.5, 2.0], [-0.5, 0.0, 1.0]
    frame = loss_plane(quad.model, quad.loss, space=sp, directions=(d1, d2), grid=(alphas, betas), progress=False)
    assert len(frame) == 12 and sorted(set(frame["alpha"])) == alphas and sorted(set(frame["beta"])) == betas
    base = quad.loss(quad.model)
    for row in frame.itertuples():
        delta = row.alpha * d1[quad.view_name] + row.beta * d2[quad.view_name]
        assert row.loss - base == pytest.approx(quad.increase(delta), rel=2e-4, abs=1e-5)
    # vectorized (default) and looped evaluation agree
    loop = loss_plane(quad.model, quad.loss, space=sp, directions=(d1, d2), grid=(alphas, betas), batch_points=1,
                      progress=False)
    np.testing.assert_allclose(loop["loss"], frame["loss"], rtol=1e-6)


def test_symmetric_grid():
    assert symmetric_grid(0.7, 1).tolist() == [0.0]
    for steps in (5, 21):
        g = symmetric_grid(0.7, steps)
        assert len(g) == steps and 0.0 in g and np.array_equal(g, -g[::-1]) and g[-1] == pytest.approx(0.7)
        assert np.allclose(np.diff(g), 1.4 / (steps - 1))
    with pytest.raises(ValueError, match="odd"):
        symmetric_grid(1.0, 20)
    with pytest.raises(ValueError, match="span"):
        symmetric_grid(0.0, 21)


def test_several_directions_give_a_band(quad):
    frame = loss_line(quad.model, quad.loss, space="merged", direction=D.gaussian, alphas=5, span=0.5,
                      num_directions=3, seed=2, progress=False)
    assert sorted(frame["direction"].unique()) == [0, 1, 2] and len(frame) == 15
    at_half = frame[frame["alpha"] == 0.5]["loss"]
    assert at_half.nunique() == 3  # three different draws
    band = summarize(frame).set_index("alpha")
    assert band.loc[0.5, "loss_mean"] == pytest.approx(at_half.mean())
    assert band.loc[0.5, "loss_std"] == pytest.approx(at_half.std())
    assert band.loc[0.0, "loss_std"] == pytest.approx(0.0, abs=1e-7)
    again = loss_line(quad.model, quad.loss, space="merged", direction=D.gaussian, alphas=5, span=0.5,
                      num_directions=3, seed=2, progress=False)
    pd.testing.assert_frame_equal(frame, again)  # the seed decides


@pytest.mark.parametrize("kind", ["merged", "tangent"])
def test_expected_loss_isotropic_is_half_sigma2_trace(quad, kind):
    sp = space(quad.model, kind)
    h = quad.hessian_matrix()
    basis = torch.eye(sp.dim, dtype=torch.float64)
    p = torch.stack([sp.to_vector(sp.project(sp.from_vector(e.float()))).double() for e in basis])  # P (symmetric)
    trace = float(torch.trace(p @ h @ p))
    frame = expected_loss(quad.model, quad.loss, space=sp, sigmas=[0.5, 2.0], noise="isotropic", seed=0,
                          max_samples=256, min_samples=10, rtol=0.1, progress=False)
    for row in frame.itertuples():
        truth = 0.5 * row.sigma ** 2 * trace
        assert row.converged and row.samples >= 10
        assert row.ci_low <= truth <= row.ci_high
        assert row.half_width <= 0.1 * abs(row.delta_loss)


def test_expected_loss_filter_noise_and_common_random_numbers(quad):
    # E εᵀHε for ε_ij ~ N(0, std_i²): 2‖X‖²/(Nm) · Σ_i std_i², std_i = σ‖W'_i‖/√n
    sp = space(quad.model, "merged")
    sigma = 1.0
    std2 = (sigma * sp.point()[quad.view_name].double().norm(dim=1) / IN ** 0.5) ** 2
    truth = 0.5 * 2 * float(quad.x64.pow(2).sum()) / (N * OUT) * float(std2.sum())
    kwargs = dict(space=sp, sigmas=[sigma], seed=5, max_samples=256, min_samples=10, rtol=0.1, progress=False)
    frame = expected_loss(quad.model, quad.loss, noise="filter", **kwargs)
    assert frame["ci_low"][0] <= truth <= frame["ci_high"][0]
    looped = expected_loss(quad.model, quad.loss, noise="filter", batch_points=1, **kwargs)
    pd.testing.assert_frame_equal(frame, looped, rtol=1e-5)  # same draws, same stopping point


@pytest.mark.parametrize("antithetic", [True, False])
def test_expected_loss_samples_are_the_exact_quadratic(quad, antithetic):
    # sample k of draw z_k = gaussian(seed k): antithetic ½[ΔL(σz) + ΔL(−σz)] = ½σ²zᵀHz exactly (the
    # first-order term ⟨g, σz⟩ cancels); a single draw is ⟨g, σz⟩ + ½σ²zᵀHz
    from flatlora import noise_seed

    sp, sigma, n = space(quad.model, "merged"), 0.1, 12
    z = [D.gaussian(sp, torch.Generator().manual_seed(noise_seed(4, k, 0)))[quad.view_name] for k in range(n)]
    exact = np.array([0.5 * quad.hess(sigma * d) + (0 if antithetic else quad.increase(sigma * d) - 0.5 * quad.hess(sigma * d))
                      for d in z])
    row = expected_loss(quad.model, quad.loss, space=sp, sigmas=[sigma], noise="isotropic", seed=4, max_samples=n,
                        min_samples=n, antithetic=antithetic, progress=False).iloc[0]
    assert row.samples == n and bool(row.antithetic) == antithetic
    assert row.delta_loss == pytest.approx(exact.mean(), rel=1e-3, abs=1e-6)
    assert row["std"] == pytest.approx(exact.std(ddof=1), rel=1e-3, abs=1e-6)


def test_expected_loss_extended_from_first_sample_pools_to_the_longer_run(quad):
    # draws 0–5, then draws 6–15 (first_sample = 6), merged: the mean, std and interval of draws 0–15
    from landscape.noise import pool_samples, t_half_width

    kwargs = dict(space="merged", sigmas=[0.1, 0.4], noise="filter", seed=3, progress=False)
    head, tail, whole = (expected_loss(quad.model, quad.loss, min_samples=k, max_samples=k, first_sample=f, **kwargs)
                         for k, f in ((6, 0), (10, 6), (16, 0)))
    for a, b, w in zip(head.itertuples(), tail.itertuples(), whole.itertuples()):
        n, mean, std = pool_samples((a.samples, a.delta_loss, a.std), (b.samples, b.delta_loss, b.std))
        assert n == w.samples == 16
        assert mean == pytest.approx(w.delta_loss, rel=1e-6) and std == pytest.approx(w.std, rel=1e-6)
        assert t_half_width(n, std) == pytest.approx(w.half_width, rel=1e-6)
    assert not np.isclose(head["delta_loss"], tail["delta_loss"]).any()  # the tail's draws are new ones


def test_pool_samples_is_the_mean_and_std_of_the_concatenation():
    from landscape.noise import pool_samples

    rng = np.random.default_rng(0)
    parts = [rng.normal(3.0, 2.0, size=k) for k in (1, 5, 12)]
    summaries = [(len(x), x.mean(), x.std(ddof=1) if len(x) > 1 else 0.0) for x in parts]
    whole = np.concatenate(parts)
    assert pool_samples(*summaries) == pytest.approx((len(whole), whole.mean(), whole.std(ddof=1)), rel=1e-12)
    with pytest.raises(ValueError, match=">= 2 samples"):
        pool_samples((1, 0.0, 0.0))


def test_worst_case_one_step_is_first_order_formula(quad):
    for kind in ("merged", "tangent"):
        sp = space(quad.model, kind)
        g = sp.project({quad.view_name: quad.g.float()})[quad.view_name].double()
        rho = 0.3
        frame = worst_case_sharpness(quad.model, quad.loss, space=sp, rho=[rho], steps=1)
        g_hat = g / g.norm()
        expected = rho * float(g.norm()) + 0.5 * rho ** 2 * quad.hess(g_hat)
        assert frame["sharpness"][0] == pytest.approx(expected, rel=1e-4)
        assert frame["delta_norm"][0] == pytest.approx(rho, rel=1e-5)
        assert frame["grad_norm"][0] == pytest.approx(float(g.norm()), rel=1e-4)
    # adaptive (ASAM's step with T = |θ|): δ = ρ·|θ|²g / ‖|θ|g‖
    theta = space(quad.model, "merged").point()[quad.view_name].double().abs()
    delta = 0.2 * theta ** 2 * quad.g / (theta * quad.g).norm()
    frame = worst_case_sharpness(quad.model, quad.loss, space="merged", rho=0.2, steps=1, adaptive=True)
    assert frame["sharpness"][0] == pytest.approx(quad.increase(delta), rel=1e-4)
    # more steps: no worse than one step, never above the bound ρ‖g‖ + ½ρ²λ_max
    rho = 0.5
    one, five = (worst_case_sharpness(quad.model, quad.loss, space="merged", rho=rho, steps=k)["sharpness"][0]
                 for k in (1, 5))
    bound = rho * float(quad.g.norm()) + 0.5 * rho ** 2 * float(torch.linalg.eigvalsh(quad.hessian_matrix())[-1])
    assert one <= five <= bound + 1e-6


def test_resume_from_partial_results(quad, tmp_path, monkeypatch):
    path = tmp_path / "plane.json"
    kwargs = dict(space="merged", grid=5, num_directions=2, seed=3, progress=False)
    full = loss_plane(quad.model, quad.loss, results_path=path, **kwargs)
    saved = json.loads(path.read_text())
    assert len(saved["rows"]) == 50
    saved["rows"] = saved["rows"][:7]  # as if stopped after 7 points
    path.write_text(json.dumps(saved))
    evaluated = []
    original = PointEvaluator.__call__

    def counting(self, offsets):
        evaluated.append(next(iter(offsets.values())).shape[0])
        return original(self, offsets)

    monkeypatch.setattr(PointEvaluator, "__call__", counting)
    resumed = loss_plane(quad.model, quad.loss, results_path=path, **kwargs)
    assert sum(evaluated) == 43
    pd.testing.assert_frame_equal(resumed, full)
    with pytest.raises(ValueError, match="another probe"):
        loss_plane(quad.model, quad.loss, results_path=path, **dict(kwargs, seed=4))


# --------------------------------------------------------------------------- nothing changes the model
class BNDropNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.bn, self.drop, self.fc2 = nn.Linear(12, 16), nn.BatchNorm1d(16), nn.Dropout(0.3), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(self.drop(torch.relu(self.bn(self.fc1(x)))))


def _bn_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = get_peft_model(BNDropNet(), LoraConfig(r=2, lora_alpha=4, target_modules=["fc1", "fc2"], lora_dropout=0.2,
                                                   modules_to_save=["bn"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    model.train()
    model.base_model.model.fc2.eval()  # a mixed state
    return model


def _state(model):
    return ({n: t.clone() for n, t in model.state_dict().items()}, {n: p.requires_grad for n, p in model.named_parameters()},
            [m.training for m in model.modules()], torch.get_rng_state())


def _assert_same(model, before):
    sd, flags, modes, rng = before
    now = model.state_dict()
    assert sd.keys() == now.keys() and all(torch.equal(sd[n], now[n]) for n in sd)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert modes == [m.training for m in model.modules()]
    assert torch.equal(rng, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("train_mode", [False, True])
def test_probes_never_change_the_model(train_mode):
    model = _bn_model()
    g = torch.Generator().manual_seed(1)
    loss = Loss([(torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g))], train_mode=train_mode)
    torch.manual_seed(123)
    checkpoint, other = ({n: p.detach() + 0.01 * torch.randn(p.shape, generator=g) for n, p in model.named_parameters()}
                         for _ in range(2))
    gen = torch.Generator().manual_seed(0)
    probes = {
        "evaluate": lambda: loss.evaluate(model),
        "loss_line": lambda: loss_line(model, loss, space="tangent", alphas=3, num_directions=2, progress=False),
        "loss_plane": lambda: loss_plane(model, loss, space="lora", grid=3, orthogonalize=True, progress=False),
        "loss_plane_all": lambda: loss_plane(model, loss, space="all", grid=3, progress=False),
        "expected_loss": lambda: expected_loss(model, loss, space="merged", sigmas=[0.1], max_samples=4, min_samples=2,
                                               progress=False),
        "worst_case": lambda: worst_case_sharpness(model, loss, space="lora", rho=0.1, steps=2),
        "worst_case_adaptive": lambda: worst_case_sharpness(model, loss, space="all", rho=0.1, steps=2, adaptive=True),
        "gradient": lambda: D.gradient(loss)(space(model, "merged", include_trainable=True), gen),
        "interpolation": lambda: loss_line(model, loss, space="merged", direction=D.interpolation(checkpoint), alphas=3,
                                           progress=False),
        "trajectory_pca": lambda: D.trajectory_pca(space(model, "lora"), [checkpoint, other, model]),
    }
    for name, probe in probes.items():
        before = _state(model)
        probe()
        _assert_same(model, before)


def test_interpolation_reaches_the_checkpoint(quad):
    g = torch.Generator().manual_seed(0)
    target = {n: p.detach() + 0.1 * torch.randn(p.shape, generator=g) for n, p in quad.model.named_parameters()
              if "lora_" in n}
    frame = loss_line(quad.model, quad.loss, space="merged", direction=D.interpolation(target), alphas=[0.0, 1.0],
                      progress=False)
    other = Quadratic()
    with torch.no_grad():
        params = dict(other.model.named_parameters())
        for n, t in target.items():
            params[n].copy_(t)
    assert frame["loss"].tolist() == pytest.approx([quad.loss(quad.model), quad.loss(other.model)], rel=1e-5)


# --------------------------------------------------------------------------------- errors before work
def test_bad_input_fails_before_any_work(quad, tmp_path):
    calls = []
    handle = quad.model.register_forward_pre_hook(lambda *a: calls.append(1))
    sp = space(quad.model, "merged")
    good = sp.zeros()
    try:
        cases = [
            (SpaceError, "not coordinates", lambda: loss_line(quad.model, quad.loss, space=sp,
                                                             direction=dict(good, extra=torch.zeros(1)))),
            (SpaceError, "has shape", lambda: loss_line(quad.model, quad.loss, space=sp,
                                                       direction={n: torch.zeros(2) for n in sp.names})),
            (SpaceError, "has shape", lambda: loss_plane(quad.model, quad.loss, space=sp,
                                                        directions=lambda s, g: {n: torch.zeros(2) for n in s.names})),
            (SpaceError, "unknown space", lambda: loss_line(quad.model, quad.loss, space="full")),
            (ValueError, "sigmas", lambda: expected_loss(quad.model, quad.loss, sigmas=[0.1, 0.0])),
            (ValueError, "sigmas", lambda: expected_loss(quad.model, quad.loss, sigmas=[-1.0])),
            (ValueError, "unknown noise", lambda: expected_loss(quad.model, quad.loss, sigmas=[0.1], noise="uniform")),
            (ValueError, "rho", lambda: worst_case_sharpness(quad.model, quad.loss, rho=0.0)),
            (ValueError, "odd", lambda: loss_line(quad.model, quad.loss, alphas=4)),
            (ValueError, "num_directions > 1", lambda: loss_line(quad.model, quad.loss, space=sp, direction=good,
                                                                num_directions=2)),
            (ValueError, "at least one batch", lambda: loss_line(quad.model, Loss([]))),
            (TypeError, "landscape.Loss", lambda: loss_line(quad.model, lambda m: 0.0)),
        ]
        for exc, match, call in cases:
            with pytest.raises(exc, match=match):
                call()
        assert calls == []
    finally:
        handle.remove()
