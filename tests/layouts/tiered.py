"""Tiny copies of tieredImageNet's two layouts in the real files' formats.

Every class of Ren et al.'s split is there (351 / 97 / 160, in 20 / 6 / 8 categories) with 2 images of
84 x 84 x 3: seeded noise in 7 x 7 blocks (every image differs; its PNG is small and quick to write).
The class and category ids are synthetic, in ImageNet's form. Each writer returns what the source must
read back: per part, the class names in the source's order, each with its RGB images in file order.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from tests.layouts.mini import Written, py2_pickle

SPLIT = {"train": 351, "val": 97, "test": 160}
CATEGORIES = {"train": 20, "val": 6, "test": 8}
SIZE = 84
WNIDS = [f"n{1440764 + 5003 * i:08d}" for i in range(608)]  # ascending
GENERAL = [f"n{9000000 + 17 * i:08d}" for i in range(34)]
FIRST = {"train": 0, "val": 351, "test": 448}  # each part's first class and category in WNIDS, GENERAL
FIRST_GENERAL = {"train": 0, "val": 20, "test": 26}


def blocks(n: int, seed: int) -> np.ndarray:
    """``n`` images of seeded uint8 noise in 7 x 7 blocks, [n, 84, 84, 3]."""
    x = np.random.default_rng(seed).integers(0, 256, (n, SIZE // 7, SIZE // 7, 3), dtype=np.uint8)
    return x.repeat(7, 1).repeat(7, 2)


def png(image: np.ndarray) -> np.ndarray:
    """``image`` PNG-encoded, as the originals hold it: a uint8 array of the file's bytes, shape (n, 1)
    (what OpenCV's ``imencode`` returns)."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return np.frombuffer(buffer.getvalue(), np.uint8).reshape(-1, 1)


def split_images(seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per part, its images in a seeded order and the class of each (0 .. classes - 1)."""
    out = {}
    for p, (part, count) in enumerate(SPLIT.items()):
        rng = np.random.default_rng(seed * 10 + p)
        labels = rng.permutation(np.repeat(np.arange(count), 2))
        out[part] = blocks(len(labels), seed * 10 + p), labels
    return out


def _written(images: np.ndarray, labels: np.ndarray, names: list[str]) -> dict[str, np.ndarray]:
    return {n: images[labels == c] for c, n in enumerate(names)}


def _labels_pkl(part: str, labels: np.ndarray) -> dict[str, object]:
    """Ren et al.'s labels dict: the class and category of each image, and their names."""
    first, general = FIRST[part], FIRST_GENERAL[part]
    return {"label_specific": labels.astype(np.int32),
            "label_general": (labels % CATEGORIES[part]).astype(np.int32),
            "label_specific_str": WNIDS[first:first + SPLIT[part]],
            "label_general_str": GENERAL[general:general + CATEGORIES[part]]}


def write_png_pkl(root: Path, seed: int = 0) -> Written:
    """``{split}_images_png.pkl`` (Python 2 pickles of a list of PNG files' bytes as uint8 arrays) and
    ``{split}_labels.pkl`` (Python 2 pickles of ``label_specific``, ``label_general`` int32 and their
    names ``label_specific_str``, ``label_general_str``) (Ren et al. 2018)."""
    root.mkdir(parents=True, exist_ok=True)
    out: Written = {}
    for part, (images, labels) in split_images(seed).items():
        (root / f"{part}_images_png.pkl").write_bytes(py2_pickle([png(x) for x in images]))
        obj = _labels_pkl(part, labels)
        (root / f"{part}_labels.pkl").write_bytes(py2_pickle(obj))
        out[part] = _written(images, labels, obj["label_specific_str"])
    return out


def write_npz(root: Path, seed: int = 0, labels_key: str = "labels") -> Written:
    """``{split}_images.npz`` (``np.savez``: ``images`` uint8 (N, 84, 84, 3), BGR as OpenCV decoded the
    PNGs) and ``{split}_labels.pkl`` (a Python 2 pickle of ``labels``, Python ints) (MetaOptNet, RFS);
    ``labels_key="label_specific"`` writes Ren et al.'s labels file beside the npz instead. Returns the
    RGB images."""
    root.mkdir(parents=True, exist_ok=True)
    out: Written = {}
    for part, (images, labels) in split_images(seed).items():
        np.savez(root / f"{part}_images.npz", images=images[..., ::-1])
        obj = {"labels": labels.tolist()} if labels_key == "labels" else _labels_pkl(part, labels)
        (root / f"{part}_labels.pkl").write_bytes(py2_pickle(obj))
        names = [str(c) for c in range(SPLIT[part])] if labels_key == "labels" else obj["label_specific_str"]
        out[part] = _written(images, labels, names)
    return out
