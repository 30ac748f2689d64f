"""CurvatureOperator (Hessian and Gauss–Newton products, damping) against dense float64 references.

References are built here, independently of ``quasistatic.linalg.operators``:

- the Hessian A = ∇²θJ by ``torch.func.hessian`` of ``Objective.value`` on an objective evaluated in one
  chunk (the operator under test uses ``chunk_size`` < n, ragged last chunk);
- the Gauss–Newton matrix G = Σ_parts w_p / n_p · J_oᵀ H_o J_o from the Jacobian J_o of the flattened
  network outputs (``FixedNoiseFunctionals.outputs``, ``torch.func.jacrev``) and the Hessian H_o of the
  weighted loss in those outputs (``torch.func.hessian``);
- solves by ``numpy.linalg.solve`` of the dense damped matrix and ``scipy.sparse.linalg.cg``.

All cases are at a random (non-equilibrium) θ, where A is indefinite: A ≠ G there, which keeps the GGN
comparison from passing on a Hessian.
"""

from __future__ import annotations

import inspect

import numpy as np
import pytest
import scipy.sparse.linalg
import torch
from torch.func import hessian, jacrev

from quasistatic import Controls, DataMixture, InputError, LabeledData, ModelConfig, Objective, build_model
from quasistatic.linalg.operators import MODES, CurvatureOperator
from quasistatic.linalg.krylov import available_solvers, solve

CONTROLS = Controls(lam=1.5, gamma=0.7)
MIXED = Controls(lam=1.5, gamma=0.7, t=0.4)
CHUNK = 3  # smaller than every data set below, and dividing none of them
HVP_RTOL = 1e-8


def labeled(n: int, seed: int) -> LabeledData:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 2, 3, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (n,), generator=g)
    return LabeledData(x, y, 3, ("a", "b", "c"))


def model(prior: str = "normal"):
    config = ModelConfig(input_shape=(1, 2, 3), num_classes=3, latent_dim=2, hidden=(4,), prior=prior,
                         prior_components=2)
    return build_model(config, seed=0).double()


def data(kind: str) -> LabeledData | DataMixture:
    return labeled(10, 1) if kind == "plain" else DataMixture(labeled(10, 2), labeled(8, 3))


def controls(kind: str) -> Controls:
    return CONTROLS if kind == "plain" else MIXED


def objectives(kind: str, prior: str = "normal") -> tuple[Objective, Objective, torch.Tensor]:
    """(chunked objective for the operator, one-chunk objective for the reference, random θ).

    θ is the seeded initialization plus a perturbation, so that it is far from any equilibrium."""
    m = model(prior)
    chunked = Objective(m, data(kind), samples=2, chunk_size=CHUNK)
    whole = Objective(m, data(kind), samples=2)
    theta = chunked.initial_theta()
    g = torch.Generator().manual_seed(7)
    theta = theta + 0.5 * torch.randn(theta.shape, generator=g, dtype=theta.dtype)
    return chunked, whole, theta


def dense_reference_hessian(objective: Objective, theta: torch.Tensor, c: Controls) -> torch.Tensor:
    return hessian(lambda th: objective.value(th, c))(theta)


