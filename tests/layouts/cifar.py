"""Tiny copies of CIFAR-100's layouts (CIFAR-FS, FC100), in the real files' formats: every one of the 100
classes, a few 32 x 32 images each, made by :func:`image` so a test can recompute what was written.

The official archive's pickles and MetaOptNet's are Python 2 pickles, written by
:func:`tests.layouts.mini.py2_pickle`.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from metashot.data.splits import CIFAR100_COARSE, CIFAR100_FINE, CIFAR100_SUPERCLASS, CIFAR_FS
from tests.layouts.mini import py2_pickle

TRAIN_IMAGES, TEST_IMAGES = 2, 1  # per class in the official train and test pickles


def image(fine: int, k: int) -> np.ndarray:
    """The ``k``-th image of fine class ``fine``: uint8 [32, 32, 3], distinct for every (fine, k)."""
    return np.random.default_rng([fine, k]).integers(0, 256, (32, 32, 3), dtype=np.uint8)


def _batch(ks: Sequence[int], label: str) -> dict[str, Any]:
    """An official pickle of images ``ks`` of every class, rows interleaved across classes as in the real
    files: ``data`` uint8 [N, 3072] of R, G, B planes."""
    rows = [(f, k) for k in ks for f in range(100)]
    data = np.stack([image(f, k).transpose(2, 0, 1).reshape(-1) for f, k in rows])
    return {"batch_label": label, "fine_labels": [f for f, _ in rows],
            "coarse_labels": [CIFAR100_SUPERCLASS[f] for f, _ in rows],
            "filenames": [f"{CIFAR100_FINE[f]}_s_{k:06d}.png" for f, k in rows], "data": data}


def official_members(**replace: Any) -> dict[str, bytes]:
    """The official ``train``, ``test`` and ``meta`` pickles (``replace``: a member's object instead)."""
    objects = {
        "train": _batch(range(TRAIN_IMAGES), "training batch 1 of 1"),
        "test": _batch(range(TRAIN_IMAGES, TRAIN_IMAGES + TEST_IMAGES), "testing batch 1 of 1"),
        "meta": {"fine_label_names": list(CIFAR100_FINE), "coarse_label_names": list(CIFAR100_COARSE)},
        **replace,
    }
    return {name: py2_pickle(obj) for name, obj in objects.items()}


def write_archive(path: Path, members: dict[str, bytes] | None = None) -> Path:
    """``cifar-100-python.tar.gz``: the folder ``cifar-100-python/`` with the three pickles."""
    members = official_members() if members is None else members
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        folder = tarfile.TarInfo("cifar-100-python")
        folder.type, folder.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(folder)
        for name, data in {"file.txt~": b"", **members}.items():  # the real archive holds an editor backup
            info = tarfile.TarInfo(f"cifar-100-python/{name}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
    return path


def write_folder(root: Path) -> Path:
    """The archive's extracted ``cifar-100-python/`` folder in ``root``."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    for name, data in official_members().items():
        (folder / name).write_bytes(data)
    return root


def official_images(fine: int) -> np.ndarray:
    """A class's images as the official layout pools them: the train pickle's, then the test pickle's."""
    return np.stack([image(fine, k) for k in range(TRAIN_IMAGES + TEST_IMAGES)])


def write_r2d2(root: Path, per_class: int = 2) -> Path:
    """bertinetto/r2d2's ``cifar100/data/<class>/*.png`` and ``cifar100/splits/bertinetto/*.txt`` in
    ``root``; class ``fine``'s images are ``image(fine, k)``, k < ``per_class``."""
    base = root / "cifar100"
    for fine, name in enumerate(CIFAR100_FINE):
        (base / "data" / name).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(image(fine, k)).save(base / "data" / name / f"{name}_s_{k:06d}.png")
    (base / "splits" / "bertinetto").mkdir(parents=True)
    for part, names in CIFAR_FS.items():
        (base / "splits" / "bertinetto" / f"{part}.txt").write_text("".join(f"{n}\n" for n in names))
    return root


def write_pickles(root: Path, prefix: str, split: dict[str, tuple[int, ...]], per_class: int = 2) -> Path:
    """MetaOptNet's ``{prefix}_{train,val,test}.pickle`` in ``root``: ``data`` uint8 (N, 32, 32, 3) and
    ``labels``, a list of fine label numbers, rows interleaved across the part's classes."""
    root.mkdir(parents=True, exist_ok=True)
    for part, classes in split.items():
        rows = [(f, k) for k in range(per_class) for f in classes]
        obj = {"data": np.stack([image(f, k) for f, k in rows]), "labels": [f for f, _ in rows]}
        (root / f"{prefix}_{part}.pickle").write_bytes(py2_pickle(obj))
    return root
