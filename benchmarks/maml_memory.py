"""MAML's peak memory against inner steps: metashot with and without gradient checkpointing, and the peers.

One second-order meta-iteration (inner loops, meta-gradient, Adam outer step) of the
``maml-omniglot-20w1s`` preset's network and tasks: the strided Conv4 (64 wide, batch norm with batch
statistics) and a linear head, random 1x28x28 inputs, 20-way 1-shot tasks with 1 query per class, alpha 0.1,
meta-batch 16 (the preset's), at 1, 5, 10, 25 and 50 inner steps, for

- ``metashot-loop``: ``MAML(tasks="loop")``, built by ``presets.get`` + ``build_method`` with ``inner_steps``
  changed (each task's query loss back-propagated as soon as it is known: one task's graph at a time);
- ``metashot-loop-checkpoint``: the same with ``recompute=True`` (each second-order inner step recomputed
  in the backward pass; only its input parameters kept);
- ``higher``, ``torchopt``, ``learn2learn``: the peers, each as ``maml_speed.py`` runs it, on the same
  network (the module metashot's preset builds), one task's graph at a time as well.

All cases adapt every parameter, batch-norm scale and shift included (``adapt_norm=True``, the peers'
work; the preset itself keeps them out of the inner loop, ``--no-adapt-norm``). Every case runs in its own
subprocess with glibc's default allocator settings (``--malloc keep``: metashot's trainer setting) at
``--threads`` threads, and reports ``ru_maxrss`` (peak resident memory, MB) and that peak above the RSS
just before the first iteration (the meta-iteration's own memory), with median seconds (wall and CPU)
per meta-iteration. A watchdog kills a case whose RSS passes ``--max-rss-gb``.

The FLOPs of one meta-iteration with and without checkpointing are counted (``FlopCounterMode`` on one
task, times the meta-batch: the tasks are alike) and the machine's convolution peak measured (3x3 64->64
at batch 256, 28x28, as ``flops.py``) at the same thread count, so each case's line carries its useful
GFLOP/s (metashot-loop's FLOPs / its time: the same work for every case) and that rate's share of the peak.

Prints one JSON line per case, one summary line per steps-count (peer peak / metashot-checkpoint peak,
peak above start; time of each case / metashot-loop's), then the growth of each case's peak per inner
step (least squares over the steps-counts run).

    OMP_NUM_THREADS=1 python benchmarks/maml_memory.py
    OMP_NUM_THREADS=1 python benchmarks/maml_memory.py --steps 1 5 --iters 1 --warmup 0   # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from typing import Any

import torch
from maml_speed import import_learn2learn, make_batch, measure, metashot_step, setup_process, step_fn

PRESET = "maml-omniglot-20w1s"
CASES = ["metashot-loop", "metashot-loop-checkpoint", "higher", "torchopt", "learn2learn"]
REFERENCE = "metashot-loop-checkpoint"


def build_maml(steps: int, checkpoint: bool, adapt_norm: bool) -> tuple[Any, Any]:
    """metashot's MAML as the preset builds it, with ``steps`` inner steps, and the preset's config."""
    from metashot.batches import TaskInfo
    from metashot.methods import build_method
    from metashot.presets import get

    cfg = get(PRESET)
    args = {**cfg.method_args, "inner_steps": steps, "test_inner_steps": steps, "tasks": "loop",
            "recompute": checkpoint, "adapt_norm": adapt_norm}
    cfg = cfg.replace(method_args=args)
    return build_method(cfg, TaskInfo((1, 28, 28), cfg.ways, cfg.train_ways)), cfg


def count_meta_iteration(method: Any, batch: tuple, meta_batch: int) -> int:
    """FLOPs of ``loss`` + ``backward`` over ``meta_batch`` tasks: one task's, times ``meta_batch``."""
    from torch.utils.flop_counter import FlopCounterMode

    from metashot.batches import Episode

    one = Episode(*(t[:1] for t in batch))
    counter = FlopCounterMode(display=False)
    with counter:
        loss, _ = method.loss(one)
        loss.backward()
    method.zero_grad(set_to_none=True)
    return counter.get_total_flops() * meta_batch


def run_case(a: argparse.Namespace) -> dict[str, Any]:
    """One case in this process (the child)."""
    setup_process(a.threads, a.malloc)
    torch.manual_seed(0)
    if a.case == "learn2learn":
        import_learn2learn()  # its imports before the start RSS is read
    checkpoint = a.case == "metashot-loop-checkpoint"
    method, cfg = build_maml(a.steps, checkpoint, a.adapt_norm)
    ways = cfg.train_ways
    batch = make_batch(a.meta_batch, ways, cfg.train_shots, cfg.train_queries)
    if a.case.startswith("metashot"):
        run = metashot_step(method)
    else:
        peer = argparse.Namespace(order=2, inner_lr=cfg.method_args["inner_lr"], steps=a.steps)
        run = step_fn(a.case, method.model, peer)
    m = measure(run, batch, a.warmup, a.iters)
    out = {"case": a.case, "steps": a.steps, "meta_batch": a.meta_batch, "ways": ways,
           "shots": cfg.train_shots, "queries": cfg.train_queries, "threads": a.threads, "malloc": a.malloc,
           "warmup": a.warmup, **m}
    if a.case.startswith("metashot") and a.count:  # after the peak was read: it does not count here
        out["gflop_per_iter"] = round(count_meta_iteration(method, batch, a.meta_batch) / 1e9, 3)
    return out


