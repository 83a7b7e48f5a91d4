"""The task-source interface: what the trainer and evaluator iterate, built from a :class:`Config`.

A task source knows its data and episode shape; ``loader(part, episodes, seed, start, rank, world_size)``
yields batches (an :class:`Episode` of ``meta_batch`` tasks, or another batch type a method takes), each
of ``world_size`` processes its share of every batch. Each source lives beside its data; register it in
:data:`metashot.data.tasks.TASKS`.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, ClassVar

import torch

from metashot.batches import Examples, TaskInfo
from metashot.config import Config
from metashot.data.examples import ExampleSampler, ExampleSet, example_loader
from metashot.data.fewshot import FewShotDataset, device_episode_loader, episode_loader, to_device
from metashot.data.images import read_images
from metashot.data.sampling import EpisodeSampler
from metashot.devices import check_device, local_placement
from metashot.errors import ConfigError, DataError

PARTS = ("train", "val", "test")


class TaskSource(ABC):
    """``kinds``: the kinds of batch (:data:`~metashot.batches.BATCH_KINDS`) the source serves, the first
    its default; ``device_kinds``: those it can gather on the training device (``cfg.data_on_device``)."""

    kinds: ClassVar[tuple[str, ...]] = ("episodes",)
    device_kinds: ClassVar[tuple[str, ...]] = ()

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
        serve ``kind`` batches, or not on the device that ``cfg.data_on_device`` asks for."""
        kind = self.kinds[0] if kind is None else kind
        if kind not in self.kinds:
            raise ConfigError(f"--task {self.cfg.task} serves {' and '.join(self.kinds)}, not {kind}; "
                              "pick a task that serves what the method trains on")
        if self.cfg.data_on_device and kind not in self.device_kinds:
            raise ConfigError(f"--data-on-device: --task {self.cfg.task} gathers its {kind} on the CPU; only "
                              "the image tasks' episodes and examples (omniglot, folder, miniimagenet, ...) "
                              "are gathered on the device")
        return kind

    @abstractmethod
    def loader(
        self, part: str, episodes: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
        kind: str | None = None,
    ) -> Iterable[Any]:
        """Batches of tasks from ``part`` ("train", "val" or "test"); episode ``i`` fixed by ``seed``.
        ``kind`` is one of :attr:`kinds` (None: the first); for "examples", ``episodes`` and ``start``
        count examples and the batches are :class:`~metashot.batches.Examples` of ``cfg.batch_size``.

        ``episodes`` and ``start`` count the items of all processes; process ``rank`` of
        ``world_size`` draws ``range(start + rank, episodes, world_size)`` in batches of
        ``cfg.per_step(kind) // world_size``, so that the processes' step s together is the one-process
        step s (:class:`~metashot.data.sampling.SeededSampler`). A ValueError when ``cfg.per_step(kind)``
        does not split over ``world_size``.
        """

    @staticmethod
    def shape(cfg: Config) -> str:
        """The episode shape of ``cfg`` in words (``metashot presets``), without building the source."""
        return (f"{cfg.ways}-way {cfg.shots}-shot, trained {cfg.train_ways}-way "
                f"with {cfg.train_queries} queries per class")

    def decode_files(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """Image files decoded exactly as this task decoded its own images into its dataset (same size,
        channels, resampling): [M, C, H, W] of the stored dtype. A :class:`DataError` naming a file that
        does not decode; a :class:`ConfigError` for a task without image episodes."""
        raise self.no_images()

    def present(self, images: torch.Tensor) -> torch.Tensor:
        """Stored images [M, C, H, W] as a test episode hands them to a method: float, scaled,
        normalised, not augmented, on the images' device."""
        raise self.no_images()

    def examples(self, part: str, index: torch.Tensor) -> torch.Tensor:
        """:meth:`present` of the images at flat indices ``index`` [M] of ``part``'s dataset:
        [M, C, H, W]."""
        raise self.no_images()

    def no_images(self) -> ConfigError:
        """The error of asking this task for images when its test episodes are not of images."""
        return ConfigError(f"--task {self.cfg.task} has no images: its test batches are not episodes of "
                           "images (take a task that has them: omniglot, folder, miniimagenet, ...)")


class FewShotSource(TaskSource):
    """N-way K-shot episodes from classes split into train / val / test ``FewShotDataset``s, and the
    train part's labelled examples (:mod:`~metashot.data.examples`) for a method trained on all its
    classes."""

    kinds = ("episodes", "examples")
    device_kinds = ("episodes", "examples")

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        self._on_device: dict[str, FewShotDataset] = {}  # with cfg.data_on_device (:meth:`gathered`)

    @abstractmethod
    def dataset(self, part: str) -> FewShotDataset: ...

    @property
    def info(self) -> TaskInfo:
        return TaskInfo(self.dataset("test").image_shape, self.cfg.ways, self.cfg.train_ways,
                        train_classes=self.dataset("train").num_classes)

    def report(self) -> dict[str, Any]:
        """What ``metashot data`` prints: each part's classes and images, and the image shape."""
        parts = {}
        for part in PARTS:
            sizes = self.dataset(part).class_sizes
            parts[part] = {"classes": len(sizes), "images": int(sizes.sum()),
                           "images_per_class": [int(sizes.min()), int(sizes.max())] if len(sizes) else [0, 0]}
        return {"task": self.cfg.task, "root": self.cfg.data_dir,
                "image_shape": list(self.dataset("test").image_shape), "parts": parts}

    def decode_files(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """:meth:`TaskSource.decode_files`; here read by :func:`~metashot.data.images.read_images` at the
        dataset's size and channels (uint8), as a folder of images is read."""
        channels, size, _ = self.dataset("test").image_shape
        return read_files(paths, size, channels)

    def present(self, images: torch.Tensor) -> torch.Tensor:
        """:meth:`TaskSource.present`; here uint8 scaled to [0, 1] (``FewShotDataset.gather``)."""
        return images.float().div(255) if images.dtype == torch.uint8 else images.float()

    def examples(self, part: str, index: torch.Tensor) -> torch.Tensor:
        return self.present(self.dataset(part).flat[index])

    def data_key(self, part: str) -> dict[str, Any]:
        """What identifies ``part``'s images as :meth:`examples` hands them out, for what is computed from
        them (:mod:`~metashot.data.features`): here a hash of the pixels; and the classes' names and sizes."""
        data = self.dataset(part)
        pixels = hashlib.blake2b(digest_size=16)
        for start in range(0, len(data), 1024):
            pixels.update(data.flat[start:start + 1024].contiguous().numpy().tobytes())
        return {"images": pixels.hexdigest(), "classes": class_key(data)}

    def gathered(self, part: str) -> FewShotDataset:
        """``part``'s dataset where its batches are gathered: with ``cfg.data_on_device`` a copy on the
        training device (:func:`data_device`), made once and kept; else :meth:`dataset` itself."""
        if not self.cfg.data_on_device:
            return self.dataset(part)
        if part not in self._on_device:
            self._on_device[part] = self.dataset(part).to(data_device(self.cfg))
        return self._on_device[part]

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

    def example_sampler(self, part: str, examples: int, **stream: int) -> ExampleSampler:
        """The sampler of ``part``'s examples, which only the train part serves (a ValueError for another);
        ``stream`` as in :meth:`sampler`."""
        if part != "train":
            raise ValueError(f"--task {self.cfg.task} serves batches of examples of its train part only, "
                             f"not of {part}, which it serves as episodes")
        return ExampleSampler(len(self.dataset(part)), examples, **stream)

    def loader(
        self, part: str, episodes: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
        kind: str | None = None,
    ) -> Iterable[Any]:
        batches = self.example_batches if self.check_kind(kind) == "examples" else self.episode_batches
        return batches(part, episodes, seed=seed, start=start, rank=rank, world_size=world_size)

    def episode_batches(self, part: str, episodes: int, **stream: int) -> Iterable[Any]:
        """:meth:`loader`'s batches of ``meta_batch`` episodes; ``stream`` as in :meth:`sampler`."""
        sampler = self.sampler(part, episodes, **stream)
        loader = device_episode_loader if self.cfg.data_on_device else episode_loader
        return loader(self.gathered(part), sampler, self.cfg.meta_batch, stream["world_size"])

    def example_batches(self, part: str, examples: int, **stream: int) -> Iterable[Any]:
        """:meth:`loader`'s :class:`~metashot.batches.Examples` of ``batch_size`` examples of the train
        part; ``stream`` as in :meth:`sampler`."""
        sampler = self.example_sampler(part, examples, **stream)
        data = (DeviceExampleSet if self.cfg.data_on_device else ExampleSet)(self.gathered(part))
        return example_loader(data, sampler, self.cfg.batch_size, stream["world_size"])


class DeviceExampleSet(ExampleSet):
    """An :class:`ExampleSet` whose :meth:`collate` gathers the images, their labels and stream positions
    where ``data.flat`` lies (on a device with ``FewShotDataset.to``), the sampler's CPU indices copied
    over without a host wait; the same batches as :meth:`ExampleSet.collate`."""

    def __init__(self, data: FewShotDataset) -> None:
        super().__init__(data)
        self.labels = self.labels.to(data.flat.device)

    def collate(self, items: Sequence[tuple[int, int]]) -> Examples:
        pairs = torch.tensor(items, dtype=torch.long).T.contiguous()  # [2, B]: stream positions, images
        index, examples = to_device(pairs, self.data.flat.device)
        return Examples(self.data.gather(examples), self.labels[examples], index)


def data_device(cfg: Config) -> torch.device:
    """The device ``cfg.data_on_device`` puts a task's images on: this process's training device, as
    :meth:`metashot.distributed.World.device` resolves it (auto; under torchrun the local rank's GPU)."""
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return check_device(cfg.device)
    return check_device(cfg.device, *local_placement())


def read_files(paths: Sequence[str | os.PathLike], image_size: int, channels: int) -> torch.Tensor:
    """Image files read by :func:`~metashot.data.images.read_images` as uint8 [M, channels, size, size];
    a :class:`DataError` naming a file that does not decode."""
    try:
        images = read_images([Path(p) for p in paths], image_size, channels)
    except ValueError as e:
        raise DataError(str(e)) from None
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()


def class_key(data: FewShotDataset) -> str:
    """A hash of ``data``'s class names and sizes, in order."""
    text = json.dumps([data.class_names, data.class_sizes.tolist()])
    return hashlib.sha256(text.encode()).hexdigest()[:16]
