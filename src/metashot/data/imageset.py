"""Natural-image benchmarks read from the copy a user holds, in whichever of its common layouts.

A dataset file defines its :class:`Layout`s (how each known arrangement of files is found and read) and an
:class:`ImageSetSource` subclass (the split's class counts, the image size, the normalisation). The source
detects the layout, reads each part once into a decode-once cache beside the data (else in the user cache):
uint8 [images, H, W, C] class after class in a ``.npy`` that every process and loader worker
memory-maps, with the class names and one hash per image beside it. The parts' class counts and images
are checked before any training. Batches leave the loader as uint8 and are scaled, augmented and
normalised as batched tensors on the device they are moved to (:mod:`~metashot.data.rawbatches`).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from metashot.config import Config
from metashot.data.augment import AUGMENTS, Augment
from metashot.data.download import cache_path
from metashot.data.examples import ExampleIndex, ExampleSet, example_loader
from metashot.data.fewshot import FewShotDataset, Items, episode_loader
from metashot.data.imagecache import Part, build_cache, fingerprint, load_cache, locked
from metashot.data.rawbatches import (
    IndexedEpisodes,
    RawEpisodes,
    RawExamples,
    collate_episodes,
    collate_examples,
)
from metashot.data.sampling import EpisodeIndex
from metashot.data.sources import PARTS, DeviceExampleSet, FewShotSource, class_key, read_files
from metashot.devices import check_device
from metashot.errors import DataError
from metashot.nn.backbones import is_pretrained

DUPLICATES = ("error", "warn")  # what an image found in two parts is


def check_array(x: Any, path: Path, key: str, size: int = 84) -> np.ndarray:
    """``x`` if it is uint8 [N, size, size, 3], else a DataError naming ``path`` and ``key``."""
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 or x.shape[1:] != (size, size, 3):
        got = f"{x.dtype} {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: {key!r} is {got}, expected uint8 (N, {size}, {size}, 3)")
    return x


def check_keys(obj: Any, path: Path, keys: tuple[str, ...]) -> dict[str, Any]:
    """``obj`` if it is a dict with ``keys``, else a DataError naming what is missing."""
    if not isinstance(obj, dict) or not all(k in obj for k in keys):
        found = sorted(map(str, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}: expected a dict with keys {list(keys)}, found {found}")
    return obj


class Layout(ABC):
    """One arrangement of a dataset's files: how to find it in a folder and read its parts."""

    name: ClassVar[str]
    files: ClassVar[str]  # the files it needs, in words, for the error that finds no layout

    @abstractmethod
    def sources(self, root: Path, part: str) -> list[Path]:
        """The files ``part`` is read from (they need not exist: :meth:`found` asks)."""

    def found(self, root: Path) -> bool:
        """Whether ``root`` holds this layout (every part's files exist)."""
        return all(p.exists() for part in PARTS for p in self.sources(root, part))

    @abstractmethod
    def read(self, root: Path, part: str, image_size: int) -> Part:
        """``part``'s images and labels; a :class:`DataError` naming the file and what was expected when
        they are not this layout's. Layouts that decode image files resize them to ``image_size``."""

    def key(self) -> dict[str, Any]:
        """The layout's options that change what it reads (part of the cache's name)."""
        return {}


