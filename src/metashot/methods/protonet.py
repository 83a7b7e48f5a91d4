"""Prototypical Networks (Snell, Swersky & Zemel, NIPS 2017).

Prototypes are class means of the embedded support set, c_k = 1/|S_k| sum_{x_i in S_k} f(x_i) (eq. 1);
P(y = k | x) = softmax_k(-d(f(x), c_k)) (eq. 2) with d the squared Euclidean distance, or cosine; FEAT's
code (Ye et al. 2020) divides d by a temperature (64 for ResNet-12).
As a kernel of the metric rule, k(x, x_i) = P(y = y_i | x) / |S_{y_i}| (:class:`PrototypeKernel`, the
same numbers); ProtoNet trains through :class:`PrototypeHead`, which computes them without the
[B, Q, S, N] detour.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import TaskInfo
from metashot.methods.base import Method
from metashot.methods.heads import Head, HeadMethod
from metashot.nn.backbones import make_backbone

DISTANCES = ("euclidean", "cosine")


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


class PrototypeHead(Head):
    """P(y = k | x) = softmax_k(-d(f(x), c_k) / temperature) (eq. 2) as a head.

    With ``learn_scale`` the logits are multiplied by a learned scale started at 1 / temperature
    (Meta-Baseline's learned tau, Chen et al. ICCV 2021, eq. 2), else divided by the fixed temperature.
    """

    def __init__(
        self, distance: str = "euclidean", temperature: float = 1.0, learn_scale: bool = False
    ) -> None:
        super().__init__()
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}")
        self.distance, self.temperature = distance, temperature
        self.scale = nn.Parameter(torch.tensor(1 / temperature)) if learn_scale else None

    def forward(
        self, query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, ways: int
    ) -> torch.Tensor:
        logits = prototype_logits(query, prototypes(support, support_labels, ways), self.distance)
        logits = logits / self.temperature if self.scale is None else logits * self.scale
        return logits.log_softmax(-1)


class ProtoNet(HeadMethod):
    """Prototypical Networks: an encoder and the prototype head.

    encoder maps [M, C, H, W] to [M, D] (by default the paper's Conv4 for 1-channel images);
    distance is "euclidean" (the paper's squared Euclidean) or "cosine"; the logits are divided by
    ``temperature``, or with ``learn_scale`` multiplied by a learned scale (see :class:`PrototypeHead`).
    """

    default_backbone: ClassVar[str | None] = "conv4"

    def __init__(
        self, encoder: nn.Module | None = None, distance: str = "euclidean", temperature: float = 1.0,
        learn_scale: bool = False,
    ) -> None:
        encoder = encoder if encoder is not None else make_backbone(self.default_backbone, (1, 28, 28))
        super().__init__(encoder, PrototypeHead(distance, temperature, learn_scale))
        self.distance, self.temperature = distance, temperature

    @classmethod
    def build(
        cls, info: TaskInfo, backbone: str | None = None, backbone_args: dict[str, Any] | None = None,
        distance: str = "euclidean", hidden: int | None = None, temperature: float = 1.0,
        learn_scale: bool = False,
    ) -> Method:
        """``hidden``: the backbone's width (its ``hidden`` argument; Conv4's 64 by default)."""
        encoder = cls.build_backbone(info, backbone, backbone_args, hidden=hidden)
        return cls(encoder, distance, temperature, learn_scale)
