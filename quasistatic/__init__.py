"""quasistatic: quasi-static processes on the equilibrium surface of representation learning.

Implements Gao & Chaudhari, "A Free-Energy Principle for Representation Learning" (ICML 2020):
models trained on J(θ; λ, γ) = R + λD + γC, their equilibrium surface ∇θJ = 0, and processes that
move θ along it while the controls (λ, γ) and the data mixture t change.

Importing the package changes no global state of its host: no matplotlib backend, no torch thread
count or default dtype, no warning filters, no logging configuration. Its messages go to the
``logging`` loggers ``quasistatic.*`` (a ``NullHandler`` on ``quasistatic``); the command line
shows them on stderr.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

from .checkpoint import Checkpoint, load_checkpoint, save_checkpoint  # noqa: E402
from .data import (  # noqa: E402
    DataMixture,
    DataSplit,
    LabeledData,
    available_datasets,
    load_dataset,
    register_dataset,
)
from .equilibrate import EquilibrationConfig, equilibrate, equilibration_rate  # noqa: E402
from .errors import InputError  # noqa: E402
from .evaluation import measure  # noqa: E402
from .functionals import FixedNoiseFunctionals, Functionals  # noqa: E402
from .models import (ModelConfig, Networks, RepresentationModel, available_architectures, build_model,  # noqa: E402
                     register_architecture)
from .objective import Controls, Objective  # noqa: E402
from .parameters import ParameterLayout  # noqa: E402
from .linalg import LinearSolveConfig  # noqa: E402
from .linalg.operators import CurvatureOperator  # noqa: E402
from .linalg.krylov import available_solvers, register_solver, solve  # noqa: E402
from .tangents import Sensitivities, Tangents, equilibrium_tangents  # noqa: E402
from .integrators import Integrator, available_integrators, make_integrator, register_integrator  # noqa: E402
from .processes import ConstraintProcess, Process, available_processes, make_process, register_process  # noqa: E402
from .correctors import Corrector, available_correctors, make_corrector, register_corrector  # noqa: E402
from .engine import EngineConfig, EngineState, QuasiStaticEngine, first_law_residual  # noqa: E402
from .polish import polish  # noqa: E402
from .baselines import FiniteDifferenceEquilibration  # noqa: E402
from .transfer import (TransferData, TransferObjectives, make_transfer_process, plot_transfer,  # noqa: E402
                       train_baseline, transfer_data)
from .runner import DataConfig, FollowConfig, ProcessConfig, Run, RunConfig, StartConfig, run_process  # noqa: E402

__all__ = [
    "__version__",
    "ConstraintProcess",
    "Corrector",
    "CurvatureOperator",
    "EngineConfig",
    "EngineState",
    "FiniteDifferenceEquilibration",
    "Integrator",
    "LinearSolveConfig",
    "Process",
    "QuasiStaticEngine",
    "Sensitivities",
    "Tangents",
    "available_correctors",
    "available_integrators",
    "available_processes",
    "available_solvers",
    "equilibrium_tangents",
    "first_law_residual",
    "make_corrector",
    "make_integrator",
    "make_process",
    "polish",
    "register_corrector",
    "register_integrator",
    "register_process",
    "register_solver",
    "solve",
    "TransferData",
    "TransferObjectives",
    "make_transfer_process",
    "plot_transfer",
    "train_baseline",
    "transfer_data",
    "DataConfig",
    "FollowConfig",
    "ProcessConfig",
    "Run",
    "RunConfig",
    "StartConfig",
    "run_process",
    "Checkpoint",
    "Controls",
    "DataMixture",
    "DataSplit",
    "EquilibrationConfig",
    "FixedNoiseFunctionals",
    "Functionals",
    "InputError",
    "LabeledData",
    "ModelConfig",
    "Networks",
    "Objective",
    "ParameterLayout",
    "RepresentationModel",
    "available_architectures",
    "available_datasets",
    "build_model",
    "equilibrate",
    "equilibration_rate",
    "load_checkpoint",
    "load_dataset",
    "measure",
    "register_architecture",
    "register_dataset",
    "save_checkpoint",
]
