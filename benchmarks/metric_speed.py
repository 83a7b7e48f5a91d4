"""Metric-based training throughput on real Omniglot: metashot against easyfsl, for Prototypical
Networks (``--method protonet``, the default) or Matching Networks (``--method matching``).

Prints one JSON line per measurement:

- ``{"bench": "load", ...}``: Omniglot load time, cold (decode both zips, resize, write the cache, read
  it) and warm (read the cache), in a fresh folder of links to the zips (the zips' own folder is never
  written). The zips are read through the page cache: "cold" means no metashot cache, not a cold disk.
- ``{"bench": "train", "library": ..., "episode": "5w1s15q", "malloc": ..., "episodes_per_s": ...}``: a
  full training step, data included, as each library is used: metashot as ``Trainer.fit`` runs it
  (``episode_loader`` over ``Omniglot.classes("random", "train")``, the method's ``loss``, Adam, StepLR,
  the running loss sum); easyfsl with its own data path (a ``FewShotDataset`` of single images with
  ``get_labels()``, its ``TaskSampler`` as batch sampler and its ``episodic_collate_fn``, then
  ``process_support_set`` on the support images, the model on the query images, its loss, Adam).
  Matching Networks: easyfsl's are always the FCE variant, with as many attention-LSTM steps as support
  examples; metashot's run with ``fce=True`` and the same number of processing steps.
  Both use metashot's ``Conv4`` built from the same seed, ``num_workers=0`` and ``--threads`` threads.
  ``data_share`` is the part of the step spent in ``next(loader)`` (sampling, gathering, collating).
- ``{"bench": "ratio", ...}``: metashot's episodes/s over easyfsl's (median of the per-repeat ratios),
  and the effect of ``metashot.process.keep_freed_memory()`` on each library.

``keep_freed_memory()`` is a process-wide, irreversible glibc setting that `metashot train` makes, so
every repeat runs two subprocesses, one with the default allocator and one with it, one after the other;
inside each, metashot and easyfsl alternate (who goes first alternates between repeats). The headline
ratio, metashot as `metashot train` runs (``malloc: keep``) over easyfsl as it runs (``malloc: default``),
pairs the two subprocesses of the same repeat; the ratios at one allocator setting pair the two
libraries' runs inside one process.

    python benchmarks/metric_speed.py                                   # ProtoNet: the whole comparison
    python benchmarks/metric_speed.py --method matching --no-load       # Matching Networks (FCE)
    OMP_NUM_THREADS=1 python benchmarks/metric_speed.py --threads 1 --episodes 3 --repeats 1  # a check
    python benchmarks/metric_speed.py --no-easyfsl --episodes 5w1s15q=100 60w5s5q=20

easyfsl: ``pip install easyfsl`` (it is not a metashot dependency). Its methods import torchvision;
see ``import_easyfsl`` for the two lines it needs beside a CPU-only torch.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"
ZIPS = ("images_background.zip", "images_evaluation.zip")
SHAPES = {"5w1s15q": (5, 1, 15), "20w1s5q": (20, 1, 5), "60w5s5q": (60, 5, 5)}
DEFAULT_EPISODES = {"5w1s15q": 40, "20w1s5q": 20, "60w5s5q": 10}
DEFAULT_SHAPES = {"protonet": ["5w1s15q", "60w5s5q"], "matching": ["5w1s15q", "20w1s5q"]}
LIBRARIES = ("metashot", "easyfsl")


def import_torchvision() -> None:
    """Import torchvision beside a CPU-only torch, or leave it absent.

    The torchvision wheel from PyPI is built against a CUDA torch; beside a CPU-only torch its C extension
    does not load, and ``import torchvision`` then stops at ``register_fake("torchvision::nms")``:
    "operator torchvision::nms does not exist" (and, once that is defined, the same for
    ``torchvision::qnms``); every other op's registration is skipped when the extension is missing.
    Defining those two schemas and importing again is enough for the peers measured here, which use
    neither op. Nothing is defined when torchvision imports by itself (a matching build), so a working
    install is left alone.
    """
    try:
        import torchvision  # noqa: F401
    except RuntimeError as e:
        if "operator torchvision::" not in str(e):
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]  # the half-run import, so that it runs again from the top
        for op in ("nms", "qnms"):
            torch.library.define(
                f"torchvision::{op}", "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"
            )
        import torchvision  # noqa: F401
    except ImportError:
        pass


def import_easyfsl() -> Any:
    """Import easyfsl's methods module and TaskSampler. ``easyfsl.methods`` imports torchvision (for its
    ResNets): see :func:`import_torchvision`. easyfsl's TaskSampler needs a second, smaller shim against
    current torch (below).
    """
    import_torchvision()
    import easyfsl.methods as methods
    from easyfsl.samplers import TaskSampler

    if "data_source" not in inspect.signature(torch.utils.data.Sampler.__init__).parameters:

        class _TakesDataSource:
            def __init__(self, data_source: Any = None) -> None:
                pass

        class TaskSampler(TaskSampler, _TakesDataSource):  # type: ignore[no-redef]
            """easyfsl 1.5's TaskSampler, unchanged but for one thing: it calls
            ``Sampler.__init__(data_source=None)``, an argument torch deprecated long ago and removed
            in pytorch/pytorch#163134 (``Sampler`` has no ``__init__`` now: "object.__init__() takes
            exactly one argument"). This base, last in the MRO, takes the call; sampling is easyfsl's."""

    return methods, TaskSampler


