"""The metashot command: train, evaluate, data, embed, fit, predict, presets, summarize, plot."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import types
import typing
from pathlib import Path
from typing import Any, NoReturn

from metashot import cli_embed, cli_predict, presets
from metashot.cli_train import config_from_args as config_from_args  # the API of `metashot train`'s options
from metashot.cli_train import seed_list, train, train_seeds
from metashot.config import field_types, option_name, options
from metashot.errors import ConfigError, MetashotError
from metashot.evaluate import Result, SeedSummary
from metashot.methods import HEADS, METHODS
from metashot.process import StopSignals
from metashot.stages import stage_folder


class _Parser(argparse.ArgumentParser):
    """argparse with the one-line error format of every other metashot error."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"metashot: error: {message} (see `{self.prog} --help`)\n")


def _train_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="meta-train a method, then test it",
        description="Meta-train METHOD with a preset's recipe (options override it), then print "
        "the test accuracy with its 95% CI. Options left out take the preset's value (see "
        "`metashot presets`).",
        epilog="Distributed: `torchrun --nproc-per-node=N -m metashot train METHOD ...` trains on N "
        "processes (gloo on CPU, nccl on CUDA, each rank on its local GPU); across machines add torchrun's "
        "--nnodes=M --node-rank=I --master-addr=HOST --master-port=PORT, or --rdzv-backend=c10d "
        "--rdzv-endpoint=HOST:PORT. --meta-batch stays the global number of episodes per step and must "
        "divide by the number of processes; the result is the single process's. With torchrun "
        "--max-restarts=K a failed group resumes from last.pt on its own.",
    )
    p.add_argument("method", nargs="?", choices=sorted(METHODS),
                   help="the method to train; may be left out with --preset or --resume")
    p.add_argument("--preset", help="a named recipe (see `metashot presets`); default: the method's "
                   "5-way 1-shot Omniglot preset. A staged preset trains its stages in order into "
                   "RUN_DIR/stage1, RUN_DIR/stage2, ...; the options apply to every stage, --max-minutes "
                   "to them all (shared as the preset says), --resume goes on from the stage it stopped in")
    p.add_argument("--stage", action="append", default=[], metavar="K:KEY=JSON",
                   help="a config field of stage K of a staged preset only, as --set, after the options "
                   "for every stage, e.g. --stage 2:steps=300 --stage 1:lr=0.1")
    _config_options(p)
    p.add_argument("--seeds", type=seed_list, metavar="S,S,...",
                   help="train one run per seed, one after another (into RUN_DIR/seedS with --run-dir), "
                   "then print the mean and spread over them")
    p.add_argument("--run-dir", type=Path, help="run folder; default: runs/PRESET-seedS")
    p.add_argument("--set", action="append", default=[], metavar="KEY=JSON",
                   help="any config field, e.g. --set method_args='{\"fce\": true}' (a dict updates the "
                   "preset's; a string field takes a bare word: --set schedule=cosine)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --run-dir from its last.pt, as configured; options given "
                   "may change only its length, time limit, device, data folder, test episodes and "
                   "--data-on-device")
    _trust_code_option(p)
    p.add_argument("--json", action="store_true", help="print the test result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--log", type=lambda text: text.split(","), default=["csv"], metavar="NAME,...",
                   help="where the metrics rows go: csv (RUN_DIR/metrics.csv, always written) and "
                   "tensorboard (RUN_DIR/tensorboard/, with the learning rate and steps/s; needs "
                   "`pip install \"metashot[tensorboard]\"`), e.g. --log csv,tensorboard")


def _config_options(p: argparse.ArgumentParser) -> None:
    """One option per config field, named, typed and explained by the field itself."""
    hints = field_types()
    for f in options():
        hint = hints[f.name]
        kinds = typing.get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
        kind = next(typing.get_origin(k) or k for k in kinds if k is not type(None))
        if kind is bool:  # --deterministic / --no-deterministic; None: as the preset says
            p.add_argument(option_name(f.name), dest=f.name, action=argparse.BooleanOptionalAction,
                           help=f.metadata["help"])
            continue
        p.add_argument(option_name(f.name), *f.metadata["aliases"], dest=f.name,
                       type=_JSON.get(kind, kind), metavar="JSON" if kind in _JSON else None,
                       help=f.metadata["help"])


