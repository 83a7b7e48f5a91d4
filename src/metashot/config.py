"""Run configuration: every hyperparameter of a run, saved with it, checked before any work is done."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from metashot.arguments import check_args, matches, method_arg_types, task_arg_types, type_name
from metashot.errors import ConfigError

# Fields added after runs were first saved, with the value that reproduces the older behaviour, so that
# an older config.json still loads; any other missing field is an error.
ADDED_FIELDS: dict[str, Any] = {
    "schedule": "step", "warmup": 0, "lr_min": 0.0, "optimizer": "adam", "optimizer_args": {},
    "weight_decay": 0.0, "split_seed": None, "backbone": None, "backbone_args": {}, "batch_size": 64,
    "lr_milestones": [], "init_from": None, "init_prefix": "", "precision": "fp32", "deterministic": False,
    "data_on_device": False,
}
SCHEDULES = ("step", "multistep", "cosine", "constant")
OPTIMIZERS = {"adam": "Adam", "adamw": "AdamW", "sgd": "SGD", "rmsprop": "RMSprop"}
# bf16 autocasts where the method allows it (Method.autocast_safe); bf16-all autocasts second-order MAML too
PRECISIONS = ("fp32", "tf32", "bf16", "bf16-all")
STAGE_MARKER = re.compile(r"stage:([1-9][0-9]*)")  # init_from "stage:K": stage K of the same staged recipe


def option(default: Any, help: str, aliases: tuple[str, ...] = ()) -> Any:
    """A config field with a command-line option: ``--name`` (see :func:`option_name`), ``help`` its text,
    ``aliases`` other spellings the command line accepts (older names)."""
    metadata = {"help": help, "aliases": aliases}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Config:
    """Everything a run needs; saved as ``config.json`` in the run folder.

    ``steps`` counts optimizer steps: one episode each, or one meta-batch of ``meta_batch`` episodes;
    ``max_minutes`` stops training earlier, after that much training time (validation excluded).
    ``train_ways``/``train_shots``/``train_queries`` default to the test values.

    ``optimizer`` is one of :data:`OPTIMIZERS`, built by torch with ``lr``, ``weight_decay`` and
    ``optimizer_args`` (e.g. ``{"momentum": 0.9, "nesterov": true}`` for SGD, ``{"alpha": 0.95}`` for
    RMSProp). ``schedule`` of the learning rate: "step" (times ``lr_gamma`` every ``lr_step`` steps),
    "multistep" (times ``lr_gamma`` at each of ``lr_milestones``, counted from the end of warm-up),
    "cosine" (from ``lr`` to ``lr_min`` over the steps after warm-up) or "constant"; ``warmup`` steps of
    linear warm-up come first.

    ``split_seed`` draws the split of classes into train, validation and test (null: ``seed``, as runs
    saved before it existed); ``seed`` the initialisation and the episodes. ``backbone`` is a name in
    :data:`metashot.nn.BACKBONES` or ``package.module:factory``, built with ``backbone_args`` (null: the
    method's own network, as in its paper). ``method_args`` and ``task_args`` take the keys and types
    of the method's and the task source's arguments (:mod:`metashot.arguments`).

    ``init_from`` starts a new run from another run's weights: a run folder (its ``best.pt``, else
    ``last.pt``) or a checkpoint file, saved as an absolute path; only the weights whose keys start with
    ``init_prefix`` (e.g. ``"encoder."``; "": all) are loaded, into the same keys, and they must match
    the new method's under that prefix one for one (:func:`metashot.init_from.init_weights`). A stage of
    a staged preset names an earlier stage as ``"stage:K"`` (:mod:`metashot.stages`). A resume never
    loads them: the run's own ``last.pt`` holds its weights.

    :meth:`override` changes a config as ``metashot train`` options change a preset; :meth:`replace`
    sets fields as given.
    """

    method: str = "protonet"
    method_args: dict[str, Any] = option({}, "the method's own arguments, e.g. {\"fce\": true}")
    task: str = option("omniglot", "task source: omniglot, folder, sinusoid, omniglot-sequences, "
                                 "miniimagenet, tieredimagenet, cifar-fs, fc100, cub")
    task_args: dict[str, Any] = option({}, "the task source's arguments, e.g. {\"split\": \"official\"}")
    data_dir: str | None = option(None, "dataset folder; default: $METASHOT_DATA, else ~/.cache/metashot")
    ways: int = option(5, "classes per test episode")
    shots: int = option(1, "support examples per class (training too)")
    queries: int = option(15, "query examples per class at test")
    train_ways: int | None = option(None, "classes per training episode; default: --ways")
    train_shots: int | None = option(None, "support examples per class in training; default: --shots")
    train_queries: int | None = option(None, "queries per class in training; default: --queries")
    meta_batch: int = option(1, "episodes per optimizer step, over all processes")
    batch_size: int = option(64, "examples per optimizer step, over all processes, for methods "
                             "trained on plain labelled examples (baseline, rfs, simpleshot)")
    steps: int = option(20_000, "training length in optimizer steps: one episode each for protonet "
                        "and matching, one meta-batch of --meta-batch episodes for maml, mann and lstm",
                        aliases=("--max-episodes",))
    max_minutes: float | None = option(None, "stop after this many minutes of training (validation "
                                       "excluded); default: no limit")
    backbone: str | None = option(None, "network: conv4, conv4-strided, resnet12, mlp or "
                                  "package.module:factory; default: the method's paper's")
    backbone_args: dict[str, Any] = option({}, "the backbone's arguments, e.g. {\"drop_rate\": 0.1}")
    init_from: str | None = option(None, "start from another run's weights: its folder (best.pt, else "
                                   "last.pt) or a checkpoint file; in a staged preset, stage:K is stage K's "
                                   "folder; default: the method's own initialisation")
    init_prefix: str = option("", "with --init-from, load only the weights whose keys start with this, such "
                              "as encoder. (all: \"\"); they must match the new network's one for one")
    optimizer: str = option("adam", "adam, adamw, sgd or rmsprop (torch's)")
    optimizer_args: dict[str, Any] = option({}, "the optimizer's other arguments, e.g. "
                                            "{\"momentum\": 0.9, \"nesterov\": true}")
    lr: float = option(1e-3, "learning rate (after warm-up, before the schedule)")
    weight_decay: float | None = option(None, "the optimizer's weight decay; default: the optimizer's own "
                                        "(0, AdamW's 0.01)")
    schedule: str = option("step", "learning-rate schedule: step, cosine or constant")
    warmup: int = option(0, "steps of linear learning-rate warm-up before the schedule")
    lr_step: int = option(2_000, "steps between the step schedule's decays")
    lr_gamma: float = option(0.5, "the step and multistep schedules' factor")
    lr_milestones: list[int] = option([], "the multistep schedule's steps, e.g. [36000, 48000]: times "
                                      "--lr-gamma at each")
    lr_min: float = option(0.0, "the cosine schedule's final learning rate")
    val_every: int = option(500, "steps between validations and checkpoints")
    val_episodes: int = option(200, "validation episodes")
    test_episodes: int = option(1_000, "test episodes (the papers': 1000, MAML 600)")
    seed: int = option(0, "seed of the initialisation and the episodes")
    split_seed: int | None = option(0, "seed of the split of classes into train, validation and test")
    device: str = option("auto", "auto (this rank's GPU, else MPS, else CPU), cpu, cuda, cuda:1 or mps")
    precision: str = option("fp32", "fp32; tf32 (fp32 with TF32 matmuls and convolutions on CUDA); bf16 "
                            "(bfloat16 autocast of the forward and loss; second-order MAML stays fp32); "
                            "bf16-all (second-order MAML too: its double backward in bfloat16 is unsafe)")
    deterministic: bool = option(False, "deterministic CUDA kernels (torch.use_deterministic_algorithms, "
                                 "cuBLAS workspace, cuDNN): what a bit-for-bit resume on a GPU needs")
    data_on_device: bool = option(False, "keep the task's images on the training device and gather episodes "
                                  "there (small datasets: Omniglot's 25 MB as uint8); the episode indices "
                                  "are still drawn on the CPU by the same sampler, so the episodes are the "
                                  "same")
    preset: str | None = None

    def __post_init__(self) -> None:
        self.train_ways = self.train_ways or self.ways
        self.train_shots = self.train_shots or self.shots
        self.train_queries = self.train_queries if self.train_queries is not None else self.queries

    @property
    def class_split_seed(self) -> int:
        """The seed of the split of classes: ``split_seed``, else ``seed``."""
        return self.seed if self.split_seed is None else self.split_seed

    def per_step(self, kind: str) -> int:
        """The items of one optimizer step for a method trained on ``kind`` batches (of
        :data:`metashot.batches.BATCH_KINDS`): ``batch_size`` examples, else ``meta_batch`` episodes."""
        return self.batch_size if kind == "examples" else self.meta_batch

    def replace(self, **changes: Any) -> Config:
        """The fields ``changes`` set as given (:meth:`override` applies them as the command line does)."""
        return dataclasses.replace(self, **changes)

    def override(self, **changes: Any) -> Config:
        """This config with ``changes`` applied as ``metashot train --preset`` applies its options, validated.

        A dict (``method_args``, ``task_args``, ``backbone_args``, ``optimizer_args``) updates this
        config's; another ``optimizer`` or ``backbone`` than this config's starts from no arguments (this
        config's are for its own) but those ``changes`` gives; ``shots`` sets ``train_shots`` too unless
        ``changes`` sets it (the papers train with the test shot).
        """
        names = [f.name for f in dataclasses.fields(self)]
        if unknown := sorted(set(changes) - set(names)):
            raise ConfigError(f"unknown config fields {unknown}; known: {', '.join(names)}")
        fields: dict[str, Any] = {f"{kind}_args": {} for kind in ("optimizer", "backbone")
                                  if changes.get(kind, getattr(self, kind)) != getattr(self, kind)}
        for key, value in changes.items():
            current = fields.get(key, getattr(self, key))
            fields[key] = current | value if isinstance(value, dict) and isinstance(current, dict) else value
        if "shots" in changes:
            fields.setdefault("train_shots", changes["shots"])
        return self.replace(**fields).validate()

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def validate(self) -> Config:
        """Raise :class:`ConfigError` naming the first value that cannot be used; return ``self``."""
        check_types(self.to_dict(), "config")
        check_args("method_args", self.method, self.method_args, method_arg_types(self.method))
        check_args("task_args", self.task, self.task_args, task_arg_types(self.task))
        at_least = {
            "ways": 1, "shots": 1, "queries": 0, "train_ways": 1, "train_shots": 1, "train_queries": 0,
            "meta_batch": 1, "batch_size": 1, "steps": 1, "lr_step": 1, "val_every": 1, "val_episodes": 1,
            "test_episodes": 1, "seed": 0, "split_seed": 0, "warmup": 0,
        }
        for name, low in at_least.items():
            if getattr(self, name) is not None and getattr(self, name) < low:
                raise ConfigError(f"{option_name(name)} must be at least {low}, got {getattr(self, name)}")
        for name in ("lr", "lr_gamma"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"{option_name(name)} must be a positive finite number, got {value}")
        if self.max_minutes is not None and not (math.isfinite(self.max_minutes) and self.max_minutes > 0):
            raise ConfigError(f"--max-minutes must be a positive number of minutes, got {self.max_minutes}")
        for name in ("weight_decay", "lr_min"):
            value = getattr(self, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{option_name(name)} must be a finite number >= 0, got {value}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        if self.schedule == "multistep" and (not self.lr_milestones or any(
                b <= a for a, b in zip([0, *self.lr_milestones], self.lr_milestones))):
            raise ConfigError(f"the multistep schedule needs increasing positive --lr-milestones, got "
                              f"{self.lr_milestones}")
        if self.schedule == "cosine" and self.lr_min >= self.lr:
            raise ConfigError(f"--lr-min ({self.lr_min:g}) must be below --lr ({self.lr:g}) to anneal to it")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        self.make_optimizer([torch.zeros(1, requires_grad=True)])
        self._check_init()
        return self

    def _check_init(self) -> None:
        if self.init_from is None:
            if self.init_prefix:
                raise ConfigError(f"--init-prefix {self.init_prefix} needs --init-from, the run to start "
                                  "from")
        elif not self.init_from.strip():
            raise ConfigError("--init-from must name a run folder or a checkpoint file, got \"\"")
        elif self.init_from.startswith("stage:") and stage_marker(self.init_from) is None:
            raise ConfigError(f"--init-from {self.init_from}: a stage is named stage:K with K >= 1, such as "
                              "stage:1")

    def make_optimizer(self, params: Any) -> torch.optim.Optimizer:
        """torch's optimizer :attr:`optimizer` over ``params``, else :class:`ConfigError` naming the
        argument torch refused."""
        kind = getattr(torch.optim, OPTIMIZERS[self.optimizer])
        try:
            decay = {} if self.weight_decay is None else {"weight_decay": self.weight_decay}
            return kind(params, lr=self.lr, **decay, **self.optimizer_args)
        except (TypeError, ValueError) as e:
            raise ConfigError(
                f"optimizer_args {json.dumps(self.optimizer_args)} do not fit {self.optimizer} ({e})"
            ) from None

    def make_scheduler(self, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
        """torch's schedule :attr:`schedule` of ``optimizer``, stepped once per optimizer step, after
        :attr:`warmup` steps of linear warm-up (factor (k + 1) / (warmup + 1) at step k)."""
        lr = torch.optim.lr_scheduler
        if self.schedule == "step":
            main: lr.LRScheduler = lr.StepLR(optimizer, self.lr_step, self.lr_gamma)
        elif self.schedule == "multistep":
            main = lr.MultiStepLR(optimizer, self.lr_milestones, self.lr_gamma)
        elif self.schedule == "cosine":
            main = lr.CosineAnnealingLR(optimizer, max(self.steps - self.warmup, 1), eta_min=self.lr_min)
        else:
            main = lr.LambdaLR(optimizer, lambda _: 1.0)
        if not self.warmup:
            return main
        warm = lr.LinearLR(optimizer, 1 / (self.warmup + 1), total_iters=self.warmup)
        return lr.SequentialLR(optimizer, [warm, main], milestones=[self.warmup])

    def save(self, path: Path) -> None:
        from metashot.io import atomic_write_text

        atomic_write_text(path, json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_dict(cls, data: Any, source: str = "config") -> Config:
        """A validated config from plain data, every field present (but :data:`ADDED_FIELDS`)."""
        if not isinstance(data, dict):
            raise ConfigError(f"{source}: expected a JSON object of config fields, got {type(data).__name__}")
        data = copy.deepcopy(ADDED_FIELDS) | data
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(data) - set(names))
        missing = [n for n in names if n not in data]
        if unknown:
            raise ConfigError(f"{source}: unknown config fields {unknown}; known: {', '.join(names)}")
        if missing:
            raise ConfigError(f"{source}: missing config fields {missing}")
        check_types(data, source)
        return cls(**data).validate()

    @classmethod
    def load(cls, path: Path) -> Config:
        """The config saved in ``path`` (a run's ``config.json``), checked."""
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such file; is {Path(path).parent} a run folder?") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        except OSError as e:
            raise ConfigError(f"{path}: cannot be read ({e.strerror})") from None
        return cls.from_dict(data, str(path))


def stage_marker(init_from: str | None) -> int | None:
    """K of an ``init_from`` "stage:K" (stage K of the same staged recipe), else None (a path, or none)."""
    found = STAGE_MARKER.fullmatch(init_from or "")
    return int(found.group(1)) if found else None


def option_name(name: str) -> str:
    """The command-line spelling of a config field, for messages."""
    return "--" + name.replace("_", "-")


def options() -> list[dataclasses.Field]:
    """The fields the command line sets by an option of their own (all but ``method`` and ``preset``)."""
    return [f for f in dataclasses.fields(Config) if "help" in f.metadata]


def field_types() -> dict[str, Any]:
    return typing.get_type_hints(Config)


def check_types(data: dict[str, Any], source: str) -> None:
    """Raise :class:`ConfigError` for the first field of ``data`` whose value has the wrong type."""
    hints = field_types()
    for name, value in data.items():
        if name in hints and not matches(value, hints[name]):
            raise ConfigError(
                f"{source}: {name} must be {type_name(hints[name])}, got {json.dumps(value)}"
            )
