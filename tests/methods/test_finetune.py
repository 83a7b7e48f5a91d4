"""Test-time training: the batched linear and cosine heads against nn.Linear / CosineClassifier trained by
torch.optim.SGD one episode at a time, and P>M>F's fine-tuning of a copy of the backbone."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import Episode
from metashot.methods.finetune import CosineHead, LinearHead, fine_tune
from metashot.methods.heads import CosineClassifier
from metashot.methods.protonet import PrototypeHead


def _separable(episodes: int, ways: int = 5, shots: int = 5, dim: int = 32, seed: int = 0):
    """Support [B, N*K, D] around well-separated class centres, labels [B, N*K], queries [B, N*3, D]
    with labels [B, N*3]."""
    g = torch.Generator().manual_seed(seed)
    centres = 3 * torch.randn(episodes, ways, dim, generator=g)

    def around(labels: torch.Tensor) -> torch.Tensor:
        x = centres.gather(1, labels.unsqueeze(-1).expand(-1, -1, dim))
        return x + 0.5 * torch.randn(x.shape, generator=g)

    ys = torch.arange(ways).repeat_interleave(shots).repeat(episodes, 1)
    yq = torch.arange(ways).repeat_interleave(3).repeat(episodes, 1)
    return around(ys), ys, around(yq), yq


def _reference(kind: str, support, labels, query, ways: int, seed: int = 0) -> torch.Tensor:
    """One episode [S, D] the textbook way: nn.Linear or CosineClassifier started from the head's
    documented weights (nn.Linear's uniform, drawn from the seed: weight [D, N], then the bias) and
    trained by torch.optim.SGD on the support set's mean cross-entropy."""
    dim = support.shape[-1]
    g = torch.Generator().manual_seed(seed)
    weight = torch.empty(dim, ways).uniform_(-dim ** -0.5, dim ** -0.5, generator=g)
    layer = nn.Linear(dim, ways) if kind == "linear" else CosineClassifier(dim, ways, scale=10.0)
    with torch.no_grad():
        layer.weight.copy_(weight.T)
        if kind == "linear":
            layer.bias.uniform_(-dim ** -0.5, dim ** -0.5, generator=g)
    opt = torch.optim.SGD(layer.parameters(), lr=0.01, momentum=0.9, dampening=0.9, weight_decay=1e-3)
    for _ in range(100):
        opt.zero_grad()
        F.cross_entropy(layer(support), labels).backward()
        opt.step()
    return layer(query).log_softmax(-1).detach()


@pytest.mark.parametrize("head", [LinearHead(), CosineHead()], ids=["linear", "cosine"])
def test_fits_separable_support_and_matches_torch_training(head: LinearHead) -> None:
    support, labels, query, query_labels = _separable(3)
    with torch.no_grad():  # as the evaluator calls it
        on_support = head(support, support, labels, 5)
        log_p = head(query, support, labels, 5)
    assert (on_support.argmax(-1) == labels).all()
    assert (log_p.argmax(-1) == query_labels).float().mean() > 0.9
    assert torch.allclose(log_p.logsumexp(-1), torch.zeros(3, 15), atol=1e-5)
    for i in range(3):
        expected = _reference(head.kind, support[i], labels[i], query[i], 5)
        assert torch.allclose(log_p[i], expected, atol=1e-4), (log_p[i] - expected).abs().max()


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_an_episode_alone_or_in_a_batch(kind: str) -> None:
    support, labels, query, _ = _separable(3, shots=1, seed=1)
    head = LinearHead(kind, steps=30)
    batched = head(query, support, labels, 5)
    alone = head(query[1:2], support[1:2], labels[1:2], 5)
    assert (alone - batched[1:2]).abs().max() < 1e-5


def test_linear_head_options() -> None:
    with pytest.raises(ValueError, match="linear head kind must be one of linear, cosine, got 'knn'"):
        LinearHead("knn")
    with pytest.raises(ValueError, match=r"steps \(-1\) must be >= 0 and lr \(0.01\) > 0"):
        LinearHead(steps=-1)


def _colour_task(episodes: int, ways: int = 5, shots: int = 5, queries: int = 10) -> Episode:
    """3x8x8 images: channel 0 holds the class (a constant per class, crop- and flip-invariant), channels
    1 and 2 a large per-image constant that says nothing about it."""
    g = torch.Generator().manual_seed(0)

    def images(labels: torch.Tensor) -> torch.Tensor:
        x = 2 * torch.randn(*labels.shape, 3, 1, 1, generator=g) + 0.1 * torch.randn(
            *labels.shape, 3, 8, 8, generator=g)
        x[..., 0, :, :] += labels.float().sub((ways - 1) / 2).view(*labels.shape, 1, 1) - x[..., 0, :1, :1]
        return x

    ys = torch.arange(ways).repeat_interleave(shots).repeat(episodes, 1)
    yq = torch.arange(ways).repeat_interleave(queries).repeat(episodes, 1)
    return Episode(images(ys), ys, images(yq), yq, ways)


def _blind_encoder() -> nn.Module:
    """A 1x1 convolution that starts blind to channel 0, then global average pooling: [M, 8]."""
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Conv2d(3, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    with torch.no_grad():
        encoder[0].weight[:, 0] = 0
    return encoder


def test_fine_tuning_raises_query_accuracy() -> None:
    episode, encoder = _colour_task(2), _blind_encoder()
    untuned = fine_tune(encoder, episode, steps=0)
    # 0 steps: P>M>F's head, the cosine prototype classifier with scale 10
    with torch.no_grad():
        support, query = encoder(episode.support.flatten(0, 1)), encoder(episode.query.flatten(0, 1))
        expected = PrototypeHead("cosine", temperature=0.1)(
            query.view(2, 50, 8), support.view(2, 25, 8), episode.support_labels, 5)
    assert torch.allclose(untuned, expected, atol=1e-5)
    tuned = fine_tune(encoder, episode, steps=20, lr=0.05)
    accuracy = [(lp.argmax(-1) == episode.query_labels).float().mean().item() for lp in (untuned, tuned)]
    assert accuracy[0] < 0.35 and accuracy[1] > 0.7, accuracy


def test_encoder_left_unchanged_and_deterministic_for_a_seed() -> None:
    episode = _colour_task(2, shots=2, queries=3)
    encoder = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                            nn.Flatten()).train().requires_grad_(False)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    first = fine_tune(encoder, episode, steps=5, lr=0.01, seed=3)
    assert all(torch.equal(v, before[k]) for k, v in encoder.state_dict().items())  # running stats too
    assert encoder.training and not any(p.requires_grad for p in encoder.parameters())
    assert torch.equal(first, fine_tune(encoder, episode, steps=5, lr=0.01, seed=3))
    assert not torch.allclose(first, fine_tune(encoder, episode, steps=5, lr=0.01, seed=4))
    assert not torch.allclose(first, fine_tune(encoder, episode, steps=0))


def test_fine_tune_input_checks() -> None:
    vectors = Episode(torch.randn(1, 4, 6), torch.tensor([[0, 0, 1, 1]]), torch.randn(1, 2, 6),
                      torch.tensor([[0, 1]]), 2)
    with pytest.raises(ValueError, match=r"crops and flips images \[B, S, C, H, W\], got support of shape "
                                         r"\[1, 4, 6\]; pass augment=False"):
        fine_tune(nn.Linear(6, 3), vectors, steps=2)
    assert fine_tune(nn.Linear(6, 3), vectors, steps=2, augment=False).shape == (1, 2, 2)
    with pytest.raises(ValueError, match=r"steps \(3\) must be >= 0 and lr \(0\) > 0"):
        fine_tune(nn.Linear(6, 3), vectors, steps=3, lr=0)
