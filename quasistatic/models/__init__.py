"""Models: encoder e(z|x), prior m(z), decoder d(x|z), classifier c(y|z) and their architectures."""

from . import mlp, resnet  # noqa: F401  (register the built-in architectures)
from .base import (
    ARCHITECTURES,
    ModelConfig,
    Networks,
    RepresentationModel,
    available_architectures,
    build_model,
    register_architecture,
)
from .priors import MixtureOfGaussiansPrior, Prior, StandardNormalPrior

__all__ = [
    "ARCHITECTURES",
    "ModelConfig",
    "Networks",
    "RepresentationModel",
    "available_architectures",
    "build_model",
    "register_architecture",
    "Prior",
    "StandardNormalPrior",
    "MixtureOfGaussiansPrior",
]
