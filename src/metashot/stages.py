"""Recipes of several stages: runs one after another, a later one starting from an earlier one's weights.

A staged preset (:data:`metashot.presets.PRESETS`) is a list of configs, stage 1 first, or
:class:`Stages` to share ``--max-minutes`` unequally. ``metashot train --preset NAME --run-dir RUN``
trains and tests stage k into ``RUN/stagek``, in order. Stage k starts from stage j's weights (j < k)
with ``init_from="stage:j"`` and an ``init_prefix`` such as ``"encoder."``, resolved to the absolute
path of ``RUN/stagej`` when stage k starts (:mod:`metashot.init_from` loads them).

Options on the command line apply to every stage; ``--stage K:KEY=JSON`` sets a field of stage K only,
after them; ``--max-minutes M`` is the whole recipe's, stage k getting ``M * budget[k] / sum(budget)``
(default: equal shares) of it.

``RUN/stages.json`` holds the recipe as the command line made it (its markers unresolved) and the
budget. A stage is finished when its ``result.json`` exists. ``--resume`` continues the recipe of
``stages.json``: finished stages are skipped, the stage in progress resumes from its ``last.pt``, the
later ones start; its options may change what a resume may (:data:`metashot.runs.RESUMABLE`), in every
stage not yet finished. ``metashot evaluate RUN`` and ``summarize`` read the last stage
(:func:`stage_folder`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from metashot import loggers
from metashot.config import Config, stage_marker
from metashot.devices import check_device
from metashot.distributed import World
from metashot.errors import ConfigError, RunFolderError
from metashot.evaluate import Result
from metashot.io import atomic_write_text
from metashot.nn.backbones import is_factory_path
from metashot.runs import RESUMABLE, STAGES_FILE, RunFolder, resume_config

if TYPE_CHECKING:
    from metashot.train import Trainer


@dataclass
class Stages:
    """The stages of a recipe, ``configs[k - 1]`` stage k; ``budget`` the shares of ``--max-minutes``
    each stage gets (None: equal), e.g. ``[3, 1]`` for three quarters to stage 1."""

    configs: Sequence[Config]
    budget: Sequence[float] | None = None

    def __post_init__(self) -> None:
        self.configs = list(self.configs)
        n = len(self.configs)
        if not n or not all(isinstance(c, Config) for c in self.configs):
            raise ConfigError("a staged recipe is a list of one Config or more, stage 1 first")
        if self.budget is not None:
            budget = list(self.budget) if isinstance(self.budget, (list, tuple)) else []
            if len(budget) != n or not all(isinstance(b, (int, float)) and not isinstance(b, bool)
                                           and math.isfinite(b) and b > 0 for b in budget):
                raise ConfigError(f"budget {json.dumps(self.budget)}: one positive share of --max-minutes "
                                  f"per stage, {n} in all")
            self.budget = [float(b) for b in budget]
        for k, cfg in enumerate(self.configs, 1):
            j = stage_marker(cfg.init_from)
            if j is not None and j >= k:
                earlier = f"stages 1 to {k - 1}" if k > 1 else "none: it is the first"
                raise ConfigError(f"stage {k}: --init-from {cfg.init_from} must name an earlier stage "
                                  f"({earlier})")

    @property
    def shares(self) -> list[float]:
        """Each stage's fraction of ``--max-minutes``."""
        budget = self.budget or [1.0] * len(self.configs)
        return [b / sum(budget) for b in budget]

    @property
    def preset(self) -> str | None:
        return self.configs[-1].preset

    def to_dict(self) -> dict[str, Any]:
        return {"budget": self.budget, "stages": [c.to_dict() for c in self.configs]}


def stage_dir(run_dir: str | Path, k: int) -> Path:
    """Stage k's run folder in the staged run folder ``run_dir``."""
    return Path(run_dir) / f"stage{k}"


def resolve(cfg: Config, run_dir: str | Path) -> Config:
    """``cfg`` with an ``init_from`` "stage:j" made the absolute path of stage j's folder in ``run_dir``."""
    j = stage_marker(cfg.init_from)
    return cfg if j is None else cfg.replace(init_from=os.path.abspath(stage_dir(run_dir, j)))


