"""Classes of images held as one tensor, N-way K-shot episodes drawn from them, and their batches.

An episode is drawn by :class:`EpisodeSampler`, a standard torch ``Sampler`` whose items are index
tensors, and gathered by :class:`FewShotDataset` with one tensor index. Episode ``i`` depends only on
``(seed, i)``, so any process (a resumed run, a DDP rank) draws the same episodes.
"""

from __future__ import annotations

import os
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from metashot.batches import Episode
from metashot.data.images import IMAGE_SUFFIXES, decode_image

SMALL_CLASSES = ("error", "drop")
T = TypeVar("T")


@dataclass(frozen=True)
class EpisodeIndex:
    """What :class:`EpisodeSampler` yields: flat example indices [N, K+Q] and the shot count K."""

    indices: torch.Tensor
    shots: int


@dataclass(frozen=True, eq=False)
class ClassLayout:
    """Where each class's examples lie in a flat index: class ``c`` is ``offsets[c]`` to
    ``offsets[c] + sizes[c] - 1``, class after class. ``common`` is every class's size when they are
    equal, else None."""

    sizes: torch.Tensor
    offsets: torch.Tensor
    common: int | None

    @classmethod
    def of(cls, num_classes: int, examples_per_class: int | Sequence[int] | torch.Tensor) -> ClassLayout:
        """The layout of ``num_classes`` classes of ``examples_per_class`` examples (one number for all,
        or one per class)."""
        sizes = torch.as_tensor(examples_per_class, dtype=torch.long)
        if sizes.dim() == 0:
            sizes = sizes.repeat(num_classes)
        if sizes.shape != (num_classes,):
            raise ValueError(f"{sizes.numel()} class sizes for {num_classes} classes")
        common = sizes.unique()
        return cls(sizes, sizes.cumsum(0) - sizes, int(common[0]) if len(common) == 1 else None)

    def fewer_than(self, examples: int, needed: str, names: Sequence[str] | None = None) -> str | None:
        """None when every class has ``examples`` examples, else a message saying what ``needed`` them
        and which classes have fewer: the first five by name (else index) with their sizes, then a count."""
        small = (self.sizes < examples).nonzero().flatten().tolist()
        if not small:
            return None
        message = f"{needed} = {examples} examples per class, but "
        if self.common is not None:
            return message + f"each class has {self.common}"
        named = [repr(names[i]) if names is not None else f"class {i}" for i in small[:5]]
        shown = ", ".join(f"{name} ({int(self.sizes[i])})" for name, i in zip(named, small))
        more = f" and {len(small) - 5} more" if len(small) > 5 else ""
        return message + f"{len(small)} of {len(self.sizes)} classes have fewer: {shown}{more}"

    def draw(self, g: torch.Generator, ways: int, per_class: int) -> torch.Tensor:
        """Flat indices [ways, per_class] of ``ways`` classes drawn without replacement (row n is the
        episode's class n) and ``per_class`` distinct examples of each, uniform over the class's own
        examples, in random order."""
        classes = torch.randperm(len(self.sizes), generator=g)[:ways]
        if self.common is not None:
            # argsort of uniform noise: a random permutation per class in one call
            examples = torch.rand(ways, self.common, generator=g).argsort(dim=1)[:, :per_class]
            return classes.unsqueeze(1) * self.common + examples
        # the same, with noise above any draw past each class's size so that those positions sort last
        sizes = self.sizes[classes]
        noise = torch.rand(ways, int(sizes.max()), generator=g)
        noise.masked_fill_(torch.arange(noise.shape[1]) >= sizes.unsqueeze(1), 2.0)
        return self.offsets[classes].unsqueeze(1) + noise.argsort(dim=1)[:, :per_class]


