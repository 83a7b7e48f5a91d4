"""One trainer for every method, in one process or many: the optimizer, the schedule, validation,
checkpoints, resume, signals.

The run folder's files and their guarantees live in :mod:`metashot.runs`, the exchanges between
processes in :mod:`metashot.distributed`; this module is the loop. Under ``torchrun`` every rank runs it
on its share of each meta-batch; the method never knows.
"""

from __future__ import annotations

import ctypes
import math
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metashot.config import Config, check_device
from metashot.data.tasks import TaskSource, checked_source
from metashot.distributed import RunningStats, World
from metashot.errors import ConfigError, NonFiniteError
from metashot.evaluate import Result, evaluate
from metashot.methods import build_method
from metashot.methods.base import Method
from metashot.runs import RunFolder, load_weights, resume_config

CHECK_EVERY = 25  # steps between host syncs that check the loss and the weights are finite


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived outside a training step (during validation or the test)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


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


class Trainer:
    """Meta-trains ``cfg.method`` on ``cfg.task`` into ``run_dir``.

    ``Trainer(cfg, run_dir).fit()`` trains; with ``resume=True`` it continues the run in ``run_dir`` from
    its ``last.pt`` (``cfg=None`` takes the run's own config; a given one may change only
    :data:`metashot.runs.RESUMABLE` fields). ``.test()`` evaluates the best weights on the test classes.
    Everything about the config and the episode shapes is checked here, before any training.
    """

    def __init__(
        self,
        cfg: Config | None,
        run_dir: str | Path,
        resume: bool = False,
        progress: bool = True,
        source: TaskSource | None = None,
        world: World | None = None,
    ) -> None:
        self.folder = RunFolder(run_dir)
        if resume:
            # a given config chose its backbone; one read from disk may not choose code to run
            saved = self.folder.load_config(backbone=cfg.backbone if cfg is not None else None)
            cfg = saved if cfg is None else resume_config(saved, {k: getattr(cfg, k) for k in cfg.to_dict()})
        elif cfg is None:
            raise ConfigError("a new run needs a config")
        self.cfg = cfg.validate()
        self.resume = resume
        check_device(cfg.device)
        self.world = world or World.from_env(cfg.device)
        if cfg.meta_batch % self.world.size:
            raise ConfigError(
                f"--meta-batch {cfg.meta_batch} does not split evenly over {self.world.size} processes: pass "
                f"a multiple of {self.world.size} (it is the global number of episodes per optimizer step; "
                f"ProtoNet's and Matching Networks' presets train one episode per step, so pass "
                f"--meta-batch {self.world.size} to train one per process)"
            )
        for name in ("val_episodes", "test_episodes"):
            if getattr(cfg, name) < self.world.size:
                raise ConfigError(f"{name} {getattr(cfg, name)} is fewer than the {self.world.size} "
                                  "processes: every process needs an episode")
        self.folder.writer = self.world.writer
        self.progress = progress and self.world.writer
        self.device = self.world.device(cfg.device)
        torch.manual_seed(cfg.seed)
        self.source = source or self.world.first(lambda: checked_source(cfg))
        self.method = build_method(cfg, self.source.info).to(self.device)
        self.running_stats = RunningStats(self.method, self.world)
        self.optimizer = cfg.make_optimizer(self.method.parameters())
        self.scheduler = cfg.make_scheduler(self.optimizer)
        self.step = 0
        self.elapsed = 0.0
        self.out_of_time = False
        self.best: float | None = None
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.rows: list[dict[str, Any]] = []
        self.sums = torch.zeros(2, device=self.device)  # training loss and metric since the last row
        self.since = 0
        self.stopped_by: int | None = None  # the signal that stopped training early
        self._pending_signal: int | None = None
        self._in_step = False

    def _loader(self, part: str, episodes: int, start: int = 0) -> Any:
        """This rank's share of ``part``'s episodes ``start`` to ``episodes``, in batches."""
        return self.source.loader(part, episodes, seed=self.cfg.seed, start=start, rank=self.world.rank,
                                  world_size=self.world.size)

    def _evaluate(self, part: str, episodes: int) -> Result:
        return evaluate(self.method, self._loader(part, episodes), self.device,
                        self.progress and part == "test", gather=self.world.gather_episodes)

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def finished(self) -> bool:
        """Trained to ``cfg.steps``, or to ``cfg.max_minutes`` of training."""
        return self.step >= self.cfg.steps or self.out_of_time

    def _time_is_up(self) -> bool:
        c = self.cfg
        return c.max_minutes is not None and self.elapsed >= 60 * c.max_minutes

    # -- state ---------------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "elapsed": self.elapsed,
            "best": self.best,
            "rows": self.rows,
            "sums": self.sums.cpu(),
            "since": self.since,
            "method": self.method.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": torch.get_rng_state(),
        }

    def _restore(self, state: dict[str, Any]) -> None:
        load_weights(self.method, state["method"], self.folder.last, self.folder.config_path)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["rng"].cpu())
        self.step, self.elapsed, self.best = state["step"], state["elapsed"], state["best"]
        self.rows, self.since = state["rows"], state["since"]
        self.sums = state["sums"].to(self.device)
        self.out_of_time = self._time_is_up()
        if self.best is not None:
            self.best_weights = self.folder.best_weights(self.method)

    # -- signals -------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        if self._pending_signal is not None or not self._in_step:
            # during evaluation: stop now; a second signal mid-step: stop now, keeping the last save
            raise Interrupted(signum)
        self._pending_signal = signum  # acted on, by every rank alike, at the end of the step

    def _handle_signals(self) -> dict[int, Any]:
        return {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}

    # -- training ------------------------------------------------------------------------------
    def validate(self) -> Result:
        return self._evaluate("val", self.cfg.val_episodes)

    def fit(self) -> Method:
        """Train to ``cfg.steps`` steps (or ``cfg.max_minutes``), validating and checkpointing every
        ``cfg.val_every``. SIGINT or SIGTERM saves ``last.pt`` at once and stops; ``--resume`` goes on."""
        c = self.cfg
        has_checkpoint = self.world.first(lambda: self.folder.open(c, self.resume))
        if has_checkpoint:
            self._restore(self.folder.load_last(self.device))
        elif self.resume and self.world.writer:
            print(f"metashot: {self.run_dir} has no checkpoint yet; starting its training from step 0",
                  file=sys.stderr)
        keep_freed_memory()
        previous = self._handle_signals()
        loader = self._loader("train", c.steps * c.meta_batch, start=self.step * c.meta_batch)
        bar = tqdm(total=c.steps, initial=self.step, desc=f"train {c.method}", unit="step",
                   disable=not self.progress, dynamic_ncols=True)
        t0 = time.perf_counter() - self.elapsed
        self.method.train()
        try:
            if self.step > 0 and (not self.rows or self.rows[-1]["step"] != self.step) and self._due():
                self._checkpoint(validate=True)  # a signal cut this step's validation short
            batches = iter(loader) if not self.finished else iter(())
            self._in_step = True
            while True:
                batch = next(batches, None)
                if batch is None:
                    break
                self.method.on_step(self.step)
                loss, metrics = self.method.loss(batch.to(self.device))
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.elapsed = time.perf_counter() - t0
                signalled, out_of_time = self.world.sync_step(
                    self.method.parameters(), [float(self._pending_signal or 0), float(self._time_is_up())])
                self.optimizer.step()
                self.scheduler.step()
                self.running_stats.fold(batch)
                self.step += 1
                self.since += 1
                self.sums += torch.stack([loss.detach(), metrics[type(self.method).metric].detach().mean()])
                if signalled:  # this rank's signal, else another's
                    self.stopped_by = self._pending_signal or signal.SIGTERM
                self.out_of_time = out_of_time > 0
                bar.update()
                due = self._due()
                if self.since % CHECK_EVERY == 0 or due or self.stopped_by is not None:
                    self._check_finite(bar)
                if due:
                    self._checkpoint(validate=True)
                    t0 = time.perf_counter() - self.elapsed  # validation time is not training time
                elif self.stopped_by is not None:
                    self._checkpoint(validate=False)
                if self.stopped_by is not None or self.finished:
                    break
        except Interrupted as e:
            self.stopped_by = self._pending_signal = e.signum
            if not self._in_step:  # cut short a validation: the step's state is whole, save it
                self._checkpoint(validate=False)
        finally:
            self._in_step = False
            bar.close()
            for s, handler in previous.items():
                signal.signal(s, handler)
            self.folder.close()
        if self.stopped_by is not None and self.world.writer:
            print(f"metashot: stopped by {signal.Signals(self.stopped_by).name} at step {self.step}; "
                  f"last.pt is saved, --resume continues", file=sys.stderr)
        return self.method

    def _due(self) -> bool:
        """Whether this step ends with a validation and checkpoint."""
        return self.step % self.cfg.val_every == 0 or self.finished

    def _check_finite(self, bar: tqdm) -> None:
        """One host sync: the training loss and every parameter and buffer must be finite."""
        loss_avg, metric_avg = self.world.mean(self.sums / max(self.since, 1)).tolist()
        tensors = {k: v for k, v in self.method.state_dict().items() if v.is_floating_point()}
        finite = torch.stack([v.isfinite().all() for v in tensors.values()] or [torch.tensor(True)])
        if math.isfinite(loss_avg) and bool(finite.all()):
            bar.set_postfix(loss=f"{loss_avg:.3f}", **{type(self.method).metric: f"{metric_avg:.3f}"})
            return
        bad = [k for k, v in tensors.items() if not v.isfinite().all()]
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        what = " and ".join(([] if math.isfinite(loss_avg) else [f"the training loss is {loss_avg}"])
                            + ([f"{len(bad)} weight tensor(s) hold NaN or inf ({names})"] if bad else []))
        last = (f"the last good checkpoint is {self.folder.last} (step {self.rows[-1]['step']})"
                if self.rows and self.folder.last.exists() else "no checkpoint was saved before it")
        raise NonFiniteError(
            f"training diverged by step {self.step} of {self.cfg.method}: {what}; lower --lr "
            f"(now {self.cfg.lr:g}) or check the data; {last}"
        )

    def _checkpoint(self, validate: bool) -> None:
        """Save the run's state; with ``validate``, first validate and add a metrics row."""
        best = None
        if validate:
            self._in_step = False  # a signal now interrupts the validation at once
            val = self.validate()
            self._in_step = True
            self.method.train()
            avg = self.world.mean(self.sums / max(self.since, 1)).tolist()
            self.rows = [*self.rows, {
                "step": self.step,
                "episodes": self.step * self.cfg.meta_batch,
                "minutes": f"{self.elapsed / 60:.3f}",
                "lr": f"{self.scheduler.get_last_lr()[0]:.3g}",
                "train_loss": f"{avg[0]:.5f}",
                "train_metric": f"{avg[1]:.5f}",
                "val_metric": f"{val.mean:.5f}",
                "val_ci95": f"{val.ci:.5f}",
            }]
            self.sums.zero_()
            self.since = 0
            maximize = type(self.method).maximize
            if self.best is None or (val.mean > self.best if maximize else val.mean < self.best):
                self.best = val.mean
                self.best_weights = {k: v.detach().to("cpu", copy=True)
                                     for k, v in self.method.state_dict().items()}
                best = {"step": self.step, "val": val.mean, "method": self.best_weights}
        self.folder.save(self._state(), best)

    # -- testing -------------------------------------------------------------------------------
    def test(self, episodes: int | None = None) -> Result:
        """Evaluate the best weights (else the last) of the method this trainer holds on the test part,
        over ``episodes`` (default ``cfg.test_episodes``); writes ``result.json``."""
        if self.best_weights is not None:
            self.method.load_state_dict(self.best_weights)
        previous = self._handle_signals()
        try:
            result = self._evaluate("test", episodes or self.cfg.test_episodes)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        self.folder.write_result(result)
        return result


def train(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Result:
    """Meta-train then test: the whole ``metashot train`` in one call."""
    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress)
    trainer.fit()
    return trainer.test()
