"""The pretraining methods end to end: trained on examples, tested on episodes; a resumed run is the
uninterrupted one; a short run beats chance."""

from pathlib import Path

import pytest
import torch

from metashot.config import Config
from metashot.train import Trainer


@pytest.fixture(scope="module")
def folder(patterns: Path) -> Path:
    return patterns


def _cfg(folder: Path, **kw: object) -> Config:
    base = dict(method="baseline", task="folder", data_dir=str(folder), task_args={"image_size": 28},
                method_args={"classifier": "cosine", "hidden": 16}, ways=3, shots=1, queries=3,
                batch_size=8, steps=8, val_every=4, val_episodes=4, test_episodes=30, lr=3e-3)
    return Config(**{**base, **kw})


@pytest.mark.parametrize("method", ["baseline", "rfs", "simpleshot"])
def test_a_resumed_pretraining_run_is_the_uninterrupted_one(
    method: str, folder: Path, tmp_path: Path
) -> None:
    whole = Trainer(_cfg(folder, method=method), tmp_path / "whole", progress=False)
    whole.fit()
    Trainer(_cfg(folder, method=method, steps=4), tmp_path / "split", progress=False).fit()
    second = Trainer(_cfg(folder, method=method), tmp_path / "split", resume=True, progress=False)
    second.fit()
    a, b = whole.method.state_dict(), second.method.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert whole.test().stats == second.test().stats


def test_a_short_pretraining_run_beats_chance(folder: Path, tmp_path: Path) -> None:
    trainer = Trainer(_cfg(folder, steps=40, val_every=40), tmp_path, progress=False)
    trainer.fit()
    result = trainer.test()
    # 3-way: chance is 33%; 40 minibatches of the 12 training classes' noisy patterns must pass 60%
    assert result.mean > 0.6, result.summary()
    assert result.episodes == 30
