"""Work accounting in gradient-equivalents, so that runs compare on identical work.

Conventions (per data-set pass, per vector): a forward evaluation of J costs 1/3 of a gradient
(reverse mode costs about two forwards on top of the forward), a full gradient costs 1, and a
Hessian-vector product costs 1 on top of the gradient-sized pass its operator shares between
products (``CurvatureOperator`` counts that pass as a gradient). The measured ratios on our models
are in ``benchmarks/README.md``. A minibatch step counts the fraction batch/n of a pass.

A data-parallel objective (:mod:`quasistatic.distributed`) also counts its all-reduces: one per
reduced product (a gradient, a block of Hessian-vector products, a value). They are not work in
gradient-equivalents (every rank does 1/ranks of each pass), and a subsample's are counted whole.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass

__all__ = ["WorkCounter", "FORWARD_COST", "HVP_COST"]

FORWARD_COST = 1 / 3  # a forward pass, in gradients
HVP_COST = 1.0  # a Hessian-vector product, in gradients (the operator's shared pass counted apart)


@dataclass
class WorkCounter:
    """Running totals of forwards, gradients and Hessian-vector products (in data-set passes), and
    of the all-reduces of a data-parallel objective."""

    forwards: float = 0.0
    gradients: float = 0.0
    hvps: float = 0.0
    all_reduces: int = 0

    @property
    def gradient_equivalents(self) -> float:
        return FORWARD_COST * self.forwards + self.gradients + HVP_COST * self.hvps

    def snapshot(self) -> dict[str, float]:
        return {**asdict(self), "grad_evals": self.gradient_equivalents}

    def restore(self, saved: dict[str, float]) -> None:
        """Continue counting from a snapshot (resumed runs)."""
        self.forwards, self.gradients, self.hvps = saved["forwards"], saved["gradients"], saved["hvps"]
        self.all_reduces = int(saved.get("all_reduces", 0))  # absent from the state of older runs

    def add(self, other: "WorkCounter", scale: float = 1.0) -> None:
        """Count ``other``'s work, scaled (a subsample's passes cost ``scale`` of a full pass; its
        all-reduces are counted whole)."""
        self.forwards += scale * other.forwards
        self.gradients += scale * other.gradients
        self.hvps += scale * other.hvps
        self.all_reduces += other.all_reduces

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Work done inside is bookkeeping (recording a row), not part of the method's cost."""
        saved = self.snapshot()
        try:
            yield
        finally:
            self.restore(saved)
