"""Peak resident memory of the natural-image sources at miniImageNet and tieredImageNet size.

Every measurement runs in a fresh subprocess and prints one JSON line: ``peak_rss_mb`` is
``getrusage(RUSAGE_SELF).ru_maxrss`` at the end, ``rss_before_mb`` the process's RSS once torch and
metashot are imported (before any data is touched), ``dataset_bytes`` the images the source holds (its
three parts, uint8) beside ``float_copy_bytes``, what a float32 copy of them would take, so a reader sees
that no float copy and no second copy is held. At the end of the work (with workers: at the last batch,
while they live) the line gives the process's ``Rss`` / ``Pss`` split into anonymous memory and file
pages (``/proc/PID/smaps_rollup``). The memory-mapped cache's pages count in RSS as file pages: clean,
shared with the page cache and with every worker, dropped under memory pressure. A kernel that keeps the
page cache in large folios (Linux 6.x; ``file_pmd_mapped_mb``: 2 MiB ones) maps a whole folio on the
first read of any byte in it, so a few scattered images map far more of the file than they hold.
``workers`` lists each DataLoader worker's own, and ``children_peak_rss_mb`` is ``RUSAGE_CHILDREN``'s (a
forked worker's RSS counts the pages it shares with its parent). The parent imports only the standard
library: a process started by exec keeps its parent's ``ru_maxrss`` as a floor, so a parent that held
torch or the images would raise every child's peak.

Cases (``--cases``):

- ``mini``: generated miniImageNet-size pickles in the ``cache`` layout (``mini-imagenet-cache-*.pkl``,
  protocol 4, 38,400 / 9,600 / 12,000 images of 84x84x3 uint8 in 64 / 16 / 20 classes of 600), then
  ``mini-build``: the first load (``build_source`` + ``dataset("train")``: every pickle read and the
  ``.npy`` cache written), and ``mini-draw``: a second process that opens the cache (memory-mapped) and
  draws ``--episodes`` 5-way 1-shot 15-query training episodes, augmented (crop-jitter-flip) by
  ``batch.to("cpu")``, with 0 and 2 DataLoader workers;
- ``tiered``: a tieredImageNet-size training part, 448,695 images in 351 classes (9.5 GB), with small
  val and test parts (97 and 160 classes of 20 images), written through ``imageset.build_cache`` by an
  ``ImageSetSource`` subclass whose layout generates the images a chunk at a time (``tiered-build``), then
  opened by the same subclass and drawn from as above (``tiered-draw``, 0 and 2 workers).

The images are noise from a pool of 2,048 random images plus an offset per row, all distinct. Everything
is written to one temporary folder (``--dir``; at full size 9.6 GB at most at once), deleted at the end,
also on failure. The pages were just written, so the reads come from the page cache, not a cold disk.
``--scale`` shrinks every class (at least 16 images, what an episode reads) for a quick check.

    OMP_NUM_THREADS=1 python benchmarks/image_memory.py                      # both, full size (~3 min)
    OMP_NUM_THREADS=1 python benchmarks/image_memory.py --scale 0.02 --episodes 20   # a check
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

SIZE = 84
IMAGE_BYTES = SIZE * SIZE * 3
POOL = 2048  # distinct noise images per part; row r is pool[r % POOL] + r // POOL (fewer than 256 offsets)
MINI = {"train": 64, "val": 16, "test": 20}  # classes of 600 images
MINI_PER_CLASS = 600
TIERED = {"train": (351, 448_695), "val": (97, 97 * 20), "test": (160, 160 * 20)}  # (classes, images)
SEEDS = {"train": 1, "val": 2, "test": 3}
MB = 2**20


def emit(row: dict[str, Any]) -> None:
    print(json.dumps(row), flush=True)


# -- what the children read of themselves -----------------------------------------------------------

def max_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    return round(resource.getrusage(who).ru_maxrss / 1024, 1)  # Linux: kB


def memory_mb(pid: int | str = "self") -> dict[str, float]:
    """Rss (and its anonymous part) and Pss (anonymous, file, shared memory) of process ``pid``, in MiB."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0]) / 1024
    names = {"rss_mb": "Rss", "rss_anon_mb": "Anonymous", "pss_mb": "Pss", "pss_anon_mb": "Pss_Anon",
             "pss_file_mb": "Pss_File", "pss_shmem_mb": "Pss_Shmem", "file_pmd_mapped_mb": "FilePmdMapped"}
    return {key: round(fields.get(name, 0.0), 1) for key, name in names.items()}


