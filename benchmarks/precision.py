"""bfloat16 autocast against float32: time per training step, and accuracy after a short run of each.

Two presets at their own shapes on real Omniglot (``$METASHOT_DATA``): ProtoNet's (60-way 1-shot 5-query
training episodes) and MAML's 5-way 1-shot (meta-batch 32, one second-order inner step). ProtoNet runs
under ``--precision bf16``; second-order MAML stays float32 there (``Method.autocast_safe``), so it is
measured under ``bf16-all``, which autocasts its double backward too, with its tasks in a loop for both
precisions (torch's vmap of batch norm's backward fails under autocast).

Prints one JSON line per measurement:

- ``{"bench": "step", "preset", "precision", "repeat", "s_per_step", ...}``: the median over ``--steps``
  training steps (the method's loss under :func:`metashot.evaluate.autocast`, backward, Adam), after
  ``--warmup`` steps, on batches drawn beforehand (no data time); the two precisions alternate per repeat.
- ``{"bench": "ratio", "preset", "bf16_over_fp32"}``: the reduced precision's time over float32's, the
  median of the per-repeat ratios measured in this run.
- with ``--train-minutes``: ``{"bench": "run", "preset", "precision", "steps", "acc", "ci95", ...}``: a
  run trained for that many minutes from ``--seed`` (the whole trainer, validation at the end), tested on
  ``--test-episodes`` episodes.

    OMP_NUM_THREADS=1 python benchmarks/precision.py --steps 10 --repeats 2
    OMP_NUM_THREADS=1 python benchmarks/precision.py --train-minutes 3 --test-episodes 200 --no-timing
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from metashot import presets
from metashot.config import Config
from metashot.data.tasks import checked_source
from metashot.devices import numerics
from metashot.evaluate import autocast
from metashot.methods import build_method, method_class
from metashot.train import Trainer

CASES = {"protonet-omniglot-5w1s": "bf16", "maml-omniglot-5w1s": "bf16-all"}


def _config(preset: str, precision: str, seed: int) -> Config:
    cfg = presets.get(preset)
    # MAML's tasks in a loop: torch's vmap of batch norm's backward fails under autocast
    loop = {"method_args": {"tasks": "loop"}} if cfg.method == "maml" else {}
    return cfg.override(device="cpu", precision=precision, seed=seed,
                        data_dir=os.environ.get("METASHOT_DATA"), **loop)


def step_seconds(cfg: Config, batches: list[Any], warmup: int) -> float:
    """The median time of a training step over ``batches`` after the first ``warmup``."""
    torch.manual_seed(cfg.seed)
    source = checked_source(cfg, (method_class(cfg).train_batches,) * 2)
    method = build_method(cfg, source.task_info(method_class(cfg).train_batches)).train()
    optimizer = cfg.make_optimizer(method.param_groups(cfg.lr))
    times = []
    with numerics(cfg.precision):
        for i, batch in enumerate(batches):
            start = time.perf_counter()
            method.on_step(i)
            with autocast(method, "cpu", cfg.precision):
                loss, _ = method.loss(batch)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def timing(preset: str, reduced: str, args: argparse.Namespace) -> None:
    cfg = _config(preset, "fp32", args.seed)
    kind = method_class(cfg).train_batches
    source = checked_source(cfg, (kind, method_class(cfg).test_batches))
    per_step = cfg.per_step(kind)
    n = args.warmup + args.steps
    batches = list(source.loader("train", n * per_step, seed=cfg.seed, kind=kind))
    ratios = []
    for repeat in range(args.repeats):
        seconds = {}
        for precision in ("fp32", reduced):
            seconds[precision] = step_seconds(cfg.replace(precision=precision), batches, args.warmup)
            print(json.dumps({"bench": "step", "preset": preset, "precision": precision, "repeat": repeat,
                              "s_per_step": round(seconds[precision], 4), "steps": args.steps,
                              "warmup": args.warmup, "threads": torch.get_num_threads()}), flush=True)
        ratios.append(seconds[reduced] / seconds["fp32"])
    print(json.dumps({"bench": "ratio", "preset": preset, "precision": reduced,
                      "bf16_over_fp32": round(statistics.median(ratios), 3),
                      "per_repeat": [round(r, 3) for r in ratios]}), flush=True)


def short_run(preset: str, precision: str, args: argparse.Namespace) -> None:
    cfg = _config(preset, precision, args.seed).override(
        max_minutes=args.train_minutes, test_episodes=args.test_episodes, val_episodes=args.val_episodes)
    with tempfile.TemporaryDirectory() as folder:
        trainer = Trainer(cfg, Path(folder) / "run", progress=False)
        trainer.fit()
        result = trainer.test()
    print(json.dumps({"bench": "run", "preset": preset, "precision": precision, "seed": args.seed,
                      "minutes": args.train_minutes, "steps": trainer.step, "acc": round(result.mean, 4),
                      "ci95": round(result.ci, 4), "test_episodes": result.episodes,
                      "threads": torch.get_num_threads()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", nargs="+", default=list(CASES), choices=list(CASES))
    p.add_argument("--steps", type=int, default=10, help="timed steps per measurement")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--no-timing", action="store_true")
    p.add_argument("--train-minutes", type=float, help="also a short run of each preset and precision")
    p.add_argument("--test-episodes", type=int, default=200)
    p.add_argument("--val-episodes", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    for preset in args.presets:
        if not args.no_timing:
            timing(preset, CASES[preset], args)
        if args.train_minutes:
            for precision in ("fp32", CASES[preset]):
                short_run(preset, precision, args)


if __name__ == "__main__":
    main()