def link_zips(data_dir: Path) -> Path:
    """A temporary folder with links to the zips: the cache is written there, not next to the zips."""
    missing = [z for z in ZIPS if not (data_dir / z).exists()]
    if missing:
        raise SystemExit(f"{', '.join(missing)} not found in {data_dir}; pass --data-dir")
    root = Path(tempfile.mkdtemp(prefix="metashot-bench-omniglot-"))
    for z in ZIPS:
        (root / z).symlink_to((data_dir / z).resolve())
    return root


# -- the child processes --------------------------------------------------------------------------

def bench_load(a: argparse.Namespace) -> None:
    """Cold then warm ``Omniglot.load`` in ``a.cache_dir`` (which holds links to the zips, no cache)."""
    from metashot.data.omniglot import Omniglot

    torch.set_num_threads(a.threads)
    root = Path(a.cache_dir)
    t = time.perf_counter()
    og = Omniglot.load(root, image_size=28, download_missing=False)
    cold = time.perf_counter() - t
    warm = []
    for _ in range(max(3, a.repeats)):
        t = time.perf_counter()
        og = Omniglot.load(root, image_size=28, download_missing=False)
        warm.append(time.perf_counter() - t)
    t = time.perf_counter()
    train = og.classes("random", "train")
    split = time.perf_counter() - t
    cache = next(root.glob("omniglot-28px-*.npz"))
    print(json.dumps({
        "bench": "load", "cold_s": round(cold, 3), "warm_s": round(statistics.median(warm), 3),
        "warm_s_all": [round(w, 3) for w in warm], "split_s": round(split, 4),
        "images": list(og.images.shape), "train_classes": train.num_classes,
        "cache_mb": round(cache.stat().st_size / 2**20, 1), "threads": a.threads,
    }), flush=True)


