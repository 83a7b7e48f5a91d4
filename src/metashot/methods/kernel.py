"""The metric-based rule P(y | x, S) = sum_i k(x, x_i) y_i (Vinyals et al. 2016, eq. 1).

A kernel gives, for every query, normalised log-weights over the support points,
log k(x, x_i) with sum_i k(x, x_i) = 1. The rule sums them per class in log space,
log P(y = n | x, S) = logsumexp_{i: y_i = n} log k(x, x_i), which is exact and stable.
Prototypical and Matching Networks are two kernels; a user's kernel plugs in the same way.
"""

from __future__ import annotations

import warnings
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import Episode
from metashot.methods.base import Method


class Kernel(Protocol):
    def __call__(
        self, query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """Log-weights [B, Q, S] from query [B, Q, D], support [B, S, D], labels [B, S] in 0..ways-1."""
        ...


def class_log_probs(log_weights: torch.Tensor, support_labels: torch.Tensor, ways: int) -> torch.Tensor:
    """log sum_{i: y_i = n} k(x, x_i): log-weights [B, Q, S], labels [B, S] -> [B, Q, ways]."""
    onehot = F.one_hot(support_labels, ways).to(log_weights.dtype)  # [B, S, N]
    # logsumexp over the support points of each class: mask the others with -inf
    masked = log_weights.unsqueeze(-1) + onehot.log().unsqueeze(1)  # [B, Q, S, N]
    return masked.logsumexp(dim=2)


class KernelMethod(Method):
    """Embed support and query in one pass of ``encoder``, then apply the kernel rule.

    encoder: [M, *input_shape] -> [M, D]; kernel: see :class:`Kernel`. The loss is the negative log
    of the rule's probability of the true label. Images and convolution weights are kept channels-last,
    the layout the CPU and GPU convolution kernels run fastest in.
    """

    def __init__(self, encoder: nn.Module, kernel: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder.to(memory_format=torch.channels_last)
        self.kernel = kernel

    def embed(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Support [B, S, D] and query [B, Q, D] embeddings, one encoder call per episode, so that batch
        norm's statistics are each episode's own whatever the batch (and however it is split over
        processes)."""
        s = episode.support.shape[1]
        z = []
        for x in torch.cat([episode.support, episode.query], dim=1):
            if x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            z.append(self.encoder(x).flatten(1))
        z = torch.stack(z)
        return z[:, :s], z[:, s:]

    def log_probs(self, episode: Episode) -> torch.Tensor:
        """log P(y = n | x, S) for every query: [B, Q, N]."""
        support, query = self.embed(episode)
        ways = episode.ways
        log_w = self.kernel(query, support, episode.support_labels, ways)
        return class_log_probs(log_w, episode.support_labels, ways)

    def loss(self, episode: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        log_p = self.log_probs(episode)
        nll = F.nll_loss(log_p.flatten(0, 1), episode.query_labels.flatten(), reduction="none")
        nll = nll.view_as(episode.query_labels).mean(dim=1)  # [B]
        acc = (log_p.argmax(-1) == episode.query_labels).float().mean(dim=1)
        return nll.mean(), {"loss": nll.detach(), "acc": acc}


class RBFKernel(nn.Module):
    """A Gaussian kernel k(x, x_i) proportional to exp(-||x - x_i||^2 / (2 sigma^2)), sigma learned."""

    def __init__(self, sigma: float = 1.0) -> None:
        super().__init__()
        self.log_sigma = nn.Parameter(torch.tensor(sigma).log())

    def forward(
        self, query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, ways: int
    ) -> torch.Tensor:
        d = torch.cdist(query, support).pow(2)
        return (-d / (2 * self.log_sigma.exp() ** 2)).log_softmax(dim=-1)


def __getattr__(name: str) -> Any:
    """``MetricMethod``, the old name of :class:`KernelMethod` (it clashed with ``Method.metric``)."""
    if name == "MetricMethod":
        warnings.warn("MetricMethod is now KernelMethod", DeprecationWarning, stacklevel=2)
        return KernelMethod
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
