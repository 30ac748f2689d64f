"""The ``deflation`` preconditioner (quasistatic.linalg.deflation) on seeded dense float64 matrices
with known eigenpairs (numpy), and on the Hessian of a small model through the registry.

References: ``numpy.linalg.eigh`` / ``eigvals`` for spectra, ``numpy.linalg.solve`` for solves,
``torch.func.hessian`` (``dense_hessian``) for the small model's A.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quasistatic import Controls, InputError, ModelConfig, Objective, build_model
from quasistatic.linalg.deflation import DeflationPreconditioner, build_deflation, ritz_pairs
from quasistatic.linalg.krylov import solve
from quasistatic.linalg.operators import dense_hessian
from quasistatic.linalg.preconditioners import DensePreconditioner, make_preconditioner
from small_problem import small_labeled


def _orthogonal(n: int, seed: int) -> np.ndarray:
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return q


def spectral_matrix(eigenvalues: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(Q diag(λ) Qᵀ, Q) for a seeded orthogonal Q; λ as given (ascending)."""
    q = _orthogonal(len(eigenvalues), seed)
    return (q * eigenvalues) @ q.T, q


def clustered(n: int, small: int) -> np.ndarray:
    """``small`` eigenvalues log-spaced in [1e-4, 1e-2] below a bulk in [1, 10]: κ = 1e5, κ = 10
    once the small ones are deflated."""
    return np.concatenate([np.logspace(-4, -2, small), np.linspace(1, 10, n - small)])


def matvec_of(a: np.ndarray):
    dense = torch.tensor(a)
    return lambda v: dense @ v


def dense_of(apply, n: int) -> np.ndarray:
    return apply(torch.eye(n, dtype=torch.float64)).numpy()


def test_exact_eigenpairs_are_mapped_to_one_and_the_rest_scaled():
    n, k = 60, 8
    lam = np.logspace(-3, 2, n)
    a, q = spectral_matrix(lam)
    pre = DeflationPreconditioner(torch.tensor(q[:, :k]), torch.tensor(lam[:k]))
    assert pre.scale == pytest.approx(lam[k - 1])  # ν = max|θ|
    p_inv = dense_of(pre.apply, n)
    root = dense_of(pre.apply_inverse_sqrt, n)
    np.testing.assert_allclose(p_inv, p_inv.T, atol=1e-12)
    np.testing.assert_allclose(root, root.T, atol=1e-12)
    np.testing.assert_allclose(root @ root, p_inv, rtol=0, atol=1e-12 * np.abs(p_inv).max())
    spectrum = np.sort(np.linalg.eigvals(p_inv @ a).real)
    expected = np.sort(np.concatenate([np.ones(k), lam[k:] / lam[k - 1]]))
    np.testing.assert_allclose(spectrum, expected, rtol=1e-9)
    assert np.linalg.eigvalsh(p_inv).min() > 0
    # the closed form of the spectral LMP: ν⁻¹ [I + W (ν D⁻¹ − I) Wᵀ]
    w, nu = q[:, :k], lam[k - 1]
    np.testing.assert_allclose(p_inv, (np.eye(n) + w @ np.diag(nu / lam[:k] - 1) @ w.T) / nu, atol=1e-10)
    assert pre.smallest_eigenvalue == pytest.approx(lam[0])
    assert pre.memory_bytes == (n * k + 2 * k) * 8


def test_with_a_base_the_root_stays_symmetric_and_w_is_deflated():
    n, k = 50, 5
    lam = np.logspace(-3, 1, n)
    a, q = spectral_matrix(lam, seed=1)
    rng = np.random.default_rng(2)
    noise = rng.standard_normal((n, n))
    approx = a + 0.05 * (noise + noise.T)  # an inexact (indefinite in places) model of A
    base = DensePreconditioner(torch.tensor(approx), floor=1e-3)
    pre = DeflationPreconditioner(torch.tensor(q[:, :k]), torch.tensor(lam[:k]), base)
    assert pre.scale == 1.0
    p_inv, root = dense_of(pre.apply, n), dense_of(pre.apply_inverse_sqrt, n)
    np.testing.assert_allclose(root, root.T, atol=1e-10 * np.abs(root).max())
    np.testing.assert_allclose(root @ root, p_inv, rtol=0, atol=1e-10 * np.abs(p_inv).max())
    assert np.linalg.eigvalsh((p_inv + p_inv.T) / 2).min() > 0
    w = q[:, :k]
    np.testing.assert_allclose(p_inv @ a @ w, w, atol=1e-9)  # P⁻¹A = 1 on the (A-invariant) W
    assert pre.memory_bytes == (n * k + 2 * k) * 8 + base.memory_bytes


