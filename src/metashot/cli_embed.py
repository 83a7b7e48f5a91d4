"""`metashot embed`, and `metashot evaluate --features`: a frozen backbone's features, cached once."""

from __future__ import annotations

import argparse
import hashlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metashot.config import Config
from metashot.data.download import user_cache_dir
from metashot.data.sources import PARTS, FewShotSource
from metashot.devices import check_device
from metashot.errors import ConfigError, MetashotError


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``embed``'s parser to the metashot command's sub-parsers."""
    from metashot.cli import _json_object  # loaded: it is the command that calls this
    from metashot.data.tasks import TASKS

    p = sub.add_parser(
        "embed", help="cache a frozen backbone's features of a dataset part",
        description="Run BACKBONE (eval mode, no gradients, batched on the device) once over every image of "
        "a dataset part, as its test episodes hand them to a method, into a feature cache keyed by the "
        "backbone, the task, its arguments and the data; a cache there of the same key is kept, a stale one "
        "rebuilt. `metashot evaluate --features CACHE --head NAME` then scores test episodes on it.")
    p.add_argument("--backbone", help="the network: hf:ORG/NAME, hf:/folder, timm:NAME, conv4, resnet12, ... "
                   "(metashot's own start from fixed random weights, seed 0), or package.module:factory")
    p.add_argument("--backbone-args", type=_json_object, default={}, metavar="JSON",
                   help="the backbone's arguments, e.g. '{\"freeze\": true}'")
    p.add_argument("--task", choices=sorted(TASKS), help="the dataset (with --backbone)")
    p.add_argument("--data-dir", help="the dataset folder; default: $METASHOT_DATA, else ~/.cache/metashot "
                   "(with --from-run: the run's)")
    p.add_argument("--task-args", type=_json_object, default={}, metavar="JSON",
                   help="the task's arguments, e.g. '{\"image_size\": 84}'")
    p.add_argument("--part", choices=PARTS, default="test", help="which part's images; default: test")
    p.add_argument("--from-run", type=Path, metavar="RUN",
                   help="embed with a trained run's encoder, on that run's task (instead of --backbone)")
    p.add_argument("--trust-code", action="store_true",
                   help="with --from-run: let its config.json import the backbone factory it names")
    p.add_argument("--out", type=Path, metavar="CACHE",
                   help="the cache file; default: one in ~/.cache/metashot/features named by its key")
    p.add_argument("--batch-size", type=int, default=256, help="images per backbone call; default: 256")
    p.add_argument("--device", default="auto", help="auto (a GPU, else MPS, else CPU), cpu, cuda, cuda:N")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_evaluate_options(p: argparse.ArgumentParser) -> None:
    """Add ``--features`` and what goes with it to ``metashot evaluate``'s parser."""
    p.add_argument("--features", type=Path, metavar="CACHE",
                   help="score test episodes on a feature cache of `metashot embed` with --head (no run "
                   "folder): episode i holds the images of the task's test episode i for the same --seed")
    p.add_argument("--queries", type=int, help="with --features: queries per class; default: 15")
    p.add_argument("--seed", type=int, help="with --features: the episodes' seed; default: 0")


def _source(cfg: Config) -> FewShotSource:
    """The task source of ``cfg``, serving images; its problems as one-line errors."""
    from metashot.data.tasks import build_source

    try:
        source = build_source(cfg.validate())
    except MetashotError:
        raise
    except ValueError as e:
        raise ConfigError(f"{cfg.task}: {e}") from None
    if not isinstance(source, FewShotSource):
        raise source.no_images()
    return source


