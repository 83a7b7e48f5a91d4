"""Classes of unequal size: the dataset, uniform draws from each class's own count, classes too small."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from metashot.config import Config
from metashot.data.fewshot import FewShotDataset, episode_loader
from metashot.data.sampling import ClassLayout, EpisodeSampler
from metashot.data.sequences import sequence_loader
from metashot.data.tasks import build_source

SIZES = [3, 7, 2, 5, 4, 9]


def _ragged(sizes: list[int] = SIZES) -> FewShotDataset:
    """Image j of class c holds (c, j) in its two channels, so gathered images can be checked exactly."""
    c = torch.arange(len(sizes)).repeat_interleave(torch.tensor(sizes))
    j = torch.cat([torch.arange(n) for n in sizes])
    images = torch.stack([c, j], 1).view(-1, 2, 1, 1).float()
    return FewShotDataset(images, [f"c{i}" for i in range(len(sizes))], sizes)


def _reference_draw(g: torch.Generator, sizes: list[int], ways: int, per_class: int) -> torch.Tensor:
    """A loop over classes of the rule: classes from a permutation; in each class, the ``per_class``
    examples whose noise draws are smallest, among the class's own examples only."""
    classes = torch.randperm(len(sizes), generator=g)[:ways].tolist()
    noise = torch.rand(ways, max(sizes[c] for c in classes), generator=g)
    rows = []
    for n, c in enumerate(classes):
        examples = sorted(range(sizes[c]), key=lambda j: float(noise[n, j]))[:per_class]
        rows.append([sum(sizes[:c]) + j for j in examples])
    return torch.tensor(rows)


def test_ragged_dataset_holds_every_image() -> None:
    data = _ragged()
    assert data.num_classes == 6 and len(data) == sum(SIZES) and data.class_sizes.tolist() == SIZES
    assert data.image_shape == (2, 1, 1)
    for name in ("examples_per_class", "images"):
        with pytest.raises(ValueError, match=r"the classes hold 2 to 9 images, not one .* see class_sizes"):
            getattr(data, name)
    part = data.subset([4, 1])
    assert part.class_names == ["c4", "c1"] and part.class_sizes.tolist() == [4, 7]
    assert part.flat[:, :, 0, 0].tolist() == [[4, j] for j in range(4)] + [[1, j] for j in range(7)]
    with pytest.raises(ValueError, match=r"holding sum\(class_sizes\) = 30 images; got \(29, 2, 1, 1\)"):
        FewShotDataset(data.flat[1:], class_sizes=SIZES)


def test_equal_classes_from_either_constructor() -> None:
    images = torch.arange(4 * 3 * 2).view(4, 3, 1, 1, 2)
    a, b = FewShotDataset(images), FewShotDataset(images.view(12, 1, 1, 2), class_sizes=[3] * 4)
    for d in (a, b):
        assert d.examples_per_class == 3 and d.class_sizes.tolist() == [3] * 4
        assert torch.equal(d.images, images) and torch.equal(d.flat, images.view(12, 1, 1, 2))


def test_equal_draw_is_the_one_formula_episodes_always_used() -> None:
    """Seeded episodes are promised across versions: for equal classes the draw is still classes * E +
    the first examples of an argsort of uniform noise, from the same generator calls."""
    layout = ClassLayout.of(50, 20)
    for seed in range(5):
        got = layout.draw(torch.Generator().manual_seed(seed), 5, 16)
        g = torch.Generator().manual_seed(seed)
        classes = torch.randperm(50, generator=g)[:5]
        examples = torch.rand(5, 20, generator=g).argsort(dim=1)[:, :16]
        assert torch.equal(got, classes.unsqueeze(1) * 20 + examples)


def test_ragged_draw_matches_a_reference_loop() -> None:
    layout = ClassLayout.of(len(SIZES), SIZES)
    assert layout.common is None
    for seed in range(30):
        got = layout.draw(torch.Generator().manual_seed(seed), 4, 2)
        assert torch.equal(got, _reference_draw(torch.Generator().manual_seed(seed), SIZES, 4, 2))
    # the masked path given equal sizes draws what the equal path draws
    equal = ClassLayout.of(10, 6)
    masked = ClassLayout(equal.sizes, equal.offsets, None)
    for seed in range(5):
        a, b = (x.draw(torch.Generator().manual_seed(seed), 3, 4) for x in (equal, masked))
        assert torch.equal(a, b)


def test_ragged_draws_are_uniform_within_each_class() -> None:
    data = _ragged()
    sampler = data.sampler(ways=6, shots=1, queries=1, episodes=3000)
    counts = torch.zeros(len(data))
    for ep in sampler:
        cls, ex = data.flat[ep.indices, 0, 0, 0], data.flat[ep.indices, 1, 0, 0]
        assert (cls == cls[:, :1]).all() and (ex[:, 0] != ex[:, 1]).all()  # one class a row, distinct
        counts += torch.bincount(ep.indices.flatten(), minlength=len(data))
    # all 6 classes each episode, 2 of a class's n images: each image in 2/n of the episodes
    expected = torch.cat([torch.full((n,), 3000 * 2 / n) for n in SIZES])
    binomial_sd = (expected * (1 - expected / 3000)).sqrt()
    assert ((counts - expected).abs() <= 5 * binomial_sd).all()  # classes of 2: always both


