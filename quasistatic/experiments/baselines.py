"""The paper's own procedure, ``fd-equilibration`` (Sec. 5.1, Remark 7), as a baseline.

Each step estimates the sensitivities X_s (s ∈ {λ, γ, t}) by forward finite differences of
equilibrated models — the model at the current controls and one copy per control re-equilibrated
at s + h with the η(s) schedule — turns them into control rates with the *same* process definition
as the engine, moves the controls by one Euler step, and equilibrates at the new controls. It uses
the engine's state, step reports and work accounting, so the two compare on identical terms.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from ..continuation.correctors import EquilibrateCorrector
from ..continuation.engine import EngineState, StepReport
from ..errors import bad_value
from ..linalg import LinearSolve, LinearSolveConfig
from ..thermo.objective import Controls, Objective
from ..processes import Process
from ..continuation.tangents import CONTROLS, Sensitivities

__all__ = ["FiniteDifferenceEquilibration"]


class FiniteDifferenceEquilibration:
    """``steps`` Euler steps over s ∈ [0, 1]; finite-difference step ``fd_step`` in each control;
    ``epochs`` of equilibration (η(s) schedule) after every change of the controls."""

    def __init__(
        self,
        objective: Objective,
        process: Process,
        steps: int = 10,
        fd_step: float = 1e-2,
        epochs: int = 10,
        batch_size: int = 32,
        seed: int = 0,
    ) -> None:
        if steps < 1:
            raise bad_value("steps", "an integer >= 1", steps)
        if not fd_step > 0:
            raise bad_value("finite-difference step", "a number > 0", fd_step)
        self.objective, self.process, self.steps, self.fd_step = objective, process, steps, fd_step
        self.relax = EquilibrateCorrector(epochs=epochs, batch_size=batch_size, seed=seed)
        self.linear_solve = LinearSolve(objective, LinearSolveConfig(preconditioner="none"))  # carries the objective

    def _values(self, theta: torch.Tensor, controls: Controls) -> torch.Tensor:
        """(R, D, C, F) at θ under p(x, t); F = R + λD + γC + σS."""
        f = self.objective.report(theta, controls.t)
        return torch.tensor([f.R, f.D, f.C, f.free_energy(controls.lam, controls.gamma)], dtype=theta.dtype)

    def sensitivities(self, theta: torch.Tensor, controls: Controls, base: torch.Tensor) -> Sensitivities:
        """(4, 3) forward differences of (R, D, C, F) in λ, γ and (for a mixture) t, each from a
        copy of θ re-equilibrated at the shifted controls."""
        matrix = torch.zeros(4, 3, dtype=base.dtype)
        for column, name in enumerate(CONTROLS):
            if name == "t" and not self.process.uses_mixture:
                continue
            h = self.fd_step if name != "t" or controls.t + self.fd_step <= 1 else -self.fd_step
            shifted = replace(controls, **{name: getattr(controls, name) + h})
            relaxed = self.relax.correct(self.linear_solve, theta, shifted, self.process, None).theta
            matrix[:, column] = (self._values(relaxed, shifted) - base) / h
        return Sensitivities(matrix, base[:3])

    def run(self, state: EngineState, on_step: Callable[[StepReport], None] | None = None) -> EngineState:
        """From ``state`` (on the surface) to s = 1 in ``steps`` Euler steps of the controls, each
        followed by an equilibration; resumable from any reported state like the engine."""
        h = 1.0 / self.steps
        while state.s < 1.0 - 1e-12:
            c = state.controls
            sensitivities = self.sensitivities(state.theta, c, self._values(state.theta, c))
            lam_dot, gamma_dot, t_dot = self.process.control_velocity(state.s, c, sensitivities)
            controls = Controls(c.lam + h * lam_dot, c.gamma + h * gamma_dot, min(max(c.t + h * t_dot, 0.0), 1.0))
            correction = self.relax.correct(self.linear_solve, state.theta, controls, self.process, None)
            state = EngineState(
                correction.theta, controls, s=state.s + h, step=state.step + 1, h=h, target=state.target
            )
            if on_step is not None:
                on_step(StepReport(state, correction, 0))
        return state
