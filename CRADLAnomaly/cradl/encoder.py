"""The slice encoder (a small residual CNN, fast on a laptop CPU) and the SimCLR projection head.

The encoder's pooled output is the representation the Gaussian mixture models; the projection
head exists only for the contrastive loss during training (SimCLR, Chen et al. 2020).
"""
from __future__ import annotations

import torch
from torch import nn


class _ResidualBlock(nn.Module):
    def __init__(self, channels_in: int, channels_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 3, stride, 1, bias=False), nn.BatchNorm2d(channels_out),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels_out, channels_out, 3, 1, 1, bias=False), nn.BatchNorm2d(channels_out),
        )
        self.skip = (nn.Identity() if stride == 1 and channels_in == channels_out else nn.Sequential(
            nn.Conv2d(channels_in, channels_out, 1, stride, bias=False), nn.BatchNorm2d(channels_out)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        return self.act(self.body(x) + self.skip(x))


class SliceEncoder(nn.Module):
    """(N, 1, S, S) slices -> (N, feature_dim) representations.

    `grid` = 1 pools the last feature map globally (position-invariant, as in SimCLR's ResNet). On
    slices aligned to a reference space, `grid` > 1 keeps a coarse layout (grid x grid cells, then a
    linear map), so a local change moves the representation in its own directions: that is what makes
    the NLL and its input gradient point at where a slice deviates.
    """

    def __init__(self, width: int = 32, feature_dim: int = 128, grid: int = 1):
        super().__init__()
        self.width, self.feature_dim, self.grid = width, feature_dim, grid
        w = width
        self.stem = nn.Sequential(nn.Conv2d(1, w, 5, 2, 2, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True))
        self.stages = nn.Sequential(
            _ResidualBlock(w, 2 * w, 2),
            _ResidualBlock(2 * w, 4 * w, 2),
            _ResidualBlock(4 * w, feature_dim, 2),
        )
        self.pool = nn.AdaptiveAvgPool2d(grid)
        self.project = nn.Identity() if grid == 1 else nn.Linear(feature_dim * grid * grid, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.pool(self.stages(self.stem(x))).flatten(1))


class ProjectionHead(nn.Module):
    def __init__(self, feature_dim: int = 128, projection_dim: int = 64):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(feature_dim, feature_dim), nn.ReLU(inplace=True),
                                 nn.Linear(feature_dim, projection_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)
