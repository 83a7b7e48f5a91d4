"""Sharding episodes over processes: for every sampler and task source, the ranks' episodes are disjoint
and together are the one-process stream, step by step (rank r's k-th episode of step s is the one-process
step s's episode r + k * world_size)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from metashot.config import Config
from metashot.data.sampling import EpisodeSampler, SeededSampler
from metashot.data.sequences import SequenceSampler
from metashot.data.sinusoid import SinusoidSampler
from metashot.data.tasks import TaskSource, build_source


def _tensors(item: Any) -> list[torch.Tensor]:
    """The tensor fields of an episode, an index or a batch (a dataclass)."""
    values = (getattr(item, f.name) for f in dataclasses.fields(item))
    return [v for v in values if isinstance(v, torch.Tensor)]


def _same(a: Any, b: Any) -> bool:
    ta, tb = _tensors(a), _tensors(b)
    return len(ta) == len(tb) > 0 and all(torch.equal(x, y) for x, y in zip(ta, tb))


SAMPLERS: dict[str, Callable[..., SeededSampler]] = {
    "episodes": lambda **kw: EpisodeSampler(30, 8, 5, 2, 3, **kw),
    "ragged episodes": lambda **kw: EpisodeSampler(6, [3, 7, 5, 5, 4, 9], 4, 1, 2, **kw),
    "sequences": lambda **kw: SequenceSampler(20, 10, 3, 4, labels="string", max_rotation=10, **kw),
    "sinusoid": lambda **kw: SinusoidSampler(5, 5, **kw),
}


@pytest.mark.parametrize("name", SAMPLERS)
@pytest.mark.parametrize("world_size", [2, 3])
def test_sampler_ranks_partition_the_stream(name: str, world_size: int) -> None:
    make = SAMPLERS[name]
    single = list(make(episodes=23, seed=4, start=3))
    assert len(single) == 20
    taken: list[int] = []
    for rank in range(world_size):
        sampler = make(episodes=23, seed=4, start=3, rank=rank, world_size=world_size)
        items = list(sampler)
        assert len(items) == len(sampler) == len(range(rank, 20, world_size))
        for k, item in enumerate(items):
            j = rank + k * world_size
            assert _same(item, single[j])
            taken.append(j)
    assert sorted(taken) == list(range(20))


def _check_steps(loader: Callable[[int, int], Iterable[Any]], world_size: int, meta_batch: int) -> None:
    """Step s of the ranks together is the one-process step s, row by row."""
    single = list(loader(0, 1))
    ranks = [list(loader(r, world_size)) for r in range(world_size)]
    assert all(len(steps) == len(single) for steps in ranks)
    for s, batch in enumerate(single):
        rows = len(_tensors(batch)[0])
        assert rows == meta_batch
        taken = []
        for r in range(world_size):
            part = ranks[r][s]
            assert len(_tensors(part)[0]) == meta_batch // world_size
            for k in range(meta_batch // world_size):
                j = r + k * world_size
                assert all(torch.equal(x[k], y[j]) for x, y in zip(_tensors(part), _tensors(batch)))
                taken.append(j)
        assert sorted(taken) == list(range(rows))


def _folder(root: Path) -> Path:
    for c in range(10):
        (root / f"c{c}").mkdir()
        for i in range(4 + c % 3):  # classes of 4, 5 and 6 images
            Image.new("L", (3, 3), 20 * c + i).save(root / f"c{c}" / f"{i}.png")
    return root


def _source(task: str, tmp_path: Path, omniglot_dir: Path | None, meta_batch: int) -> TaskSource:
    if task == "sinusoid":
        return build_source(Config(method="maml", task=task, shots=5, queries=5, meta_batch=meta_batch))
    if task == "folder":
        return build_source(Config(task=task, data_dir=str(_folder(tmp_path)), ways=2, shots=1, queries=2,
                                   meta_batch=meta_batch, task_args={"image_size": 3}))
    return build_source(Config(method="mann" if task == "omniglot-sequences" else "protonet", task=task,
                               data_dir=str(omniglot_dir), ways=3, shots=1, queries=2, meta_batch=meta_batch,
                               task_args={"split": "official", "val_characters": 6}))


TASKS = ["sinusoid", "folder", "omniglot", "omniglot-sequences"]


@pytest.fixture
def data_dir(request: pytest.FixtureRequest, task: str) -> Path | None:
    return request.getfixturevalue("omniglot_small_dir") if task.startswith("omniglot") else None


@pytest.mark.parametrize("task", TASKS)
def test_source_ranks_split_every_step(task: str, data_dir: Path | None, tmp_path: Path) -> None:
    source = _source(task, tmp_path, data_dir, meta_batch=4)
    for world_size in (2, 4):
        # resumed after one step, three steps to go, as the trainer asks for them
        _check_steps(lambda r, w: source.loader("train", 4 * 4, seed=1, start=4, rank=r, world_size=w),
                     world_size, 4)


@pytest.mark.parametrize("task", TASKS)
def test_meta_batch_must_split_over_the_processes(task: str, data_dir: Path | None, tmp_path: Path) -> None:
    source = _source(task, tmp_path, data_dir, meta_batch=3)
    with pytest.raises(ValueError, match=re.escape(
        "--meta-batch 3 does not split over 2 processes: pass a multiple of 2"
    )):
        source.loader("test", 6, seed=0, rank=1, world_size=2)


def test_rank_must_be_below_world_size() -> None:
    with pytest.raises(ValueError, match=re.escape("need 0 <= rank < world_size, got rank 2 of 2")):
        SinusoidSampler(5, 5, episodes=4, rank=2, world_size=2)
