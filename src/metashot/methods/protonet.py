"""Prototypical Networks (Snell, Swersky & Zemel, NIPS 2017).

Prototypes are class means of the embedded support set, c_k = 1/|S_k| sum_{x_i in S_k} f(x_i) (eq. 1);
P(y = k | x) = softmax_k(-d(f(x), c_k)) (eq. 2) with d the squared Euclidean distance, or cosine; FEAT's
code (Ye et al. 2020) divides d by a temperature (64 for ResNet-12).
As a kernel of the metric rule, k(x, x_i) = P(y = y_i | x) / |S_{y_i}|.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import Episode, TaskInfo
from metashot.methods.base import Method
from metashot.methods.kernel import KernelMethod
from metashot.nn.backbones import make_backbone


def prototypes(support: torch.Tensor, support_labels: torch.Tensor, ways: int) -> torch.Tensor:
    """Class means: support [B, S, D], labels [B, S] -> [B, ways, D]."""
    onehot = F.one_hot(support_labels, ways).to(support.dtype)  # [B, S, N]
    return onehot.transpose(1, 2) @ support / onehot.sum(dim=1).unsqueeze(-1)


def prototype_logits(
    query: torch.Tensor, protos: torch.Tensor, distance: str = "euclidean"
) -> torch.Tensor:
    """-d(f(x), c_k): query [B, Q, D], prototypes [B, N, D] -> logits [B, Q, N]."""
    if distance == "euclidean":
        # ||q||^2 - 2 q.c + ||c||^2 as one batched matmul: cheaper than cdist and exact in its gradient
        d = (
            query.pow(2).sum(-1, keepdim=True)
            - 2 * query @ protos.transpose(1, 2)
            + protos.pow(2).sum(-1).unsqueeze(1)
        )
        return -d
    if distance == "cosine":
        return F.normalize(query, dim=-1) @ F.normalize(protos, dim=-1).transpose(1, 2)
    raise ValueError(f"distance must be 'euclidean' or 'cosine', got {distance!r}")


class PrototypeKernel(nn.Module):
    """k(x, x_i) = softmax_k(-d(f(x), c_k))[y_i] / |S_{y_i}|, as log-weights [B, Q, S]."""

    def __init__(self, distance: str = "euclidean", temperature: float = 1.0) -> None:
        super().__init__()
        self.distance, self.temperature = distance, temperature

    def forward(
        self, query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, ways: int
    ) -> torch.Tensor:
        log_p = prototype_logits(query, prototypes(support, support_labels, ways), self.distance)
        log_p = (log_p / self.temperature).log_softmax(-1)  # [B, Q, N]
        counts = F.one_hot(support_labels, ways).sum(dim=1).to(log_p.dtype)  # [B, N]
        log_p = log_p - counts.log().unsqueeze(1)
        return log_p.gather(2, support_labels.unsqueeze(1).expand(-1, query.shape[1], -1))


class ProtoNet(KernelMethod):
    """Prototypical Networks: the metric rule with the prototype kernel.

    encoder maps [M, C, H, W] to [M, D] (by default the paper's Conv4 for 1-channel images);
    distance is "euclidean" (the paper's squared Euclidean) or "cosine"; the logits are divided by
    ``temperature``.
    """

    default_backbone: ClassVar[str | None] = "conv4"

    def __init__(
        self, encoder: nn.Module | None = None, distance: str = "euclidean", temperature: float = 1.0
    ) -> None:
        encoder = encoder if encoder is not None else make_backbone(self.default_backbone, (1, 28, 28))
        super().__init__(encoder, PrototypeKernel(distance, temperature))
        self.distance, self.temperature = distance, temperature

    @classmethod
    def build(
        cls, info: TaskInfo, backbone: str | None = None, backbone_args: dict[str, Any] | None = None,
        distance: str = "euclidean", hidden: int | None = None, temperature: float = 1.0,
    ) -> Method:
        """``hidden``: the backbone's width (its ``hidden`` argument; Conv4's 64 by default)."""
        return cls(cls.build_backbone(info, backbone, backbone_args, hidden=hidden), distance, temperature)

    def log_probs(self, episode: Episode) -> torch.Tensor:
        # The same numbers as the kernel rule (a test checks it), without the [B, Q, S, N] detour.
        support, query = self.embed(episode)
        protos = prototypes(support, episode.support_labels, episode.ways)
        return (prototype_logits(query, protos, self.distance) / self.temperature).log_softmax(-1)
