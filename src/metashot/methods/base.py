"""The interface every meta-learning method meets, so one trainer and one evaluator serve them all."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from metashot.batches import TaskInfo


class Method(nn.Module, ABC):
    """A meta-learner: a loss on a batch of tasks, and per-task metrics.

    ``loss`` is what the trainer minimises; ``evaluate`` gives per-task metrics at test time (by
    default the same metrics as ``loss``, without gradients). Every metric is a [B] tensor, one value
    per task of the batch. ``metric`` names the one used to pick checkpoints and to report.
    """

    metric: ClassVar[str] = "acc"
    maximize: ClassVar[bool] = True

    @classmethod
    def build(cls, info: TaskInfo, **kwargs: Any) -> Method:
        """Construct the method for tasks described by ``info``; ``kwargs`` come from the config."""
        return cls(**kwargs)

    @abstractmethod
    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar training loss and per-task metrics, each of shape [B]."""

    def on_step(self, step: int) -> None:
        """Called by the trainer before training step ``step`` (0-based, counting optimizer steps), for
        schedules that live inside a method (MAML++'s annealing). Default: nothing."""

    def evaluate(self, batch: Any) -> dict[str, torch.Tensor]:
        """Per-task metrics [B] on a test batch."""
        with torch.no_grad():
            return self.loss(batch)[1]
