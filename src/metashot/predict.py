"""A few-shot classifier of one's own images, by class name (``metashot fit`` / ``metashot predict``).

Features come from a frozen pretrained backbone or a trained metashot run's encoder
(:mod:`metashot.image_features`). A head of
:data:`metashot.methods.HEADS`, or the run's own, scores queries against the stored support features.
Softmax over raw distances is nearly flat or needlessly peaked (easyfsl #69), so the head's
log-probabilities are divided by a temperature T fitted at fit time by leave-one-out on the support set
(temperature scaling, Guo et al. ICML 2017, Sec. 4.2, the left-out support images as its validation set).
"""

from __future__ import annotations

import io
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metashot.checkpoints import load_checkpoint, serialized
from metashot.data.images import IMAGE_SUFFIXES
from metashot.errors import ConfigError, DataError
from metashot.image_features import (
    Features,
    ImageLike,
    PretrainedFeatures,
    RunFeatures,
    as_items,
    embed_images,
    features_for,
    image_files,
)

FORMAT = 1  # classifier.json's format: another is refused, not guessed at
CONFIG_FILE, TENSORS_FILE = "classifier.json", "tensors.pt"

class UncalibratedWarning(UserWarning):
    """Probabilities of a classifier fitted on one image per class: no temperature could be fitted."""


