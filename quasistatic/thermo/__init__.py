"""The thermodynamic model: J(θ; λ, γ, t) = R + λD + γC (eqs. 8, 14, 23) as a pure function of the
flat parameters θ, its functionals R, D, C, F in nats per example at fixed noise (eqs. 1, 4), the
sensitivities a process reads (eqs. 21, 27, 29, 30), and the per-step measurements of a run.

It builds on ``models`` and ``data`` and knows nothing of the linear algebra, the processes or the
continuation above it."""

from .evaluation import measure
from .functionals import FixedNoiseFunctionals, Functionals
from .objective import Controls, Objective
from .parameters import ParameterLayout
from .sensitivities import CONTROLS, FUNCTIONALS, Sensitivities

__all__ = [
    "Controls",
    "Objective",
    "Functionals",
    "FixedNoiseFunctionals",
    "ParameterLayout",
    "Sensitivities",
    "CONTROLS",
    "FUNCTIONALS",
    "measure",
]
