"""ResNet-18 encoder (CIFAR variant, He et al. 2016) and a 4-layer deconvolutional decoder.

The paper's CIFAR-10 model (Sec. 5, Appendix A). Batch norm is replaced by GroupNorm: it keeps no
running statistics, so the model stays a pure function of its parameters under
``torch.func.functional_call`` (no buffer is mutated when J or its Hessian-vector products are
evaluated) and a full-batch J does not depend on how the data are batched.
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn import functional as F

from ..errors import bad_value
from .base import ModelConfig, Networks, register_architecture

__all__ = ["build_resnet18"]


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class BasicBlock(nn.Module):
    """Two 3×3 convolutions with a residual connection (projection when the shape changes)."""

    def __init__(self, c_in: int, c_out: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.norm1 = _norm(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.norm2 = _norm(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm(c_out))

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.norm1(self.conv1(x)))
        out = self.norm2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18Encoder(nn.Module):
    """x (n, C, H, W) -> (n, 2·latent_dim); stages of [2, 2, 2, 2] blocks, widths w, 2w, 4w, 8w."""

    def __init__(self, in_channels: int, width: int, out_features: int) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False), _norm(width), nn.ReLU())
        blocks, c_in = [], width
        for stage, c_out in enumerate([width, 2 * width, 4 * width, 8 * width]):
            for i in range(2):
                blocks.append(BasicBlock(c_in, c_out, 2 if (stage > 0 and i == 0) else 1))
                c_in = c_out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(c_in, out_features)

    def forward(self, x: Tensor) -> Tensor:
        h = self.blocks(self.stem(x))
        return self.head(h.mean(dim=(-2, -1)))


class DeconvDecoder(nn.Module):
    """z -> (n, C, H, W) through a linear map to a (8w, H/16, W/16) map and four stride-2
    transposed convolutions (Noh et al. 2015), each doubling the resolution."""

    def __init__(self, latent_dim: int, width: int, out_shape: tuple[int, ...]) -> None:
        super().__init__()
        channels, height, width_px = out_shape
        self.base_shape = (8 * width, height // 16, width_px // 16)
        self.project = nn.Linear(latent_dim, math.prod(self.base_shape))
        widths = [8 * width, 4 * width, 2 * width, width]
        layers: list[nn.Module] = []
        for c_in, c_out in zip(widths, widths[1:] + [channels]):
            layers.append(nn.ConvTranspose2d(c_in, c_out, 4, 2, 1))
            if c_out != channels:
                layers += [_norm(c_out), nn.ReLU()]
        self.deconv = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.deconv(F.relu(self.project(z)).reshape(-1, *self.base_shape))


def build_resnet18(config: ModelConfig) -> Networks:
    channels, height, width_px = config.input_shape
    if height % 16 or width_px % 16:
        raise bad_value("resnet18 input height and width", "multiples of 16", config.input_shape)
    return Networks(
        encoder=ResNet18Encoder(channels, config.width, 2 * config.latent_dim),
        decoder=DeconvDecoder(config.latent_dim, config.width, config.input_shape),
    )


register_architecture("resnet18", build_resnet18)
