"""The batched logistic-regression head against scikit-learn's LogisticRegression, episode by episode."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.linear_model import LogisticRegression

from metashot.methods.logistic import LogisticHead, fit_logistic


def _features(episodes: int, ways: int, shots: int, dim: int, seed: int = 0, spread: float = 1.0):
    """Random support [B, N*K, D] with class-major labels [B, N*K], and queries [B, 15, D]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways).repeat_interleave(shots).repeat(episodes, 1)
    centres = torch.randn(episodes, ways, dim, generator=g)
    support = centres.gather(1, labels.unsqueeze(-1).expand(-1, -1, dim))
    support = spread * (support + torch.randn(support.shape, generator=g))
    return support, labels, spread * torch.randn(episodes, 15, dim, generator=g)


def _sklearn_probs(support, labels, query, C: float, normalize: bool) -> np.ndarray:
    """RFS's way: one LogisticRegression per episode (on the L2-normalised features), its probabilities."""
    if normalize:
        support, query = F.normalize(support.double(), dim=-1), F.normalize(query.double(), dim=-1)
    out = []
    for x, y, q in zip(support.double().numpy(), labels.numpy(), query.double().numpy()):
        model = LogisticRegression(C=C, max_iter=100_000, tol=1e-12).fit(x, y)
        out.append(model.predict_proba(q))
    return np.stack(out)


@pytest.mark.parametrize("shots", [1, 5])
def test_matches_sklearn_on_normalised_features(shots: int) -> None:
    support, labels, query = _features(4, 5, shots, 64, seed=shots)
    with torch.no_grad():
        log_p = LogisticHead()(query, support, labels, 5)
    assert log_p.shape == (4, 15, 5) and log_p.dtype == torch.float32
    expected = _sklearn_probs(support, labels, query, 1.0, normalize=True)
    np.testing.assert_allclose(log_p.exp().double().numpy(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize(("shots", "dim", "C"), [(5, 8, 1.0), (2, 16, 10.0)])
def test_matches_sklearn_unnormalised_and_with_more_points_than_dims(shots: int, dim: int, C: float) -> None:
    # 25 points in 8 dims: the basis is all of R^D; unnormalised features of norm ~ 4 with C = 10
    support, labels, query = _features(3, 5, shots, dim, seed=7, spread=1 / dim ** 0.5 * 3)
    log_p = LogisticHead(C=C, normalize=False)(query, support, labels, 5)
    expected = _sklearn_probs(support, labels, query, C, normalize=False)
    np.testing.assert_allclose(log_p.exp().double().numpy(), expected, atol=1e-4, rtol=0)


def test_log_probabilities_and_batch_independence() -> None:
    support, labels, query = _features(5, 5, 5, 64, seed=3)
    head = LogisticHead()
    log_p = head(query, support, labels, 5)
    assert torch.allclose(log_p.logsumexp(-1), torch.zeros(5, 15), atol=1e-6)
    alone = torch.cat([head(query[i:i + 1], support[i:i + 1], labels[i:i + 1], 5) for i in range(5)])
    assert (alone - log_p).abs().max() < 1e-6


@pytest.mark.parametrize(("C", "spread"), [(2.0, 1.0), (1e3, 3.0)])
def test_fit_is_stationary_and_intercepts_sum_to_zero(C: float, spread: float) -> None:
    # the gradient of C sum CE + 0.5 ||V||^2 vanishes at the fit: V = C Z^T (Y - P), sum_i (Y - P) = 0;
    # with C = 1e3 the first full Newton step overshoots and the line search backtracks
    support, labels, _ = _features(2, 3, 4, 6, seed=5, spread=spread)
    z = support.double()
    theta, steps = fit_logistic(z, labels, 3, C=C)
    assert steps < 20
    p = (z @ theta[..., :-1].mT + theta[..., -1].unsqueeze(1)).softmax(-1)
    residual = F.one_hot(labels, 3).double() - p  # [B, S, N]
    assert torch.allclose(theta[..., :-1], C * residual.mT @ z, atol=1e-8 * C)
    assert torch.allclose(residual.sum(1), torch.zeros(2, 3, dtype=torch.float64), atol=1e-8)
    assert torch.allclose(theta[..., -1].sum(-1), torch.zeros(2, dtype=torch.float64), atol=1e-8)


def test_support_features_that_need_no_gradient() -> None:
    support, labels, query = _features(2, 5, 1, 64)
    support.requires_grad_(True)
    log_p = LogisticHead()(query, support, labels, 5)
    assert not log_p.requires_grad and torch.isfinite(log_p).all()


def test_bad_options() -> None:
    with pytest.raises(ValueError, match=r"logistic head: C \(0.0\), max_iter \(100\) and tol"):
        LogisticHead(C=0.0)
