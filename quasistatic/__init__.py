"""quasistatic: quasi-static processes on the equilibrium surface of representation learning.

Implements Gao & Chaudhari, "A Free-Energy Principle for Representation Learning" (ICML 2020):
models trained on J(θ; λ, γ) = R + λD + γC, their equilibrium surface ∇θJ = 0, and processes that
move θ along it while the controls (λ, γ) and the data mixture t change.

Importing the package changes no global state of its host: no matplotlib backend, no torch thread
count or default dtype, no warning filters, no logging configuration. Its messages go to the
``logging`` loggers ``quasistatic.*`` (a ``NullHandler`` on ``quasistatic``); the command line
shows them on stderr.

Layout. The folders are the layers, top to bottom; a module imports only from its own folder and
the layers below it (tests/test_layout.py checks this):

    __main__.py                   python -m quasistatic (and torchrun -m quasistatic): the command line
    cli/                          the command line: parse the flags, build the objects, run them
    experiments/                  runs and their outputs: run directories, checkpoints, trajectory
                                  recording and the paper's figures (``reproduce``), the
                                  fd-equilibration baseline, transfer (Sec. 4), plots
    continuation/                 following the equilibrium surface: the engine loop, step control,
                                  correctors, polish, tangents (eqs. 17–18, 24–25), folds,
                                  pseudo-arclength, and the paper's Adam equilibration (Sec. 5.1)
    processes/ linalg/ integrators/
                                  side by side, none imports another: the processes' rates
                                  (eqs. 20–22, 26–32); curvature operators, Krylov solvers,
                                  preconditioners, the run's LinearSolve; ODE steps
    thermo/                       J = R + λD + γC as a pure function of θ (eqs. 8, 14, 23), the
                                  functionals R, D, C, F, θ's layout, the sensitivities a process
                                  reads (eqs. 21, 27, 29, 30), the per-step measurements
    models/ data/                 architectures e, m, d, c; data sets, label subsets, the mixture (eq. 23)
    registry.py work.py distributed.py
                                  one registry mechanism (on errors), work accounting, data
                                  parallelism over torch.distributed (shards, all-reduces)
    errors.py                     one error template

The thermodynamic quantities have a folder of their own, ``thermo/``, because they are built on
``models`` and ``data``, while ``errors``, ``registry`` and ``work`` stay at the root because every
layer uses them, ``data`` and ``models`` included: in one folder with the objective they would make
two layers import each other. ``work`` counts computational work in gradient-equivalents, not the
paper's thermodynamic work. The public names below are re-exported from these modules; each folder's
``__init__`` re-exports its own.
"""

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())

from .experiments.checkpoint import Checkpoint, load_checkpoint, save_checkpoint
from .data import (
    DataMixture,
    DataSplit,
    LabeledData,
    available_datasets,
    load_dataset,
    register_dataset,
)
from .continuation.equilibrate import EquilibrationConfig, equilibrate, equilibration_rate
from .errors import InputError
from .distributed import ShardGroup
from .thermo.evaluation import measure
from .thermo.functionals import FixedNoiseFunctionals, Functionals
from .models import (
    ModelConfig,
    Networks,
    RepresentationModel,
    available_architectures,
    build_model,
    register_architecture,
)
from .thermo.objective import Controls, Objective
from .thermo.parameters import ParameterLayout
from .linalg import LinearSolveConfig
from .linalg.operators import CurvatureOperator
from .linalg.krylov import available_solvers, register_solver, solve
from .continuation.tangents import Sensitivities, Tangents, equilibrium_tangents
from .integrators import Integrator, available_integrators, make_integrator, register_integrator
from .processes import ConstraintProcess, Process, available_processes, make_process, register_process
from .continuation.correctors import Corrector, available_correctors, make_corrector, register_corrector
from .continuation.engine import EngineConfig, EngineState, QuasiStaticEngine, first_law_residual
from .continuation.polish import polish
from .experiments.baselines import FiniteDifferenceEquilibration
from .experiments.transfer import (
    TransferData,
    TransferObjectives,
    make_transfer_process,
    plot_transfer,
    train_baseline,
    transfer_data,
)
from .experiments.runner import (
    DataConfig,
    FollowConfig,
    ProcessConfig,
    Run,
    RunConfig,
    RunSettings,
    StartConfig,
    run_process,
)
from .experiments.transfer_run import TransferConfig, TransferRun, run_transfer

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
    "TransferConfig",
    "TransferRun",
    "run_transfer",
    "DataConfig",
    "FollowConfig",
    "ProcessConfig",
    "Run",
    "RunConfig",
    "RunSettings",
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
    "ShardGroup",
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
