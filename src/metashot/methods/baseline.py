"""Baseline and Baseline++ (Chen, Liu, Kira, Wang & Huang, "A Closer Look at Few-Shot Classification",
ICLR 2019), and the pretrain-then-fit-a-head recipe every later baseline shares.

Training: cross-entropy of a classifier over all base (training) classes on the encoder's features
f(x), on plain labelled minibatches: a linear layer W^T f(x) (Baseline, Sec. 3.1) or a cosine classifier
s * cos(f(x), w_c) with a learned scale s (Baseline++, Sec. 3.2). Test: the encoder is frozen and a
head is fitted on each task's support features; the paper's is a new classifier of the same kind
(``head`` "linear" or "cosine"), any head of :data:`metashot.methods.HEADS` fits.

The base classes' mean feature is kept as a running average during training (the running mean of a
batch norm without affine parameters over the detached features, so that many processes keep the one
process's average): SimpleShot's CL2N head centres by it.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import Episode, Examples, TaskInfo
from metashot.methods.base import Method
from metashot.methods.heads import CL2N, HeadMethod, classifier, episode_metrics
from metashot.nn.backbones import feature_size

MEAN_MOMENTUM = 0.01  # the running base-class mean averages over the last ~100 minibatches


class Baseline(HeadMethod):
    """An encoder pretrained with a classifier over the training classes, tested with ``head``.

    encoder: [M, *input_shape] -> [M, D]; classifier: "linear" or "cosine" over ``classes`` training
    classes (``scale``: the cosine classifier's initial scale); head: a :class:`~metashot.methods.heads.Head`
    fitted on each test task's support features. Trained on :class:`~metashot.batches.Examples`
    (x [B, C, H, W], y [B]), tested on episodes.
    """

    train_batches: ClassVar[str] = "examples"
    test_batches: ClassVar[str] = "episodes"
    default_backbone: ClassVar[str | None] = "conv4"
    default_head: ClassVar[dict[str, str]] = {"linear": "linear", "cosine": "cosine"}

    def __init__(
        self, encoder: nn.Module, features: int, classes: int, head: nn.Module, kind: str = "linear",
        scale: float = 10.0,
    ) -> None:
        super().__init__(encoder, head)
        args = {"scale": scale} if kind == "cosine" else {}
        self.classifier = classifier(kind, features, classes, **args)
        self.base_stats = nn.BatchNorm1d(features, affine=False, momentum=MEAN_MOMENTUM)

    @classmethod
    def build(
        cls, info: TaskInfo, backbone: str | None = None, backbone_args: dict[str, Any] | None = None,
        hidden: int | None = None, classifier: str = "linear", scale: float = 10.0, head: str | None = None,
        head_args: dict[str, Any] | None = None,
    ) -> Method:
        """``hidden``: the backbone's width; ``head`` (default: the classifier's kind, or the method's own)
        a name in :data:`metashot.methods.HEADS`, built with ``head_args``."""
        from metashot.methods import build_head

        if not info.train_classes:
            raise ValueError("needs the training classes' count; the task source serves no examples")
        if classifier not in cls.default_head:
            raise ValueError(f"classifier must be one of {sorted(cls.default_head)}, got {classifier!r}")
        encoder = cls.build_backbone(info, backbone, backbone_args, hidden=hidden)
        name = head or cls.default_head[classifier]
        return cls(encoder, feature_size(encoder, info.input_shape), info.train_classes,
                   build_head(name, **(head_args or {})), classifier, scale)

    def loss(self, batch: Examples) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy over the training classes; metrics per example [B]."""
        z = self.features(batch.x)
        if self.training:
            self.base_stats(z.detach())  # only its running mean is kept
        logits = self.classifier(z)
        nll = F.cross_entropy(logits, batch.y, reduction="none")
        return nll.mean(), {"loss": nll.detach(), "acc": (logits.argmax(-1) == batch.y).float()}

    @property
    def base_mean(self) -> torch.Tensor:
        """The running mean [D] of the training examples' features."""
        return self.base_stats.running_mean

    def evaluate(self, episode: Episode) -> dict[str, torch.Tensor]:
        """Per-task metrics [B] of test episodes through the head, the encoder frozen."""
        if isinstance(self.head, CL2N):
            self.head.mean = self.base_mean
        with torch.no_grad():
            return episode_metrics(self.log_probs(episode), episode.query_labels)[1]
