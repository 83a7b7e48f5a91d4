"""Task sources: what the trainer and evaluator iterate, built from a :class:`Config`.

A task source knows its data and episode shape; ``loader(part, episodes, seed, start, rank, world_size)``
yields batches (an :class:`Episode` of ``meta_batch`` tasks, or another batch type a method takes), each
of ``world_size`` processes its share of every batch. Register a new one in ``TASKS``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from functools import cached_property
from typing import Any

import torch

from metashot.batches import SequenceTaskInfo, TaskInfo
from metashot.config import Config
from metashot.data.fewshot import SMALL_CLASSES, FewShotDataset, episode_loader
from metashot.data.omniglot import Omniglot
from metashot.data.sequences import (
    LABEL_MODES,
    STRING_LENGTH,
    STRING_SYMBOLS,
    sequence_loader,
)
from metashot.data.sinusoid import sinusoid_loader
from metashot.errors import ConfigError

PARTS = ("train", "val", "test")


class TaskSource(ABC):
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @property
    @abstractmethod
    def info(self) -> TaskInfo: ...

    @abstractmethod
    def loader(
        self, part: str, episodes: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterable[Any]:
        """Batches of tasks from ``part`` ("train", "val" or "test"); episode ``i`` fixed by ``seed``.

        ``episodes`` and ``start`` count the episodes of all processes; process ``rank`` of
        ``world_size`` draws ``range(start + rank, episodes, world_size)`` in batches of
        ``cfg.meta_batch // world_size``, so that the processes' step s together is the one-process
        step s (:class:`~metashot.data.fewshot.SeededSampler`). A ValueError when ``cfg.meta_batch``
        does not split over ``world_size``.
        """

    @staticmethod
    def shape(cfg: Config) -> str:
        """The episode shape of ``cfg`` in words (``metashot presets``), without building the source."""
        return (f"{cfg.ways}-way {cfg.shots}-shot, trained {cfg.train_ways}-way "
                f"with {cfg.train_queries} queries per class")


class FewShotSource(TaskSource):
    """N-way K-shot episodes from classes split into train / val / test ``FewShotDataset``s."""

    @abstractmethod
    def dataset(self, part: str) -> FewShotDataset: ...

    @property
    def info(self) -> TaskInfo:
        return TaskInfo(self.dataset("test").image_shape, self.cfg.ways, self.cfg.train_ways)

    def episode_shape(self, part: str) -> tuple[int, int, int]:
        """Ways, shots and queries per class of ``part``'s episodes (training has its own)."""
        c = self.cfg
        if part == "train":
            return c.train_ways, c.train_shots, c.train_queries
        return c.ways, c.shots, c.queries

    def loader(
        self, part: str, episodes: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterable[Any]:
        ways, shots, queries = self.episode_shape(part)
        return episode_loader(
            self.dataset(part),
            ways=ways,
            shots=shots,
            queries=queries,
            episodes=episodes,
            meta_batch=self.cfg.meta_batch,
            seed=seed,
            start=start,
            rank=rank,
            world_size=world_size,
        )


class OmniglotSource(FewShotSource):
    """Omniglot; task_args: split ("random"), image_size (28), rotations (True), val_characters (172)."""

    default_image_size = 28

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        args = dict(cfg.task_args)
        self.image_size = args.pop("image_size", self.default_image_size)
        self.split = args.pop("split", "random")
        self.rotations = args.pop("rotations", True)
        self.val_characters = args.pop("val_characters", 172)
        self._parse(args)
        if args:
            raise ValueError(f"unknown {cfg.task} task_args {sorted(args)}")
        self._parts: dict[str, FewShotDataset] = {}

    def _parse(self, args: dict[str, Any]) -> None:
        """Pop a subclass's own task_args."""

    @cached_property
    def omniglot(self) -> Omniglot:
        return Omniglot.load(self.cfg.data_dir, self.image_size)

    def dataset(self, part: str) -> FewShotDataset:
        if part not in self._parts:
            self._parts[part] = self.omniglot.classes(
                self.split, part, self.rotations, self.cfg.class_split_seed, self.val_characters
            )
        return self._parts[part]


class FolderSource(FewShotSource):
    """A folder of class sub-folders (``data_dir``), its classes split by ``split_seed`` into train/val/test.

    task_args: image_size (28), channels (1), fractions ([0.6, 0.2, 0.2]), small_classes ("error" or
    "drop": what to do with a part's classes of fewer images than that part's shots + queries).
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        if cfg.data_dir is None:
            raise ValueError("the folder task needs --data-dir, a folder of class sub-folders")
        args = dict(cfg.task_args)
        image_size, channels = args.pop("image_size", 28), args.pop("channels", 1)
        fractions = args.pop("fractions", [0.6, 0.2, 0.2])
        small_classes = args.pop("small_classes", "error")
        if args:
            raise ValueError(f"unknown folder task_args {sorted(args)}")
        if small_classes not in SMALL_CLASSES:  # before the folder is decoded
            raise ValueError(f"small_classes must be one of {SMALL_CLASSES}, got {small_classes!r}")
        data = FewShotDataset.from_folder(cfg.data_dir, image_size, channels)
        perm = torch.randperm(data.num_classes, generator=torch.Generator().manual_seed(cfg.class_split_seed))
        bounds = torch.tensor([0.0, *fractions]).cumsum(0).mul(data.num_classes).round().long()
        self.small_classes = small_classes
        self._split = {
            p: data.subset(perm[a:b]) for p, a, b in zip(PARTS, bounds[:-1].tolist(), bounds[1:].tolist())
        }
        self._parts: dict[str, FewShotDataset] = {}

    def dataset(self, part: str) -> FewShotDataset:
        """``part``'s classes; those with fewer images than its episodes' shots + queries are named in an
        error or left out with a warning, as ``small_classes`` says."""
        if part not in self._parts:
            _, shots, queries = self.episode_shape(part)
            self._parts[part] = self._split[part].require(
                shots + queries, f"shots + queries = {shots} + {queries}", self.small_classes,
                hint="--set task_args='{\"small_classes\": \"drop\"}' leaves them out",
            )
        return self._parts[part]


class OmniglotSequenceSource(OmniglotSource):
    """Omniglot sequence episodes for MANN (Santoro et al. 2016), batches of ``cfg.meta_batch``.

    task_args: those of "omniglot" (image_size 20 here), and classes (default ``cfg.ways``),
    instances (10), labels ("onehot" or "string"), max_rotation (degrees, 15) and max_shift (pixels, 2)
    of the training augmentation (0 turns it off; validation and test episodes are never augmented).
    """

    default_image_size = 20

    @staticmethod
    def shape(cfg: Config) -> str:
        a = cfg.task_args
        return (f"{a.get('classes', cfg.ways)} classes x {a.get('instances', 10)} instances, "
                f"{a.get('labels', 'onehot')} labels")

    def _parse(self, args: dict[str, Any]) -> None:
        self.classes = int(args.pop("classes", self.cfg.ways))
        self.instances = int(args.pop("instances", 10))
        self.labels = args.pop("labels", "onehot")
        self.max_rotation = float(args.pop("max_rotation", 15.0))
        self.max_shift = float(args.pop("max_shift", 2.0))
        if self.labels not in LABEL_MODES:
            raise ValueError(f"labels must be one of {LABEL_MODES}, got {self.labels!r}")

    @property
    def info(self) -> SequenceTaskInfo:
        string = self.labels == "string"
        return SequenceTaskInfo(
            (1, self.image_size, self.image_size), self.classes, self.classes,
            label_groups=STRING_LENGTH if string else 1,
            label_values=STRING_SYMBOLS if string else self.classes,
            steps=self.classes * self.instances,
        )

    def loader(
        self, part: str, episodes: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterable[Any]:
        train = part == "train"
        return sequence_loader(
            self.dataset(part), self.classes, self.instances, episodes, self.cfg.meta_batch,
            self.labels, self.max_rotation if train else 0.0, self.max_shift if train else 0.0,
            seed=seed, start=start, rank=rank, world_size=world_size,
        )


class SinusoidSource(TaskSource):
    """Sinusoid regression (MAML section 5.1): ``shots`` support and ``queries`` query points per task.

    Needs no data. Inputs and targets are [B, K, 1] floats; the parts draw different tasks.
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        if cfg.task_args:
            raise ValueError(f"unknown sinusoid task_args {sorted(cfg.task_args)}")

    @property
    def info(self) -> TaskInfo:
        return TaskInfo((1,), 1, 1, regression=True)

    @staticmethod
    def shape(cfg: Config) -> str:
        return f"K={cfg.train_shots} in training, K={cfg.shots} at test"

    def loader(
        self, part: str, episodes: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> Iterable[Any]:
        c = self.cfg
        train = part == "train"
        return sinusoid_loader(
            c.train_shots if train else c.shots, c.train_queries if train else c.queries,
            episodes, c.meta_batch, seed, part, start, rank, world_size,
        )


TASKS: dict[str, type[TaskSource]] = {
    "omniglot": OmniglotSource,
    "folder": FolderSource,
    "sinusoid": SinusoidSource,
    "omniglot-sequences": OmniglotSequenceSource,
}


def build_source(cfg: Config) -> TaskSource:
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[cfg.task](cfg)


def checked_source(cfg: Config) -> TaskSource:
    """:func:`build_source`, with every part's episode shape checked against the data: a problem is a
    :class:`ConfigError` naming the task (and the part), raised before any work is done."""
    try:
        source = build_source(cfg)
        for part in PARTS:
            try:
                source.loader(part, cfg.meta_batch, seed=cfg.seed)
            except ValueError as e:
                raise ConfigError(f"{cfg.task}, {part} classes: {e}") from None
    except ConfigError:
        raise
    except ValueError as e:
        raise ConfigError(f"{cfg.task}: {e}") from None
    return source
