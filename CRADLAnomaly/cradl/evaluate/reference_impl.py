"""The straightforward implementation, as the original research code computes it: one slice and one
SmoothGrad copy at a time, a Python loop over the mixture's components. Kept as the baseline that the
speed benchmark compares against, and as an independent check that the vectorised path is exact."""
from __future__ import annotations

import math

import numpy as np
import torch

from ..gmm import GaussianMixtureNLL


def loop_nll(features: torch.Tensor, gmm: GaussianMixtureNLL) -> torch.Tensor:
    """-log p(f) for one feature vector (D,), component by component."""
    z = (features - gmm.feature_mean) / gmm.feature_std
    d = z.shape[0]
    log_terms = []
    for k in range(gmm.n_components):
        cholesky = gmm.precisions_cholesky[k]
        y = (z - gmm.means[k]) @ cholesky
        log_det = torch.log(torch.diagonal(cholesky)).sum()
        log_terms.append(torch.log(gmm.weights[k]) - 0.5 * d * math.log(2 * math.pi) + log_det - 0.5 * (y * y).sum())
    return -torch.logsumexp(torch.stack(log_terms), dim=0)


def loop_score_and_saliency(slices: np.ndarray, indices: np.ndarray, encoder, gmm: GaussianMixtureNLL,
                            config: dict, device: torch.device, reference: np.ndarray | None = None
                            ) -> tuple[np.ndarray, np.ndarray]:
    n_noisy = max(0, int(config["smoothgrad_samples"]) - 1)
    scores, saliency = [], []
    for slice_, index in zip(slices, indices):
        clean = torch.from_numpy(slice_)
        # the vectorised path's noise rule, restated: each slice's copies come from a generator seeded by the
        # slice's index, so the comparison also checks that batching does not change the noise
        generator = torch.Generator().manual_seed(int(config["seed"]) * 100_003 + int(index))
        noise = torch.randn((n_noisy, *clean.shape), generator=generator) * config["noise_std"]
        grads = []
        for copy in range(n_noisy + 1):
            x = (clean if copy == 0 else clean + noise[copy - 1]).to(device)[None, None].requires_grad_(True)
            nll = loop_nll(encoder(x)[0], gmm)
            (grad,) = torch.autograd.grad(nll, x)
            grads.append(grad[0, 0])
            if copy == 0:
                scores.append(nll.item())
        gradient = torch.stack(grads).mean(0).cpu().numpy()
        if reference is not None:  # times the slice's difference from the normal mean, none where that is NaN
            gradient = gradient * np.nan_to_num(slice_ - reference[len(saliency)], nan=0.0)
        saliency.append(np.abs(gradient))
    return np.array(scores), np.stack(saliency)
