"""A tiny ``CUB_200_2011`` folder in the real format: the 200 real class folders (the names the shipped
splits use), 2 or 3 small JPEGs each of varying sizes (one greyscale, as a few real ones are), and the
real text files: ``images.txt``, ``bounding_boxes.txt``, ``classes.txt``, ``image_class_labels.txt``,
``train_test_split.txt``.

Each image is a flat background with its bounding box filled in another colour, the box aligned to JPEG's
8 x 8 blocks and saved without chroma subsampling, so that the decoded colours stay within a few levels of
what was written.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from metashot.data.splits import CUB_CLASSES

GREY_CLASS = 5  # the class folder (index) whose first image is greyscale


@dataclass(frozen=True)
class Written:
    """One image written: its id, path under ``images/``, box (x, y, width, height) and box colour."""

    id: int
    path: str
    box: tuple[int, int, int, int]
    inside: tuple[int, int, int]


def per_class(c: int) -> int:
    """How many images class ``c`` (an index into CUB_CLASSES) has: 2 or 3."""
    return 2 + c % 2


def _image(c: int, k: int) -> tuple[Image.Image, tuple[int, int, int, int], tuple[int, int, int]]:
    rng = np.random.default_rng([c, k])
    width, height = 48 + 16 * (k % 2), 32 + 16 * (c % 3)
    box = (16, 16, 16 * (1 + k % 2), 16)
    outside, inside = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
    if c == GREY_CLASS and k == 0:
        outside, inside = (outside[0],) * 3, (inside[0],) * 3
    x = np.empty((height, width, 3), np.uint8)
    x[:] = outside
    x[box[1]:box[1] + box[3], box[0]:box[0] + box[2]] = inside
    im = Image.fromarray(x)
    return (im.convert("L") if c == GREY_CLASS and k == 0 else im), box, inside


def write_cub(root: Path) -> list[Written]:
    """``root/CUB_200_2011``; the images written, in ``images.txt``'s order (by class folder)."""
    base = root / "CUB_200_2011"
    written = []
    for c, folder in enumerate(CUB_CLASSES):
        (base / "images" / folder).mkdir(parents=True)
        for k in range(per_class(c)):
            im, box, inside = _image(c, k)
            path = f"{folder}/{folder[4:]}_{k + 1:04d}_{1000 + len(written)}.jpg"
            im.save(base / "images" / path, quality=95, subsampling=0)  # 4:4:4: no chroma bleeding
            written.append(Written(len(written) + 1, path, box, inside))
    by_id = {w.id: w for w in written}
    (base / "images.txt").write_text("".join(f"{w.id} {w.path}\n" for w in written))
    (base / "bounding_boxes.txt").write_text(
        "".join(f"{w.id} {' '.join(f'{float(v):.1f}' for v in w.box)}\n" for w in written))
    (base / "classes.txt").write_text("".join(f"{c + 1} {n}\n" for c, n in enumerate(CUB_CLASSES)))
    (base / "image_class_labels.txt").write_text(
        "".join(f"{i} {CUB_CLASSES.index(by_id[i].path.split('/')[0]) + 1}\n" for i in by_id))
    (base / "train_test_split.txt").write_text("".join(f"{i} {i % 2}\n" for i in by_id))
    return written
