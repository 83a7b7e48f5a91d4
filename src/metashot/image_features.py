"""Where a few-shot classifier's features come from: a frozen pretrained backbone by name (its own
preprocessing) or a trained metashot run's encoder (images decoded, resized and normalised as that run's
task decoded its own: ``TaskSource.decode_files`` and ``present``); images embedded in batches."""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Union

import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from metashot.checkpoints import load_weights
from metashot.data.images import IMAGE_SUFFIXES
from metashot.errors import ConfigError, DataError

ImageLike = Union[str, os.PathLike, Image.Image, torch.Tensor]  # noqa: UP007 (a runtime alias, py3.10)


class Features(ABC):
    """How images become features [M, D] on ``device``: :meth:`read` decodes one image, :meth:`embed`
    maps a batch of decoded images to features. Tensors are taken as decoded already."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    @abstractmethod
    def decode(self, image: str | os.PathLike | Image.Image) -> torch.Tensor:
        """A file or PIL image decoded: [C, H, W]; ValueError or OSError when it does not decode."""

    @abstractmethod
    def check(self, image: torch.Tensor) -> None:
        """A ConfigError when a decoded image [C, H, W] cannot be embedded."""

    @abstractmethod
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Decoded images [M, C, H, W] -> features [M, D] on the device."""

    @abstractmethod
    def to_json(self) -> dict[str, Any]:
        """What classifier.json records to build these features again."""

    def weights(self) -> dict[str, torch.Tensor]:
        """The weights the classifier folder keeps (none for a hub model: the hub keeps them)."""
        return {}

    def own_head(self) -> nn.Module | None:
        """The head these features were trained with, if any."""
        return None

    def read(self, image: ImageLike) -> torch.Tensor:
        """One image decoded (a tensor [C, H, W] as given): a DataError naming what does not decode."""
        if isinstance(image, torch.Tensor):
            self.check(image)
            return image
        try:
            return self.decode(image)
        except DataError:
            raise
        except (ValueError, OSError) as e:
            text = str(e)
            raise DataError(text if str(image) in text else f"{image}: does not decode ({text})") from None


class PretrainedFeatures(Features):
    """A frozen pretrained backbone (:mod:`metashot.nn.pretrained`) by name: its pooled feature."""

    def __init__(self, name: str, args: dict[str, Any], device: torch.device) -> None:
        from metashot.nn.backbones import is_pretrained, make_backbone

        super().__init__(device)
        if not is_pretrained(name):
            raise ConfigError(f"--backbone {name} is not a pretrained model: fit takes hf:ORG/NAME, "
                              "hf:/saved/folder or timm:NAME, or --from-run RUN for a trained metashot run")
        if args.get("freeze", True) is not True:
            raise ConfigError(f"backbone_args {args}: a classifier's backbone stays frozen (freeze: true)")
        self.name, self.args = name, dict(args)
        try:  # the input shape only says the images have 3 channels: the model's preprocessing sizes them
            backbone = make_backbone(name, (3, 224, 224), **{**args, "freeze": True})
        except ConfigError:
            raise
        except ValueError as e:
            raise ConfigError(f"--backbone {name}: not a model ({str(e).splitlines()[0]})") from None
        self.backbone = backbone.to(device).eval()

    def decode(self, image: str | os.PathLike | Image.Image) -> torch.Tensor:
        return self.backbone.preprocessing.read(image)

    def check(self, image: torch.Tensor) -> None:
        if image.dim() != 3 or image.shape[0] not in (1, 3):
            raise ConfigError(f"an image tensor for {self.name} is [C, H, W] with C 1 or 3, got "
                              f"{tuple(image.shape)}")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        return self.backbone(x.float().div(255) if x.dtype == torch.uint8 else x.float())

    def to_json(self) -> dict[str, Any]:
        return {"backbone": self.name, "backbone_args": self.args, "reference": self.reference(),
                "preprocessing": self.backbone.preprocessing.to_dict()}

    def reference(self) -> Any:
        return json.loads(json.dumps(self.backbone.reference()))  # as classifier.json holds it

    @classmethod
    def load(cls, saved: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device,
             path: Path) -> PretrainedFeatures:
        features = cls(saved["backbone"], saved["backbone_args"], device)
        if features.reference() != saved["reference"]:
            raise ConfigError(f"{path}: {saved['backbone']} is not the model the classifier was fitted with "
                              "(its weights, config or preprocessing changed); fit it again")
        return features


