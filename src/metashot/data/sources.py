"""The task-source interface: what the trainer and evaluator iterate, built from a :class:`Config`.

A task source knows its data and episode shape; ``loader(part, episodes, seed, start, rank, world_size)``
yields batches (an :class:`Episode` of ``meta_batch`` tasks, or another batch type a method takes), each
of ``world_size`` processes its share of every batch. Each source lives beside its data; register it in
:data:`metashot.data.tasks.TASKS`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from typing import Any, ClassVar

from metashot.batches import TaskInfo
from metashot.config import Config
from metashot.data.fewshot import FewShotDataset, episode_loader
from metashot.data.sampling import EpisodeSampler
from metashot.errors import ConfigError

PARTS = ("train", "val", "test")


class TaskSource(ABC):
    """``kinds``: the kinds of batch (:data:`~metashot.batches.BATCH_KINDS`) the source serves, the first
    its default."""

    kinds: ClassVar[tuple[str, ...]] = ("episodes",)

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg

    @property
    @abstractmethod
    def info(self) -> TaskInfo: ...

    def task_info(self, kind: str | None = None) -> TaskInfo:
        """What a method trained or tested on ``kind`` batches knows of the tasks (default: :attr:`info`)."""
        self.check_kind(kind)
        return self.info

    def check_kind(self, kind: str | None) -> str:
        """``kind``, or the source's default kind for None; a :class:`ConfigError` when the source does not
        serve ``kind`` batches."""
        if kind is None:
            return self.kinds[0]
        if kind not in self.kinds:
            raise ConfigError(f"--task {self.cfg.task} serves {' and '.join(self.kinds)}, not {kind}; "
                              "pick a task that serves what the method trains on")
        return kind

    @abstractmethod
    def loader(
        self, part: str, episodes: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
        kind: str | None = None,
    ) -> Iterable[Any]:
        """Batches of tasks from ``part`` ("train", "val" or "test"); episode ``i`` fixed by ``seed``.
        ``kind`` is one of :attr:`kinds` (None: the first); for "examples", ``episodes`` and ``start``
        count examples and the batches are :class:`~metashot.batches.Examples` of ``cfg.batch_size``.

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

    def report(self) -> dict[str, Any]:
        """What ``metashot data`` prints: each part's classes and images, and the image shape."""
        parts = {}
        for part in PARTS:
            sizes = self.dataset(part).class_sizes
            parts[part] = {"classes": len(sizes), "images": int(sizes.sum()),
                           "images_per_class": [int(sizes.min()), int(sizes.max())] if len(sizes) else [0, 0]}
        return {"task": self.cfg.task, "root": self.cfg.data_dir,
                "image_shape": list(self.dataset("test").image_shape), "parts": parts}

    def episode_shape(self, part: str) -> tuple[int, int, int]:
        """Ways, shots and queries per class of ``part``'s episodes (training has its own)."""
        c = self.cfg
        if part == "train":
            return c.train_ways, c.train_shots, c.train_queries
        return c.ways, c.shots, c.queries

    def sampler(self, part: str, episodes: int, **stream: int) -> EpisodeSampler:
        """``part``'s episode sampler; ``stream``: seed, start, rank and world_size (see :meth:`loader`)."""
        ways, shots, queries = self.episode_shape(part)
        data = self.dataset(part)
        return data.sampler(ways=ways, shots=shots, queries=queries, episodes=episodes, **stream)

    def loader(
        self, part: str, episodes: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
        kind: str | None = None,
    ) -> Iterable[Any]:
        kind = self.check_kind(kind)
        sampler = self.sampler(part, episodes, seed=seed, start=start, rank=rank, world_size=world_size)
        return episode_loader(self.dataset(part), sampler, self.cfg.meta_batch, world_size)
