"""The registry of task sources (:class:`~metashot.data.sources.TaskSource`), by the name ``--task`` takes."""

from __future__ import annotations

from metashot.config import Config
from metashot.data.cifar import CifarFSSource, FC100Source
from metashot.data.cub import CubSource
from metashot.data.folder import FolderSource
from metashot.data.miniimagenet import MiniImageNetSource
from metashot.data.omniglot import OmniglotSequenceSource, OmniglotSource
from metashot.data.sinusoid import SinusoidSource
from metashot.data.sources import PARTS, FewShotSource, TaskSource
from metashot.data.tieredimagenet import TieredImageNetSource
from metashot.errors import ConfigError, MetashotError

__all__ = ["PARTS", "TASKS", "FewShotSource", "TaskSource", "build_source", "checked_source"]

TASKS: dict[str, type[TaskSource]] = {
    "omniglot": OmniglotSource,
    "folder": FolderSource,
    "sinusoid": SinusoidSource,
    "omniglot-sequences": OmniglotSequenceSource,
    "miniimagenet": MiniImageNetSource,
    "tieredimagenet": TieredImageNetSource,
    "cifar-fs": CifarFSSource,
    "fc100": FC100Source,
    "cub": CubSource,
}


def build_source(cfg: Config) -> TaskSource:
    if cfg.task not in TASKS:
        raise ValueError(f"unknown task {cfg.task!r}; known: {', '.join(sorted(TASKS))}")
    return TASKS[cfg.task](cfg)


def checked_source(cfg: Config, kinds: tuple[str | None, str | None] = (None, None)) -> TaskSource:
    """:func:`build_source`, with every part's batches checked against the data: the train part's of the
    first of ``kinds`` (a method's ``train_batches``), val's and test's of the second (``test_batches``);
    None is the source's default kind. A problem is a :class:`ConfigError` naming the task (and the
    part), raised before any work is done."""
    try:
        source = build_source(cfg)
        for part in PARTS:
            kind = source.check_kind(kinds[0] if part == "train" else kinds[1])
            try:
                source.loader(part, cfg.per_step(kind), seed=cfg.seed, kind=kind)
            except MetashotError:
                raise
            except ValueError as e:
                raise ConfigError(f"{cfg.task}, {part} classes: {e}") from None
    except MetashotError:
        raise
    except ValueError as e:
        raise ConfigError(f"{cfg.task}: {e}") from None
    return source
