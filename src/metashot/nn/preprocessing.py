"""How a pretrained model takes images: its input size, resize and centre crop, mean and std, read from its
processor config (:mod:`metashot.nn.pretrained`), for image files (PIL) and for batches of tensors (torch,
on their device)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from metashot.io import open_image

PIL_RESAMPLE = {"nearest": Image.Resampling.NEAREST, "bilinear": Image.Resampling.BILINEAR,
                "bicubic": Image.Resampling.BICUBIC}
_TORCH_MODE = {"nearest": "nearest-exact", "bilinear": "bilinear", "bicubic": "bicubic"}


def _shortest_edge(h: int, w: int, edge: int) -> tuple[int, int]:
    """(H, W) with the shorter side ``edge``, the longer scaled and truncated (transformers' and
    torchvision's rule)."""
    return (edge, int(edge * w / h)) if h <= w else (int(edge * h / w), edge)


@dataclass(frozen=True)
class Preprocessing:
    """How a pretrained model takes images (from its processor config: preprocessor_config.json, or timm's
    data config)."""

    size: tuple[int, int]  # (H, W) the model is fed
    resize: int | None  # shortest edge before the centre crop; None: resize straight to size
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: str  # "bicubic" | "bilinear" | "nearest" (PIL's for files, torch's for tensors)

    def __post_init__(self) -> None:
        if self.interpolation not in PIL_RESAMPLE:
            raise ValueError(f"interpolation must be one of {', '.join(PIL_RESAMPLE)}, "
                             f"got {self.interpolation!r}")
        if self.resize is not None and self.resize < max(self.size):
            raise ValueError(f"resize {self.resize} is smaller than the crop {self.size}")

    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Preprocessing:
        """The inverse of :meth:`to_dict`; ValueError (one line) when ``d`` is not one."""
        try:
            return cls(tuple(int(v) for v in d["size"]), None if d["resize"] is None else int(d["resize"]),
                       tuple(float(v) for v in d["mean"]), tuple(float(v) for v in d["std"]),
                       str(d["interpolation"]))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"not a preprocessing dict ({type(e).__name__}: {e}): {d!r}") from None

    def read(self, image: str | Path | Image.Image) -> torch.Tensor:
        """An image file or PIL image as uint8 [3, H, W]: RGB, shortest edge resized, centre-cropped.
        ValueError naming the file when it does not decode."""
        if isinstance(image, Image.Image):
            return self._fit(image)
        try:
            with open_image(image) as im:
                return self._fit(im)
        except (OSError, Image.UnidentifiedImageError, SyntaxError) as e:
            raise ValueError(f"{image}: not a readable image ({type(e).__name__}: {e})") from None

    def _fit(self, im: Image.Image) -> torch.Tensor:
        if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
            im = Image.alpha_composite(Image.new("RGBA", im.size, (255, 255, 255, 255)), im.convert("RGBA"))
        im, resample = im.convert("RGB"), PIL_RESAMPLE[self.interpolation]
        h, w = self.size
        if self.resize is None:
            im = im.resize((w, h), resample)
        else:
            rh, rw = _shortest_edge(im.height, im.width, self.resize)
            im = im.resize((rw, rh), resample)
            top, left = (rh - h) // 2, (rw - w) // 2
            im = im.crop((left, top, left + w, top + h))
        return torch.from_numpy(np.asarray(im).copy()).permute(2, 0, 1).contiguous()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Float images [M, C, h, w] in [0, 1] (C 1 or 3, any size; uint8 is divided by 255) -> [M, 3, H, W]
        normalised: grey repeated to RGB, resized and cropped (antialiased) only when (h, w) != size,
        then (x - mean) / std. Images already at ``size`` are taken as resized and cropped (as
        :meth:`read` leaves them): a raw picture that happens to be that size is not zoomed as its file
        would be."""
        if x.dim() != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected images [M, 1 or 3, h, w], got shape {tuple(x.shape)}")
        x = x.float() / 255 if not x.is_floating_point() else x
        x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
        if tuple(x.shape[-2:]) != self.size:
            x = self._resize(x)
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x - mean) / std

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        h, w = self.size
        target = self.size if self.resize is None else _shortest_edge(*x.shape[-2:], self.resize)
        if tuple(x.shape[-2:]) != target:
            mode = _TORCH_MODE[self.interpolation]
            x = F.interpolate(x, size=target, mode=mode, antialias=mode != "nearest-exact")
            x = x.clamp(0, 1) if mode == "bicubic" else x  # bicubic overshoots; PIL's uint8 clips
        top, left = (x.shape[-2] - h) // 2, (x.shape[-1] - w) // 2
        return x[..., top:top + h, left:left + w]
