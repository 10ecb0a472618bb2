"""Gaussian mixture negative log-likelihood in torch, differentiable, vectorised over components.

The mixture is fitted by scikit-learn (`GaussianMixture`, full covariances, EM); this module only
evaluates it, so gradients can flow back to the input pixels. Parameters are plain arrays.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn


class GaussianMixtureNLL(nn.Module):
    """-log p(x) for features x (N, D): standardised per dimension, then a K-component full-cov GMM."""

    def __init__(self, feature_mean, feature_std, weights, means, precisions_cholesky):
        super().__init__()
        arrays = dict(feature_mean=feature_mean, feature_std=feature_std, weights=weights, means=means,
                      precisions_cholesky=precisions_cholesky)
        for name, value in arrays.items():
            self.register_buffer(name, torch.as_tensor(np.asarray(value), dtype=torch.float32))
        k, d = self.means.shape
        if self.precisions_cholesky.shape != (k, d, d) or self.weights.shape != (k,):
            raise ValueError("inconsistent Gaussian mixture parameter shapes")
        # log det of each precision Cholesky factor and the constant term, computed once
        self.register_buffer("log_norm", torch.log(self.weights) - 0.5 * d * math.log(2 * math.pi)
                             + torch.log(torch.diagonal(self.precisions_cholesky, dim1=1, dim2=2)).sum(1))
        self.register_buffer("mean_proj", torch.einsum("kd,kde->ke", self.means, self.precisions_cholesky))

    @property
    def n_components(self) -> int:
        return int(self.means.shape[0])

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        z = (features - self.feature_mean) / self.feature_std
        y = torch.einsum("nd,kde->nke", z, self.precisions_cholesky) - self.mean_proj  # (N, K, D)
        log_prob = self.log_norm - 0.5 * (y * y).sum(-1)
        return -torch.logsumexp(log_prob, dim=1)

    def to_arrays(self) -> dict[str, np.ndarray]:
        names = ("feature_mean", "feature_std", "weights", "means", "precisions_cholesky")
        return {f"gmm.{n}": getattr(self, n).cpu().numpy() for n in names}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> "GaussianMixtureNLL":
        return cls(*(arrays[f"gmm.{n}"] for n in
                     ("feature_mean", "feature_std", "weights", "means", "precisions_cholesky")))

    @classmethod
    def from_sklearn(cls, mixture, feature_mean, feature_std) -> "GaussianMixtureNLL":
        if mixture.covariance_type != "full":
            raise ValueError("only full-covariance mixtures are supported")
        return cls(feature_mean, feature_std, mixture.weights_, mixture.means_, mixture.precisions_cholesky_)
