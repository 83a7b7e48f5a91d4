"""``data_on_device``: a task's images kept on the training device and its batches gathered there, at once,
from the indices the same CPU sampler draws; so the same episodes and examples (here against the CPU
gather of each item, on the CPU), the same training, and on CUDA batches that are already there."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch

from metashot.batches import Episode, Examples
from metashot.config import Config
from metashot.data.tasks import build_source, checked_source
from metashot.errors import ConfigError
from metashot.train import Trainer
from tests.layouts.mini import write_cache

SHAPE = dict(ways=3, shots=1, queries=1, train_ways=5, train_queries=1, meta_batch=4, batch_size=8)


def _cfg(task: str, root: Path, **kw: Any) -> Config:
    args = {"omniglot": {"split": "official", "val_characters": 6}, "folder": {},
            "miniimagenet": {"augment": "crop-jitter-flip"}}[task]
    return Config(**{"method": "protonet", "task": task, "data_dir": str(root), "task_args": args,
                     "device": "cpu", **SHAPE, **kw}).validate()


def _tensors(batch: Any) -> list[torch.Tensor]:
    if isinstance(batch, Episode):
        return [getattr(batch, name) for name in Episode.TENSORS]
    assert isinstance(batch, Examples)
    return [batch.x, batch.y, batch.index]


def _same(a: Iterable[Any], b: Iterable[Any]) -> int:
    """The number of batches, after checking that ``a`` and ``b`` hold equal ones (values and dtypes)."""
    count = 0
    for x, y in zip(a, b, strict=True):
        assert type(x) is type(y) and getattr(x, "num_ways", None) == getattr(y, "num_ways", None)
        for s, t in zip(_tensors(x), _tensors(y), strict=True):
            assert s.dtype == t.dtype and torch.equal(s, t)
        count += 1
    return count


@pytest.fixture(scope="module")
def mini(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("mini")
    write_cache(root)
    return root


@pytest.fixture
def roots(omniglot_small_dir: Path, patterns: Path, mini: Path) -> dict[str, Path]:
    return {"omniglot": omniglot_small_dir, "folder": patterns, "miniimagenet": mini}


@pytest.mark.parametrize("task", ["omniglot", "folder", "miniimagenet"])
def test_the_loader_yields_the_cpu_gathers_episodes_and_examples(task: str, roots: dict[str, Path]) -> None:
    cpu, on = (build_source(_cfg(task, roots[task], data_on_device=flag)) for flag in (False, True))
    assert on.gathered("train") is on.dataset("train")  # "moved" to the CPU: the same tensor
    for world_size in (1, 2):
        for rank in range(world_size):
            shard = dict(seed=3, rank=rank, world_size=world_size)
            for part in ("train", "test"):
                # the natural-image batches are raw until moved: scaled, augmented and normalised there
                a, b = ([x.to("cpu") for x in s.loader(part, 8, start=4, **shard)] for s in (cpu, on))
                assert _same(a, b) == 1
            a, b = ([x.to("cpu") for x in s.loader("train", 40, kind="examples", **shard)] for s in (cpu, on))
            assert _same(a, b) == 5


def test_batches_already_on_the_device_move_as_themselves(patterns: Path) -> None:
    source = build_source(_cfg("folder", patterns, data_on_device=True))
    for kind in ("episodes", "examples"):
        batch = next(iter(source.loader("train", 8, seed=0, kind=kind)))
        assert all(s is t for s, t in zip(_tensors(batch), _tensors(batch.to("cpu")), strict=True))


def test_a_short_training_run_is_the_one_gathered_on_the_cpu(patterns: Path, tmp_path: Path) -> None:
    cfg = _cfg("folder", patterns, method_args={"hidden": 8}, steps=3, val_every=3, val_episodes=2,
               test_episodes=2)
    weights = []
    for flag in (False, True):
        trainer = Trainer(cfg.replace(data_on_device=flag), tmp_path / str(flag), progress=False)
        trainer.fit()
        weights.append(trainer.method.state_dict())
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert not all(torch.equal(weights[0][k], v) for k, v in
                   Trainer(cfg, tmp_path / "fresh", progress=False).method.state_dict().items())


def test_tasks_and_options_it_cannot_serve_are_one_line(omniglot_small_dir: Path, mini: Path) -> None:
    sine = Config(method="maml", task="sinusoid", device="cpu", data_on_device=True)
    with pytest.raises(ConfigError, match=r"^--data-on-device: --task sinusoid gathers its episodes on the "
                                          r"CPU; only the image tasks' episodes and examples"):
        checked_source(sine)
    mann = Config(method="mann", task="omniglot", data_dir=str(omniglot_small_dir), ways=5, meta_batch=2,
                  task_args={"split": "official", "val_characters": 6}, device="cpu", data_on_device=True)
    with pytest.raises(ConfigError, match=r"^--data-on-device: --task omniglot gathers its sequences on"):
        checked_source(mann, kinds=("sequences", "sequences"))
    workers = _cfg("miniimagenet", mini, data_on_device=True, task_args={"workers": 2})
    with pytest.raises(ConfigError, match=r"^miniimagenet: task_args workers and pin_memory are for episodes "
                                          r"gathered on the CPU; with --data-on-device"):
        checked_source(workers)


def test_a_config_saved_before_the_field_loads_with_it_off(tmp_path: Path) -> None:
    old = Config(method="maml", task="sinusoid", device="cpu").to_dict()
    del old["data_on_device"]
    (tmp_path / "config.json").write_text(json.dumps(old))
    assert Config.load(tmp_path / "config.json").data_on_device is False


@pytest.mark.cuda
def test_on_cuda_the_images_and_batches_are_there_with_no_host_sync(omniglot_small_dir: Path) -> None:
    cpu = build_source(_cfg("omniglot", omniglot_small_dir))
    on = build_source(_cfg("omniglot", omniglot_small_dir, device="cuda", data_on_device=True))
    assert on.gathered("train").flat.is_cuda and not on.dataset("train").flat.is_cuda
    for kind in ("episodes", "examples"):
        torch.cuda.set_sync_debug_mode("error")  # a host read in the gather would raise
        try:
            batches = list(on.loader("train", 16, seed=1, kind=kind))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert all(t.is_cuda for b in batches for t in _tensors(b))
        assert all(s is t for s, t in zip(_tensors(batches[0]), _tensors(batches[0].to("cuda")), strict=True))
        moved = [b.to("cpu") for b in batches]
        torch.cuda.synchronize()  # the copies to the CPU are asynchronous (into pinned memory)
        count = _same(cpu.loader("train", 16, seed=1, kind=kind), moved)
        assert count == (4 if kind == "episodes" else 2)