def _from_run(args: argparse.Namespace) -> tuple[nn.Module, FewShotSource]:
    """The encoder of the run ``args.from_run`` and its task's source (on ``args.data_dir`` if given)."""
    from metashot.methods.heads import HeadMethod
    from metashot.runs import RunFolder
    from metashot.stages import stage_folder

    options = {"--backbone": args.backbone, "--backbone-args": args.backbone_args, "--task": args.task,
               "--task-args": args.task_args}
    given = [name for name, value in options.items() if value]
    if given:
        raise ConfigError(f"--from-run embeds with the run's encoder on the run's task; leave out {given[0]}")
    folder = RunFolder(stage_folder(args.from_run), writer=False)
    cfg = folder.load_config(args.trust_code)
    device = str(check_device(args.device))
    cfg = cfg.replace(device=device, **({"data_dir": args.data_dir} if args.data_dir else {}))
    source, method = folder.method(cfg.validate())
    if not isinstance(method, HeadMethod):
        raise ConfigError(f"{args.from_run}: a {cfg.method} run has no encoder of images to embed with "
                          "(an encoder and a head: protonet, baseline, simpleshot, ...)")
    if not isinstance(source, FewShotSource):
        raise source.no_images()
    return method.encoder, source


def _backbone(args: argparse.Namespace) -> tuple[nn.Module, FewShotSource]:
    """The backbone ``--backbone`` (seeded) and the source of ``--task``."""
    from metashot.nn.backbones import make_backbone

    if args.backbone is None or args.task is None:
        raise ConfigError("embed needs --backbone and --task (or --from-run RUN)")
    # one image per class is all a part needs to be read whole; the episode shape is evaluate's
    source = _source(Config(task=args.task, task_args=args.task_args, data_dir=args.data_dir,
                            backbone=args.backbone, ways=1, shots=1, queries=0, train_queries=0))
    torch.manual_seed(0)
    try:
        backbone = make_backbone(args.backbone, source.task_info().input_shape, **args.backbone_args)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return backbone, source


def _default_out(key: dict[str, Any], cfg: Config) -> Path:
    """The cache file of ``key`` whatever its data's state (a stale one is rebuilt in its place)."""
    named = {k: v for k, v in key.items() if k != "data"} | {"data_dir": cfg.data_dir}
    digest = hashlib.sha256(json.dumps(named, sort_keys=True).encode()).hexdigest()[:16]
    return user_cache_dir() / "features" / f"{cfg.task}-{key['part']}-{digest}.pt"


def embed_command(args: argparse.Namespace) -> int:
    """``metashot embed``: build or reuse the cache, then say where it is and how fast it was made."""
    from metashot.data.features import cache_key, embed

    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {args.batch_size}")
    backbone, source = _from_run(args) if args.from_run is not None else _backbone(args)
    device = check_device(args.device)
    out = args.out or _default_out(cache_key(backbone, source, args.part), source.cfg)
    cache = embed(backbone, source, args.part, device, args.batch_size, not args.no_progress, out)
    n, d = cache.features.shape
    print(f"{out}: features [{n}, {d}] of {len(cache.class_sizes)} classes ({source.cfg.task}, {args.part})")
    if cache.seconds is None:
        print("up to date: its key is this backbone's and data's, nothing embedded")
    else:
        print(f"embedded {n} images in {cache.seconds:.2f} s: {n / cache.seconds:.1f} images/s on {device}")
    return 0


def evaluate_features(args: argparse.Namespace) -> int:
    """``metashot evaluate --features CACHE``: episodes of the cached features scored by ``--head``."""
    from metashot.data import features

    if args.run_dir is not None:
        raise ConfigError(f"evaluate takes a run folder or --features CACHE, not both ({args.run_dir})")
    if args.head is None:
        raise ConfigError("evaluate --features needs --head NAME: the head that scores the features")
    for name in ("test_episodes", "ways", "shots"):
        if (value := getattr(args, name)) is not None and value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if args.queries is not None and args.queries < 1:
        raise ConfigError(f"--queries must be at least 1, got {args.queries}")
    cache = features.FeatureCache.load(args.features)
    cache.check(args.features)
    result = features.evaluate_features(
        cache, args.head, args.head_args, episodes=args.test_episodes or 1000, ways=args.ways or 5,
        shots=args.shots or 1, queries=15 if args.queries is None else args.queries, seed=args.seed or 0,
        device=check_device(args.device or "auto"), progress=not args.no_progress)
    if args.json:
        print(json.dumps({**result.to_dict(), "head": args.head, "head_args": args.head_args or {},
                          "features": str(args.features)}))
    else:
        print(f"{result.table()}\n{result.summary()}, with the {args.head} head on {args.features}")
    return 0


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"embed": embed_command}
