"""Data: Omniglot, episode sampling, task sources."""

from metashot.data.fewshot import (
    Episode,
    EpisodeIndex,
    EpisodeSampler,
    FewShotDataset,
    SeededSampler,
    episode_loader,
)
from metashot.data.omniglot import Omniglot, OmniglotError

__all__ = [
    "Episode",
    "EpisodeIndex",
    "EpisodeSampler",
    "FewShotDataset",
    "Omniglot",
    "OmniglotError",
    "SeededSampler",
    "episode_loader",
]
