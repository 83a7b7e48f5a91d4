"""Batches of labelled examples: every training image once per epoch in a seeded order, sharded and resumed
as the one-process stream, labelled with the image's class; natural images augmented and normalised as
episodes are; only the train part serves them. And Omniglot's own sequence episodes."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from PIL import Image

from metashot.batches import Episode, Examples
from metashot.config import Config
from metashot.data.examples import ExampleSampler, ExampleSet, example_loader
from metashot.data.fewshot import FewShotDataset
from metashot.data.miniimagenet import MiniImageNetSource
from metashot.data.rawbatches import RawEpisodes
from metashot.data.tasks import build_source, checked_source
from metashot.distributed import World
from metashot.errors import ConfigError
from tests.layouts.mini import write_cache


def _ragged(sizes: list[int]) -> FewShotDataset:
    """Classes of ``sizes`` images of 2 x 2 pixels, image j all of value j."""
    n = sum(sizes)
    return FewShotDataset(torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).clone(),
                          class_sizes=sizes)


def _stream(loader: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stream positions, images (as their pixel value j) and labels of a loader's batches, concatenated."""
    batches = list(loader)
    assert all(isinstance(b, Examples) for b in batches)
    images = torch.cat([b.x[:, 0, 0, 0] for b in batches]).mul(255).round().long()
    return torch.cat([b.index for b in batches]), images, torch.cat([b.y for b in batches])


def test_every_example_appears_once_per_epoch_across_batches_that_straddle_epochs() -> None:
    data = _ragged([3, 5, 2])  # 10 examples; batches of 4 straddle the epochs' ends
    sampler = ExampleSampler(len(data), 35, seed=1)
    index, images, _ = _stream(example_loader(ExampleSet(data), sampler, batch_size=4))
    assert index.tolist() == list(range(35))
    epochs = [images[e * 10:(e + 1) * 10] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch.tolist()) == list(range(10))
    assert not torch.equal(epochs[0], epochs[1])  # a new order each epoch
    assert images[30:].unique().numel() == 5  # the part epoch has no repeat either


def test_the_order_is_the_seeds() -> None:
    def order(seed: int) -> list[tuple[int, int]]:
        return list(ExampleSampler(20, 40, seed=seed))

    assert order(3) == order(3)
    assert [j for _, j in order(3)] != [j for _, j in order(4)]


