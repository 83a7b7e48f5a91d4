"""FLOPs of each method's training step at its preset's shapes, its speed, its share of this machine's peak.

For each preset below the method is built as the trainer builds it (``presets.get`` + ``build_method``)
and fed random inputs of the preset's training shapes:

- ``protonet-omniglot-5w1s``: Conv4, 60-way 1-shot 5-query training episodes, 1 per step;
- ``matching-omniglot-5w1s``: Conv4, 5-way 1-shot 15-query episodes, 1 per step;
- ``maml-omniglot-5w1s``: strided Conv4, 5-way 1-shot 1-query tasks, meta-batch 32, 1 inner step, second
  order;
- ``maml-omniglot-20w1s``: 20-way, meta-batch 16, 5 inner steps, second order;
- ``mamlpp-omniglot-20w1s``: MAML++ (LSLR, per-step batch norm, multi-step loss), meta-batch 8, 5 inner
  steps, in its two phases: ``@first-order`` (optimizer steps < 25,000, multi-step loss annealing: step 0)
  and ``@second-order`` (from step 25,000 on);
- ``mann-omniglot-5class-onehot``: batches of 16 sequences of 50 steps (5 classes x 10), 20x20 pixels.

A training step is what the trainer runs: ``loss``, ``backward`` and an Adam step (``keep_freed_memory``
on, as ``metashot train``; MAML runs the path its ``tasks="auto"`` rule picks, reported as ``path``).
Its FLOPs are counted by ``torch.utils.flop_counter.FlopCounterMode`` over ``loss`` +
``backward`` (the counter counts matrix products and convolutions, forward and backward: not batch norm,
activations, the optimizer step or other elementwise work), with MAML's tasks in the loop: under vmap
the counter over-counts the grouped convolutions vmap turns the tasks into. The work is the same on
either path.

In the same run the script measures this machine's peaks at the same thread count: a 3x3 64->64
convolution forward at batch 256 on 28x28 and 14x14 inputs (padding 1), and a float32 2048x2048 matmul
(best of several, GFLOP/s), and, for reference, the strided Conv4's second convolution at a MAML task's
batch (5 and 20 images). Prints one JSON line per peak and reference, one per method (FLOPs, median
seconds per step after warm-up, achieved GFLOP/s and its share of the 28x28 convolution peak and of the
matmul peak), then a summary line. On a shared machine absolute times are indicative; the shares are
measured in the same run, so the peaks saw the same load.

    OMP_NUM_THREADS=1 python benchmarks/flops.py                   # all presets, 1 thread
    OMP_NUM_THREADS=1 python benchmarks/flops.py --threads 1 2     # and 2 threads
    OMP_NUM_THREADS=1 python benchmarks/flops.py --cases maml-omniglot-20w1s --profile 12
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

CASES = [
    "protonet-omniglot-5w1s",
    "matching-omniglot-5w1s",
    "maml-omniglot-5w1s",
    "maml-omniglot-20w1s",
    "mamlpp-omniglot-20w1s@first-order",
    "mamlpp-omniglot-20w1s@second-order",
    "mann-omniglot-5class-onehot",
]


# -- the machine's peaks ------------------------------------------------------------------------------
def best_rate(fn: Callable[[], Any], flops: int, reps: int = 5, warmup: int = 2) -> tuple[float, float]:
    """The best (highest) GFLOP/s of ``reps`` timed calls of ``fn`` doing ``flops`` each, and the median."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return flops / min(times) / 1e9, flops / statistics.median(times) / 1e9


def count_flops(fn: Callable[[], Any]) -> tuple[int, dict[str, int]]:
    """FLOPs of ``fn()`` as ``FlopCounterMode`` counts them, in all and by aten op."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    by_op = {str(op).split(".")[-1] if "." in str(op) else str(op): n
             for op, n in counter.get_flop_counts().get("Global", {}).items()}
    return counter.get_total_flops(), dict(sorted(by_op.items(), key=lambda kv: -kv[1]))


def conv_peak(
    hw: int, batch: int = 256, channels: int = 64, stride: int = 1, reps: int = 5
) -> dict[str, Any]:
    """A 3x3 ``channels``->``channels`` convolution forward (padding 1) at ``batch`` x ``hw`` x ``hw``."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, channels, hw, hw, generator=g)
    w = torch.rand(channels, channels, 3, 3, generator=g)

    def fn() -> torch.Tensor:
        return F.conv2d(x, w, stride=stride, padding=1)

    with torch.no_grad():
        flops, _ = count_flops(fn)
        out = (hw - 1) // stride + 1
        analytic = 2 * batch * channels * out * out * channels * 9
        assert flops == analytic, (flops, analytic)
        best, median = best_rate(fn, flops, reps)
    name = f"conv3x3_{channels}to{channels}_b{batch}_{hw}x{hw}" + (f"_stride{stride}" if stride > 1 else "")
    return {"peak": name, "threads": torch.get_num_threads(), "gflop": round(flops / 1e9, 4),
            "gflops_best": round(best, 2), "gflops_median": round(median, 2)}


