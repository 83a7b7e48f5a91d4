"""The types the data and the methods share: episodes, sequence batches and what a method knows of
its tasks. Neither ``metashot.data`` nor ``metashot.methods`` is imported here."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Self

import torch


@dataclass(frozen=True)
class TaskInfo:
    """What a method needs to know of its tasks to build itself.

    input_shape: one example's shape, e.g. (1, 28, 28); ways: classes per task at train and test
    time (a classifier head's width; 1 for regression); train_ways: ways in training episodes;
    regression: targets are real values (``ways`` of them per example), not class labels;
    train_classes: the classes of the training part, the width of a classifier pretrained on all of
    them (0 when the source does not say).
    """

    input_shape: tuple[int, ...]
    ways: int
    train_ways: int
    regression: bool = False
    train_classes: int = 0


@dataclass(frozen=True)
class SequenceTaskInfo(TaskInfo):
    """A :class:`TaskInfo` for sequence episodes: labels are ``label_groups`` independent
    categorical variables of ``label_values`` values each (one-hot: 1 group of C; strings: 5 of 5)."""

    label_groups: int = 1
    label_values: int = 0
    steps: int = 0


BATCH_KINDS = ("episodes", "sequences", "examples")
"""What a method trains or is tested on: :class:`Episode` batches, :class:`SequenceBatch` es, or
:class:`Examples` (plain labelled minibatches over every class of the training part)."""


def move(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """``x`` on ``device``: without waiting when it goes to an accelerator (a pinned batch's copy overlaps
    the step), blocking when it comes back to the CPU, where an asynchronous copy would be read unfinished."""
    return x.to(device, non_blocking=torch.device(device).type != "cpu")


class TensorBatch:
    """A dataclass batch of tensors whose leading dimension is the batch: moved field by field, its
    length that dimension."""

    def to(self, device: torch.device | str) -> Self:
        return type(self)(*(move(getattr(self, f.name), device) for f in fields(self)))

    def __len__(self) -> int:
        return getattr(self, fields(self)[0].name).shape[0]


@dataclass
class Examples(TensorBatch):
    """A minibatch of labelled examples, for supervised pretraining on every training class.

    x: [B, C, H, W] float images; y: [B] class labels in 0..train_classes-1; index: [B] each example's
    position in its seeded stream (which, with the seed, fixes its augmentation).
    """

    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor


@dataclass
class SequenceBatch(TensorBatch):
    """B sequence episodes of T steps.

    x: [B, T, C, H, W] float images; y: [B, T] class labels (one-hot mode) or [B, T, 5] string
    characters; instance: [B, T] int, the n-th presentation of the step's class (1-based).
    """

    x: torch.Tensor
    y: torch.Tensor
    instance: torch.Tensor


@dataclass
class Episode:
    """One N-way K-shot Q-query episode, or a batch of B of them (a leading B dim on every field).

    support: [(B,) N*K, C, H, W] class-major (class 0's K shots first); support_labels [(B,) N*K]
    in 0..N-1; query: [(B,) N*Q, C, H, W]; query_labels: [(B,) N*Q]. num_ways: N when the builder
    knows it (the sampler does), else counted from the labels when asked.
    """

    support: torch.Tensor
    support_labels: torch.Tensor
    query: torch.Tensor
    query_labels: torch.Tensor
    num_ways: int | None = None

    TENSORS = ("support", "support_labels", "query", "query_labels")

    def to(self, device: torch.device | str) -> Episode:
        moved = (move(getattr(self, name), device) for name in self.TENSORS)
        return type(self)(*moved, num_ways=self.num_ways)

    @classmethod
    def collate(cls, items: Sequence[Episode]) -> Episode:
        ways = {e.num_ways for e in items}
        stacked = (torch.stack([getattr(e, name) for e in items]) for name in cls.TENSORS)
        return cls(*stacked, num_ways=ways.pop() if len(ways) == 1 else None)

    @property
    def ways(self) -> int:
        """N; counting it from the labels syncs with the device, so the sampler's episodes carry it."""
        return self.num_ways if self.num_ways is not None else int(self.support_labels.max()) + 1