def test_preconditioned_cg_matches_numpy_in_fewer_iterations():
    n, k = 300, 12
    a, _ = spectral_matrix(clustered(n, k), seed=3)
    b = np.random.default_rng(4).standard_normal((n, 2))
    pairs = ritz_pairs(matvec_of(a), n, k, iterations=200, tol=1e-8)
    assert pairs.converged
    pre = DeflationPreconditioner(pairs.vectors, pairs.values)
    exact = np.linalg.solve(a, b)
    plain = solve(matvec_of(a), torch.tensor(b), tol=1e-10)
    deflated = solve(matvec_of(a), torch.tensor(b), tol=1e-10, preconditioner=pre.apply)
    assert plain.converged and deflated.converged
    error = np.linalg.norm(deflated.solution.numpy() - exact, axis=0) / np.linalg.norm(exact, axis=0)
    assert (error < 1e-8).all(), error
    assert deflated.iterations < plain.iterations / 2, (deflated.summary(), plain.summary())


def test_recycled_subspace_costs_fewer_products_along_a_sequence():
    """A_j = A_0 + j ε E, j = 0..9: LOBPCG warm-started from the previous W reaches the same
    eigen-residual with fewer products than cold starts, and the deflated solves beat plain CG."""
    n, k, tol = 200, 6, 1e-6
    lam = np.concatenate([0.01 * np.arange(1, k + 1), np.linspace(1, 10, n - k)])
    a0, _ = spectral_matrix(lam, seed=5)
    e = np.random.default_rng(6).standard_normal((n, n))
    e = (e + e.T) / np.linalg.norm(e + e.T, 2)
    eps = 2e-4
    b = torch.tensor(np.random.default_rng(7).standard_normal(n))
    cold = warm = plain = deflated = 0
    previous = None
    for j in range(10):
        a = a0 + j * eps * e
        mv = matvec_of(a)
        fresh = ritz_pairs(mv, n, k, iterations=500, tol=tol, seed=j)
        pairs = ritz_pairs(mv, n, k, iterations=500, tol=tol, start=previous, seed=j)
        for p in (fresh, pairs):  # the same eigen-residual, checked independently of scipy
            w, theta = p.vectors.numpy(), p.values.numpy()
            assert p.converged and np.linalg.norm(a @ w - w * theta, axis=0).max() <= 1.01 * tol
            np.testing.assert_allclose(theta, np.linalg.eigvalsh(a)[:k], rtol=1e-8)
        cold += fresh.products
        warm += pairs.products
        previous = pairs.vectors
        pre = DeflationPreconditioner(pairs.vectors, pairs.values)
        plain += solve(mv, b, tol=1e-8).matvecs
        deflated += solve(mv, b, tol=1e-8, preconditioner=pre.apply).matvecs
    assert warm < 0.5 * cold, (warm, cold)
    assert deflated < plain, (deflated, plain)


