"""Batches of uint8 images that leave the loader as they are and are made ready where they are moved:
scaled, augmented (training only) and normalised as batched tensors on the device (:mod:`~.augment`).
The collates here build them, or, in a CPU loader's workers, finish them there."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
from torch.utils.data import Dataset

from metashot.batches import Episode, Examples
from metashot.data.augment import Augment
from metashot.data.examples import ExampleIndex, ExampleSet
from metashot.data.fewshot import FewShotDataset
from metashot.data.sampling import EpisodeIndex


@dataclass
class RawEpisodes:
    """A batch of episodes of uint8 images that :meth:`to` moves to a device and there scales, augments
    (``train`` only) and normalises: ``index`` [B] holds each episode's index in its stream, which with
    ``seed`` fixes its augmentation."""

    episode: Episode
    index: torch.Tensor
    augment: Augment
    seed: int
    train: bool

    def to(self, device: torch.device | str) -> Episode:
        e = self.episode.to(device)
        shots = e.support.shape[1]
        x = self.augment(torch.cat([e.support, e.query], 1), self.index, self.seed, self.train)
        return replace(e, support=x[:, :shots], query=x[:, shots:])

    def pin_memory(self) -> RawEpisodes:
        e = self.episode
        pinned = {name: getattr(e, name).pin_memory() for name in Episode.TENSORS}
        return replace(self, episode=replace(e, **pinned))

    def __len__(self) -> int:
        return self.index.shape[0]


@dataclass
class RawExamples:
    """A batch of training examples of uint8 images that :meth:`to` moves to a device and there scales,
    augments and normalises as :class:`RawEpisodes` does, each example a one-image episode whose index is
    its position in the stream (``examples.index``), which with ``seed`` fixes its augmentation."""

    examples: Examples
    augment: Augment
    seed: int

    def to(self, device: torch.device | str) -> Examples:
        e = self.examples.to(device)
        x = self.augment(e.x.unsqueeze(1), self.examples.index, self.seed, train=True)
        return replace(e, x=x.squeeze(1))

    def pin_memory(self) -> RawExamples:
        e = self.examples
        return replace(self, examples=Examples(*(getattr(e, f.name).pin_memory() for f in fields(e))))

    def __len__(self) -> int:
        return len(self.examples)


class IndexedEpisodes(Dataset):
    """A :class:`FewShotDataset`'s episodes with their index in the stream."""

    def __init__(self, data: FewShotDataset) -> None:
        self.data = data

    def __getitem__(self, item: EpisodeIndex) -> tuple[int, Episode]:
        return item.episode, self.data[item]


def collate_episodes(
    items: list[tuple[int, Episode]], augment: Augment, seed: int, train: bool, finish: bool
) -> RawEpisodes | Episode:
    """The batch of ``items``; with ``finish``, already made ready on the CPU (in the loader's worker)."""
    episode = Episode.collate([e for _, e in items])
    raw = RawEpisodes(episode, torch.tensor([i for i, _ in items]), augment, seed, train)
    return raw.to("cpu") if finish else raw


def collate_examples(
    items: list[ExampleIndex], data: ExampleSet, augment: Augment, seed: int, finish: bool
) -> RawExamples | Examples:
    """The batch of ``items`` of ``data`` (uint8 images); with ``finish``, already made ready on the CPU."""
    raw = RawExamples(data.collate(items), augment, seed)
    return raw.to("cpu") if finish else raw
