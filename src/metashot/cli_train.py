"""``metashot train`` after its options are parsed: the config (or staged recipe) they make of a preset,
and the run, the staged run (:mod:`metashot.stages`) or the runs over seeds they train.
:mod:`metashot.cli` parses the command line and prints."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from metashot import presets
from metashot.config import Config, check_types, field_types, options
from metashot.errors import ConfigError
from metashot.evaluate import Result, SeedSummary
from metashot.stages import Stages, is_staged_run, load_recipe, with_changes


def parse_set(item: str, option: str = "--set") -> tuple[str, Any]:
    """``KEY=JSON`` of ``--set``: a known field and a value of its type (a bare word for a string field)."""
    key, eq, text = item.partition("=")
    hints = field_types()
    if not eq or key not in hints:
        raise ConfigError(f"{option} {item}: expected KEY=JSON with KEY a config field ({', '.join(hints)})")
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        if not _takes_string(hints[key]):
            raise ConfigError(f"{option} {item}: {text!r} is not JSON (numbers as 0.1, dicts as "
                              f"'{{\"key\": 1}}', strings in double quotes)") from None
        value = text
    check_types({key: value}, option)
    return key, value


def _takes_string(kind: Any) -> bool:
    return kind is str or str in getattr(kind, "__args__", ())


def _merged(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """Fields set in order: the last of one given twice, a dict field's dicts merged in order; paths made
    absolute, as a run folder's config names its data and its start wherever it is read."""
    changes: dict[str, Any] = {}
    for key, value in pairs:
        merge = isinstance(value, dict) and isinstance(changes.get(key), dict)
        changes[key] = changes[key] | value if merge else value
    for key in ("data_dir", "init_from"):
        path = changes.get(key)
        if isinstance(path, str) and path.strip() and not (key == "init_from" and path.startswith("stage:")):
            changes[key] = os.path.abspath(Path(path).expanduser())
    return changes


