"""The small well-posed data set shared by the tangent, engine and CLI tests.

Six pixels from a two-factor model passed through a sigmoid, with random labels in three classes
(so that the classes are not perfectly separable and the classifier's weights stay finite).
"""

import torch

from quasistatic import LabeledData


def small_labeled(n: int, seed: int, shift: float = 0.0) -> LabeledData:
    """(n, 1, 2, 3) float64 pixels in (0, 1) and labels in 0..2; ``shift`` moves the pixel logits."""
    g = torch.Generator().manual_seed(seed)
    loadings = 2.5 * torch.randn(6, 2, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    logits = (torch.randn(n, 2, generator=g, dtype=torch.float64) @ loadings.T + shift
              + 0.3 * torch.randn(n, 6, generator=g, dtype=torch.float64))
    y = torch.randint(0, 3, (n,), generator=g)
    return LabeledData(torch.sigmoid(logits).reshape(n, 1, 2, 3), y, 3, ("a", "b", "c"))


SMALL = "small-test-set"  # the CLI's name of this problem: 12 training and 8 validation examples


def _small_split(data_dir=None, *, download=False, seed=0, val_fraction=0.2):
    from quasistatic import DataSplit
    train, val = small_labeled(12, 1), small_labeled(8, 2)
    return DataSplit(train.to(dtype=torch.float32), val.to(dtype=torch.float32), SMALL)


def register_small_dataset() -> str:
    """Make this problem a CLI data set (``--dataset small-test-set``), once; its name."""
    from quasistatic import available_datasets, register_dataset
    if SMALL not in available_datasets():
        register_dataset(SMALL, _small_split)
    return SMALL


class _Functionals:
    """(R, D, C) of a toy θ ∈ R^n as one "example" (the work of a pass is one evaluation)."""

    data = [None]

    def __init__(self, functionals) -> None:
        self.functionals = functionals

    def __call__(self, theta):
        return self.functionals(theta)

    def chunks(self):
        return [(0, 1)]

    def chunk_functionals(self, theta, start, stop):
        return self.functionals(theta)


def toy_objective(functionals, n: int):
    """An Objective whose (R, D, C) = ``functionals(θ)`` (a (3,) tensor) for θ ∈ R^n; the engine
    sees nothing else."""
    from quasistatic import Objective
    from quasistatic.work import WorkCounter

    objective = object.__new__(Objective)
    objective.sigma, objective.model, objective.mixture = 0.0, None, None
    objective.layout = type("Layout", (), {"numel": n})()
    objective.parts = [_Functionals(functionals)]
    objective.work = WorkCounter()
    return objective


class _ToyMixture:
    """Eq. 23's mixing of two parts' values, (1 − t)·source + t·target, without data."""

    @staticmethod
    def mix(source, target, t):
        return (1 - t) * source + t * target


def toy_mixture_objective(source, target, n: int):
    """A mixture Objective (eq. 23) whose parts have (R, D, C) = ``source(θ)`` and ``target(θ)``."""
    objective = toy_objective(source, n)
    objective.mixture = _ToyMixture()
    objective.parts = [_Functionals(source), _Functionals(target)]
    return objective
