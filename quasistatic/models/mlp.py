"""The fully connected encoder and decoder of Kingma & Welling (2013), used by the paper for MNIST."""

from __future__ import annotations

import math

from torch import nn

from ..errors import choice_error
from .base import ModelConfig, Networks, register_architecture

__all__ = ["build_mlp"]

ACTIVATIONS = {"tanh": nn.Tanh, "softplus": nn.Softplus, "elu": nn.ELU, "relu": nn.ReLU}


def _stack(sizes: list[int], activation: type[nn.Module]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(activation())
    return nn.Sequential(*layers)


def build_mlp(config: ModelConfig) -> Networks:
    """Encoder pixels → hidden → … → (μ, log σ²); decoder z → reversed hidden → pixels."""
    if config.activation not in ACTIVATIONS:
        raise choice_error("activation", ACTIVATIONS, config.activation)
    act = ACTIVATIONS[config.activation]
    n_pixels = math.prod(config.input_shape)
    encoder = nn.Sequential(nn.Flatten(), _stack([n_pixels, *config.hidden, 2 * config.latent_dim], act))
    decoder = _stack([config.latent_dim, *reversed(config.hidden), n_pixels], act)
    return Networks(encoder=encoder, decoder=decoder)


register_architecture("mlp", build_mlp)