def _trust_code_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-code", action="store_true",
                   help="let the run folder's config.json choose the code to run: a backbone factory "
                   "(package.module:factory) it names is imported only with this option or the same "
                   "--backbone")


def _json_object(text: str) -> dict[str, Any]:
    return _json(text, dict, "a JSON object such as '{\"key\": 1}'")


def _json_list(text: str) -> list[Any]:
    return _json(text, list, "a JSON list such as '[100, 200]'")


def _json(text: str, kind: type, example: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = None
    if not isinstance(value, kind):
        raise argparse.ArgumentTypeError(f"expected {example}, got {text!r}")
    return value


_JSON: dict[type, Any] = {dict: _json_object, list: _json_list}


def _evaluate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate",
        help="evaluate a finished or interrupted run",
        description="Evaluate RUN_DIR's best checkpoint (else its last) on the test classes; a staged "
        "run's last stage.",
    )
    p.add_argument("run_dir", type=Path, nargs="?", help="the run folder (none with --features)")
    cli_embed.add_evaluate_options(p)
    p.add_argument("--test-episodes", type=int, help="test episodes; default: the run's (with --features: "
                   "1000)")
    p.add_argument("--ways", type=int, help="classes per test episode; default: the run's")
    p.add_argument("--shots", type=int, help="support examples per class; default: the run's")
    p.add_argument("--checkpoint", default="best.pt", help="checkpoint in the run folder; default: best.pt")
    p.add_argument("--device", help="device; default: the run's")
    p.add_argument("--backbone", help="the run's own backbone factory (package.module:factory), allowed "
                   "to run as its config.json names it")
    _trust_code_option(p)
    p.add_argument("--head", help="test the run's encoder with this head instead of its own, into "
                   f"result-head-HEAD.json: {', '.join(sorted(HEADS))}")
    p.add_argument("--head-args", type=_json_object, metavar="JSON", help="the head's arguments, e.g. "
                   "'{\"distance\": \"cosine\"}'")
    p.add_argument("--json", action="store_true", help="print the result as one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _data_parser(sub: argparse._SubParsersAction) -> None:
    from metashot.data.tasks import TASKS

    p = sub.add_parser(
        "data", help="check a dataset folder and report what it holds",
        description="Detect DIR's layout of the --task dataset, read it (building the decode-once cache on "
        "first use) and report each part's classes and images, the image shape and any problem; a problem "
        "is one line and exit status 2.")
    p.add_argument("data_dir", type=Path, help="the dataset folder")
    p.add_argument("--task", required=True, choices=sorted(TASKS), help="the dataset")
    p.add_argument("--task-args", type=_json_object, default={}, metavar="JSON",
                   help="the task's arguments, e.g. '{\"layout\": \"csv\"}' or '{\"split\": \"feat\"}'")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object")


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="metashot", description="Meta-learning: train, evaluate, classify own images, plot.")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    _train_parser(sub)
    _evaluate_parser(sub)
    _data_parser(sub)
    cli_embed.add_parsers(sub)
    cli_predict.add_parsers(sub)
    pp = sub.add_parser("presets", help="list the presets, or print one's config",
                        description="List the presets; with NAME, print that preset's whole config as JSON "
                        "(a staged preset's: the list of its stages' configs).")
    pp.add_argument("name", nargs="?", help="a preset to print")
    su = sub.add_parser("summarize", help="mean and spread over seeds of tested runs of one recipe",
                        description="Each run's test result and, per metric, the mean over the runs with "
                        "the sample standard deviation across seeds. The runs must differ only in --seed.")
    su.add_argument("run_dirs", type=Path, nargs="+", help="run folders with a result.json")
    su.add_argument("--json", action="store_true", help="print the summary as one JSON object")
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
    ps.add_argument("--device", default="auto", help="where the model runs: auto (a GPU if there is one, "
                    "else MPS, else the CPU), cpu, cuda, cuda:N or mps")
    _trust_code_option(ps)
    pi = sub.add_parser("plot-instances", help="test accuracy by instance (MANN/LSTM), one line per run",
                        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    pi.add_argument("results", type=Path, nargs="+", help="run folders or result.json files")
    pi.add_argument("--names", nargs="+", help="legend names, one per run (default: folder names)")
    pi.add_argument("--out", type=Path, default=Path("instances.png"), help="PNG to write")
    return p


def _positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if (value := getattr(args, name)) is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    # SIGINT and SIGTERM stop any command alike (exit 130, 143); signals are handled in the main thread only
    in_main_thread = threading.current_thread() is threading.main_thread()
    try:
        with StopSignals() if in_main_thread else contextlib.nullcontext():
            return _run(args)
    except MetashotError as e:
        if args.debug:
            raise
        print(f"metashot: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # a signal outside a training step (Interrupted)
        if args.debug:
            raise
        signum = getattr(e, "signum", signal.SIGINT)
        print(f"metashot: stopped by {signal.Signals(signum).name}", file=sys.stderr)
        return 128 + signum


def _presets(args: argparse.Namespace) -> int:
    if args.name is None:
        print(presets.table())
    elif presets.is_staged(args.name):
        print(json.dumps([c.to_dict() for c in presets.stages(args.name).configs], indent=2))
    else:
        print(json.dumps(presets.get(args.name).to_dict(), indent=2))
    return 0


def _summarize(args: argparse.Namespace) -> int:
    from metashot.runs import summarize_runs

    _print(summarize_runs(args.run_dirs), args.json)
    return 0


def _plot(args: argparse.Namespace) -> int:
    from metashot.plot import plot_runs

    plot_runs([stage_folder(r) for r in args.run_dirs], args.out)
    print(args.out)
    return 0


def _plot_sinusoid(args: argparse.Namespace) -> int:
    from metashot.plot import plot_sinusoid

    plot_sinusoid(stage_folder(args.run_dir), args.out, args.episode, args.shots, tuple(args.steps),
                  trust_code=args.trust_code, device=args.device)
    print(args.out)
    return 0


def _plot_instances(args: argparse.Namespace) -> int:
    from metashot.plot import instance_table, plot_instances

    results = [stage_folder(r) for r in args.results]
    plot_instances(results, args.out, args.names)
    print(instance_table(results, args.names))
    print(args.out)
    return 0


def _train_command(args: argparse.Namespace) -> int:
    if args.seeds is not None:
        code, result = train_seeds(args)
    else:
        code, result, _ = train(args)
    if result is not None:
        _print(result, args.json)
    return code


def _evaluate(args: argparse.Namespace) -> int:
    from metashot.runs import evaluate_run

    if args.features is not None:
        return cli_embed.evaluate_features(args)
    if args.run_dir is None:
        raise ConfigError("evaluate needs a run folder, or --features CACHE")
    if given := [f"--{k}" for k in ("queries", "seed") if getattr(args, k) is not None]:
        verb = "go" if len(given) > 1 else "goes"
        raise ConfigError(f"{' and '.join(given)} {verb} with --features; a run is tested with its own")
    _positive(args, "test_episodes", "ways", "shots")
    result = evaluate_run(args.run_dir, args.test_episodes, args.checkpoint, args.device,
                          not args.no_progress, args.ways, args.shots, args.trust_code, args.backbone,
                          args.head, args.head_args)
    if args.head is None:
        _print(result, args.json)
    elif args.json:
        print(json.dumps({**result.to_dict(), "head": args.head, "head_args": args.head_args or {}}))
    else:
        print(f"{result.table()}\n{result.summary()}, with the {args.head} head")
    return 0


def _data(args: argparse.Namespace) -> int:
    from metashot.data.report import check_folder, report_text

    report = check_folder(args.task, args.task_args, args.data_dir)
    print(json.dumps(report) if args.json else report_text(report))
    return 0


COMMANDS = {"train": _train_command, "evaluate": _evaluate, "data": _data, "presets": _presets,
            "summarize": _summarize, "plot": _plot, "plot-sinusoid": _plot_sinusoid,
            "plot-instances": _plot_instances, **cli_embed.COMMANDS, **cli_predict.COMMANDS}


def _run(args: argparse.Namespace) -> int:
    from metashot.devices import numerics

    with numerics():  # true float32 for embed, fit and predict too; a run's commands state their own
        return COMMANDS[args.command](args)


def _print(result: Result | SeedSummary, as_json: bool) -> None:
    """A test result or a summary over seeds: one JSON object, or its table and summary line."""
    print(result.to_json() if as_json else result.table() + "\n" + result.summary())


if __name__ == "__main__":
    sys.exit(main())
