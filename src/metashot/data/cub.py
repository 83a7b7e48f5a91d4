"""CUB-200-2011 (Wah et al. 2011): 200 bird species, 11,788 photographs of varying size, in three
incompatible few-shot class splits (BRIEF section 8; numbers compare only within one split and crop):

- ``closerlook`` (Chen et al. ICLR 2019, torchmeta): the 200 class folders sorted, the i-th in train when
  i % 2 == 0, val when i % 4 == 1, test when i % 4 == 3: 100 / 50 / 50;
- ``feat`` (Ye et al. CVPR 2020, Sha-Lab/FEAT): 100 / 50 / 50 drawn at random. FEAT reads images cropped to
  their bounding boxes, so its numbers are of ``crop`` true;
- ``meta-dataset`` (Triantafillou et al. ICLR 2020; learn2learn, easyfsl): 140 / 30 / 30, every image of
  its classes (learn2learn by default leaves out 43 that are also in ImageNet).

Read from the official ``CUB_200_2011/`` folder (``data_dir`` is it or its parent): ``images/<NNN.Name>/
*.jpg`` listed by ``images.txt`` (``<id> <folder>/<file>``), with ``bounding_boxes.txt`` (``<id> <x> <y>
<width> <height>``) for ``crop``. Images are decoded to RGB (greyscale and CMYK ones converted), cropped when
asked and resized to ``image_size`` (84). Normalised with ImageNet's mean and std (CloserLook, easyfsl).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from metashot.data.images import read_images
from metashot.data.imageset import ImageSetSource, Layout, Part
from metashot.data.splits import CUB_CLASSES, CUB_FEAT, CUB_META_DATASET
from metashot.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
FOLDER = "CUB_200_2011"
Box = tuple[float, float, float, float]
SPLITS = ("closerlook", "feat", "meta-dataset")


def split_classes(split: str) -> dict[str, tuple[int, ...]]:
    """Each part's classes under ``split``: indices into :data:`~metashot.data.splits.CUB_CLASSES`."""
    if split == "closerlook":
        indices = range(len(CUB_CLASSES))  # CUB_CLASSES is sorted
        return {"train": tuple(i for i in indices if i % 2 == 0),
                "val": tuple(i for i in indices if i % 4 == 1),
                "test": tuple(i for i in indices if i % 4 == 3)}
    numbers = {"feat": CUB_FEAT, "meta-dataset": CUB_META_DATASET}
    if split not in numbers:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return {part: tuple(n - 1 for n in classes) for part, classes in numbers[split].items()}


CLASSES = {split: {part: len(c) for part, c in split_classes(split).items()} for split in SPLITS}


def _lines(path: Path, fields: int, form: str) -> list[list[str]]:
    """The lines of ``path`` split in ``fields`` fields, with a numeric id first; else a DataError."""
    out = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = line.split()
        if len(row) != fields or not row[0].isdigit():
            raise DataError(f"{path}: line {number} is {line.strip()!r}, expected '{form}'")
        out.append(row)
    return out


def check_folders(listing: Path, folders: list[str]) -> None:
    """A DataError unless the class folders of ``images.txt``'s images are CUB-200-2011's 200."""
    extra = sorted(set(folders) - set(CUB_CLASSES))
    if extra:
        raise DataError(f"{listing}: names class folder {extra[0]!r}, not one of CUB-200-2011's 200 "
                        f"({len(extra)} such)")
    absent = sorted(set(CUB_CLASSES) - set(folders))
    if absent:
        raise DataError(f"{listing}: names no image of class {absent[0]!r} ({len(absent)} of CUB-200-2011's "
                        "200 classes have none)")


def read_boxes(path: Path, ids: list[str]) -> list[Box]:
    """The bounding box (left, top, right, bottom) of each image in ``ids``, from ``bounding_boxes.txt``."""
    boxes = {}
    for row in _lines(path, 5, "<image id> <x> <y> <width> <height>"):
        try:
            x, y, w, h = map(float, row[1:])
        except ValueError:
            box = " ".join(row[1:])
            raise DataError(f"{path}: image {row[0]}'s box {box!r} is not four numbers") from None
        boxes[row[0]] = (x, y, x + w, y + h)
    missing = [i for i in ids if i not in boxes]
    if missing:
        raise DataError(f"{path}: no box for image {missing[0]} ({len(missing)} images without one)")
    return [boxes[i] for i in ids]


class OfficialLayout(Layout):
    """The official ``CUB_200_2011`` folder, read under one class split, cropped to the boxes or not."""

    name = "official"
    files = f"{FOLDER}/images/<NNN.Name>/*.jpg with images.txt (and bounding_boxes.txt for crop)"

    def __init__(self, split: str = "closerlook", crop: bool = False) -> None:
        self.split, self.crop = split, crop
        self.parts = split_classes(split)

    def key(self) -> dict[str, Any]:
        return {"split": self.split, "crop": self.crop}

    @staticmethod
    def base(root: Path) -> Path:
        """The ``CUB_200_2011`` folder: ``root`` itself when it holds ``images/``, else in ``root``."""
        return root if (root / "images").is_dir() else root / FOLDER

    def sources(self, root: Path, part: str) -> list[Path]:
        base = self.base(root)
        return [base / "images.txt", base / "images"] + ([base / "bounding_boxes.txt"] if self.crop else [])

    def read(self, root: Path, part: str, image_size: int) -> Part:
        listing, images, *boxes_path = self.sources(root, part)
        rows = _lines(listing, 2, "<image id> <class folder>/<file>.jpg")
        folders = [r[1].split("/")[0] for r in rows]
        check_folders(listing, folders)
        names = [CUB_CLASSES[c] for c in self.parts[part]]
        index = {name: i for i, name in enumerate(names)}
        chosen = [(r, index[f]) for r, f in zip(rows, folders) if f in index]
        paths = [images / r[1] for r, _ in chosen]
        missing = [p for p in paths if not p.exists()]
        if missing:
            raise DataError(f"{missing[0]}: not found ({len(missing)} of the images {listing.name} names for "
                            f"{part} are missing)")
        boxes = read_boxes(boxes_path[0], [r[0] for r, _ in chosen]) if self.crop else None
        labels = np.array([c for _, c in chosen], dtype=np.int64)

        def load(rows: np.ndarray) -> np.ndarray:
            return read_images([paths[i] for i in rows], image_size, 3,
                               None if boxes is None else [boxes[i] for i in rows])

        return Part(labels, names, load)


class CubSource(ImageSetSource):
    """CUB-200-2011, 84 x 84 RGB. task_args: split ("closerlook", "feat" or "meta-dataset"), crop (false:
    true crops each image to its bounding box before resizing, as FEAT does)."""

    name = "cub"
    layouts = (OfficialLayout(),)
    classes = CLASSES["closerlook"]
    mean, std = IMAGENET_MEAN, IMAGENET_STD

    def _parse(self, args: dict[str, Any]) -> None:
        split = args.pop("split", "closerlook")
        crop = args.pop("crop", False)
        if not isinstance(crop, bool):
            raise ValueError(f"crop must be true or false, got {crop!r}")
        self.layouts = (OfficialLayout(split, crop),)
        self.classes = CLASSES[split]
