"""Image decoding for folder datasets: every mode Pillow reads, with values checked by hand."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from metashot.data.fewshot import FewShotDataset
from metashot.data.images import decode_image


def _row(mode: str, pixels: list) -> Image.Image:
    """A 1-pixel-high image of ``mode`` holding ``pixels`` left to right."""
    im = Image.new(mode, (len(pixels), 1))
    im.putdata(pixels)
    return im


def _palette(mode: str, pixels: list) -> Image.Image:
    """A palette image: index 0 red, 1 blue, 2 grey 100."""
    im = _row(mode, pixels)
    im.putpalette([255, 0, 0, 0, 0, 255, 100, 100, 100])
    return im


def _save(im: Image.Image, path: Path, mode: str, **params: object) -> Path:
    im.save(path, **params)
    with Image.open(path) as back:
        assert back.mode == mode  # the file really is of the mode under test
    return path


# name, file, how to make it, the mode it reopens as, channels, the expected uint8 [W, channels]
CASES: list[tuple[str, str, Callable[[], Image.Image], str, int, list]] = [
    # 16-bit: v * 255 / 65535, rounded (32768 -> 127.502 -> 128; 257 -> 1)
    ("I;16", "a.png", lambda: _row("I;16", [0, 257, 32768, 65535]), "I;16", 1, [[0], [1], [128], [255]]),
    ("I;16B", "a.tiff", lambda: _row("I;16B", [0, 257, 32768, 65535]), "I;16B", 1,
     [[0], [1], [128], [255]]),
    # 32-bit signed: (v + 2^31) * 255 / (2^32 - 1); 0 -> 127.50000003 -> 128
    ("I", "a.tiff", lambda: _row("I", [-(2**31), 0, 2**31 - 1]), "I", 1, [[0], [128], [255]]),
    # float in [0, 1] scaled by 255, float in [0, 255] kept
    ("F [0, 1]", "a.tiff", lambda: _row("F", [0.0, 0.25, 1.0]), "F", 1, [[0], [64], [255]]),
    ("F [0, 255]", "a.tiff", lambda: _row("F", [0.0, 100.4, 254.6]), "F", 1, [[0], [100], [255]]),
    ("1", "a.png", lambda: _row("1", [0, 1]), "1", 1, [[0], [255]]),
    ("L", "a.png", lambda: _row("L", [0, 77, 255]), "L", 1, [[0], [77], [255]]),
    # over white: v * a / 255 + 255 * (1 - a / 255); (100, 128) -> 50.196 + 127 = 177.2 -> 177
    ("LA", "a.png", lambda: _row("LA", [(0, 0), (0, 255), (100, 128)]), "LA", 1, [[255], [0], [177]]),
    ("RGB", "a.png", lambda: _row("RGB", [(1, 2, 3), (250, 128, 0)]), "RGB", 3, [[1, 2, 3], [250, 128, 0]]),
    # (0, 0, 0) at alpha 51: 255 * 204 / 255 = 204
    ("RGBA", "a.png", lambda: _row("RGBA", [(255, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 51)]), "RGBA", 3,
     [[255, 255, 255], [255, 0, 0], [204, 204, 204]]),
    ("P", "a.png", lambda: _palette("P", [1, 0, 2]), "P", 3, [[0, 0, 255], [255, 0, 0], [100, 100, 100]]),
    # red at alpha 128: green and blue 255 * 127 / 255 = 127
    ("PA", "a.tiff", lambda: _palette("PA", [(0, 128), (1, 255), (1, 0)]), "PA", 3,
     [[255, 127, 127], [0, 0, 255], [255, 255, 255]]),
    # Pillow's CMYK -> RGB: 255 - C - K, ...; YCbCr with neutral chroma is grey Y
    ("CMYK", "a.tiff", lambda: _row("CMYK", [(255, 0, 0, 0), (0, 0, 0, 0)]), "CMYK", 3,
     [[0, 255, 255], [255, 255, 255]]),
    ("YCbCr", "a.tiff", lambda: _row("YCbCr", [(100, 128, 128)]), "YCbCr", 3, [[100, 100, 100]]),
]


@pytest.mark.parametrize("name,file,make,mode,channels,expected", CASES, ids=[c[0] for c in CASES])
def test_modes_decode_to_their_values(
    tmp_path: Path, name: str, file: str, make: Callable[[], Image.Image], mode: str, channels: int,
    expected: list,
) -> None:
    path = _save(make(), tmp_path / file, mode)
    x, converted = decode_image(path, channels)
    assert x.dtype == np.uint8 and x.shape == (1, len(expected), channels)
    assert x[0].tolist() == expected and not converted


def test_transparent_colours_are_white(tmp_path: Path) -> None:
    path = _save(_palette("P", [0, 1]), tmp_path / "p.png", "P", transparency=0)
    assert decode_image(path, 3)[0][0].tolist() == [[255, 255, 255], [0, 0, 255]]
    path = _save(_row("L", [7, 8]), tmp_path / "l.png", "L", transparency=7)
    assert decode_image(path, 1)[0][0].tolist() == [[255], [8]]


def test_colour_to_grey_is_pillows_luma_and_flagged(tmp_path: Path) -> None:
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (8, 8, 3), dtype=np.uint8))
    x, converted = decode_image(_save(rgb, tmp_path / "colour.png", "RGB"), 1)
    assert converted and np.array_equal(x[..., 0], np.asarray(rgb.convert("L")))
    # grey content stored as RGB converts without loss: not flagged
    grey = _row("RGB", [(7, 7, 7), (200, 200, 200)])
    x, converted = decode_image(_save(grey, tmp_path / "grey.png", "RGB"), 1)
    assert x[0].tolist() == [[7], [200]] and not converted


def test_grey_to_rgb_is_replicated_and_flagged(tmp_path: Path) -> None:
    x, converted = decode_image(_save(_row("L", [9, 250]), tmp_path / "a.png", "L"), 3)
    assert x[0].tolist() == [[9, 9, 9], [250, 250, 250]] and converted


@pytest.mark.parametrize("values,shown", [([-1.0, 3.0], "-1..3"), ([0.0, 256.0], "0..256"),
                                          ([0.0, float("nan")], "nan")])
def test_float_out_of_range_is_an_error(tmp_path: Path, values: list, shown: str) -> None:
    path = _save(_row("F", values), tmp_path / "f.tiff", "F")
    with pytest.raises(ValueError, match=rf"f.tiff: mode F values span .*{shown}.*, in neither \[0, 1\] nor"):
        decode_image(path, 1)


def test_unsupported_mode_is_an_error(tmp_path: Path) -> None:
    path = _save(_row("LAB", [(50, 128, 128)]), tmp_path / "lab.tiff", "LAB")
    with pytest.raises(ValueError, match=r"lab.tiff: mode LAB images are not supported"):
        decode_image(path, 3)


def test_folder_of_16_bit_images_keeps_its_values(tmp_path: Path) -> None:
    """The bug this decoding fixes: convert("L") clamped 16-bit images to white."""
    for c, value in enumerate((1000, 40000)):
        (tmp_path / f"c{c}").mkdir()
        for i in range(2):
            _save(Image.new("I;16", (4, 4), value), tmp_path / f"c{c}" / f"{i}.png", "I;16")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing converted, nothing to say
        data = FewShotDataset.from_folder(tmp_path, image_size=4)
    # 1000 * 255 / 65535 = 3.89 -> 4; 40000 * 255 / 65535 = 155.6 -> 156
    assert data.flat[:, 0, 0, 0].tolist() == [4, 4, 156, 156]


@pytest.mark.parametrize("channels,change",
                         [(1, "colour images to greyscale"), (3, "greyscale images to RGB")])
def test_folder_conversions_are_reported_once(tmp_path: Path, channels: int, change: str) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i in range(3):
        _save(Image.new("RGB", (4, 4), (200, 10, 10)), tmp_path / "a" / f"{i}.png", "RGB")
        _save(Image.new("L", (4, 4), 90), tmp_path / "b" / f"{i}.png", "L")
    with pytest.warns(UserWarning) as record:
        data = FewShotDataset.from_folder(tmp_path, image_size=4, channels=channels)
    assert len(record) == 1
    example = tmp_path / ("a" if channels == 1 else "b") / "0.png"
    message = f"converted 3 {change} for channels={channels}, e.g. {example}"
    assert str(record[0].message) == message
    # Pillow's luma of (200, 10, 10): (200 * 19595 + 10 * 38470 + 10 * 7471 + 32768) >> 16 = 67
    expected = [[67], [90]] if channels == 1 else [[200, 10, 10], [90, 90, 90]]
    assert data.flat[[0, 3], :, 0, 0].tolist() == expected
