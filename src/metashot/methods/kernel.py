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

from metashot.methods.heads import Head, HeadMethod


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


class KernelHead(Head):
    """The kernel rule as a head: log P(y = n | x, S) = logsumexp_{i: y_i = n} log k(x, x_i)."""

    def __init__(self, kernel: nn.Module) -> None:
        super().__init__()
        self.kernel = kernel

    def forward(
        self, query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, ways: int
    ) -> torch.Tensor:
        return class_log_probs(self.kernel(query, support, support_labels, ways), support_labels, ways)


class KernelMethod(HeadMethod):
    """Embed support and query in one pass of ``encoder``, then apply the kernel rule with ``kernel``
    (see :class:`Kernel`): a :class:`~metashot.methods.heads.HeadMethod` whose head is a
    :class:`KernelHead`."""

    def __init__(self, encoder: nn.Module, kernel: nn.Module) -> None:
        super().__init__(encoder, KernelHead(kernel))

    @property
    def kernel(self) -> nn.Module:
        return self.head.kernel

    @classmethod
    def upgrade_weights(cls, weights: dict[str, Any]) -> dict[str, Any]:
        """Weights saved before the kernel became a head held it at ``kernel.``, now ``head.kernel.``."""
        return {("head." + k if k.startswith("kernel.") else k): v for k, v in weights.items()}


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
