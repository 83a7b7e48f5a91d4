"""tieredImageNet (Ren et al., ICLR 2018): 608 ImageNet classes in 34 categories, split by category into
351 / 97 / 160 classes (20 / 6 / 8 categories; 448,695 / 124,261 / 206,209 images), 84 x 84.

Read from the copy a user holds, in either of two layouts (BRIEF section 8):

- ``png-pkl``: ``{train,val,test}_images_png.pkl``, Python 2 pickles of a list of PNG-encoded images (each
  a uint8 array of the file's bytes), with ``{split}_labels.pkl``, dicts of ``label_specific`` (the class
  of each image), ``label_general`` (its category), ``label_specific_str`` and ``label_general_str``
  (their names) (Ren et al.; learn2learn, torchmeta). The PNGs are decoded a chunk at a time as the cache
  is built, into RGB; the classes are named by ``label_specific_str``.
- ``npz``: ``{split}_images.npz`` of ``images`` uint8 (N, 84, 84, 3) with ``{split}_labels.pkl`` of
  ``labels`` (or ``label_specific``) (MetaOptNet, FEAT, RFS). Those arrays were made by decoding the
  PNGs with OpenCV, whose pixels are BGR, and their readers flip them: the task_arg ``channel_order``
  ("bgr", the default, or "rgb") says which they hold. ``np.savez`` stores its members uncompressed, so
  ``images`` is memory-mapped where it lies in the file and read a chunk at a time; a compressed member
  (``np.savez_compressed``) cannot be mapped and is read whole into memory.
"""

from __future__ import annotations

import io
import math
import struct
import zipfile
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
from PIL import UnidentifiedImageError

from metashot.data.imageset import ImageSetSource, Layout, Part, check_array
from metashot.data.miniimagenet import MEAN, STD
from metashot.data.pickles import load_pickle
from metashot.errors import DataError
from metashot.io import open_image

SIZE = 84
CHANNEL_ORDERS = ("bgr", "rgb")
ZIP_LOCAL_HEADER = b"PK\x03\x04"


def _name(x: Any) -> str:
    return x.decode("latin1") if isinstance(x, bytes) else str(x)


def read_labels(path: Path, keys: tuple[str, ...]) -> tuple[np.ndarray, list[str]]:
    """The class of each image (0 .. classes - 1) and the class names, from the first of ``keys`` that
    the labels pickle at ``path`` holds; the names are ``label_specific_str``'s for ``label_specific``
    labels where it names them all, else the label numbers."""
    obj = load_pickle(path)
    key = next((k for k in keys if isinstance(obj, dict) and k in obj), None)
    if key is None:
        found = sorted(map(_name, obj)) if isinstance(obj, dict) else type(obj).__name__
        raise DataError(f"{path}: expected a dict with the key {' or '.join(map(repr, keys))}, found {found}")
    labels = np.asarray(obj[key])
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {key!r} is {labels.dtype} {labels.shape}, expected one integer per image")
    numbers, dense = np.unique(labels, return_inverse=True)
    strings = obj.get("label_specific_str") if key == "label_specific" else None
    if isinstance(strings, list | tuple | np.ndarray) and len(numbers) and 0 <= numbers[0] \
            and numbers[-1] < len(strings):
        return dense, [_name(strings[n]) for n in numbers]
    return dense, [str(n) for n in numbers]


def decode_png(item: Any, path: Path, index: int) -> np.ndarray:
    """Image ``index`` of the PNG pickle at ``path`` (a uint8 array of a PNG file's bytes, bytes, or a
    Python 2 byte string) as uint8 RGB [84, 84, 3]; a DataError naming the file and the index when it is
    not one."""
    where = f"{path}: image {index}"
    if isinstance(item, np.ndarray) and item.dtype == np.uint8:
        item = item.tobytes()
    elif isinstance(item, str):  # a Python 2 str, which the unpickler read as latin1: its bytes one to one
        item = item.encode("latin1")
    if not isinstance(item, bytes | bytearray):
        raise DataError(f"{where} is {type(item).__name__}, expected the bytes of a PNG file")
    try:
        with open_image(io.BytesIO(item), where) as im:
            x = np.asarray(im.convert("RGB"))
    except (OSError, SyntaxError, ValueError) as e:  # Pillow's errors for data that is not an image
        reason = "not an image file" if isinstance(e, UnidentifiedImageError) else str(e)
        raise DataError(f"{where} does not decode ({reason})") from None
    if x.shape != (SIZE, SIZE, 3):
        raise DataError(f"{where} is {x.shape[1]} x {x.shape[0]}, expected {SIZE} x {SIZE}")
    return x


def _decode_rows(items: list[Any], path: Path, rows: np.ndarray) -> np.ndarray:
    out = np.empty((len(rows), SIZE, SIZE, 3), np.uint8)
    for k, i in enumerate(rows):
        out[k] = decode_png(items[i], path, int(i))
    return out


