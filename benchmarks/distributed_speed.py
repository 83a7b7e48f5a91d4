"""Distributed training throughput: 1 process x 1 thread, 1 process x 2 threads, 2 processes x 1 thread.

The trainer's own step (``method.loss``, backward, :meth:`World.sync_step` — the one all-reduce of the
gradients and stop flags — and the Adam step) on random inputs at the presets' shapes:

- ``maml-loop`` / ``maml-vmap``: the ``maml-omniglot-5w1s`` preset (strided Conv4, 5-way 1-shot, 1 query
  per class, meta-batch 32, 1 inner step, second order), tasks in a loop or under vmap;
- ``protonet``: ProtoNet's 60-way 1-shot 5-query training episodes (Conv4), meta-batch 2 (one episode per
  process with 2 processes).

Each layout runs in its own processes (2 processes under ``torchrun`` on 127.0.0.1 with gloo). Prints one
JSON line per case and layout: median seconds per step, meta-iterations or episodes per second, the
all-reduce's share of the step, and the scaling efficiency of 2 processes over 1 process x 1 thread
(speed-up / 2).

    python benchmarks/distributed_speed.py --steps 10 --warmup 2
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import torch

CASES = ("maml-loop", "maml-vmap", "protonet")
LAYOUTS = ((1, 1), (1, 2), (2, 1))  # (processes, threads per process)


def build(case: str, world_size: int) -> tuple[Any, Any]:
    from metashot.batches import Episode, TaskInfo
    from metashot.methods import build_method
    from metashot.presets import get

    if case.startswith("maml"):
        cfg = get("maml-omniglot-5w1s")
        args = {**cfg.method_args, "tasks": case.removeprefix("maml-")}
        ways, shots, queries, batch = 5, 1, 1, cfg.meta_batch
    else:
        cfg = get("protonet-omniglot-5w1s")
        args, ways, shots, queries, batch = cfg.method_args, 60, 1, 5, 2
    method = build_method(cfg.replace(method_args=args), TaskInfo((1, 28, 28), ways, ways))
    b = batch // world_size
    g = torch.Generator().manual_seed(0)
    labels = [torch.arange(ways).repeat_interleave(n).expand(b, -1).contiguous() for n in (shots, queries)]
    episode = Episode(torch.rand(b, ways * shots, 1, 28, 28, generator=g), labels[0],
                      torch.rand(b, ways * queries, 1, 28, 28, generator=g), labels[1], num_ways=ways)
    return method, episode


def worker(a: argparse.Namespace) -> None:
    from metashot.distributed import World
    from metashot.process import keep_freed_memory

    torch.set_num_threads(a.threads)
    keep_freed_memory()
    world = World.from_env("cpu")
    torch.manual_seed(0)
    method, episode = build(a.case, world.size)
    optimizer = torch.optim.Adam(method.parameters(), 1e-3)
    steps, syncs = [], []
    for i in range(a.warmup + a.steps):
        start = time.perf_counter()
        loss, _ = method.loss(episode)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        mid = time.perf_counter()
        world.sync_step(method.parameters(), [0.0, 0.0])
        synced = time.perf_counter()
        optimizer.step()
        if i >= a.warmup:
            steps.append(time.perf_counter() - start)
            syncs.append(synced - mid)
    if world.writer:
        print(json.dumps({"step_s": statistics.median(steps), "allreduce_s": statistics.median(syncs)}))
    world.close()


def run(a: argparse.Namespace, case: str, processes: int, threads: int) -> dict[str, Any]:
    args = ["--worker", "--case", case, "--threads", str(threads), "--steps", str(a.steps),
            "--warmup", str(a.warmup)]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "GLOO_SOCKET_IFNAME": "lo"}
    if processes == 1:
        cmd = [sys.executable, __file__, *args]
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={processes}",
               "--local-addr=127.0.0.1", "--master-addr=127.0.0.1", f"--master-port={port}", __file__, *args]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.worker:
        worker(a)
        return
    for case in a.cases:
        unit, per_step = ("meta_iterations_per_s", 1) if case.startswith("maml") else ("episodes_per_s", 2)
        base = None
        for processes, threads in LAYOUTS:
            r = run(a, case, processes, threads)
            base = base or r["step_s"]
            line = {"case": case, "processes": processes, "threads": threads, "step_s": round(r["step_s"], 4),
                    unit: round(per_step / r["step_s"], 3),
                    "allreduce_share": round(r["allreduce_s"] / r["step_s"], 4)}
            if processes > 1:
                line["scaling_efficiency"] = round(base / r["step_s"] / processes, 3)
            print(json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
