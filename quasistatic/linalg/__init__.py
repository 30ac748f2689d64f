"""The linear algebra of the engine: curvature operators on θ (Hessian and Gauss–Newton products),
Krylov solvers, preconditioners, and the stateful :class:`LinearSolve` that every solve of a run
goes through. It knows the objective but nothing of processes or continuation."""

from . import deflation, kfac  # noqa: F401  (register the "deflation" and "kfac" preconditioners)
from .krylov import SOLVERS, SolveResult, available_solvers, register_solver, solve
from .linear_solve import LinearSolve, LinearSolveConfig, SolveStats
from .operators import OPERATORS, CurvatureOperator, dense_hessian
from .preconditioners import (
    PRECONDITIONERS,
    Preconditioner,
    available_preconditioners,
    make_preconditioner,
    register_preconditioner,
)

__all__ = [
    "CurvatureOperator",
    "LinearSolve",
    "LinearSolveConfig",
    "Preconditioner",
    "SolveResult",
    "SolveStats",
    "OPERATORS",
    "PRECONDITIONERS",
    "SOLVERS",
    "available_preconditioners",
    "available_solvers",
    "dense_hessian",
    "make_preconditioner",
    "register_preconditioner",
    "register_solver",
    "solve",
]
