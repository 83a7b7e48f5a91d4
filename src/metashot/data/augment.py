"""Training augmentation and normalisation of episode images, batched on the images' device.

Images travel through the DataLoader as uint8 and are augmented after the move to the device. The random
parameters are drawn on the CPU from a generator seeded by ``(seed, episode index)`` only, never from torch's
global or the device's RNG, so an episode gets the same pixels on any number of processes, after a resume,
and on any device; they are then applied to the whole batch at once with kornia.

Recipes (torchvision semantics): "crop-jitter-flip" is MetaOptNet's / RFS's RandomCrop(H, padding) +
ColorJitter(j, j, j) + RandomHorizontalFlip; "resized-crop" is FEAT's / easyfsl's RandomResizedCrop(H) +
the same jitter and flip.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from kornia.enhance import (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_saturation_with_gray_subtraction,
)
from kornia.geometry.transform import crop_and_resize, crop_by_indices

from metashot.errors import ConfigError

AUGMENTS = ("none", "crop-jitter-flip", "resized-crop")
# RandomResizedCrop's defaults (torchvision)
SCALE = (0.08, 1.0)
RATIO = (3 / 4, 4 / 3)
ATTEMPTS = 10
# keeps the augmentation's stream apart from the episode sampler's (seed * 1_000_003 + i)
_STREAM = 0x417567
# ColorJitter's steps in torchvision's order of indices: brightness, contrast, saturation
_STEPS: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = (
    adjust_brightness_accumulative,
    adjust_contrast_with_mean_subtraction,
    adjust_saturation_with_gray_subtraction,
)


def augment_generator(seed: int, episode: int) -> torch.Generator:
    """The CPU generator episode ``episode``'s augmentation draws from: it depends only on
    ``(seed, episode)`` and is independent of the episode sampler's stream."""
    state = np.random.SeedSequence([seed, episode, _STREAM]).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]))


