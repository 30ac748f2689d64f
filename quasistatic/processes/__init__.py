"""Quasi-static processes: the base class, the registry and the paper's processes."""

from . import builtin  # noqa: F401  (register the built-in processes)
from .base import (
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

__all__ = ["Process", "ConstraintProcess", "ResidualForm", "SingularConstraintError", "available_processes",
           "make_process", "register_process", "Free", "IsoClassification", "IsoClassificationRate",
           "IsoClassificationTransfer", "ConstantLambdaRate", "GeodesicTransfer"]