def random_block(n: int, k: int, seed: int = 11) -> torch.Tensor:
    return torch.randn(n, k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def relative_error(got: torch.Tensor, want: torch.Tensor) -> torch.Tensor:
    """Per-column ‖got − want‖ / ‖want‖ (columns of an (N, k) block; a vector is one column)."""
    got, want = got.reshape(want.shape[0], -1), want.reshape(want.shape[0], -1)
    return torch.linalg.vector_norm(got - want, dim=0) / torch.linalg.vector_norm(want, dim=0)


def dense_ggn(objective: Objective, theta: torch.Tensor, c: Controls) -> torch.Tensor:
    """G = Σ_parts w_p / n_p · J_oᵀ H_o J_o over all examples of each part at once (no chunks)."""
    weights = torch.tensor([1.0, c.lam, c.gamma], dtype=theta.dtype)
    part_weights = [1.0] if not objective.is_mixture else [1.0 - c.t, c.t]
    total = torch.zeros(theta.numel(), theta.numel(), dtype=theta.dtype)
    value = torch.zeros((), dtype=theta.dtype)
    for part, w in zip(objective.parts, part_weights):
        outs = part.outputs(theta)
        shapes, sizes = [o.shape for o in outs], [o.numel() for o in outs]
        n = len(part.data)

        def flat_outputs(th: torch.Tensor, part=part) -> torch.Tensor:
            return torch.cat([o.reshape(-1) for o in part.outputs(th)])

        def loss(flat: torch.Tensor, part=part, w=w, n=n) -> torch.Tensor:
            outputs = tuple(chunk.view(shape) for chunk, shape in zip(flat.split(sizes), shapes))
            return w / n * (part.losses(outputs).sum(-1) @ weights)

        o = flat_outputs(theta)
        jo = jacrev(flat_outputs)(theta)  # (M, N)
        ho = hessian(loss)(o)  # (M, M)
        total = total + jo.T @ ho @ jo
        value = value + loss(o)
    # the decomposition into outputs and losses is J itself
    assert torch.allclose(value, objective.value(theta, c), rtol=1e-13, atol=0)
    return total


# --- Hessian-vector products ---------------------------------------------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["plain", "mixture"])
def test_hvp_matches_dense_hessian(kind: str, mode: str) -> None:
    chunked, whole, theta = objectives(kind)
    c = controls(kind)
    a = dense_reference_hessian(whole, theta, c)
    assert torch.allclose(a, a.T, rtol=0, atol=1e-12 * a.abs().max())
    op = CurvatureOperator(chunked, theta, c, mode=mode)
    v = random_block(theta.numel(), 1)[:, 0]
    single = op(v)
    assert single.shape == v.shape
    assert relative_error(single, a @ v).max() <= HVP_RTOL
    block = random_block(theta.numel(), 3, seed=12)
    batched = op(block)
    assert batched.shape == block.shape
    errors = relative_error(batched, a @ block)
    assert errors.max() <= HVP_RTOL, errors
    # the batched columns are the single-vector products
    assert relative_error(batched[:, 0], op(block[:, 0])).max() <= 1e-12
    # and the whole matrix, column by column
    assert relative_error(op.dense(), a).max() <= HVP_RTOL


def test_mixture_hvp_is_the_mixture_of_the_parts() -> None:
    """At t = 0.4, A = 0.6·A_source + 0.4·A_target (eq. 23 is linear in t)."""
    chunked, _, theta = objectives("mixture")
    v = random_block(theta.numel(), 2)
    ends = [CurvatureOperator(chunked, theta, Controls(MIXED.lam, MIXED.gamma, t))(v) for t in (0.0, 1.0)]
    mixed = CurvatureOperator(chunked, theta, MIXED)(v)
    assert relative_error(mixed, 0.6 * ends[0] + 0.4 * ends[1]).max() <= 1e-12


# --- Gauss–Newton products -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["plain", "mixture"])
def test_ggn_matches_dense_gauss_newton(kind: str) -> None:
    chunked, whole, theta = objectives(kind)
    c = controls(kind)
    g = dense_ggn(whole, theta, c)
    # symmetric positive semi-definite, whatever θ
    assert torch.allclose(g, g.T, rtol=0, atol=1e-12 * g.abs().max())
    eigenvalues = torch.linalg.eigvalsh(g)
    assert eigenvalues[0] >= -1e-10 * eigenvalues[-1], eigenvalues[:3]
    # ... and not the Hessian: at this θ the Hessian is indefinite and differs from G
    a = dense_reference_hessian(whole, theta, c)
    assert torch.linalg.eigvalsh(a)[0] < -1e-3 * eigenvalues[-1]
    assert torch.linalg.matrix_norm(a - g) > 1e-2 * torch.linalg.matrix_norm(g)
    op = CurvatureOperator(chunked, theta, c, kind="ggn")
    v = random_block(theta.numel(), 1)[:, 0]
    assert relative_error(op(v), g @ v).max() <= HVP_RTOL
    block = random_block(theta.numel(), 3, seed=12)
    errors = relative_error(op(block), g @ block)
    assert errors.max() <= HVP_RTOL, errors
    assert relative_error(op.dense(), g).max() <= HVP_RTOL


def test_mixture_ggn_is_the_mixture_of_the_parts() -> None:
    """G(t = 0.4) = 0.6·G(0) + 0.4·G(1) to rounding: the part weights must be exact in float64 (they were
    once built from float32 tensors, an error of ~3e-8 relative)."""
    chunked, _, theta = objectives("mixture")
    v = random_block(theta.numel(), 2)
    ends = [CurvatureOperator(chunked, theta, Controls(MIXED.lam, MIXED.gamma, t), kind="ggn")(v)
            for t in (0.0, 1.0)]
    mixed = CurvatureOperator(chunked, theta, MIXED, kind="ggn")(v)
    assert relative_error(mixed, 0.6 * ends[0] + 0.4 * ends[1]).max() <= 1e-12


def test_ggn_with_mixture_prior_raises() -> None:
    chunked, _, theta = objectives("plain", prior="mog")
    with pytest.raises(InputError, match="curvature operator 'ggn' must be used with a prior"):
        CurvatureOperator(chunked, theta, CONTROLS, kind="ggn")
    # the Hessian operator works with it (a Monte-Carlo rate is still a smooth function of θ)
    v = random_block(theta.numel(), 2)
    a = hessian(lambda th: chunked.value(th, CONTROLS))(theta)
    assert relative_error(CurvatureOperator(chunked, theta, CONTROLS)(v), a @ v).max() <= HVP_RTOL


@pytest.mark.parametrize("kind, damping, match", [
    ("newton", 0.0, "curvature operator must be one of"),
    ("hessian", -1.0, "damping must be a number >= 0"),
    ("ggn", float("nan"), "damping must be a number >= 0"),
])
def test_bad_operator_arguments(kind: str, damping: float, match: str) -> None:
    chunked, _, theta = objectives("plain")
    with pytest.raises(InputError, match=match):
        CurvatureOperator(chunked, theta, CONTROLS, kind=kind, damping=damping)


# --- damping ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, data_kind", [("hessian", "plain"), ("hessian", "mixture"), ("ggn", "plain")])
def test_damping_adds_mu_times_identity(kind: str, data_kind: str) -> None:
    chunked, whole, theta = objectives(data_kind)
    c = controls(data_kind)
    mu = 0.37
    reference = dense_reference_hessian(whole, theta, c) if kind == "hessian" else dense_ggn(whole, theta, c)
    damped = CurvatureOperator(chunked, theta, c, kind=kind, damping=mu)
    eye = torch.eye(theta.numel(), dtype=theta.dtype)
    block = random_block(theta.numel(), 3)
    assert relative_error(damped(block), (reference + mu * eye) @ block).max() <= HVP_RTOL
    v = block[:, 0]
    assert relative_error(damped(v), (reference + mu * eye) @ v).max() <= HVP_RTOL
    undamped = CurvatureOperator(chunked, theta, c, kind=kind)
    assert relative_error(damped(block) - undamped(block), mu * block).max() <= 1e-10


# --- solves through the operator -------------------------------------------------------------------
# These run on the one-chunk objective of one data set (chunks and mixtures are covered above) to keep
# the file fast.

SOLVE_TOL = 1e-10


def damped_case() -> tuple[CurvatureOperator, np.ndarray]:
    """The damped Hessian operator at a random θ with μ = −λ_min + (λ_max − λ_min) / 10 (SPD, κ ≈ 11),
    and its dense matrix built from the reference Hessian."""
    _, whole, theta = objectives("plain")
    a = dense_reference_hessian(whole, theta, CONTROLS).numpy()
    eigenvalues = np.linalg.eigvalsh(a)
    assert eigenvalues[0] < 0  # indefinite: the damping is what makes it SPD
    mu = -eigenvalues[0] + (eigenvalues[-1] - eigenvalues[0]) / 10
    op = CurvatureOperator(whole, theta, CONTROLS, damping=mu)
    return op, a + mu * np.eye(a.shape[0])


@pytest.mark.parametrize("method", available_solvers())
def test_solvers_on_damped_operator_match_numpy(method: str) -> None:
    op, dense = damped_case()
    cond = np.linalg.cond(dense)
    b = np.random.default_rng(5).standard_normal((dense.shape[0], 3))
    result = solve(op, torch.from_numpy(b), method=method, tol=SOLVE_TOL)
    assert result.converged, result.summary()
    assert not result.negative_curvature.any(), result.summary()
    exact = np.linalg.solve(dense, b)
    error = np.linalg.norm(result.solution.numpy() - exact, axis=0) / np.linalg.norm(exact, axis=0)
    bound = cond * SOLVE_TOL + 1e-12
    assert (error <= bound).all(), f"{method}: relative errors {error} > κ·tol = {bound:.2e} ({result.summary()})"
    # the reported residual is the residual of the dense damped system
    residual = np.linalg.norm(b - dense @ result.solution.numpy(), axis=0) / np.linalg.norm(b, axis=0)
    np.testing.assert_allclose(result.relative_residual.numpy(), residual, rtol=1e-3, atol=1e-14)


def test_scipy_cg_on_the_operator_agrees_with_ours() -> None:
    op, dense = damped_case()
    n = dense.shape[0]
    cond = np.linalg.cond(dense)
    b = np.random.default_rng(6).standard_normal(n)
    linear_operator = scipy.sparse.linalg.LinearOperator(
        (n, n), matvec=lambda v: op(torch.from_numpy(np.ascontiguousarray(v).reshape(-1))).numpy(),
        dtype=np.float64)
    # scipy renamed cg's relative tolerance from tol to rtol in 1.12 (and removed tol in 1.14)
    rtol = "rtol" if "rtol" in inspect.signature(scipy.sparse.linalg.cg).parameters else "tol"
    reference, info = scipy.sparse.linalg.cg(linear_operator, b, maxiter=10 * n, atol=0.0, **{rtol: SOLVE_TOL})
    assert info == 0
    ours = solve(op, torch.from_numpy(b), method="cg", tol=SOLVE_TOL)
    assert ours.converged, ours.summary()
    difference = np.linalg.norm(ours.solution.numpy() - reference) / np.linalg.norm(reference)
    assert difference <= 2 * cond * SOLVE_TOL, difference
    exact = np.linalg.solve(dense, b)
    assert np.linalg.norm(reference - exact) / np.linalg.norm(exact) <= cond * SOLVE_TOL


def indefinite_case() -> tuple[CurvatureOperator, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The undamped Hessian operator at a random θ, with the reference matrix and its eigenpairs."""
    _, whole, theta = objectives("plain")
    a = dense_reference_hessian(whole, theta, CONTROLS)
    eigenvalues, vectors = torch.linalg.eigh(a)
    assert eigenvalues[0] < -1e-3 * eigenvalues[-1], eigenvalues[:3]  # indefinite at this θ
    return CurvatureOperator(whole, theta, CONTROLS), a, eigenvalues, vectors


def test_cg_reports_negative_curvature_on_indefinite_hessian() -> None:
    op, _, eigenvalues, vectors = indefinite_case()
    n = vectors.shape[0]
    # column 0 starts CG along the most negative eigenvector: p₀ᵀAp₀ = λ_min < 0 at once
    b = torch.cat([vectors[:, :1], random_block(n, 2)], dim=1)
    result = solve(op, b, method="cg", tol=SOLVE_TOL)
    assert result.negative_curvature[0], result.summary()
    assert not result.converged and result.relative_residual[0] > SOLVE_TOL
    # random right-hand sides on this indefinite operator meet it too, in some column
    random_only = solve(op, random_block(n, 4, seed=13), method="cg", tol=SOLVE_TOL)
    assert random_only.negative_curvature.any(), random_only.summary()
    assert not random_only.converged


@pytest.mark.filterwarnings("ignore:A is singular to working precision")
def test_minres_and_direct_report_negative_curvature() -> None:
    """MINRES steps through negative curvature; direct flags λ_min ≤ 0 for every column.

    With the default reference-class head the Hessian has no null space (a full softmax head would
    have latent_dim + 1 null directions); the right-hand sides are taken in its range anyway: an
    eigenvector of λ_min, and A x for a random x."""
    op, a, eigenvalues, vectors = indefinite_case()
    n = a.shape[0]
    null = eigenvalues.abs() <= 1e-12 * eigenvalues.abs().max()
    assert int(null.sum()) == 0
    keep = ~null
    pinv = (vectors[:, keep] / eigenvalues[keep]) @ vectors[:, keep].T
    b = torch.cat([vectors[:, :1], a @ random_block(n, 1)], dim=1)
    minimum_norm = pinv @ b
    effective_cond = float(eigenvalues[keep].abs().max() / eigenvalues[keep].abs().min())
    for method in ("minres", "direct"):
        if method not in available_solvers():
            continue
        # minres on column 0 alone: an eigenvector is solved in one step
        columns = [0] if method == "minres" else [0, 1]
        result = solve(op, b[:, columns], method=method, tol=SOLVE_TOL)
        assert result.negative_curvature.all(), (method, result.summary())
        assert result.converged, (method, result.summary())
        error = relative_error(result.solution, minimum_norm[:, columns])
        assert error.max() <= effective_cond * SOLVE_TOL + 1e-12, (method, error)


# --- work accounting -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind, mode", [("hessian", "reverse"), ("hessian", "forward"), ("ggn", "reverse")])
def test_work_counts_one_hvp_per_column(kind: str, mode: str) -> None:
    """k products count k HVPs; the pass an operator shares between its products counts one
    gradient: once per operator for the kept reverse-mode pullback, once per call otherwise."""
    chunked, _, theta = objectives("mixture")
    op = CurvatureOperator(chunked, theta, MIXED, kind=kind, damping=0.1, mode=mode)
    n = theta.numel()
    before = chunked.work.hvps
    op(random_block(n, 3))
    assert chunked.work.hvps == before + 3
    op(random_block(n, 1)[:, 0])
    assert chunked.work.hvps == before + 4
    op(random_block(n, 5))
    assert chunked.work.hvps == before + 9
    op.dense()
    assert chunked.work.hvps == before + 9 + n
    shared_passes = 1 if (kind, mode) == ("hessian", "reverse") else 4
    assert chunked.work.gradients == shared_passes and chunked.work.forwards == 0
