"""Plain labelled examples of a part's every class, for supervised (pre)training on all its classes.

The stream runs epoch after epoch over the part's N images: item ``i`` is image ``perm_e[i % N]`` with
``e = i // N`` and ``perm_e`` a permutation drawn from ``(seed, e)`` only, so each epoch shows every image
once, and any process (a resumed run, a DDP rank) draws the same stream, sharded as every
:class:`~metashot.data.sampling.SeededSampler`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from metashot.batches import Examples
from metashot.data.fewshot import FewShotDataset
from metashot.data.sampling import SeededSampler, episode_generator, rank_batch

ExampleIndex = tuple[int, int]  # (position in the stream, flat index of the image)


class ExampleSampler(SeededSampler[ExampleIndex]):
    """Items ``start`` .. ``examples - 1`` of the epoch-by-epoch stream of ``num_examples`` examples (see
    the module), as ``(stream position, example index)``; ``start``, ``rank`` and ``world_size`` as in
    :class:`~metashot.data.sampling.SeededSampler`, whose "episodes" are examples here."""

    def __init__(
        self, num_examples: int, examples: int, seed: int = 0, start: int = 0, rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(examples, seed, start, rank, world_size)
        if num_examples < 1:
            raise ValueError(f"batches of examples need at least one example, the part has {num_examples}")
        self.num_examples = num_examples
        self._epoch, self._order = -1, torch.empty(0, dtype=torch.long)

    def order(self, epoch: int) -> torch.Tensor:
        """The example indices in epoch ``epoch``'s order, [num_examples]; the current epoch's is kept."""
        if epoch != self._epoch:
            g = episode_generator(self.seed, epoch)
            self._epoch, self._order = epoch, torch.randperm(self.num_examples, generator=g)
        return self._order

    def episode(self, i: int) -> ExampleIndex:
        epoch, position = divmod(i, self.num_examples)
        return i, int(self.order(epoch)[position])


class ExampleSet(Dataset):
    """Serves :class:`ExampleSampler` items of ``data``; :meth:`collate` gathers a batch's images with one
    tensor index and labels each with its class in ``data`` (0..classes-1)."""

    def __init__(self, data: FewShotDataset) -> None:
        self.data = data
        self.labels = data.labels

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, item: ExampleIndex) -> ExampleIndex:
        return item

    def collate(self, items: Sequence[ExampleIndex]) -> Examples:
        index, examples = torch.tensor(items, dtype=torch.long).unbind(1)
        return Examples(self.data.gather(examples), self.labels[examples], index)


def example_loader(
    dataset: ExampleSet, sampler: ExampleSampler, batch_size: int, world_size: int = 1, num_workers: int = 0,
    pin_memory: bool = False, collate_fn: Callable[[list[ExampleIndex]], Any] | None = None,
) -> DataLoader:
    """Batches (:class:`Examples`, or what ``collate_fn`` makes; default ``dataset.collate``) of
    ``batch_size`` examples drawn by ``sampler``; each of ``world_size`` processes gets its batches of
    ``batch_size // world_size``."""
    return DataLoader(
        dataset, sampler=sampler, batch_size=rank_batch(batch_size, world_size, "--batch-size"),
        collate_fn=collate_fn or dataset.collate, num_workers=num_workers, pin_memory=pin_memory,
        generator=torch.Generator(),  # off the global RNG, as episode_loader
    )
