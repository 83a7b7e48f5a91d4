"""Image files decoded faithfully into uint8 arrays: every mode Pillow reads, scaled from its range,
transparency composited over white, colour conversions reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np

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