def child_pids() -> list[int]:
    """This process's live children (its DataLoader workers)."""
    return [int(pid) for task in Path("/proc/self/task").iterdir()
            for pid in (task / "children").read_text().split()]


# -- the data ---------------------------------------------------------------------------------------

def noise_images(seed: int) -> Callable[[Any], Any]:
    """rows (int [n]) -> uint8 [n, 84, 84, 3]: a pool image per row plus the row's offset, all distinct
    (below 256 * POOL rows)."""
    import numpy as np

    pool = np.random.default_rng(seed).integers(0, 256, (POOL, SIZE, SIZE, 3), dtype=np.uint8)

    def images(rows: Any) -> Any:
        rows = np.asarray(rows)
        return pool[rows % POOL] + (rows // POOL).astype(np.uint8)[:, None, None, None]

    return images


def write_mini(root: Path, per_class: int) -> dict[str, Any]:
    """miniImageNet's ``cache`` layout in ``root``: per part ``image_data`` and ``class_dict``."""
    import pickle

    import numpy as np

    first = 0
    for part, classes in MINI.items():
        images = noise_images(SEEDS[part])(np.arange(classes * per_class))
        rows = np.arange(len(images)).reshape(classes, per_class)
        class_dict = {f"n{first + c:08d}": rows[c].tolist() for c in range(classes)}
        with open(root / f"mini-imagenet-cache-{part}.pkl", "wb") as f:
            pickle.dump({"image_data": images, "class_dict": class_dict}, f, protocol=4)
        first += classes
    return {"files_bytes": sum(p.stat().st_size for p in root.glob("*.pkl"))}


def tiered_sizes(scale: float) -> dict[str, list[int]]:
    """Per part, its classes' sizes: TIERED's images spread evenly over its classes, scaled."""
    sizes = {}
    for part, (classes, images) in TIERED.items():
        n = max(16 * classes, round(images * scale))
        sizes[part] = [n // classes + (c < n % classes) for c in range(classes)]
    return sizes


def tiered_source(root: Path, workers: int) -> Any:
    """An ImageSetSource of ``root``'s ``tiered-{part}.json`` (its classes' sizes), whose layout generates
    the images. Defined here so that the parent never imports torch (see the module's docstring)."""
    import numpy as np

    from metashot.config import Config
    from metashot.data.imageset import ImageSetSource, Layout, Part
    from metashot.data.miniimagenet import MEAN, STD

    class Generated(Layout):
        name = "generated"
        files = "tiered-{train,val,test}.json"

        def sources(self, root: Path, part: str) -> list[Path]:
            return [root / f"tiered-{part}.json"]

        def read(self, root: Path, part: str, image_size: int) -> Part:
            sizes = json.loads(self.sources(root, part)[0].read_text())
            labels = np.repeat(np.arange(len(sizes)), sizes)
            return Part(labels, [f"c{c:04d}" for c in range(len(sizes))], noise_images(SEEDS[part]))

    class TieredSize(ImageSetSource):
        name = "tiered-size"
        layouts = (Generated(),)
        classes = {part: classes for part, (classes, _) in TIERED.items()}
        mean, std = MEAN, STD

    task_args = {"augment": "crop-jitter-flip", "workers": workers}
    return TieredSize(Config(task="tiered-size", data_dir=str(root), task_args=task_args, ways=5, shots=1,
                             queries=15, train_queries=15))


def mini_source(root: Path, workers: int) -> Any:
    from metashot.config import Config
    from metashot.data.tasks import build_source

    task_args = {"augment": "crop-jitter-flip", "workers": workers}
    return build_source(Config(task="miniimagenet", data_dir=str(root), task_args=task_args, ways=5,
                               shots=1, queries=15, train_queries=15))


# -- one child: one measurement ---------------------------------------------------------------------

def draw(source: Any, episodes: int) -> dict[str, Any]:
    """``episodes`` training episodes moved (augmented) to the CPU; the workers' memory at the last one."""
    workers: list[dict[str, float]] = []
    for i, batch in enumerate(source.loader("train", episodes, seed=0)):
        batch.to("cpu")
        if i == episodes - 1:
            workers = [memory_mb(pid) for pid in child_pids()]
    return {"workers": workers}


def dataset_bytes(source: Any) -> dict[str, int]:
    parts = {part: source.dataset(part).flat.numel() for part in ("train", "val", "test")}
    return {"dataset_bytes": sum(parts.values()), "train_bytes": parts["train"],
            "float_copy_bytes": 4 * sum(parts.values())}


def run_child(a: argparse.Namespace) -> None:
    """The measurement ``a.child`` in this fresh process; one JSON line."""
    import torch

    torch.set_num_threads(a.threads)
    root = Path(a.root)
    per_class = max(16, round(MINI_PER_CLASS * a.scale))
    if a.child == "write-mini":
        start = time.perf_counter()
        emit({"bench": "setup", "case": a.child, **write_mini(root, per_class),
              "wall_s": round(time.perf_counter() - start, 1)})
        return
    rss_before, peak_before = memory_mb()["rss_mb"], max_rss_mb()
    start = time.perf_counter()
    source = (mini_source if a.child.startswith("mini") else tiered_source)(root, a.workers)
    source.dataset("train")  # the first time: reads the layout's files and writes the cache
    extra = draw(source, a.episodes) if a.child.endswith("draw") else {}
    wall = time.perf_counter() - start
    end = memory_mb()
    emit({"bench": "memory", "case": a.child, "workers_count": a.workers if "draw" in a.child else None,
          "episodes": a.episodes if "draw" in a.child else 0, **dataset_bytes(source),
          "rss_before_mb": rss_before, "peak_rss_before_mb": peak_before, "peak_rss_mb": max_rss_mb(),
          "peak_over_before_mb": round(max_rss_mb() - rss_before, 1),
          "children_peak_rss_mb": max_rss_mb(resource.RUSAGE_CHILDREN), "end": end, **extra,
          "wall_s": round(wall, 1)})


# -- the parent -------------------------------------------------------------------------------------

def spawn(a: argparse.Namespace, root: Path, case: str, workers: int = 0) -> None:
    cmd = [sys.executable, __file__, "--child", case, "--root", str(root), "--workers", str(workers),
           "--scale", str(a.scale), "--episodes", str(a.episodes), "--threads", str(a.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{case} failed ({proc.returncode})")
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            print(line, flush=True)


def run_cases(a: argparse.Namespace, top: Path) -> None:
    if "mini" in a.cases:
        root = top / "mini"
        root.mkdir()
        spawn(a, root, "write-mini")
        spawn(a, root, "mini-build")
        for workers in (0, 2):
            spawn(a, root, "mini-draw", workers)
        shutil.rmtree(root)
    if "tiered" in a.cases:
        root = top / "tiered"
        root.mkdir()
        sizes = tiered_sizes(a.scale)
        need = sum(map(sum, sizes.values())) * IMAGE_BYTES
        free = shutil.disk_usage(root).free
        if free < 1.1 * need:
            raise SystemExit(f"{root}: {free / 1e9:.1f} GB free, the tiered case writes {need / 1e9:.1f} GB")
        for part, part_sizes in sizes.items():
            (root / f"tiered-{part}.json").write_text(json.dumps(part_sizes))
        spawn(a, root, "tiered-build")
        for workers in (0, 2):
            spawn(a, root, "tiered-draw", workers)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=["mini", "tiered"], default=["mini", "tiered"])
    p.add_argument("--episodes", type=int, default=200, help="training episodes drawn by the draw cases")
    p.add_argument("--scale", type=float, default=1.0, help="images per class, times this (for a check)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each child")
    p.add_argument("--dir", type=Path, default=None, help="where the temporary folder goes (default: TMPDIR)")
    # a child's own arguments
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, default=0, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        run_child(a)
        return
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that the temporary folder goes
    top = Path(tempfile.mkdtemp(prefix="metashot-bench-memory-", dir=a.dir))
    try:
        start = time.perf_counter()
        run_cases(a, top)
        emit({"bench": "total", "wall_s": round(time.perf_counter() - start, 1), "parent_peak_rss_mb":
              max_rss_mb(), "kernel": platform.release()})
    finally:
        shutil.rmtree(top, ignore_errors=True)


if __name__ == "__main__":
    main()
