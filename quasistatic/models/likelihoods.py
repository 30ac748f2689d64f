"""Decoder likelihoods d(x|z): the distortion D = E[−log d(x|z)] of eq. 1, in nats per example."""

from __future__ import annotations

import math

from torch import Tensor
from torch.nn import functional as F

__all__ = ["bernoulli_log_likelihood", "gaussian_log_likelihood", "LIKELIHOODS"]


def bernoulli_log_likelihood(x: Tensor, logits: Tensor) -> Tensor:
    """log d(x|z) for pixels in [0, 1] (continuous Bernoulli without its normalizer, as in
    Kingma & Welling); x: (n, *shape), logits: (m, n, *shape) or (n, *shape) -> summed over pixels."""
    ll = -F.binary_cross_entropy_with_logits(logits, x.expand_as(logits), reduction="none")
    return ll.flatten(start_dim=logits.dim() - x.dim() + 1).sum(-1)


def gaussian_log_likelihood(x: Tensor, mean: Tensor) -> Tensor:
    """log N(x; mean, I) summed over pixels, for standardized real-valued images (CIFAR-10)."""
    ll = -0.5 * ((x - mean).pow(2) + math.log(2 * math.pi))
    return ll.flatten(start_dim=mean.dim() - x.dim() + 1).sum(-1)


LIKELIHOODS = {"bernoulli": bernoulli_log_likelihood, "gaussian": gaussian_log_likelihood}
