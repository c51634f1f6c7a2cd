"""The Hessian algorithms on explicit symmetric matrices with known spectra (no model involved)."""
import numpy as np
import pytest
import torch

from landscape.hessian.dense import dense_matrix
from landscape.hessian.density import HessianDensity, stochastic_lanczos_quadrature
from landscape.hessian.spectrum import lanczos, power_iteration
from landscape.hessian.trace import hutch_plus_plus, hutchinson


def symmetric(eigenvalues, seed=0):
    """Q diag(λ) Qᵀ with a random orthogonal Q: a matrix whose spectrum is known exactly."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    return (q * np.asarray(eigenvalues, dtype=float)) @ q.T


# a spectrum like a trained network's: a few large outliers, a bulk near 0, negative curvature whose
# magnitude exceeds the 4th and 5th largest eigenvalue (where magnitude-based "top-k" goes wrong)
SPECTRUM = np.concatenate([[40.0, 25.0, 12.0, 3.0, 2.5], -np.array([6.0, 4.0]),
                           np.random.default_rng(1).uniform(-0.5, 1.0, 193)])
A = symmetric(SPECTRUM)
EXACT = np.sort(SPECTRUM)[::-1]


@pytest.mark.parametrize("k", [1, 3, 5])
def test_lanczos_finds_the_algebraically_largest(k):
    values, vectors, products = lanczos(A, k, tol=1e-10)
    np.testing.assert_allclose(values, EXACT[:k], rtol=1e-9)
    np.testing.assert_allclose(A @ vectors, vectors * values, atol=1e-7)
    assert products < 60


def test_lanczos_smallest_gives_the_most_negative():
    values, _, _ = lanczos(A, 2, which="smallest", tol=1e-10)
    np.testing.assert_allclose(values, [-6.0, -4.0], rtol=1e-9)


def test_power_iteration_returns_algebraic_not_magnitude_order():
    """Deflated power iteration by magnitude (PyHessian) would give 40, 25, 12, −6, −4 here."""
    values, vectors, products, converged = power_iteration(A, 5, tol=1e-10, maxiter=5000)
    assert converged
    np.testing.assert_allclose(values, EXACT[:5], rtol=1e-6)
    np.testing.assert_allclose(np.abs(vectors.T @ vectors), np.eye(5), atol=1e-6)
    smallest, _, _, _ = power_iteration(A, 2, which="smallest", tol=1e-10, maxiter=5000)
    np.testing.assert_allclose(smallest, [-6.0, -4.0], rtol=1e-6)


def test_power_tol_is_not_the_error():
    """Close top eigenvalues: the Rayleigh quotient creeps, the stopping rule fires early, and the
    error is far larger than tol — the reason the benchmark compares at achieved error."""
    B = symmetric([1.0, 0.999, 0.5] + [0.1] * 47, seed=2)
    values, _, _, converged = power_iteration(B, 1, tol=1e-4)
    assert converged
    assert abs(values[0] - 1.0) > 1e-4


def test_power_iteration_warns_when_it_stops_at_maxiter():
    with pytest.warns(RuntimeWarning, match="maxiter"):
        _, _, products, converged = power_iteration(A, 1, tol=1e-14, maxiter=3)
    assert not converged and products == 3


def test_seeded_and_global_rng_untouched():
    state = torch.get_rng_state()
    a = hutch_plus_plus(A, 30, seed=5)
    b = hutch_plus_plus(A, 30, seed=torch.Generator().manual_seed(5))
    assert a[0] == b[0] and a[1] == b[1]
    assert hutch_plus_plus(A, 30, seed=6)[0] != a[0]
    np.testing.assert_array_equal(lanczos(A, 2, seed=3)[1], lanczos(A, 2, seed=3)[1])
    assert torch.equal(torch.get_rng_state(), state)


def test_hutchinson_is_unbiased_within_its_standard_error():
    estimate, stderr, samples, products = hutchinson(A, 400, seed=0)
    assert products == 400 and len(samples) == 400
    assert abs(estimate - SPECTRUM.sum()) < 3 * stderr


def test_hutch_plus_plus_beats_hutchinson_on_a_spiky_spectrum():
    estimate, stderr, _, products = hutch_plus_plus(A, 60, seed=0)
    assert products == 60
    assert abs(estimate - SPECTRUM.sum()) < 3 * stderr
    assert stderr < 0.5 * hutchinson(A, 60, seed=0)[1]


def test_hutch_plus_plus_is_exact_for_low_rank():
    low = symmetric([5.0, -2.0, 1.0] + [0.0] * 57, seed=3)
    estimate, stderr, _, _ = hutch_plus_plus(low, 12, seed=0)
    assert estimate == pytest.approx(4.0, abs=1e-10) and stderr < 1e-10


def test_slq_with_a_full_basis_is_the_exact_spectral_measure():
    small = symmetric([3.0, 1.0, -1.0, 0.5, 2.0, -2.5], seed=4)
    nodes, weights, products = stochastic_lanczos_quadrature(small, num_probes=2, num_steps=20, seed=0)
    assert products <= 2 * 6  # stops at the invariant subspace: no random restart
    z = (torch.randint(0, 2, (6, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1).numpy()
    lam, q = np.linalg.eigh(small)
    for j in range(2):
        np.testing.assert_allclose(np.sort(nodes[j]), lam, atol=1e-10)
        exact_weights = (q.T @ z[:, j]) ** 2 / 6
        np.testing.assert_allclose(weights[j][np.argsort(nodes[j])], exact_weights, atol=1e-10)


def test_slq_moments_trace_and_density():
    nodes, weights, products = stochastic_lanczos_quadrature(A, num_probes=3, num_steps=15, seed=0)
    assert products == 45
    density = HessianDensity(nodes=nodes, weights=weights, dim=A.shape[0], num_hvp=products, space="test", seconds=0.0)
    z = (torch.randint(0, 2, (A.shape[0], 3), generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 2 - 1).numpy()
    for j in range(3):  # Gauss quadrature with 15 nodes is exact for moments up to degree 29
        v = z[:, j] / np.linalg.norm(z[:, j])
        for p in (0, 1, 2, 5):
            exact = v @ np.linalg.matrix_power(A, p) @ v
            assert nodes[j] ** p @ weights[j] == pytest.approx(exact, rel=1e-8)
    hutch = np.mean(np.einsum("ij,ij->j", z, A @ z))
    assert density.trace() == pytest.approx(hutch, rel=1e-10)
    grid, phi = density.smoothed(num_points=4000)
    assert np.trapezoid(phi, grid) == pytest.approx(1.0, abs=1e-3)
    assert grid[np.argmax(phi)] == pytest.approx(np.median(SPECTRUM), abs=1.0)  # the bulk
    frame = density.to_frame()
    assert list(frame.columns) == ["space", "probe", "node", "weight"] and len(frame) == 45


def test_dense_matrix_and_its_size_limit():
    np.testing.assert_allclose(dense_matrix(A), A, atol=0)
    with pytest.raises(ValueError, match="max_dim=100.*hessian_eigenvalues"):
        dense_matrix(A, max_dim=100)


@pytest.mark.parametrize("call, match", [
    (lambda: lanczos(A, 200), "k=200.*smaller than the dimension"),
    (lambda: lanczos(A, 0), "positive integer"),
    (lambda: lanczos(A, 2, which="magnitude"), "which must be one of"),
    (lambda: lanczos(A, 2, tol=0), "tol must be > 0"),
    (lambda: lanczos(A, 5, ncv=5), "ncv must satisfy"),
    (lambda: power_iteration(A, 1, maxiter=1), "maxiter"),
    (lambda: hutchinson(A, 1), "num_samples >= 2"),
    (lambda: hutch_plus_plus(A, 3), "num_samples >= 4"),
    (lambda: stochastic_lanczos_quadrature(A, 0), "num_probes"),
    (lambda: lanczos(np.ones((3, 4)), 1), "square"),
    (lambda: hutchinson(A, 10, seed=None), "never use the global RNG"),
])
def test_bad_arguments_are_rejected(call, match):
    with pytest.raises(ValueError, match=match):
        call()