def leave_one_out(
    head: nn.Module, support: torch.Tensor, labels: torch.Tensor, ways: int, budget: int = 2**24
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Each support image of a class of two or more scored by ``head`` against the support set without
    it: log-probs [L, ways] and their labels [L]; None when no class has two. support [S, D], labels [S];
    the episodes are batched, about ``budget`` support features at a time."""
    s = len(labels)
    left = (torch.bincount(labels, minlength=ways)[labels] >= 2).nonzero().squeeze(1)
    if not len(left):
        return None
    dev = labels.device
    others = torch.arange(s, device=dev).expand(s, s)[~torch.eye(s, dtype=torch.bool, device=dev)]
    rest = others.view(s, s - 1)[left]  # [L, S-1]: the support without each left-out image
    step = max(1, budget // ((s - 1) * support.shape[1]))
    log_p = [head(support[i].unsqueeze(1), support[r], labels[r], ways)[:, 0]
             for i, r in zip(left.split(step), rest.split(step))]
    return torch.cat(log_p), labels[left]


def fit_temperature(log_p: torch.Tensor, labels: torch.Tensor, levels: int = 6) -> float:
    """The T minimising the mean cross-entropy of softmax(log_p / T) [L, N] against ``labels`` [L]
    smoothed by eps = 1 / (L + 2): L left-out images all classified right are evidence for an accuracy of
    (L + 1) / (L + 2) (Laplace's rule of succession), not 1, so a support set that leave-one-out classifies
    perfectly still gets a finite T instead of T -> 0 and probabilities of exactly 1. A grid of 33 values
    of log T spanning e^+-8 around the log-probs' own scale, then grids ever finer around the best (the
    loss is convex in 1 / T, so unimodal in log T), to 1e-5 in log T. 1 when all log-probs are equal."""
    z = log_p.double()
    z = z - z.amax(-1, keepdim=True)
    gaps = z[z.isfinite() & (z < 0)]
    if not len(gaps):
        return 1.0
    z = z.clamp(min=2 * float(gaps.min()))  # a class scored -inf: far, but finite under smoothing
    n = z.shape[-1]
    eps = 1 / (len(labels) + 2)
    target = torch.full_like(z, eps / (n - 1)).scatter_(1, labels.unsqueeze(1), 1 - eps)
    centre, half = float(gaps.abs().mean().log()), 8.0
    for _ in range(levels):
        grid = torch.linspace(centre - half, centre + half, 33, dtype=z.dtype, device=z.device)
        log_q = (z / grid.exp()[:, None, None]).log_softmax(-1)  # [33, L, N]
        loss = -(log_q * target).sum(-1).mean(-1)
        centre, half = float(grid[loss.argmin()]), half / 16
    return math.exp(centre)


class FewShotClassifier:
    """Class names and probabilities of images, from a support set of labelled images.

    ``features``: how images become features; ``head``: a head of :data:`metashot.methods.HEADS` (query
    [B, Q, D], support [B, S, D], labels [B, S], ways -> log-probs [B, Q, N]) named ``head_name`` with
    ``head_args`` (None: the run's own); ``support`` [S, D] and ``labels`` [S] in 0..N-1 of ``classes``;
    probabilities are softmax(log-probs / ``temperature``); ``threshold``: predict's default; ``seed``
    seeds the head's random numbers on every call.
    """

    def __init__(
        self, features: Features, head: nn.Module, head_name: str | None, head_args: dict[str, Any],
        classes: list[str], support: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0,
        calibrated: bool = False, threshold: float = 0.0, seed: int = 0,
    ) -> None:
        self.features, self.head = features, head.to(features.device).eval()
        self.head_name, self.head_args, self.classes = head_name, dict(head_args), list(classes)
        self.support, self.labels = support.to(features.device), labels.to(features.device)
        self.temperature, self.calibrated = float(temperature), calibrated
        self.threshold, self.seed = _threshold(threshold), seed
        self._warned = False

    @classmethod
    def fit(
        cls, support: ImageLike | Sequence[ImageLike], labels_or_names: Sequence[str | int] | torch.Tensor,
        backbone: str | None = None, backbone_args: dict[str, Any] | None = None, head: str | None = None,
        head_args: dict[str, Any] | None = None, from_run: str | os.PathLike | None = None,
        checkpoint: str = "best.pt", device: str | None = None, threshold: float = 0.0, seed: int = 0,
        batch_size: int = 64, progress: bool = False, features: Features | None = None,
    ) -> FewShotClassifier:
        """Fit on support images (paths, PIL images, tensors as :meth:`predict` takes them) labelled by
        class names (or integers, named by their decimal digits), with the features of the pretrained
        ``backbone`` or of the run folder ``from_run`` (its ``checkpoint``); ``head`` (None: the run's
        own, for a backbone "prototype") with ``head_args``; the temperature by :func:`leave_one_out`.
        ``features``: another classifier's (``clf.features``), in place of a backbone or run to load."""
        items = as_items(support)
        names = [str(v) for v in (labels_or_names.tolist() if isinstance(labels_or_names, torch.Tensor)
                                  else labels_or_names)]
        if len(names) != len(items):
            raise ConfigError(f"{len(items)} support images but {len(names)} labels; give one per image")
        classes = sorted(set(names))
        if len(classes) < 2:
            raise ConfigError(f"the support set holds {len(classes)} class{'es' if not classes else ''} "
                              f"{classes}; a classifier needs at least 2")
        if features is None:
            features = features_for(backbone, backbone_args, from_run, checkpoint, _device(device))
        elif backbone is not None or from_run is not None:
            raise ConfigError("give features, or a backbone or run to load them from, not both")
        dev = features.device
        head_module, head_name, head_args = _head(head, head_args, features)
        z, _ = embed_images(features, items, batch_size, progress)
        labels = torch.tensor([classes.index(n) for n in names], device=dev)
        clf = cls(features, head_module, head_name, head_args, classes, z, labels, threshold=threshold,
                  seed=seed)
        with clf._seeded(), torch.no_grad():
            scored = leave_one_out(clf.head, z, labels, len(classes))
        if scored is not None:
            clf.temperature, clf.calibrated = fit_temperature(*scored), True
        return clf

    @classmethod
    def from_folder(cls, support_dir: str | os.PathLike, **kwargs: Any) -> FewShotClassifier:
        """:meth:`fit` on a folder of class sub-folders of images, the sub-folders' names the classes."""
        root = Path(support_dir)
        if not root.is_dir():
            raise DataError(f"{root}: no such folder (expected a folder of class sub-folders of images)")
        folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        files = {f.name: image_files(f) for f in folders}
        if empty := [name for name, fs in files.items() if not fs]:
            kinds = ", ".join(sorted(IMAGE_SUFFIXES))
            raise DataError(f"{root / empty[0]}: an empty class folder (no {kinds} images); put the class's "
                            "images in it or remove it")
        return cls.fit([f for fs in files.values() for f in fs],
                       [name for name, fs in files.items() for _ in fs], **kwargs)

    @property
    def images_per_class(self) -> list[int]:
        return torch.bincount(self.labels, minlength=len(self.classes)).tolist()

    def log_probs(self, z: torch.Tensor) -> torch.Tensor:
        """Calibrated log-probabilities [M, N] of features [M, D], in one head call."""
        if not self.calibrated and not self._warned:
            self._warned = True
            warnings.warn("the classifier was fitted on one image per class, so its probabilities are "
                          "not calibrated (temperature 1); give 2 or more images of a class to calibrate",
                          UncalibratedWarning, stacklevel=3)
        if not len(z):
            return z.new_zeros(0, len(self.classes))
        with self._seeded(), torch.no_grad():  # not inference mode: a fitting head trains inside
            log_p = self.head(z[None].to(self.support), self.support[None], self.labels[None],
                              len(self.classes))[0]
        return (log_p / self.temperature).log_softmax(-1)

    def predict_proba(self, images: ImageLike | Sequence[ImageLike], batch_size: int = 64,
                      progress: bool = False) -> torch.Tensor:
        """Probabilities [M, N] of the classes (in :attr:`classes`' order) of the images."""
        return self.log_probs(embed_images(self.features, images, batch_size, progress)[0]).exp()

    def predict(
        self, images: ImageLike | Sequence[ImageLike], top_k: int = 1, threshold: float | None = None,
        batch_size: int = 64, progress: bool = False,
    ) -> tuple[list[Any], torch.Tensor]:
        """Each image's class name and its probability. Images: paths, PIL images, or tensors [C, H, W]
        (a batch [M, C, H, W]) taken as decoded: float in [0, 1] or uint8 for a pretrained backbone (any
        size), for a run its task's stored images (an Omniglot run's: 28 x 28, inverted, uint8).

        Returns names (per image its class with ``top_k=1``, else the list of its ``top_k`` best; None,
        "none of these", where the best probability is under ``threshold``, default the fitted one) and
        probabilities [M, top_k], best first."""
        return self.decide(self.predict_proba(images, batch_size, progress), top_k, threshold)

    def decide(self, probabilities: torch.Tensor, top_k: int = 1,
               threshold: float | None = None) -> tuple[list[Any], torch.Tensor]:
        """:meth:`predict`'s answer from probabilities [M, N]."""
        if top_k < 1:
            raise ConfigError(f"--top-k must be at least 1, got {top_k}")
        threshold = self.threshold if threshold is None else _threshold(threshold)
        p, idx = probabilities.topk(min(top_k, len(self.classes)), dim=-1)
        names: list[Any] = []
        for row, best in zip(idx.tolist(), p[:, 0].tolist()):
            top = [self.classes[i] for i in row]
            names.append(None if best < threshold else top[0] if top_k == 1 else top)
        return names, p

    def save(self, path: str | os.PathLike) -> None:
        """Write the classifier folder ``path``: classifier.json and tensors.pt, whole or not at all."""
        import metashot

        config = {
            "format": FORMAT, "metashot": metashot.__version__, "classes": self.classes,
            "images_per_class": self.images_per_class,
            "features": {"kind": type(self.features).__name__, **self.features.to_json()},
            "head": self.head_name, "head_args": self.head_args, "seed": self.seed,
            "temperature": self.temperature, "calibrated": self.calibrated, "threshold": self.threshold,
        }
        tensors = {"method": self.features.weights(), "support": self.support.cpu(),
                   "labels": self.labels.cpu()}
        write_folder(Path(path), {CONFIG_FILE: (json.dumps(config, indent=2) + "\n").encode(),
                                  TENSORS_FILE: _bytes(tensors)})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | None = None) -> FewShotClassifier:
        """The classifier saved in folder ``path``, on ``device`` (default: CUDA if there is one)."""
        path = Path(path)
        saved = read_config(path)
        state = load_checkpoint(path / TENSORS_FILE)
        dev = _device(device)
        kinds = {k.__name__: k for k in (PretrainedFeatures, RunFeatures)}
        try:
            features = kinds[saved["features"]["kind"]].load(saved["features"], state["method"], dev, path)
            head, _, _ = _head(saved["head"], saved["head_args"], features)
            return cls(features, head, saved["head"], saved["head_args"], saved["classes"], state["support"],
                       state["labels"], saved["temperature"], saved["calibrated"], saved["threshold"],
                       saved["seed"])
        except (KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{path / CONFIG_FILE}: damaged or not metashot's (no valid {e})") from None

    @contextmanager
    def _seeded(self) -> Iterator[None]:
        """The head's random numbers drawn from ``seed``; the caller's own are left as they were."""
        dev = self.features.device
        with torch.random.fork_rng(devices=[dev.index or 0] if dev.type == "cuda" else []):
            torch.manual_seed(self.seed)
            yield


def _threshold(p: float) -> float:
    if not 0 <= p <= 1:
        raise ConfigError(f"--threshold is a probability in [0, 1], got {p}")
    return float(p)


def _device(name: str | None) -> torch.device:
    from metashot.devices import check_device

    return check_device(name or "auto")


def _head(name: str | None, args: dict[str, Any] | None, features: Features) -> tuple[nn.Module, str | None,
                                                                                       dict[str, Any]]:
    """The head ``name`` built with ``args``; None: the features' own head (a run's), else "prototype"."""
    from metashot.methods import build_head
    from metashot.methods.heads import EncoderHead

    own = features.own_head() if name is None else None
    if own is None and name is None:
        name = "prototype"
    if own is not None and args:
        raise ConfigError("--head-args are the arguments of a --head; give --head NAME too")
    head = own if own is not None else build_head(name, **(args or {}))
    if isinstance(head, EncoderHead):
        raise ConfigError(f"head {name or type(head).__name__} fine-tunes the encoder on each task's images; "
                          "a classifier's head scores stored features (prototype, cl2n, linear, cosine, "
                          "ridge, logistic)")
    return head, name, dict(args or {})


def _bytes(state: dict[str, Any]) -> bytes:
    buffer = io.BytesIO()
    serialized(state)(buffer)
    return buffer.getvalue()


def write_folder(path: Path, files: dict[str, bytes]) -> None:
    """The folder ``path`` holding exactly ``files``, written in a temporary folder beside it and renamed
    into place: a classifier folder there before is replaced whole; any other folder is refused."""
    check_out(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as e:
        raise ConfigError(f"{path}: cannot write the classifier ({e.strerror or e})") from None
    try:
        for name, data in files.items():
            with open(tmp / name, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
        if path.exists():  # a classifier folder (check_out): swapped out, then removed
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old / path.name)
            try:
                os.replace(tmp, path)
            except OSError:
                os.replace(old / path.name, path)
                raise
            finally:
                shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except OSError as e:
        raise ConfigError(f"{path}: cannot write the classifier ({e.strerror or e}); nothing was "
                          "half-written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def check_out(path: Path) -> None:
    """A ConfigError when ``path`` is a file or a folder with anything in it but a classifier."""
    if path.exists() and not (path.is_dir() and (not any(path.iterdir()) or (path / CONFIG_FILE).is_file())):
        raise ConfigError(f"{path} exists and is not a classifier folder; choose another --out")


def read_config(path: Path) -> dict[str, Any]:
    """A classifier folder's classifier.json, checked for its format."""
    import metashot

    if not path.is_dir():
        raise ConfigError(f"{path}: no such classifier folder")
    try:
        saved = json.loads((path / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: no {CONFIG_FILE}; not a classifier folder (`metashot fit` writes one)") \
            from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path / CONFIG_FILE}: not valid JSON ({e})") from None
    saved = saved if isinstance(saved, dict) else {}
    if (version := saved.get("format")) != FORMAT:
        made = f" (by metashot {saved['metashot']})" if "metashot" in saved else ""
        raise ConfigError(f"{path}: a classifier of format {version}{made}; metashot {metashot.__version__} "
                          f"reads format {FORMAT}: fit it again with this version")
    return saved
