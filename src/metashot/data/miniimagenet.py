"""miniImageNet (Vinyals et al. 2016) with Ravi & Larochelle's 64 / 16 / 20 class split, 600 images a class.

Read from the copy a user holds, in any of four layouts (BRIEF section 8):

- ``cache``: ``mini-imagenet-cache-{train,val,test}.pkl`` (``val`` may be ``validation``), dicts of
  ``image_data`` uint8 (N, 84, 84, 3) and ``class_dict`` {wnid: [rows]} (Ren et al. 2018, learn2learn);
- ``category-split``: ``miniImageNet_category_split_{train_phase_train,val,test}.pickle``, Python 2
  pickles of ``data`` uint8 (N, 84, 84, 3) and ``labels`` (global class numbers) (MetaOptNet, RFS);
- ``csv``: ``images/*.jpg`` with ``{train,val,test}.csv`` of ``filename,label`` (Ravi & Larochelle,
  FEAT, LibFewShot);
- ``folders``: ``{train,val,test}/<wnid>/*.jpg`` (cbfinn/maml).
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np

from metashot.data.images import IMAGE_SUFFIXES, read_images
from metashot.data.imageset import ImageSetSource, Layout, Part, check_array, check_keys
from metashot.data.pickles import load_pickle
from metashot.errors import DataError

# miniImageNet's pixel statistics (MetaOptNet, RFS, LibFewShot), in [0, 1] units
MEAN = (120.39586422 / 255, 115.59361427 / 255, 104.54012653 / 255)
STD = (70.68188272 / 255, 68.27635443 / 255, 72.54505529 / 255)


def from_labels(images: np.ndarray, labels: Any, path: Path) -> Part:
    """A part of ``images`` with one global class number per image in ``labels``."""
    labels = np.asarray(labels)
    if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: 'labels' is {labels.dtype} {labels.shape}, expected {len(images)} integers")
    numbers, dense = np.unique(labels, return_inverse=True)
    return Part(dense, [str(n) for n in numbers], lambda rows: images[rows])


class CacheLayout(Layout):
    name = "cache"
    files = "mini-imagenet-cache-{train,val,test}.pkl (val may be named validation)"

    def sources(self, root: Path, part: str) -> list[Path]:
        path = root / f"mini-imagenet-cache-{part}.pkl"
        alternative = root / "mini-imagenet-cache-validation.pkl"
        return [alternative if part == "val" and not path.exists() and alternative.exists() else path]

    def read(self, root: Path, part: str, image_size: int) -> Part:
        (path,) = self.sources(root, part)
        obj = check_keys(load_pickle(path), path, ("image_data", "class_dict"))
        images = check_array(obj["image_data"], path, "image_data")
        if not isinstance(obj["class_dict"], dict):
            raise DataError(f"{path}: 'class_dict' is {type(obj['class_dict']).__name__}, expected a dict of "
                            "{class: [rows]}")
        labels = np.full(len(images), -1)
        names = sorted(obj["class_dict"])
        for c, name in enumerate(names):
            rows = np.asarray(obj["class_dict"][name], dtype=np.int64)
            if rows.size and (rows.min() < 0 or rows.max() >= len(images)):
                raise DataError(f"{path}: class_dict[{name!r}] holds rows outside 0..{len(images) - 1}")
            if (labels[rows] >= 0).any():
                raise DataError(f"{path}: class_dict[{name!r}] holds rows of another class")
            labels[rows] = c
        if (labels < 0).any():
            unclassed = int((labels < 0).sum())
            raise DataError(f"{path}: {unclassed} rows of image_data are in no class_dict class")
        return Part(labels, names, lambda rows: images[rows])


class CategorySplitLayout(Layout):
    name = "category-split"
    files = "miniImageNet_category_split_{train_phase_train,val,test}.pickle"
    stems = {"train": "train_phase_train", "val": "val", "test": "test"}

    def sources(self, root: Path, part: str) -> list[Path]:
        return [root / f"miniImageNet_category_split_{self.stems[part]}.pickle"]

    def read(self, root: Path, part: str, image_size: int) -> Part:
        (path,) = self.sources(root, part)
        obj = check_keys(load_pickle(path), path, ("data", "labels"))
        return from_labels(check_array(obj["data"], path, "data"), obj["labels"], path)


class CsvLayout(Layout):
    name = "csv"
    files = "images/ with {train,val,test}.csv of filename,label (beside it or in split/, as FEAT's)"

    def sources(self, root: Path, part: str) -> list[Path]:
        csv_path = root / f"{part}.csv"
        if not csv_path.exists() and (root / "split" / f"{part}.csv").exists():
            csv_path = root / "split" / f"{part}.csv"
        return [csv_path, root / "images"]  # the images too, so that a changed one builds a new cache

    def read(self, root: Path, part: str, image_size: int) -> Part:
        path, _ = self.sources(root, part)
        with open(path, newline="", encoding="utf-8-sig") as f:  # the BOM a spreadsheet may write
            rows = list(csv.reader(f))
        if not rows or [c.strip() for c in rows[0]] != ["filename", "label"]:
            found = rows[0] if rows else "nothing"
            raise DataError(f"{path}: expected the header 'filename,label', found {found}")
        for line, r in enumerate(rows[1:], 2):
            if r and len(r) != 2:
                raise DataError(f"{path}: line {line} is {r}, expected filename,label")
        rows = [r for r in rows[1:] if r]
        files = [root / "images" / r[0] for r in rows]
        names = sorted({r[1] for r in rows})
        missing = [f for f in files if not f.exists()]
        if missing:
            raise DataError(f"{missing[0]}: not found ({len(missing)} of the files {path.name} names are "
                            "missing)")
        labels = np.array([names.index(r[1]) for r in rows])
        return Part(labels, names, lambda rows: read_images([files[i] for i in rows], image_size, 3))


class FoldersLayout(Layout):
    name = "folders"
    files = "{train,val,test}/<class>/*.jpg"

    def sources(self, root: Path, part: str) -> list[Path]:
        return [root / part]

    def read(self, root: Path, part: str, image_size: int) -> Part:
        folders = sorted(p for p in (root / part).iterdir() if p.is_dir())
        files = [sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for c in folders]
        labels = np.repeat(np.arange(len(files)), [len(f) for f in files])
        flat = [f for fs in files for f in fs]
        return Part(labels, [c.name for c in folders],
                    lambda rows: read_images([flat[i] for i in rows], image_size, 3))


class MiniImageNetSource(ImageSetSource):
    """miniImageNet, Ravi & Larochelle's split (64 / 16 / 20 classes), 84 x 84 RGB."""

    name = "miniimagenet"
    layouts = (CacheLayout(), CategorySplitLayout(), CsvLayout(), FoldersLayout())
    classes = {"train": 64, "val": 16, "test": 20}
    mean, std = MEAN, STD