def matmul_peak(n: int = 2048, reps: int = 5) -> dict[str, Any]:
    """A float32 n x n by n x n matrix product."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(n, n, generator=g), torch.rand(n, n, generator=g)
    best, median = best_rate(lambda: a @ b, 2 * n**3, reps)
    return {"peak": f"matmul_f32_{n}", "threads": torch.get_num_threads(), "gflop": round(2 * n**3 / 1e9, 3),
            "gflops_best": round(best, 2), "gflops_median": round(median, 2)}


def machine_peaks(reps: int = 5) -> dict[str, dict[str, Any]]:
    """The peaks at the current thread count, printed as JSON lines, keyed conv28 / conv14 / matmul."""
    peaks = {"conv28": conv_peak(28, reps=reps), "conv14": conv_peak(14, reps=reps),
             "matmul": matmul_peak(reps=reps)}
    for p in peaks.values():
        print(json.dumps(p), flush=True)
    return peaks


def task_convs(reps: int = 20) -> None:
    """For reference, not peaks: the strided Conv4's second convolution (64x14x14 -> 64x7x7, stride 2) at
    one MAML task's batch, 5 and 20 images (5- and 20-way 1-shot), as each inner step runs it."""
    for batch in (5, 20):
        line = conv_peak(14, batch=batch, stride=2, reps=reps)
        print(json.dumps({"reference": line.pop("peak"), **line}), flush=True)


# -- the methods --------------------------------------------------------------------------------------
def build(case: str) -> tuple[Any, Any, dict[str, Any]]:
    """The method of preset ``case`` (``name@phase`` for MAML++'s phases) and a random training batch of its
    shapes, and a description of the shapes."""
    from metashot.batches import Episode, SequenceBatch, SequenceTaskInfo, TaskInfo
    from metashot.methods import build_method
    from metashot.presets import get

    name, _, phase = case.partition("@")
    cfg = get(name)
    g = torch.Generator().manual_seed(0)
    b = cfg.meta_batch
    if cfg.task == "omniglot-sequences":
        a = cfg.task_args
        classes, instances, size = a.get("classes", cfg.ways), a.get("instances", 10), a.get("image_size", 20)
        if a.get("labels", "onehot") != "onehot":
            raise ValueError("only one-hot label sequences here")
        t = classes * instances
        info = SequenceTaskInfo((1, size, size), classes, classes, label_groups=1, label_values=classes,
                                steps=t)
        method = build_method(cfg, info)
        order = [torch.randperm(t, generator=g) for _ in range(b)]  # each class `instances` times, shuffled
        y = torch.stack([torch.arange(classes).repeat(instances)[o] for o in order])
        instance = torch.zeros_like(y)
        for c in range(classes):  # the n-th presentation of each class, 1-based
            instance += (y == c) * (y == c).cumsum(1)
        batch = SequenceBatch(torch.rand(b, t, 1, size, size, generator=g), y, instance)
        shape = {"batch": b, "steps": t, "classes": classes, "image": [1, size, size]}
        return method, batch, shape
    size = cfg.task_args.get("image_size", 28)
    ways, shots, queries = cfg.train_ways, cfg.train_shots, cfg.train_queries
    args = dict(cfg.method_args)
    method = build_method(cfg.replace(method_args=args), TaskInfo((1, size, size), cfg.ways, ways))
    if phase:
        if phase not in ("first-order", "second-order"):
            raise ValueError(f"unknown phase {phase!r}")
        method.on_step(0 if phase == "first-order" else args.get("first_order_steps", 0))
    labels = [torch.arange(ways).repeat_interleave(n).expand(b, -1).contiguous() for n in (shots, queries)]
    batch = Episode(torch.rand(b, ways * shots, 1, size, size, generator=g), labels[0],
                    torch.rand(b, ways * queries, 1, size, size, generator=g), labels[1], num_ways=ways)
    shape = {"meta_batch": b, "ways": ways, "shots": shots, "queries": queries, "image": [1, size, size]}
    if cfg.method == "maml":
        shape |= {"inner_steps": args.get("inner_steps", 1),
                  "second_order": not args.get("first_order", False) and getattr(method, "train_step", 0)
                  >= args.get("first_order_steps", 0)}
    return method, batch, shape


