"""Quasi-static processes: the base class, the registry and the paper's processes."""

from ..registry import Parameter
from ..thermo.sensitivities import Sensitivities
from . import builtin  # noqa: F401  (register the built-in processes)
from .base import (
    PROCESSES,
    ConstraintProcess,
    Process,
    ResidualForm,
    SingularConstraintError,
    available_processes,
    make_process,
    register_process,
)
from .builtin import (
    ConstantLambdaRate,
    Free,
    GeodesicTransfer,
    IsoClassification,
    IsoClassificationRate,
    IsoClassificationTransfer,
)

__all__ = [
    "Process",
    "ConstraintProcess",
    "Parameter",
    "ResidualForm",
    "Sensitivities",
    "SingularConstraintError",
    "PROCESSES",
    "available_processes",
    "make_process",
    "register_process",
    "Free",
    "IsoClassification",
    "IsoClassificationRate",
    "IsoClassificationTransfer",
    "ConstantLambdaRate",
    "GeodesicTransfer",
]