def metashot_run(
    dataset: Any, method_name: str, shape: tuple[int, int, int], episodes: int, seed: int
) -> Any:
    """A callable that trains ``episodes`` episodes as ``Trainer.fit`` does and returns per-step times."""
    from metashot.data.fewshot import episode_loader
    from metashot.methods.matching import MatchingNetwork
    from metashot.methods.protonet import ProtoNet
    from metashot.nn.backbones import Conv4

    ways, shots, queries = shape
    torch.manual_seed(0)
    if method_name == "protonet":
        method = ProtoNet(Conv4())
    else:
        method = MatchingNetwork(Conv4(), fce=True, processing_steps=ways * shots)
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, 2_000, 0.5)
    sampler = dataset.sampler(ways=ways, shots=shots, queries=queries, episodes=episodes, seed=seed)
    loader = episode_loader(dataset, sampler)
    method.train()
    sums = torch.zeros(2)

    def run() -> list[tuple[float, float]]:
        times = []
        it = iter(loader)
        for _ in range(episodes):
            t0 = time.perf_counter()
            batch = next(it)
            t1 = time.perf_counter()
            loss, metrics = method.loss(batch.to("cpu"))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            sums.add_(torch.stack([loss.detach(), metrics["acc"].detach().mean()]))
            times.append((t1 - t0, time.perf_counter() - t0))
        return times

    return run


class ImageDataset(torch.utils.data.Dataset):
    """easyfsl's data contract: one (image, label) per item and ``get_labels()``; images held in memory
    (the cheapest data path easyfsl allows: its own EasySet reads an image file per item)."""

    def __init__(self, images: torch.Tensor) -> None:  # [classes, examples, C, H, W] uint8
        self.flat = images.reshape(-1, *images.shape[2:])
        self.labels = torch.arange(images.shape[0]).repeat_interleave(images.shape[1]).tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.flat[i].float().div_(255), self.labels[i]

    def get_labels(self) -> list[int]:
        return self.labels


def easyfsl_run(
    dataset: ImageDataset, method_name: str, shape: tuple[int, int, int], episodes: int, seed: int
) -> Any:
    """easyfsl's training loop (its README and notebooks): TaskSampler, process_support_set, forward;
    cross-entropy on ProtoNet's logits, NLL on Matching Networks' log-probabilities (its docstring)."""
    from metashot.nn.backbones import Conv4

    methods, TaskSampler = import_easyfsl()
    ways, shots, queries = shape
    torch.manual_seed(0)
    if method_name == "protonet":
        model, criterion = methods.PrototypicalNetworks(Conv4()), F.cross_entropy
    else:
        model, criterion = methods.MatchingNetworks(Conv4(), feature_dimension=64), F.nll_loss
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    random.seed(seed)  # TaskSampler draws with Python's random
    sampler = TaskSampler(dataset, n_way=ways, n_shot=shots, n_query=queries, n_tasks=episodes)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, num_workers=0, collate_fn=sampler.episodic_collate_fn
    )
    model.train()

    def run() -> list[tuple[float, float]]:
        times = []
        it = iter(loader)
        for _ in range(episodes):
            t0 = time.perf_counter()
            support_images, support_labels, query_images, query_labels, _ = next(it)
            t1 = time.perf_counter()
            optimizer.zero_grad()
            model.process_support_set(support_images, support_labels)
            loss = criterion(model(query_images), query_labels)
            loss.backward()
            optimizer.step()
            times.append((t1 - t0, time.perf_counter() - t0))
        return times

    return run


def bench_train(a: argparse.Namespace) -> None:
    """One repeat: every shape, each library in turn, under this process's allocator setting."""
    from metashot.data.omniglot import Omniglot
    from metashot.process import keep_freed_memory

    torch.set_num_threads(a.threads)
    kept = keep_freed_memory() if a.malloc == "keep" else False
    if a.malloc == "keep" and not kept:
        raise SystemExit("keep_freed_memory() did not take (not glibc?)")
    train = Omniglot.load(a.cache_dir, image_size=28, download_missing=False).classes("random", "train")
    images = ImageDataset(train.images) if "easyfsl" in a.libraries else None
    order = list(a.libraries) if a.repeat % 2 == 0 else list(reversed(a.libraries))
    for name in a.shapes:
        n = a.episodes[name]
        for lib in order:
            total_n = a.warmup + n
            if lib == "metashot":
                run = metashot_run(train, a.method, SHAPES[name], total_n, seed=a.repeat)
            else:
                run = easyfsl_run(images, a.method, SHAPES[name], total_n, seed=a.repeat)
            c, w = time.process_time(), time.perf_counter()
            times = run()[a.warmup:]
            cpu = (time.process_time() - c) / (time.perf_counter() - w)  # warm-up included
            step = sum(t for _, t in times)
            data = sum(d for d, _ in times)
            print(json.dumps({
                "bench": "train", "method": a.method, "library": lib, "episode": name,
                "malloc": a.malloc, "repeat": a.repeat, "episodes_per_s": round(n / step, 3),
                "s_per_episode": round(step / n, 5), "data_ms_per_episode": round(1e3 * data / n, 3),
                "data_share": round(data / step, 5), "cpu_over_wall": round(cpu, 2),
            }), flush=True)


