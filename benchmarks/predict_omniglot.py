"""Issue 20's measurement 1: `metashot fit --from-run` / `metashot predict` with a trained Omniglot ProtoNet.

1. 20 characters of one evaluation alphabet of the run's test part, one image each, written as Omniglot's
   files are (black strokes on white PNGs, class sub-folders), ``metashot fit`` on them and ``metashot
   predict`` on the other 19 images of each: the accuracy (with its binomial 95% CI), beside the run's
   20-way 1-shot test result (result.json, or ``metashot evaluate --ways 20 --shots 1``).
2. The run's own test episodes (20-way 1-shot, the evaluator's seed) written as files, fitted and
   predicted through the classifier: its answers against the run's head's on the same episodes.
3. Images/s of predict on this machine: the command's wall time (start-up and loading included) and the
   Python API's ``predict`` on the decoded files, the classifier loaded.

    OMP_NUM_THREADS=1 python benchmarks/predict_omniglot.py RUN --work DIR [--episodes 20]

Prints one JSON object per line.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from PIL import Image

from metashot.config import Config
from metashot.evaluate import Result
from metashot.predict import FewShotClassifier, UncalibratedWarning
from metashot.runs import RunFolder, evaluate_run


def _write(images: torch.Tensor, path: Path) -> None:
    """Stored Omniglot images [1, 28, 28] (ink 255) as the raw files hold them: black ink on white."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(255 - images[0].numpy()).save(path)


def _metashot(*args: str) -> tuple[str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "metashot", *args], capture_output=True, text=True,
                          check=True)
    return done.stdout, time.perf_counter() - start


def evaluation_alphabets(cfg: Config) -> set[str]:
    from metashot.data.omniglot import Omniglot

    omniglot = Omniglot.load(cfg.data_dir, 28)
    return {a for a, b in zip(omniglot.alphabets, omniglot.background.tolist()) if not b}


def alphabet_task(run: Path, data: object, names: list[str], work: Path, alphabet: str | None,
                  evaluation: set[str]) -> dict:
    """Part 1: fit on drawer 0 of 20 characters of one evaluation alphabet, predict the other 19."""
    upright = {n: i for i, n in enumerate(names) if n.endswith("/rot0") and n.split("/")[0] in evaluation}
    counts = Counter(n.split("/")[0] for n in upright)
    alphabet = alphabet or sorted(counts, key=lambda a: (-counts[a], a))[0]
    chosen = sorted(n for n in upright if n.split("/")[0] == alphabet)[:20]
    if len(chosen) < 20:
        raise SystemExit(f"{alphabet} has {len(chosen)} characters in the run's test part, not 20")
    flat = data.flat.view(data.num_classes, -1, *data.image_shape)
    for name in chosen:
        char = name.split("/")[1]
        for drawer in range(20):
            _write(flat[upright[name], drawer], work / ("support" if drawer == 0 else "query") / char /
                   f"{drawer:02d}.png")
    out, fit_s = _metashot("fit", str(work / "support"), "--from-run", str(run), "--out", str(work / "clf"),
                           "--device", "cpu", "--no-progress")
    out, predict_s = _metashot("predict", str(work / "clf"), str(work / "query"), "--json", "--device", "cpu",
                               "--no-progress")
    rows = [json.loads(line) for line in out.splitlines()]
    right = sum(r["class"] == Path(r["image"]).parent.name for r in rows)
    acc = right / len(rows)
    return {"part": "alphabet", "alphabet": alphabet, "classes": 20, "queries": len(rows), "acc": acc,
            "ci95": 1.96 * math.sqrt(acc * (1 - acc) / len(rows)), "fit_seconds": round(fit_s, 2),
            "predict_seconds": round(predict_s, 2), "predict_command_images_per_s": len(rows) / predict_s}


