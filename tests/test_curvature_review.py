"""The curvature review (issue 13): repeated eigenvalues, XTrace / XNysTrace, batched blocks of products,
a cheaper guard, and the loss plane's vmap-or-loop choice and looped grid."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.sparse.linalg import eigsh
from torch import nn

import landscape.evaluate as evaluate
from helpers import make_linear_lora
from landscape import Loss, ModelChangedError, hessian_eigenvalues, hessian_trace, loss_plane, preserved, space
from landscape.evaluate import Combinations, PointEvaluator
from landscape.hessian.linalg import as_operator, gaussian, generator
from landscape.hessian.operator import HessianOperator
from landscape.hessian.spectrum import lanczos
from landscape.hessian.trace import hutch_plus_plus, xnystrace, xtrace


def symmetric(eigenvalues, seed=0):
    """Q diag(λ) Qᵀ with a random orthogonal Q: a matrix whose spectrum is known exactly."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (q * np.asarray(eigenvalues, dtype=float)) @ q.T


BULK = np.random.default_rng(2).uniform(-0.3, 1.0, 292)


def batches(sizes=(5, 3), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 12, generator=g, dtype=torch.float64), torch.randint(0, 4, (n,), generator=g))
            for n in sizes]


# --- 1. repeated eigenvalues ----------------------------------------------------------------------
def regression(n=20, seed=0):
    """A linear 6 → 3 model under mean squared error: H = 2/(3N)·I₃ ⊗ XᵀX (each eigenvalue three
    times, 18 coordinates), and its largest eigenvalue 2/(3N)·λ_max(XᵀX)."""
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(n, 6, generator=g, dtype=torch.float64), torch.randn(n, 3, generator=g, dtype=torch.float64)
    model = nn.Linear(6, 3, bias=False).double()
    top = 2 / (3 * n) * torch.linalg.eigvalsh(x.T @ x)[-1].item()
    return model, Loss([(x, y)], criterion=F.mse_loss), top


def test_a_thrice_repeated_top_eigenvalue_comes_back_three_times():
    model, loss, top = regression()
    values = hessian_eigenvalues(model, loss, "all", k=3, tol=1e-10, progress=False).eigenvalues
    np.testing.assert_allclose(values, [top] * 3, rtol=1e-9)


def test_without_the_check_one_start_vector_sees_each_value_once():
    """What the check repairs: single-vector Lanczos returns the three largest *distinct* values."""
    model, loss, top = regression()
    values = hessian_eigenvalues(model, loss, "all", k=3, tol=1e-10, check_repeated=False, progress=False).eigenvalues
    assert values[0] == pytest.approx(top, rel=1e-9) and values[1] < top * (1 - 1e-3)


def test_an_exact_double_eigenvalue():
    A = symmetric(np.concatenate([[5.0, 5.0, 3.0, 2.0], BULK]), seed=5)
    values, vectors, _ = lanczos(A, 3, tol=1e-10)
    np.testing.assert_allclose(values, [5.0, 5.0, 3.0], rtol=1e-9)
    np.testing.assert_allclose(vectors.T @ vectors, np.eye(3), atol=1e-8)
    np.testing.assert_allclose(A @ vectors, vectors * values, atol=1e-8)


def test_a_cluster_of_three_within_1e_4():
    cluster = [10.0, 10.0 * (1 - 5e-5), 10.0 * (1 - 1e-4)]
    A = symmetric(np.concatenate([cluster, [4.0], BULK]), seed=6)
    values, _, _ = lanczos(A, 3, tol=1e-10)
    np.testing.assert_allclose(values, cluster, rtol=1e-9)


def test_a_repeated_most_negative_eigenvalue():
    A = symmetric(np.concatenate([[-5.0, -5.0, -3.0, 6.0], BULK]), seed=7)
    values, _, _ = lanczos(A, 2, which="smallest", tol=1e-10)
    np.testing.assert_allclose(values, [-5.0, -5.0], rtol=1e-9)


def test_top_1_makes_no_check_and_no_more_products_than_arpack():
    """k = 1 needs no check (the largest value is right however often it repeats): on a separated top
    eigenvalue, 5–6 products to 1e-6, never more than ARPACK with the former basis of 4."""
    A = symmetric(np.concatenate([[100.0, 10.0], np.random.default_rng(0).uniform(-1, 1, 298)]))
    for seed in range(5):
        values, _, products = lanczos(A, 1, tol=1e-6, seed=seed)
        assert products == lanczos(A, 1, tol=1e-6, seed=seed, check_repeated=False)[2]
        arpack = as_operator(A)
        eigsh(arpack, k=1, which="LA", tol=1e-6, ncv=4, v0=gaussian(generator(seed), A.shape[0]))
        assert products <= min(6, arpack.products) and values[0] == pytest.approx(100.0, rel=1e-10)


# --- 2. XTrace and XNysTrace ----------------------------------------------------------------------
INDEFINITE = symmetric([3.0, -2.0, 1.5, 0.7, -0.4, 2.2, 1.1, -1.3], seed=1)
PSD = symmetric(np.random.default_rng(5).exponential(1.0, 40), seed=4)


