"""One trainer for every method, in one process or many: the loop of steps, validations and checkpoints.

The run folder lives in :mod:`metashot.runs`, the exchanges between processes in :mod:`metashot.distributed`,
the signals in :mod:`metashot.process`, the loggers in :mod:`metashot.loggers`. Under ``torchrun`` every
rank runs the loop on its share of each meta-batch; the method never knows.
"""

from __future__ import annotations

import math
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from metashot import loggers
from metashot.config import Config
from metashot.data.tasks import TaskSource, checked_source
from metashot.devices import numerics
from metashot.distributed import RunningStats, World
from metashot.errors import ConfigError, NonFiniteError
from metashot.evaluate import Result, autocast, evaluate, peak_memory_mb
from metashot.init_from import init_weights
from metashot.methods import build_method, method_class
from metashot.methods.base import Method
from metashot.process import Interrupted, StopSignals
from metashot.progress import Progress
from metashot.runs import RunFolder, load_weights, resume_config

CHECK_EVERY = 25  # steps between host syncs that check the loss and the weights are finite


class Trainer:
    """Meta-trains ``cfg.method`` on ``cfg.task`` into ``run_dir``: ``Trainer(cfg, run_dir).fit()``.

    With ``resume=True`` it continues the run in ``run_dir`` from its ``last.pt`` (``cfg=None`` takes the
    run's own config; a given one may change only :data:`metashot.runs.RESUMABLE` fields). ``.test()``
    evaluates the best weights on the test classes. ``log`` names loggers of the metrics rows besides
    ``metrics.csv`` (:mod:`metashot.loggers`). Config, loggers and episode shapes are checked here.
    """

    def __init__(self, cfg: Config | None, run_dir: str | Path, resume: bool = False, progress: bool = True,
                 source: TaskSource | None = None, world: World | None = None,
                 log: Iterable[str] = (loggers.CSV,)) -> None:
        self.log = loggers.check(log)
        self.folder = RunFolder(run_dir)
        if resume:
            # a given config chose its backbone; one read from disk may not choose code to run
            saved = self.folder.load_config(backbone=cfg.backbone if cfg is not None else None)
            cfg = saved if cfg is None else resume_config(saved, {k: getattr(cfg, k) for k in cfg.to_dict()})
        elif cfg is None:
            raise ConfigError("a new run needs a config")
        self.cfg = cfg.validate()
        self.resume = resume
        self.world = world or World.from_env(cfg.device)
        self.kinds = kinds = method_class(cfg).train_batches, method_class(cfg).test_batches
        for kind in dict.fromkeys(kinds):  # the training batches, and the validation and test episodes
            self.world.check_shares(cfg.per_step(kind), cfg.val_episodes, cfg.test_episodes, kind=kind)
        self.folder.writer = self.world.writer
        self.show_progress = progress and self.world.writer
        self.device = self.world.device(cfg.device)  # auto resolved, this rank's GPU
        torch.manual_seed(cfg.seed)
        self.source = source or self.world.first(lambda: checked_source(cfg, kinds))
        self.method = build_method(cfg, self.source.task_info(kinds[0])).to(self.device)
        self.method.check_batch(cfg.per_step(kinds[0]) // self.world.size)
        if not any(p.requires_grad for p in self.method.parameters()):
            raise ConfigError(f"{cfg.method} has nothing to train: every parameter is frozen (backbone_args "
                              "freeze); test a frozen backbone with `metashot embed` and `metashot evaluate "
                              "--features`, or fit it with `metashot fit`")
        if not (resume and self.folder.last.exists()):  # a fresh start; a resume's last.pt holds the weights
            self.cfg = cfg = init_weights(self.method, cfg)
        self.running_stats = RunningStats(self.method, self.world)
        self.optimizer = cfg.make_optimizer(self.method.param_groups(cfg.lr))
        self.scheduler = cfg.make_scheduler(self.optimizer)
        self.progress = Progress.start(self.world, self.device)
        self.out_of_time = False
        self.best_weights: dict[str, torch.Tensor] | None = None
        self.stopped_by: int | None = None  # the signal that stopped training early
        self.signals = StopSignals()
        self.logger = loggers.Loggers([])

    def _evaluate(self, part: str, episodes: int) -> Result:
        loader = self.source.loader(part, episodes, seed=self.cfg.seed, kind=self.kinds[1],
                                    **self.world.shard)
        return evaluate(self.method, loader, self.device, self.show_progress and part == "test",
                        gather=self.world.gather_episodes, precision=self.cfg.precision)

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    @property
    def step(self) -> int:
        return self.progress.step

    @property
    def finished(self) -> bool:
        """Trained to ``cfg.steps``, or to ``cfg.max_minutes`` of training."""
        return self.step >= self.cfg.steps or self.out_of_time

    def _time_is_up(self) -> bool:
        return self.cfg.max_minutes is not None and self.progress.elapsed >= 60 * self.cfg.max_minutes

    def _due(self) -> bool:
        """Whether this step ends with a validation and checkpoint."""
        return self.step % self.cfg.val_every == 0 or self.finished

    def _state(self) -> dict[str, Any]:
        """Everything to resume: the progress, weights, optimizer, schedule and the random states (the
        CPU's, and the GPU's on CUDA: dropout and DropBlock draw there)."""
        cuda = {"cuda_rng": torch.cuda.get_rng_state(self.device)} if self.device.type == "cuda" else {}
        return {**self.progress.state(), "method": self.method.state_dict(),
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "rng": torch.get_rng_state(), **cuda}

    def _open(self) -> None:
        """Take the run folder, restore its last checkpoint if it has one, open the loggers."""
        if self.world.first(lambda: self.folder.open(self.cfg, self.resume)):
            # read onto the CPU: the optimizer then puts each state where a fresh one keeps it (Adam's step
            # counters on the CPU unless capturable or fused: on the GPU they cost host syncs every step)
            state = self.folder.load_last("cpu")
            load_weights(self.method, state["method"], self.folder.last, self.folder.config_path)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            torch.set_rng_state(state["rng"])
            if self.device.type == "cuda" and "cuda_rng" in state:  # none in a checkpoint saved off CUDA
                torch.cuda.set_rng_state(state["cuda_rng"], self.device)
            self.progress = Progress.load(state, self.world, self.device)
            self.out_of_time = self._time_is_up()
            if self.progress.best is not None:
                self.best_weights = self.folder.best_weights(self.method)
        elif self.resume and self.world.writer:
            print(f"metashot: {self.run_dir} has no checkpoint yet; starting its training from step 0",
                  file=sys.stderr)
        self.logger = loggers.open_loggers(self.log, self.run_dir, self.progress.rows, self.world.writer)

    def validate(self) -> Result:
        return self._evaluate("val", self.cfg.val_episodes)

    def fit(self) -> Method:
        """Train to ``cfg.steps`` steps (or ``cfg.max_minutes``), validating and checkpointing every
        ``cfg.val_every``. SIGINT or SIGTERM saves ``last.pt`` at once and stops; ``--resume`` goes on."""
        try:
            self._open()
            with self.signals, numerics(self.cfg.precision, self.cfg.deterministic):
                try:
                    self._train()
                except Interrupted as e:
                    self.stopped_by = self.signals.pending = e.signum
                    if e.between_steps:  # cut short a validation: the step's state is whole, save it
                        self.folder.save(self._state())
        finally:
            self.logger.close()
            self.folder.close()
        if self.stopped_by is not None and self.world.writer:
            print(f"metashot: stopped by {signal.Signals(self.stopped_by).name} at step {self.step}; "
                  f"last.pt is saved, --resume continues", file=sys.stderr)
        return self.method

    def _train(self) -> None:
        """The steps from ``self.step`` to the end or a stop, in step with the other ranks."""
        c, p = self.cfg, self.progress
        if p.step > 0 and (not p.rows or p.rows[-1]["step"] != p.step) and self._due():
            self._checkpoint(validate=True)  # a signal cut this step's validation short
        kind, per_step = self.kinds[0], c.per_step(self.kinds[0])
        batches = () if self.finished else self.source.loader(
            "train", c.steps * per_step, seed=c.seed, start=p.step * per_step, kind=kind, **self.world.shard)
        t0 = time.perf_counter() - p.elapsed
        self.world.start_steps()
        self.signals.in_step = True
        with tqdm(total=c.steps, initial=p.step, desc=f"train {c.method}", unit="step",
                  disable=not self.show_progress, dynamic_ncols=True) as bar:
            for batch in batches:
                self._step(batch, t0)
                bar.update()
                due = self._due()
                if p.since % CHECK_EVERY == 0 or due or self.stopped_by is not None:
                    self._check_finite(bar)
                if due or self.stopped_by is not None:
                    self._checkpoint(validate=due)
                    t0 = time.perf_counter() - p.elapsed  # validation time is not training time
                if self.stopped_by is not None or self.finished:
                    break

    def _step(self, batch: Any, t0: float) -> None:
        """One optimizer step on this rank's share of the meta-batch, with the others' mean gradient."""
        p = self.progress
        self.method.on_step(p.step)
        with autocast(self.method, self.device, self.cfg.precision):
            loss, metrics = self.method.loss(batch.to(self.device))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        p.elapsed = time.perf_counter() - t0
        signalled, out_of_time = self.world.sync_step(
            self.method.parameters(), [float(self.signals.pending or 0), float(self._time_is_up())])
        self.optimizer.step()
        self.scheduler.step()
        self.running_stats.fold(self.method.norm_units(batch))
        p.add(loss, metrics[type(self.method).metric].mean())
        if signalled:  # this rank's signal, else another's
            self.stopped_by = self.signals.pending or signal.SIGTERM
        self.out_of_time = out_of_time > 0

    def _check_finite(self, bar: tqdm) -> None:
        """One host sync: the training loss and every parameter and buffer must be finite."""
        p = self.progress
        loss_avg, metric_avg = p.averages(self.world)
        tensors = {k: v for k, v in self.method.state_dict().items() if v.is_floating_point()}
        finite = torch.stack([v.isfinite().all() for v in tensors.values()] or [torch.tensor(True)])
        if math.isfinite(loss_avg) and bool(finite.all()):
            memory = peak_memory_mb(self.device)
            bar.set_postfix(loss=f"{loss_avg:.3f}", **{type(self.method).metric: f"{metric_avg:.3f}"},
                            **({} if memory is None else {"mem": f"{memory:.0f}MB"}))
            return
        bad = [k for k, v in tensors.items() if not v.isfinite().all()]
        names = ", ".join(bad[:3]) + (", ..." if len(bad) > 3 else "")
        what = " and ".join(([] if math.isfinite(loss_avg) else [f"the training loss is {loss_avg}"])
                            + ([f"{len(bad)} weight tensor(s) hold NaN or inf ({names})"] if bad else []))
        last = (f"the last good checkpoint is {self.folder.last} (step {p.rows[-1]['step']})"
                if p.rows and self.folder.last.exists() else "no checkpoint was saved before it")
        raise NonFiniteError(
            f"training diverged by step {self.step} of {self.cfg.method}: {what}; lower --lr "
            f"(now {self.cfg.lr:g}) or check the data; {last}"
        )

    def _checkpoint(self, validate: bool) -> None:
        """Save the run's state; with ``validate``, first validate and add a metrics row. Every rank
        calls it at the same step (it gathers every rank's sums)."""
        p = self.progress
        p.gather(self.world)  # also what a validation cut short saves
        best = None
        if validate:
            self.signals.in_step = False  # a signal now stops the validation at its episode's end
            val = self.validate()
            self.signals.in_step = True
            self.method.train()
            loss, metric = p.averages(self.world)
            items = p.step * self.cfg.per_step(self.kinds[0])  # episodes, or examples
            p.add_row({"step": p.step, "episodes": items, "minutes": p.elapsed / 60,
                       "lr": self.scheduler.get_last_lr()[0], "train_loss": loss, "train_metric": metric,
                       "val_metric": val.mean, "val_ci95": val.ci, **self._memory()})
            if p.improves(val.mean, type(self.method).maximize):
                self.best_weights = {k: v.detach().to("cpu", copy=True)
                                     for k, v in self.method.state_dict().items()}
                best = {"step": p.step, "val": val.mean, "method": self.best_weights}
        self.folder.save(self._state(), best)
        if validate:
            self.logger.log(p.step, {k: v for k, v in p.rows[-1].items() if k != "step"})

    def _memory(self) -> dict[str, float]:
        """A metrics row's ``max_memory_mb`` on CUDA: the peak GPU memory allocated since the previous row
        (then reset); nothing off CUDA."""
        memory = peak_memory_mb(self.device)
        if memory is None:
            return {}
        torch.cuda.reset_peak_memory_stats(self.device)
        return {"max_memory_mb": memory}

    def test(self, episodes: int | None = None) -> Result:
        """The best weights (else the last) on ``episodes`` (default ``cfg.test_episodes``) of the test part;
        writes ``result.json`` (on CUDA with the run's peak GPU memory: its rows' and the test's)."""
        if self.best_weights is not None:
            self.method.load_state_dict(self.best_weights)
        with self.signals, numerics(self.cfg.precision, self.cfg.deterministic):
            result = self._evaluate("test", episodes or self.cfg.test_episodes)
        if result.max_memory_mb is not None:
            rows = [r["max_memory_mb"] for r in self.progress.rows if "max_memory_mb" in r]
            result.max_memory_mb = max([result.max_memory_mb, *rows])
        self.folder.write_result(result)
        return result


def train(cfg: Config, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Result:
    """Meta-train then test: the whole ``metashot train`` in one call."""
    trainer = Trainer(cfg, run_dir, resume=resume, progress=progress)
    trainer.fit()
    return trainer.test()
