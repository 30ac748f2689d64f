"""The encoder–prior–decoder–classifier model of Sec. 2 and the registry of architectures.

A :class:`RepresentationModel` holds an encoder e(z|x) (diagonal Gaussian, reparameterized), a prior
m(z), a decoder d(x|z) and a classifier c(y|z). Its ``forward`` returns the per-example rate,
distortion and classification loss (eqs. 1 and 4) for a *given* noise tensor, so that with fixed
noise it is a pure, deterministic function of the parameters: ``torch.func.functional_call`` can
evaluate it at any θ, and no buffer is mutated on that path (normalization layers are GroupNorm,
which keeps no running statistics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import math

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import bad_value, choice_error
from ..registry import Registry
from .likelihoods import LIKELIHOODS
from .priors import MixtureOfGaussiansPrior, Prior, StandardNormalPrior

__all__ = [
    "ModelConfig",
    "Networks",
    "RepresentationModel",
    "ARCHITECTURES",
    "register_architecture",
    "available_architectures",
    "build_model",
]

PRIORS = ("normal", "mog")
_LOG_2PI = math.log(2 * math.pi)


@dataclass(frozen=True)
class ModelConfig:
    """Everything needed to rebuild a model; stored in every checkpoint."""

    architecture: str = "mlp"  # a name from available_architectures()
    input_shape: tuple[int, ...] = (1, 8, 8)  # (channels, height, width) of one image
    num_classes: int = 10  # size of the classifier head
    latent_dim: int = 8  # dimension of z
    hidden: tuple[int, ...] = (64, 64)  # mlp: widths of the encoder's (and mirrored decoder's) layers
    width: int = 64  # resnet18: channels of the first stage (64 in He et al.; tiny for CPU tests)
    activation: str = "tanh"  # mlp: a smooth nonlinearity keeps ∇²J continuous (tanh or softplus)
    likelihood: str = "bernoulli"  # decoder output: "bernoulli" ([0, 1] pixels) or "gaussian"
    prior: str = "normal"  # "normal" (N(0, I), closed-form KL) or "mog" (learnable mixture)
    prior_components: int = 10  # mog: number of mixture components
    reference_class: bool = True  # classifier: last logit fixed at 0 (removes softmax's shift symmetry)

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_shape", tuple(self.input_shape))
        object.__setattr__(self, "hidden", tuple(self.hidden))
        ARCHITECTURES.get(self.architecture)  # an unknown name raises, listing the registered ones
        if self.likelihood not in LIKELIHOODS:
            raise choice_error("likelihood", LIKELIHOODS, self.likelihood)
        if self.prior not in PRIORS:
            raise choice_error("prior", PRIORS, self.prior)
        if self.latent_dim < 1:
            raise bad_value("latent dimension", "an integer >= 1", self.latent_dim)
        if self.num_classes < 2:
            raise bad_value("number of classes", "an integer >= 2", self.num_classes)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Networks:
    """What an architecture builder returns: the three networks of the model."""

    encoder: nn.Module  # x (n, *input_shape) -> (n, 2·latent_dim): mean and log-variance
    decoder: nn.Module  # z (..., latent_dim) -> (..., *input_shape): likelihood parameters
    classifier: nn.Module | None = None  # z -> logits; a linear head when None


class ReferenceClassLinear(nn.Module):
    """A linear classifier c(y|z) whose last class has the logit 0.

    Softmax is unchanged when one vector is added to every row of a full linear head's weights
    (and one constant to its biases), so ∇²θJ of a full head has latent_dim + 1 exact zero
    eigenvalues at every θ and its minimizers are not isolated. Fixing one class's logit keeps the
    same family of classifiers and makes strict minima — and the solves of eq. 18 — well posed.
    """

    def __init__(self, latent_dim: int, num_classes: int) -> None:
        super().__init__()
        self.linear = nn.Linear(latent_dim, num_classes - 1)

    def forward(self, z: Tensor) -> Tensor:
        logits = self.linear(z)
        return torch.cat([logits, torch.zeros_like(logits[..., :1])], dim=-1)


class RepresentationModel(nn.Module):
    """e(z|x), m(z), d(x|z), c(y|z) with the per-example functionals of eqs. 1 and 4."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        nets = ARCHITECTURES.make(config.architecture, config)
        self.encoder = nets.encoder
        self.decoder = nets.decoder
        self.classifier = nets.classifier or (
            ReferenceClassLinear(config.latent_dim, config.num_classes)
            if config.reference_class
            else nn.Linear(config.latent_dim, config.num_classes)
        )
        self.prior: Prior = (
            MixtureOfGaussiansPrior(config.latent_dim, config.prior_components)
            if config.prior == "mog"
            else StandardNormalPrior()
        )
        self._log_likelihood = LIKELIHOODS[config.likelihood]

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance of e(z|x), each (n, latent_dim)."""
        mu, logvar = self.encoder(x).chunk(2, dim=-1)
        return mu, logvar

    def outputs(self, x: Tensor, noise: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """The network outputs the losses act on: μ, log σ² (n, d), the decoder's likelihood
        parameters (K, n, *input_shape) and the classifier's logits (K, n, classes), for
        z = μ + σ·noise with noise (K, n, d)."""
        mu, logvar = self.encode(x)
        z = mu + torch.exp(0.5 * logvar) * noise  # (K, n, d)
        k, n, d = z.shape
        decoded = self.decoder(z.reshape(k * n, d)).reshape(k, n, *x.shape[1:])
        return mu, logvar, decoded, self.classifier(z)

    def losses(self, outputs: tuple[Tensor, ...], x: Tensor, y: Tensor, noise: Tensor) -> Tensor:
        """Per-example (R, D, C) in nats, shape (3, n), from :meth:`outputs` (eqs. 1 and 4).

        The expectations over e(z|x) are averages over the K noise samples. R is the closed-form
        KL when the prior has one — then each loss is convex in the outputs, which makes the
        generalized Gauss–Newton matrix positive semi-definite — and otherwise the Monte-Carlo
        estimate E[log e(z|x) − log m(z)] on the same samples.
        """
        mu, logvar, decoded, logits = outputs
        if self.prior.has_closed_form_kl:
            rate = self.prior.kl(mu, logvar)
        else:
            z = mu + torch.exp(0.5 * logvar) * noise
            log_e = (-0.5 * (noise.pow(2) + logvar + _LOG_2PI)).sum(-1)  # log e(z|x), (K, n)
            rate = (log_e - self.prior.log_prob(z)).mean(0)
        distortion = -self._log_likelihood(x, decoded).mean(0)
        k, n = logits.shape[:2]
        classification = F.cross_entropy(logits.reshape(k * n, -1), y.repeat(k), reduction="none")
        return torch.stack([rate, distortion, classification.reshape(k, n).mean(0)])

    def forward(self, x: Tensor, y: Tensor, noise: Tensor) -> Tensor:
        """Per-example (R, D, C) in nats, shape (3, n), for z = μ + σ·noise (eqs. 1 and 4)."""
        return self.losses(self.outputs(x, noise), x, y, noise)

    def mean_logits(self, x: Tensor) -> Tensor:
        """Classifier logits at the encoder mean, c(y | z = μ(x)); (n, num_classes)."""
        mu, _ = self.encode(x)
        return self.classifier(mu)


ArchitectureBuilder = Callable[[ModelConfig], Networks]
ARCHITECTURES: Registry[Networks] = Registry("model")  # name -> ArchitectureBuilder; the CLI's --model


def register_architecture(name: str, builder: ArchitectureBuilder, *, replace: bool = False) -> None:
    """Make ``builder(config) -> Networks`` available as ``ModelConfig(architecture=name)``.

    This is how a model of one's own modules enters the library (docs/own_model.md): ``build_model``,
    checkpoints, :class:`~quasistatic.Objective` and the runner all build it by name. The networks
    must be pure functions of their parameters (no buffer updated in ``forward``: GroupNorm, not
    BatchNorm) and, for the curvature solves, twice differentiable (tanh or softplus, not ReLU)."""
    ARCHITECTURES.register(name, builder, replace=replace)


def available_architectures() -> list[str]:
    return ARCHITECTURES.available()


def build_model(config: ModelConfig, seed: int | None = None) -> RepresentationModel:
    """A freshly initialized model; ``seed`` makes the initialization reproducible."""
    if seed is None:
        return RepresentationModel(config)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return RepresentationModel(config)
