"""Tiny copies of miniImageNet's four layouts in the real files' formats, and a writer of Python 2 pickles.

Every class of Ravi & Larochelle's split is there (64 / 16 / 20) with 2 images (the first class of each
part 3), 84 x 84 x 3 uint8 of seeded noise, so every image differs. The class ids are synthetic but in
ImageNet's form (``n`` and 8 digits). Each writer returns what the source must read back: per part, the
class names in the source's order, each with its images in the order the cache keeps them.
"""

from __future__ import annotations

import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.layouts import Written

SPLIT = {"train": 64, "val": 16, "test": 20}
SIZE = 84
WNIDS = [f"n{1440764 + 7919 * i:08d}" for i in range(100)]  # ascending, so sorted order is split order


def noise(n: int, seed: int, size: int = SIZE) -> np.ndarray:
    """``n`` images of seeded uint8 noise, [n, size, size, 3]."""
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def split_classes(seed: int = 0) -> Written:
    """Per part, its wnids with their images: 3 for the part's first class, 2 for the others."""
    out: Written = {}
    first = 0
    for part, count in SPLIT.items():
        out[part] = {WNIDS[first + c]: noise(3 if c == 0 else 2, seed * 1000 + first + c)
                     for c in range(count)}
        first += count
    return out


# Python 2's cPickle at protocol 2 (what the category-split and tieredImageNet pickles are). Memo opcodes
# (BINPUT) are left out: they only let a pickle refer back to an object, and the unpickler needs none.
def py2_pickle(obj: Any) -> bytes:
    """``obj`` pickled as Python 2 writes it at protocol 2: ``str`` and ``bytes`` as Python 2 byte strings
    (SHORT_BINSTRING / BINSTRING), numpy arrays and dtypes by numpy 1's reduce, from
    ``numpy.core.multiarray``. Takes None, bool, int, float, str, bytes, tuple, list, dict, arrays."""
    out = bytearray(b"\x80\x02")
    _emit(obj, out)
    return bytes(out + b".")


def _emit(x: Any, out: bytearray) -> None:
    if x is None or isinstance(x, bool):
        out += {None: b"N", True: b"\x88", False: b"\x89"}[x]
    elif isinstance(x, int | np.integer):
        _int(int(x), out)
    elif isinstance(x, float):
        out += b"G" + struct.pack(">d", x)
    elif isinstance(x, str | bytes):
        data = x.encode("latin1") if isinstance(x, str) else x
        out += (b"U" + bytes([len(data)]) if len(data) < 256 else b"T" + struct.pack("<i", len(data))) + data
    elif isinstance(x, tuple):
        if not x or len(x) > 3:
            out += b"("
        for item in x:
            _emit(item, out)
        out += b")" if not x else b"t" if len(x) > 3 else bytes([0x84 + len(x)])
    elif isinstance(x, list | dict):
        _container(x, out)
    elif isinstance(x, np.dtype):
        _, (descr, _, _), state = x.__reduce__()
        out += b"cnumpy\ndtype\n"
        _emit((descr, 0, 1), out)
        out += b"R"
        _emit(state, out)
        out += b"b"
    elif isinstance(x, np.ndarray):
        out += b"cnumpy.core.multiarray\n_reconstruct\ncnumpy\nndarray\n"
        _emit((0,), out)
        _emit("b", out)
        out += b"\x87R"  # _reconstruct(ndarray, (0,), 'b')
        data = list(x.ravel()) if x.dtype.hasobject else np.ascontiguousarray(x).tobytes()
        _emit((1, x.shape, x.dtype, False, data), out)
        out += b"b"
    else:
        raise TypeError(f"py2_pickle takes no {type(x).__name__}")


def _int(v: int, out: bytearray) -> None:
    if 0 <= v < 256:
        out += b"K" + bytes([v])
    elif 0 <= v < 65536:
        out += b"M" + struct.pack("<H", v)
    else:
        out += b"J" + struct.pack("<i", v)  # Python 2's int: 32 bits on the pickles' machines


def _container(x: list | dict, out: bytearray) -> None:
    """A list (APPEND / APPENDS) or dict (SETITEM / SETITEMS) in Python 2's batches of 1000."""
    items = list(x.items()) if isinstance(x, dict) else [(v,) for v in x]
    one, many = (b"s", b"u") if isinstance(x, dict) else (b"a", b"e")
    out += b"}" if isinstance(x, dict) else b"]"
    for start in range(0, len(items), 1000):
        batch = items[start:start + 1000]
        if len(batch) > 1:
            out += b"("
        for item in batch:
            for v in item:
                _emit(v, out)
        out += one if len(batch) == 1 else many


