"""The embedding cache: a frozen backbone's features of every image of a dataset part, computed once, and
test episodes scored on them by any head.

:func:`embed` runs the backbone (in eval mode, without gradients, batched on the device) over the part's
images exactly as its test episodes hand them to a method (:meth:`FewShotSource.examples`), into a
:class:`FeatureCache`: features [N, D] float32 class after class, the class sizes and names, and the key
of what they were computed from (the backbone, the task and its arguments, the data's fingerprint, the
part). Saved as one ``torch.save`` file of tensors and a JSON string, read back with ``weights_only``.
:func:`evaluate_features` draws episodes of the cached features with the task's own sampler (so episode
``i`` holds the same images as the task's test episode ``i`` for the same seed) and scores them with a
head of :data:`metashot.methods.HEADS`, as ``metashot evaluate --head`` scores a run's encoder's features.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from pickle import UnpicklingError
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from metashot.config import Config
from metashot.data.fewshot import FewShotDataset, episode_loader
from metashot.data.sources import FewShotSource
from metashot.errors import ConfigError, MetashotError
from metashot.evaluate import Result, evaluate
from metashot.io import atomic_write

FORMAT = "metashot-features"
VERSION = 1


def backbone_key(backbone: nn.Module) -> dict[str, Any]:
    """What identifies a backbone's features: its ``reference()`` when it has one (a pretrained model's
    name, weights and preprocessing), else its class, a hash of its state_dict and one of its structure."""
    reference = getattr(backbone, "reference", None)
    if callable(reference):
        return reference()
    h = hashlib.sha256()
    for name, t in backbone.state_dict().items():
        h.update(f"{name} {t.dtype} {tuple(t.shape)}".encode())
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    cls = type(backbone)
    # the module's repr names its layers' arguments (a batch norm's eps, ...), which the state does not hold
    structure = hashlib.sha256(repr(backbone).encode()).hexdigest()[:32]
    return {"class": f"{cls.__module__}.{cls.__qualname__}", "state": h.hexdigest()[:32],
            "structure": structure}


def cache_key(backbone: nn.Module, source: FewShotSource, part: str) -> dict[str, Any]:
    """The key of ``backbone``'s features of ``source``'s ``part``, as JSON would read it back."""
    key = {"backbone": backbone_key(backbone), "task": source.cfg.task, "task_args": source.cfg.task_args,
           "data": source.data_key(part), "part": part}
    return json.loads(json.dumps(key))


def differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The fields in which keys ``a`` and ``b`` differ, a dict's one level down (``backbone.state``)."""
    out = []
    for name in dict.fromkeys([*a, *b]):
        x, y = a.get(name), b.get(name)
        if isinstance(x, dict) and isinstance(y, dict):
            out += [f"{name}.{sub}" for sub in dict.fromkeys([*x, *y]) if x.get(sub) != y.get(sub)]
        elif x != y:
            out.append(name)
    return out


@dataclass
class FeatureCache:
    """Features [N, D] float32 of a part's images class after class (class ``c`` the next
    ``class_sizes[c]`` rows), its class names, the key they were computed from, and the config of the
    task source that served the images (to check the cache against its data). ``seconds``: how long
    :func:`embed` took (None for a cache read back from a file)."""

    features: torch.Tensor
    class_sizes: torch.Tensor
    class_names: list[str]
    key: dict[str, Any]
    config: dict[str, Any]
    seconds: float | None = field(default=None, compare=False)

    def dataset(self) -> FewShotDataset:
        """The features as a dataset of 1 x 1 "images" of D channels, whose sampler is the task's."""
        return FewShotDataset(self.features[:, :, None, None], self.class_names, self.class_sizes,
                              scale=False)

    def save(self, path: str | os.PathLike) -> None:
        """Write the cache to ``path`` atomically (a torch file of tensors and one JSON string)."""
        meta = {"format": FORMAT, "version": VERSION, "key": self.key, "config": self.config,
                "class_names": self.class_names}
        state = {"features": self.features.contiguous(), "class_sizes": self.class_sizes,
                 "meta": json.dumps(meta)}
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_write(Path(path), lambda f: torch.save(state, f))

    @classmethod
    def load(cls, path: str | os.PathLike) -> FeatureCache:
        """The cache at ``path``; a :class:`ConfigError` when it is none, damaged or of another version."""
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
            meta = json.loads(state["meta"])
            features, sizes, names = state["features"], state["class_sizes"], meta["class_names"]
            if meta["format"] != FORMAT:
                raise ValueError(f"format {meta['format']!r}")
        except FileNotFoundError:
            raise ConfigError(f"{path}: no such feature cache (make one with `metashot embed`)") from None
        except (OSError, EOFError, RuntimeError, ValueError, KeyError, TypeError, UnpicklingError) as e:
            text = str(e).strip()
            reason = f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__
            if isinstance(e, UnpicklingError):  # not torch's advice to unpickle it anyway: never here
                reason = "it holds more than tensors and plain data, which metashot does not unpickle"
            raise ConfigError(f"{path}: not a metashot feature cache ({reason})") from None
        if meta["version"] != VERSION:
            raise ConfigError(f"{path}: a feature cache of version {meta['version']}, this metashot reads "
                              f"version {VERSION}; embed it again")
        if features.dim() != 2 or int(sizes.sum()) != len(features) or len(names) != len(sizes):
            raise ConfigError(f"{path}: damaged feature cache ({len(features)} rows, {len(names)} names, "
                              f"class sizes {sizes.tolist()[:5]}...)")
        return cls(features.float(), sizes.long(), names, meta["key"], meta["config"])

    def check(self, where: str | os.PathLike) -> None:
        """A :class:`ConfigError` naming what changed when the data the features were computed from is no
        longer what it was (its task source rebuilt from :attr:`config`); a warning when it is gone."""
        from metashot.data.tasks import build_source

        try:
            source = build_source(Config.from_dict(self.config, str(where)))
            data = source.data_key(self.key["part"])
        except (MetashotError, ValueError, OSError) as e:
            warnings.warn(f"{where}: its data cannot be checked ({e}); the features are taken as they are",
                          stacklevel=2)
            return
        diff = differences(self.key, {**self.key, "data": data})
        if diff:
            raise ConfigError(f"{where}: stale feature cache: its {', '.join(diff)} differ from the data's "
                              "now; embed it again")


