"""Data: Omniglot, episode sampling, task sources."""

from metashot.batches import Episode
from metashot.data.fewshot import FewShotDataset, episode_loader
from metashot.data.omniglot import Omniglot, OmniglotError
from metashot.data.sampling import EpisodeIndex, EpisodeSampler, SeededSampler

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
