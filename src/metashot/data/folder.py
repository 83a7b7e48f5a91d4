"""A folder of class sub-folders, its classes split at random into train / val / test."""

from __future__ import annotations

import torch

from metashot.config import Config
from metashot.data.fewshot import SMALL_CLASSES, FewShotDataset
from metashot.data.sources import PARTS, FewShotSource


class FolderSource(FewShotSource):
    """A folder of class sub-folders (``data_dir``), its classes split by ``split_seed`` into train/val/test.

    task_args: image_size (28), channels (1), fractions ([0.6, 0.2, 0.2]), small_classes ("error" or
    "drop": what to do with a part's classes of fewer images than that part's shots + queries).
    """

    def __init__(self, cfg: Config) -> None:
        super().__init__(cfg)
        if cfg.data_dir is None:
            raise ValueError("the folder task needs --data-dir, a folder of class sub-folders")
        args = dict(cfg.task_args)
        image_size, channels = args.pop("image_size", 28), args.pop("channels", 1)
        fractions = args.pop("fractions", [0.6, 0.2, 0.2])
        small_classes = args.pop("small_classes", "error")
        if args:
            raise ValueError(f"unknown folder task_args {sorted(args)}")
        if small_classes not in SMALL_CLASSES:  # before the folder is decoded
            raise ValueError(f"small_classes must be one of {SMALL_CLASSES}, got {small_classes!r}")
        data = FewShotDataset.from_folder(cfg.data_dir, image_size, channels)
        perm = torch.randperm(data.num_classes, generator=torch.Generator().manual_seed(cfg.class_split_seed))
        bounds = torch.tensor([0.0, *fractions]).cumsum(0).mul(data.num_classes).round().long()
        self.small_classes = small_classes
        self._split = {
            p: data.subset(perm[a:b]) for p, a, b in zip(PARTS, bounds[:-1].tolist(), bounds[1:].tolist())
        }
        self._parts: dict[str, FewShotDataset] = {}

    def dataset(self, part: str) -> FewShotDataset:
        """``part``'s classes; those with fewer images than its episodes' shots + queries are named in an
        error or left out with a warning, as ``small_classes`` says."""
        if part not in self._parts:
            _, shots, queries = self.episode_shape(part)
            self._parts[part] = self._split[part].require(
                shots + queries, f"shots + queries = {shots} + {queries}", self.small_classes,
                hint="--set task_args='{\"small_classes\": \"drop\"}' leaves them out",
            )
        return self._parts[part]