def rss_of(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except OSError:
        return 0.0


def spawn(a: argparse.Namespace, case: str, steps: int, warmup: int, iters: int) -> dict[str, Any] | None:
    """Run one case in a subprocess, killed if its RSS passes ``--max-rss-gb``; print and return its line."""
    malloc = a.malloc if case.startswith("metashot") else a.peer_malloc
    cmd = [sys.executable, __file__, "--child", "--case", case, "--steps-one", str(steps), "--meta-batch",
           str(a.meta_batch), "--threads", str(a.threads), "--warmup", str(warmup), "--iters", str(iters),
           "--malloc", malloc, "--adapt-norm" if a.adapt_norm else "--no-adapt-norm"]
    cmd.append("--count" if a.count else "--no-count")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    over: list[float] = []

    def watch() -> None:
        while proc.poll() is None:
            gb = rss_of(proc.pid)
            if gb > a.max_rss_gb:
                over.append(gb)
                proc.kill()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    stdout, stderr = proc.communicate()
    watcher.join()
    if over:
        line = {"case": case, "steps": steps, "skipped": f"RSS passed --max-rss-gb {a.max_rss_gb}",
                "rss_gb_at_kill": round(over[0], 2)}
        print(json.dumps(line), flush=True)
        return None
    if proc.returncode != 0:
        last = (stderr.strip().splitlines() or ["?"])[-1]
        print(json.dumps({"case": case, "steps": steps, "skipped": last}), flush=True)
        return None
    return json.loads(stdout.strip().splitlines()[-1])


def schedule(steps: int, a: argparse.Namespace) -> tuple[int, int]:
    """(warmup, timed iterations) for a steps-count: fewer for the long ones (a meta-iteration of 25 or
    50 steps takes a minute; its one-off costs are small against that), unless given."""
    if a.iters is not None:
        return a.warmup if a.warmup is not None else 1, a.iters
    if steps <= 5:
        return 1, 3
    if steps <= 10:
        return 1, 1
    return 0, 1


def column(res: dict[str, dict[str, Any]], key: str) -> dict[str, Any]:
    return {c: r[key] for c, r in res.items()}


def ratios(res: dict[str, dict[str, Any]], key: str, to: str) -> dict[str, float]:
    """Each other case's ``key`` over case ``to``'s."""
    return {c: round(r[key] / res[to][key], 3) for c, r in res.items() if c != to}


def slope(xs: list[int], ys: list[float]) -> float | None:
    if len(xs) < 2:
        return None
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    p.add_argument("--steps", nargs="+", type=int, default=[1, 5, 10, 25, 50])
    p.add_argument("--meta-batch", type=int, default=16, help="the preset's 16")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--iters", type=int, default=None, help="timed iterations (default: by steps-count)")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--malloc", default="default", choices=["default", "keep", "tight"],
                   help="metashot's cases (see maml_speed.setup_process)")
    p.add_argument("--peer-malloc", default="default", choices=["default", "keep", "tight"])
    p.add_argument("--adapt-norm", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--max-rss-gb", type=float, default=6.0)
    p.add_argument("--count", action=argparse.BooleanOptionalAction, default=True,
                   help="count metashot's FLOPs per meta-iteration and measure the conv peak")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--steps-one", type=int, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        a.steps = a.steps_one
        print(json.dumps(run_case(a)))
        return
    peaks: list[float] = []
    if a.count:
        from flops import conv_peak

        torch.set_num_threads(a.threads)
        first = conv_peak(28)
        print(json.dumps(first), flush=True)
        peaks.append(first["gflops_best"])
    results: dict[int, dict[str, dict[str, Any]]] = {}
    for steps in a.steps:
        warmup, iters = schedule(steps, a)
        res = {}
        for case in a.cases:
            r = spawn(a, case, steps, warmup, iters)
            if r is None:
                continue
            res[case] = r
        useful = res.get("metashot-loop", {}).get("gflop_per_iter")
        for r in res.values():
            if useful and peaks:
                rate = useful / r["s_per_iter"]
                r["useful_gflops"] = round(rate, 2)
                r["useful_share_of_conv28_peak"] = round(rate / peaks[0], 4)
            print(json.dumps(r), flush=True)
        results[steps] = res
        ref, loop = res.get(REFERENCE), res.get("metashot-loop")
        summary: dict[str, Any] = {"summary": "steps", "steps": steps, "meta_batch": a.meta_batch,
                                   "peak_above_start_mb": column(res, "peak_above_start_mb"),
                                   "s_per_iter": column(res, "s_per_iter")}
        if ref:
            summary["peak_vs_checkpoint"] = ratios(res, "peak_above_start_mb", REFERENCE)
        if loop:
            summary["time_vs_metashot_loop"] = ratios(res, "s_per_iter", "metashot-loop")
            summary["cpu_time_vs_metashot_loop"] = ratios(res, "cpu_s_per_iter", "metashot-loop")
        if ref and loop and "gflop_per_iter" in ref and "gflop_per_iter" in loop:
            summary["checkpoint_flops_vs_loop"] = round(ref["gflop_per_iter"] / loop["gflop_per_iter"], 3)
        print(json.dumps(summary), flush=True)
    growth = {}
    for case in a.cases:
        xs = [s for s in a.steps if case in results.get(s, {})]
        ys = [results[s][case]["peak_above_start_mb"] for s in xs]
        g = slope(xs, ys)
        if g is not None:
            growth[case] = round(g, 2)
    final: dict[str, Any] = {"summary": "growth", "peak_above_start_mb_per_inner_step": growth}
    if a.count:
        last = conv_peak(28)
        print(json.dumps(last), flush=True)
        final["conv28_peak_gflops_before_after"] = [peaks[0], last["gflops_best"]]
    print(json.dumps(final), flush=True)


if __name__ == "__main__":
    main()
