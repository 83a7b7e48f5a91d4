"""Run configuration: every hyperparameter of a run, saved with it."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class Config:
    """Everything a run needs; saved as ``config.json`` in the run folder.

    ``steps`` counts optimizer steps: one episode each, or one meta-batch of ``meta_batch`` episodes;
    ``max_minutes`` stops training earlier, after that much training time (validation excluded).
    ``train_ways``/``train_shots``/``train_queries`` default to the test values. ``schedule`` of the
    learning rate: "step" (times ``lr_gamma`` every ``lr_step`` steps), "cosine" (from ``lr`` to 0 over
    ``steps``) or "constant".
    """

    method: str = "protonet"
    method_args: dict[str, Any] = field(default_factory=dict)
    task: str = "omniglot"
    task_args: dict[str, Any] = field(default_factory=dict)
    data_dir: str | None = None
    ways: int = 5
    shots: int = 1
    queries: int = 15
    train_ways: int | None = None
    train_shots: int | None = None
    train_queries: int | None = None
    meta_batch: int = 1
    steps: int = 20_000
    max_minutes: float | None = None
    lr: float = 1e-3
    schedule: str = "step"
    lr_step: int = 2_000
    lr_gamma: float = 0.5
    val_every: int = 500
    val_episodes: int = 200
    test_episodes: int = 1_000
    seed: int = 0
    device: str = "cpu"
    preset: str | None = None

    def __post_init__(self) -> None:
        self.train_ways = self.train_ways or self.ways
        self.train_shots = self.train_shots or self.shots
        self.train_queries = self.train_queries if self.train_queries is not None else self.queries

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        from metashot.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def load(cls, path: Path) -> Config:
        data = json.loads(Path(path).read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"{path}: unknown config keys {sorted(unknown)}")
        return cls(**data)
