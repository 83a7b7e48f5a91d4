"""Classes of images held as one tensor, N-way K-shot episodes drawn from them, and their batches.

An episode is drawn by :class:`EpisodeSampler`, a standard torch ``Sampler`` whose items are index
tensors, and gathered by :class:`FewShotDataset` with one tensor index. Episode ``i`` depends only on
``(seed, i)``, so any process (a resumed run, a DDP rank) draws the same episodes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}


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
        moved = (getattr(self, name).to(device, non_blocking=True) for name in self.TENSORS)
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


@dataclass(frozen=True)
class EpisodeIndex:
    """What :class:`EpisodeSampler` yields: flat example indices [N, K+Q] and the shot count K."""

    indices: torch.Tensor
    shots: int


class FewShotDataset(Dataset):
    """Classes of equally many images: ``images`` [classes, examples, C, H, W] (uint8 or float).

    Indexed by an :class:`EpisodeIndex`, it returns that :class:`Episode` as float images in [0, 1].
    """

    def __init__(self, images: torch.Tensor, class_names: Sequence[str] | None = None) -> None:
        if images.dim() != 5:
            raise ValueError(
                f"images must be [classes, examples, channels, height, width], got {tuple(images.shape)}"
            )
        self.images = images
        self.class_names = list(class_names) if class_names is not None else None
        self._flat = images.reshape(-1, *images.shape[2:])

    @property
    def num_classes(self) -> int:
        return self.images.shape[0]

    @property
    def examples_per_class(self) -> int:
        return self.images.shape[1]

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[2:])

    def __len__(self) -> int:
        return self.num_classes * self.examples_per_class

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Images at flat ``indices`` (any shape) as float in [0, 1]."""
        x = self._flat[indices]
        return x.float().div_(255) if x.dtype == torch.uint8 else x

    def __getitem__(self, item: EpisodeIndex) -> Episode:
        n, kq = item.indices.shape
        k = item.shots
        x = self.gather(item.indices)  # [N, K+Q, C, H, W]
        labels = torch.arange(n).unsqueeze(1)
        return Episode(
            support=x[:, :k].reshape(n * k, *x.shape[2:]),
            support_labels=labels.expand(n, k).reshape(-1),
            query=x[:, k:].reshape(n * (kq - k), *x.shape[2:]),
            query_labels=labels.expand(n, kq - k).reshape(-1),
            num_ways=n,
        )

    @classmethod
    def from_folder(
        cls, root: str | os.PathLike, image_size: int = 28, channels: int = 1
    ) -> FewShotDataset:
        """A folder of class sub-folders of images, each resized to ``image_size``.

        Classes keep the smallest per-class count of images (episodes need equal classes).
        """
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder of class sub-folders")
        classes = sorted(p for p in root.iterdir() if p.is_dir())
        files = [sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes]
        files_classes = [(c, f) for c, f in zip(classes, files, strict=True) if f]
        if not files_classes:
            raise ValueError(f"{root}: no class sub-folders with images ({sorted(IMAGE_SUFFIXES)})")
        n = min(len(f) for _, f in files_classes)
        mode = {1: "L", 3: "RGB"}[channels]
        images = np.empty((len(files_classes), n, image_size, image_size, channels), np.uint8)
        for i, (_, fs) in enumerate(files_classes):
            for j, f in enumerate(fs[:n]):
                try:
                    with Image.open(f) as im:
                        im = im.convert(mode).resize((image_size, image_size), Image.Resampling.LANCZOS)
                        images[i, j] = np.asarray(im).reshape(image_size, image_size, channels)
                except OSError as e:
                    raise ValueError(f"{f}: image does not decode ({e})") from e
        tensor = torch.from_numpy(images).permute(0, 1, 4, 2, 3).contiguous()
        return cls(tensor, [c.name for c, _ in files_classes])


def episode_generator(seed: int, i: int) -> torch.Generator:
    """The generator episode ``i`` of a sampler seeded with ``seed`` draws from: episode ``i`` depends only
    on ``(seed, i)``, whatever was drawn before it (exact resume, sharding, any process)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + i)


def draw_examples(
    g: torch.Generator, num_classes: int, examples_per_class: int, ways: int, per_class: int
) -> torch.Tensor:
    """Flat indices [ways, per_class] of ``ways`` classes drawn without replacement (row n is the
    episode's class n) and ``per_class`` distinct examples of each, in random order."""
    classes = torch.randperm(num_classes, generator=g)[:ways]
    # argsort of uniform noise: a random permutation per class in one call
    examples = torch.rand(ways, examples_per_class, generator=g).argsort(dim=1)[:, :per_class]
    return classes.unsqueeze(1) * examples_per_class + examples


class EpisodeSampler(Sampler[EpisodeIndex]):
    """Draws ``episodes`` N-way K-shot Q-query episodes from ``num_classes`` classes.

    Classes without replacement, examples without replacement within a class. Episode ``i`` is drawn
    from a generator seeded with ``(seed, i)``. ``start`` skips the first episodes (to resume);
    ``rank``/``world_size`` keep every ``world_size``-th episode (to shard over DDP processes).
    """

    def __init__(
        self,
        num_classes: int,
        examples_per_class: int,
        ways: int,
        shots: int,
        queries: int,
        episodes: int,
        seed: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if ways < 1 or shots < 1 or queries < 0:
            raise ValueError(f"need ways >= 1, shots >= 1, queries >= 0; got {ways}, {shots}, {queries}")
        if ways > num_classes:
            raise ValueError(f"{ways}-way episodes need {ways} classes, but the dataset has {num_classes}")
        if shots + queries > examples_per_class:
            raise ValueError(
                f"shots + queries = {shots} + {queries} = {shots + queries} examples per class, "
                f"but each class has {examples_per_class}"
            )
        self.num_classes, self.examples_per_class = num_classes, examples_per_class
        self.ways, self.shots, self.queries = ways, shots, queries
        self.episodes, self.seed, self.start = episodes, seed, start
        self.rank, self.world_size = rank, world_size

    @classmethod
    def for_dataset(cls, dataset: FewShotDataset, **kwargs: int) -> EpisodeSampler:
        return cls(dataset.num_classes, dataset.examples_per_class, **kwargs)

    def episode(self, i: int) -> EpisodeIndex:
        g = episode_generator(self.seed, i)
        indices = draw_examples(g, self.num_classes, self.examples_per_class, self.ways,
                                self.shots + self.queries)
        return EpisodeIndex(indices, self.shots)

    def __iter__(self) -> Iterator[EpisodeIndex]:
        for i in range(self.start + self.rank, self.episodes, self.world_size):
            yield self.episode(i)

    def __len__(self) -> int:
        return len(range(self.start + self.rank, self.episodes, self.world_size))


def episode_loader(
    dataset: FewShotDataset,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    meta_batch: int = 1,
    seed: int = 0,
    start: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """Batches of ``meta_batch`` episodes ([B, ...] :class:`Episode`), ``episodes`` episodes in all."""
    sampler = EpisodeSampler.for_dataset(
        dataset, ways=ways, shots=shots, queries=queries, episodes=episodes, seed=seed, start=start
    )
    return DataLoader(
        dataset, sampler=sampler, batch_size=meta_batch, collate_fn=Episode.collate,
        num_workers=num_workers,
    )
