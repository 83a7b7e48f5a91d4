"""The run folder, and the one place that writes it.

A run folder holds ``config.json``, ``last.pt`` (everything to resume, the metrics rows included),
``best.pt`` (the weights with the best validation metric), ``metrics.csv`` (the rows, rebuilt from
``last.pt`` after every checkpoint and on resume, so a row is never lost or ahead of the checkpoint) and,
once tested, ``result.json``. Checkpoints hold tensors and plain data only and load with
``torch.load(weights_only=True)`` (:mod:`metashot.checkpoints`, whose functions this module exports too);
every file is written to a temporary name and renamed (a
checkpoint's files all written before any is renamed), so a kill or a full disk at any moment leaves the
previous version whole, and the temporaries a kill leaves behind are removed when the folder is opened
again. A training process holds an advisory lock on the folder. Only the writer (rank 0 of a distributed
run) touches the disk; the others read. A ``config.json`` never chooses code to run: a backbone factory
it names is imported only when the caller names the same one or trusts the folder.
"""

from __future__ import annotations

import csv
import fcntl
import io
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import torch
from torch import nn

from metashot.checkpoints import load_checkpoint, load_weights, mismatch, serialized
from metashot.checkpoints import save_checkpoint as save_checkpoint
from metashot.config import Config, option_name
from metashot.devices import check_device, numerics
from metashot.errors import CheckpointError, ConfigError, RunFolderError
from metashot.evaluate import Result, SeedSummary
from metashot.io import atomic_write, atomic_write_all, atomic_write_text
from metashot.nn.backbones import is_factory_path

if TYPE_CHECKING:
    from metashot.data.tasks import TaskSource
    from metashot.methods.base import Method

