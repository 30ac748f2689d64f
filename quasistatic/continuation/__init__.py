"""Continuation along the equilibrium surface: the engine loop (predictor, corrector, recording),
step control, the correctors, the polish onto the surface, the equilibrium tangents (eqs. 17–18,
24–25), fold detection and the jump past a fold, pseudo-arclength through folds, and the paper's
Adam equilibration (Sec. 5.1), which the ``equilibrate`` corrector runs.

It drives a process (``processes``) with an integrator (``integrators``) and solves through the
run's ``linalg.LinearSolve``; it knows nothing of run directories, figures or the command line."""

from .arclength import PseudoArclength
from .correctors import (
    CORRECTORS,
    Correction,
    Corrector,
    EquilibrateCorrector,
    NewtonCorrector,
    NoCorrector,
    available_correctors,
    make_corrector,
    register_corrector,
)
from .engine import (
    ControlDomainError,
    EngineConfig,
    EngineState,
    NegativeControlsError,
    QuasiStaticEngine,
    StepReport,
    first_law_residual,
)
from .equilibrate import DivergenceError, EquilibrationConfig, equilibrate, equilibration_rate
from .folds import Fold, FoldError, Jump
from .polish import NotOnSurfaceError, PolishResult, polish, require_equilibrium
from .step_control import StepControl, StepSizeError
from .tangents import Tangents, equilibrium_tangents

__all__ = [
    "QuasiStaticEngine",
    "EngineConfig",
    "EngineState",
    "StepReport",
    "first_law_residual",
    "StepControl",
    "Corrector",
    "Correction",
    "NoCorrector",
    "NewtonCorrector",
    "EquilibrateCorrector",
    "CORRECTORS",
    "available_correctors",
    "make_corrector",
    "register_corrector",
    "polish",
    "require_equilibrium",
    "PolishResult",
    "Tangents",
    "equilibrium_tangents",
    "Fold",
    "Jump",
    "PseudoArclength",
    "EquilibrationConfig",
    "equilibrate",
    "equilibration_rate",
    "ControlDomainError",
    "DivergenceError",
    "FoldError",
    "NegativeControlsError",
    "NotOnSurfaceError",
    "StepSizeError",
]