def test_indefinite_matrix_gives_an_spd_preconditioner():
    n, k = 120, 4
    lam = np.concatenate([[-0.5], np.logspace(-3, -1, k - 1), np.linspace(1, 10, n - k)])
    a, _ = spectral_matrix(lam, seed=8)
    pairs = ritz_pairs(matvec_of(a), n, k, iterations=300, tol=1e-8)
    assert pairs.values[0] < 0
    pre = DeflationPreconditioner(pairs.vectors, pairs.values)
    assert pre.smallest_eigenvalue == pytest.approx(-0.5, rel=1e-8)
    p_inv = dense_of(pre.apply, n)
    np.testing.assert_allclose(p_inv, p_inv.T, atol=1e-12)
    assert np.linalg.eigvalsh(p_inv).min() > 0
    b = np.random.default_rng(9).standard_normal(n)
    result = solve(matvec_of(a), torch.tensor(b), method="minres", tol=1e-10, preconditioner=pre.apply)
    assert result.converged
    np.testing.assert_allclose(result.solution.numpy(), np.linalg.solve(a, b), rtol=0,
                               atol=1e-6 * np.abs(np.linalg.solve(a, b)).max())
    # a zero Ritz value is floored, not inverted
    zero = DeflationPreconditioner(pairs.vectors, torch.tensor([0.0, 1e-3, 1e-2, 1e-1], dtype=torch.float64))
    assert torch.isfinite(zero.apply(torch.eye(n, dtype=torch.float64))).all()


def small_problem() -> tuple[Objective, torch.Tensor, Controls]:
    config = ModelConfig(input_shape=(1, 2, 3), num_classes=3, latent_dim=2, hidden=(4,))
    objective = Objective(build_model(config, seed=0).double(), small_labeled(12, 0), samples=1, noise_seed=0)
    theta = objective.initial_theta()
    theta = theta + 0.3 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(1), dtype=theta.dtype)
    return objective, theta, Controls(lam=1.0, gamma=1.0)


def test_registry_builds_it_on_the_hessian_and_counts_the_products():
    objective, theta, controls = small_problem()
    n = theta.numel()
    a = dense_hessian(objective, theta, controls).numpy()
    lam = np.linalg.eigvalsh(a)
    before = objective.work.hvps
    pre = make_preconditioner("deflation", objective, theta, controls, rank=4, iterations=300, tol=1e-9)
    assert isinstance(pre, DeflationPreconditioner)
    assert objective.work.hvps - before == pre.info["products"] > 0
    assert pre.info["converged"]
    np.testing.assert_allclose(pre.values.numpy(), lam[:4], rtol=1e-6, atol=1e-10)
    assert pre.smallest_eigenvalue == pytest.approx(lam[0], rel=1e-6)
    b = np.random.default_rng(10).standard_normal(n)
    result = solve(lambda v: torch.tensor(a) @ v, torch.tensor(b), method="minres", tol=1e-9,
                   preconditioner=pre.apply)  # A is indefinite (random θ), κ ≈ 1.6e5
    exact = np.linalg.solve(a, b)
    assert result.converged
    assert np.linalg.norm(result.solution.numpy() - exact) <= 1e-9 * np.linalg.cond(a) * np.linalg.norm(exact)
    # recycling through ``previous``: a nearby point, the same tolerance, fewer products
    moved = theta + 1e-3 * torch.randn(theta.shape, generator=torch.Generator().manual_seed(2), dtype=theta.dtype)
    cold = build_deflation(objective, moved, controls, rank=4, iterations=300, tol=1e-7)
    warm = build_deflation(objective, moved, controls, rank=4, iterations=300, tol=1e-7, previous=pre)
    assert cold.info["converged"] and warm.info["converged"] and warm.info["warm"]
    assert warm.info["products"] < cold.info["products"]
    # a base by name, built at the same point
    based = make_preconditioner("deflation", objective, theta, controls, rank=4, base="dense",
                                base_options={"floor": 1e-2})
    assert isinstance(based.base, DensePreconditioner)


def test_bad_options_raise_input_errors():
    objective, theta, controls = small_problem()
    with pytest.raises(InputError, match="options of preconditioner 'deflation'"):
        make_preconditioner("deflation", objective, theta, controls, ranks=4)
    with pytest.raises(InputError, match="rank"):
        make_preconditioner("deflation", objective, theta, controls, rank=0)
    with pytest.raises(InputError, match="preconditioner"):
        make_preconditioner("deflation", objective, theta, controls, base="nope")
    w = torch.ones(10, 2, dtype=torch.float64)
    with pytest.raises(InputError, match="orthonormal"):
        DeflationPreconditioner(w, torch.ones(2, dtype=torch.float64))
    with pytest.raises(InputError, match="values"):
        DeflationPreconditioner(torch.eye(10, 2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
