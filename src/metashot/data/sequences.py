"""Sequence episodes for memory-augmented networks (Santoro et al. 2016): labelled images one at a time.

An episode draws C classes, gives them labels shuffled for that episode, and presents ``instances``
examples of each class in a random order (T = C * instances steps). Labels are class indices
("onehot": y [T] in 0..C-1) or the paper's five-character strings ("string": y [T, 5], each character
in 0..4, the C strings distinct, drawn from the 3,125 possible). ``instance`` [T] counts the
presentations of the step's class so far (1 at its first appearance). Training images get random
small rotations and translations, applied to the whole batch with one ``affine_grid``/``grid_sample``.

Episode ``i`` depends only on ``(seed, i)``, and processes shard the stream, as in
:class:`~metashot.data.sampling.SeededSampler`. A source serves them through a :class:`SequenceTask` (the
Omniglot sources of :mod:`metashot.data.omniglot` do).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from metashot.batches import SequenceBatch, SequenceTaskInfo
from metashot.config import Config
from metashot.data.fewshot import FewShotDataset
from metashot.data.sampling import ClassLayout, SeededSampler, episode_generator, rank_batch

LABEL_MODES = ("onehot", "string")
STRING_LENGTH = 5  # characters per string label
STRING_SYMBOLS = 5  # values per character: 5 ** 5 = 3,125 labels


@dataclass(frozen=True)
class SequenceIndex:
    """One episode as the sampler draws it: flat image ``indices`` [T], labels ``y`` [T] or [T, 5],
    ``instance`` [T] and augmentation ``theta`` [T, 2, 3] (None without augmentation): rotation,
    then a translation in pixels (the collate scales it to the image size)."""

    indices: torch.Tensor
    y: torch.Tensor
    instance: torch.Tensor
    theta: torch.Tensor | None


def string_labels(codes: torch.Tensor) -> torch.Tensor:
    """Label codes in 0..3124, any shape [...], as five base-5 characters [..., 5]."""
    powers = STRING_SYMBOLS ** torch.arange(STRING_LENGTH - 1, -1, -1, device=codes.device)
    return codes.unsqueeze(-1).div(powers, rounding_mode="floor").remainder(STRING_SYMBOLS)


def instance_counts(classes: torch.Tensor, num_classes: int) -> torch.Tensor:
    """For a class sequence [..., T], the 1-based count of each step's class so far, [..., T]."""
    seen = F.one_hot(classes, num_classes).cumsum(-2)
    return seen.gather(-1, classes.unsqueeze(-1)).squeeze(-1)


class SequenceSampler(SeededSampler[SequenceIndex]):
    """Draws sequence episodes of ``classes`` classes x ``instances`` examples from ``num_classes``
    classes of ``examples_per_class`` examples (one number for all, or one per class).

    Classes without replacement; examples of a class without replacement, uniformly over the class's
    own examples; a random order of the T = classes * instances steps. With ``max_rotation`` (degrees)
    or ``max_shift`` (pixels) above 0, each image gets a uniform random rotation in +-max_rotation and
    shift in +-max_shift per axis. Episode ``i`` is drawn from a generator seeded with ``(seed, i)``;
    ``start``, ``rank`` and ``world_size`` as in :class:`~metashot.data.fewshot.SeededSampler`;
    ``class_names`` name the classes too small for the episodes in the error.
    """

    def __init__(
        self,
        num_classes: int,
        examples_per_class: int | Sequence[int] | torch.Tensor,
        classes: int,
        instances: int,
        episodes: int,
        labels: str = "onehot",
        max_rotation: float = 0.0,
        max_shift: float = 0.0,
        seed: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(episodes, seed, start, rank, world_size)
        if labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {labels!r}")
        if classes > num_classes:
            raise ValueError(f"{classes}-class episodes need {classes} classes, the data has {num_classes}")
        if instances < 1:
            raise ValueError(f"instances must be at least 1, got {instances}")
        self.layout = ClassLayout.of(num_classes, examples_per_class)
        message = self.layout.fewer_than(instances, "instances", class_names)
        if message is not None:
            raise ValueError(message)
        if labels == "string" and classes > STRING_SYMBOLS**STRING_LENGTH:
            raise ValueError(f"at most {STRING_SYMBOLS**STRING_LENGTH} distinct string labels")
        self.classes, self.instances, self.labels = classes, instances, labels
        self.max_rotation, self.max_shift = max_rotation, max_shift

    @property
    def augment(self) -> bool:
        return self.max_rotation > 0 or self.max_shift > 0

    def episode(self, i: int) -> SequenceIndex:
        g = episode_generator(self.seed, i)
        c, k, t = self.classes, self.instances, self.classes * self.instances
        drawn = self.layout.draw(g, c, k)  # row = episode label
        order = torch.randperm(t, generator=g)
        label = torch.arange(c).repeat_interleave(k)[order]  # [T] episode class of each step
        indices = drawn.reshape(-1)[order]
        if self.labels == "string":
            codes = torch.randperm(STRING_SYMBOLS**STRING_LENGTH, generator=g)[:c]
            y = string_labels(codes)[label]
        else:
            y = label
        theta = None
        if self.augment:
            angle = (torch.rand(t, generator=g) * 2 - 1) * math.radians(self.max_rotation)
            shift = (torch.rand(t, 2, generator=g) * 2 - 1) * self.max_shift
            cos, sin = angle.cos(), angle.sin()
            theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                                 torch.stack([sin, cos, shift[:, 1]], 1)], 1)
        return SequenceIndex(indices, y, instance_counts(label, c), theta)


