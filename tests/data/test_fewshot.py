"""Episode sampling: shapes, label layout, disjointness, determinism and errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metashot.data.fewshot import Episode, FewShotDataset, episode_loader
from metashot.data.omniglot import Omniglot
from metashot.data.sampling import EpisodeSampler


def _dataset(classes: int = 10, examples: int = 8) -> FewShotDataset:
    # every image holds its class and example number, so indexing can be checked exactly
    c = torch.arange(classes).view(-1, 1, 1, 1, 1).expand(classes, examples, 1, 2, 2)
    e = torch.arange(examples).view(1, -1, 1, 1, 1).expand(classes, examples, 1, 2, 2)
    return FewShotDataset(torch.stack([c, e], dim=2).squeeze(3).float())


def test_episode_shapes_and_labels() -> None:
    data = _dataset()
    loader = episode_loader(data, data.sampler(ways=5, shots=2, queries=3, episodes=6), meta_batch=3)
    batches = list(loader)
    assert len(batches) == 2
    ep = batches[0]
    assert ep.support.shape == (3, 10, 2, 2, 2) and ep.query.shape == (3, 15, 2, 2, 2)
    assert ep.support_labels[0].tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    assert ep.query_labels[0].tolist() == [n for n in range(5) for _ in range(3)]
    # the sampler's episodes carry N, so asking for it never reads the labels (a device sync)
    assert ep.num_ways == 5 and ep.ways == 5 and ep.to("cpu").num_ways == 5
    assert Episode(ep.support, ep.support_labels, ep.query, ep.query_labels).ways == 5  # counted
    for b in range(3):
        classes_s = ep.support[b, :, 0, 0, 0].view(5, 2)
        classes_q = ep.query[b, :, 0, 0, 0].view(5, 3)
        # one true class per episode label, five distinct classes
        assert (classes_s == classes_s[:, :1]).all() and (classes_q == classes_s[:, :1]).all()
        assert len(set(classes_s[:, 0].tolist())) == 5
        # support and query examples of a class are disjoint, no example repeats
        ex = torch.cat([ep.support[b, :, 1, 0, 0].view(5, 2), ep.query[b, :, 1, 0, 0].view(5, 3)], 1)
        assert all(len(set(row.tolist())) == 5 for row in ex)


def test_same_seed_same_episodes_different_seed_different() -> None:
    a = EpisodeSampler(100, 20, 5, 1, 15, episodes=10, seed=7)
    b = EpisodeSampler(100, 20, 5, 1, 15, episodes=10, seed=7)
    c = EpisodeSampler(100, 20, 5, 1, 15, episodes=10, seed=8)
    ia, ib, ic = ([e.indices for e in s] for s in (a, b, c))
    assert all(torch.equal(x, y) for x, y in zip(ia, ib))
    assert not all(torch.equal(x, y) for x, y in zip(ia, ic))


def test_start_and_sharding_partition_the_episodes() -> None:
    full = [e.indices for e in EpisodeSampler(50, 20, 5, 1, 5, episodes=9, seed=1)]
    resumed = [e.indices for e in EpisodeSampler(50, 20, 5, 1, 5, episodes=9, seed=1, start=4)]
    assert all(torch.equal(x, y) for x, y in zip(full[4:], resumed, strict=True))
    shards = [list(EpisodeSampler(50, 20, 5, 1, 5, episodes=9, seed=1, rank=r, world_size=2))
              for r in range(2)]
    assert len(shards[0]) == 5 and len(shards[1]) == 4
    assert torch.equal(shards[1][0].indices, full[1])


def test_same_episodes_in_another_process() -> None:
    code = (
        "from metashot.data.sampling import EpisodeSampler\n"
        "s = EpisodeSampler(4800, 20, 20, 5, 5, episodes=5, seed=11)\n"
        "print([e.indices.sum().item() for e in s], [e.indices[0, :3].tolist() for e in s])"
    )
    here = EpisodeSampler(4800, 20, 20, 5, 5, episodes=5, seed=11)
    expected = f"{[e.indices.sum().item() for e in here]} {[e.indices[0, :3].tolist() for e in here]}"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).parent)
    assert out.stdout.strip() == expected


def test_more_ways_than_classes() -> None:
    with pytest.raises(ValueError, match="30-way episodes need 30 classes, but the dataset has 10"):
        _dataset().sampler(ways=30, shots=1, queries=1, episodes=1)


def test_more_shots_and_queries_than_examples() -> None:
    with pytest.raises(ValueError, match=r"shots \+ queries = 5 \+ 15 = 20 .* each class has 8"):
        _dataset().sampler(ways=5, shots=5, queries=15, episodes=1)


def test_bad_image_tensor_shape() -> None:
    with pytest.raises(ValueError, match=r"images must be \[classes, examples, channels, height, width\]"):
        FewShotDataset(torch.zeros(3, 4, 5, 5))


def test_omniglot_episode_is_an_index(omniglot_small: Omniglot) -> None:
    data = omniglot_small.classes("random", "train", val_characters=5)
    ep = next(iter(episode_loader(data, data.sampler(ways=60, shots=5, queries=5, episodes=1))))
    assert ep.support.shape == (1, 300, 1, 28, 28) and ep.support.dtype == torch.float32
    assert 0.0 <= float(ep.support.min()) and float(ep.support.max()) <= 1.0


def test_folder_dataset(tmp_path: Path) -> None:
    from PIL import Image

    for c in range(3):
        (tmp_path / f"class{c}").mkdir()
        for i in range(4 + c):
            Image.new("L", (10, 10), color=40 * c + i).save(tmp_path / f"class{c}" / f"{i}.png")
    data = FewShotDataset.from_folder(tmp_path, image_size=6)
    # every image kept: classes of 4, 5 and 6 images, one after another
    assert data.flat.shape == (15, 1, 6, 6) and data.class_names == ["class0", "class1", "class2"]
    assert data.class_sizes.tolist() == [4, 5, 6]
    assert data.flat[:, 0, 0, 0].tolist() == [0, 1, 2, 3, 40, 41, 42, 43, 44, 80, 81, 82, 83, 84, 85]
    (tmp_path / "class0" / "broken.png").write_bytes(b"nope")
    with pytest.raises(ValueError, match=r"broken.png: image does not decode"):
        FewShotDataset.from_folder(tmp_path)
