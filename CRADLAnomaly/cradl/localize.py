"""Slice scores (GMM negative log-likelihood) and their gradient w.r.t. the input pixels.

One backward pass serves every slice and every SmoothGrad copy: slices are independent in eval mode,
so the gradient of the summed NLL w.r.t. each copy is that copy's own gradient. The first copy of
each slice is noise-free and gives the slice's score, so scoring costs no extra forward pass.

Two attributions (the localization setting `attribution`):
- "gradient" (the CRADL paper): |gradient|, large wherever the encoder looks hard, in every brain;
- "gradient_x_deviation": |gradient x (slice - normal mean slice)|, each pixel's first-order share of
  the score's difference from the mean normal brain (aligned), so pixels that look as normal brains do
  at that place contribute nothing however much the encoder attends to them. Measured: README,
  "Detection quality".
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch
from scipy import ndimage

from .calibration import slice_z_scores
from .encoder import SliceEncoder
from .gmm import GaussianMixtureNLL
from .manifest import uses_normal_mean


def _slice_noise(shape, n_noisy: int, std: float, seed: int, indices: np.ndarray) -> torch.Tensor:
    """Noise for each slice from a generator seeded by the slice's index: results do not depend on batching."""
    noise = torch.empty((len(indices), n_noisy, *shape))
    for row, index in enumerate(indices):
        generator = torch.Generator().manual_seed(int(seed) * 100_003 + int(index))
        noise[row] = torch.randn((n_noisy, *shape), generator=generator) * std
    return noise


def score_slices(slices: np.ndarray, encoder: SliceEncoder, gmm: GaussianMixtureNLL, device: torch.device,
                 batch_size: int = 64, progress: Callable[[float], None] | None = None) -> np.ndarray:
    """Negative log-likelihood of each slice (N, S, S) -> (N,), without gradients."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(slices), batch_size):
            batch = torch.from_numpy(slices[start:start + batch_size]).unsqueeze(1).to(device)
            out.append(gmm(encoder(batch)).cpu())
            if progress:
                progress(min(1.0, (start + batch_size) / len(slices)))
    return torch.cat(out).numpy().astype(np.float64)


def score_and_saliency(slices: np.ndarray, indices: np.ndarray, encoder: SliceEncoder, gmm: GaussianMixtureNLL,
                       config: dict, device: torch.device, batch_size: int = 16,
                       progress: Callable[[float], None] | None = None,
                       reference: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Slice NLLs (N,) and raw saliency (N, S, S): the SmoothGrad mean gradient's magnitude, or with
    `reference` (the normal mean of these slices, NaN where normal brains have none) |gradient x deviation|."""
    n_noisy = max(0, int(config["smoothgrad_samples"]) - 1)
    shape = slices.shape[1:]
    scores, saliency = [], []
    for start in range(0, len(slices), batch_size):
        clean = torch.from_numpy(slices[start:start + batch_size]).unsqueeze(1)  # (B, 1, S, S)
        copies = clean.expand(-1, n_noisy + 1, -1, -1).clone()
        if n_noisy:
            copies[:, 1:] += _slice_noise(shape, n_noisy, config["noise_std"], config["seed"],
                                          indices[start:start + batch_size])
        copies = copies.reshape(-1, 1, *shape).to(device).requires_grad_(True)
        nll = gmm(encoder(copies))
        (grad,) = torch.autograd.grad(nll.sum(), copies)
        grad = grad.reshape(len(clean), n_noisy + 1, *shape).mean(1).cpu()
        if reference is not None:
            grad = grad * deviation(clean[:, 0], reference[start:start + batch_size])
        scores.append(nll.detach().reshape(len(clean), n_noisy + 1)[:, 0].cpu())
        saliency.append(grad.abs())
        if progress:
            progress(min(1.0, (start + batch_size) / len(slices)))
    return torch.cat(scores).numpy().astype(np.float64), torch.cat(saliency).numpy()


def deviation(slices: torch.Tensor, reference: np.ndarray) -> torch.Tensor:
    """Each pixel's difference from the normal mean; none where normal brains have no brain (NaN)."""
    return torch.nan_to_num(slices - torch.from_numpy(reference), nan=0.0)


