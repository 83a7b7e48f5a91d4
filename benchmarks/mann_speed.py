"""MANN and LSTM-baseline training throughput on Omniglot sequence episodes, and where a step's time goes.

For each model, a training step as the trainer runs it (next batch from the task source's loader, the
method's loss, backward, Adam) is timed in four parts: building the batch (sampling, gathering,
augmenting), forward, backward and the optimiser step. Prints one JSON line per model with the milliseconds
of each part per step, its share, and episodes/s; with ``--profile`` also the busiest operators of a few
steps.

    OMP_NUM_THREADS=1 python benchmarks/mann_speed.py --threads 1
    python benchmarks/mann_speed.py --presets mann-omniglot-15class-string --steps 20
    OMP_NUM_THREADS=1 python benchmarks/mann_speed.py --compile --presets mann-omniglot-5class-onehot

No peer library ships a MANN, so there is no peer ratio: this is the profile behind the issue's "where the
time goes", to compare commits with. ``--compile`` times each MANN preset again with its recurrence
compiled (``method_args`` ``{"compile": true}``) and prints the ratio of episodes/s, compiled to eager,
measured in the same run; ``warmup_steps_s`` shows the compile's cost (minutes the first time, seconds
once torch's on-disk cache holds it).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from metric_speed import SHARED, link_zips  # this folder's helper: a temporary folder of links to the zips

from metashot import presets
from metashot.data.tasks import build_source
from metashot.methods import METHODS


def measure(
    name: str, data_dir: Path, steps: int, warmup: int, profile: bool, compile: bool = False
) -> float:
    """Print the timing line (and the profile) of preset ``name``; return its episodes/s."""
    cfg = presets.get(name).replace(data_dir=str(data_dir))
    if compile:
        cfg = cfg.replace(method_args={**cfg.method_args, "compile": True})
    source = build_source(cfg)
    torch.manual_seed(0)
    method = METHODS[cfg.method].build(source.info, **cfg.method_args)
    optimizer = torch.optim.Adam(method.parameters(), lr=cfg.lr)
    batches = iter(source.loader("train", (warmup + steps + 5) * cfg.meta_batch, seed=0))
    parts = dict.fromkeys(("data", "forward", "backward", "optimizer"), 0.0)
    start = time.perf_counter()
    for i in range(warmup + steps):
        if i == warmup:
            warmup_s = time.perf_counter() - start
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        loss, _ = method.loss(batch)
        t2 = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t3 = time.perf_counter()
        optimizer.step()
        t4 = time.perf_counter()
        if i >= warmup:
            for key, dt in zip(parts, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                parts[key] += dt
    total = sum(parts.values())
    rate = steps * cfg.meta_batch / total
    print(json.dumps({
        "bench": "train", "preset": name, "method": cfg.method, "compile": compile,
        "meta_batch": cfg.meta_batch, "threads": torch.get_num_threads(), "steps": steps,
        "warmup_steps_s": round(warmup_s, 1),
        "episodes_per_s": round(rate, 1),
        "ms_per_step": {k: round(1e3 * v / steps, 2) for k, v in parts.items()},
        "share": {k: round(v / total, 3) for k, v in parts.items()},
    }), flush=True)
    if profile:
        from torch.profiler import profile as torch_profile

        with torch_profile() as prof:
            for _ in range(3):
                loss, _ = method.loss(next(batches))
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:10]
        total_us = sum(e.self_cpu_time_total for e in prof.key_averages())
        print(json.dumps({
            "bench": "profile", "preset": name,
            "top_ops": [{"op": e.key, "calls_per_step": e.count // 3,
                         "share": round(e.self_cpu_time_total / total_us, 3)} for e in rows],
        }), flush=True)
    return rate


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=SHARED,
                   help="folder with images_background.zip and images_evaluation.zip (never written)")
    p.add_argument("--presets", nargs="+",
                   default=["mann-omniglot-5class-onehot", "lstm-omniglot-5class-onehot"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=40, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="also print the busiest operators")
    p.add_argument("--compile", action="store_true",
                   help="also time each MANN preset with method_args compile=true (torch.compile of its "
                        "recurrence; the warm-up steps then include the compile) and print the ratio")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    root = link_zips(a.data_dir)  # the cache goes there, never beside the zips
    try:
        for name in a.presets:
            eager = measure(name, root, a.steps, a.warmup, a.profile)
            if a.compile and presets.get(name).method == "mann":
                compiled = measure(name, root, a.steps, a.warmup, False, compile=True)
                print(json.dumps({"bench": "compile_speedup", "preset": name,
                                  "ratio": round(compiled / eager, 3)}), flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
