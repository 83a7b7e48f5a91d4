"""Sinusoid regression, exactly as in MAML (Finn et al. 2017, section 5.1).

A task is y = A sin(x + phi) with amplitude A ~ U[0.1, 5.0] and phase phi ~ U[0, pi]; its K support and Q
query points have x ~ U[-5, 5]. An episode is an :class:`~metashot.data.fewshot.Episode` with float
inputs and targets: support [K, 1], support_labels [K, 1] (the y values), query [Q, 1], query_labels
[Q, 1]; a batch adds a leading [B]. Episode ``i`` of a sampler depends only on ``(seed, part, i)``, and
processes shard the stream, as in :class:`~metashot.data.fewshot.SeededSampler`, so a resumed run or
another process draws the same tasks; the parts "train", "val" and "test" draw different tasks from the
same distribution. The numbers are counter-based hashes (splitmix64), so a whole meta-batch is drawn in a
few vectorised operations.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import BatchSampler

from metashot.batches import Episode, TaskInfo
from metashot.config import Config
from metashot.data.sampling import SeededSampler, rank_batch
from metashot.data.sources import TaskSource

AMPLITUDE = (0.1, 5.0)
PHASE = (0.0, math.pi)
X_RANGE = (-5.0, 5.0)
PARTS = ("train", "val", "test")


@dataclass(frozen=True)
class Sinusoid:
    """One task, y = amplitude * sin(x + phase)."""

    amplitude: float
    phase: float

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.amplitude * torch.sin(x + self.phase)


def _mix(z: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser on uint64 arrays (wrapping arithmetic): a counter-based hash."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(key: int, episodes: np.ndarray, n: int) -> np.ndarray:
    """[len(episodes), n] uniforms in [0, 1), each a hash of (key, episode, column): vectorised,
    and episode ``i``'s numbers depend on nothing else."""
    golden = np.uint64(0x9E3779B97F4A7C15)
    with np.errstate(over="ignore"):
        base = _mix(np.array([key], np.uint64) * golden + golden)
        rows = _mix(base ^ episodes.astype(np.uint64)[:, None])
        cols = (np.arange(1, n + 1, dtype=np.uint64) * golden)[None, :]
        bits = _mix(rows + cols)
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


class SinusoidSampler(SeededSampler[Episode]):
    """Draws sinusoid tasks with ``shots`` support and ``queries`` query points each.

    Episode ``i``'s amplitude, phase and inputs are hashes of (seed, part, i); ``start``, ``rank`` and
    ``world_size`` as in :class:`~metashot.data.fewshot.SeededSampler`.
    """

    def __init__(
        self,
        shots: int,
        queries: int,
        episodes: int,
        seed: int = 0,
        part: str = "train",
        start: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__(episodes, seed, start, rank, world_size)
        if shots < 1 or queries < 0:
            raise ValueError(f"need shots >= 1 and queries >= 0, got {shots}, {queries}")
        if part not in PARTS:
            raise ValueError(f"part must be one of {PARTS}, got {part!r}")
        self.shots, self.queries, self.part = shots, queries, part
        self.key = seed * len(PARTS) + PARTS.index(part)

    def _draw(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = uniforms(self.key, indices, 2 + self.shots + self.queries)
        amplitude = AMPLITUDE[0] + (AMPLITUDE[1] - AMPLITUDE[0]) * u[:, 0]
        phase = PHASE[0] + (PHASE[1] - PHASE[0]) * u[:, 1]
        x = X_RANGE[0] + (X_RANGE[1] - X_RANGE[0]) * u[:, 2:]
        return amplitude, phase, x

    def task(self, i: int) -> Sinusoid:
        """The function of episode ``i``."""
        amplitude, phase, _ = self._draw(np.array([i]))
        return Sinusoid(float(amplitude[0]), float(phase[0]))

    def episodes_at(self, indices: list[int]) -> Episode:
        """Episodes ``indices`` as a batch: support [B, K, 1], targets [B, K, 1], query [B, Q, 1], ..."""
        amplitude, phase, x = self._draw(np.asarray(indices))
        y = amplitude[:, None] * np.sin(x + phase[:, None])
        xt = torch.from_numpy(x).float().unsqueeze(-1)
        yt = torch.from_numpy(y).float().unsqueeze(-1)
        k = self.shots
        return Episode(xt[:, :k], yt[:, :k], xt[:, k:], yt[:, k:])

    def episode(self, i: int) -> Episode:
        """Episode ``i``: support [K, 1], targets [K, 1], query [Q, 1], targets [Q, 1]."""
        e = self.episodes_at([i])
        return Episode(e.support[0], e.support_labels[0], e.query[0], e.query_labels[0])


def sinusoid_loader(
    shots: int,
    queries: int,
    episodes: int,
    meta_batch: int = 1,
    seed: int = 0,
    part: str = "train",
    start: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Episode]:
    """Batches of ``meta_batch`` sinusoid episodes ([B, ...] :class:`Episode`), ``episodes`` in all, each
    drawn in one vectorised call; process ``rank`` of ``world_size`` gets its batches of
    ``meta_batch // world_size`` (see :class:`~metashot.data.fewshot.SeededSampler`)."""
    sampler = SinusoidSampler(shots, queries, episodes, seed, part, start, rank, world_size)
    batches = BatchSampler(sampler.indices(), rank_batch(meta_batch, world_size), drop_last=False)
    return (sampler.episodes_at(batch) for batch in batches)


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
        self, part: str, episodes: int, seed: int, start: int = 0, rank: int = 0, world_size: int = 1,
        kind: str | None = None,
    ) -> Iterable[Any]:
        kind = self.check_kind(kind)
        c = self.cfg
        train = part == "train"
        return sinusoid_loader(
            c.train_shots if train else c.shots, c.train_queries if train else c.queries,
            episodes, c.meta_batch, seed, part, start, rank, world_size,
        )
