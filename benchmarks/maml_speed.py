"""MAML meta-iterations per second and peak memory: metashot against the peers that install here.

Every case runs in its own subprocess (so that ``ru_maxrss`` is that case's peak resident memory) on the
same work: a Conv4 with batch norm (batch statistics) and a linear head, random 1x28x28 inputs, 5-way
1-shot 5-query tasks, a meta-batch of 32, 1 inner step with alpha 0.4, Adam outer step. Prints one JSON
line per case (median seconds per meta-iteration, peak RSS in MB, and the peak above the process's RSS
just before the first iteration), then one line per order with the ratios of the fastest peer's time
to metashot's (wall time, and CPU time, which is steadier on a shared machine), all measured in this run.
Each case's line also gives the iteration's FLOPs (metashot's work, counted once on the loop path), the
achieved GFLOP/s and its share of this machine's 3x3 64->64 convolution peak (batch 256, 28x28, the
same thread count), measured at the start of the run. ``metashot-auto`` is the default: ``tasks="auto"``,
the path its rule picks for the batch's shapes. ``torch-loop`` is a plain ``torch.func`` loop with one
backward over all tasks; ``torch-loop-per-task`` is metashot's loop written plainly (a backward per task,
the same parameters adapted): ``metashot-loop`` against it is the overhead of ``MAML.loss``.

    python benchmarks/maml_speed.py                       # the comparison, 2nd and 1st order
    python benchmarks/maml_speed.py --iters 3 --warmup 1  # a quick check
    python benchmarks/maml_speed.py --sweep               # metashot's peak memory vs steps and meta-batch

Peers: higher and torchopt (``pip install higher torchopt``); learn2learn if it imports (see
``import_learn2learn`` for the torchvision shim it needs beside a CPU-only torch). metashot runs
as `metashot train` runs it, with ``keep_freed_memory()`` (glibc keeps freed buffers); ``--peer-malloc keep``
gives the peers the same setting, for the ratio of the algorithms alone.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

CASES = ["metashot-auto", "metashot-loop", "metashot-loop-graph", "metashot-vmap", "torch-loop",
         "torch-loop-per-task", "higher", "torchopt", "learn2learn"]
# on request only (--cases): the loop with gradient checkpointing per inner step (MAML(recompute=True))
EXTRA_CASES = ["metashot-loop-checkpoint"]
PEERS = ["higher", "torchopt", "learn2learn"]


def metashot_step(method: Any) -> Callable[[tuple], None]:
    """One training step of a metashot method on a batch tuple (support, labels, query, labels): the
    loss, its backward and an Adam step, as the trainer runs it."""
    from metashot.batches import Episode

    opt = torch.optim.Adam(method.parameters(), 1e-3)

    def run(batch: tuple) -> None:
        loss, _ = method.loss(Episode(*batch))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return run


def import_learn2learn() -> Any:
    """Import learn2learn, working around the torchvision mismatch of a CPU-only torch.

    learn2learn imports torchvision at the top (its vision datasets). The torchvision wheel from PyPI is
    built against a CUDA torch: beside a CPU-only torch its C extension does not load, and ``import
    torchvision`` stops at ``register_fake("torchvision::nms")`` ("operator torchvision::nms does not
    exist", then the same for ``qnms``). Defining those two schemas and importing again is enough (the
    shim of ``metric_speed.import_easyfsl``); MAML uses no torchvision op. A working torchvision, or
    none, is left alone. learn2learn 0.2.0's sdist builds on Python 3.11 after ``cython -3`` on its three
    ``.pyx`` files (``pip install --no-deps --no-build-isolation .``); it needs requests, gym, scipy and
    torchvision (``--no-deps``, the release that pins this torch) at import.
    """
    from metric_speed import import_torchvision

    import_torchvision()
    import learn2learn

    return learn2learn


def make_net(net: str, ways: int) -> nn.Module:
    from metashot.nn.backbones import Conv4

    if net == "strided":  # the MAML paper's Omniglot network
        conv = Conv4(1, 64, 64, strided=True, track_running_stats=False)
        return nn.Sequential(*list(conv)[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, ways))
    return nn.Sequential(Conv4(1, 64, 64, track_running_stats=False), nn.Linear(64, ways))  # max-pooled


def make_batch(b: int, ways: int, shots: int, queries: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    xs = torch.rand(b, ways * shots, 1, 28, 28, generator=g)
    xq = torch.rand(b, ways * queries, 1, 28, 28, generator=g)
    ys = torch.arange(ways).repeat_interleave(shots).expand(b, -1).contiguous()
    yq = torch.arange(ways).repeat_interleave(queries).expand(b, -1).contiguous()
    return xs, ys, xq, yq


def step_fn(case: str, model: nn.Module, a: argparse.Namespace) -> Callable[[tuple], None]:
    """One meta-iteration of ``case``: inner loops, outer gradient, Adam step."""
    second = a.order == 2
    lr, steps = a.inner_lr, a.steps

    if case.startswith("metashot"):
        from metashot.methods.maml import MAML

        tasks = {"metashot-vmap": "vmap", "metashot-auto": "auto"}.get(case, "loop")
        method = MAML(model, lr, steps, first_order=not second, adapt_norm=a.adapt_norm, tasks=tasks,
                      per_task_backward=case != "metashot-loop-graph",
                      recompute=case == "metashot-loop-checkpoint")
        return metashot_step(method)

    opt = torch.optim.Adam(model.parameters(), 1e-3)

    if case == "torch-loop":  # a plain functional loop: the sum of the query losses, one backward
        from torch.func import functional_call

        names = [n for n, _ in model.named_parameters()]

        def run(batch: tuple) -> None:
            xs, ys, xq, yq = batch
            params = dict(model.named_parameters())
            total = 0.0
            for i in range(xs.shape[0]):
                fast = params
                for _ in range(steps):
                    loss = F.cross_entropy(functional_call(model, fast, (xs[i],)), ys[i])
                    grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second)
                    fast = {n: w - lr * g for n, w, g in zip(names, fast.values(), grads)}
                total = total + F.cross_entropy(functional_call(model, fast, (xq[i],)), yq[i])
            opt.zero_grad(set_to_none=True)
            (total / xs.shape[0]).backward()
            opt.step()

        return run

    if case == "torch-loop-per-task":  # metashot's loop written plainly: its overhead is the difference
        from torch.func import functional_call

        from metashot.methods.inner_params import split_params

        adapted, _ = split_params(model, a.adapt_norm)

        def run(batch: tuple) -> None:
            xs, ys, xq, yq = batch
            params = dict(model.named_parameters())
            b = xs.shape[0]
            opt.zero_grad(set_to_none=True)
            for i in range(b):
                fast = params
                for _ in range(steps):
                    loss = F.cross_entropy(functional_call(model, fast, (xs[i],)), ys[i])
                    ws = [fast[n] for n in adapted]
                    grads = torch.autograd.grad(loss, ws, create_graph=second)
                    fast = {**fast, **{n: w - lr * g for n, w, g in zip(adapted, ws, grads)}}
                (F.cross_entropy(functional_call(model, fast, (xq[i],)), yq[i]) / b).backward()
            opt.step()

        return run

    if case == "higher":
        import higher

        inner = torch.optim.SGD(model.parameters(), lr)

        def run(batch: tuple) -> None:
            xs, ys, xq, yq = batch
            b = xs.shape[0]
            opt.zero_grad(set_to_none=True)
            for i in range(b):
                with higher.innerloop_ctx(model, inner, copy_initial_weights=False,
                                          track_higher_grads=second) as (fmodel, diffopt):
                    for _ in range(steps):
                        diffopt.step(F.cross_entropy(fmodel(xs[i]), ys[i]))
                    loss = F.cross_entropy(fmodel(xq[i]), yq[i]) / b
                    if second:
                        loss.backward()
                    else:  # first order: the query gradient at the adapted weights, onto the initial ones
                        grads = torch.autograd.grad(loss, list(fmodel.parameters()))
                        for p, g in zip(model.parameters(), grads):
                            p.grad = g if p.grad is None else p.grad + g
            opt.step()

        return run

    if case == "torchopt":
        import torchopt

        if second:  # torchopt's MAML recipe: MetaSGD, extract / recover the state per task
            inner_opt = torchopt.MetaSGD(model, lr=lr)

            def run(batch: tuple) -> None:
                xs, ys, xq, yq = batch
                b = xs.shape[0]
                opt.zero_grad(set_to_none=True)
                net_state = torchopt.extract_state_dict(model)
                optim_state = torchopt.extract_state_dict(inner_opt)
                for i in range(b):
                    for _ in range(steps):
                        inner_opt.step(F.cross_entropy(model(xs[i]), ys[i]))
                    (F.cross_entropy(model(xq[i]), yq[i]) / b).backward()
                    torchopt.recover_state_dict(model, net_state)
                    torchopt.recover_state_dict(inner_opt, optim_state)
                opt.step()

            return run
        from torch.func import functional_call

        sgd = torchopt.sgd(lr)
        names = [n for n, _ in model.named_parameters()]

        def run(batch: tuple) -> None:  # first order: torchopt's functional API, no graph of the step
            xs, ys, xq, yq = batch
            b = xs.shape[0]
            opt.zero_grad(set_to_none=True)
            for i in range(b):
                fast = tuple(model.parameters())
                state = sgd.init(fast)
                for _ in range(steps):
                    loss = F.cross_entropy(functional_call(model, dict(zip(names, fast)), (xs[i],)), ys[i])
                    grads = torch.autograd.grad(loss, fast)
                    updates, state = sgd.update(grads, state, inplace=False)
                    fast = torchopt.apply_updates(fast, updates, inplace=False)
                pred = functional_call(model, dict(zip(names, fast)), (xq[i],))
                (F.cross_entropy(pred, yq[i]) / b).backward()
            opt.step()

        return run

    if case == "learn2learn":
        l2l = import_learn2learn()

        maml = l2l.algorithms.MAML(model, lr=lr, first_order=not second)

        def run(batch: tuple) -> None:
            xs, ys, xq, yq = batch
            b = xs.shape[0]
            opt.zero_grad(set_to_none=True)
            for i in range(b):
                learner = maml.clone()
                for _ in range(steps):
                    learner.adapt(F.cross_entropy(learner(xs[i]), ys[i]))
                (F.cross_entropy(learner(xq[i]), yq[i]) / b).backward()
            opt.step()

        return run
    raise ValueError(f"unknown case {case!r}")


def step_flops(a: argparse.Namespace, order: int) -> int:
    """FLOPs of one meta-iteration (loss and backward) of metashot's work, counted on the loop path (the
    counter over-counts vmap's grouped convolutions; the work is the same)."""
    from flops import count_flops

    from metashot.batches import Episode
    from metashot.methods.maml import MAML

    torch.manual_seed(0)
    method = MAML(make_net(a.net, a.ways), a.inner_lr, a.steps, first_order=order == 1,
                  adapt_norm=a.adapt_norm, tasks="loop")
    batch = Episode(*make_batch(a.meta_batch, a.ways, a.shots, a.queries))
    return count_flops(lambda: method.loss(batch)[0].backward())[0]


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def setup_process(threads: int, malloc: str) -> None:
    """A child's settings: torch's thread count, and glibc's: ``default``; ``keep``, as metashot's trainer
    runs (freed memory kept); ``tight``, every block of 64 KiB or more mmapped and unmapped when freed
    (a fixed ``M_MMAP_THRESHOLD``, which turns off glibc's sliding threshold: the RSS then follows the
    live tensors, not what fragmentation of the heap keeps)."""
    torch.set_num_threads(threads)
    if malloc == "keep":
        from metashot.process import keep_freed_memory

        keep_freed_memory()
    elif malloc == "tight":
        import ctypes

        m_trim_threshold, m_mmap_threshold = -1, -3
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(m_mmap_threshold, 64 << 10)
        libc.mallopt(m_trim_threshold, 128 << 10)