def own_episodes(source: object, method: torch.nn.Module, episodes: int, work: Path, cfg: Config) -> dict:
    """Part 2: the run's test episodes as files, through the classifier, against the run's head."""
    features = FewShotClassifier.load(work / "clf", "cpu").features  # one loaded encoder for every episode
    same = total = ours = theirs = 0
    for e, episode in enumerate(source.loader("test", episodes, seed=cfg.seed)):
        folder = work / "episodes" / f"{e:03d}"
        support, query = episode.support[0], episode.query[0]
        for i, (x, y) in enumerate(zip(support, episode.support_labels[0].tolist())):
            _write(x.mul(255).round().byte(), folder / "support" / f"c{y:02d}" / f"{i:03d}.png")
        files = []
        for i, x in enumerate(query):
            files.append(folder / "query" / f"{i:03d}.png")
            _write(x.mul(255).round().byte(), files[-1])
        clf = FewShotClassifier.from_folder(folder / "support", features=features)
        names, _ = clf.predict(files)
        with torch.no_grad():
            found = method.log_probs(episode).argmax(-1)[0]
        truth = episode.query_labels[0]
        mine = torch.tensor([int(n[1:]) for n in names])
        same += int((mine == found).sum())
        ours += int((mine == truth).sum())
        theirs += int((found == truth).sum())
        total += len(truth)
    return {"part": "own_episodes", "episodes": episodes, "queries": total, "same_answers": same,
            "acc_classifier": ours / total, "acc_run_head": theirs / total}


def every_alphabet(data: object, names: list[str], work: Path, evaluation: set[str]) -> dict:
    """Part 4: part 1's task for every evaluation alphabet with 20 test characters, through the API."""
    features = FewShotClassifier.load(work / "clf", "cpu").features
    flat = data.flat.view(data.num_classes, -1, *data.image_shape)
    upright = {n: i for i, n in enumerate(names) if n.endswith("/rot0") and n.split("/")[0] in evaluation}
    accs = {}
    for alphabet in sorted({n.split("/")[0] for n in upright}):
        chosen = sorted(n for n in upright if n.split("/")[0] == alphabet)[:20]
        if len(chosen) < 20:
            continue
        idx = [upright[n] for n in chosen]
        clf = FewShotClassifier.fit(flat[idx, 0], chosen, features=features)  # tensors: stored images
        found, _ = clf.predict(flat[idx, 1:].flatten(0, 1))
        accs[alphabet] = sum(f == chosen[i // 19] for i, f in enumerate(found)) / len(found)
    return {"part": "every_alphabet", "alphabets": len(accs), "mean_acc": sum(accs.values()) / len(accs),
            "acc": accs}


def api_speed(work: Path, repeats: int) -> dict:
    """Part 3: predict's images/s through the Python API (files decoded, embedded, scored)."""
    clf = FewShotClassifier.load(work / "clf", "cpu")
    files = sorted((work / "query").rglob("*.png")) * repeats
    clf.predict(files[:64])  # warm-up
    start = time.perf_counter()
    clf.predict(files, batch_size=256)
    seconds = time.perf_counter() - start
    return {"part": "api_speed", "images": len(files), "seconds": round(seconds, 3),
            "images_per_s": len(files) / seconds, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="a trained protonet run on --task omniglot")
    p.add_argument("--work", type=Path, required=True, help="a new folder for the images and the classifier")
    p.add_argument("--alphabet", help="default: the evaluation alphabet with the most test characters")
    p.add_argument("--episodes", type=int, default=20, help="the run's test episodes for part 2")
    p.add_argument("--repeats", type=int, default=10, help="the query images' repeats for part 3")
    args = p.parse_args()
    warnings.simplefilter("ignore", UncalibratedWarning)  # 1-shot by design
    cfg = RunFolder(args.run).load_config().replace(device="cpu").validate()
    if (cfg.ways, cfg.shots) != (20, 1):
        raise SystemExit(f"{args.run} tests {cfg.ways}-way {cfg.shots}-shot; train a 20-way 1-shot run")
    source, method = RunFolder(args.run).method(cfg)
    data = source.dataset("test")
    evaluation = evaluation_alphabets(cfg)
    print(json.dumps(alphabet_task(args.run, data, data.class_names, args.work, args.alphabet, evaluation)),
          flush=True)
    result_file = args.run / "result.json"
    result = (Result.from_dict(json.loads(result_file.read_text())) if result_file.exists()
              else evaluate_run(args.run, device="cpu"))
    print(json.dumps({"part": "evaluate", "ways": 20, "shots": 1, "episodes": result.episodes,
                      "acc": result.mean, "ci95": result.ci}), flush=True)
    print(json.dumps(own_episodes(source, method.eval(), args.episodes, args.work, cfg)), flush=True)
    print(json.dumps(api_speed(args.work, args.repeats)), flush=True)
    print(json.dumps(every_alphabet(data, data.class_names, args.work, evaluation)), flush=True)


if __name__ == "__main__":
    main()