class RunFeatures(Features):
    """A trained metashot run's encoder (a :class:`~metashot.methods.heads.HeadMethod`), on images
    decoded and presented as the run's task source does."""

    def __init__(self, cfg: Any, info: Any, source: Any, method: nn.Module, device: torch.device) -> None:
        from metashot.methods.heads import HeadMethod

        super().__init__(device)
        if not isinstance(method, HeadMethod):
            raise ConfigError(f"a {cfg.method} run is not an encoder and a head; --from-run needs one "
                              "(protonet, matching, r2d2, baseline, rfs, simpleshot, meta-baseline)")
        self.cfg, self.info, self.source, self.method = cfg, info, source, method.eval()

    @classmethod
    def from_run(cls, run: str | os.PathLike, checkpoint: str, device: torch.device) -> RunFeatures:
        from metashot.runs import RunFolder
        from metashot.stages import stage_folder

        folder = RunFolder(stage_folder(run))
        cfg = folder.load_config(trust_code=True)  # nothing is imported before the check below
        _refuse_code(cfg.backbone, folder.config_path)
        cfg = cfg.replace(device=str(device)).validate()
        source, method = folder.method(cfg, checkpoint)
        return cls(cfg, source.task_info(type(method).train_batches), source, method, device)

    @classmethod
    def load(cls, saved: dict[str, Any], weights: dict[str, torch.Tensor], device: torch.device,
             path: Path) -> RunFeatures:
        from metashot.config import Config
        from metashot.data.tasks import build_source
        from metashot.methods import build_method
        from metashot.predict import CONFIG_FILE, TENSORS_FILE

        cfg = Config.from_dict(saved["config"], f"{path / CONFIG_FILE}").replace(device=str(device))
        _refuse_code(cfg.backbone, path / CONFIG_FILE)
        info = _task_info(saved.get("task_info"), path / CONFIG_FILE)
        method = build_method(cfg, info).to(device)
        load_weights(method, weights, path / TENSORS_FILE, path / CONFIG_FILE)
        return cls(cfg, info, build_source(cfg), method, device)

    def decode(self, image: str | os.PathLike | Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            return self.source.decode_files([Path(image)])[0]
        with tempfile.TemporaryDirectory() as tmp:  # the run's task decodes files: one, losslessly
            image.save(Path(tmp) / "image.png")
            return self.source.decode_files([Path(tmp) / "image.png"])[0]

    def check(self, image: torch.Tensor) -> None:
        if tuple(image.shape) != tuple(self.info.input_shape):
            raise ConfigError(f"an image tensor for a {self.cfg.task} run is {list(self.info.input_shape)}, "
                              f"as its task stores them (decode_files), got {list(image.shape)}")

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.method.features(self.source.present(x.to(self.device)))

    def to_json(self) -> dict[str, Any]:
        return {"config": self.cfg.to_dict(), "task_info": dataclasses.asdict(self.info),
                "preprocessing": {"task": self.cfg.task, "task_args": self.cfg.task_args,
                                  "image_shape": list(self.info.input_shape)}}

    def weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.method.state_dict().items()}

    def own_head(self) -> nn.Module:
        return self.method.head


def as_items(images: ImageLike | Sequence[ImageLike]) -> list[ImageLike]:
    """Images as a list: one path, PIL image or [C, H, W] tensor, a batch tensor [M, C, H, W], or a list."""
    if isinstance(images, torch.Tensor):
        return list(images.unbind()) if images.dim() == 4 else [images]
    if isinstance(images, (str, os.PathLike, Image.Image)):
        return [images]
    return list(images)


def embed_images(
    features: Features, images: ImageLike | Sequence[ImageLike], batch_size: int = 64,
    progress: bool = False, skip: Callable[[ImageLike, DataError], None] | None = None,
) -> tuple[torch.Tensor, list[int]]:
    """Features [M', D] of the images that decode, in batches of ``batch_size`` images of one shape and
    dtype, and their indices. An image that does not decode is passed to ``skip`` with its error, or
    (None) raised."""
    items = as_items(images)
    out, kept, batch = [], [], []

    def flush() -> None:
        if batch:
            with torch.inference_mode():
                out.append(features.embed(torch.stack(batch)).float())
            batch.clear()

    with tqdm(total=len(items), unit="image", disable=not progress or len(items) <= batch_size,
              leave=False) as bar:
        for i, item in enumerate(items):
            try:
                x = features.read(item)
            except DataError as e:
                if skip is None:
                    raise
                skip(item, e)
            else:
                kind = (x.shape, x.dtype)
                if batch and (len(batch) == batch_size or (batch[0].shape, batch[0].dtype) != kind):
                    flush()
                batch.append(x)
                kept.append(i)
            bar.update()
        flush()
    dim = out[0].shape[1] if out else 0
    # cat outside inference mode: normal tensors, which a head fitting a classifier may train on
    return (torch.cat(out) if out else torch.zeros(0, dim, device=features.device)), kept


def image_files(folder: Path) -> list[Path]:
    """The image files under ``folder``, any depth, sorted; hidden ones left out."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))



def features_for(
    backbone: str | None, backbone_args: dict[str, Any] | None, from_run: str | os.PathLike | None,
    checkpoint: str, device: torch.device,
) -> Features:
    """A pretrained ``backbone``'s features, or those of the run ``from_run`` (its ``checkpoint``): one of
    the two, on ``device``."""
    if (backbone is None) == (from_run is None):
        raise ConfigError("give a pretrained --backbone or a trained run (--from-run), one of the two")
    if from_run is not None:
        if backbone_args:
            raise ConfigError("--backbone-args go with --backbone; a run's backbone is the run's own")
        return RunFeatures.from_run(from_run, checkpoint, device)
    return PretrainedFeatures(backbone, backbone_args or {}, device)


def _refuse_code(backbone: str | None, where: Path) -> None:
    """A ConfigError for a backbone factory (code to import) named in a classifier folder: loading the
    folder would run it."""
    from metashot.nn.backbones import is_factory_path

    if is_factory_path(backbone):
        raise ConfigError(f"{where}: names the backbone factory {backbone!r}, code that a classifier would "
                          "run when loaded; classifiers of runs with a backbone of one's own are unsupported")


def _task_info(saved: Any, where: Path) -> Any:
    """The TaskInfo saved in a classifier folder, its fields checked as data."""
    from metashot.batches import TaskInfo

    fields = {"input_shape", "ways", "train_ways", "regression", "train_classes"}
    needed = {"input_shape", "ways", "train_ways"}
    ok = isinstance(saved, dict) and needed <= set(saved) <= fields
    shape = saved.get("input_shape") if ok else None
    ok = ok and isinstance(shape, list) and all(type(v) is int and v > 0 for v in shape) and all(
        type(saved[k]) is (bool if k == "regression" else int) for k in saved if k != "input_shape")
    if not ok:
        raise ConfigError(f"{where}: its task_info is not a task's description; the folder is damaged")
    return TaskInfo(**{**saved, "input_shape": tuple(shape)})