def _resized_crops(g: torch.Generator, n: int, height: int, width: int) -> torch.Tensor:
    """``n`` crops (top, left, height, width) of torchvision's ``RandomResizedCrop.get_params``: the first of
    ``ATTEMPTS`` (area, log-aspect) draws whose rounded box fits, else the centre-crop fallback."""
    area = height * width
    target = area * torch.empty(n, ATTEMPTS, dtype=torch.float64).uniform_(*SCALE, generator=g)
    log_ratio = torch.empty(n, ATTEMPTS, dtype=torch.float64).uniform_(*map(math.log, RATIO), generator=g)
    aspect = log_ratio.exp()
    w = (target * aspect).sqrt().round().long()
    h = (target / aspect).sqrt().round().long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.long().argmax(dim=1, keepdim=True)  # the first attempt that fits (argmax takes the first)
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)
    offsets = torch.rand(n, 2, dtype=torch.float64, generator=g)
    top = (offsets[:, 0] * (height - h + 1)).floor().long()
    left = (offsets[:, 1] * (width - w + 1)).floor().long()
    if width / height < RATIO[0]:
        fh, fw = round(width / RATIO[0]), width
    elif width / height > RATIO[1]:
        fh, fw = height, round(height * RATIO[1])
    else:
        fh, fw = height, width
    fallback = torch.tensor([(height - fh) // 2, (width - fw) // 2, fh, fw])
    crops = torch.stack([top, left, h, w], dim=1)
    return torch.where(fits.any(dim=1, keepdim=True), crops, fallback)


def draw(
    kind: str,
    episodes: torch.Tensor,
    images_per_episode: int,
    height: int,
    width: int,
    seed: int,
    padding: int = 8,
    jitter: float = 0.4,
) -> dict[str, torch.Tensor]:
    """The random parameters of ``kind`` for every image of ``episodes`` (flattened episode by episode,
    N = len(episodes) * images_per_episode), on the CPU:

    - ``crop`` long [N, 4]: top, left, height, width; for "crop-jitter-flip" in the image zero-padded by
      ``padding`` (top and left uniform over 0 .. 2 * padding), for "resized-crop" in the image;
    - ``jitter`` float [N, 3]: brightness, contrast and saturation factors, uniform over
      [max(0, 1 - jitter), 1 + jitter];
    - ``order`` long [N, 3]: a uniformly random order of those three steps per image;
    - ``flip`` bool [N]: horizontal flip, probability 0.5.
    """
    if kind not in AUGMENTS[1:]:
        raise ValueError(f"no parameters to draw for augment {kind!r}; expected one of {AUGMENTS[1:]}")
    n = images_per_episode
    parts = []
    for episode in episodes.tolist():
        g = augment_generator(seed, episode)
        if kind == "crop-jitter-flip":
            corner = torch.randint(0, 2 * padding + 1, (n, 2), generator=g)
            crop = torch.cat([corner, torch.tensor([[height, width]]).expand(n, 2)], dim=1)
        else:
            crop = _resized_crops(g, n, height, width)
        factors = torch.empty(n, 3).uniform_(max(0.0, 1 - jitter), 1 + jitter, generator=g)
        order = torch.rand(n, 3, generator=g).argsort(dim=1)
        flip = torch.rand(n, generator=g) < 0.5
        parts.append({"crop": crop, "jitter": factors, "order": order, "flip": flip})
    return {key: torch.cat([part[key] for part in parts]) for key in ("crop", "jitter", "order", "flip")}


def _corners(y0: torch.Tensor, x0: torch.Tensor, y1: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    """kornia's boxes [N, 4, 2] from rows y0..y1, columns x0..x1 (inclusive): the (x, y) corners top-left,
    top-right, bottom-right, bottom-left."""
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]
    return torch.stack([torch.stack(corner, dim=1) for corner in corners], dim=1)


def pad_crop(images: torch.Tensor, crop: torch.Tensor, padding: int) -> torch.Tensor:
    """torchvision's RandomCrop(size, padding) with zero padding: ``images`` [N, C, H, W] (any dtype) padded
    by ``padding`` zeros on each side, then cropped at ``crop``'s (top, left) to (height, width)."""
    padded = F.pad(images, (padding,) * 4)
    top, left, h, w = crop.unbind(1)
    return crop_by_indices(padded, _corners(top, left, top + h - 1, left + w - 1), size=images.shape[-2:])


def resized_crop(images: torch.Tensor, crop: torch.Tensor) -> torch.Tensor:
    """Each float image [N, C, H, W] cropped at ``crop`` and resized bilinearly back to H x W.

    The box corners sit where torchvision's resize (``align_corners=False``) samples: output pixel x reads
    source x' = left + (x + 0.5) * w / W - 0.5. Only the outermost output ring differs from torchvision's
    crop-then-resize: there x' lies up to half a pixel outside the crop, which kornia blends with the
    neighbouring image pixel (the image's edge is replicated) where torchvision repeats the crop's edge.
    """
    size = images.shape[-2:]
    top, left, h, w = crop.to(torch.float64).unbind(1)
    dy, dx = 0.5 - 0.5 * h / size[0], 0.5 - 0.5 * w / size[1]
    boxes = _corners(top - dy, left - dx, top + h - 1 + dy, left + w - 1 + dx).to(images)
    return crop_and_resize(images, boxes, size, mode="bilinear", padding_mode="border", align_corners=True)


def color_jitter(images: torch.Tensor, factors: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    """torchvision's ColorJitter (hue 0) of float images [N, C, H, W] in [0, 1], image n's steps in the
    order ``order[n]`` with ``factors[n]``: brightness multiplies by the factor, contrast blends with the
    image's grey mean, saturation with its greyscale (skipped for C = 1); each clamps to [0, 1].

    Grey is ITU-R 601 luma (0.299, 0.587, 0.114) as in PIL, whose images MetaOptNet and RFS jitter;
    torchvision's tensor path weighs red 0.2989.
    """
    factors = factors.to(images)
    steps = _STEPS if images.shape[1] == 3 else _STEPS[:2]
    out = torch.empty_like(images)
    # one batched pass per order that occurs (at most 6): the images that take their steps in that order
    for steps_order in order.unique(dim=0).tolist():
        rows = (order == torch.tensor(steps_order)).all(dim=1).nonzero().squeeze(1).to(images.device)
        x, f = images.index_select(0, rows), factors.index_select(0, rows)
        for index in steps_order:
            if index < len(steps):
                x = steps[index](x, f[:, index])
        out.index_copy_(0, rows, x)
    return out


@dataclass(frozen=True)
class Augment:
    """Training augmentation of episode images and the normalisation of every episode."""

    kind: str = "none"  # one of AUGMENTS
    padding: int = 8  # crop-jitter-flip's RandomCrop padding (zeros): 8 for 84 px, 4 for 32 px
    jitter: float = 0.4  # ColorJitter brightness = contrast = saturation
    mean: tuple[float, ...] | None = None  # per channel, in [0, 1] units; None: no normalisation
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in AUGMENTS:
            raise ConfigError(f"augment {self.kind!r}: expected one of {', '.join(AUGMENTS)}")
        if self.padding < 0 or self.jitter < 0:
            raise ConfigError(f"augment padding {self.padding} and jitter {self.jitter}: both must be >= 0")
        if (self.mean is None) != (self.std is None) or len(self.mean or ()) != len(self.std or ()):
            raise ConfigError(f"augment mean {self.mean} and std {self.std}: give both, one per channel")
        if self.std is not None and min(self.std) <= 0:
            raise ConfigError(f"augment std {self.std}: every value must be > 0")

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """uint8 images [N, C, H, W] augmented with :func:`draw`'s ``params``: float in [0, 1]."""
        if self.kind not in AUGMENTS[1:]:
            raise ValueError(f"augment {self.kind!r} has nothing to apply; expected one of {AUGMENTS[1:]}")
        if images.shape[1] not in (1, 3):
            raise ConfigError(f"augment {self.kind!r} jitters 1- or 3-channel images, not {images.shape[1]}")
        flip = params["flip"].to(images.device)[:, None, None, None]
        # flipped before the jitter, which does not depend on where a pixel is: the same images, and the
        # crop-jitter-flip flip moves uint8 pixels, not floats
        if self.kind == "crop-jitter-flip":
            images = pad_crop(images, params["crop"], self.padding)
            images = torch.where(flip, images.flip(-1), images).float().div_(255)
        else:
            images = resized_crop(images.float().div_(255), params["crop"])
            images = torch.where(flip, images.flip(-1), images)
        return color_jitter(images, params["jitter"], params["order"])

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """Float images [..., C, H, W] less ``mean``, over ``std`` (torchvision's Normalize), in place."""
        if self.mean is None or self.std is None:
            return images
        if len(self.mean) != images.shape[-3]:
            raise ConfigError(f"augment mean {self.mean} has {len(self.mean)} values, images have "
                              f"{images.shape[-3]} channels")
        mean = torch.tensor(self.mean, dtype=images.dtype, device=images.device)[:, None, None]
        std = torch.tensor(self.std, dtype=images.dtype, device=images.device)[:, None, None]
        return images.sub_(mean).div_(std)  # in place: its callers pass images of their own

    def __call__(self, images: torch.Tensor, episodes: torch.Tensor, seed: int, train: bool) -> torch.Tensor:
        """images: uint8 [B, M, C, H, W] on any device (M = the episode's support + query images);
        episodes: int64 [B] on the CPU, each episode's global index; returns float [B, M, C, H, W] on the
        images' device: augmented (only when ``train`` and kind != "none"), scaled to [0, 1], normalised."""
        if images.dim() != 5 or images.dtype != torch.uint8:
            shape = list(images.shape)
            raise ValueError(f"expected uint8 images [B, M, C, H, W], got {images.dtype} {shape}")
        if episodes.shape != images.shape[:1]:
            raise ValueError(f"{list(episodes.shape)} episode indices for {images.shape[0]} episodes")
        if not train or self.kind == "none":
            return self.normalise(images.float().div_(255))
        b, m, c, h, w = images.shape
        params = draw(self.kind, episodes, m, h, w, seed, self.padding, self.jitter)
        return self.normalise(self.apply(images.flatten(0, 1), params)).view(b, m, c, h, w)
