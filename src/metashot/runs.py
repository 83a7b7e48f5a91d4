"""The run folder, and the one place that writes it.

A run folder holds ``config.json``, ``last.pt`` (everything to resume, the metrics rows included),
``best.pt`` (the weights with the best validation metric), ``metrics.csv`` (the rows, rebuilt from
``last.pt`` after every checkpoint and on resume, so a row is never lost or ahead of the checkpoint) and,
once tested, ``result.json``. Checkpoints hold tensors and plain data only and load with
``torch.load(weights_only=True)``; every file is written to a temporary name and renamed, so a kill at
any moment leaves the previous version whole, and the temporaries a kill leaves behind are removed when
the folder is opened again. A training process holds an advisory lock on the folder. Only the writer
(rank 0 of a distributed run) touches the disk; the others read.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch

from metashot.config import Config, check_device, option_name
from metashot.errors import CheckpointError, ConfigError, RunFolderError
from metashot.evaluate import Result, SeedSummary
from metashot.io import atomic_write, atomic_write_text

if TYPE_CHECKING:
    from metashot.data.tasks import TaskSource
    from metashot.methods.base import Method

CSV_FIELDS = ["step", "episodes", "minutes", "lr", "train_loss", "train_metric", "val_metric", "val_ci95"]
# What a resume may change; anything else would make the run a different experiment.
RESUMABLE = ("steps", "max_minutes", "device", "test_episodes", "data_dir")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code from it (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for a damaged or foreign file
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path}: truncated, corrupt or not a metashot checkpoint ({reason})") from e
    if not isinstance(state, dict) or "method" not in state:
        raise CheckpointError(f"{path}: not a metashot checkpoint (no 'method' weights in it)")
    return state


def resume_config(saved: Config, changes: dict[str, Any]) -> Config:
    """``saved`` with ``changes`` applied, refusing any change a resume cannot make."""
    fixed = sorted(option_name(k) for k, v in changes.items()
                   if k not in RESUMABLE and getattr(saved, k) != v)
    if fixed:
        raise ConfigError(
            f"--resume continues the run as configured; it cannot change {', '.join(fixed)} "
            f"(only {', '.join(option_name(k) for k in RESUMABLE)}); start a new --run-dir for another recipe"
        )
    return saved.replace(**changes).validate()


class RunFolder:
    """One run's folder. ``writer=False`` (the ranks but 0) reads and never writes."""

    def __init__(self, path: str | Path, writer: bool = True) -> None:
        self.path = Path(path)
        self.writer = writer
        self._lock: IO[str] | None = None

    @property
    def config_path(self) -> Path:
        return self.path / "config.json"

    @property
    def last(self) -> Path:
        return self.path / "last.pt"

    @property
    def best(self) -> Path:
        return self.path / "best.pt"

    def exists(self) -> bool:
        return self.config_path.exists()

    def load_config(self) -> Config:
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path}: no such run folder")
        return Config.load(self.config_path)

    def open(self, cfg: Config, resume: bool) -> bool:
        """Take the folder for training: lock it, clear leftover temporaries, save ``cfg`` when new.

        Returns whether there is a checkpoint to resume from. The other ranks only look.
        """
        if not self.writer:
            return resume and self.last.exists()
        if self.path.exists() and not self.path.is_dir():
            raise RunFolderError(f"{self.path}: is a file, not a run folder; choose another --run-dir")
        if resume and not self.exists():
            raise RunFolderError(f"--resume: no run in {self.path} (no config.json); drop --resume to start")
        if not resume and (self.exists() or self.last.exists()):
            raise RunFolderError(
                f"{self.path} already holds a run; pass --resume to continue it or choose another --run-dir"
            )
        if self.writer:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
                self._take_lock()
                for tmp in self.path.glob(".*.tmp"):
                    tmp.unlink()
                if not resume:
                    cfg.save(self.config_path)
                    self.write_rows([])
            except OSError as e:
                self.close()
                reason = e.strerror or e
                raise RunFolderError(f"{self.path}: cannot write the run folder ({reason})") from None
        return self.last.exists()

    def _take_lock(self) -> None:
        lock = open(self.path / ".lock", "a+")  # noqa: SIM115 (held open for the run's lifetime)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            holder = lock.read().strip() or "another process"
            lock.close()
            raise RunFolderError(
                f"{self.path} is in use by {holder}; wait for it to end or choose another --run-dir"
            ) from None
        lock.truncate(0)
        lock.write(f"metashot pid {os.getpid()}\n")
        lock.flush()
        self._lock = lock

    def close(self) -> None:
        if self._lock is not None:
            self._lock.close()  # releases the lock
            self._lock = None

    def load_last(self, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """``last.pt``, with ``metrics.csv`` rebuilt from its rows (a kill may have left it behind)."""
        state = load_checkpoint(self.last, map_location)
        self.write_rows(state["rows"])
        return state

    def save(self, state: dict[str, Any], best: dict[str, Any] | None = None) -> None:
        """One consistent state: ``best.pt`` if it improved, then ``last.pt``, then the CSV of its rows."""
        if not self.writer:
            return
        if best is not None:
            save_checkpoint(self.best, best)
        save_checkpoint(self.last, state)
        self.write_rows(state["rows"])

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        if not self.writer:
            return
        text = io.StringIO()
        writer = csv.DictWriter(text, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.path / "metrics.csv", text.getvalue())

    def weights(self, checkpoint: str = "best.pt", map_location: str | torch.device = "cpu") -> dict:
        """The method's weights from ``checkpoint``, falling back to ``last.pt`` when there is none yet."""
        path = self.path / checkpoint
        if not path.exists() and checkpoint == "best.pt" and self.last.exists():
            path = self.last
        return load_checkpoint(path, map_location)["method"]

    def method(self, cfg: Config, checkpoint: str = "best.pt") -> tuple[TaskSource, Method]:
        """The task source of ``cfg`` (checked against the data) and the method on ``cfg.device`` with the
        weights of ``checkpoint`` (else ``last.pt``)."""
        from metashot.data.tasks import checked_source
        from metashot.methods import build_method

        check_device(cfg.device)
        source = checked_source(cfg)
        method = build_method(cfg, source.info).to(cfg.device)
        method.load_state_dict(self.weights(checkpoint, cfg.device))
        return source, method

    def write_result(self, result: Result, name: str = "result.json") -> None:
        if self.writer:
            atomic_write_text(self.path / name, result.to_json() + "\n")


def evaluate_run(
    run_dir: str | Path,
    episodes: int | None = None,
    checkpoint: str = "best.pt",
    device: str | None = None,
    progress: bool = False,
    ways: int | None = None,
    shots: int | None = None,
) -> Result:
    """Evaluate a finished or interrupted run from its folder (``best.pt``, else ``last.pt``).

    Writes ``result.json``, or ``result-{ways}w{shots}s.json`` for another episode shape.
    """
    from metashot.evaluate import evaluate

    folder = RunFolder(run_dir)
    cfg = folder.load_config()
    changes = {k: v for k, v in (("ways", ways), ("shots", shots)) if v is not None and v != getattr(cfg, k)}
    cfg = cfg.replace(**changes, **({"device": device} if device else {}))
    if episodes is not None:
        cfg = cfg.replace(test_episodes=episodes)
    source, method = folder.method(cfg.validate(), checkpoint)
    result = evaluate(method, source.loader("test", cfg.test_episodes, seed=cfg.seed), cfg.device, progress)
    folder.write_result(result, f"result-{cfg.ways}w{cfg.shots}s.json" if changes else "result.json")
    return result


# What runs of one recipe over several seeds may differ in besides the seed.
SEED_FREE = ("seed", "device", "data_dir")


def summarize_runs(run_dirs: list[str | Path]) -> SeedSummary:
    """The tested runs ``run_dirs`` of one recipe over seeds, summarised; an error names any field
    besides the seed (and device and data folder) in which two runs differ, or a run not yet tested."""
    configs, results = [], []
    for run_dir in run_dirs:
        folder = RunFolder(run_dir)
        cfg = folder.load_config()
        configs.append(cfg.replace(split_seed=cfg.class_split_seed).to_dict())
        path = folder.path / "result.json"
        try:
            results.append(Result.from_dict(json.loads(path.read_text())))
        except FileNotFoundError:
            raise RunFolderError(
                f"{run_dir}: no result.json; finish the run or `metashot evaluate {run_dir}`"
            ) from None
        except (ValueError, KeyError, TypeError) as e:
            raise RunFolderError(f"{path}: not a metashot result ({e})") from None
    first = configs[0]
    for run_dir, cfg in zip(run_dirs[1:], configs[1:]):
        differ = [k for k in cfg if k not in SEED_FREE and cfg[k] != first[k]]
        if differ:
            what = ", ".join(f"{k} ({json.dumps(first[k])} vs {json.dumps(cfg[k])})" for k in differ)
            raise ConfigError(f"{run_dirs[0]} and {run_dir} differ in more than the seed: {what}")
    seeds = [cfg["seed"] for cfg in configs]
    if len(set(seeds)) < len(seeds):
        raise ConfigError(f"two runs have the same seed ({seeds}); summarize runs of different seeds")
    return SeedSummary([str(d) for d in run_dirs], seeds, results)