# -- the parent -----------------------------------------------------------------------------------

def child(a: argparse.Namespace, mode: str, **over: Any) -> list[dict[str, Any]]:
    args = {**vars(a), **over}
    cmd = [sys.executable, __file__, "--child", mode, "--method", args["method"],
           "--cache-dir", str(args["cache_dir"]),
           "--threads", str(args["threads"]), "--repeats", str(args["repeats"]),
           "--warmup", str(args["warmup"]), "--malloc", args["malloc"], "--repeat", str(args["repeat"]),
           "--libraries", *args["libraries"], "--shapes", *args["shapes"],
           "--episodes", *(f"{k}={v}" for k, v in args["episodes"].items())]
    env = {**os.environ, "OMP_NUM_THREADS": str(args["threads"])}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{mode} child failed ({proc.returncode})")
    return [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]


def median(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def summarize(rows: list[dict[str, Any]], a: argparse.Namespace) -> None:
    def select(lib: str, shape: str, malloc: str) -> dict[int, dict[str, Any]]:
        return {r["repeat"]: r for r in rows
                if (r["library"], r["episode"], r["malloc"]) == (lib, shape, malloc)}

    for shape in a.shapes:
        for lib in a.libraries:
            for malloc in a.mallocs:
                rs = list(select(lib, shape, malloc).values())
                if not rs:
                    continue
                print(json.dumps({
                    "bench": "train", "method": a.method, "library": lib, "episode": shape,
                    "malloc": malloc, "threads": a.threads, "episodes": a.episodes[shape], "repeats": len(rs),
                    "episodes_per_s": median([r["episodes_per_s"] for r in rs]),
                    "s_per_episode": round(statistics.median(r["s_per_episode"] for r in rs), 5),
                    "data_ms_per_episode": median([r["data_ms_per_episode"] for r in rs]),
                    "data_share": round(statistics.median(r["data_share"] for r in rs), 5),
                    "episodes_per_s_all": [r["episodes_per_s"] for r in rs],
                }), flush=True)

        def ratio(num: tuple[str, str], den: tuple[str, str], shape: str = shape) -> float | None:
            x, y = select(num[0], shape, num[1]), select(den[0], shape, den[1])
            pairs = [x[i]["episodes_per_s"] / y[i]["episodes_per_s"] for i in x if i in y]
            return median(pairs) if pairs else None

        if set(LIBRARIES) <= set(a.libraries):
            head = ratio(("metashot", "keep"), ("easyfsl", "default"))
            if head is not None:
                print(json.dumps({
                    "bench": "ratio", "method": a.method, "episode": shape, "metashot_over_easyfsl": head,
                    "metashot_malloc": "keep", "easyfsl_malloc": "default",
                    "note": "each library as it runs by default (metashot train keeps freed memory)",
                }), flush=True)
            for malloc in a.mallocs:
                r = ratio(("metashot", malloc), ("easyfsl", malloc))
                if r is not None:
                    print(json.dumps({"bench": "ratio", "method": a.method, "episode": shape,
                                      "metashot_over_easyfsl": r,
                                      "metashot_malloc": malloc, "easyfsl_malloc": malloc,
                                      "note": "same allocator setting, measured in one process"}),
                          flush=True)
        if set(a.mallocs) == {"default", "keep"}:
            for lib in a.libraries:
                r = ratio((lib, "keep"), (lib, "default"))
                if r is not None:
                    print(json.dumps({"bench": "ratio", "method": a.method, "episode": shape, "library": lib,
                                      "keep_freed_memory_speedup": r}), flush=True)


def parse_episodes(items: list[str]) -> dict[str, int]:
    out = dict(DEFAULT_EPISODES)
    for item in items:
        if "=" in item:
            shape, n = item.split("=", 1)
            if shape not in SHAPES:
                raise SystemExit(f"unknown episode shape {shape!r}; known: {', '.join(SHAPES)}")
            out[shape] = int(n)
        else:
            out = dict.fromkeys(SHAPES, int(item))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=SHARED,
                   help="folder with images_background.zip and images_evaluation.zip (never written)")
    p.add_argument("--method", choices=list(DEFAULT_SHAPES), default="protonet")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--episodes", nargs="+", default=[],
                   help="timed episodes per measurement: N for every shape, or SHAPE=N "
                        f"(default {' '.join(f'{k}={v}' for k, v in DEFAULT_EPISODES.items())})")
    p.add_argument("--repeats", type=int, default=5, help="repeats of every measurement (medians reported)")
    p.add_argument("--warmup", type=int, default=3, help="untimed episodes before each measurement")
    p.add_argument("--shapes", nargs="+", choices=list(SHAPES),
                   help="episode shapes (default: 5w1s15q 60w5s5q for protonet, "
                        "5w1s15q 20w1s5q for matching)")
    p.add_argument("--libraries", nargs="+", default=list(LIBRARIES), choices=list(LIBRARIES))
    p.add_argument("--no-easyfsl", dest="libraries", action="store_const", const=["metashot"])
    p.add_argument("--mallocs", nargs="+", default=["default", "keep"], choices=["default", "keep"],
                   help="allocator settings to measure (keep: metashot.process.keep_freed_memory())")
    p.add_argument("--no-load", action="store_true", help="skip the cold/warm load measurement")
    p.add_argument("--raw", action="store_true", help="also print every repeat's own line")
    # the children's own arguments
    p.add_argument("--child", choices=["load", "train"], help=argparse.SUPPRESS)
    p.add_argument("--cache-dir", help=argparse.SUPPRESS)
    p.add_argument("--malloc", default="default", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    a.episodes = parse_episodes(a.episodes)
    a.shapes = a.shapes or DEFAULT_SHAPES[a.method]
    if a.child == "load":
        bench_load(a)
        return
    if a.child == "train":
        bench_train(a)
        return

    if "easyfsl" in a.libraries:
        try:
            import_easyfsl()
        except ImportError as e:
            raise SystemExit(
                f"easyfsl does not import ({e}); pip install easyfsl, or pass --no-easyfsl"
            ) from e
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the temporary folder goes
    a.cache_dir = link_zips(a.data_dir)
    a.malloc, a.repeat = "default", 0
    try:
        if a.no_load:  # still build the cache the training children read
            from metashot.data.omniglot import Omniglot

            Omniglot.load(a.cache_dir, image_size=28, download_missing=False)
        else:
            for row in child(a, "load"):
                print(json.dumps(row), flush=True)
        rows: list[dict[str, Any]] = []
        for r in range(a.repeats):
            mallocs = a.mallocs if r % 2 == 0 else list(reversed(a.mallocs))
            for malloc in mallocs:
                for row in child(a, "train", malloc=malloc, repeat=r):
                    rows.append(row)
                    if a.raw:
                        print(json.dumps(row), flush=True)
        summarize(rows, a)
    finally:
        shutil.rmtree(a.cache_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