CSV_FIELDS = ["step", "episodes", "minutes", "lr", "train_loss", "train_metric", "val_metric", "val_ci95"]
# How metrics.csv writes a row's numbers (the rest: .5f); rows of older checkpoints hold these strings.
CSV_FORMATS = {"step": "d", "episodes": "d", "minutes": ".3f", "lr": ".3g", "max_memory_mb": ".1f"}
OPTIONAL_FIELDS = ["max_memory_mb"]  # a row's peak GPU memory in MiB, on CUDA only (metashot.train)
# What a resume may change; anything else would make the run a different experiment.
RESUMABLE = ("steps", "max_minutes", "device", "test_episodes", "data_dir", "data_on_device")
STAGES_FILE = "stages.json"  # the recipe of a staged run's folder (metashot.stages)


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

    def unstarted(self) -> bool:
        """A folder that a kill left before its ``config.json`` was saved: empty, or only the lock and
        temporaries."""
        return self.path.is_dir() and all(p.name == ".lock" or (p.name.startswith(".") and p.suffix == ".tmp")
                                          for p in self.path.iterdir())

    def load_config(self, trust_code: bool = False, backbone: str | None = None) -> Config:
        """The run's ``config.json``. A config read from disk never chooses code to run: one that names a
        backbone factory (``package.module:factory``) is refused, before anything is imported, unless the
        caller names the same factory (``backbone``: the command line's ``--backbone``) or ``trust_code``."""
        if self.path.is_file():
            raise RunFolderError(f"{self.path}: is a file, not a run folder")
        if not self.path.is_dir():
            raise RunFolderError(f"{self.path}: no such run folder")
        cfg = Config.load(self.config_path)
        if is_factory_path(cfg.backbone) and not trust_code and backbone != cfg.backbone:
            raise RunFolderError(
                f"{self.config_path} names the backbone factory {cfg.backbone}, code that a config read from "
                f"disk may not run; if you trust this run folder, pass --backbone {cfg.backbone} (or "
                "--trust-code)"
            )
        return cfg

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
        if not resume and (self.exists() or self.last.exists() or (self.path / STAGES_FILE).exists()):
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
        rows = state.get("rows")
        fields = {*CSV_FIELDS, *OPTIONAL_FIELDS}
        if not (isinstance(rows, list) and all(isinstance(r, dict) and set(CSV_FIELDS) <= set(r) <= fields
                                               and isinstance(r["step"], int) for r in rows)):
            raise CheckpointError(f"{self.last}: its 'rows' are not metrics rows (a list of dicts of "
                                  f"{', '.join(CSV_FIELDS)}); the checkpoint is damaged or not metashot's")
        self.write_rows(rows)
        return state

    @contextmanager
    def _writing(self, what: str) -> Iterator[None]:
        """An OSError while writing ``what`` (a full disk, a read-only folder) as one RunFolderError."""
        try:
            yield
        except OSError as e:
            kept = "nothing was half-written"
            if what == "the checkpoint":
                kept += (f"; the last checkpoint, {self.last}, is intact and --resume continues from it"
                         if self.last.exists() else "; no checkpoint was saved before")
            raise RunFolderError(f"{self.path}: cannot write {what} ({e.strerror or e}); {kept}") from e

    def save(self, state: dict[str, Any], best: dict[str, Any] | None = None) -> None:
        """One consistent state: ``best.pt`` if it improved, ``last.pt`` and the CSV of its rows, each
        written in full before any is renamed into place."""
        if not self.writer:
            return
        files = {self.best: serialized(best)} if best is not None else {}
        files |= {self.last: serialized(state), self.path / "metrics.csv": _csv(state["rows"])}
        with self._writing("the checkpoint"):
            atomic_write_all(files)

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        if self.writer:
            with self._writing("metrics.csv"):
                atomic_write(self.path / "metrics.csv", _csv(rows))

    def checkpoint_path(self, name: str = "best.pt") -> Path:
        """The checkpoint ``name`` in the folder (``best.pt`` falls back to ``last.pt`` while there is
        none yet); a path out of the folder (absolute, with ``..``, a link out) is refused."""
        path = self.path / name
        if (Path(name).is_absolute() or ".." in Path(name).parts
                or not path.resolve().is_relative_to(self.path.resolve())):
            raise RunFolderError(f"--checkpoint {name}: not in the run folder {self.path}; give the name of "
                                 "a checkpoint in it, such as best.pt or last.pt")
        return self.last if not path.exists() and name == "best.pt" and self.last.exists() else path

    def best_weights(self, method: nn.Module) -> dict[str, torch.Tensor] | None:
        """``best.pt``'s weights for ``method``, or None (with a warning) when it is lost, damaged or
        does not fit: resuming needs only ``last.pt``."""
        try:
            weights = load_checkpoint(self.best)["method"]
            if (problem := mismatch(method, weights)) is not None:
                raise CheckpointError(f"{self.best}: its weights do not fit the network ({problem})")
        except CheckpointError as e:
            if self.writer:
                print(f"metashot: warning: {e}; the test takes the last weights unless a validation beats "
                      "the best so far", file=sys.stderr)
            return None
        return weights

    def method(self, cfg: Config, checkpoint: str = "best.pt") -> tuple[TaskSource, Method]:
        """The task source of ``cfg`` (checked against the data) and the method on ``cfg.device`` with the
        weights of ``checkpoint`` (else ``last.pt``)."""
        from metashot.data.tasks import checked_source
        from metashot.methods import build_method, method_class

        device = check_device(cfg.device)  # auto resolved
        cls = method_class(cfg)
        source = checked_source(cfg, (cls.train_batches, cls.test_batches))
        method = build_method(cfg, source.task_info(cls.train_batches)).to(device)
        path = self.checkpoint_path(checkpoint)
        load_weights(method, load_checkpoint(path, device)["method"], path, self.config_path)
        return source, method

    def write_result(self, result: Result, name: str = "result.json") -> None:
        if self.writer:
            with self._writing(name):
                atomic_write_text(self.path / name, result.to_json() + "\n")


