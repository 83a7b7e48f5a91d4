"""Real images end to end through ``--task miniimagenet``: Omniglot written in two of miniImageNet's layouts.

100 Omniglot characters (drawn with ``--seed``; 20 drawings each) are upscaled from the 28 px cache to
84 x 84 (Pillow's Lanczos), made RGB (ink 255 on 0), split 64 / 16 / 20 as miniImageNet's classes, and
written (1) as ``mini-imagenet-cache-{train,val,test}.pkl`` (the "cache" layout: ``image_data``,
``class_dict``) and (2) as ``{train,val,test}/<class>/*.png`` class folders (the "folders" layout). The
same ProtoNet recipe trains on each through ``metashot.train``; both read the same classes in the same
order, so the episodes and the accuracies must be equal. Prints one JSON line per run and one comparing
them:

    python benchmarks/omniglot_as_mini.py              # 300 steps of 10-way episodes, 600 test episodes
    python benchmarks/omniglot_as_mini.py --image-size 28 --steps 30 --test-episodes 50   # a quick check
"""

from __future__ import annotations

import argparse
import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from metashot import train
from metashot.config import Config
from metashot.data.omniglot import Omniglot

SPLIT = {"train": 64, "val": 16, "test": 20}


def characters(data_dir: str | None, seed: int) -> tuple[np.ndarray, list[str]]:
    """100 characters' drawings upscaled to 84 x 84 RGB: uint8 [100, 20, 84, 84, 3], and their names."""
    omniglot = Omniglot.load(data_dir, image_size=28)
    chosen = torch.randperm(len(omniglot.alphabets), generator=torch.Generator().manual_seed(seed))[:100]
    images = np.empty((100, 20, 84, 84, 3), np.uint8)
    for c, i in enumerate(chosen.tolist()):
        for d, x in enumerate(omniglot.images[i].numpy()):
            big = np.asarray(Image.fromarray(x).resize((84, 84), Image.Resampling.LANCZOS))
            images[c, d] = big[..., None]
    names = [f"{omniglot.alphabets[i]}-{omniglot.characters[i]}" for i in chosen.tolist()]
    return images, names


def write(images: np.ndarray, names: list[str], cache: Path, folders: Path) -> None:
    """The characters in the cache layout under ``cache`` and the folders layout under ``folders``."""
    first = 0
    for part, count in SPLIT.items():
        part_images = images[first:first + count].reshape(-1, 84, 84, 3)
        class_dict = {names[first + c]: list(range(c * 20, c * 20 + 20)) for c in range(count)}
        with open(cache / f"mini-imagenet-cache-{part}.pkl", "wb") as f:
            pickle.dump({"image_data": part_images, "class_dict": class_dict}, f, protocol=4)
        for c in range(count):
            folder = folders / part / names[first + c]
            folder.mkdir(parents=True)
            for d, x in enumerate(images[first + c]):
                Image.fromarray(x).save(folder / f"{d:02d}.png")
        first += count


def run(root: Path, run_dir: Path, args: argparse.Namespace) -> dict[str, object]:
    task_args = {"augment": "none", "image_size": args.image_size}
    cfg = Config(method="protonet", task="miniimagenet", data_dir=str(root), task_args=task_args,
                 ways=5, shots=1, queries=15, train_ways=args.train_ways, train_queries=5, steps=args.steps,
                 val_every=max(args.steps // 2, 1), val_episodes=args.val_episodes,
                 test_episodes=args.test_episodes, seed=args.seed)
    t0 = time.perf_counter()
    result = train(cfg, run_dir, progress=False)
    return {"layout": root.name, "image_size": args.image_size, "train_ways": args.train_ways,
            "steps": args.steps, "test_episodes": args.test_episodes, "seed": args.seed,
            "acc": round(100 * result.mean, 2), "ci95": round(100 * result.ci, 2),
            "minutes": round((time.perf_counter() - t0) / 60, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", help="Omniglot's folder; default: $METASHOT_DATA, else the user cache")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--train-ways", type=int, default=10)
    p.add_argument("--val-episodes", type=int, default=100)
    p.add_argument("--test-episodes", type=int, default=600)
    p.add_argument("--image-size", type=int, default=84,
                   help="the size trained at: the files are 84 px, the cache is resized to this")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, help="folder for the data and runs; default: a temporary one")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        cache, folders = out / "cache", out / "folders"
        cache.mkdir(parents=True)
        write(*characters(args.data_dir, args.seed), cache, folders)
        rows = [run(root, out / f"run-{root.name}", args) for root in (cache, folders)]
    for row in rows:
        print(json.dumps(row))
    print(json.dumps({"equal": rows[0]["acc"] == rows[1]["acc"] and rows[0]["ci95"] == rows[1]["ci95"]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
