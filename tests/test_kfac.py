"""The ``kfac`` preconditioner (quasistatic.linalg.kfac) against dense float64 references.

- One example, one noise sample: every Linear layer is used on one row, so its Gauss–Newton block
  Σ_j (g_j g_jᵀ) ⊗ (ā āᵀ) is exactly G ⊗ Ā: the blocks of ``CurvatureOperator(kind="ggn").dense()``
  (minus σI) must equal the Kronecker products to 1e-10. With K = 2 samples the encoder layers are
  still used once per example and stay exact (they receive curvature from R, D and C through
  z = μ + σ·ε); the decoder and classifier are then approximated ("expand" convention).
- The Monte-Carlo G (default ``samples=1``) is unbiased: many samples approach the exact one.
- ``apply`` is the solve with the dense P built here from the factors and the damping; the inverse
  square root is symmetric and squares to it.
- As the preconditioner of CG on the exact Hessian at a polished equilibrium it converges to the
  dense solution in fewer iterations than plain CG; the polish to that equilibrium runs its
  whitened L-BFGS on P^{-1/2}.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from quasistatic import Controls, DataMixture, InputError, ModelConfig, Objective, build_model, polish
from quasistatic.linalg import LinearSolve, LinearSolveConfig
from quasistatic.linalg.kfac import FORMS, KFACPreconditioner, build_kfac, kronecker_blocks
from quasistatic.linalg.krylov import solve
from quasistatic.linalg.operators import CurvatureOperator
from quasistatic.linalg.preconditioners import make_preconditioner
from small_problem import small_labeled

CONTROLS = Controls(lam=1.3, gamma=0.7)
LINEAR_LAYERS = ("encoder.1.0", "encoder.1.2", "decoder.0", "decoder.2", "classifier.linear")


def model(likelihood: str = "bernoulli", prior: str = "normal", hidden: tuple[int, ...] = (3,)):
    config = ModelConfig(input_shape=(1, 2, 3), num_classes=3, latent_dim=2, hidden=hidden, likelihood=likelihood,
                         prior=prior, prior_components=2)
    return build_model(config, seed=0).double()


def perturbed(objective: Objective, scale: float = 0.3) -> torch.Tensor:
    theta = objective.initial_theta()
    return theta + scale * torch.randn(theta.shape, generator=torch.Generator().manual_seed(1), dtype=theta.dtype)


def layer_index(objective: Objective, name: str) -> np.ndarray:
    """θ-indices of W̄ = [W | b] of Linear layer ``name``, row by row (W is out × in in θ, then b)."""
    offsets, start = {}, 0
    for n, shape in zip(objective.layout.names, objective.layout.shapes):
        offsets[n] = (start, shape)
        start += int(np.prod(shape))
    (w_start, (out, n_in)), (b_start, _) = offsets[f"{name}.weight"], offsets[f"{name}.bias"]
    w = w_start + np.arange(out * n_in).reshape(out, n_in)
    return np.concatenate([w, b_start + np.arange(out)[:, None]], axis=1).reshape(-1)


def dense_kfac(objective: Objective, pre: KFACPreconditioner) -> np.ndarray:
    """P built here from the factors: (G + g_shift I) ⊗ (Ā + a_shift I) + shift I per layer."""
    n = objective.layout.numel
    p = np.zeros((n, n))
    covered = np.zeros(n, dtype=bool)
    for block in pre.blocks:
        a, g = block.A.numpy(), block.G.numpy()
        product = np.kron(g + block.g_shift * np.eye(len(g)), a + block.a_shift * np.eye(len(a)))
        index = layer_index(objective, block.name)
        p[np.ix_(index, index)] = product + block.shift * np.eye(len(index))
        covered[index] = True
    rest = np.flatnonzero(~covered)
    p[rest, rest] = pre.rest_value
    return p


# --- the factors -------------------------------------------------------------------------------------

@pytest.mark.parametrize("likelihood", ["bernoulli", "gaussian"])
@pytest.mark.parametrize("samples", [1, 2])
def test_one_example_blocks_are_the_exact_gauss_newton_blocks(likelihood: str, samples: int) -> None:
    sigma = 0.2
    objective = Objective(model(likelihood), small_labeled(1, 0), samples=samples, sigma=sigma)
    theta = perturbed(objective)
    ggn = CurvatureOperator(objective, theta, CONTROLS, kind="ggn").dense()
    ggn = ggn - sigma * torch.eye(len(ggn), dtype=ggn.dtype)
    before = objective.work.gradients
    blocks = kronecker_blocks(objective, theta, CONTROLS, samples=None)
    # the exact G backpropagates every column of the loss Hessian's root: μ and log σ² (2 + 2),
    # K × 6 pixels, K × 3 logits
    assert objective.work.gradients - before == 4 + samples * 9
    assert [b.name for b in blocks] == list(LINEAR_LAYERS)
    exact_layers = LINEAR_LAYERS if samples == 1 else LINEAR_LAYERS[:2]
    for block in blocks:
        index = torch.from_numpy(layer_index(objective, block.name))
        reference = ggn[index[:, None], index[None, :]]
        error = torch.linalg.matrix_norm(torch.kron(block.G, block.A) - reference) / torch.linalg.matrix_norm(reference)
        if block.name in exact_layers:
            assert error <= 1e-10, (block.name, float(error))
        elif block.name in ("decoder.0", "classifier.linear"):
            assert error > 1e-3, (block.name, float(error))  # K = 2 rows: an approximation


def test_encoder_blocks_receive_curvature_from_all_three_losses() -> None:
    objective = Objective(model(), small_labeled(1, 0), samples=1)
    theta = perturbed(objective)
    rate_only = kronecker_blocks(objective, theta, Controls(0.0, 0.0), samples=None)
    full = kronecker_blocks(objective, theta, CONTROLS, samples=None)
    for a, b in zip(rate_only[:2], full[:2]):
        assert torch.linalg.matrix_norm(a.G - b.G) > 1e-2 * torch.linalg.matrix_norm(b.G)
    assert float(rate_only[4].G.abs().max()) == 0.0  # the classifier at γ = 0


def test_monte_carlo_gauss_newton_is_unbiased() -> None:
    objective = Objective(model(), small_labeled(4, 0), samples=2)
    theta = perturbed(objective)
    exact = kronecker_blocks(objective, theta, CONTROLS, samples=None)
    before = objective.work.gradients
    estimate = kronecker_blocks(objective, theta, CONTROLS, samples=4000, column_block=1000)
    assert objective.work.gradients - before == 4000
    for e, m in zip(exact, estimate):
        torch.testing.assert_close(m.A, e.A, rtol=1e-13, atol=0)  # Ā does not depend on the samples
        error = torch.linalg.matrix_norm(m.G - e.G) / torch.linalg.matrix_norm(e.G)
        assert error < 0.1, (e.name, float(error))
    # a Monte-Carlo build is reproducible from its seed
    again = kronecker_blocks(objective, theta, CONTROLS, samples=3, seed=5)
    torch.testing.assert_close(again[0].G, kronecker_blocks(objective, theta, CONTROLS, samples=3, seed=5)[0].G,
                               rtol=0, atol=0)


# --- the preconditioner ------------------------------------------------------------------------------

@pytest.mark.parametrize("form", FORMS)
def test_apply_is_the_solve_with_the_dense_approximation(form: str) -> None:
    objective = Objective(model(), small_labeled(10, 0), samples=2, sigma=1e-2, chunk_size=3)
    theta = perturbed(objective)
    pre = build_kfac(objective, theta, CONTROLS, damping=1e-2, form=form)
    p = dense_kfac(objective, pre)
    np.testing.assert_allclose(pre.matrix().numpy(), p, rtol=1e-12, atol=1e-14)
    eigenvalues = np.linalg.eigvalsh(p)
    assert eigenvalues[0] > 0 and np.allclose(p, p.T, rtol=0, atol=1e-14)
    v = torch.randn(len(p), 3, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    want = np.linalg.solve(p, v.numpy())
    got = pre.apply(v).numpy()
    assert np.linalg.norm(got - want) / np.linalg.norm(want) <= 1e-8
    twice = pre.apply_inverse_sqrt(pre.apply_inverse_sqrt(v)).numpy()
    assert np.linalg.norm(twice - got) / np.linalg.norm(got) <= 1e-10
    root = pre.apply_inverse_sqrt(torch.eye(len(p), dtype=torch.float64)).numpy()
    np.testing.assert_allclose(root, root.T, rtol=0, atol=1e-12 * np.abs(root).max())
    assert np.linalg.eigvalsh(root)[0] > 0
    assert pre.memory_bytes > 0 and pre.smallest_eigenvalue is None


def test_preconditioned_cg_on_the_exact_hessian_at_equilibrium() -> None:
    objective = Objective(model(hidden=(4,)), small_labeled(20, 0), samples=2, sigma=1e-2)
    controls = Controls(1.0, 2.0)
    # the polish's whitened L-BFGS runs on this preconditioner's inverse square root
    linear_solve = LinearSolve(objective, LinearSolveConfig(preconditioner="kfac", preconditioner_sample=1.0))
    result = polish(linear_solve, objective.initial_theta(), controls, grad_tol=1e-9)
    assert result.converged
    theta = result.theta
    op = CurvatureOperator(objective, theta, controls)
    hessian = op.dense().numpy()
    g = torch.func.jacrev(objective.functionals)(theta)
    rhs = -torch.stack([g[1], g[2]], dim=1)
    exact = np.linalg.solve((hessian + hessian.T) / 2, rhs.numpy())
    plain = solve(op, rhs, method="cg", tol=1e-8)
    pre = build_kfac(objective, theta, controls)
    preconditioned = solve(op, rhs, method="cg", tol=1e-8, preconditioner=pre.apply)
    print(f"CG iterations: none {plain.iterations}, kfac {preconditioned.iterations}")
    assert plain.converged and preconditioned.converged
    error = np.linalg.norm(preconditioned.solution.numpy() - exact, axis=0) / np.linalg.norm(exact, axis=0)
    assert error.max() <= 1e-6, error
    assert preconditioned.iterations < plain.iterations


def test_mixture_factors_mix_the_parts() -> None:
    """Ā and G at t = 0.4 are 0.6·(t = 0) + 0.4·(t = 1) (each part's rows weighted by its mixture
    weight), and t = 0 is the source alone with the same noise."""
    mixture = DataMixture(small_labeled(12, 1, 0.0), small_labeled(10, 2, 0.5))
    m = model()
    objective = Objective(m, mixture, samples=2, sigma=1e-2)
    theta = perturbed(objective)
    ends = [kronecker_blocks(objective, theta, Controls(1.3, 0.7, t), samples=None) for t in (0.0, 1.0)]
    mixed = kronecker_blocks(objective, theta, Controls(1.3, 0.7, 0.4), samples=None)
    for s, t, mix in zip(*ends, mixed):
        torch.testing.assert_close(mix.A, 0.6 * s.A + 0.4 * t.A, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(mix.G, 0.6 * s.G + 0.4 * t.G, rtol=1e-12, atol=1e-14)
    source = kronecker_blocks(Objective(m, mixture.source, samples=2), theta, Controls(1.3, 0.7), samples=None)
    for a, b in zip(source, ends[0]):
        torch.testing.assert_close(a.G, b.G, rtol=1e-12, atol=0)
    pre = build_kfac(objective, theta, Controls(1.3, 0.7, 0.4))
    v = torch.randn(theta.numel(), 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    assert torch.isfinite(pre.apply(v)).all() and (pre.apply(v) * v).sum(0).gt(0).all()


def test_registry_and_bad_options() -> None:
    objective = Objective(model(), small_labeled(5, 0), samples=1)
    theta = perturbed(objective)
    pre = make_preconditioner("kfac", objective, theta, CONTROLS, damping=1e-2)
    assert isinstance(pre, KFACPreconditioner) and pre.name == "kfac"
    with pytest.raises(InputError, match="options of preconditioner 'kfac' must be among"):
        make_preconditioner("kfac", objective, theta, CONTROLS, dampening=1e-2)
    for options, match in [({"damping": -1.0}, "kfac damping must be"), ({"form": "diag"}, "kfac form must be one of"),
                           ({"samples": 0}, "kfac samples must be"), ({"column_block": 0}, "kfac column_block must")]:
        with pytest.raises(InputError, match=match):
            make_preconditioner("kfac", objective, theta, CONTROLS, **options)
    # σ = 0 and no damping: the classifier at γ = 0 has G = 0, a singular block
    with pytest.raises(InputError, match="positive definite"):
        build_kfac(objective, theta, Controls(1.0, 0.0), damping=0.0)
    # ... that the relative damping still makes positive definite (from the other layers' scale)
    assert torch.isfinite(build_kfac(objective, theta, Controls(1.0, 0.0)).apply(theta[:, None])).all()
    mog = Objective(model(prior="mog"), small_labeled(5, 0), samples=1)
    with pytest.raises(InputError, match="'kfac' must be used with the normal prior"):
        build_kfac(mog, mog.initial_theta(), CONTROLS)


def test_parameters_outside_linear_layers_get_a_scalar_block() -> None:
    """resnet18: the convolutions and GroupNorms get c I, the encoder head and the decoder's
    projection Kronecker blocks."""
    config = ModelConfig(architecture="resnet18", input_shape=(1, 16, 16), num_classes=3, latent_dim=2, width=2)
    m = build_model(config, seed=0).double()
    data = small_labeled(3, 0)
    x = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    objective = Objective(m, type(data)(x, data.y, 3, data.class_names), samples=1, sigma=1e-2)
    theta = objective.initial_theta()
    pre = build_kfac(objective, theta, CONTROLS)
    assert [b.name for b in pre.blocks] == ["encoder.head", "decoder.project", "classifier.linear"]
    assert 0 < pre.rest.numel() < theta.numel() and pre.rest_value > objective.sigma
    v = torch.randn(theta.numel(), 1, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    torch.testing.assert_close(pre.apply(v)[pre.rest], v[pre.rest] / pre.rest_value, rtol=1e-14, atol=0)