def build_retrying(case: str, tries: int, wait_s: float) -> tuple[Any, Any, dict[str, Any]]:
    """``build``, tried again after ``wait_s`` when it fails (the library may be mid-edit)."""
    for k in range(tries):
        try:
            return build(case)
        except Exception as e:  # noqa: BLE001
            if k == tries - 1:
                raise
            print(f"flops: building {case} failed ({type(e).__name__}: {e}); retrying in {wait_s:.0f}s",
                  file=sys.stderr, flush=True)
            time.sleep(wait_s)
    raise AssertionError


def trainer_step(method: Any, batch: Any) -> tuple[Callable[[], None], Any]:
    """One training step as the trainer runs it: loss, backward, Adam step; beside it MAML's path."""
    choice = ("vmap" if method._use_vmap(batch) else "loop") if hasattr(method, "_use_vmap") else None
    optimizer = torch.optim.Adam([p for p in method.parameters() if p.requires_grad], 1e-3)

    def step() -> None:
        loss, _ = method.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step, choice


def loss_backward(method: Any, batch: Any) -> Callable[[], None]:
    def fn() -> None:
        loss, _ = method.loss(batch)
        loss.backward()
        method.zero_grad(set_to_none=True)

    return fn


def measure_case(case: str, a: argparse.Namespace, peaks: dict[str, dict[str, Any]]) -> dict[str, Any]:
    torch.manual_seed(0)
    method, batch, shape = build_retrying(case, a.build_tries, a.build_wait_s)
    method.train()
    tasks = getattr(method, "tasks", None)
    if tasks is not None:
        method.tasks = "loop"  # MAML: the path the counter reads right
    flops, by_op = count_flops(loss_backward(method, batch))
    if tasks is not None:
        method.tasks = tasks
    step, choice = trainer_step(method, batch)
    for _ in range(a.warmup):
        step()
    times, cpu = [], []
    for _ in range(a.reps):
        t, c = time.perf_counter(), time.process_time()
        step()
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    s, cs = statistics.median(times), statistics.median(cpu)
    rate = flops / s / 1e9
    top = dict(list(by_op.items())[:6])
    line = {
        "case": case, "threads": torch.get_num_threads(), **shape, "path": choice,
        "gflop_per_step": round(flops / 1e9, 3),
        "s_per_step": round(s, 4), "cpu_s_per_step": round(cs, 4), "reps": a.reps,
        "gflops": round(rate, 2), "gflops_cpu_time": round(flops / cs / 1e9, 2),
        "share_of_conv28_peak": round(rate / peaks["conv28"]["gflops_best"], 4),
        "share_of_conv14_peak": round(rate / peaks["conv14"]["gflops_best"], 4),
        "share_of_matmul_peak": round(rate / peaks["matmul"]["gflops_best"], 4),
        "gflop_by_op": {k: round(v / 1e9, 3) for k, v in top.items()},
    }
    if a.profile:
        line["profile_top_self_cpu"] = profile(step, a.profile)
    print(json.dumps(line), flush=True)
    return line


def profile(step: Callable[[], None], top: int) -> list[dict[str, Any]]:
    """The ``top`` aten ops of one step by self CPU time: name, share of the step's self CPU time, calls."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    events = [e for e in prof.key_averages() if e.key.startswith("aten::")]
    total = sum(e.self_cpu_time_total for e in prof.key_averages()) or 1.0
    events.sort(key=lambda e: -e.self_cpu_time_total)
    return [{"op": e.key, "self_cpu_share": round(e.self_cpu_time_total / total, 4), "calls": e.count}
            for e in events[:top]]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=CASES, choices=CASES)
    p.add_argument("--threads", nargs="+", type=int, default=[1])
    p.add_argument("--reps", type=int, default=5, help="timed steps per case (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peak-reps", type=int, default=5)
    p.add_argument("--profile", type=int, default=0, help="add the top N ops of one step by self CPU time")
    p.add_argument("--build-tries", type=int, default=3)
    p.add_argument("--build-wait-s", type=float, default=120.0)
    a = p.parse_args()
    from metashot.process import keep_freed_memory

    keep_freed_memory()  # as `metashot train` runs
    for threads in a.threads:
        torch.set_num_threads(threads)
        peaks = machine_peaks(a.peak_reps)
        task_convs()
        lines = [measure_case(case, a, peaks) for case in a.cases]
        after = machine_peaks(a.peak_reps)  # the load may have changed during the run
        both = {k: [peaks[k]["gflops_best"], after[k]["gflops_best"]] for k in peaks}
        print(json.dumps({
            "summary": "share of the conv 28x28 peak", "threads": threads, "peak_gflops_before_after": both,
            "gflops": {line["case"]: line["gflops"] for line in lines},
            "share_of_conv28_peak": {line["case"]: line["share_of_conv28_peak"] for line in lines},
        }), flush=True)


if __name__ == "__main__":
    main()