def with_changes(recipe: Stages, changes: dict[str, Any], per_stage: dict[int, dict[str, Any]],
                 resume: bool = False) -> Stages:
    """``recipe`` with the command line's ``changes`` applied to every stage (``max_minutes`` shared by
    the budget), then ``per_stage[k]`` to stage k (:meth:`Config.override`); with ``resume`` only what a
    resume may change (:func:`metashot.runs.resume_config`). An error names its stage."""
    n = len(recipe.configs)
    if unknown := sorted(set(per_stage) - set(range(1, n + 1))):
        raise ConfigError(f"--stage {unknown[0]}: the recipe {recipe.preset} has stages 1 to {n}")
    if changes.get("max_minutes") is not None:  # the whole recipe's, checked before it is shared
        recipe.configs[0].replace(max_minutes=changes["max_minutes"]).validate()
    configs = []
    for k, (cfg, share) in enumerate(zip(recipe.configs, recipe.shares), 1):
        every = dict(changes)
        if changes.get("max_minutes") is not None:
            every["max_minutes"] = changes["max_minutes"] * share
        try:
            changed = cfg.override(**every).override(**per_stage.get(k, {}))
            configs.append(resume_config(cfg, changed.to_dict()) if resume else changed)
        except ConfigError as e:
            raise ConfigError(f"stage {k}: {e}") from None
    return Stages(configs, recipe.budget)


def is_staged_run(path: str | Path) -> bool:
    return (Path(path) / STAGES_FILE).is_file()


def load_recipe(run_dir: str | Path, trust_code: bool = False, backbone: str | None = None) -> Stages:
    """The recipe a staged run folder saved (``stages.json``), checked; as a run's ``config.json``
    (:meth:`metashot.runs.RunFolder.load_config`), one that names a backbone factory is refused unless
    the caller names the same (``backbone``) or ``trust_code``."""
    path = Path(run_dir) / STAGES_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise RunFolderError(f"{run_dir}: no {STAGES_FILE}; not the folder of a staged run") from None
    except (OSError, ValueError) as e:
        raise RunFolderError(f"{path}: cannot be read as JSON ({e})") from None
    if not (isinstance(data, dict) and isinstance(data.get("stages"), list)):
        raise RunFolderError(f"{path}: not a metashot stages file (a JSON object of 'stages' and 'budget')")
    configs = [Config.from_dict(c, f"{path}, stage {k}") for k, c in enumerate(data["stages"], 1)]
    for k, cfg in enumerate(configs, 1):
        if is_factory_path(cfg.backbone) and not trust_code and backbone != cfg.backbone:
            raise RunFolderError(
                f"{path}: stage {k} names the backbone factory {cfg.backbone}, code that a file read from "
                f"disk may not run; if you trust this run folder, pass --backbone {cfg.backbone} (or "
                "--trust-code)"
            )
    return Stages(configs, data.get("budget"))


def stage_folder(path: str | Path) -> Path:
    """The folder of a staged run's last stage, for a staged run's folder; any other path as given."""
    if not is_staged_run(path):
        return Path(path)
    n = len(load_recipe(path, trust_code=True).configs)  # only counted: nothing is built from it
    last = stage_dir(path, n)
    if not RunFolder(last).exists():
        raise RunFolderError(f"{path}: a staged run whose last stage ({n}) has not started; `metashot train "
                             f"--resume --run-dir {path}` trains it")
    return last


def relative_init(cfg: Config, path: str | Path) -> Config:
    """``cfg`` of the run in ``path`` with an ``init_from`` of a stage of its own staged run written back
    as "stage:j", so that the same recipe in two run folders compares equal."""
    if cfg.init_from is None:
        return cfg
    init, own = Path(cfg.init_from), Path(os.path.abspath(path))
    found = re.fullmatch(r"stage([1-9][0-9]*)", init.name)
    if found and init.parent == own.parent and is_staged_run(own.parent):
        return cfg.replace(init_from=f"stage:{found.group(1)}")
    return cfg


