"""The stateful linear solve of a run: every solve with A = ∇²θJ (the tangents of eqs. 18 and 25,
the corrector's Newton systems, the polish) goes through one :class:`LinearSolve`, built once per
run from one :class:`LinearSolveConfig`.

It owns what lives across solves (PETSc's KSP and BifurcationKit's linear-solver object play the
same part):

- the preconditioner, built at one point and reused at the next ones (a chord method on the
  preconditioner: the solves stay exact Hessian solves, only their iteration count depends on how
  well P fits). After a build, the first solve sets the reference effort (Krylov iterations per
  decade of residual reduction); a later solve that needs more than ``stale_factor`` times that
  marks P stale, and it is rebuilt before the next solve, once the products spent beyond the
  reference effort since the build have cost as much as the build (rent or buy: a rebuild of
  ``cholesky`` on the (64, 64) model costs 18,338 GE, one of ``kfac`` a few, and a rebuild that
  the extra iterations cannot pay for is not worth its cost). A solve that does not converge with a
  stale P is retried once with a fresh one.
- warm starts: the last solution of each kind of solve ("tangent", "newton", …) starts the next
  one of the same kind (a column whose guess is worse than 0 starts from 0).
- the fallbacks: a CG solve that meets negative curvature (A indefinite: off the surface, or past
  a fold) is redone with MINRES and the same preconditioner; a truncated solve (the Newton
  corrector's) has none and is returned as it stopped.
- the subsamples: P is built on a fixed ``preconditioner_sample`` of the training examples (this
  changes no result, only the iteration count); ``hvp_sample`` < 1 makes the solves themselves use
  subsampled Hessian-vector products (an approximation: the corrector's gradients and the step
  acceptance stay on the full data).
- the bordered solves of pseudo-arclength continuation (:meth:`LinearSolve.solve_bordered`: the
  whole bordered matrix by GMRES, preconditioned through the same P).
- the statistics the trajectory records: builds, solves, Krylov iterations, unconverged solves.
- the smallest eigenpairs of A along the path (:meth:`LinearSolve.smallest_eigenpairs`, for fold
  detection and the count of negative eigenvalues past a fold): LOBPCG preconditioned by the kept
  P and started from the last point's eigenvector, so that a few products per point follow it, and
  from the directions of negative curvature the solves met (each a certificate that A is
  indefinite); :meth:`LinearSolve.probe` looks for such a direction where no solve has (the
  polish's check that it ended on a minimum).

Work is counted on the run's objective: a pass over a subsample costs its share of a full pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import Tensor

from ..errors import bad_value, choice_error
from ..thermo.objective import Controls, Objective
from ..work import WorkCounter
from .bordered import solve_bordered
from .deflation import RitzPairs, ritz_pairs
from .krylov import SOLVERS, SolveResult, solve
from .operators import MODES, OPERATORS, CurvatureOperator
from .preconditioners import (
    CHOLESKY_MAX_SIZE,
    DENSE_MAX_SIZE,
    PRECONDITIONERS,
    IdentityPreconditioner,
    Preconditioner,
    available_preconditioners,
    check_matrix_size,
    make_preconditioner,
)

__all__ = ["LinearSolveConfig", "LinearSolve", "SolveStats"]

NEGATIVE = "negative curvature"  # the warm-start key of the directions pᵀAp ≤ 0 the last solve met


@dataclass(frozen=True)
class LinearSolveConfig:
    """How every linear solve of a run is done."""

    operator: str = "hessian"  # "hessian" (exact A) or "ggn" (Gauss–Newton, an approximation)
    mode: str = "reverse"  # Hessian-vector products: "reverse" (cached pullback) or "forward"
    solver: str = "cg"  # a name from krylov.available_solvers()
    # a name from available_preconditioners(), or "auto": dense up to its size limit, else kfac
    preconditioner: str = "auto"
    preconditioner_options: dict[str, Any] = field(default_factory=dict)  # passed to its factory
    # fraction of training examples P is built on (no effect on results); None: 1 for cholesky (a subsample's
    # Hessian is indefinite, which its shift would have to cover), 0.25 for the others (set at construction)
    preconditioner_sample: float = None  # type: ignore[assignment]
    whitening: str = "auto"  # the preconditioner whose P^(-1/2) whitens the polish's L-BFGS, or "auto": kfac where
    # the solves use dense, cholesky or kfac (a few GE per build against n HVPs for dense), else the solves' own
    # rebuild P after a solve needing this × the effort after its build (2: too often), once the products spent
    # beyond that effort since the build have cost as much as the build
    stale_factor: float = 4.0
    hvp_sample: float = 1.0  # fraction of examples of the solves' HVPs: 1 is exact, < 1 is subsampled curvature
    max_iter: int | None = None  # Krylov iterations per solve (None: the solver's default, 10 n)
    seed: int = 0  # of the subsamples

    def __post_init__(self) -> None:
        OPERATORS.get(self.operator)  # an unknown name raises, listing the registered ones
        if self.mode not in MODES:
            raise choice_error("Hessian-vector product mode", MODES, self.mode)
        SOLVERS.get(self.solver)
        if self.preconditioner not in PRECONDITIONERS and self.preconditioner != "auto":
            raise choice_error("preconditioner", ["auto", *available_preconditioners()], self.preconditioner)
        whitenings = ["auto", *(name for name in available_preconditioners() if name != "cholesky")]
        if self.whitening not in whitenings:
            raise choice_error("whitening", whitenings, self.whitening)
        if self.preconditioner_sample is None:  # frozen: set once here, so config.json records the number
            object.__setattr__(self, "preconditioner_sample", 1.0 if self.preconditioner == "cholesky" else 0.25)
        for name in ("preconditioner_sample", "hvp_sample"):
            value = getattr(self, name)
            if not 0 < value <= 1:
                raise bad_value(name.replace("_", "-"), "a number in (0, 1]", value)
        if not self.stale_factor >= 1:
            raise bad_value("stale-factor", "a number >= 1", self.stale_factor)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def resolved(self, n: int) -> "LinearSolveConfig":
        """This config for a model of n parameters: "auto" becomes ``dense`` up to its size limit and
        ``kfac`` above it (``cholesky`` is not chosen by "auto": on the (64, 64) model its n-HVP build
        and the folds it uncovered did not yet make the path cheaper, see benchmarks/README.md); an
        explicit ``dense`` or ``cholesky`` above its limit is refused (before any work); the
        whitening's "auto" becomes ``kfac`` where the solves use dense, cholesky or kfac, else their
        own."""
        limits = {
            "dense": self.preconditioner_options.get("max_size", DENSE_MAX_SIZE),
            "cholesky": self.preconditioner_options.get("max_size", CHOLESKY_MAX_SIZE),
        }
        config = self
        if self.preconditioner == "auto":
            config = replace(self, preconditioner="dense" if n <= limits["dense"] else "kfac")
        if config.preconditioner in limits:
            check_matrix_size(n, limits[config.preconditioner], config.preconditioner)
        if config.whitening == "auto":
            exact = config.preconditioner in ("dense", "cholesky", "kfac")
            config = replace(config, whitening="kfac" if exact else config.preconditioner)
        elif config.whitening == "dense":  # built without the solves' options
            check_matrix_size(n, limits["dense"] if config.preconditioner == "dense" else DENSE_MAX_SIZE)
        return config

    @property
    def exact(self) -> bool:
        """Whether the solves are exact Hessian solves (the preconditioner never matters)."""
        return self.operator == "hessian" and self.hvp_sample == 1


@dataclass
class SolveStats:
    """Running totals over the solves of a run."""

    solves: int = 0
    iterations: int = 0  # Krylov iterations, the most of any column per solve, summed
    builds: int = 0  # preconditioner builds
    unconverged: int = 0  # solves returned without reaching their tolerance (after the retry)
    retries: int = 0  # solves repeated with a fresh preconditioner, with MINRES or from 0
    truncated: int = 0  # truncated solves (Newton steps) stopped by negative curvature or the iteration cap

    def snapshot(self) -> dict[str, int]:
        return asdict(self)


class LinearSolve:
    """Solves (A + μI) X = B at points (θ, controls) of one objective, keeping the preconditioner,
    the warm starts and the statistics between solves (see the module docstring)."""

    def __init__(self, objective: Objective, config: LinearSolveConfig = LinearSolveConfig()) -> None:
        self.objective, self.config = objective, config.resolved(objective.layout.numel)
        self._build_on = objective.subsample(self.config.preconditioner_sample, config.seed)
        self._products_on = objective.subsample(config.hvp_sample, config.seed + 1)
        self.preconditioner: Preconditioner | None = None
        self.stats = SolveStats()
        self._effort: float | None = None  # iterations per decade in the first solve after a build
        self._build_cost = 0.0  # GE of the last build
        self._excess = 0.0  # GE of products spent since the build beyond the reference effort
        self._stale = True
        self._warm: dict[str, Tensor] = {}
        self._built_at: tuple[Tensor, Controls] | None = None

    def operator(self, theta: Tensor, controls: Controls, damping: float = 0.0) -> CurvatureOperator:
        """A + μI at (θ, controls), on the HVP subsample when one is configured."""
        return CurvatureOperator(
            self._products_on, theta, controls, kind=self.config.operator, damping=damping, mode=self.config.mode
        )

    def rebuild(self, theta: Tensor, controls: Controls) -> Preconditioner:
        """Build the preconditioner at (θ, controls) and count its work."""
        before = self.objective.work.gradient_equivalents
        self.preconditioner = None  # its memory is free before the next one is built (n² floats for dense ones)
        self.preconditioner = make_preconditioner(
            self.config.preconditioner, self._build_on, theta, controls, **self.config.preconditioner_options
        )
        self._charge(self._build_on)
        self.stats.builds += 1
        self._build_cost = self.objective.work.gradient_equivalents - before
        self._effort, self._excess, self._stale, self._built_at = None, 0.0, False, (theta.detach(), controls)
        return self.preconditioner

    def whitening(self, theta: Tensor, controls: Controls) -> Preconditioner:
        """The ``whitening`` preconditioner built at (θ, controls) for the polish (its work counted,
        the solves' kept P untouched); the solves' own P when the two are the same kind."""
        if self.config.whitening == self.config.preconditioner:
            return self.rebuild(theta, controls)
        built = make_preconditioner(self.config.whitening, self._build_on, theta, controls)
        self._charge(self._build_on)
        self.stats.builds += 1
        return built

    def current(self, theta: Tensor, controls: Controls) -> Preconditioner:
        """The preconditioner to use at (θ, controls): the kept one, or a new one when there is
        none yet or it was marked stale."""
        if self.preconditioner is None or self._stale:
            return self.rebuild(theta, controls)
        return self.preconditioner

    def smallest_eigenpairs(
        self, theta: Tensor, controls: Controls, *, count: int = 1, iterations: int = 8, tol: float = 1e-6
    ) -> RitzPairs:
        """The ``count`` (at most n) algebraically smallest eigenpairs of the exact A = ∇²θJ at (θ, controls)
        (full data, Hessian whatever the solves' ``operator``): at most ``iterations`` of LOBPCG,
        preconditioned by the kept P and started from the last call's eigenvectors (its ``count``
        smallest) beside the columns of the last "tangent" solve (missing columns drawn at random),
        to residual ``tol``; a call without kept eigenvectors gets 10 × ``iterations`` (on the
        digits default: 0.030 after 8 cold iterations, 8.1e-4 after 80, then ±1e-6 per 8 warm
        ones). The tangent columns A⁻¹b weight A's eigenvalues of smallest magnitude — near a fold,
        the one turning negative — while the tracked eigenvector, warm-started, keeps following its
        own eigenvalue (on the README main job at λ 1.2 it read 1.84e-3 where the dense λ_min is
        1.24e-3; with the tangent columns 1.34e-3). The directions of negative curvature that CG
        met in the last solve to meet any (since the last call) join the block: each bounds λ_min
        at its point by its Rayleigh quotient, so a point where the solves met one is not reported
        positive definite (on the (64, 64) model, 8 and 80 iterations without them read +1.4e-4 and
        +2.3e-4 where λ_min is −2.0e-4 and the Newton solves met directions of Rayleigh quotient
        −1.0e-4). The block is max(``count``, kept + met + tangent columns) wide (as many products
        per iteration); the ``count`` smallest pairs are returned and kept (``converged``,
        ``iterations`` and ``products`` describe the whole block). The values are Rayleigh–Ritz
        values, upper bounds of the smallest eigenvalues. The products are counted on the objective."""
        operator = CurvatureOperator(self.objective, theta, controls, mode=self.config.mode)
        preconditioner = self.current(theta, controls)
        n = theta.numel()
        count = min(count, n)
        tracked = self._warm.get("eigenvector")
        tracked = tracked[:, :count] if tracked is not None and tracked.shape[0] == n else None
        met = self._warm.pop(NEGATIVE, None)  # used once: it belongs to the points of the solves that met it
        columns = [c for c in (tracked, met, self._warm.get("tangent")) if c is not None and c.shape[0] == n]
        start = torch.cat(columns, dim=1)[:, :n] if columns else None
        pairs = ritz_pairs(
            operator,
            n,
            count if start is None else max(count, start.shape[1]),
            start=start,
            tol=tol,
            iterations=iterations if tracked is not None else 10 * iterations,
            seed=self.config.seed,
            dtype=theta.dtype,
            device=theta.device,
            preconditioner=_applied(preconditioner),
        )
        pairs = replace(
            pairs,
            values=pairs.values[:count],
            vectors=pairs.vectors[:, :count],
            residual_norms=pairs.residual_norms[:count],
        )
        self._warm["eigenvector"] = pairs.vectors
        return pairs

    def probe(self, theta: Tensor, controls: Controls, *, iterations: int, columns: int = 1) -> SolveResult:
        """Look for negative curvature of the exact A = ∇²θJ at (θ, controls): preconditioned CG on
        A X = B for ``columns`` seeded random columns B, each stopped at the first pᵀAp ≤ 0, at
        relative residual 1e-4, or after ``iterations``. A direction met is a certificate that A
        is indefinite (its Rayleigh quotient bounds λ_min from above) and is kept for the next
        :meth:`smallest_eigenpairs`; none met is evidence, not proof, of a minimum. Measured with
        K-FAC on the (64, 64) model at a point where λ_min = −2.0e-4 (and 80 LOBPCG iterations read
        +2.3e-4): each of 6 random columns met negative curvature within 130 iterations, before
        its residual fell below 1e-4; with the dense P on the digits default at a minimum the probe
        stops at 1e-4 after 81 iterations (143 to 1e-8). Counted as one solve."""
        generator = torch.Generator().manual_seed(self.config.seed)
        rhs = torch.randn(theta.numel(), columns, generator=generator, dtype=theta.dtype).to(theta.device)
        preconditioner = self.current(theta, controls)
        result = solve(
            CurvatureOperator(self.objective, theta, controls, mode=self.config.mode),
            rhs,
            method="cg",
            tol=1e-4,
            max_iter=iterations,
            x0=None,
            preconditioner=_applied(preconditioner),
        )
        self._count(result)
        return result

    def mark_stale(self) -> None:
        """Rebuild before the next solve (a caller that saw P stop fitting, e.g. a Newton
        iteration that contracted badly)."""
        self._stale = True

    def remember(self, kind: str, solution: Tensor) -> None:
        """Warm-start the next solve of ``kind`` from ``solution``."""
        self._warm[kind] = solution

    def forget(self, *kinds: str) -> None:
        """Drop the warm starts of ``kinds`` (after a jump to another branch of the surface the last
        solutions belong to the branch left behind: a tangent warm-started from them and solved to
        1e-2 kept their component along the soft mode, and the corrector built on it stalled)."""
        for kind in kinds:
            self._warm.pop(kind, None)

    def last(self, kind: str) -> Tensor | None:
        """The kept warm start of ``kind`` (the last converged solve's solution, or for
        "eigenvector" the last smallest eigenvector, converged or not), or None."""
        return self._warm.get(kind)

    def checkpoint(self) -> dict[str, Any]:
        """What a resumed run needs to continue with the same solves: the point the preconditioner
        was built at (it is rebuilt there, not saved: 2n² floats for ``dense``), its reference
        effort, the warm starts and the statistics."""
        return {
            "built_at": self._built_at,
            "effort": self._effort,
            "excess": self._excess,
            "stale": self._stale,
            "warm": dict(self._warm),
            "stats": self.stats.snapshot(),
        }

    def restore(self, saved: dict[str, Any]) -> None:
        """Continue from :meth:`checkpoint`; the rebuild of the preconditioner is counted as work."""
        if saved["built_at"] is not None:
            self.rebuild(*saved["built_at"])
        self._effort, self._stale, self._warm = saved["effort"], saved["stale"], dict(saved["warm"])
        self._excess = saved.get("excess", 0.0)  # absent from the state of older runs
        self.stats = SolveStats(**{**saved["stats"], "builds": saved["stats"]["builds"] + self.stats.builds})

    def solve_bordered(
        self,
        theta: Tensor,
        controls: Controls,
        columns: Tensor,
        rows: Tensor,
        corner: Tensor,
        rhs: Tensor,
        *,
        tol: float,
        kind: str,
    ) -> SolveResult:
        """x with ‖r − M x‖ ≤ tol ‖r‖ for the bordered M = [[A, U], [Vᵀ, W]] at (θ, controls)
        (:func:`~quasistatic.linalg.bordered.solve_bordered`: GMRES on M whole, preconditioned
        through the kept P), warm-started from the last solve of ``kind``; retried once with a
        fresh P when it does not converge with a kept one; an unconverged result is counted in
        ``stats.unconverged`` and returned for the caller to judge."""
        fresh = self.preconditioner is None or self._stale
        for attempt in range(2):
            preconditioner, x0 = self._inputs(theta, controls, rhs, kind, warm=True)
            result = solve_bordered(
                self.operator(theta, controls),
                columns,
                rows,
                corner,
                rhs,
                tol=tol,
                max_iter=self.config.max_iter,
                x0=x0,
                preconditioner=preconditioner,
            )
            self._account(result, kind)
            if result.converged or fresh or attempt or self.config.preconditioner == "none":
                break
            self.stats.retries += 1
            self.rebuild(theta, controls)
        self.stats.unconverged += not result.converged
        return result

    def solve(
        self,
        theta: Tensor,
        controls: Controls,
        rhs: Tensor,
        *,
        tol: float,
        kind: str,
        damping: float = 0.0,
        warm: bool = True,
        truncate: bool = False,
    ) -> SolveResult:
        """X with ‖B − (A + μI)X‖ ≤ tol ‖B‖ per column, warm-started from the last solve of this
        ``kind`` (when ``warm``). Retried once with a fresh preconditioner when it does not
        converge with a kept one, and once from 0 when it was warm-started; a CG solve that meets
        negative curvature is redone with MINRES. With ``truncate`` none of that: the solve stops
        at negative curvature or at the config's ``max_iter`` and returns what it reached, for a
        caller that uses an inexact solution and answers indefiniteness itself (the Newton
        corrector: its line search judges the truncated step, its damping answers negative
        curvature; near a fold of the (64, 64) model a MINRES fallback ran 10⁵ iterations for a
        step the corrector then discarded); it is counted in ``stats.truncated``. Otherwise an
        unconverged result is returned with ``converged`` False and counted in
        ``stats.unconverged`` (the caller decides: retry the step or report)."""
        fresh = self.preconditioner is None or self._stale
        result = self._run(theta, controls, rhs, tol, kind, damping, warm, self.config.solver)
        if truncate:
            self.stats.truncated += not result.converged
            return result
        if not result.converged and bool(result.negative_curvature.any()) and self.config.solver == "cg":
            # A is indefinite here (off the surface, or past a fold): CG's step is undefined, MINRES's is not
            self.stats.retries += 1
            result = self._run(theta, controls, rhs, tol, kind, damping, warm, "minres")
        elif not result.converged and not fresh and self.config.preconditioner != "none":
            self.stats.retries += 1
            self.rebuild(theta, controls)
            result = self._run(theta, controls, rhs, tol, kind, damping, warm, self.config.solver)
        if not result.converged and warm and kind in self._warm:
            # once more from 0: on digits a warm-started tangent solve stopped at 1.17e-2 against 1e-2 (its
            # recurrence residual met the tolerance, the exact one did not, and a restart did not reduce it)
            self.stats.retries += 1
            result = self._run(theta, controls, rhs, tol, kind, damping, False, self.config.solver)
        self.stats.unconverged += not result.converged
        return result

    def _run(
        self,
        theta: Tensor,
        controls: Controls,
        rhs: Tensor,
        tol: float,
        kind: str,
        damping: float,
        warm: bool,
        method: str,
    ) -> SolveResult:
        preconditioner, x0 = self._inputs(theta, controls, rhs, kind, warm)
        before = self.objective.work.gradient_equivalents
        result = solve(
            self.operator(theta, controls, damping),
            rhs,
            method=method,
            tol=tol,
            max_iter=self.config.max_iter,
            x0=x0,
            preconditioner=preconditioner,
        )
        self._account(result, kind)
        if result.converged:
            self._judge(result, self.objective.work.gradient_equivalents - before)
        return result

    def _inputs(
        self, theta: Tensor, controls: Controls, rhs: Tensor, kind: str, warm: bool
    ) -> tuple[Callable[[Tensor], Tensor] | None, Tensor | None]:
        """The kept P's application (None for the identity) and the warm start of ``kind`` (None
        when not ``warm`` or of another shape) for a solve with ``rhs``."""
        preconditioner = self.current(theta, controls)
        x0 = self._warm.get(kind) if warm else None
        return (
            _applied(preconditioner),
            x0 if x0 is not None and x0.shape == rhs.shape else None,
        )

    def _account(self, result: SolveResult, kind: str) -> None:
        """Count a solve's work and statistics; keep a converged solution as the next warm start,
        and the directions of negative curvature it met for :meth:`smallest_eigenpairs`."""
        self._charge(self._products_on)
        self._count(result)
        if result.converged:
            self._warm[kind] = result.solution

    def _count(self, result: SolveResult) -> None:
        """Count a solve in the statistics and keep the directions of negative curvature it met,
        for :meth:`smallest_eigenpairs`."""
        self.stats.solves += 1
        self.stats.iterations += result.iterations
        if result.negative_directions is not None and bool(result.negative_curvature.any()):
            self._warm[NEGATIVE] = result.negative_directions[:, result.negative_curvature]

    def _judge(self, result: SolveResult, spent: float) -> None:
        """Compare this solve's effort (iterations per decade of residual) with the first one
        after the build; count the share of its ``spent`` GE beyond that reference effort as
        excess; mark the preconditioner stale when the effort grew by ``stale_factor`` and the
        excess since the build has cost as much as the build."""
        if result.iterations == 0:
            return
        achieved = float(result.relative_residual.max())
        decades = max(1.0, -math.log10(max(achieved, 1e-300)))
        effort = result.iterations / decades
        if self._effort is None:
            self._effort = effort
            return
        self._excess += spent * max(0.0, 1.0 - self._effort * decades / result.iterations)
        if effort > self.config.stale_factor * self._effort and self._excess >= self._build_cost:
            self._stale = True

    def _charge(self, sub: Objective) -> None:
        """Move a subsample's work onto the run's objective, at its share of a full pass."""
        if sub is self.objective:
            return
        self.objective.work.add(sub.work, sub.examples / self.objective.examples)
        sub.work = WorkCounter()


def _applied(preconditioner: Preconditioner) -> Callable[[Tensor], Tensor] | None:
    """V ↦ P⁻¹V for a Krylov solver, None for the identity (the solvers skip it then)."""
    return None if isinstance(preconditioner, IdentityPreconditioner) else preconditioner.apply
