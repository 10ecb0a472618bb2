"""The torch Gaussian-mixture NLL is exactly scikit-learn's, and differentiable."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.mixture import GaussianMixture

from cradl.gmm import GaussianMixtureNLL


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_nll_equals_sklearn_score_samples(k):
    rng = np.random.default_rng(k)
    features = rng.normal(size=(800, 12)) @ rng.normal(size=(12, 12)) + rng.normal(size=12) * 5
    mean, std = features.mean(0), features.std(0)
    mixture = GaussianMixture(k, covariance_type="full", random_state=0).fit((features - mean) / std)
    gmm = GaussianMixtureNLL.from_sklearn(mixture, mean, std).double()
    queries = rng.normal(size=(50, 12)) * 3
    expected = -mixture.score_samples((queries - mean) / std)
    got = gmm(torch.from_numpy(queries)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_round_trips_through_plain_arrays_and_has_gradients():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 5))
    gmm = GaussianMixtureNLL.from_sklearn(GaussianMixture(2, random_state=0).fit(x), np.zeros(5), np.ones(5))
    again = GaussianMixtureNLL.from_arrays(gmm.to_arrays())
    query = torch.randn(4, 5, requires_grad=True)
    assert torch.allclose(gmm(query), again(query))
    again(query).sum().backward()
    assert query.grad is not None and torch.isfinite(query.grad).all()
