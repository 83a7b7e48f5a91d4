"""Image files decoded faithfully into uint8 arrays (every mode Pillow reads, scaled from its range,
transparency composited over white, colour conversions reported), and folders of them."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from metashot.io import open_image

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
GREY_MODES = ("1", "L", "LA")
COLOUR_MODES = ("P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr")
# integer greyscale modes and the full range of their values, mapped linearly onto 0..255
INTEGER_RANGES = {
    "I;16": (0, 2**16 - 1), "I;16L": (0, 2**16 - 1), "I;16B": (0, 2**16 - 1), "I;16N": (0, 2**16 - 1),
    "I": (-(2**31), 2**31 - 1),
}
# Pillow's RGB-to-L weights (ITU-R 601-2 in 16-bit fixed point): integer RGB rounds as Image.convert("L")
LUMA = np.array([19595, 38470, 7471]) / 65536

def decode_image(path: Path, channels: int) -> tuple[np.ndarray, bool]:
    """The image file at ``path`` as uint8 [H, W, channels], and whether its colours were converted (a
    colour image made greyscale for ``channels`` 1, a greyscale one made RGB for 3).

    Integer greyscale is scaled from its mode's full range, float greyscale must lie in [0, 1] or
    [0, 255], transparency is composited over white, palette, CMYK and YCbCr images are taken as RGB.
    Anything that cannot be taken faithfully is a ValueError naming the file and its mode.
    """
    with open_image(path) as im:
        mode = im.mode
        alpha = mode.endswith("A") or "transparency" in im.info  # LA, PA, RGBA, or a transparent colour
        if mode in GREY_MODES + COLOUR_MODES:
            base = "L" if mode in GREY_MODES else "RGB"
            x = np.asarray(im.convert(base + "A" if alpha else base), np.float64)
        elif alpha:
            raise ValueError(f"{path}: mode {mode} images with transparency are not supported")
        elif mode in INTEGER_RANGES:
            low, high = INTEGER_RANGES[mode]
            x = (np.asarray(im, np.float64) - low) * (255 / (high - low))
        elif mode == "F":
            x = np.asarray(im, np.float64)
            low, high = x.min(), x.max()
            if not 0 <= low <= high <= 255:  # NaN fails too
                raise ValueError(
                    f"{path}: mode F values span {low:g}..{high:g}, in neither [0, 1] nor [0, 255]"
                )
            if high <= 1:
                x = x * 255
        else:
            raise ValueError(f"{path}: mode {mode} images are not supported")
    x = x.reshape(*x.shape[:2], -1)
    if x.shape[2] in (2, 4):  # the last channel is alpha
        alpha = x[..., -1:] / 255
        x = x[..., :-1] * alpha + 255 * (1 - alpha)
    converted = x.shape[2] != channels
    if channels == 1 and converted:
        converted = not (x == x[..., :1]).all()  # grey content stored as RGB loses nothing
        x = x @ LUMA[:, None]
    elif channels == 3 and converted:
        x = x.repeat(3, axis=2)
    return np.floor(x + 0.5).astype(np.uint8), converted


def read_images(
    paths: Sequence[Path], image_size: int, channels: int, box: Sequence[tuple[float, float, float, float]]
    | None = None,
) -> np.ndarray:
    """The image files at ``paths`` decoded by :func:`decode_image`, each cropped to its ``box`` (left,
    top, right, bottom in pixels) when given and resized to ``image_size`` with antialiasing: uint8
    [images, size, size, channels]. One warning says how many had their colours converted."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    images = np.empty((len(paths), image_size, image_size, channels), np.uint8)
    converted = []
    for i, f in enumerate(paths):
        try:
            x, changed = decode_image(f, channels)
        except OSError as e:
            raise ValueError(f"{f}: image does not decode ({e})") from e
        if changed:
            converted.append(f)
        im = Image.fromarray(x[..., 0] if channels == 1 else x)
        if box is not None:
            im = im.crop(tuple(round(v) for v in box[i]))
        im = im.resize((image_size, image_size), Image.Resampling.LANCZOS)
        images[i] = np.asarray(im).reshape(image_size, image_size, channels)
    if converted:
        change = "colour images to greyscale" if channels == 1 else "greyscale images to RGB"
        warnings.warn(
            f"converted {len(converted)} {change} for channels={channels}, e.g. {converted[0]}", stacklevel=2
        )
    return images


def read_folder(
    root: str | os.PathLike, image_size: int = 28, channels: int = 1
) -> tuple[np.ndarray, list[str], list[int]]:
    """A folder of class sub-folders of images: every image read by :func:`read_images`, class after
    class, with the class names and sizes. Classes may hold different numbers of images."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root} is not a folder of class sub-folders")
    classes = sorted(p for p in root.iterdir() if p.is_dir())
    files = [sorted(f for f in c.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES) for c in classes]
    found = [(c, f) for c, f in zip(classes, files, strict=True) if f]
    if not found:
        raise ValueError(f"{root}: no class sub-folders with images ({sorted(IMAGE_SUFFIXES)})")
    images = read_images([f for _, fs in found for f in fs], image_size, channels)
    return images, [c.name for c, _ in found], [len(fs) for _, fs in found]