def hwm_mb() -> float | None:
    """This process's peak RSS (``VmHWM``, MB), or None where /proc does not say."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def reset_peak() -> bool:
    """Reset ``VmHWM`` (and so ``ru_maxrss``) to the current RSS (Linux >= 4.0); whether it took."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def measure(run: Callable[[Any], None], batch: Any, warmup: int, iters: int) -> dict[str, Any]:
    """Run ``run(batch)`` ``warmup + iters`` times: the median wall and CPU seconds of the last ``iters``,
    this process's peak RSS and that peak above the RSS just before the first call.

    The peak is read from ``VmHWM``, reset just before the first call where Linux allows: ``ru_maxrss``
    alone is not this process's own on Linux, where it keeps the high-water mark of the memory image
    that ``fork`` copied and ``execve`` replaced, i.e. the parent's RSS at the fork (a parent that has
    run anything big would set every child's peak). ``ru_maxrss_mb`` is reported beside it.
    """
    before = hwm_mb()  # the peak of imports and setup
    base = rss_mb()
    was_reset = reset_peak()
    times, cpu = [], []
    for i in range(warmup + iters):
        t, c = time.perf_counter(), time.process_time()
        run(batch)
        if i >= warmup:
            times.append(time.perf_counter() - t)
            cpu.append(time.process_time() - c)
    ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    after = hwm_mb()
    if after is None:  # no /proc: ru_maxrss, which may be floored by the parent's RSS
        after = before = ru
    return {
        "s_per_iter": round(statistics.median(times), 4), "cpu_s_per_iter": round(statistics.median(cpu), 4),
        "iters": iters, "start_rss_mb": round(base, 1),
        "peak_rss_mb": round(max(after, before or 0.0), 1), "peak_above_start_mb": round(after - base, 1),
        "ru_maxrss_mb": round(ru, 1), "peak_reset": was_reset,
    }