class SequenceDataset(Dataset):
    """Serves :class:`SequenceIndex` items of ``data`` to a DataLoader; :meth:`collate` gathers the
    batch's images with one tensor index and augments them with one ``grid_sample``."""

    def __init__(self, data: FewShotDataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: SequenceIndex) -> SequenceIndex:
        return item

    def collate(self, items: Sequence[SequenceIndex]) -> SequenceBatch:
        indices = torch.stack([it.indices for it in items])  # [B, T]
        x = self.data.gather(indices)  # [B, T, C, H, W]
        if items[0].theta is not None:
            b, t = indices.shape
            flat = x.reshape(b * t, *x.shape[2:])
            theta = torch.cat([it.theta for it in items]).to(flat.dtype)
            # pixels to affine_grid's [-1, 1] coordinates
            theta[:, :, 2] *= torch.tensor([2.0 / flat.shape[-1], 2.0 / flat.shape[-2]])
            grid = F.affine_grid(theta, list(flat.shape), align_corners=False)
            x = F.grid_sample(flat, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False).reshape(x.shape)
        return SequenceBatch(x, torch.stack([it.y for it in items]),
                             torch.stack([it.instance for it in items]))


def sequence_loader(
    data: FewShotDataset,
    classes: int,
    instances: int,
    episodes: int,
    batch_size: int = 16,
    labels: str = "onehot",
    max_rotation: float = 0.0,
    max_shift: float = 0.0,
    seed: int = 0,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> DataLoader:
    """Batches (:class:`SequenceBatch`) of ``batch_size`` sequence episodes, ``episodes`` in all; process
    ``rank`` of ``world_size`` gets its batches of ``batch_size // world_size`` (see
    :class:`~metashot.data.fewshot.SeededSampler`)."""
    sampler = SequenceSampler(
        data.num_classes, data.class_sizes, classes, instances, episodes, labels,
        max_rotation, max_shift, seed, start, rank, world_size, class_names=data.class_names,
    )
    dataset = SequenceDataset(data)
    return DataLoader(dataset, sampler=sampler, batch_size=rank_batch(batch_size, world_size),
                      collate_fn=dataset.collate, num_workers=num_workers,
                      generator=torch.Generator())  # off the global RNG, as episode_loader


@dataclass(frozen=True)
class SequenceTask:
    """The sequence episodes a source serves, from its task_args: classes per episode (default: the
    config's ways), instances of each (10), labels ("onehot" or "string"), and max_rotation (degrees, 15)
    and max_shift (pixels, 2) of the training augmentation (0 turns it off; validation and test episodes
    are never augmented)."""

    classes: int
    instances: int
    labels: str
    max_rotation: float
    max_shift: float

    def __post_init__(self) -> None:
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {self.labels!r}")

    @classmethod
    def pop(cls, args: dict[str, Any], ways: int) -> SequenceTask:
        """The sequence task_args taken out of ``args``."""
        return cls(int(args.pop("classes", ways)), int(args.pop("instances", 10)),
                   args.pop("labels", "onehot"), float(args.pop("max_rotation", 15.0)),
                   float(args.pop("max_shift", 2.0)))

    @staticmethod
    def shape(cfg: Config) -> str:
        """The episodes of ``cfg`` in words, without building its source."""
        a = cfg.task_args
        return (f"{a.get('classes', cfg.ways)} classes x {a.get('instances', 10)} instances, "
                f"{a.get('labels', 'onehot')} labels")

    def info(self, input_shape: tuple[int, ...]) -> SequenceTaskInfo:
        """What a method learns of these episodes of images of ``input_shape``."""
        string = self.labels == "string"
        return SequenceTaskInfo(
            input_shape, self.classes, self.classes,
            label_groups=STRING_LENGTH if string else 1,
            label_values=STRING_SYMBOLS if string else self.classes,
            steps=self.classes * self.instances,
        )

    def loader(
        self, data: FewShotDataset, part: str, episodes: int, batch_size: int, **stream: int
    ) -> DataLoader:
        """:func:`sequence_loader` of ``data``, ``part``'s classes (augmented for "train" only); ``stream``:
        seed, start, rank and world_size."""
        rotation, shift = (self.max_rotation, self.max_shift) if part == "train" else (0.0, 0.0)
        return sequence_loader(data, self.classes, self.instances, episodes, batch_size, self.labels,
                               rotation, shift, **stream)


def __getattr__(name: str) -> Any:
    # the Omniglot sources serve sequences with this module's loader, so the sequence-only source lives
    # beside them; imported here when asked, under its old address
    if name == "OmniglotSequenceSource":
        from metashot.data.omniglot import OmniglotSequenceSource

        return OmniglotSequenceSource
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