def test_xtrace_with_as_many_probes_as_dimensions_is_exact():
    """s = n probes (2n products): the complement of each leave-one-out basis is one line, on which the
    rescaled Hutchinson term is exact."""
    for seed in range(3):
        estimate, stderr, samples, products = xtrace(INDEFINITE, 16, seed=seed)
        assert abs(estimate - np.trace(INDEFINITE)) < 1e-10 and products == 16 and len(samples) == 8


def test_xnystrace_with_as_many_probes_as_dimensions_is_exact():
    psd = symmetric([3.0, 2.0, 1.5, 0.7, 0.4, 2.2, 1.1, 0.3], seed=2)
    for seed in range(3):
        estimate, _, _, products = xnystrace(psd, 8, seed=seed)
        assert abs(estimate - np.trace(psd)) < 1e-10 and products == 8


def test_both_are_exact_on_a_low_rank_operator():
    """A rank-3 operator: the shift ν keeps the factors nonsingular, and the sketch holds the whole range."""
    low = symmetric([5.0, 2.0, 1.0] + [0.0] * 57, seed=3)
    assert xtrace(low, 12, seed=0)[0] == pytest.approx(8.0, abs=1e-10)
    assert xnystrace(low, 6, seed=0)[0] == pytest.approx(8.0, abs=1e-10)


@pytest.mark.parametrize("estimator, m", [(xtrace, 10), (xnystrace, 5)])
def test_unbiased_over_many_seeds(estimator, m):
    errors = np.array([estimator(PSD, m, seed=s)[0] for s in range(300)]) - np.trace(PSD)
    assert abs(errors.mean()) < 3 * errors.std(ddof=1) / np.sqrt(len(errors))


@pytest.mark.parametrize("estimator, m", [(xtrace, 10), (xnystrace, 5)])
def test_the_standard_error_matches_the_spread(estimator, m):
    """The reported standard error sd(tᵢ)/√s against the RMS error over 300 seeds: within a factor 1.5."""
    runs = np.array([estimator(PSD, m, seed=s)[:2] for s in range(300)])
    rms = np.sqrt(np.mean((runs[:, 0] - np.trace(PSD)) ** 2))
    assert rms / 1.5 < runs[:, 1].mean() < rms * 1.5


def test_xtrace_beats_hutch_plus_plus_at_equal_products():
    """Decaying spectrum λᵢ = 1/i² (300 coords), 30 products, 50 seeds."""
    A = symmetric(1.0 / np.arange(1, 301) ** 2, seed=7)

    def rms(estimator):
        return np.sqrt(np.mean([(estimator(A, 30, seed=s)[0] - np.trace(A)) ** 2 for s in range(50)]))

    assert rms(xtrace) < 0.75 * rms(hutch_plus_plus)


def test_xnystrace_refuses_negative_curvature():
    with pytest.raises(ValueError, match="positive semi-definite.*xtrace"):
        xnystrace(-PSD, 6, seed=0)


def test_xtrace_is_the_default_on_a_model():
    est = hessian_trace(make_linear_lora().double(), Loss(batches()), "lora", num_samples=8, progress=False)
    assert est.method == "xtrace" and est.num_hvp == 8 and len(est.samples) == 4


# --- 3. a block of products in one batched computation --------------------------------------------
@pytest.mark.parametrize("backend", ["double-backward", "func"])
@pytest.mark.parametrize("kind", ["lora", "merged", "tangent"])
def test_a_batched_block_equals_the_loop(backend, kind):
    model, data = make_linear_lora().double(), batches()
    ops = {mode: HessianOperator(model, Loss(data), kind, backend=backend, block_products=mode, max_block=3)
           for mode in ("batched", "loop")}
    X = np.random.default_rng(0).standard_normal((ops["loop"].shape[0], 7))
    out = {}
    for mode, op in ops.items():
        with op.session():
            out[mode] = op.matmat(X)
    np.testing.assert_allclose(out["batched"], out["loop"], rtol=0, atol=1e-6 * np.abs(out["loop"]).max())
    assert ops["batched"].products == ops["loop"].products == 7 and ops["batched"].block_fallback is None


def test_auto_falls_back_to_the_loop_where_vmap_cannot_go():
    """func backend, train-mode loss with dropout: vmap refuses random operations; "auto" loops (and
    says why), "batched" raises."""
    model = nn.Sequential(nn.Linear(12, 8), nn.Dropout(0.2), nn.Tanh(), nn.Linear(8, 4)).double()
    loss = Loss(batches(), train_mode=True)
    X = np.random.default_rng(1).standard_normal((sum(p.numel() for p in model.parameters()), 3))
    auto = HessianOperator(model, loss, "all", backend="func")
    loop = HessianOperator(model, loss, "all", backend="func", block_products="loop")
    with auto.session(), loop.session():
        np.testing.assert_allclose(auto.matmat(X), loop.matmat(X), rtol=1e-10)
    assert auto.block_fallback and "random" in auto.block_fallback.lower()
    with pytest.raises(RuntimeError), HessianOperator(model, loss, "all", backend="func",
                                                      block_products="batched").session() as batched:
        batched.matmat(X)


