"""The exchanges of metashot.distributed against one process's results, with a fake World: rank r of W
answered with the values the other ranks would send, so no process group is started (tests/
test_distributed.py runs the real ones under torchrun)."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from torch import nn

from metashot import distributed
from metashot.distributed import RunningStats, World
from metashot.errors import ConfigError


class FakeWorld(World):
    """Rank ``rank`` of ``size`` without torch.distributed. An exchange records what this rank sends and
    gives, in each other rank r's place, the next of ``sends[r]`` (the values rank r sends, in exchange
    order), or this rank's own value where none are prepared (a run that only records what it sends)."""

    def __init__(self, rank: int, size: int, sends: dict[int, list[Any]] | None = None) -> None:
        super().__init__(rank, size)
        self.sends = {r: list(values) for r, values in (sends or {}).items()}
        self.sent: list[Any] = []

    def exchange(self, value: Any) -> list[Any]:
        self.sent.append(value)
        return [self.sends[r].pop(0) if r in self.sends else value for r in range(self.size)]

    def all_gather(self, values: torch.Tensor) -> list[torch.Tensor]:
        return self.exchange(values.clone())


def _objects_through(world: FakeWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    """Answer ``torch.distributed.all_gather_object`` (which World calls directly) from ``world``."""

    def all_gather_object(out: list[Any], obj: Any, group: Any = None) -> None:
        out[:] = world.exchange(obj)

    monkeypatch.setattr(distributed.dist, "all_gather_object", all_gather_object)


# -- RunningStats.fold --------------------------------------------------------------------------------


@dataclass
class Batch:
    """A step's episodes: images [episodes, examples, 1, 6, 6]."""

    support: torch.Tensor
    query: torch.Tensor

    def share(self, rank: int, size: int) -> Batch:
        """Rank ``rank``'s episodes of the step: r, r + W, r + 2W, ..."""
        return Batch(self.support[rank::size], self.query[rank::size])


def _model() -> nn.Module:
    """Batch norm of both kinds: an exponential average and a cumulative one (momentum None), and one
    that keeps no statistics."""
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 4),
                          nn.BatchNorm1d(4, momentum=None), nn.BatchNorm1d(4, track_running_stats=False))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model.train()


def _batches(steps: int = 2, episodes: int = 6) -> list[Batch]:
    g = torch.Generator().manual_seed(1)
    return [Batch(torch.randn(episodes, 5, 1, 6, 6, generator=g) * (s + 1) + s,
                  torch.randn(episodes, 7, 1, 6, 6, generator=g)) for s in range(steps)]


def _forward(model: nn.Module, batch: Batch) -> None:
    """One step's batch-norm calls, as a method makes them: each episode's support, then its query."""
    with torch.no_grad():
        for support, query in zip(batch.support, batch.query):
            model(support)
            model(query)


def _train(model: nn.Module, world: World, batches: list[Batch]) -> None:
    stats = RunningStats(model, world)
    for batch in batches:
        share = batch.share(world.rank, world.size)
        _forward(model, share)
        stats.fold(share.support.shape[0])


def _running(model: nn.Module) -> list[torch.Tensor]:
    return [t for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats for t in (m.running_mean, m.running_var, m.num_batches_tracked)]


@pytest.mark.parametrize("rank", [0, 1])
def test_fold_over_two_ranks_is_the_one_process_running_average(rank: int) -> None:
    base, batches = _model(), _batches()
    one = copy.deepcopy(base)
    for batch in batches:
        _forward(one, batch)  # torch's own update, episode after episode
    other = FakeWorld(1 - rank, 2)
    _train(copy.deepcopy(base), other, batches)
    assert len(other.sent) == len(batches)  # one exchange a step
    model = copy.deepcopy(base)
    _train(model, FakeWorld(rank, 2, {1 - rank: other.sent}), batches)
    for folded, expected in zip(_running(model), _running(one), strict=True):
        torch.testing.assert_close(folded, expected)
    assert [int(t) for t in _running(model)[2::3]] == [2 * 6 * 2] * 2  # every call of both ranks counted
    alone = copy.deepcopy(base)
    for batch in batches:
        _forward(alone, batch.share(rank, 2))
    assert not torch.allclose(_running(alone)[0], _running(one)[0])  # a rank's own share is not the average


def test_a_world_of_one_records_and_folds_nothing() -> None:
    model = _model()
    stats = RunningStats(model, World())
    _forward(model, _batches(1)[0])
    before = [t.clone() for t in _running(model)]
    stats.fold(_batches(1)[0].support.shape[0])
    assert all(not calls for calls in stats.calls.values())
    assert all(torch.equal(a, b) for a, b in zip(_running(model), before, strict=True))


# -- World.gather_episodes and raise_any --------------------------------------------------------------


@pytest.mark.parametrize("size,episodes,shape", [(2, 8, ()), (2, 7, ()), (3, 7, ()), (3, 9, (2,))])
def test_gather_episodes_puts_every_ranks_episodes_back_in_order(
    size: int, episodes: int, shape: tuple[int, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    values = torch.arange(episodes * (shape[0] if shape else 1), dtype=torch.float32).view(episodes, *shape)
    for rank in range(size):
        world = FakeWorld(rank, size, {r: [values[r::size]] for r in range(size) if r != rank})
        _objects_through(world, monkeypatch)
        out = world.gather_episodes(values[rank::size])
        assert out.dtype == values.dtype and torch.equal(out, values)


def test_gather_episodes_in_a_world_of_one_is_the_values() -> None:
    values = torch.tensor([0.5, 0.25])
    assert World().gather_episodes(values) is values


def test_an_error_on_one_rank_is_raised_on_every_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    sent = (ConfigError, "bad meta-batch")
    world = FakeWorld(0, 2, {1: [sent]})
    _objects_through(world, monkeypatch)
    with pytest.raises(ConfigError, match=r"^rank 1: bad meta-batch$"):
        world.raise_any(None)
    world = FakeWorld(1, 2, {0: [None]})
    _objects_through(world, monkeypatch)
    with pytest.raises(ConfigError, match=r"^bad meta-batch$"):
        world.raise_any(ConfigError("bad meta-batch"))
    assert world.sent == [sent]
    world = FakeWorld(0, 2, {1: [None]})
    _objects_through(world, monkeypatch)
    world.raise_any(None)  # no error anywhere: nothing raised
