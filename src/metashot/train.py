"""One trainer for every method: Adam with a step schedule, validation, checkpoints, resume.

A run folder holds ``config.json``, ``metrics.csv`` (one row per validation), ``last.pt`` (to resume)
and ``best.pt`` (the best validation ``metric``), and after testing ``result.json``. Checkpoints hold
tensors and plain data only and load with ``torch.load(weights_only=True)``; every file is written to
a temporary name and renamed into place, so a kill at any moment leaves the previous version whole.
"""

from __future__ import annotations

import csv
import ctypes
import io
import math
import signal
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metashot.config import Config
from metashot.data.tasks import TaskSource, build_source
from metashot.evaluate import Result, evaluate
from metashot.io import atomic_write, atomic_write_text
from metashot.methods import METHODS
from metashot.methods.base import Method

CSV_FIELDS = ["step", "episodes", "minutes", "lr", "train_loss", "train_metric", "val_metric", "val_ci95"]


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of returning it to the kernel after every step.

    Training frees and reallocates the same large activation buffers every step; by default glibc
    serves them with mmap and unmaps them on free, so each step pays page faults again. Returns
    whether the setting took (False off glibc).
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 1 << 30))


def build_method(cfg: Config, source: TaskSource) -> Method:
    if cfg.method not in METHODS:
        raise ValueError(f"unknown method {cfg.method!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[cfg.method].build(source.info, **cfg.method_args)


SCHEDULES = ("step", "cosine", "constant")


def make_scheduler(cfg: Config, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The learning-rate schedule ``cfg.schedule``, stepped once per optimizer step."""
    lr = torch.optim.lr_scheduler
    if cfg.schedule == "step":
        return lr.StepLR(optimizer, cfg.lr_step, cfg.lr_gamma)
    if cfg.schedule == "cosine":
        return lr.CosineAnnealingLR(optimizer, cfg.steps)
    if cfg.schedule == "constant":
        return lr.LambdaLR(optimizer, lambda _: 1.0)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {cfg.schedule!r}")


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    atomic_write(path, lambda f: f.write(buffer.getbuffer()))


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code from it (tensors and plain data only)."""
    if not path.exists():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:
        raise ValueError(f"{path}: not a readable metashot checkpoint ({e})") from e


class Trainer:
    """Meta-trains ``cfg.method`` on ``cfg.task`` into ``run_dir``.

    ``Trainer(cfg, run_dir).fit()`` trains (continuing from ``last.pt`` with ``resume=True``);
    ``.test()`` evaluates the best checkpoint on the test classes.
    """

    def __init__(
        self,
        cfg: Config,
        run_dir: str | Path,
        resume: bool = False,
        progress: bool = True,
        source: TaskSource | None = None,
    ) -> None:
        self.run_dir = Path(run_dir)
        self.progress = progress
        if resume:
            saved = Config.load(self.run_dir / "config.json")
            # A resumed run keeps its recipe; only the length, device and evaluation size may change.
            cfg = saved.replace(steps=cfg.steps, max_minutes=cfg.max_minutes, device=cfg.device,
                                  test_episodes=cfg.test_episodes)
        elif (self.run_dir / "last.pt").exists():
            raise FileExistsError(
                f"{self.run_dir} already holds a run; pass --resume to continue it "
                "or choose another --run-dir"
            )
        self.cfg = cfg
        self.resume = resume
        self.device = torch.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.source = source or build_source(cfg)
        self.method = build_method(cfg, self.source).to(self.device)
        self.optimizer = torch.optim.Adam(self.method.parameters(), lr=cfg.lr)
        self.scheduler = make_scheduler(cfg, self.optimizer)
        self.step = 0
        self.elapsed = 0.0
        self.best: float | None = None
        self._stop = False

    # -- checkpoints ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "elapsed": self.elapsed,
            "best": self.best,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def _restore(self) -> None:
        state = load_checkpoint(self.run_dir / "last.pt", self.device)
        self.method.load_state_dict(state["method"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        self.step, self.elapsed, self.best = state["step"], state["elapsed"], state["best"]
        rows = self._read_csv()
        self._write_csv([r for r in rows if int(r["step"]) <= self.step])

    def _read_csv(self) -> list[dict[str, str]]:
        path = self.run_dir / "metrics.csv"
        if not path.exists():
            return []
        with open(path, newline="") as f:
            return list(csv.DictReader(f))

    def _write_csv(self, rows: list[dict[str, Any]]) -> None:
        text = io.StringIO()
        writer = csv.DictWriter(text, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(self.run_dir / "metrics.csv", text.getvalue())

    # -- training ------------------------------------------------------------------------------
    def _better(self, value: float) -> bool:
        if self.best is None:
            return True
        return value > self.best if type(self.method).maximize else value < self.best

    def validate(self) -> Result:
        c = self.cfg
        return evaluate(
            self.method, self.source.loader("val", c.val_episodes, seed=c.seed), self.device
        )

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        self._stop = True

    def fit(self) -> Method:
        """Train to ``cfg.steps`` steps, validating and checkpointing every ``cfg.val_every``."""
        c = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.resume:
            self._restore()
        else:
            c.save(self.run_dir / "config.json")
            self._write_csv([])
        keep_freed_memory()
        previous = signal.signal(signal.SIGTERM, self._on_sigterm)
        loader = self.source.loader(
            "train", c.steps * c.meta_batch, seed=c.seed, start=self.step * c.meta_batch
        )
        metric = type(self.method).metric
        sums = torch.zeros(2, device=self.device)
        since = 0
        bar = tqdm(total=c.steps, initial=self.step, desc=f"train {c.method}", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        t0 = time.perf_counter() - self.elapsed
        self.method.train()
        try:
            for batch in loader:
                self.method.on_step(self.step)
                loss, metrics = self.method.loss(batch.to(self.device))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.scheduler.step()
                self.step += 1
                since += 1
                sums += torch.stack([loss.detach(), metrics[metric].detach().mean()])
                bar.update()
                if c.max_minutes is not None and time.perf_counter() - t0 >= 60 * c.max_minutes:
                    self._stop = True
                last = self.step == c.steps
                if since % 25 == 0 or last or self._stop or self.step % c.val_every == 0:
                    # one host sync per 25 steps: a NaN is caught within 25 steps of appearing
                    loss_avg, metric_avg = (sums / since).tolist()
                    if not math.isfinite(loss_avg):
                        raise NonFiniteLossError(
                            f"training loss is {loss_avg} in the {since} steps up to step {self.step} "
                            f"of {c.method}; lower --lr or check the data. The last checkpoint is "
                            f"{self.run_dir / 'last.pt'}"
                        )
                    bar.set_postfix(loss=f"{loss_avg:.3f}", **{metric: f"{metric_avg:.3f}"})
                if self.step % c.val_every == 0 or last or self._stop:
                    self.elapsed = time.perf_counter() - t0
                    self._checkpoint(sums / since)
                    sums.zero_()
                    since = 0
                    self.method.train()
                    t0 = time.perf_counter() - self.elapsed  # validation time is not training time
                if self._stop:
                    bar.write(f"stopped at step {self.step} (time limit or SIGTERM); --resume continues")
                    break
        finally:
            bar.close()
            signal.signal(signal.SIGTERM, previous)
        return self.method

    def _checkpoint(self, train_avg: torch.Tensor) -> None:
        val = self.validate()
        row = {
            "step": self.step,
            "episodes": self.step * self.cfg.meta_batch,
            "minutes": f"{self.elapsed / 60:.3f}",
            "lr": f"{self.scheduler.get_last_lr()[0]:.3g}",
            "train_loss": f"{train_avg[0].item():.5f}",
            "train_metric": f"{train_avg[1].item():.5f}",
            "val_metric": f"{val.mean:.5f}",
            "val_ci95": f"{val.ci:.5f}",
        }
        if self._better(val.mean):
            self.best = val.mean
            save_checkpoint(self.run_dir / "best.pt", {"step": self.step, "val": val.mean,
                                                       "method": self.method.state_dict()})
        save_checkpoint(self.run_dir / "last.pt", self._state())
        # written after last.pt so that a row never refers to a step a resume would redo
        self._write_csv([*self._read_csv(), row])

    # -- testing -------------------------------------------------------------------------------
    def test(self, episodes: int | None = None, checkpoint: str = "best.pt") -> Result:
        """Evaluate ``checkpoint`` on the test part; writes ``result.json`` in the run folder."""
        return evaluate_run(self.run_dir, episodes, checkpoint, self.cfg.device, self.progress,
                        source=self.source)


def evaluate_run(
    run_dir: str | Path,
    episodes: int | None = None,
    checkpoint: str = "best.pt",
    device: str | None = None,
    progress: bool = False,
    ways: int | None = None,
    shots: int | None = None,
    source: TaskSource | None = None,
) -> Result:
    """Evaluate a finished or interrupted run from its folder (``best.pt``, else ``last.pt``)."""
    run_dir = Path(run_dir)
    cfg = Config.load(run_dir / "config.json")
    changes: dict[str, Any] = {}
    if device:
        changes["device"] = device
    if ways and ways != cfg.ways:
        changes["ways"] = ways
    if shots and shots != cfg.shots:
        changes["shots"] = shots
    if changes:
        cfg = cfg.replace(**changes)
        source = None
    source = source or build_source(cfg)
    method = build_method(cfg, source).to(cfg.device)
    path = run_dir / checkpoint
    if not path.exists() and (run_dir / "last.pt").exists():
        path = run_dir / "last.pt"
    method.load_state_dict(load_checkpoint(path, cfg.device)["method"])
    n = episodes or cfg.test_episodes
    result = evaluate(method, source.loader("test", n, seed=cfg.seed), cfg.device, progress)
    name = "result.json" if not changes.keys() - {"device"} else f"result-{cfg.ways}w{cfg.shots}s.json"
    atomic_write_text(run_dir / name, result.to_json() + "\n")
    return result


def train(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Result:
    """Meta-train then test: the whole ``metashot train`` in one call."""
    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress)
    trainer.fit()
    return trainer.test()