def embed(
    backbone: nn.Module,
    source: FewShotSource,
    part: str = "test",
    device: torch.device | str = "cpu",
    batch_size: int = 256,
    progress: bool = False,
    path: str | os.PathLike | None = None,
) -> FeatureCache:
    """``backbone``'s features [N, D] of every image of ``source``'s ``part``, in eval mode under
    ``torch.inference_mode``, ``batch_size`` images at a time on ``device`` (the backbone is moved
    there). With ``path``, a cache there of the same key is read back instead, and a stale one (or none)
    is computed and written there."""
    if batch_size < 1:
        raise ConfigError(f"--batch-size must be at least 1, got {batch_size}")
    key = cache_key(backbone, source, part)
    if path is not None and Path(path).exists():
        cached = FeatureCache.load(path)  # not a cache at all: an error, not overwritten
        if cached.key == key:
            return cached
    data = source.dataset(part)
    start, was_training = time.perf_counter(), backbone.training
    backbone.to(device).eval()
    chunks = []
    try:
        with torch.inference_mode(), tqdm(total=len(data), unit="image", desc=f"embed {part}",
                                          disable=not progress, leave=False) as bar:
            for i in range(0, len(data), batch_size):
                x = source.present(data.flat[i:i + batch_size].to(device))
                chunks.append(backbone(x.contiguous(memory_format=torch.channels_last)).flatten(1).float().cpu())
                bar.update(len(x))
    finally:
        backbone.train(was_training)
    # concatenated outside inference mode: a normal tensor, which a head that fits by autograd can use
    features = torch.cat(chunks) if chunks else torch.zeros(0, 0)
    names = data.class_names or [str(c) for c in range(data.num_classes)]
    cache = FeatureCache(features, data.class_sizes.clone(), names, key, source.cfg.to_dict(),
                         time.perf_counter() - start)
    if path is not None:
        cache.save(path)
    return cache


def evaluate_features(
    cache: FeatureCache,
    head: str,
    head_args: dict[str, Any] | None = None,
    episodes: int = 1000,
    ways: int = 5,
    shots: int = 1,
    queries: int = 15,
    seed: int = 0,
    device: torch.device | str = "cpu",
    progress: bool = False,
    meta_batch: int = 50,
) -> Result:
    """Episodes 0..``episodes``-1 of ``cache``'s features, ``ways``-way ``shots``-shot with ``queries``
    queries per class, drawn as the task's test episodes with ``seed``, scored by the head ``head`` of
    :data:`~metashot.methods.HEADS` (built with ``head_args``) ``meta_batch`` episodes at a time: the mean
    and 95% interval of each metric, as :func:`metashot.evaluate.evaluate` gives for images."""
    from metashot.methods import build_head
    from metashot.methods.heads import EncoderHead, HeadMethod

    if episodes < 1 or meta_batch < 1:
        raise ConfigError(f"--test-episodes must be at least 1, got {episodes}" if episodes < 1 else
                          f"meta_batch must be at least 1, got {meta_batch}")
    scorer = build_head(head, **(head_args or {}))
    if isinstance(scorer, EncoderHead):
        raise ConfigError(f"the {head} head trains the encoder on each episode's images; a feature cache "
                          "holds features only: evaluate the run folder with --head instead")
    data = cache.dataset()
    try:
        sampler = data.sampler(ways=ways, shots=shots, queries=queries, episodes=episodes, seed=seed)
    except ValueError as e:
        raise ConfigError(f"feature cache: {e}") from None
    method = HeadMethod(nn.Flatten(), scorer).to(device)
    return evaluate(method, episode_loader(data, sampler, min(meta_batch, episodes)), device, progress)
