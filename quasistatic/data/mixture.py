"""The data mixture of eq. 23, p(x, t) = (1 − t) p_s(x) + t p_t(x).

The mixture is not a sampler: an expectation under p(x, t) of any per-example loss is the exact
weighted average (1 − t)·E_s + t·E_t of the two empirical expectations, so that losses built on it
can be differentiated in t (eqs. 25 and 27 need ∂_t of them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import overload

from torch import Tensor

from ..errors import bad_value
from .base import LabeledData

__all__ = ["DataMixture", "mixture_weights"]


def mixture_weights(t: float | Tensor) -> tuple[float | Tensor, float | Tensor]:
    """The weights (1 − t, t) of source and target in eq. 23; t must lie in [0, 1]."""
    if not isinstance(t, Tensor) and not 0.0 <= float(t) <= 1.0:
        raise bad_value("mixture time t", "in [0, 1]", t)
    return 1 - t, t


@dataclass(frozen=True)
class DataMixture:
    """A source and a target data set mixed by the time t ∈ [0, 1] (eq. 23).

    Labels are kept as they are (the paper does not interpolate them); both sets must share one
    label space (the same ``num_classes``).
    """

    source: LabeledData
    target: LabeledData

    def __post_init__(self) -> None:
        if self.source.num_classes != self.target.num_classes:
            raise bad_value(
                "target num_classes", f"equal to the source's ({self.source.num_classes})", self.target.num_classes
            )
        if self.source.input_shape != self.target.input_shape:
            raise bad_value(
                "target input shape", f"equal to the source's {self.source.input_shape}", self.target.input_shape
            )

    @overload
    def mix(self, source_value: Tensor, target_value: Tensor, t: float | Tensor) -> Tensor: ...
    @overload
    def mix(self, source_value: float, target_value: float, t: float) -> float: ...

    def mix(self, source_value: Tensor | float, target_value: Tensor | float, t: float | Tensor) -> Tensor | float:
        """(1 − t)·source_value + t·target_value: an expectation under p(x, t) (eq. 23)."""
        w_source, w_target = mixture_weights(t)
        return w_source * source_value + w_target * target_value