def _changes(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields the command line sets explicitly (a dict field given by its option and by
    ``--set``s, those merged in order); :meth:`Config.override` applies them."""
    given = [(f.name, v) for f in options() if (v := getattr(args, f.name)) is not None]
    return _merged(given + [parse_set(item) for item in args.set])


def stage_changes(items: list[str]) -> dict[int, dict[str, Any]]:
    """``--stage K:KEY=JSON`` items: per stage K, the fields they set, merged in order."""
    pairs: dict[int, list[tuple[str, Any]]] = {}
    for item in items:
        k, colon, rest = item.partition(":")
        if not (colon and k.isdecimal() and int(k) >= 1):
            raise ConfigError(f"--stage {item}: expected K:KEY=JSON with K a stage number, such as "
                              "--stage 2:steps=300")
        pairs.setdefault(int(k), []).append(parse_set(rest, f"--stage {k}:"))
    return {k: _merged(p) for k, p in pairs.items()}


def config_from_args(args: argparse.Namespace) -> Config:
    """The preset (or, with ``--resume``, the run's saved config) with the options given applied."""
    from metashot.runs import RunFolder, resume_config

    if args.stage:
        raise ConfigError(f"--stage {args.stage[0]}: --stage sets a field of one stage of a staged preset; "
                          "this run is one stage (see `metashot presets`)")
    if args.resume:
        saved = RunFolder(run_dir(args, None)).load_config(args.trust_code, args.backbone)
        # the run's own preset is allowed: torchrun restarts a group with its first command line
        if args.preset is not None and args.preset != saved.preset:
            raise ConfigError(f"--resume continues the run's own recipe ({saved.preset}); drop --preset")
        return resume_config(saved, saved.override(**_changes(args)).to_dict())
    if args.method is None and args.preset is None:
        raise ConfigError("give the METHOD to train, or a --preset (see `metashot presets`)")
    name = args.preset or presets.default_preset(args.method, args.task)
    cfg = presets.get(name) if name else Config(method=args.method)
    if args.method is not None and cfg.method != args.method:
        raise ConfigError(f"preset {name!r} is for {cfg.method}, not {args.method}")
    return cfg.override(**_changes(args))


def recipe_from_args(args: argparse.Namespace) -> Stages:
    """The staged preset (or, with ``--resume``, the staged run's saved recipe) with the options given
    applied: to every stage, ``--stage K:...`` to stage K, ``--max-minutes`` shared."""
    if args.resume:
        saved = load_recipe(run_dir(args, None), args.trust_code, args.backbone)
        if args.preset is not None and args.preset != saved.preset:
            raise ConfigError(f"--resume continues the run's own recipe ({saved.preset}); drop --preset")
        recipe = with_changes(saved, _changes(args), stage_changes(args.stage), resume=True)
    else:
        name = args.preset or presets.default_preset(args.method, args.task)
        recipe = with_changes(presets.stages(name), _changes(args), stage_changes(args.stage))
    methods = [c.method for c in recipe.configs]
    if args.method is not None and args.method != methods[-1]:
        raise ConfigError(f"preset {recipe.preset!r} trains {' then '.join(methods)}: its METHOD is "
                          f"{methods[-1]}, the last stage's, or leave METHOD out")
    return recipe


def _staged(args: argparse.Namespace) -> bool:
    """Whether the command trains a staged recipe: a staged preset's, or a staged run's on resume."""
    if args.resume and args.run_dir is not None and is_staged_run(args.run_dir):
        return True
    name = args.preset or (presets.default_preset(args.method, args.task) if args.method else None)
    return name is not None and presets.is_staged(name)


def run_dir(args: argparse.Namespace, cfg: Config | None) -> Path:
    if args.run_dir is not None:
        return args.run_dir
    if cfg is None:
        raise ConfigError("--resume needs --run-dir, the run folder to continue")
    return Path("runs") / f"{cfg.preset or cfg.method}-seed{cfg.seed}"


def train(args: argparse.Namespace) -> tuple[int, Result | None, Path]:
    """Train and test one run, or the stages of a staged one: the exit status, the result where this
    process prints it, and the run folder."""
    from metashot.process import keep_freed_memory
    from metashot.runs import STAGES_FILE, RunFolder
    from metashot.stages import StagedRun
    from metashot.train import Trainer

    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")) > 0 and args.run_dir is not None:
        # torchrun restarted the group after a failure: continue the run from its last checkpoint
        args.resume = RunFolder(args.run_dir).exists() or is_staged_run(args.run_dir)
    staged = _staged(args)
    if args.resume and args.run_dir is not None and RunFolder(args.run_dir).unstarted():
        print(f"metashot: {args.run_dir} has no {STAGES_FILE if staged else 'config.json'} (stopped before "
              "its first save); starting it afresh with this command's config", file=sys.stderr)
        args.resume = False
    if staged:
        recipe = recipe_from_args(args)
        folder = run_dir(args, recipe.configs[-1])
        run: Trainer | StagedRun = StagedRun(recipe, folder, args.resume, not args.no_progress, args.log)
    else:
        cfg = config_from_args(args)
        folder = run_dir(args, cfg)
        run = Trainer(cfg, folder, resume=args.resume, progress=not args.no_progress, log=args.log)
    keep_freed_memory()
    run.fit()
    if not run.finished:
        return 128 + (run.stopped_by or 0), None, folder
    result = run.test()
    run.world.close()
    return 0, result if run.world.writer else None, folder


def train_seeds(args: argparse.Namespace) -> tuple[int, SeedSummary | None]:
    """``--seeds``: one run per seed, one after another, then their summary."""
    from metashot.runs import summarize_runs

    if args.seed is not None:
        raise ConfigError("give --seed or --seeds, not both")
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ConfigError("--seeds runs the seeds one after another in one process; under torchrun, "
                          "start one run per --seed and `metashot summarize` their folders")
    run_dirs = []
    for seed in args.seeds:
        one = argparse.Namespace(**{**vars(args), "seed": seed,
                                    "run_dir": args.run_dir / f"seed{seed}" if args.run_dir else None})
        code, result, folder = train(one)
        if result is None:
            return code, None
        print(f"metashot: seed {seed}: {result.summary()}", file=sys.stderr, flush=True)
        run_dirs.append(folder)
    return 0, summarize_runs(run_dirs)


def seed_list(text: str) -> list[int]:
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seeds separated by commas (0,1,2): {text!r}") from None
    if len(set(seeds)) < len(seeds) or min(seeds) < 0:
        raise argparse.ArgumentTypeError(f"expected distinct seeds >= 0, got {text!r}")
    return seeds