def run_case(a: argparse.Namespace) -> dict[str, Any]:
    """Time one case in this process (the child)."""
    setup_process(a.threads, a.malloc)
    torch.manual_seed(0)
    model = make_net(a.net, a.ways)
    batch = make_batch(a.meta_batch, a.ways, a.shots, a.queries)
    run = step_fn(a.case, model, a)
    m = measure(run, batch, a.warmup, a.iters)
    return {
        "case": a.case, "order": a.order, "net": a.net, "meta_batch": a.meta_batch, "steps": a.steps,
        "malloc": a.malloc, "threads": a.threads, "s_per_iter": m["s_per_iter"],
        "cpu_s_per_iter": m["cpu_s_per_iter"], "iters": a.iters, "peak_rss_mb": m["peak_rss_mb"],
        "peak_above_start_mb": m["peak_above_start_mb"],
    }


def spawn(a: argparse.Namespace, flop: int = 0, peak: float = 0.0, **over: Any) -> dict[str, Any] | None:
    """Run one case in a child process and print its line; with ``flop`` (the iteration's FLOPs) and
    ``peak`` (GFLOP/s), its achieved GFLOP/s and share of that peak too."""
    args = {**vars(a), **over}
    cmd = [sys.executable, __file__, "--child"]
    for k in ("case", "order", "net", "meta_batch", "steps", "malloc", "threads", "iters", "warmup",
              "ways", "shots", "queries", "inner_lr"):
        cmd += [f"--{k.replace('_', '-')}", str(args[k])]
    cmd += ["--adapt-norm"] if args["adapt_norm"] else ["--no-adapt-norm"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["?"])[-1]
        print(json.dumps({"case": args["case"], "order": args["order"], "skipped": last}), flush=True)
        return None
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if flop:
        rate = flop / result["s_per_iter"] / 1e9
        result |= {"gflop_per_iter": round(flop / 1e9, 3), "gflops": round(rate, 2),
                   "share_of_conv_peak": round(rate / peak, 3)}
    print(json.dumps(result), flush=True)
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", default=CASES, choices=CASES + EXTRA_CASES)
    p.add_argument("--orders", nargs="+", type=int, default=[2, 1], choices=[1, 2])
    p.add_argument("--net", default="maxpool", choices=["maxpool", "strided"],
                   help="Conv4 with max-pooling (the peers' usual) or the MAML paper's strided Conv4")
    p.add_argument("--meta-batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=1)
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--shots", type=int, default=1)
    p.add_argument("--queries", type=int, default=5)
    p.add_argument("--inner-lr", type=float, default=0.4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=10, help="timed iterations per case (median reported)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--peer-malloc", default="default", choices=["default", "keep", "tight"])
    p.add_argument("--adapt-norm", action=argparse.BooleanOptionalAction, default=True,
                   help="metashot adapts batch-norm scale/shift too, the same work as the peers do")
    p.add_argument("--sweep", action="store_true",
                   help="metashot's peak memory against inner steps and meta-batch, 1st and 2nd order")
    # the child's own arguments
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--order", type=int, default=2, help=argparse.SUPPRESS)
    p.add_argument("--malloc", default="keep", help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(run_case(a)))
        return
    if a.sweep:
        for order in a.orders:
            for case in ("metashot-loop", "metashot-loop-graph", "metashot-vmap"):
                for steps, mb in ((1, 8), (1, 32), (2, 32), (5, 32), (1, 64)):
                    spawn(a, case=case, order=order, steps=steps, meta_batch=mb, malloc="default")
        return
    from flops import conv_peak

    torch.set_num_threads(a.threads)
    peak = conv_peak(28)
    print(json.dumps(peak), flush=True)
    for order in a.orders:
        res = {}
        flop = step_flops(a, order)
        for case in a.cases:
            peer = not case.startswith("metashot")
            r = spawn(a, flop, peak["gflops_best"], case=case, order=order,
                      malloc=a.peer_malloc if peer else "keep")
            if r is not None:
                res[case] = r
        peers = {c: r for c, r in res.items() if c in PEERS}
        if peers and any(c.startswith("metashot") for c in res):
            fastest = min(peers, key=lambda c: peers[c]["s_per_iter"])
            ratios = {
                c: round(peers[fastest]["s_per_iter"] / r["s_per_iter"], 3)
                for c, r in res.items() if c.startswith(("metashot", "torch-loop"))
            }
            fastest_cpu = min(peers, key=lambda c: peers[c]["cpu_s_per_iter"])
            cpu_ratios = {
                c: round(peers[fastest_cpu]["cpu_s_per_iter"] / r["cpu_s_per_iter"], 3)
                for c, r in res.items() if c.startswith(("metashot", "torch-loop"))
            }
            mem = {c: round(r["peak_above_start_mb"] / peers[fastest]["peak_above_start_mb"], 3)
                   for c, r in res.items() if c.startswith("metashot")}
            print(json.dumps({"order": order, "fastest_peer": fastest, "speedup_vs_fastest_peer": ratios,
                              "conv_peak_gflops": peak["gflops_best"],
                              "fastest_peer_cpu_time": fastest_cpu, "cpu_speedup_vs_fastest_peer": cpu_ratios,
                              "memory_vs_fastest_peer": mem}), flush=True)


if __name__ == "__main__":
    main()
