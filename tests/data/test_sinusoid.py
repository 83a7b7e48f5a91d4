"""Sinusoid regression tasks (MAML section 5.1): the paper's ranges, seeding, the source, presets."""

from __future__ import annotations

import numpy as np
import torch

from metashot import presets
from metashot.batches import TaskInfo
from metashot.data.sinusoid import AMPLITUDE, PHASE, SinusoidSampler, sinusoid_loader
from metashot.data.tasks import TASKS, build_source


def test_sinusoid_tasks_follow_the_paper_and_depend_only_on_seed_part_and_index() -> None:
    sampler = SinusoidSampler(shots=10, queries=10, episodes=2000, seed=0, part="train")
    tasks = [sampler.task(i) for i in range(2000)]
    amps = np.array([t.amplitude for t in tasks])
    phases = np.array([t.phase for t in tasks])
    assert AMPLITUDE[0] <= amps.min() and amps.max() <= AMPLITUDE[1] and abs(amps.mean() - 2.55) < 0.1
    assert PHASE[0] <= phases.min() and phases.max() <= PHASE[1] and abs(phases.mean() - np.pi / 2) < 0.1
    e = sampler.episode(7)
    assert e.support.shape == (10, 1) and e.query.shape == (10, 1) and e.support.dtype == torch.float32
    assert e.support.abs().max() <= 5
    torch.testing.assert_close(tasks[7](e.query), e.query_labels)
    batches = list(sinusoid_loader(10, 10, 100, meta_batch=25))
    assert len(batches) == 4 and batches[0].support.shape == (25, 10, 1)
    torch.testing.assert_close(batches[0].support[7], e.support)
    resumed = next(iter(sinusoid_loader(10, 10, 100, meta_batch=25, start=50)))
    torch.testing.assert_close(resumed.support, batches[2].support)
    other = [SinusoidSampler(10, 10, 10, seed=s, part=p).task(0)
             for s, p in ((0, "val"), (0, "test"), (1, "train"))]
    assert len({tasks[0], *other}) == 4


def test_sinusoid_source_and_presets() -> None:
    assert "sinusoid" in TASKS
    cfg = presets.get("maml-sinusoid")
    source = build_source(cfg)
    assert source.info == TaskInfo((1,), 1, 1, regression=True)
    train = next(iter(source.loader("train", 25, seed=0)))
    test = next(iter(source.loader("test", 25, seed=0)))
    assert train.support.shape == (25, 10, 1) and test.support.shape == (25, 5, 1)
    assert cfg.meta_batch == 25 and cfg.steps == 70_000 and cfg.method_args["inner_lr"] == 0.01
    assert presets.default_preset("maml") == "maml-omniglot-5w1s"
    assert presets.default_preset("maml", "sinusoid") == "maml-sinusoid"
    assert presets.default_preset("maml", "omniglot") == "maml-omniglot-5w1s"
    five, twenty = presets.get("maml-omniglot-5w1s"), presets.get("maml-omniglot-20w1s")
    assert five.meta_batch == 32
    assert five.method_args == {"inner_lr": 0.4, "inner_steps": 1, "test_inner_steps": 3}
    assert twenty.meta_batch == 16
    assert (twenty.method_args["inner_steps"], twenty.method_args["inner_lr"]) == (5, 0.1)
    assert five.queries == five.shots == 1 and five.test_episodes == 600 and five.schedule == "constant"