def _csv(rows: list[dict[str, Any]]) -> Callable[[IO[bytes]], None]:
    text = io.StringIO()
    writer = csv.DictWriter(text, CSV_FIELDS + [f for f in OPTIONAL_FIELDS if any(f in r for r in rows)],
                            restval="")
    writer.writeheader()
    writer.writerows({k: v if isinstance(v, str) else format(v, CSV_FORMATS.get(k, ".5f"))
                      for k, v in r.items()} for r in rows)
    return lambda f: f.write(text.getvalue().encode())


def evaluate_run(
    run_dir: str | Path,
    episodes: int | None = None,
    checkpoint: str = "best.pt",
    device: str | None = None,
    progress: bool = False,
    ways: int | None = None,
    shots: int | None = None,
    trust_code: bool = False,
    backbone: str | None = None,
    head: str | None = None,
    head_args: dict[str, Any] | None = None,
) -> Result:
    """Evaluate a finished or interrupted run from its folder (``best.pt``, else ``last.pt``; a staged
    run's last stage).

    Writes ``result.json``, or ``result-{ways}w{shots}s.json`` for another episode shape. With ``head``
    (a name in :data:`metashot.methods.HEADS`, built with ``head_args``) the run's encoder is tested with
    that head in place of its own, into ``result-head-{head}.json`` (``result-head-{head}-{ways}w{shots}s
    .json``). A backbone factory the run's config names is built only with ``trust_code`` or when
    ``backbone`` names it.
    """
    from metashot.evaluate import evaluate
    from metashot.stages import stage_folder

    if head_args and head is None:
        raise ConfigError("--head-args are the arguments of a --head; give --head NAME too")
    folder = RunFolder(stage_folder(run_dir))
    cfg = folder.load_config(trust_code, backbone)
    if backbone is not None and backbone != cfg.backbone:
        trained = f"backbone {cfg.backbone}" if cfg.backbone else "the method's own backbone"
        raise ConfigError(f"{run_dir} was trained with {trained}; --backbone {backbone} cannot change it "
                          "(it only allows the run's own factory)")
    changes = {k: v for k, v in (("ways", ways), ("shots", shots)) if v is not None and v != getattr(cfg, k)}
    cfg = cfg.replace(**changes, **({"device": device} if device else {}))
    if episodes is not None:
        cfg = cfg.replace(test_episodes=episodes)
    from metashot.methods import build_head

    new_head = None if head is None else build_head(head, **(head_args or {}))
    source, method = folder.method(cfg.validate(), checkpoint)
    if new_head is not None:
        method = _with_head(method, new_head, head, folder.path)
    batches = source.loader("test", cfg.test_episodes, seed=cfg.seed, kind=type(method).test_batches)
    with numerics(cfg.precision, cfg.deterministic):  # the run's own, as its training and test had
        result = evaluate(method, batches, check_device(cfg.device), progress, precision=cfg.precision)
    parts = ["result", *([f"head-{head}"] if head else []), *([f"{cfg.ways}w{cfg.shots}s"] * bool(changes))]
    folder.write_result(result, "-".join(parts) + ".json")
    return result


def _with_head(method: Method, head: nn.Module, name: str | None, path: Path) -> Method:
    """``method`` with ``head`` in place of its own, else a ConfigError for a method that has none."""
    from metashot.methods.heads import with_head

    try:
        return with_head(method, head)
    except ValueError as e:
        raise ConfigError(f"{path}: --head {name}: {e}") from None


# What runs of one recipe over several seeds may differ in besides the seed.
SEED_FREE = ("seed", "device", "data_dir")


def summarize_runs(run_dirs: list[str | Path]) -> SeedSummary:
    """The tested runs ``run_dirs`` of one recipe over seeds, summarised; an error names any field
    besides the seed (and device and data folder) in which two runs differ, or a run not yet tested."""
    configs, results = [], []
    from metashot.stages import relative_init, stage_folder

    for run_dir in run_dirs:
        folder = RunFolder(stage_folder(run_dir))  # a staged run: its last stage
        cfg = folder.load_config(trust_code=True)  # only compared: nothing is built from it
        configs.append(relative_init(cfg, folder.path).replace(split_seed=cfg.class_split_seed).to_dict())
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
