"""Seeded, sharded episode sampling: the base every sampler shares, and N-way K-shot index episodes.

Episode ``i`` depends only on ``(seed, i)``, so any process (a resumed run, a DDP rank) draws the same
episodes. An :class:`EpisodeSampler` is a standard torch ``Sampler`` whose items are index tensors that a
:class:`~metashot.data.fewshot.FewShotDataset` gathers with one tensor index.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

import torch
from torch.utils.data import Sampler

T = TypeVar("T")


@dataclass(frozen=True)
class EpisodeIndex:
    """What :class:`EpisodeSampler` yields: flat example indices [N, K+Q], the shot count K and the
    episode's index in its stream."""

    indices: torch.Tensor
    shots: int
    episode: int = 0


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


def rank_batch(meta_batch: int, world_size: int, option: str = "--meta-batch") -> int:
    """The items per batch of each of ``world_size`` processes that together take ``meta_batch``;
    ``option`` names the setting in the error (``--batch-size`` for examples)."""
    if meta_batch % world_size:
        raise ValueError(
            f"{option} {meta_batch} does not split over {world_size} processes: "
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

    def episode(self, i: int) -> EpisodeIndex:
        g = episode_generator(self.seed, i)
        indices = self.layout.draw(g, self.ways, self.shots + self.queries)
        return EpisodeIndex(indices, self.shots, i)