class ImageSetSource(FewShotSource):
    """A natural-image benchmark in ``data_dir``, in any of ``layouts`` (detected, or task_args' layout).

    task_args: layout ("auto" or a layout's name), image_size (the dataset's), augment (one of
    :data:`~metashot.data.augment.AUGMENTS`, training episodes and examples only), jitter (its colour
    jitter's strength, 0.4; 0 turns it off), normalize (the dataset's mean and std; by default true,
    false with a pretrained backbone, which brings its own), workers (DataLoader worker processes, 0),
    pin_memory (null: when the device is CUDA), duplicates ("error", or "warn": an image found in two
    parts); a subclass adds its own in :meth:`_parse`.
    """

    name: ClassVar[str]
    layouts: ClassVar[tuple[Layout, ...]]
    classes: ClassVar[dict[str, int]]  # the split's classes per part
    default_image_size: ClassVar[int] = 84
    padding: ClassVar[int] = 8  # the RandomCrop padding of crop-jitter-flip at the default size
    mean: ClassVar[tuple[float, float, float]]
    std: ClassVar[tuple[float, float, float]]

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        if cfg.data_dir is None:
            raise DataError(f"--task {self.name} needs --data-dir, the folder with one of: {self.needs()}")
        args = dict(cfg.task_args)
        self.image_size = int(args.pop("image_size", self.default_image_size))
        layout = args.pop("layout", "auto")
        kind = args.pop("augment", "none")
        jitter = float(args.pop("jitter", 0.4))
        normalize = args.pop("normalize", not is_pretrained(cfg.backbone))
        self.workers = int(args.pop("workers", 0))
        self.pin_memory = args.pop("pin_memory", None)
        self.duplicates = args.pop("duplicates", "error")
        self._parse(args)
        if args:
            raise ValueError(f"unknown {self.name} task_args {sorted(args)}")
        if self.workers < 0 or self.image_size < 8:
            raise ValueError(f"need workers >= 0 and image_size >= 8, got {self.workers}, {self.image_size}")
        if cfg.data_on_device and (self.workers or self.pin_memory):
            raise ValueError("task_args workers and pin_memory are for episodes gathered on the CPU; with "
                             "--data-on-device they are gathered on the device in this process: leave them "
                             "out")
        if self.duplicates not in DUPLICATES:
            raise ValueError(f"duplicates must be one of {DUPLICATES}, got {self.duplicates!r}")
        if kind not in AUGMENTS:
            raise ValueError(f"augment must be one of {AUGMENTS}, got {kind!r}")
        padding = round(self.padding * self.image_size / self.default_image_size)
        self.augment = Augment(kind, padding, jitter, mean=self.mean if normalize else None,
                               std=self.std if normalize else None)
        self.root = Path(cfg.data_dir).expanduser()
        self.layout = self._detect(layout)
        self._parts: dict[str, FewShotDataset] = {}

    def _parse(self, args: dict[str, Any]) -> None:
        """Pop a subclass's own task_args."""

    @classmethod
    def needs(cls) -> str:
        return "; ".join(f"{layout.name}: {layout.files}" for layout in cls.layouts)

    def _detect(self, name: str) -> Layout:
        by_name = {layout.name: layout for layout in self.layouts}
        if name != "auto":
            if name not in by_name:
                raise ValueError(f"layout must be 'auto' or one of {sorted(by_name)}, got {name!r}")
            missing = [p for part in PARTS for p in by_name[name].sources(self.root, part) if not p.exists()]
            if missing:
                raise DataError(f"{missing[0]}: not found ({name} layout: {by_name[name].files})")
            return by_name[name]
        for layout in self.layouts:
            if layout.found(self.root):
                return layout
        if not self.root.is_dir():
            raise DataError(f"{self.root}: no such folder (--data-dir: a folder with one of: {self.needs()})")
        for layout in self.layouts:  # one that is partly there: name what it lacks
            paths = [p for part in PARTS for p in layout.sources(self.root, part)]
            if any(p.exists() for p in paths):
                lacks = dict.fromkeys(str(p.relative_to(self.root)) for p in paths if not p.exists())
                missing = ", ".join(lacks)
                raise DataError(f"{self.root}: the {layout.name} layout ({layout.files}) lacks {missing}")
        raise DataError(f"{self.root}: no {self.name} layout found; it needs one of: {self.needs()}")

    def _cache(self, part: str) -> tuple[Path, Path]:
        files = fingerprint(self.layout.sources(self.root, part))
        text = json.dumps([self.name, self.layout.name, self.layout.key(), part, self.image_size, files])
        stem = f"{self.name}-{part}-{self.image_size}px-{hashlib.sha256(text.encode()).hexdigest()[:16]}"
        images = cache_path(self.root, stem + ".npy")
        return images, images.with_suffix(".npz")

    def _load(self, part: str) -> tuple[FewShotDataset, np.ndarray]:
        images_path, meta_path = self._cache(part)
        images_path.parent.mkdir(parents=True, exist_ok=True)
        with locked(images_path):  # one process builds, the others (DDP ranks, a second run) wait for it
            if not (images_path.exists() and meta_path.exists()):
                where = f"{self.root} ({self.layout.name} layout), {part}"
                build_cache(self.layout.read(self.root, part, self.image_size), self.image_size, images_path,
                            meta_path, where)
        return load_cache(images_path, meta_path)

    def _load_all(self) -> None:
        hashes = {}
        for part in PARTS:
            data, hashes[part] = self._load(part)
            expected = self.classes[part]
            if data.num_classes != expected:
                raise DataError(
                    f"{self.root} ({self.layout.name} layout): {part} has {data.num_classes} classes, "
                    f"{self.name}'s {part} split has {expected}"
                )
            self._parts[part] = data
        for a, b in (("train", "val"), ("train", "test"), ("val", "test")):
            common = np.intersect1d(hashes[a], hashes[b])
            if len(common) and self.duplicates == "warn":
                warnings.warn(f"{self.root}: {len(common)} images of {a} are also in {b}", stacklevel=2)
            elif len(common):
                raise DataError(
                    f"{self.root} ({self.layout.name} layout): {len(common)} images of {a} are also in {b}; "
                    "the parts must not share images (task_args {\"duplicates\": \"warn\"} lets them)"
                )

    def dataset(self, part: str) -> FewShotDataset:
        if not self._parts:
            self._load_all()
        return self._parts[part]

    def decode_files(self, paths: Sequence[str | os.PathLike]) -> torch.Tensor:
        """Image files decoded as the layouts decode theirs: RGB, Lanczos-resized to ``image_size``
        (:func:`~metashot.data.images.read_images`), uint8 [M, 3, S, S]."""
        return read_files(paths, self.image_size, 3)

    def present(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images [M, 3, S, S] scaled to [0, 1] and normalised as every test episode is (the
        augment's evaluation mode, on the images' device)."""
        return self.augment.normalise(images.float().div(255))

    def data_key(self, part: str) -> dict[str, Any]:
        """:meth:`FewShotSource.data_key`: the decode-once cache's name (it carries the files' fingerprint,
        the layout and the size), the classes, and the normalisation."""
        a = self.augment
        return {"images": self._cache(part)[0].name, "classes": class_key(self.dataset(part)),
                "normalize": None if a.mean is None else [list(a.mean), list(a.std)]}

    @property
    def _pin(self) -> bool:
        return bool(self.pin_memory if self.pin_memory is not None else self._device_type == "cuda")

    @property
    def _finish(self) -> bool:
        """Whether the loader's workers augment: on the CPU they do; an accelerator does, after the copy."""
        return self.workers > 0 and self._device_type == "cpu"

    @property
    def _device_type(self) -> str:
        return check_device(self.cfg.device).type  # auto resolved

    def episode_batches(self, part: str, episodes: int, **stream: int) -> Iterable[Any]:
        sampler = self.sampler(part, episodes, **stream)
        train = part == "train"
        if self.cfg.data_on_device:  # raw episodes gathered there at once, augmented there when moved
            collate = partial(raw_episodes, data=self.gathered(part), augment=self.augment,
                              seed=stream["seed"], train=train)
            return episode_loader(Items(), sampler, self.cfg.meta_batch, stream["world_size"],
                                  collate_fn=collate)
        collate = partial(collate_episodes, augment=self.augment, seed=stream["seed"], train=train,
                          finish=self._finish)
        return episode_loader(IndexedEpisodes(self.dataset(part)), sampler, self.cfg.meta_batch,
                              stream["world_size"], self.workers, self._pin, collate)

    def example_batches(self, part: str, examples: int, **stream: int) -> Iterable[Any]:
        sampler = self.example_sampler(part, examples, **stream)
        if self.cfg.data_on_device:
            on = DeviceExampleSet(self.gathered(part))
            collate = partial(raw_examples, data=on, augment=self.augment, seed=stream["seed"])
            return example_loader(on, sampler, self.cfg.batch_size, stream["world_size"], collate_fn=collate)
        data = ExampleSet(self.dataset(part))
        collate = partial(collate_examples, data=data, augment=self.augment, seed=stream["seed"],
                          finish=self._finish)
        return example_loader(data, sampler, self.cfg.batch_size, stream["world_size"], self.workers,
                              self._pin, collate)

    def report(self) -> dict[str, Any]:
        """:meth:`FewShotSource.report`, with the folder, its layout and where the cache is."""
        return {**super().report(), "root": str(self.root), "layout": self.layout.name,
                "layout_files": self.layout.files, "options": self.layout.key(),
                "cache": str(self._cache("train")[0].parent)}


def raw_episodes(
    items: list[EpisodeIndex], data: FewShotDataset, augment: Augment, seed: int, train: bool
) -> RawEpisodes:
    """:func:`~metashot.data.rawbatches.collate_episodes`' batch of ``items`` (not finished), gathered at
    once where ``data.flat`` lies (:meth:`FewShotDataset.collate`)."""
    return RawEpisodes(data.collate(items), torch.tensor([i.episode for i in items]), augment, seed, train)


def raw_examples(
    items: list[ExampleIndex], data: DeviceExampleSet, augment: Augment, seed: int
) -> RawExamples:
    """:func:`~metashot.data.rawbatches.collate_examples`' batch of ``items`` (not finished), gathered where
    ``data``'s images lie; the stream positions that fix the augmentation stay on the CPU, where it draws."""
    return RawExamples(replace(data.collate(items), index=torch.tensor([i for i, _ in items])), augment, seed)
