"""Classes of images held as one tensor, and batches of the episodes an
:class:`~metashot.data.sampling.EpisodeSampler` draws from them."""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from metashot.batches import Episode
from metashot.data.images import read_folder
from metashot.data.sampling import ClassLayout, EpisodeIndex, EpisodeSampler, rank_batch

SMALL_CLASSES = ("error", "drop")


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
        scale: bool = True,
    ) -> None:
        self.scale = scale
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
    def labels(self) -> torch.Tensor:
        """The class of each image of ``flat``, [images] in 0..classes-1."""
        return torch.arange(self.num_classes).repeat_interleave(self.class_sizes)

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

    def sampler(self, *, ways: int, shots: int, queries: int, episodes: int, **kwargs: int) -> EpisodeSampler:
        """An :class:`EpisodeSampler` of this dataset's classes (``kwargs``: seed, start, rank,
        world_size); classes too small for the episodes are named in the error."""
        return EpisodeSampler(self.num_classes, self.class_sizes, ways, shots, queries, episodes,
                              class_names=self.class_names, **kwargs)

    def gather(self, indices: torch.Tensor) -> torch.Tensor:
        """Images at flat ``indices`` (any shape): uint8 ones as float in [0, 1] unless the dataset was made
        with ``scale=False`` (its episodes are scaled where they are used, e.g. on a GPU)."""
        x = self.flat[indices]
        return x.float().div_(255) if x.dtype == torch.uint8 and self.scale else x

    def to(self, device: torch.device | str) -> FewShotDataset:
        """This dataset with ``flat`` on ``device`` (this one when it is there), for episodes gathered there
        (:meth:`collate`); the class layout, and so the sampler, stay on the CPU."""
        if self.flat.device == torch.device(device):
            return self
        moved = copy.copy(self)
        moved.flat = self.flat.to(device)
        return moved

    def collate(self, items: Sequence[EpisodeIndex]) -> Episode:
        """The batch [B, ...] of the ``items``' episodes gathered with one index of ``flat`` wherever it
        lies: ``Episode.collate([self[i] for i in items])``, without a host wait on a device (the CPU
        indices [B, N, K+Q] copied over through pinned memory)."""
        indices = to_device(torch.stack([item.indices for item in items]), self.flat.device)
        b, n, kq = indices.shape
        k = items[0].shots
        x = self.gather(indices)  # [B, N, K+Q, C, H, W]
        labels = torch.arange(n, device=indices.device).view(1, n, 1)
        return Episode(
            support=x[:, :, :k].reshape(b, n * k, *x.shape[3:]),
            support_labels=labels.repeat(b, 1, k).view(b, n * k),
            query=x[:, :, k:].reshape(b, n * (kq - k), *x.shape[3:]),
            query_labels=labels.repeat(b, 1, kq - k).view(b, n * (kq - k)),
            num_ways=n,
        )

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
        return FewShotDataset(images, names, sizes, self.scale)

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
        """A folder of class sub-folders of images, read by :func:`~metashot.data.images.read_folder`."""
        images, names, sizes = read_folder(root, image_size, channels)
        return cls(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), names, sizes)


def to_device(x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """CPU tensor ``x`` on ``device`` without the host waiting for it: a CUDA copy from pinned memory,
    asynchronous, that the caching host allocator keeps until it is done; ``x`` itself on the CPU."""
    if device.type == "cuda":
        x = x.pin_memory()
    return x.to(device, non_blocking=True)


class Items(Dataset):
    """A sampler's items as they are, for a collate that gathers a whole batch at once
    (:meth:`FewShotDataset.collate`)."""

    def __getitem__(self, item: Any) -> Any:
        return item


def episode_loader(
    dataset: Dataset, sampler: EpisodeSampler, meta_batch: int = 1, world_size: int = 1,
    num_workers: int = 0, pin_memory: bool = False, collate_fn: Callable[[list[Any]], Any] = Episode.collate,
) -> DataLoader:
    """Batches of ``meta_batch`` episodes ([B, ...] :class:`Episode`) drawn by ``sampler`` from
    ``dataset``; each of ``world_size`` processes gets its batches of ``meta_batch // world_size`` (see
    :class:`~metashot.data.sampling.SeededSampler`)."""
    # the episodes are fixed by (seed, i); a generator of its own keeps the loader's base-seed draw off
    # the global RNG, so a resumed run's RNG state is the uninterrupted run's
    return DataLoader(
        dataset, sampler=sampler, batch_size=rank_batch(meta_batch, world_size), collate_fn=collate_fn,
        num_workers=num_workers, pin_memory=pin_memory, generator=torch.Generator(),
        persistent_workers=False,
    )


def device_episode_loader(
    dataset: FewShotDataset, sampler: EpisodeSampler, meta_batch: int = 1, world_size: int = 1
) -> DataLoader:
    """:func:`episode_loader`'s batches, each gathered at once where ``dataset.flat`` lies
    (:meth:`FewShotDataset.collate`; on a device with :meth:`FewShotDataset.to`): in this process and not
    pinned, the images being there already."""
    return episode_loader(Items(), sampler, meta_batch, world_size, collate_fn=dataset.collate)
