"""SimCLR augmentations for grey-level slices, written with torch tensor ops (no torchvision).

Each sample in a batch gets its own random crop/scale, rotation, flip, intensity change, blur and
noise; all of it runs batched on the training device.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


# Geometric augmentation strengths. "strong" is SimCLR's usual crop-and-flip invariance; "light" suits
# slices already aligned to a reference space, where position carries meaning the model should keep.
GEOMETRY = {"strong": dict(max_rotation_deg=15.0, scale_range=(0.8, 1.15), max_shift=0.08, flip=True),
            "light": dict(max_rotation_deg=5.0, scale_range=(0.95, 1.05), max_shift=0.03, flip=False)}


def random_affine(x: torch.Tensor, generator: torch.Generator, max_rotation_deg: float = 15.0,
                  scale_range=(0.8, 1.15), max_shift: float = 0.08, flip: bool = True) -> torch.Tensor:
    n = x.shape[0]
    rand = lambda *shape: torch.rand(*shape, generator=generator, device=x.device)  # noqa: E731
    angle = (rand(n) * 2 - 1) * math.radians(max_rotation_deg)
    scale = scale_range[0] + rand(n) * (scale_range[1] - scale_range[0])
    flip = torch.where(rand(n) < 0.5, -1.0, 1.0) if flip else torch.ones(n, device=x.device)
    shift = (rand(n, 2) * 2 - 1) * max_shift * 2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1),
                         torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_intensity(x: torch.Tensor, generator: torch.Generator, contrast=0.25, brightness=0.1,
                     gamma=0.3) -> torch.Tensor:
    n = x.shape[0]
    rand = lambda: torch.rand(n, 1, 1, 1, generator=generator, device=x.device) * 2 - 1  # noqa: E731
    brain = x != 0
    g = torch.exp(rand() * gamma)
    y = torch.sign(x) * x.abs().pow(g)
    y = y * (1 + rand() * contrast) + rand() * brightness
    return torch.where(brain, y, x)


def random_blur(x: torch.Tensor, generator: torch.Generator, max_sigma: float = 1.5, p: float = 0.5) -> torch.Tensor:
    """Per-sample Gaussian blur through a grouped separable convolution."""
    n, _, h, w = x.shape
    sigma = torch.rand(n, generator=generator, device=x.device) * max_sigma
    sigma = torch.where(torch.rand(n, generator=generator, device=x.device) < p, sigma, torch.zeros_like(sigma))
    radius = int(math.ceil(3 * max_sigma))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernel = torch.exp(-0.5 * (offsets[None] / sigma.clamp_min(1e-3)[:, None]) ** 2)
    kernel = kernel / kernel.sum(1, keepdim=True)  # sigma -> 0 gives a delta
    y = x.reshape(1, n, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="reflect"), kernel[:, None, None, :], groups=n)
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="reflect"), kernel[:, None, :, None], groups=n)
    return y.reshape(n, 1, h, w)


def random_noise(x: torch.Tensor, generator: torch.Generator, max_std: float = 0.05) -> torch.Tensor:
    std = torch.rand(x.shape[0], 1, 1, 1, generator=generator, device=x.device) * max_std
    return x + torch.randn(x.shape, generator=generator, device=x.device) * std


def simclr_view(x: torch.Tensor, generator: torch.Generator, geometry: str = "strong") -> torch.Tensor:
    """One random view of a batch of slices (N, 1, S, S)."""
    x = random_affine(x, generator, **GEOMETRY[geometry])
    x = random_intensity(x, generator)
    x = random_blur(x, generator)
    return random_noise(x, generator)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over the 2N views of a batch."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = z @ z.T / temperature
    logits.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits, targets)
