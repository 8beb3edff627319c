"""Small building blocks of the DeLF model."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from .config import ATTENTION_POOLS, INPUT_NORMS


class ImageNormalize(nn.Module):
    """Maps RGB in [0, 1] to the network's input (the model's first step): ``(x - mean) / std``
    with ``INPUT_NORMS[kind]``."""

    def __init__(self, kind: str = "imagenet") -> None:
        super().__init__()
        if kind not in INPUT_NORMS:
            raise ValueError(f"unknown input normalisation {kind!r}: choose from {', '.join(INPUT_NORMS)}")
        self.kind = kind
        mean, std = INPUT_NORMS[kind]
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class SpatialAttention2d(nn.Module):
    """Attention score map: conv1x1(C->512) [-> BN] -> ReLU -> conv1x1(512->1) -> softplus.

    ``batchnorm=False`` gives the seed repo's head (no BN) so its checkpoints load.
    """

    def __init__(self, in_channels: int, hidden: int = 512, batchnorm: bool = True) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, hidden, 1)
        self.bn = nn.BatchNorm2d(hidden) if batchnorm else nn.Identity()
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(hidden, 1, 1)
        self.softplus = nn.Softplus(beta=1, threshold=20)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.softplus(self.conv2(self.relu(self.bn(self.conv1(x)))))


class GlobalAvgPool2d(nn.Module):
    """(B, C, H, W) -> (B, C, 1, 1) mean over the cells. Unlike nn.AdaptiveAvgPool2d, its CUDA
    backward is deterministic (--deterministic allows only such ops)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3), keepdim=True)


class WeightedSum2d(nn.Module):
    """y = sum_{h,w} a_hw * normalize_L2(F_hw) (``mode="sum"``: the paper's Eq. 1 and the seed),
    or that sum divided by h*w (``mode="mean"``: the official TF2 trainer). Returns (B, C, 1, 1).

    The two differ by more than a constant the classifier could absorb: the sum grows with the
    number of cells, and random gamma rescaling in [0.3535, 1] changes the map's area, hence the
    sum, by up to 1/0.3535^2 = 8x from one batch to the next.
    """

    def __init__(self, mode: str = "sum") -> None:
        super().__init__()
        if mode not in ATTENTION_POOLS:
            raise ValueError(f"unknown attention pooling {mode!r}: choose from {', '.join(ATTENTION_POOLS)}")
        self.mode = mode

    def forward(self, features: torch.Tensor, attention: torch.Tensor) -> torch.Tensor:
        y = F.normalize(features, p=2, dim=1) * attention
        if self.mode == "mean":
            return y.mean(dim=(2, 3), keepdim=True)
        return y.sum(dim=(2, 3), keepdim=True)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"