def test_a_resumed_stream_is_the_uninterrupted_one() -> None:
    whole = list(ExampleSampler(10, 40, seed=2))
    assert list(ExampleSampler(10, 40, seed=2, start=13)) == whole[13:]  # mid-epoch, a fresh sampler


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_split_every_step_into_disjoint_shares_of_the_one_process_step(world_size: int) -> None:
    data = _ragged([4, 3])

    def steps(rank: int, world: int) -> list[Examples]:
        sampler = ExampleSampler(len(data), 36, seed=5, start=6, rank=rank, world_size=world)
        return list(example_loader(ExampleSet(data), sampler, batch_size=6, world_size=world))

    single, ranks = steps(0, 1), [steps(r, world_size) for r in range(world_size)]
    assert len(single) == 5 and all(len(r) == 5 for r in ranks)
    for s, batch in enumerate(single):
        # rank r's k-th example of step s is the one-process step s's example r + k * world_size
        rows = [(ranks[j % world_size][s], j // world_size) for j in range(6)]
        for name in ("x", "y", "index"):
            joined = torch.stack([getattr(part, name)[k] for part, k in rows])
            assert torch.equal(joined, getattr(batch, name))
    taken = torch.cat([b.index for r in ranks for b in r])
    assert sorted(taken.tolist()) == list(range(6, 36))


def test_examples_are_labelled_with_their_images_class() -> None:
    data = _ragged([3, 5, 2])
    _, images, labels = _stream(example_loader(ExampleSet(data), ExampleSampler(10, 20, seed=0), 5))
    classes = [0, 0, 0, 1, 1, 1, 1, 1, 2, 2]  # of images 0..9
    assert labels.tolist() == [classes[j] for j in images.tolist()]


def _folder(root: Path) -> Path:
    """10 class folders c0..c9 of 4 to 6 images, image i of class c all of value 20 c + i."""
    for c in range(10):
        (root / f"c{c}").mkdir()
        for i in range(4 + c % 3):
            Image.new("L", (3, 3), 20 * c + i).save(root / f"c{c}" / f"{i}.png")
    return root


def _folder_cfg(root: Path, **changes: object) -> Config:
    return Config(task="folder", data_dir=str(root), ways=2, shots=1, queries=2, batch_size=8,
                  task_args={"image_size": 3}, **changes)


def test_a_sources_examples_are_its_train_images_with_their_class(tmp_path: Path) -> None:
    source = build_source(_folder_cfg(_folder(tmp_path)))
    train = source.dataset("train")
    assert source.kinds == ("episodes", "examples")
    assert source.task_info("examples").train_classes == train.num_classes == 6
    batches = list(source.loader("train", 2 * len(train), seed=0, kind="examples"))
    assert all(isinstance(b, Examples) and len(b) == 8 for b in batches[:-1])
    x, y = torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches])
    value = x[:, 0, 0, 0].mul(255).round().long()
    # the folder each label names holds the image (value // 20 is its folder's number)
    folders = [int(train.class_names[c][1:]) for c in y.tolist()]
    assert (value // 20).tolist() == folders
    assert sorted(value[:len(train)].tolist()) == sorted(train.flat[:, 0, 0, 0].tolist())  # each once


def test_examples_of_val_or_a_source_without_them_are_refused(tmp_path: Path) -> None:
    cfg = _folder_cfg(_folder(tmp_path))
    source = build_source(cfg)
    with pytest.raises(ValueError, match="--task folder serves batches of examples of its train part only, "
                                         "not of val, which it serves as episodes"):
        source.loader("val", 8, seed=0, kind="examples")
    checked_source(cfg, kinds=("examples", "episodes"))
    with pytest.raises(ConfigError, match=r"^folder, val classes: --task folder serves batches of examples"):
        checked_source(cfg, kinds=("examples", "examples"))
    with pytest.raises(ConfigError, match=re.escape("--task sinusoid serves episodes, not examples; pick a "
                                                    "task that serves what the method trains on")):
        checked_source(Config(method="maml", task="sinusoid"), kinds=("examples", "episodes"))
    with pytest.raises(ValueError, match=re.escape("--batch-size 8 does not split over 3 processes")):
        source.loader("train", 16, seed=0, rank=1, world_size=3, kind="examples")
    with pytest.raises(ConfigError, match=re.escape("--batch-size 8 does not split evenly over 3 processes")):
        World(0, 3).check_shares(8, 3, 3, kind="examples")


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mini")
    write_cache(root)
    return root


def _mini(root: Path, **task_args: object) -> MiniImageNetSource:
    cfg = Config(task="miniimagenet", data_dir=str(root), batch_size=4,
                 task_args={"augment": "crop-jitter-flip", **task_args})
    return build_source(cfg.validate())


def test_natural_image_examples_are_augmented_and_normalised_as_episodes_are(mini: Path) -> None:
    source = _mini(mini)
    flat = source.dataset("train").flat  # uint8 [N, 3, 84, 84]
    sampler = ExampleSampler(len(flat), 8, seed=3)
    batches = [b.to("cpu") for b in source.loader("train", 8, seed=3, kind="examples")]
    assert len(batches) == 2 and batches[0].x.shape == (4, 3, 84, 84) and batches[0].x.dtype == torch.float32
    for batch in batches:
        for i, x in zip(batch.index.tolist(), batch.x, strict=True):
            image = flat[sampler.episode(i)[1]]
            # the episodes' path, for a one-image episode with the example's stream position
            one = image[None, None]  # [B = 1, S = 1, C, H, W], no queries
            episode = Episode(one, torch.zeros(1, 1), one[:, :0], torch.zeros(1, 0))
            expected = RawEpisodes(episode, torch.tensor([i]), source.augment, 3, True).to("cpu")
            assert torch.equal(x, expected.support[0, 0])
    plain = [b.to("cpu") for b in _mini(mini, augment="none").loader("train", 8, seed=3, kind="examples")]
    assert not torch.equal(plain[0].x, batches[0].x)  # augmented
    mean, std = (torch.tensor(v)[:, None, None] for v in (MiniImageNetSource.mean, MiniImageNetSource.std))
    index = torch.tensor([sampler.episode(i)[1] for i in plain[0].index.tolist()])
    assert torch.allclose(plain[0].x, (flat[index].float() / 255 - mean) / std, atol=1e-6)
    # loader workers finish the batches on the CPU: the same pixels
    workers = list(_mini(mini, workers=2).loader("train", 8, seed=3, kind="examples"))
    assert all(isinstance(b, Examples) and torch.equal(b.x, a.x)
               for a, b in zip(batches, workers, strict=True))


# -- Omniglot's own sequence episodes --------------------------------------------------------------


def test_omniglot_serves_the_sequences_of_omniglot_sequences(omniglot_small_dir: Path) -> None:
    args = {"split": "official", "val_characters": 6, "classes": 3, "instances": 4, "labels": "string",
            "max_shift": 3.0}
    old = build_source(Config(method="mann", task="omniglot-sequences", ways=5, meta_batch=2,
                              data_dir=str(omniglot_small_dir), task_args=args))
    new = build_source(Config(method="mann", task="omniglot", ways=5, meta_batch=2,
                              data_dir=str(omniglot_small_dir), task_args={**args, "image_size": 20}))
    assert new.kinds == ("episodes", "examples", "sequences") and old.kinds == ("sequences",)
    assert new.task_info("sequences") == old.task_info() == old.info
    assert new.task_info("sequences").input_shape == (1, 20, 20)
    for part in ("train", "test"):
        a = list(old.loader(part, 4, seed=1, start=2))
        b = list(new.loader(part, 4, seed=1, start=2, kind="sequences"))
        assert len(a) == len(b) == 1 and a[0].x.shape == (2, 12, 1, 20, 20)
        assert all(torch.equal(getattr(a[0], f), getattr(b[0], f)) for f in ("x", "y", "instance"))
    assert isinstance(next(iter(new.loader("test", 2, seed=1))), Episode)  # the default kind
    checked_source(new.cfg, kinds=("sequences", "sequences"))