def _mapped(path: Path, info: zipfile.ZipInfo) -> np.ndarray:
    """The .npy member ``info`` of the zip at ``path``, stored uncompressed, memory-mapped read-only."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        local = f.read(30)  # the member's local header: its name's and extra field's lengths end it
        if len(local) != 30 or not local.startswith(ZIP_LOCAL_HEADER):
            raise DataError(f"{path}: corrupt zip (no local header for {info.filename})")
        name, extra = struct.unpack("<HH", local[26:30])
        f.seek(info.header_offset + 30 + name + extra)
        try:
            version = np.lib.format.read_magic(f)
            read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                           (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read_header is None:
                raise ValueError(f"format version {version} is not mapped")
            shape, fortran, dtype = read_header(f)
        except ValueError as e:
            raise DataError(f"{path}: {info.filename} is not a .npy array ({e})") from None
        offset = f.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: {info.filename} holds Python objects, expected uint8 pixels")
    size = math.prod(shape) * dtype.itemsize
    if offset + size > path.stat().st_size:
        raise DataError(f"{path}: truncated ({info.filename} needs {size} bytes from byte {offset})")
    if size == 0:
        return np.zeros(shape, dtype)
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape, order="F" if fortran else "C")


def npz_images(path: Path) -> np.ndarray:
    """The ``images`` array of the npz at ``path``, memory-mapped when stored uncompressed (``np.savez``),
    else read whole (``np.savez_compressed``); never unpickled."""
    try:
        with zipfile.ZipFile(path) as z:
            members = z.namelist()
            info = z.getinfo("images.npy") if "images.npy" in members else None
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path}: not an npz, a zip of .npy arrays ({e}); download it again") from None
    if info is None:
        found = [m.removesuffix(".npy") for m in members]
        raise DataError(f"{path}: expected the key 'images', found {found}")
    if info.compress_type == zipfile.ZIP_STORED:
        return _mapped(path, info)
    try:
        with np.load(path, allow_pickle=False) as z:
            return z["images"]
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as e:
        raise DataError(f"{path}: 'images' does not read ({e})") from None


def _check_count(images_path: Path, images: int, labels_path: Path, labels: int) -> None:
    if images != labels:
        raise DataError(f"{images_path}: {images} images, but {labels_path.name} labels {labels}")


class PngPickleLayout(Layout):
    name = "png-pkl"
    files = "{train,val,test}_images_png.pkl with {train,val,test}_labels.pkl"

    def sources(self, root: Path, part: str) -> list[Path]:
        return [root / f"{part}_images_png.pkl", root / f"{part}_labels.pkl"]

    def read(self, root: Path, part: str, image_size: int) -> Part:
        images_path, labels_path = self.sources(root, part)
        labels, names = read_labels(labels_path, ("label_specific",))
        items = load_pickle(images_path)
        if isinstance(items, np.ndarray) and items.dtype.hasobject and items.ndim == 1:
            items = list(items)
        if not isinstance(items, list):
            found = type(items).__name__
            raise DataError(f"{images_path}: expected a list of PNG-encoded images, found {found}")
        _check_count(images_path, len(items), labels_path, len(labels))
        return Part(labels, names, partial(_decode_rows, items, images_path))


class NpzLayout(Layout):
    name = "npz"
    files = "{train,val,test}_images.npz with {train,val,test}_labels.pkl"

    def __init__(self, channel_order: str = "bgr") -> None:
        self.channel_order = channel_order

    def sources(self, root: Path, part: str) -> list[Path]:
        return [root / f"{part}_images.npz", root / f"{part}_labels.pkl"]

    def key(self) -> dict[str, Any]:
        return {"channel_order": self.channel_order}

    def read(self, root: Path, part: str, image_size: int) -> Part:
        images_path, labels_path = self.sources(root, part)
        labels, names = read_labels(labels_path, ("labels", "label_specific"))
        images = check_array(npz_images(images_path), images_path, "images")
        _check_count(images_path, len(images), labels_path, len(labels))
        if self.channel_order == "bgr":
            return Part(labels, names, lambda rows: images[rows][..., ::-1])
        return Part(labels, names, lambda rows: images[rows])


class TieredImageNetSource(ImageSetSource):
    """tieredImageNet, Ren et al.'s split (351 / 97 / 160 classes), 84 x 84 RGB, normalised with
    miniImageNet's statistics as MetaOptNet and RFS do. task_args: those of :class:`ImageSetSource`, and
    channel_order ("bgr" or "rgb", default "bgr"): the channel order of the npz layout's arrays (the
    png-pkl layout's PNGs are RGB and ignore it)."""

    name = "tieredimagenet"
    layouts = (PngPickleLayout(), NpzLayout())
    classes = {"train": 351, "val": 97, "test": 160}
    mean, std = MEAN, STD

    def _parse(self, args: dict[str, Any]) -> None:
        order = args.pop("channel_order", "bgr")
        if order not in CHANNEL_ORDERS:
            raise ValueError(f"channel_order must be one of {CHANNEL_ORDERS}, got {order!r}")
        self.layouts = (PngPickleLayout(), NpzLayout(order))