# --- 5. the guard ---------------------------------------------------------------------------------
def small():
    """Linear then BatchNorm (parameters and buffers), in train mode."""
    return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).train()


def test_the_guard_catches_a_parameter_written_in_place():
    model = small()
    with pytest.raises(ModelChangedError, match="0.weight"):
        with preserved(model), torch.no_grad():
            model[0].weight.mul_(2)


def test_the_guard_puts_back_a_replaced_parameter():
    model = small()
    weight = model[0].weight
    with preserved(model) as snap:
        model[0].weight = nn.Parameter(weight.detach().clone())
        assert snap.changes(model) == ["parameter 0.weight was replaced"]
    assert model[0].weight is weight


def test_the_guard_restores_a_changed_buffer():
    model = small()
    before = model[1].running_mean.clone()
    with preserved(model) as snap:
        model(torch.randn(8, 4))  # BatchNorm writes its statistics without bumping their version
        assert "buffer 1.running_mean changed" in snap.changes(model)
    assert torch.equal(model[1].running_mean, before)


def test_the_guard_restores_a_flipped_requires_grad():
    model = small()
    with preserved(model) as snap:
        model[0].bias.requires_grad_(False)
        assert snap.changes(model) == ["parameter 0.bias: requires_grad True -> False"]
    assert model[0].bias.requires_grad


def test_the_guard_restores_modes_through_train():
    """The model's own ``train()`` (here recording its calls) puts back all three modes in one call."""
    model = small()
    calls, own = [], model.train
    with preserved(model) as snap:
        model.eval()
        model.train = lambda mode=True: calls.append(mode) or own(mode)
        assert len(snap.changes(model)) == 3
    assert calls == [True] and all(m.training for m in model.modules())


def test_an_eval_mode_product_leaves_the_global_rng_alone():
    """No fork and no reseeding when nothing random runs: the RNG state is not even read or written."""
    model = make_linear_lora().double().eval()
    op = HessianOperator(model, Loss(batches()), "lora")
    torch.manual_seed(3)
    state = torch.get_rng_state()
    calls = []
    original = torch.random.fork_rng
    try:
        torch.random.fork_rng = lambda *a, **k: calls.append(1) or original(*a, **k)
        op.matvec(np.ones(op.shape[0]))
    finally:
        torch.random.fork_rng = original
    assert calls == [] and torch.equal(torch.get_rng_state(), state)


# --- 6. the loss plane: vmap or loop, and the looped grid -----------------------------------------
@pytest.fixture
def lora_model():
    return make_linear_lora().double().eval()


def test_a_slow_point_decides_for_the_loop_without_a_vmap_trial(lora_model, monkeypatch):
    monkeypatch.setattr(evaluate, "VMAP_MAX_POINT_SECONDS", 0.0)
    monkeypatch.setattr(evaluate, "_DECISIONS", evaluate.weakref.WeakKeyDictionary())
    monkeypatch.setattr(torch.func, "vmap", lambda *a, **k: pytest.fail("vmap was tried"))
    frame = loss_plane(lora_model, Loss(batches()), space="merged", grid=3, progress=False)
    assert len(frame) == 9 and frame.attrs["vectorized"] is False and "not tried" in frame.attrs["loop_reason"]


def test_the_decision_is_remembered_per_model(lora_model, monkeypatch):
    monkeypatch.setattr(evaluate, "_DECISIONS", evaluate.weakref.WeakKeyDictionary())
    loss = Loss(batches())
    sp = space(lora_model, "merged")
    first = PointEvaluator(sp, loss)
    assert first.vectorized is None
    with first as evaluate_points:
        evaluate_points(Combinations(np.eye(2), [sp.zeros(), sp.zeros()]))
    assert PointEvaluator(sp, loss).vectorized is first.vectorized is not None
    assert PointEvaluator(space(make_linear_lora().double(), "merged"), loss).vectorized is None  # another model


@pytest.mark.parametrize("kind", ["all", "merged"])
def test_the_looped_grid_equals_the_vectorized_one(lora_model, kind):
    loss = Loss(batches(sizes=(6, 4)))
    sp = space(lora_model, kind)
    looped = loss_plane(lora_model, loss, space=sp, grid=5, batch_points=1, progress=False)
    vectorized = loss_plane(lora_model, loss, space=sp, grid=5, batch_points=25, progress=False)
    assert looped.attrs["vectorized"] is False and vectorized.attrs["vectorized"] is True
    np.testing.assert_allclose(looped["loss"], vectorized["loss"], rtol=1e-6)


def test_the_looped_grid_makes_no_offsets(lora_model, monkeypatch):
    """Each looped point writes θ + αd₁ + βd₂ once; the offsets αd₁ + βd₂ are never made."""
    monkeypatch.setattr(Combinations, "__getitem__", lambda self, name: pytest.fail("offsets were made"))
    frame = loss_plane(lora_model, Loss(batches()), space="all", grid=3, batch_points=1, progress=False)
    assert len(frame) == 9