class FewShotDataset(Dataset):
    """Classes of images held as one tensor ``flat`` [images, C, H, W] (uint8 or float), class after class.

    ``FewShotDataset(images)`` takes classes of equal size, ``images`` [classes, examples, C, H, W];
    ``FewShotDataset(images, class_sizes=sizes)`` takes ``images`` [images, C, H, W] of which class ``c``
    is the next ``sizes[c]``, for classes of any size. Indexed by an :class:`EpisodeIndex` of flat
    indices, it returns that :class:`Episode` as float images in [0, 1].
    """

    def __init__(
        self,
        images: torch.Tensor,
        class_names: Sequence[str] | None = None,
        class_sizes: Sequence[int] | torch.Tensor | None = None,
    ) -> None:
        if class_sizes is None:
            if images.dim() != 5:
                raise ValueError(
                    "images must be [classes, examples, channels, height, width], or [images, channels, "
                    f"height, width] with class_sizes; got {tuple(images.shape)}"
                )
            self.layout = ClassLayout.of(images.shape[0], images.shape[1])
            images = images.reshape(-1, *images.shape[2:])
        else:
            self.layout = ClassLayout.of(len(class_sizes), class_sizes)
        self.flat = images
        self.class_names = list(class_names) if class_names is not None else None
        if images.dim() != 4 or int(self.class_sizes.sum()) != images.shape[0]:
            raise ValueError(
                f"with class_sizes, images must be [images, channels, height, width] holding "
                f"sum(class_sizes) = {int(self.class_sizes.sum())} images; got {tuple(images.shape)}"
            )
        if self.class_names is not None and len(self.class_names) != self.num_classes:
            raise ValueError(f"{len(self.class_names)} class names for {self.num_classes} classes")

    @property
    def class_sizes(self) -> torch.Tensor:
        """The number of images of each class, [classes]."""
        return self.layout.sizes

    @property
    def num_classes(self) -> int:
        return len(self.class_sizes)

    @property
    def examples_per_class(self) -> int:
        """The number of images of every class; a ValueError when the classes differ (see class_sizes)."""
        if self.layout.common is None and self.num_classes:
            raise ValueError(
                f"the classes hold {int(self.class_sizes.min())} to {int(self.class_sizes.max())} images, "
                "not one number of examples per class: see class_sizes (and flat, the images)"
            )
        return self.layout.common or 0

    @property
    def images(self) -> torch.Tensor:
        """[classes, examples, C, H, W], a view of ``flat``, for classes of equal size."""
        return self.flat.view(self.num_classes, self.examples_per_class, *self.image_shape)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.flat.shape[1:])

    def __len__(self) -> int:
        return self.flat.shape[0]

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Images at flat ``indices`` (any shape) as float in [0, 1]."""
        x = self.flat[indices]
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

    def subset(self, classes: Sequence[int] | torch.Tensor) -> FewShotDataset:
        """The dataset of ``classes`` (indices into this one's classes, in that order)."""
        classes = torch.as_tensor(classes, dtype=torch.long)
        sizes = self.class_sizes[classes]
        # each image's position within its class, added to its class's offset here
        within = torch.arange(int(sizes.sum())) - (sizes.cumsum(0) - sizes).repeat_interleave(sizes)
        images = self.flat[self.layout.offsets[classes].repeat_interleave(sizes) + within]
        names = [self.class_names[i] for i in classes.tolist()] if self.class_names is not None else None
        return FewShotDataset(images, names, sizes)

    def require(
        self, examples: int, needed: str, small_classes: str = "error", hint: str = ""
    ) -> FewShotDataset:
        """This dataset if every class has ``examples`` images. Otherwise, with ``small_classes`` "error",
        a ValueError naming the smaller classes and what ``needed`` the images (ending with ``hint``, if
        any); with "drop", the dataset without them and a warning naming them."""
        if small_classes not in SMALL_CLASSES:
            raise ValueError(f"small_classes must be one of {SMALL_CLASSES}, got {small_classes!r}")
        message = self.layout.fewer_than(examples, needed, self.class_names)
        if message is None:
            return self
        if small_classes == "error":
            raise ValueError(f"{message}; {hint}" if hint else message)
        warnings.warn(f"{message}; left them out", stacklevel=2)
        return self.subset((self.class_sizes >= examples).nonzero().flatten())

    @classmethod
    def from_folder(
        cls, root: str | os.PathLike, image_size: int = 28, channels: int = 1
    ) -> FewShotDataset:
        """A folder of class sub-folders of images, every image kept, decoded by :func:`decode_image` and
        resized to ``image_size``. Classes may hold different numbers of images. One warning says how
        many images had their colours converted to have ``channels`` channels."""
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"{root} is not a folder of class sub-folders")
        classes = sorted(p for p in root.iterdir() if p.is_dir())
        files = [sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes]
        files_classes = [(c, f) for c, f in zip(classes, files, strict=True) if f]
        if not files_classes:
            raise ValueError(f"{root}: no class sub-folders with images ({sorted(IMAGE_SUFFIXES)})")
        paths = [f for _, fs in files_classes for f in fs]
        images = np.empty((len(paths), image_size, image_size, channels), np.uint8)
        converted = []
        for i, f in enumerate(paths):
            try:
                x, changed = decode_image(f, channels)
            except OSError as e:
                raise ValueError(f"{f}: image does not decode ({e})") from e
            if changed:
                converted.append(f)
            im = Image.fromarray(x[..., 0] if channels == 1 else x)
            im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
            images[i] = np.asarray(im).reshape(image_size, image_size, channels)
        if converted:
            change = "colour images to greyscale" if channels == 1 else "greyscale images to RGB"
            warnings.warn(
                f"{root}: converted {len(converted)} {change} for channels={channels}, e.g. {converted[0]}",
                stacklevel=2,
            )
        tensor = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
        return cls(tensor, [c.name for c, _ in files_classes], [len(fs) for _, fs in files_classes])


