"""Episodes per second of the natural-image loader against the peers' per-image PIL pipeline, and the
loader's share of a Conv4 ProtoNet training step.

Data: generated 84x84 RGB uint8 noise (random pixels: every step below costs the same whatever the pixels
hold) in miniImageNet's cache layout, ``mini-imagenet-cache-{train,val,test}.pkl`` with 64 / 16 / 20
classes of ``--per-class`` images (60: an episode reads 16 images of 5 classes, so the full 600 would
change only which pages are touched), written to a temporary folder that is deleted at the end. The
source's decode-once ``.npy`` cache is built before any timing. Episodes: training episodes, 5-way 1-shot
15-query (80 images), normalised with miniImageNet's mean and std, one per batch.

Measurements, each of ``--episodes`` episodes after ``--warmup`` untimed ones from the same loader (which
also absorb the DataLoader workers' start), medians over ``--repeats`` (the order alternates between
repeats), one JSON line each:

- ``gather``: the ceiling a loader can reach here: the sampler's index tensors drawn beforehand, then only
  the images gathered from the memory-mapped cache and scaled (``.float() / 255``); every loader line's
  ``share_of_gather`` is its rate over this one, measured in the same run;
- ``metashot``: ``source.loader("train", ...)`` with task_args ``augment`` ``crop-jitter-flip`` at
  ``workers`` 0 and 2, each batch moved ``.to("cpu")``, where a CPU-only run scales, augments (batched,
  kornia) and normalises it; ``augment: none`` at workers 0 is the floor (the loader without augmentation);
- ``peer``: the peers' way (MetaOptNet's and RFS's transforms, batched as easyfsl's TaskSampler and
  LibFewShot's sampler batch), written here since torchvision does not import beside this torch: a
  ``Dataset`` of single images from the same uint8 array, each item ``Image.fromarray`` then
  torchvision's transforms as they run on PIL images, RandomCrop(84, padding=8) (``ImageOps.expand``, a
  crop at a random offset), ColorJitter(0.4, 0.4, 0.4) (``ImageEnhance`` Brightness / Contrast / Color in
  a random order, factors U[0.6, 1.4]), RandomHorizontalFlip, ToTensor, Normalize, drawn from torch's RNG
  as torchvision draws them; batched by an episodic batch sampler (5 classes x 16 images, Python's
  ``random`` as easyfsl's TaskSampler) and collated by stacking, at ``num_workers`` 0 and 2;
- ``step``: a Conv4 ProtoNet training step (``ProtoNet.build``, Adam: loss, backward, step) on an episode
  of the same shape, then ``share`` lines: the loader's share of (loader + step) per episode, the two run
  one after the other (workers can shorten the wait, but the CPU time they take comes off the step's);
- ``ratio``: metashot's episodes/s over the peer's at the same workers (median of per-repeat ratios);
- ``machine``, before and after: two processes' throughput over one's on a pure-Python loop, what two
  workers can gain here at most (2.0: two free cores; less when the cores are shared or busy).

``metashot.process.keep_freed_memory()``, which ``metashot train`` sets, is a process-wide, irreversible
glibc setting (freed memory kept for the next allocation instead of unmapped, so an episode's buffers do not
fault their pages in again), so every repeat runs two fresh processes, one with the default allocator
and one with it (``malloc``: default, keep; their order alternates), each making every measurement. The
headline ratio pairs metashot as ``metashot train`` runs it (keep) with the peer's way as it runs
(default), repeat by repeat; the ratios at one setting follow.

Goal: metashot 3x the peer's way or more at the same workers, and the loader never the bottleneck of a
Conv4 ProtoNet step (a share of a few percent at most). Torch runs ``--threads`` threads in each
measuring process; DataLoader workers run one each. The default run takes about 3 minutes on 2 cores.

    OMP_NUM_THREADS=1 python benchmarks/loader_speed.py
    OMP_NUM_THREADS=1 python benchmarks/loader_speed.py --episodes 4 --repeats 1 --steps 1  # a check
    OMP_NUM_THREADS=2 python benchmarks/loader_speed.py --threads 2
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import pickle
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance, ImageOps
from torch.utils.data import DataLoader, Dataset, Sampler

from metashot.batches import Episode, TaskInfo
from metashot.config import Config
from metashot.data.miniimagenet import MEAN, STD
from metashot.data.tasks import build_source
from metashot.methods.protonet import ProtoNet
from metashot.process import keep_freed_memory

CLASSES = {"train": 64, "val": 16, "test": 20}
SIZE, PADDING, JITTER = 84, 8, 0.4
WAYS, SHOTS, QUERIES = 5, 1, 15
WORKERS = (0, 2)


def write_cache_layout(root: Path, per_class: int, seed: int = 0) -> int:
    """miniImageNet's cache layout in ``root``: per part, ``image_data`` uint8 noise [N, 84, 84, 3] and
    ``class_dict`` {wnid: rows}; returns the images' bytes."""
    rng = np.random.default_rng(seed)
    total, first = 0, 0
    for part, classes in CLASSES.items():
        images = rng.integers(0, 256, (classes * per_class, SIZE, SIZE, 3), dtype=np.uint8)
        rows = np.arange(len(images)).reshape(classes, per_class)
        class_dict = {f"n{first + c:08d}": rows[c].tolist() for c in range(classes)}
        with open(root / f"mini-imagenet-cache-{part}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)
        total, first = total + images.nbytes, first + classes
    return total


def metashot_source(root: Path, augment: str, workers: int) -> Any:
    task_args = {"augment": augment, "workers": workers}
    cfg = Config(task="miniimagenet", data_dir=str(root), task_args=task_args, ways=WAYS, shots=SHOTS,
                 queries=QUERIES, train_queries=QUERIES)
    return build_source(cfg)


# -- the peers' way ---------------------------------------------------------------------------------

def random_crop(img: Image.Image, size: int, padding: int) -> Image.Image:
    """torchvision's RandomCrop(size, padding) on a PIL image: zero border, then a crop at a random offset."""
    img = ImageOps.expand(img, border=padding, fill=0)
    top = int(torch.randint(0, img.height - size + 1, (1,)).item())
    left = int(torch.randint(0, img.width - size + 1, (1,)).item())
    return img.crop((left, top, left + size, top + size))


def color_jitter(img: Image.Image, jitter: float) -> Image.Image:
    """torchvision's ColorJitter(jitter, jitter, jitter) on a PIL image: its 4 steps in a random order
    (hue, step 3, is off), each factor uniform over [1 - jitter, 1 + jitter]."""
    order = torch.randperm(4).tolist()
    factors = [float(torch.empty(1).uniform_(1 - jitter, 1 + jitter)) for _ in range(3)]
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for step in order:
        if step < 3:
            img = enhancers[step](img).enhance(factors[step])
    return img


class PeerImages(Dataset):
    """Single images of a uint8 [N, H, W, 3] array, each through torchvision's PIL transforms: RandomCrop
    with padding, ColorJitter, RandomHorizontalFlip, ToTensor, Normalize (MetaOptNet's, RFS's order)."""

    def __init__(self, images: np.ndarray, labels: list[int]) -> None:
        self.images, self.labels = images, labels
        self.mean = torch.tensor(MEAN).view(3, 1, 1)
        self.std = torch.tensor(STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img = color_jitter(random_crop(Image.fromarray(self.images[i]), SIZE, PADDING), JITTER)
        if torch.rand(1) < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        x = torch.from_numpy(np.array(img, np.uint8, copy=True)).permute(2, 0, 1).contiguous()
        return x.float().div(255).sub_(self.mean).div_(self.std), self.labels[i]


class EpisodicBatchSampler(Sampler[list[int]]):
    """easyfsl's TaskSampler: per episode ``ways`` classes, then ``per_class`` items of each, drawn with
    Python's ``random``; yields the items' indices, class after class."""

    def __init__(self, labels: list[int], ways: int, per_class: int, episodes: int) -> None:
        self.items: dict[int, list[int]] = {}
        for i, label in enumerate(labels):
            self.items.setdefault(label, []).append(i)
        self.ways, self.per_class, self.episodes = ways, per_class, episodes

    def __len__(self) -> int:
        return self.episodes

    def __iter__(self) -> Iterator[list[int]]:
        for _ in range(self.episodes):
            classes = random.sample(sorted(self.items), self.ways)
            rows = [torch.tensor(random.sample(self.items[c], self.per_class)) for c in classes]
            yield torch.cat(rows).tolist()


def episodic_collate(items: list[tuple[torch.Tensor, int]]) -> Episode:
    """easyfsl's episodic_collate_fn: the items stacked, split into support and query per class, the
    labels renumbered 0..N-1; one episode with a batch dimension of 1."""
    images = torch.cat([x.unsqueeze(0) for x, _ in items]).reshape(WAYS, SHOTS + QUERIES, 3, SIZE, SIZE)
    classes = list(dict.fromkeys(label for _, label in items))
    labels = torch.tensor([classes.index(label) for _, label in items]).reshape(WAYS, SHOTS + QUERIES)
    return Episode(images[:, :SHOTS].reshape(1, -1, 3, SIZE, SIZE), labels[:, :SHOTS].reshape(1, -1),
                   images[:, SHOTS:].reshape(1, -1, 3, SIZE, SIZE), labels[:, SHOTS:].reshape(1, -1), WAYS)


# -- the timed sections -----------------------------------------------------------------------------

def timed(batches: Iterator[Any], finish: Callable[[Any], Any], warmup: int) -> float:
    """Seconds to draw (and ``finish``) what is left of ``batches`` after ``warmup`` untimed ones."""
    for _ in range(warmup):
        finish(next(batches))
    start = time.perf_counter()
    for batch in batches:
        finish(batch)
    return time.perf_counter() - start


def run_metashot(source: Any, episodes: int, warmup: int, seed: int) -> float:
    return timed(iter(source.loader("train", warmup + episodes, seed=seed)), lambda b: b.to("cpu"), warmup)


def run_peer(images: PeerImages, workers: int, episodes: int, warmup: int, seed: int) -> float:
    random.seed(seed)
    torch.manual_seed(seed)
    sampler = EpisodicBatchSampler(images.labels, WAYS, SHOTS + QUERIES, warmup + episodes)
    loader = DataLoader(images, batch_sampler=sampler, num_workers=workers, collate_fn=episodic_collate)
    return timed(iter(loader), lambda b: b, warmup)


def run_gather(data: Any, episodes: int, warmup: int, seed: int) -> float:
    indices = [item.indices for item in data.sampler(ways=WAYS, shots=SHOTS, queries=QUERIES,
                                                     episodes=warmup + episodes, seed=seed)]
    return timed(iter(indices), lambda idx: data.gather(idx).float().div_(255), warmup)


def run_step(episode: Episode, steps: int, warmup: int) -> float:
    torch.manual_seed(0)
    method = ProtoNet.build(TaskInfo((3, SIZE, SIZE), WAYS, WAYS))
    optimizer = torch.optim.Adam(method.parameters(), lr=1e-3)
    method.train()

    def step(_: int) -> None:
        loss, _ = method.loss(episode)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return timed(iter(range(warmup + steps)), step, warmup)


def sections(root: Path) -> dict[str, Callable[[int, int, int], float]]:
    """Each measurement's name and its (episodes, warmup, seed) -> seconds."""
    floor = metashot_source(root, "none", 0)
    data = floor.dataset("train")  # builds the cache, once
    by_workers = {w: metashot_source(root, "crop-jitter-flip", w) for w in WORKERS}
    array = data.flat.permute(0, 2, 3, 1).numpy()  # the same memory-mapped uint8 [N, 84, 84, 3] array
    labels = torch.arange(data.num_classes).repeat_interleave(data.class_sizes).tolist()
    peer = PeerImages(array, labels)
    out: dict[str, Callable[[int, int, int], float]] = {
        "gather": lambda n, w, s: run_gather(data, n, w, s),
        "metashot augment=none workers=0": lambda n, w, s: run_metashot(floor, n, w, s),
    }
    for workers in WORKERS:
        src = by_workers[workers]
        out[f"metashot workers={workers}"] = lambda n, w, s, src=src: run_metashot(src, n, w, s)
        out[f"peer workers={workers}"] = lambda n, w, s, k=workers: run_peer(peer, k, n, w, s)
    return out


def spin(_: int) -> float:
    """Seconds of a fixed pure-Python loop (one core's worth of work, no threads)."""
    start = time.perf_counter()
    total = 0
    for i in range(5_000_000):
        total += i
    return time.perf_counter() - start


def parallel_speedup() -> float:
    """How many times one process's work two processes get done at once here (2.0: two free cores)."""
    alone = statistics.median(spin(0) for _ in range(3))
    with multiprocessing.get_context("fork").Pool(2) as pool:
        pool.map(spin, [0, 0])  # the pool's start
        both = max(pool.map(spin, [0, 0]))  # until both are done
    return 2 * alone / both


# -- the children: one repeat under one allocator setting ------------------------------------------

def run_child(a: argparse.Namespace) -> None:
    """Every measurement once (the order alternating between repeats), in this fresh process."""
    torch.set_num_threads(a.threads)
    if a.malloc == "keep" and not keep_freed_memory():
        raise SystemExit("keep_freed_memory() did not take (not glibc?)")
    root = Path(a.root)
    runs = sections(root)
    for name in list(runs) if a.repeat % 2 == 0 else list(reversed(runs)):
        seconds = runs[name](a.episodes, a.warmup, a.repeat)
        emit({"name": name, "episodes_per_s": a.episodes / seconds})
    source = metashot_source(root, "crop-jitter-flip", 0)
    episode = next(iter(source.loader("train", 1, seed=0))).to("cpu")
    emit({"name": "step", "s_per_step": run_step(episode, a.steps, 1) / a.steps})


def child(a: argparse.Namespace, root: Path, malloc: str, repeat: int) -> dict[str, float]:
    cmd = [sys.executable, __file__, "--child", "--root", str(root), "--malloc", malloc, "--repeat",
           str(repeat), "--episodes", str(a.episodes), "--warmup", str(a.warmup), "--steps", str(a.steps),
           "--threads", str(a.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"the {malloc} child of repeat {repeat} failed ({proc.returncode})")
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {r["name"]: r.get("episodes_per_s", r.get("s_per_step")) for r in rows}


# -- the report -------------------------------------------------------------------------------------

def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


Runs = dict[str, list[dict[str, float]]]  # per allocator setting, each repeat's results by name


def report(runs: Runs, a: argparse.Namespace) -> None:
    """One line per measurement and allocator setting (median over the repeats), then the step's."""
    common = {"episode": f"{WAYS}w{SHOTS}s{QUERIES}q", "threads": a.threads, "episodes": a.episodes,
              "repeats": a.repeats}
    for name in [n for n in runs["default"][0] if n != "step"]:
        for malloc, rs in runs.items():
            rate, ceiling = (statistics.median(r[key] for r in rs) for key in (name, "gather"))
            emit({"bench": name.split()[0], "name": name, "malloc": malloc, **common,
                  "episodes_per_s": round(rate, 2), "ms_per_episode": round(1e3 / rate, 3),
                  "share_of_gather": round(rate / ceiling, 4),
                  "episodes_per_s_all": [round(r[name], 2) for r in rs]})
    for malloc, rs in runs.items():
        emit({"bench": "step", "name": "protonet conv4 step", "malloc": malloc, **common, "steps": a.steps,
              "ms_per_episode": round(1e3 * statistics.median(r["step"] for r in rs), 1),
              "s_all": [round(r["step"], 3) for r in rs]})


def report_shares(runs: Runs) -> None:
    """The loader's share of (loader + step) per episode, the step at the same allocator setting."""
    for malloc, rs in runs.items():
        step = statistics.median(r["step"] for r in rs)
        for name in [n for n in rs[0] if n.startswith(("metashot workers", "peer"))]:
            loader = 1 / statistics.median(r[name] for r in rs)
            emit({"bench": "share", "name": name, "malloc": malloc, "loader_ms": round(1e3 * loader, 3),
                  "step_ms": round(1e3 * step, 1),
                  "loader_share_of_loader_plus_step": round(loader / (loader + step), 4)})


def report_ratios(runs: Runs) -> None:
    """metashot over the peer's way at the same workers, the median of the per-repeat ratios: metashot as
    ``metashot train`` runs it (keep) over the peers as they run (default), then at one setting each."""
    for workers in WORKERS:
        mine, theirs = f"metashot workers={workers}", f"peer workers={workers}"
        for m_mine, m_theirs in (("keep", "default"), ("default", "default"), ("keep", "keep")):
            ratios = [x[mine] / y[theirs] for x, y in zip(runs[m_mine], runs[m_theirs], strict=True)]
            emit({"bench": "ratio", "workers": workers, "metashot_malloc": m_mine, "peer_malloc": m_theirs,
                  "metashot_over_peer": round(statistics.median(ratios), 2), "goal": 3.0})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=100, help="timed episodes per loader measurement")
    p.add_argument("--warmup", type=int, default=3, help="untimed episodes before each loader measurement")
    p.add_argument("--repeats", type=int, default=3, help="repeats of every measurement (medians reported)")
    p.add_argument("--steps", type=int, default=2, help="timed ProtoNet steps per repeat (after one untimed)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each measuring process")
    p.add_argument("--per-class", type=int, default=60, help="generated images per class")
    # a child's own arguments
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--malloc", default="default", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        run_child(a)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the temporary folder goes
    root = Path(tempfile.mkdtemp(prefix="metashot-bench-loader-"))
    try:
        start = time.perf_counter()
        nbytes = write_cache_layout(root, a.per_class)
        metashot_source(root, "none", 0).dataset("train")  # builds the cache, once
        emit({"bench": "data", "images_bytes": nbytes, "per_class": a.per_class, "classes": CLASSES,
              "setup_s": round(time.perf_counter() - start, 1)})
        emit({"bench": "machine", "when": "before", "two_process_speedup": round(parallel_speedup(), 2)})
        runs: Runs = {"default": [], "keep": []}
        for r in range(a.repeats):
            for malloc in list(runs) if r % 2 == 0 else list(reversed(runs)):
                runs[malloc].append(child(a, root, malloc, r))
        report(runs, a)
        report_shares(runs)
        report_ratios(runs)
        emit({"bench": "machine", "when": "after", "two_process_speedup": round(parallel_speedup(), 2)})
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
