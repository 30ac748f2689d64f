"""Priors m(z) on the latent code.

A prior gives ``log_prob(z)`` and, when it has one, the closed-form KL(e(z|x) ‖ m(z)) for a diagonal
Gaussian encoder; :func:`quasistatic.thermo.functionals.per_example_functionals` uses the closed form when
it exists and a Monte-Carlo estimate on the same fixed noise otherwise (the rate R of eq. 1).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

__all__ = ["Prior", "StandardNormalPrior", "MixtureOfGaussiansPrior"]

_LOG_2PI = math.log(2 * math.pi)


class Prior(nn.Module):
    """m(z): a density on R^latent_dim."""

    has_closed_form_kl: bool = False

    def log_prob(self, z: Tensor) -> Tensor:
        """log m(z) in nats; z: (..., latent_dim) -> (...)."""
        raise NotImplementedError

    def kl(self, mu: Tensor, logvar: Tensor) -> Tensor:
        """KL(N(mu, diag(exp(logvar))) ‖ m) per example; (n, d) -> (n,). Only if has_closed_form_kl."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form KL")


class StandardNormalPrior(Prior):
    """m(z) = N(0, I), the default; KL in closed form: ½ Σ (μ² + σ² − 1 − log σ²)."""

    has_closed_form_kl = True

    def log_prob(self, z: Tensor) -> Tensor:
        return -0.5 * (z.pow(2) + _LOG_2PI).sum(-1)

    def kl(self, mu: Tensor, logvar: Tensor) -> Tensor:
        return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(-1)


class MixtureOfGaussiansPrior(Prior):
    """A learnable mixture of diagonal Gaussians, m(z) = Σ_k π_k N(z; m_k, diag(s_k²)).

    Means start spread out (seeded by the caller's global RNG), scales at 1, weights uniform.
    """

    def __init__(self, latent_dim: int, components: int = 10) -> None:
        super().__init__()
        self.means = nn.Parameter(torch.randn(components, latent_dim))
        self.log_scales = nn.Parameter(torch.zeros(components, latent_dim))
        self.logits = nn.Parameter(torch.zeros(components))

    def log_prob(self, z: Tensor) -> Tensor:
        diff = (z.unsqueeze(-2) - self.means) * torch.exp(-self.log_scales)  # (..., K, d)
        log_normal = -0.5 * (diff.pow(2) + _LOG_2PI).sum(-1) - self.log_scales.sum(-1)  # (..., K)
        return torch.logsumexp(log_normal + torch.log_softmax(self.logits, -1), dim=-1)
