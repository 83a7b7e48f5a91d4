"""The decode-once cache of a natural-image dataset's part: uint8 [images, H, W, C] class after class in one
``.npy`` that every process and loader worker memory-maps, its class names, sizes and one hash per image in
an ``.npz`` beside it. Built once under a lock, streamed a chunk at a time, renamed into place whole."""

from __future__ import annotations

import fcntl
import hashlib
import os
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from metashot.data.fewshot import FewShotDataset
from metashot.errors import DataError
from metashot.io import atomic_write_all

CHUNK = 1024  # images decoded and written to the cache at a time


@dataclass(frozen=True)
class Part:
    """One part of a dataset as a layout reads it, its images in any order.

    labels: int [N], indices into ``names``; images: rows (int [n]) -> uint8 [n, H, W, C] of those rows.
    """

    labels: np.ndarray
    names: list[str]
    images: Callable[[np.ndarray], np.ndarray]


def fingerprint(paths: Sequence[Path]) -> list[tuple[str, int, int]]:
    """Path, size and modification time of each of ``paths``, and of every file under those that are
    folders: what the cache's name carries, so that a changed source file builds a new cache."""
    out = []
    for path in paths:
        files = [path] if not path.is_dir() else sorted(
            Path(folder, name) for folder, _, names in os.walk(path) for name in names)
        for f in files:
            stat = f.stat()
            out.append((str(f.resolve()), stat.st_size, stat.st_mtime_ns))
    return out


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """Hold the lock of the folder of the cache ``path`` (flock on the folder itself: no lock file is
    left); while held, the temporaries a killed build of ``path`` left are removed."""
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        for stale in path.parent.glob(f".{path.stem}.*.tmp"):
            stale.unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)


def resize(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [n, H, W, C] resized to [n, size, size, C] with antialiasing (Pillow's Lanczos)."""
    if images.shape[1:3] == (size, size):
        return images
    out = [np.asarray(Image.fromarray(x.squeeze(-1) if x.shape[-1] == 1 else x)
                      .resize((size, size), Image.Resampling.LANCZOS)) for x in images]
    return np.stack(out).reshape(len(images), size, size, images.shape[-1])


def image_hashes(images: np.ndarray) -> np.ndarray:
    """One 64-bit hash of each image's pixels, [n] uint64."""
    return np.array([int.from_bytes(hashlib.blake2b(x.tobytes(), digest_size=8).digest(), "little")
                     for x in images], dtype=np.uint64)


def build_cache(part: Part, size: int, images_path: Path, meta_path: Path, where: str) -> None:
    """Write ``part`` sorted by class into ``images_path`` (.npy, streamed a chunk at a time) and its
    class names, sizes and image hashes into ``meta_path`` (.npz), both renamed into place together."""
    if not len(part.labels):  # else an empty .npy without a header would be renamed into place
        raise DataError(f"{where}: no images")
    order = np.argsort(part.labels, kind="stable")
    sizes = np.bincount(part.labels, minlength=len(part.names))
    present = sizes > 0
    hashes: list[np.ndarray] = []

    def write_images(f: Any) -> None:
        channels = None
        bar = tqdm(total=len(order), unit="image", desc=f"decoding {where} once", disable=None, leave=False)
        for start in range(0, len(order), CHUNK):
            x = part.images(order[start:start + CHUNK])
            if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] not in (1, 3):
                raise DataError(f"{where}: images are {x.dtype} {x.shape[1:]}, expected uint8 (H, W, 3)")
            x = np.ascontiguousarray(resize(x, size))
            if channels is None:
                channels = x.shape[-1]
                header = {"descr": "|u1", "fortran_order": False, "shape": (len(order), size, size, channels)}
                np.lib.format.write_array_header_1_0(f, header)
            f.write(x.tobytes())
            hashes.append(image_hashes(x))
            bar.update(len(x))
        bar.close()

    def write_meta(f: Any) -> None:
        np.savez(f, names=np.array(part.names)[present], sizes=sizes[present],
                 hashes=np.concatenate(hashes) if hashes else np.zeros(0, np.uint64))

    atomic_write_all({images_path: write_images, meta_path: write_meta})


def load_cache(images_path: Path, meta_path: Path) -> tuple[FewShotDataset, np.ndarray]:
    """The cached part as a dataset of uint8 images (memory-mapped copy-on-write: pages shared until
    written) scaled where they are used, and its image hashes."""
    with np.load(meta_path, allow_pickle=False) as meta:
        names, sizes, hashes = meta["names"].tolist(), meta["sizes"], meta["hashes"]
    flat = torch.from_numpy(np.load(images_path, mmap_mode="c")).permute(0, 3, 1, 2)
    return FewShotDataset(flat, names, torch.from_numpy(sizes), scale=False), hashes
