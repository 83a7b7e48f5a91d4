"""The interface every meta-learning method meets, so one trainer and one evaluator serve them all."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import torch
from torch import nn

from metashot.batches import TaskInfo
from metashot.nn.backbones import make_backbone


class Method(nn.Module, ABC):
    """A meta-learner: a loss on a batch of tasks, and per-task metrics.

    ``loss`` is what the trainer minimises; ``evaluate`` gives per-task metrics at test time (by
    default the same metrics as ``loss``, without gradients). Every metric is a [B] tensor, one value
    per task of the batch. ``metric`` names the one used to pick checkpoints and to report.
    """

    metric: ClassVar[str] = "acc"
    # the kinds of batch (metashot.batches.BATCH_KINDS) the task source serves it to train and to test on
    train_batches: ClassVar[str] = "episodes"
    test_batches: ClassVar[str] = "episodes"
    maximize: ClassVar[bool] = True
    default_backbone: ClassVar[str | None] = None  # the paper's network, a name in metashot.nn.BACKBONES

    @classmethod
    def build(
        cls, info: TaskInfo, backbone: str | None = None, backbone_args: dict[str, Any] | None = None,
        **kwargs: Any,
    ) -> Method:
        """Construct the method for tasks described by ``info``; ``backbone`` (a name in
        :data:`metashot.nn.BACKBONES` or ``package.module:factory``; None: ``default_backbone``) built
        with ``backbone_args``, and ``kwargs``, come from the config. This default takes no backbone."""
        if backbone is not None or backbone_args:
            raise ValueError(f"{cls.__name__} has no backbone to build")
        return cls(**kwargs)

    @classmethod
    def build_backbone(
        cls, info: TaskInfo, backbone: str | None, backbone_args: dict[str, Any] | None, **defaults: Any
    ) -> nn.Module | None:
        """The backbone ``backbone`` (None: ``default_backbone``; both None: no backbone) for examples of
        ``info.input_shape``, with ``backbone_args`` over ``defaults`` (method args such as ``hidden``;
        None values are left out)."""
        name = backbone or cls.default_backbone
        if name is None:
            if backbone_args:
                raise ValueError(f"backbone_args {backbone_args} need a backbone; {cls.__name__} has none")
            return None
        args = {k: v for k, v in defaults.items() if v is not None} | (backbone_args or {})
        return make_backbone(name, info.input_shape, **args)

    @abstractmethod
    def loss(self, batch: Any) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Scalar training loss and per-task metrics, each of shape [B]."""

    @classmethod
    def upgrade_weights(cls, weights: dict[str, Any]) -> dict[str, Any]:
        """Weights of this method saved by an older metashot, renamed to today's keys (default: as given)."""
        return weights

    def param_groups(self, lr: float) -> list[dict[str, Any]]:
        """The optimizer's parameter groups: every parameter at ``lr``, except those of a submodule with an
        ``lr_scale`` (a fine-tuned pretrained backbone: P>M>F's lower backbone rate), at ``lr * lr_scale``."""
        scaled = [(m, float(m.lr_scale)) for m in self.modules() if getattr(m, "lr_scale", None) is not None]
        apart = {id(p) for m, _ in scaled for p in m.parameters()}
        groups = [{"params": [p for p in self.parameters() if id(p) not in apart]}]
        groups += [{"params": list(m.parameters()), "lr": lr * scale} for m, scale in scaled]
        return [g for g in groups if g["params"]]

    def norm_units(self, batch: Any) -> int:
        """The units (episodes, or groups of examples) of ``batch`` that batch norm normalises apart,
        each with its own calls in turn: how many processes' statistics fold into one process's
        (:class:`metashot.distributed.RunningStats`). Default: the batch's episodes, the leading
        dimension of its tensors."""
        return next(v for v in vars(batch).values() if isinstance(v, torch.Tensor)).shape[0]

    def check_batch(self, size: int) -> None:
        """A :class:`~metashot.errors.ConfigError` when this process's training batches of ``size`` (episodes
        or examples) do not fit the method; called before training. Default: any size fits."""

    def autocast_safe(self) -> bool:
        """Whether ``loss`` and ``evaluate`` may run under bfloat16 autocast (``--precision bf16``): False
        where training differentiates through a gradient (second-order MAML), since a double backward in
        reduced precision is unsafe; ``--precision bf16-all`` autocasts it anyway. Default True."""
        return True

    def on_step(self, step: int) -> None:
        """Called by the trainer before training step ``step`` (0-based, counting optimizer steps), for
        schedules that live inside a method (MAML++'s annealing). Default: nothing."""

    def evaluate(self, batch: Any) -> dict[str, torch.Tensor]:
        """Per-task metrics [B] on a test batch."""
        with torch.no_grad():
            return self.loss(batch)[1]
