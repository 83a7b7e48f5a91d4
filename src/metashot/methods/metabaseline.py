"""Meta-Baseline (Chen, Liu, Xu, Darrell & Wang, "Meta-Baseline: Exploring Simple Meta-Learning for
Few-Shot Learning", ICCV 2021).

Two stages: a classifier pretrained on all training classes (Classifier-Baseline, Sec. 3.1; metashot's
``baseline`` with a linear classifier), then meta-training from its encoder's weights with the
prototype rule on cosine similarity times a learned scale tau (Sec. 3.2, eq. 2):
p(y = c | x) = softmax_c(tau * cos(f(x), w_c)), w_c the mean support feature of class c. The staged
presets (``metashot presets``) run both; this method is the second stage.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from metashot.batches import TaskInfo
from metashot.methods.base import Method
from metashot.methods.protonet import ProtoNet


class MetaBaseline(ProtoNet):
    """ProtoNet with the cosine distance and a learned scale, started at ``scale`` (the paper's 10)."""

    def __init__(self, encoder: nn.Module | None = None, scale: float = 10.0) -> None:
        super().__init__(encoder, "cosine", 1 / scale, learn_scale=True)

    @classmethod
    def build(
        cls, info: TaskInfo, backbone: str | None = None, backbone_args: dict[str, Any] | None = None,
        hidden: int | None = None, scale: float = 10.0,
    ) -> Method:
        """``hidden``: the backbone's width (its ``hidden`` argument)."""
        return cls(cls.build_backbone(info, backbone, backbone_args, hidden=hidden), scale)
