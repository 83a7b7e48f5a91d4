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

Batch norm takes its statistics over the whole minibatch, or with ``norm_batch`` over groups of that
many examples (examples k, k + G, k + 2G, ... of the G groups), so that N processes, each normalising its
own groups, train exactly as one (``--batch-size`` over N a multiple of ``norm_batch``).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import Episode, Examples, TaskInfo
from metashot.errors import ConfigError
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
        scale: float = 10.0, norm_batch: int | None = None,
    ) -> None:
        super().__init__(encoder, head)
        if norm_batch is not None and norm_batch < 2:
            raise ValueError(f"norm_batch must be at least 2 (batch norm needs two examples), "
                             f"got {norm_batch}")
        self.norm_batch = norm_batch
        args = {"scale": scale} if kind == "cosine" else {}
        self.classifier = classifier(kind, features, classes, **args)
        self.base_stats = nn.BatchNorm1d(features, affine=False, momentum=MEAN_MOMENTUM)

    @classmethod
    def build(
        cls, info: TaskInfo, backbone: str | None = None, backbone_args: dict[str, Any] | None = None,
        hidden: int | None = None, classifier: str = "linear", scale: float = 10.0, head: str | None = None,
        head_args: dict[str, Any] | None = None, norm_batch: int | None = None,
    ) -> Method:
        """``hidden``: the backbone's width; ``head`` (default: the classifier's kind, or the method's own)
        a name in :data:`metashot.methods.HEADS`, built with ``head_args``; ``norm_batch`` as above."""
        from metashot.methods import build_head

        if not info.train_classes:
            raise ValueError("needs the training classes' count; the task source serves no examples")
        if classifier not in cls.default_head:
            raise ValueError(f"classifier must be one of {sorted(cls.default_head)}, got {classifier!r}")
        encoder = cls.build_backbone(info, backbone, backbone_args, hidden=hidden)
        name = head or cls.default_head[classifier]
        return cls(encoder, feature_size(encoder, info.input_shape), info.train_classes,
                   build_head(name, **(head_args or {})), classifier, scale, norm_batch)

    def loss(self, batch: Examples) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Cross-entropy over the training classes; metrics per example [B] (group after group)."""
        groups = self.norm_units(batch)
        logits, labels = [], []
        for k in range(groups):
            z = self.features(batch.x[k::groups])
            if self.training:
                self.base_stats(z.detach())  # only its running mean is kept
            logits.append(self.classifier(z))
            labels.append(batch.y[k::groups])
        logits, y = torch.cat(logits), torch.cat(labels)
        nll = F.cross_entropy(logits, y, reduction="none")
        return nll.mean(), {"loss": nll.detach(), "acc": (logits.argmax(-1) == y).float()}

    def norm_units(self, batch: Examples) -> int:
        return 1 if self.norm_batch is None else len(batch) // self.norm_batch

    def check_batch(self, size: int) -> None:
        if self.norm_batch is not None and size % self.norm_batch:
            raise ConfigError(f"a process's batch of {size} examples does not split into groups of "
                              f"norm_batch {self.norm_batch}: pass a --batch-size whose share per process "
                              "is a multiple")

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