def postprocess_saliency(saliency: np.ndarray, mask: np.ndarray, config: dict,
                         indices: np.ndarray | None = None) -> np.ndarray:
    """Mask, median-filter and Gaussian-smooth the saliency of the slices at `indices` (N, S, S).

    In-plane filtering follows the CRADL paper. Smoothing across neighbouring slices as well
    (`gaussian_sigma_z_px`) is ours: each slice's gradient is computed on its own, so its noise is
    independent between slices while a lesion spans several, so averaging across slices keeps the lesion
    and cancels noise. Slices missing from `indices` count as zero evidence, so nothing blurs across a gap.
    """
    heat = saliency * mask
    size = int(config["median_size"])
    if size > 1:
        heat = ndimage.median_filter(heat, size=(1, size, size))
    sigma = float(config["gaussian_sigma_px"])
    if sigma > 0:
        heat = ndimage.gaussian_filter(heat, sigma=(0, sigma, sigma))
    sigma_z = float(config["gaussian_sigma_z_px"])
    if sigma_z > 0 and len(heat) > 1:
        positions = np.arange(len(heat)) if indices is None else np.asarray(indices) - np.min(indices)
        stack = np.zeros((int(positions.max()) + 1, *heat.shape[1:]), np.float32)
        stack[positions] = heat
        heat = ndimage.gaussian_filter1d(stack, sigma_z, axis=0, mode="constant")[positions]
    return (heat * mask).astype(np.float32)


def slice_weights(z_scores: np.ndarray, config: dict) -> np.ndarray:
    """How much of each slice's heatmap is kept: exp(z / slice_weight_z_scale) of the slice's NLL z-score
    (clipped to +-5), or 1 everywhere when the scale is 0.

    The gradient is large wherever the encoder looks hardest, in typical and unusual slices alike; the
    slice's z-score says whether the slice as a whole is unusual for its position. Weighting by it fades
    the heatmap of typical slices and keeps that of unusual ones (measured: README, "Detection quality").
    """
    scale = float(config.get("slice_weight_z_scale", 0.0))
    if scale <= 0:
        return np.ones(len(z_scores), np.float32)
    return np.exp(np.clip(z_scores, -5.0, 5.0) / scale).astype(np.float32)


def scan_heatmap(volume: np.ndarray, mask: np.ndarray, indices: np.ndarray, encoder: SliceEncoder,
                 gmm: GaussianMixtureNLL, config: dict, device: torch.device, slice_stats: dict,
                 batch_size: int = 16, progress: Callable[[float], None] | None = None,
                 normal_mean: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Slice NLLs (N,) and the post-processed heatmap (N, S, S) of a reference-grid scan's slices at `indices`.

    `slice_stats`: the per-position slice NLL mean and spread of normal scans (a model's calibration), which
    the slice weighting reads; `normal_mean`: the reference-grid normal mean image, which the
    "gradient_x_deviation" attribution reads."""
    nll, heat = unweighted_heatmap(volume, mask, indices, encoder, gmm, config, device, batch_size, progress,
                                   normal_mean)
    return nll, weigh_slices(heat, nll, indices, config, slice_stats)


def unweighted_heatmap(volume: np.ndarray, mask: np.ndarray, indices: np.ndarray, encoder: SliceEncoder,
                       gmm: GaussianMixtureNLL, config: dict, device: torch.device, batch_size: int = 16,
                       progress: Callable[[float], None] | None = None,
                       normal_mean: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`scan_heatmap` before the slice weighting, which needs normal statistics (calibration computes
    those from these very NLLs)."""
    reference = None
    if uses_normal_mean(config):
        if normal_mean is None:
            raise ValueError("the gradient_x_deviation attribution needs the normal mean image")
        reference = normal_mean[indices]
    nll, saliency = score_and_saliency(volume[indices], indices, encoder, gmm, config, device, batch_size, progress,
                                       reference)
    return nll, postprocess_saliency(saliency, mask[indices], config, indices)


def weigh_slices(heat: np.ndarray, nll: np.ndarray, indices: np.ndarray, config: dict,
                 slice_stats: dict) -> np.ndarray:
    """Each slice's heatmap times its `slice_weights`, from its NLL's z-score against `slice_stats`."""
    return heat * slice_weights(slice_z_scores(nll, indices, slice_stats), config)[:, None, None]
