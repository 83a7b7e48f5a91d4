"""Episodes per second of the Omniglot training loader with its images on the device (``data_on_device``)
against the CPU gather with pinned memory and ``.to(device, non_blocking=True)``.

Shapes, the presets' training episodes on real Omniglot (``--data-dir``, else ``$METASHOT_DATA``; the
random split with rotations, its train part): ``maml-omniglot-20w1s`` (20-way 1-shot 1-query, meta-batch
16) and ``protonet-omniglot-20w1s`` (60-way 1-shot 5-query, one episode per batch).

Modes, each ``--episodes`` episodes after ``--warmup`` untimed batches from the same loader, the clock
stopped after a device synchronize (every copy and gather done), medians over ``--repeats`` (the modes
alternate within a repeat):

- ``cpu-pinned``: the library's CPU loader (each episode gathered on the CPU, the batch stacked) at
  ``--workers`` DataLoader workers (0: in this process), its batches pinned (the DataLoader's pinning,
  CUDA only) and moved ``.to(device, non_blocking=True)``;
- ``device``: ``source.loader`` with ``data_on_device``: the part's images moved once, each batch gathered
  there with one index from the same sampler's CPU indices; ``.to(device)`` is then a no-op.

Prints one JSON line per measurement: ``env`` (torch, the device and its name, the train part's images and
bytes); ``{"bench": "loader", "shape", "mode", "workers", "episodes_per_s", "ms_per_batch"}``, the
``device`` line with ``ratio`` (its rate over each ``cpu-pinned`` line's, by workers); and per shape a
``check`` line: the two modes' first batches equal, and on CUDA whether a ``device`` batch synced with the
host (``torch.cuda.set_sync_debug_mode("error")``). On the CPU both modes gather on the CPU and nothing is
pinned: a dry run of the script, not a measurement of the feature.

    OMP_NUM_THREADS=1 python benchmarks/data_on_device.py --device cpu --episodes 64 --repeats 1
    python benchmarks/data_on_device.py --device cuda --data-dir /data/omniglot
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Iterable
from typing import Any

import torch

from metashot import presets
from metashot.batches import Episode
from metashot.config import Config
from metashot.data.fewshot import episode_loader
from metashot.data.tasks import build_source
from metashot.devices import check_device

SHAPES = ("maml-omniglot-20w1s", "protonet-omniglot-20w1s")


class PinnableEpisode(Episode):
    """An :class:`Episode` that the DataLoader's pinning pins (it pins what has ``pin_memory``)."""

    def pin_memory(self) -> PinnableEpisode:
        return PinnableEpisode(*(getattr(self, n).pin_memory() for n in self.TENSORS), num_ways=self.num_ways)


def config(preset: str, device: str, data_dir: str | None, on_device: bool) -> Config:
    return presets.get(preset).override(device=device, data_dir=data_dir, data_on_device=on_device)


def cpu_loader(source: Any, episodes: int, workers: int, device: torch.device) -> Iterable[Any]:
    """The library's CPU episode loader of the train part, its batches pinned on CUDA."""
    sampler = source.sampler("train", episodes, seed=0, start=0, rank=0, world_size=1)
    return episode_loader(source.dataset("train"), sampler, source.cfg.meta_batch, 1, workers,
                          pin_memory=device.type == "cuda", collate_fn=PinnableEpisode.collate)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(batches: Iterable[Any], device: torch.device, warmup: int) -> float:
    """Episodes per second over ``batches`` after the first ``warmup``, each moved to ``device`` without
    blocking."""
    it = iter(batches)
    for _ in range(warmup):
        next(it).to(device)
    sync(device)
    start, episodes = time.perf_counter(), 0
    for batch in it:
        episodes += batch.to(device).support.shape[0]
    sync(device)
    return episodes / (time.perf_counter() - start)


def host_synced(source: Any, device: torch.device) -> bool | None:
    """Whether drawing and moving a ``device`` batch synchronises with the host (CUDA only, else None)."""
    if device.type != "cuda":
        return None
    batches = iter(source.loader("train", 2 * source.cfg.meta_batch, seed=1))
    next(batches)
    torch.cuda.set_sync_debug_mode("error")
    try:
        next(batches).to(device)
        return False
    except RuntimeError:
        return True
    finally:
        torch.cuda.set_sync_debug_mode("default")


def first_batches_equal(cpu: Any, on: Any) -> bool:
    a = next(iter(cpu.loader("train", cpu.cfg.meta_batch, seed=0)))
    b = next(iter(on.loader("train", on.cfg.meta_batch, seed=0)))
    return all(torch.equal(getattr(a, n), getattr(b, n).cpu()) for n in Episode.TENSORS)


def bench(preset: str, args: argparse.Namespace, device: torch.device) -> None:
    cpu = build_source(config(preset, str(device), args.data_dir, False))
    on = build_source(config(preset, str(device), args.data_dir, True))
    data = cpu.dataset("train")
    print(json.dumps({"bench": "env", "shape": preset, "torch": torch.__version__, "device": str(device),
                      "name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                      "train_images": len(data), "train_mb": round(data.flat.nbytes / 2**20, 1),
                      "ways": on.cfg.train_ways, "shots": on.cfg.train_shots,
                      "queries": on.cfg.train_queries, "meta_batch": on.cfg.meta_batch}), flush=True)
    on.gathered("train")  # moved once, before any timing
    episodes = args.episodes - args.episodes % on.cfg.meta_batch
    warmup = args.warmup * on.cfg.meta_batch
    runs: dict[str, list[float]] = {}
    for _ in range(args.repeats):
        for workers in args.workers:
            batches = cpu_loader(cpu, episodes + warmup, workers, device)
            runs.setdefault(f"cpu-pinned:{workers}", []).append(rate(batches, device, args.warmup))
        batches = on.loader("train", episodes + warmup, seed=0)
        runs.setdefault("device:0", []).append(rate(batches, device, args.warmup))
    per_batch = on.cfg.meta_batch
    medians = {key: statistics.median(values) for key, values in runs.items()}
    for key, value in medians.items():
        mode, workers = key.split(":")
        line = {"bench": "loader", "shape": preset, "mode": mode, "workers": int(workers),
                "episodes_per_s": round(value, 1), "ms_per_batch": round(1000 * per_batch / value, 3),
                "episodes": episodes, "repeats": args.repeats}
        if mode == "device":
            line["ratio"] = {f"cpu-pinned:{w}": round(value / medians[f"cpu-pinned:{w}"], 2)
                             for w in args.workers}
        print(json.dumps(line), flush=True)
    print(json.dumps({"bench": "check", "shape": preset, "same_episodes": first_batches_equal(cpu, on),
                      "device_batch_synced_host": host_synced(on, device)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="cpu here, cuda on a GPU machine")
    parser.add_argument("--data-dir", default=os.environ.get("METASHOT_DATA"))
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=SHAPES)
    parser.add_argument("--episodes", type=int, default=1_600, help="timed episodes per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="untimed batches first")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader workers of the CPU gather")
    args = parser.parse_args()
    device = check_device(args.device)
    for preset in args.shapes:
        bench(preset, args, device)


if __name__ == "__main__":
    main()
