"""MANN sequence episodes: seeded, counted, shuffled labels, string labels, augmentation, the source."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metashot.config import Config
from metashot.data.fewshot import FewShotDataset
from metashot.data.sequences import (
    SequenceSampler,
    sequence_loader,
    string_labels,
)
from metashot.data.tasks import build_source

# -- sequence episodes -----------------------------------------------------------------------------


def test_sequence_episodes_are_seeded_counted_and_shuffled() -> None:
    sampler = SequenceSampler(num_classes=50, examples_per_class=20, classes=5, instances=10,
                              episodes=100, seed=3)
    a, b = sampler.episode(7), sampler.episode(7)
    assert torch.equal(a.indices, b.indices) and torch.equal(a.y, b.y)
    assert not torch.equal(a.indices, sampler.episode(8).indices)
    assert torch.bincount(a.y, minlength=5).tolist() == [10] * 5
    # the same class index -> the same episode label; distinct examples within a class
    cls = a.indices // 20
    for label in range(5):
        assert cls[a.y == label].unique().numel() == 1
        assert a.indices[a.y == label].unique().numel() == 10
    for label in range(5):
        assert a.instance[a.y == label].tolist() == list(range(1, 11))
    assert sorted(a.y.tolist()) != a.y.tolist()  # random order
    # the first label seen is not always 0: labels are shuffled per episode
    assert len({sampler.episode(i).y[0].item() for i in range(30)}) > 1


def test_string_labels_are_distinct_five_character_codes() -> None:
    assert string_labels(torch.tensor([0, 3124, 7])).tolist() == [
        [0, 0, 0, 0, 0], [4, 4, 4, 4, 4], [0, 0, 0, 1, 2]]
    sampler = SequenceSampler(50, 20, classes=15, instances=10, episodes=10, labels="string")
    ep = sampler.episode(0)
    assert ep.y.shape == (150, 5) and int(ep.y.max()) <= 4
    assert ep.y.unique(dim=0).shape[0] == 15


def test_loader_gathers_and_augments_a_batch() -> None:
    images = torch.zeros(10, 20, 1, 20, 20, dtype=torch.uint8)
    images[:, :, :, 8:12, 8:12] = 255
    data = FewShotDataset(images)
    plain = next(iter(sequence_loader(data, 3, 4, episodes=8, batch_size=4)))
    assert plain.x.shape == (4, 12, 1, 20, 20) and plain.y.shape == (4, 12)
    assert plain.x.max() == 1.0 and plain.instance.max() == 4
    aug = next(iter(sequence_loader(data, 3, 4, episodes=8, batch_size=4, max_rotation=20, max_shift=3)))
    assert torch.equal(aug.y, plain.y)  # augmentation changes images only
    assert not torch.allclose(aug.x, plain.x)
    assert (aug.x.sum((2, 3, 4)) > 8).all()  # the ink is moved, not lost
    again = next(iter(sequence_loader(data, 3, 4, episodes=8, batch_size=4, max_rotation=20, max_shift=3)))
    assert torch.equal(aug.x, again.x)  # seeded


def test_omniglot_sequence_source(omniglot_small_dir: Path) -> None:
    cfg = Config(method="mann", task="omniglot-sequences", ways=5, meta_batch=2,
                 data_dir=str(omniglot_small_dir),
                 task_args={"labels": "string", "classes": 15, "split": "official", "val_characters": 6})
    source = build_source(cfg)
    info = source.info
    assert (info.input_shape, info.ways, info.label_groups, info.label_values) == ((1, 20, 20), 15, 5, 5)
    batch = next(iter(source.loader("test", 4, seed=0)))
    assert batch.x.shape == (2, 150, 1, 20, 20) and batch.y.shape == (2, 150, 5)
    # the small set: 50 background characters (6 of them for validation) and 45 evaluation ones
    parts = [source.dataset(p).num_classes for p in ("train", "val", "test")]
    assert parts == [4 * (50 - 6), 4 * 6, 4 * 45]
    with pytest.raises(ValueError, match="task_args"):
        build_source(cfg.replace(task_args={"bogus": 1}))


def test_omniglot_sequence_source_has_the_papers_split(omniglot_dir: Path) -> None:
    source = build_source(Config(method="mann", task="omniglot-sequences", data_dir=str(omniglot_dir)))
    assert source.dataset("train").num_classes == 4 * (1200 - 172)
    assert source.dataset("test").num_classes == 4 * 423
    assert source.dataset("train").flat.shape[1:] == (1, 20, 20)