def test_loaders_gather_ragged_classes() -> None:
    data = _ragged()
    ep = next(iter(episode_loader(data, data.sampler(ways=3, shots=1, queries=1, episodes=4), meta_batch=4)))
    assert torch.equal(ep.support[..., 0, 0, 0], ep.query[..., 0, 0, 0])  # support and query share classes
    assert (ep.support[..., 1, 0, 0] < torch.tensor(SIZES)[ep.support[..., 0, 0, 0].long()]).all()
    batch = next(iter(sequence_loader(data, 4, 2, episodes=2, batch_size=2)))
    assert batch.x.shape == (2, 8, 2, 1, 1)


def test_too_small_classes_are_named() -> None:
    data = _ragged([2, 8, 1, 8, 3, 8, 8, 2, 0, 1, 8])
    with pytest.raises(ValueError, match=re.escape(
        "shots + queries = 1 + 3 = 4 examples per class, but 6 of 11 classes have fewer: "
        "'c0' (2), 'c2' (1), 'c4' (3), 'c7' (2), 'c8' (0) and 1 more"
    )):
        episode_loader(data, data.sampler(ways=2, shots=1, queries=3, episodes=1))
    # the bare sampler names them by index
    with pytest.raises(ValueError, match=re.escape("but 1 of 3 classes have fewer: class 1 (3)")):
        EpisodeSampler(3, [5, 3, 4], ways=2, shots=2, queries=2, episodes=1)
    with pytest.raises(ValueError, match=re.escape("instances = 4 examples per class, but 6 of 11")):
        sequence_loader(data, 2, 4, episodes=1)
    with pytest.warns(UserWarning, match=re.escape("but 6 of 11 classes have fewer: 'c0' (2)")) as record:
        kept = data.require(4, "shots + queries = 1 + 3", small_classes="drop")
    assert str(record[0].message).endswith("and 1 more; left them out")
    assert kept.class_names == ["c1", "c3", "c5", "c6", "c10"] and kept.class_sizes.tolist() == [8] * 5
    with pytest.raises(ValueError, match="small_classes must be one of"):
        data.require(4, "", small_classes="keep")


def _folder(root: Path, sizes: list[int]) -> Path:
    """Class ``nI`` of ``n`` one-pixel images."""
    for n in sizes:
        (root / f"{n}i").mkdir()
        for j in range(n):
            Image.new("L", (1, 1), j).save(root / f"{n}i" / f"{j:02}.png")
    return root


def test_folder_source_keeps_every_image_and_checks_each_part(tmp_path: Path) -> None:
    """10 classes of 2 to 11 images; training episodes need 1 + 4 = 5 per class, test and validation
    episodes 1 + 1 = 2: only the training part can have classes too small."""
    cfg = Config(task="folder", data_dir=str(_folder(tmp_path, list(range(2, 12)))), ways=2, shots=1,
                 queries=1, train_queries=4, task_args={"image_size": 1})
    source = build_source(cfg)
    assert source.dataset("val").num_classes == source.dataset("test").num_classes == 2
    with pytest.raises(ValueError) as error:
        source.loader("train", 1, seed=0)
    message = str(error.value)
    head = re.match(r"shots \+ queries = 1 \+ 4 = 5 examples per class, but (\d) of 6 classes "
                    r"have fewer: (.*); --set task_args='\{\"small_classes\": \"drop\"\}' leaves them out$",
                    message)
    assert head, message
    named = re.findall(r"'(\d+)i' \((\d+)\)", head.group(2))
    assert len(named) == int(head.group(1)) and all(a == b and int(a) < 5 for a, b in named)

    source = build_source(cfg.replace(task_args={"image_size": 1, "small_classes": "drop"}))
    with pytest.warns(UserWarning, match=r"shots \+ queries = 1 \+ 4 .*; left them out"):
        parts = [source.dataset(p) for p in ("train", "val", "test")]
    assert [p.num_classes for p in parts] == [6 - len(named), 2, 2]
    names = [n for p in parts for n in p.class_names] + [f"{a}i" for a, _ in named]
    assert sorted(names) == sorted(f"{n}i" for n in range(2, 12))
    for p in parts:  # each class whole: n images valued 0 .. n - 1
        for name, size, first in zip(p.class_names, p.class_sizes.tolist(), p.layout.offsets.tolist()):
            assert size == int(name[:-1])
            assert p.flat[first : first + size, 0, 0, 0].tolist() == list(range(size))
    with pytest.raises(ValueError, match=r"small_classes must be one of \('error', 'drop'\), got 'keep'"):
        build_source(cfg.replace(task_args={"small_classes": "keep"}))
