"""How far a run's training is: the counters ``last.pt`` holds besides the weights, optimizer, schedule
and RNG. Each rank sums its own training loss and metric between two metrics rows; ``last.pt`` keeps
every rank's sums, so a resumed row is the uninterrupted run's."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from metashot.distributed import World

SAVED = ("step", "elapsed", "since", "best", "rows")


@dataclass
class Progress:
    own_sums: torch.Tensor  # this rank's training loss and metric summed over the steps since the last row
    sums: torch.Tensor  # every rank's [ranks, 2] as last gathered: what last.pt holds
    step: int = 0
    elapsed: float = 0.0  # seconds of training, validation excluded
    since: int = 0  # steps since the last row
    best: float | None = None  # the best validation metric so far
    rows: list[dict[str, Any]] = field(default_factory=list)  # the metrics rows, of numbers

    @classmethod
    def start(cls, world: World, device: torch.device) -> Progress:
        return cls(torch.zeros(2, device=device), torch.zeros(world.size, 2))

    @classmethod
    def load(cls, state: dict[str, Any], world: World, device: torch.device) -> Progress:
        """The progress in ``state`` with this rank's own sums; where the saved ranks were another number
        (or a checkpoint kept rank 0's alone), every rank takes their mean."""
        every = state["sums"].reshape(-1, 2).cpu()
        own = every[world.rank] if len(every) == world.size else every.mean(0)
        return cls(own.to(device, copy=True), every, **{k: state[k] for k in SAVED})

    def state(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in ("sums", *SAVED)}

    def add(self, loss: torch.Tensor, metric: torch.Tensor) -> None:
        """One more step, with this rank's training loss and metric (no host sync)."""
        self.step += 1
        self.since += 1
        self.own_sums += torch.stack([loss.detach().float(), metric.detach().float()])  # bf16 under autocast

    def averages(self, world: World) -> list[float]:
        """The training loss and metric averaged over the steps since the last row and over the ranks."""
        return world.mean(self.own_sums / max(self.since, 1)).tolist()

    def gather(self, world: World) -> None:
        """Every rank's sums into ``sums``; every rank calls it at the same step."""
        self.sums = torch.stack(world.all_gather(self.own_sums)).cpu()

    def add_row(self, row: dict[str, Any]) -> None:
        """A metrics row; the sums start again."""
        self.rows = [*self.rows, row]
        self.own_sums.zero_()
        self.sums.zero_()
        self.since = 0

    def improves(self, value: float, maximize: bool) -> bool:
        """Whether ``value`` is the best validation metric so far; if so, it becomes ``best``."""
        if self.best is None or (value > self.best if maximize else value < self.best):
            self.best = value
            return True
        return False
