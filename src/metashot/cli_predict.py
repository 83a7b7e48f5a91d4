"""`metashot fit` and `metashot predict`: a few-shot classifier of one's own images, by class name."""

from __future__ import annotations

import argparse
import csv
import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from metashot.errors import DataError


def _probability(text: str) -> float:
    try:
        p = float(text)
    except ValueError:
        p = float("nan")
    if not 0 <= p <= 1:
        raise argparse.ArgumentTypeError(f"expected a probability in [0, 1], got {text!r}")
    return p


def _positive(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, got {text!r}")
    return n


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Add ``fit``'s and ``predict``'s parsers to the metashot command's sub-parsers."""
    from metashot.cli import _json_object  # loaded: it is the command that calls this
    from metashot.methods import HEADS

    f = sub.add_parser(
        "fit", help="fit a few-shot classifier on a folder of class sub-folders of images",
        description="Fit a classifier of one's own images: SUPPORT_DIR holds one sub-folder of images per "
        "class (its name the class's). The images are embedded by a frozen pretrained --backbone or by a "
        "trained run's encoder (--from-run, the images decoded as that run's task decoded its own), then "
        "scored by --head; the probabilities' temperature is fitted by leave-one-out on the support set "
        "(with 2 or more images of a class). Writes the classifier folder --out.")
    f.add_argument("support_dir", type=Path, metavar="SUPPORT_DIR", help="a folder of class sub-folders of "
                   "images")
    which = f.add_mutually_exclusive_group(required=True)
    which.add_argument("--backbone", help="a pretrained model: hf:ORG/NAME, hf:/saved/folder or timm:NAME")
    which.add_argument("--from-run", type=Path, metavar="RUN", help="a trained metashot run folder whose "
                       "encoder (and head, unless --head) to use")
    f.add_argument("--backbone-args", type=_json_object, metavar="JSON", help="the pretrained backbone's "
                   "arguments, e.g. '{\"pool\": \"cls\"}'")
    f.add_argument("--checkpoint", default="best.pt", help="with --from-run: the run's checkpoint; "
                   "default: best.pt")
    f.add_argument("--head", help="the head scoring queries against the support set (default: the run's "
                   f"own, else prototype): {', '.join(sorted(h for h in HEADS if h != 'finetune'))}")
    f.add_argument("--head-args", type=_json_object, metavar="JSON", help="the head's arguments, e.g. "
                   "'{\"distance\": \"cosine\"}'")
    f.add_argument("--out", type=Path, required=True, metavar="CLF", help="the classifier folder to write")
    f.add_argument("--threshold", type=_probability, default=0.0, metavar="P", help="predict's default "
                   "threshold: an image whose best probability is under it is 'none of these'; default 0")
    _common(f)
    p = sub.add_parser(
        "predict", help="class names and probabilities of images, by a fitted classifier",
        description="Classify images (files, or folders searched for image files) with the classifier "
        "folder CLF (`metashot fit`): per image its class and the --top-k classes with their "
        "probabilities, 'none of these' where the best is under --threshold. An image that does not "
        "decode is named in a warning and skipped.")
    p.add_argument("classifier", type=Path, metavar="CLF", help="a classifier folder written by metashot fit")
    p.add_argument("images", type=Path, nargs="+", metavar="IMAGE_OR_DIR", help="image files or folders")
    p.add_argument("--top-k", type=_positive, default=1, metavar="K", help="classes to list per image")
    p.add_argument("--threshold", type=_probability, metavar="P", help="'none of these' under this "
                   "probability; default: the classifier's")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="one JSON object per line and image: "
                     '{"image", "class" (null: none of these), "probability", "top": [[NAME, P], ...]}')
    out.add_argument("--csv", action="store_true", help="CSV: a header, then one row per image")
    _common(p)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--batch-size", type=_positive, default=64, metavar="N", help="images per forward pass")
    p.add_argument("--device", help="auto (a GPU if there is one, else MPS, else the "
                   "CPU; the default), cpu, cuda, cuda:N or mps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def fit(args: argparse.Namespace) -> int:
    """``metashot fit``: print the classes, their images and the temperature; write the folder."""
    from metashot.predict import FewShotClassifier, check_out

    check_out(args.out)
    clf = FewShotClassifier.from_folder(
        args.support_dir, backbone=args.backbone, backbone_args=args.backbone_args, head=args.head,
        head_args=args.head_args, from_run=args.from_run, checkpoint=args.checkpoint, device=args.device,
        threshold=args.threshold, batch_size=args.batch_size, progress=not args.no_progress)
    clf.save(args.out)
    width = max(len(c) for c in clf.classes)
    print(f"{len(clf.classes)} classes, {len(clf.labels)} images")
    for name, n in zip(clf.classes, clf.images_per_class):
        print(f"  {name:<{width}}  {n} image{'s' * (n != 1)}")
    if clf.calibrated:
        print(f"temperature {clf.temperature:.4g} (leave-one-out on the support set)")
    else:
        print("temperature 1 (uncalibrated: no class has 2 images to leave one out)")
    print(f"wrote {args.out}")
    return 0


def _expand(paths: list[Path], skipped: Callable[[Any, Exception], None]) -> list[Path]:
    """Files as given, folders' image files (any depth, sorted); a path that is neither is skipped."""
    from metashot.image_features import image_files

    files = []
    for path in paths:
        if path.is_dir():
            found = image_files(path)
            if not found:
                skipped(path, DataError(f"{path}: a folder with no image files in it"))
            files += found
        elif path.is_file():
            files.append(path)
        else:
            skipped(path, DataError(f"{path}: no such file or folder"))
    return files


def predict(args: argparse.Namespace) -> int:
    """``metashot predict``: one line (text, JSON or CSV row) per image that decodes."""
    from metashot.image_features import embed_images
    from metashot.predict import FewShotClassifier, UncalibratedWarning

    def skipped(item: Any, e: Exception) -> None:
        print(f"metashot: warning: {e}; skipped", file=sys.stderr)

    clf = FewShotClassifier.load(args.classifier, args.device)
    files = _expand(args.images, skipped)
    z, kept = embed_images(clf.features, files, args.batch_size, not args.no_progress, skipped)
    if not kept:
        raise DataError("no image to classify: none of those given decodes")
    if not clf.calibrated:
        print("metashot: warning: the classifier was fitted on one image per class: its probabilities "
              "are not calibrated (temperature 1)", file=sys.stderr)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UncalibratedWarning)
        probabilities = clf.log_probs(z).exp()
    names, _ = clf.decide(probabilities, 1, args.threshold)
    top_p, top_i = probabilities.topk(min(args.top_k, len(clf.classes)), dim=-1)
    rows = [(str(files[i]), name, p[0], [(clf.classes[j], q) for j, q in zip(idx, p)])
            for i, name, p, idx in zip(kept, names, top_p.tolist(), top_i.tolist())]
    _print(rows, args.json, args.csv)
    return 0


def _print(rows: list[tuple[str, str | None, float, list[tuple[str, float]]]], as_json: bool,
           as_csv: bool) -> None:
    if as_json:
        for image, name, p, top in rows:
            print(json.dumps({"image": image, "class": name, "probability": p, "top": top}))
    elif as_csv:
        k = len(rows[0][3])
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["image", "class", "probability",
                         *[f"top{j}{part}" for j in range(1, k + 1) for part in ("", "_probability")]])
        for image, name, p, top in rows:
            writer.writerow([image, name or "", f"{p:.6g}", *[v for n, q in top for v in (n, f"{q:.6g}")]])
    else:
        width = max(len(r[0]) for r in rows)
        for image, name, _, top in rows:
            best = name if name is not None else "none of these"
            print(f"{image:<{width}}  {best}  ({', '.join(f'{n} {q:.3f}' for n, q in top)})")


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {"fit": fit, "predict": predict}