def _start(run_dir: Path, recipe: Stages, world: World) -> None:
    """Take ``run_dir`` for a new staged run: refuse one that holds a run, then save ``stages.json``."""
    error = None
    if run_dir.exists() and not run_dir.is_dir():
        error = RunFolderError(f"{run_dir}: is a file, not a run folder; choose another --run-dir")
    elif is_staged_run(run_dir) or RunFolder(run_dir).exists():
        error = RunFolderError(f"{run_dir} already holds a run; pass --resume to continue it or choose "
                               "another --run-dir")
    world.raise_any(error)  # every rank looks before the writer writes
    if world.writer:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
            atomic_write_text(run_dir / STAGES_FILE, json.dumps(recipe.to_dict(), indent=2) + "\n")
        except OSError as e:
            raise RunFolderError(f"{run_dir}: cannot write the run folder ({e.strerror or e})") from None


def _saved_result(folder: Path) -> Result:
    path = folder / "result.json"
    try:
        return Result.from_dict(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunFolderError(f"{path}: not a metashot result ({e}); remove it to test the stage again"
                             ) from None


class StagedRun:
    """Trains and tests each stage of ``recipe`` in order into ``run_dir/stageK`` (see the module), as
    :class:`metashot.train.Trainer` trains one run: ``StagedRun(recipe, run_dir).fit()``, then ``.test()``
    (the last stage's result; each stage is tested as it finishes). With ``resume`` it continues the
    staged run of ``run_dir``, ``recipe`` its :func:`load_recipe`'s, changed as a resume may.
    """

    def __init__(self, recipe: Stages, run_dir: str | Path, resume: bool = False, progress: bool = True,
                 log: Iterable[str] = (loggers.CSV,)) -> None:
        self.recipe, self.run_dir, self.resume = recipe, Path(run_dir), resume
        self.progress, self.log = progress, tuple(log)
        check_device(recipe.configs[0].device)
        self.world = World.from_env(recipe.configs[0].device)
        self.results: dict[int, Result] = {}
        self.trainer: Trainer | None = None  # the stage in training, or the last trained
        self.stopped_by: int | None = None

    @property
    def finished(self) -> bool:
        """Every stage trained and tested."""
        return len(self.results) == len(self.recipe.configs)

    def fit(self) -> None:
        """Train and test the stages not finished, in order; a signal stops the stage in training (its
        ``last.pt`` saved) and the recipe, ``stopped_by`` naming it."""
        from metashot.train import Trainer

        n = len(self.recipe.configs)
        if not self.resume:
            _start(self.run_dir, self.recipe, self.world)
        for k, cfg in enumerate(self.recipe.configs, 1):
            folder = RunFolder(stage_dir(self.run_dir, k))
            if self.resume and (folder.path / "result.json").is_file():
                self.results[k] = _saved_result(folder.path)
                self._say(f"stage {k} of {n} is finished ({folder.path}/result.json)")
                continue
            started, cfg = self.resume and folder.exists(), resolve(cfg, self.run_dir)
            if started:  # as its config.json says, with what the resume changes
                saved = folder.load_config(backbone=cfg.backbone)
                cfg = saved.replace(**{f: getattr(cfg, f) for f in RESUMABLE})
            self.trainer = Trainer(cfg, folder.path, resume=started, progress=self.progress,
                                   world=self.world, log=self.log)
            self.trainer.fit()
            if not self.trainer.finished:
                self.stopped_by = self.trainer.stopped_by
                return
            self.results[k] = self.trainer.test()
            self._say(f"stage {k} of {n} ({cfg.method}): {self.results[k].summary()}")

    def _say(self, text: str) -> None:
        if self.world.writer:
            print(f"metashot: {text}", file=sys.stderr, flush=True)

    def test(self) -> Result:
        """The last stage's test result."""
        if not self.finished:
            raise RunFolderError(f"{self.run_dir}: the staged run is not finished; --resume it")
        return self.results[len(self.recipe.configs)]


def train_stages(recipe: Stages, run_dir: str | Path, resume: bool = False, progress: bool = True) -> Result:
    """Train and test every stage: the whole ``metashot train --preset STAGED`` in one call; the last
    stage's result."""
    run = StagedRun(recipe, run_dir, resume=resume, progress=progress)
    run.fit()
    return run.test()