def _shuffled(written: Written, seed: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every image of ``written``'s part in a seeded order with its class index, and the class names."""
    names = list(written)
    images = np.concatenate([written[n] for n in names])
    labels = np.repeat(np.arange(len(names)), [len(written[n]) for n in names])
    order = np.random.default_rng(seed).permutation(len(images))
    return images[order], labels[order], names


def write_cache(root: Path, val_name: str = "val", seed: int = 0) -> Written:
    """``mini-imagenet-cache-{train,val_name,test}.pkl`` (Ren et al. 2018; learn2learn names val
    ``validation``): Python 3 pickles (protocol 4) of ``image_data`` uint8 (N, 84, 84, 3), rows in any
    order, and ``class_dict`` {wnid: [rows]}."""
    root.mkdir(parents=True, exist_ok=True)
    classes = split_classes(seed)
    for part, written in classes.items():
        images, labels, names = _shuffled(written, seed)
        class_dict = {n: np.flatnonzero(labels == c).tolist() for c, n in enumerate(names)}
        stem = val_name if part == "val" else part
        with open(root / f"mini-imagenet-cache-{stem}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)
        classes[part] = {n: images[class_dict[n]] for n in sorted(names)}
    return classes


def write_category_split(root: Path, seed: int = 0) -> Written:
    """``miniImageNet_category_split_{train_phase_train,train_phase_val,train_phase_test,val,test}.pickle``
    (MetaOptNet, RFS): Python 2 pickles of ``data`` uint8 (N, 84, 84, 3), ``labels`` (Python ints numbered
    over all 100 classes) and ``catname2label`` {wnid: label}. The train_phase_val and _test files hold
    other images of the 64 training classes."""
    root.mkdir(parents=True, exist_ok=True)
    classes = split_classes(seed)
    first = {"train": 0, "val": 64, "test": 80}
    files = {"train": "train_phase_train", "val": "val", "test": "test"}
    out: Written = {}
    for part, written in classes.items():
        images, labels, names = _shuffled(written, seed)
        numbers = labels + first[part]
        obj = {"data": images, "labels": numbers.tolist(),
               "catname2label": {n: first[part] + c for c, n in enumerate(names)}}
        (root / f"miniImageNet_category_split_{files[part]}.pickle").write_bytes(py2_pickle(obj))
        out[part] = {str(first[part] + c): images[labels == c] for c in range(len(names))}
    for k, extra in enumerate(("train_phase_val", "train_phase_test")):
        obj = {"data": noise(64, seed * 1000 + 500 + k), "labels": list(range(64)),
               "catname2label": {n: c for c, n in enumerate(classes["train"])}}
        (root / f"miniImageNet_category_split_{extra}.pickle").write_bytes(py2_pickle(obj))
    return out


def _jpeg(image: np.ndarray, path: Path) -> np.ndarray:
    """Save ``image`` as a JPEG at ``path``; the pixels a reader decodes from it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=90)
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def write_csv(root: Path, seed: int = 0) -> Written:
    """``images/`` of JPEGs named like ``n0153282900000005.jpg`` (wnid and the image's 8-digit number in
    its class, from 1) with ``{train,val,test}.csv`` of ``filename,label`` (Ravi & Larochelle, FEAT,
    LibFewShot)."""
    out: Written = {}
    for part, written in split_classes(seed).items():
        lines, out[part] = ["filename,label"], {}
        for wnid, images in written.items():
            names = [f"{wnid}{k + 1:08d}.jpg" for k in range(len(images))]
            out[part][wnid] = np.stack([_jpeg(x, root / "images" / n) for x, n in zip(images, names)])
            lines += [f"{n},{wnid}" for n in names]
        (root / f"{part}.csv").write_text("\n".join(lines) + "\n")
    return out


def write_folders(root: Path, seed: int = 0) -> Written:
    """``{train,val,test}/<wnid>/<wnid><8 digits>.jpg`` class folders (cbfinn/maml)."""
    out: Written = {}
    for part, written in split_classes(seed).items():
        out[part] = {wnid: np.stack([_jpeg(x, root / part / wnid / f"{wnid}{k + 1:08d}.jpg")
                                     for k, x in enumerate(images)])
                     for wnid, images in written.items()}
    return out
