"""Episode augmentation: parameters that depend only on (seed, episode), their distributions, each operation
against a hand formula of torchvision's definition, and the global RNG left alone."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from metashot.data.augment import AUGMENTS, Augment, augment_generator, color_jitter, draw, resized_crop
from metashot.errors import ConfigError

KINDS = AUGMENTS[1:]
MEAN, STD = (0.47, 0.45, 0.41), (0.28, 0.27, 0.28)
LUMA = torch.tensor([0.299, 0.587, 0.114])


def _images(b: int, m: int = 6, c: int = 3, size: int = 12, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, m, c, size, size), dtype=torch.uint8, generator=g)


def _params(n: int, crop: list[int], factors: tuple[float, float, float] = (1.0, 1.0, 1.0),
            order: tuple[int, int, int] = (0, 1, 2), flip: bool = False) -> dict[str, torch.Tensor]:
    return {"crop": torch.tensor([crop] * n), "jitter": torch.tensor([factors] * n),
            "order": torch.tensor([order] * n), "flip": torch.full((n,), flip)}


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_and_episode_same_pixels_and_a_batch_is_its_episodes(kind: str) -> None:
    augment = Augment(kind, padding=2, mean=MEAN, std=STD)
    images = _images(2)
    episodes = torch.tensor([7, 8])
    out = augment(images, episodes, seed=3, train=True)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert torch.equal(out, augment(images, episodes, seed=3, train=True))
    # the episodes one at a time (two processes, or a resume between them) give the batch's pixels
    for k in range(2):
        alone = augment(images[k : k + 1], episodes[k : k + 1], seed=3, train=True)
        assert torch.equal(out[k : k + 1], alone)
    # another episode index or seed with the same images: other parameters, other pixels
    assert not torch.equal(out[:1], augment(images[:1], torch.tensor([9]), seed=3, train=True))
    assert not torch.equal(out, augment(images, episodes, seed=4, train=True))


def test_parameters_depend_on_seed_and_episode_only_and_not_the_sampler_stream() -> None:
    a = draw("resized-crop", torch.tensor([5, 6]), 4, 84, 84, seed=1)
    b = draw("resized-crop", torch.tensor([6]), 4, 84, 84, seed=1)
    assert all(torch.equal(a[key][4:], b[key]) for key in a)
    sampler = torch.Generator().manual_seed(1 * 1_000_003 + 6)
    assert not torch.equal(torch.rand(8, generator=sampler), torch.rand(8, generator=augment_generator(1, 6)))


def test_evaluation_is_scaling_and_normalisation_only() -> None:
    images = _images(2)
    expected = (images.double() / 255 - torch.tensor(MEAN, dtype=torch.double)[:, None, None]) / torch.tensor(
        STD, dtype=torch.double)[:, None, None]
    for kind in AUGMENTS:
        out = Augment(kind, mean=MEAN, std=STD)(images, torch.tensor([0, 1]), seed=0, train=False)
        torch.testing.assert_close(out.double(), expected, rtol=0, atol=1e-6)
    assert torch.equal(Augment()(images, torch.tensor([0, 1]), 0, False), images.float() / 255)


def test_kind_none_trains_on_the_evaluation_pixels() -> None:
    images = _images(2)
    augment = Augment("none", mean=MEAN, std=STD)
    episodes = torch.tensor([0, 1])
    assert torch.equal(augment(images, episodes, 0, True), augment(images, episodes, 0, False))


def test_global_rng_untouched() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    for kind in KINDS:
        Augment(kind)(_images(1), torch.tensor([0]), seed=0, train=True)
    assert torch.equal(torch.get_rng_state(), before)


def _chi_square(values: torch.Tensor, categories: int) -> float:
    counts = torch.bincount(values, minlength=categories).double()
    expected = len(values) / categories
    return float(((counts - expected) ** 2 / expected).sum())


def test_crop_jitter_flip_parameter_distributions() -> None:
    # 250 episodes x 80 images = 20,000 images
    p = draw("crop-jitter-flip", torch.arange(250), 80, 84, 84, seed=0, padding=8, jitter=0.4)
    assert p["crop"].shape == (20_000, 4) and (p["crop"][:, 2:] == 84).all()
    for offsets in p["crop"][:, 0], p["crop"][:, 1]:
        assert offsets.min() == 0 and offsets.max() == 16
        # 16 degrees of freedom: P(chi-square > 39.25) = 0.001
        assert _chi_square(offsets, 17) < 39.25
    assert abs(p["flip"].double().mean() - 0.5) < 0.01
    factors = p["jitter"]
    assert factors.min() >= 0.6 and factors.max() <= 1.4
    assert torch.allclose(factors.double().mean(0), torch.ones(3, dtype=torch.double), atol=0.01)
    # each of the 6 orders of the three steps about equally often (5 degrees of freedom: P(> 20.52) = 0.001)
    assert sorted(map(tuple, p["order"].unique(dim=0).tolist())) == sorted(itertools.permutations(range(3)))
    perm_ids = (p["order"] * torch.tensor([9, 3, 1])).sum(1)
    assert _chi_square(torch.unique(perm_ids, return_inverse=True)[1], 6) < 20.52


def test_resized_crop_parameter_distributions() -> None:
    top, left, h, w = draw("resized-crop", torch.arange(250), 80, 84, 84, seed=0)["crop"].double().unbind(1)
    assert (top >= 0).all() and (left >= 0).all() and (top + h <= 84).all() and (left + w <= 84).all()
    # w and h are rounded from sqrt(area * aspect) and sqrt(area / aspect): within half a pixel of a box of
    # area in 0.08 .. 1 of the image's and aspect (w / h) in 3/4 .. 4/3
    area = 84 * 84
    assert ((w + 0.5) * (h + 0.5) >= 0.08 * area).all() and ((w - 0.5) * (h - 0.5) <= area).all()
    assert ((w + 0.5) / (h - 0.5) >= 3 / 4).all() and ((w - 0.5) / (h + 0.5) <= 4 / 3).all()
    fraction, aspect = w * h / area, w / h
    assert fraction.min() < 0.09 and fraction.max() > 0.95 and aspect.min() < 0.76 and aspect.max() > 1.31
    # the crop's position is uniform over where it fits: its centre is, on average, the image's
    assert abs(float((top + h / 2).mean()) - 42) < 0.5 and abs(float((left + w / 2).mean()) - 42) < 0.5


def test_resized_crop_falls_back_to_the_centre_crop() -> None:
    # an 84 x 2 image: no box of 0.08 of its area with aspect >= 3/4 is 2 pixels wide, so every attempt fails;
    # torchvision's fallback for in_ratio 2/84 < 3/4 is w = 2, h = round(2 / (3/4)) = 3, at ((84-3)//2, 0)
    crops = draw("resized-crop", torch.arange(3), 5, 84, 2, seed=0)["crop"]
    assert torch.equal(crops, torch.tensor([[40, 0, 3, 2]]).expand(15, 4))


def test_crop_moves_pixels_by_its_offset_with_zeros_where_padded() -> None:
    images = _images(1, m=2, size=10)[0]
    top, left = 1, 6  # in the image padded by 4: a shift of 3 rows up and 2 columns right
    out = Augment("crop-jitter-flip", padding=4).apply(images, _params(2, [top, left, 10, 10]))
    expected = torch.zeros(2, 3, 10, 10)
    expected[:, :, 3:, :8] = images[:, :, :7, 2:].float() / 255
    assert torch.equal(out, expected)


@pytest.mark.parametrize("kind", KINDS)
def test_flip_is_a_horizontal_mirror(kind: str) -> None:
    images = _images(1, size=10)[0]
    whole = [4, 4, 10, 10] if kind == "crop-jitter-flip" else [0, 0, 10, 10]
    augment = Augment(kind, padding=4)
    out = augment.apply(images, _params(6, whole, flip=True))
    torch.testing.assert_close(out, images.flip(-1).float() / 255, rtol=0, atol=1e-6)


@pytest.mark.parametrize("top, left", [(3, 1), (0, 0), (7, 5)])
def test_resized_crop_samples_as_torchvision_resize(top: int, left: int) -> None:
    crop = torch.randint(0, 256, (2, 3, 5, 7), generator=torch.Generator().manual_seed(1)).float() / 255
    # the crop at (top, left) of a 12 x 12 image whose outside repeats the crop's edge, so that torchvision's
    # crop-then-resize and kornia's resampling of the whole image agree on every pixel (a crop at the image's
    # edge: the image's edge is repeated)
    image = F.pad(crop, (left, 12 - 7 - left, top, 12 - 5 - top), mode="replicate")
    out = resized_crop(image, torch.tensor([[top, left, 5, 7]] * 2))
    reference = F.interpolate(crop, size=(12, 12), mode="bilinear", align_corners=False)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-5)


def _grey(x: torch.Tensor) -> torch.Tensor:
    return (x * LUMA[:, None, None]).sum(-3, keepdim=True) if x.shape[-3] == 3 else x


# torchvision's brightness, contrast and saturation before their clamp to [0, 1]
HAND = (
    lambda x, f: f * x,
    lambda x, f: f * x + (1 - f) * _grey(x).mean((-3, -2, -1), keepdim=True),
    lambda x, f: f * x + (1 - f) * _grey(x),
)


def _hand_jitter(images: torch.Tensor, factors: torch.Tensor, order: tuple[int, ...], clamp: bool
                 ) -> torch.Tensor:
    out = []
    for x, f in zip(images, factors):
        for step in order:
            if x.shape[0] == 3 or step != 2:  # saturation leaves a greyscale image alone
                x = HAND[step](x, f[step]).clamp(0, 1) if clamp else HAND[step](x, f[step])
        out.append(x)
    return torch.stack(out)


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 0, 1), (1, 2, 0)])
@pytest.mark.parametrize("channels", [1, 3])
def test_colour_jitter_is_torchvisions_formula(order: tuple[int, int, int], channels: int) -> None:
    images = torch.rand(2, channels, 4, 5, generator=torch.Generator().manual_seed(2))
    factors = torch.tensor([[1.4, 0.6, 1.3], [0.7, 1.35, 0.65]])
    out = color_jitter(images, factors, torch.tensor([order, order]))
    torch.testing.assert_close(out, _hand_jitter(images, factors, order, clamp=True), rtol=0, atol=1e-5)
    # brightness 1.4 takes pixels past 1: the clamps are exercised
    assert not torch.allclose(out, _hand_jitter(images, factors, order, clamp=False), atol=1e-3)


def test_colour_jitter_orders_per_image() -> None:
    images = torch.rand(2, 3, 4, 5, generator=torch.Generator().manual_seed(3))
    factors = torch.tensor([[1.4, 0.6, 1.3]] * 2)
    both = color_jitter(images, factors, torch.tensor([[0, 1, 2], [2, 1, 0]]))
    assert torch.equal(both[:1], color_jitter(images[:1], factors[:1], torch.tensor([[0, 1, 2]])))
    assert torch.equal(both[1:], color_jitter(images[1:], factors[1:], torch.tensor([[2, 1, 0]])))
    assert not torch.allclose(both[1:], color_jitter(images[1:], factors[1:], torch.tensor([[0, 1, 2]])))


def test_greyscale_trains_and_other_channel_counts_are_refused() -> None:
    images = _images(1, c=1)
    out = Augment("crop-jitter-flip", padding=2, mean=(0.5,), std=(0.2,))(images, torch.tensor([0]), 0, True)
    assert out.shape == images.shape
    with pytest.raises(ConfigError, match="jitters 1- or 3-channel images, not 2"):
        Augment("resized-crop")(_images(1, c=2), torch.tensor([0]), 0, True)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ConfigError, match="'flip': expected one of none, crop-jitter-flip, resized-crop"):
        Augment("flip")
    with pytest.raises(ConfigError, match="give both"):
        Augment(mean=MEAN)
    with pytest.raises(ConfigError, match="has 3 values, images have 1 channels"):
        Augment(mean=MEAN, std=STD)(_images(1, c=1), torch.tensor([0]), 0, False)
