"""The metashot command: train, evaluate, presets, plot."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from metashot import presets
from metashot.config import Config
from metashot.methods import METHODS


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="meta-train a method, then test it",
        description="Meta-train METHOD with a preset's recipe (options override it), then print "
        "the test accuracy with its 95%% CI.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("method", choices=sorted(METHODS), help="the method to train")
    p.add_argument("--preset", help="a named recipe (see `metashot presets`); default: the method's "
                   "5-way 1-shot Omniglot preset")
    p.add_argument("--task", help="task source: omniglot, folder, ... (default: the preset's)")
    p.add_argument("--ways", type=int, help="classes per test episode (default: the preset's)")
    p.add_argument("--shots", type=int, help="support examples per class (default: the preset's)")
    p.add_argument("--queries", type=int, help="query examples per class at test (default: the preset's)")
    p.add_argument("--train-ways", type=int, help="classes per training episode (default: the preset's)")
    p.add_argument("--train-queries", type=int, help="queries per class in training (default: the preset's)")
    p.add_argument("--meta-batch", type=int, help="episodes per optimizer step (default: the preset's)")
    p.add_argument("--max-episodes", type=int, dest="steps",
                   help="training steps: episodes, or meta-batches of episodes (default: the preset's)")
    p.add_argument("--max-minutes", type=float,
                   help="stop training after this many minutes of training (default: no limit)")
    p.add_argument("--lr", type=float, help="Adam learning rate (default: the preset's)")
    p.add_argument("--val-every", type=int,
                   help="steps between validations and checkpoints (default: the preset's)")
    p.add_argument("--test-episodes", type=int,
                   help="test episodes (default: the preset's, 1000 for the papers')")
    p.add_argument("--run-dir", type=Path, help="run folder (default: runs/PRESET-seedS)")
    p.add_argument("--data-dir", help="dataset folder (default: $METASHOT_DATA, else ~/.cache/metashot)")
    p.add_argument("--seed", type=int, help="seed of the split, initialisation and episodes (default: 0)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="any config field, e.g. --set method_args='{\"distance\": \"cosine\"}' "
                        "(a dict updates the preset's)")
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir from last.pt")
    p.add_argument("--json", action="store_true", help="print the test result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a finished or interrupted run",
        description="Evaluate RUN_DIR's best checkpoint (else its last) on the test classes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("run_dir", type=Path, help="the run folder")
    p.add_argument("--test-episodes", type=int, help="test episodes (default: the run's)")
    p.add_argument("--ways", type=int, help="classes per test episode (default: the run's)")
    p.add_argument("--shots", type=int, help="support examples per class (default: the run's)")
    p.add_argument("--checkpoint", default="best.pt", help="checkpoint file in the run folder")
    p.add_argument("--device", help="device (default: the run's)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="metashot", description="Meta-learning: train, evaluate, plot.")
    sub = p.add_subparsers(dest="command", required=True)
    _train_parser(sub)
    _evaluate_parser(sub)
    sub.add_parser("presets", help="list the presets")
    pl = sub.add_parser("plot", help="plot runs' validation curves against minutes",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pl.add_argument("run_dirs", type=Path, nargs="+", help="run folders")
    pl.add_argument("--out", type=Path, default=Path("curves.png"), help="PNG to write")
    ps = sub.add_parser("plot-sinusoid", help="the MAML paper's sinusoid figure for a maml-sinusoid run",
                        description="Draw a test task's true function, its K points, and the model's "
                        "prediction before and after the given inner steps.",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ps.add_argument("run_dir", type=Path, help="a maml run on the sinusoid task")
    ps.add_argument("--out", type=Path, default=Path("sinusoid.png"), help="PNG to write")
    ps.add_argument("--episode", type=int, default=0, help="which test task")
    ps.add_argument("--shots", type=int, help="K support points (default: the run's test shots)")
    ps.add_argument("--steps", type=int, nargs="+", default=[1, 10], help="inner steps to draw")
    pi = sub.add_parser("plot-instances", help="test accuracy by instance (MANN/LSTM), one line per run",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pi.add_argument("results", type=Path, nargs="+", help="run folders or result.json files")
    pi.add_argument("--names", nargs="+", help="legend names, one per run (default: folder names)")
    pi.add_argument("--out", type=Path, default=Path("instances.png"), help="PNG to write")
    return p


def config_from_args(args: argparse.Namespace) -> Config:
    name = args.preset or presets.default_preset(args.method, args.task)
    cfg = presets.get(name) if name else Config(method=args.method)
    if cfg.method != args.method:
        raise SystemExit(f"preset {name!r} is for {cfg.method}, not {args.method}")
    changes = {
        k: v
        for k in ("task", "ways", "shots", "queries", "train_ways", "train_queries", "meta_batch",
                  "steps", "max_minutes", "lr", "val_every", "test_episodes", "data_dir", "seed", "device")
        if (v := getattr(args, k)) is not None
    }
    for item in args.set:
        key, _, value = item.partition("=")
        try:
            changes[key] = json.loads(value)
        except json.JSONDecodeError:
            changes[key] = value
        # a dict (method_args, task_args) updates the preset's: --set method_args='{"fce": true}' keeps
        # the preset's other method arguments
        if isinstance(changes[key], dict) and isinstance(current := getattr(cfg, key, None), dict):
            changes[key] = current | changes[key]
    # a changed test shot changes the training shot too (the papers train with the test shot)
    if "shots" in changes:
        changes.setdefault("train_shots", changes["shots"])
    try:
        return cfg.replace(**changes)
    except TypeError as e:
        raise SystemExit(f"bad --set: {e}") from e


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.command == "presets":
        for name, cfg in sorted(presets.PRESETS.items()):
            print(f"{name:30} {presets.describe(cfg)}")
        return 0
    if args.command == "plot":
        from metashot.plot import plot_runs

        plot_runs(args.run_dirs, args.out)
        print(args.out)
        return 0
    if args.command == "plot-sinusoid":
        from metashot.plot import plot_sinusoid

        plot_sinusoid(args.run_dir, args.out, args.episode, args.shots, tuple(args.steps))
        print(args.out)
        return 0
    if args.command == "plot-instances":
        from metashot.plot import instance_table, plot_instances

        plot_instances(args.results, args.out, args.names)
        print(instance_table(args.results, args.names))
        print(args.out)
        return 0

    from metashot.train import Trainer, evaluate_run

    if args.command == "train":
        cfg = config_from_args(args)
        run_dir = args.run_dir or Path("runs") / f"{cfg.preset or cfg.method}-seed{cfg.seed}"
        trainer = Trainer(cfg, run_dir, resume=args.resume, progress=not args.no_progress)
        trainer.fit()
        result = trainer.test()
    else:
        result = evaluate_run(args.run_dir, args.test_episodes, args.checkpoint, args.device,
                          not args.no_progress, args.ways, args.shots)
    print(result.to_json() if args.json else result.table() + "\n" + result.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