def episode_generator(seed: int, i: int) -> torch.Generator:
    """The generator episode ``i`` of a sampler seeded with ``seed`` draws from: episode ``i`` depends only
    on ``(seed, i)``, whatever was drawn before it (exact resume, sharding, any process)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + i)


class SeededSampler(Sampler[T], ABC):
    """Episodes ``start`` .. ``episodes - 1`` of a stream in which episode ``i`` depends only on
    ``(seed, i)``; subclasses define :meth:`episode`.

    Rank ``rank`` of ``world_size`` processes takes ``range(start + rank, episodes, world_size)``;
    ``episodes`` and ``start`` count the episodes of all ranks. With batches of B / W episodes per rank,
    step s of rank r holds episodes start + s*B + r + k*W (k < B / W), so the ranks' step s together is
    exactly the one-process step s.
    """

    def __init__(
        self, episodes: int, seed: int = 0, start: int = 0, rank: int = 0, world_size: int = 1
    ) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank {rank} of {world_size}")
        self.episodes, self.seed, self.start = episodes, seed, start
        self.rank, self.world_size = rank, world_size

    @abstractmethod
    def episode(self, i: int) -> T:
        """Episode ``i`` of the stream."""

    def indices(self) -> range:
        """The episodes this rank draws, in order."""
        return range(self.start + self.rank, self.episodes, self.world_size)

    def __iter__(self) -> Iterator[T]:
        for i in self.indices():
            yield self.episode(i)

    def __len__(self) -> int:
        return len(self.indices())


def rank_batch(meta_batch: int, world_size: int) -> int:
    """The episodes per batch of each of ``world_size`` processes that together take ``meta_batch``."""
    if meta_batch % world_size:
        raise ValueError(
            f"--meta-batch {meta_batch} does not split over {world_size} processes: "
            f"pass a multiple of {world_size}"
        )
    return meta_batch // world_size


class EpisodeSampler(SeededSampler[EpisodeIndex]):
    """Draws N-way K-shot Q-query episodes from ``num_classes`` classes of ``examples_per_class``
    examples (one number for all, or one per class).

    Classes without replacement, examples without replacement within a class, uniformly over the
    class's own examples. Episode ``i`` is drawn from a generator seeded with ``(seed, i)``; ``start``,
    ``rank`` and ``world_size`` as in :class:`SeededSampler`. ``class_names`` name the classes too small
    for the episodes in the error.
    """

    def __init__(
        self,
        num_classes: int,
        examples_per_class: int | Sequence[int] | torch.Tensor,
        ways: int,
        shots: int,
        queries: int,
        episodes: int,
        seed: int = 0,
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
        class_names: Sequence[str] | None = None,
    ) -> None:
        super().__init__(episodes, seed, start, rank, world_size)
        if ways < 1 or shots < 1 or queries < 0:
            raise ValueError(f"need ways >= 1, shots >= 1, queries >= 0; got {ways}, {shots}, {queries}")
        if ways > num_classes:
            raise ValueError(f"{ways}-way episodes need {ways} classes, but the dataset has {num_classes}")
        self.layout = ClassLayout.of(num_classes, examples_per_class)
        message = self.layout.fewer_than(shots + queries, f"shots + queries = {shots} + {queries}",
                                         class_names)
        if message is not None:
            raise ValueError(message)
        self.ways, self.shots, self.queries = ways, shots, queries

    @classmethod
    def for_dataset(
        cls, dataset: FewShotDataset, *, shots: int, queries: int, **kwargs: int
    ) -> EpisodeSampler:
        """A sampler of ``dataset``'s classes; classes too small for the episodes are named in the error."""
        return cls(dataset.num_classes, dataset.class_sizes, shots=shots, queries=queries,
                   class_names=dataset.class_names, **kwargs)

    def episode(self, i: int) -> EpisodeIndex:
        g = episode_generator(self.seed, i)
        indices = self.layout.draw(g, self.ways, self.shots + self.queries)
        return EpisodeIndex(indices, self.shots)


def episode_loader(
    dataset: FewShotDataset,
    ways: int,
    shots: int,
    queries: int,
    episodes: int,
    meta_batch: int = 1,
    seed: int = 0,
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> DataLoader:
    """Batches of ``meta_batch`` episodes ([B, ...] :class:`Episode`), ``episodes`` in all; process
    ``rank`` of ``world_size`` gets its batches of ``meta_batch // world_size`` (see
    :class:`SeededSampler`)."""
    sampler = EpisodeSampler.for_dataset(
        dataset, ways=ways, shots=shots, queries=queries, episodes=episodes, seed=seed, start=start,
        rank=rank, world_size=world_size,
    )
    # the episodes are fixed by (seed, i); a generator of its own keeps the loader's base-seed draw off
    # the global RNG, so a resumed run's RNG state is the uninterrupted run's
    return DataLoader(
        dataset, sampler=sampler, batch_size=rank_batch(meta_batch, world_size), collate_fn=Episode.collate,
        num_workers=num_workers, generator=torch.Generator(),
    )
