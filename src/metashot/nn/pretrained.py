"""Pretrained foundation backbones by name: ``hf:ORG/NAME`` (the Hugging Face hub), ``hf:/path/to/folder`` (a
folder saved by ``save_pretrained``) and ``timm:NAME``.

Each brings its own :class:`Preprocessing` (input size, resize and crop, mean and std, read from its processor
config), applied inside the backbone's forward, so it takes images in [0, 1] at any size. Frozen, it is a
fixed feature extractor; fine-tuned, it trains at ``lr_scale`` times the head's rate (P>M>F, Hu et al.,
CVPR 2022).
transformers and timm are imported only when such a backbone is built.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from metashot.errors import ConfigError
from metashot.nn.preprocessing import PIL_RESAMPLE, Preprocessing

POOLS = ("auto", "cls", "mean", "pooler")
_PIL_CODES = {0: "nearest", 2: "bilinear", 3: "bicubic"}  # PIL.Image.Resampling's values
_FOLDER_PREFIXES = ("/", "./", "../", "~")
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class PretrainedBackbone(nn.Module):
    """A pretrained model's pooled feature: float [M, C, h, w] in [0, 1] -> [M, D] (preprocessing inside).

    ``pool`` is how the model's output becomes [M, D]: "image_embeds" (CLIP's projected embedding),
    "pooler" (the model's ``pooler_output``), "cls" (the first token), "mean" (the mean of the patch tokens,
    after ``prefix`` CLS and register tokens; of the feature map's positions for a CNN), "timm" (timm's
    pooled pre-logits)."""

    def __init__(self, name: str, model: nn.Module, preprocessing: Preprocessing, pool: str, prefix: int,
                 freeze: bool, lr_scale: float | None, identity: dict[str, Any]) -> None:
        super().__init__()
        self.name, self.model, self.preprocessing = name, model, preprocessing
        self.pool, self.prefix, self.freeze, self.lr_scale = pool, prefix, freeze, lr_scale
        self._identity = identity
        if freeze:
            self.model.requires_grad_(False)
        self.train(self.training)

    def train(self, mode: bool = True) -> PretrainedBackbone:
        """As nn.Module's; a frozen backbone's model stays in eval mode (dropout off, statistics fixed)."""
        super().train(mode)
        if self.freeze:
            self.model.train(False)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.freeze:
            with torch.no_grad():
                return self._features(self.preprocessing(x))
        return self._features(self.preprocessing(x))

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.pool == "timm":
            return self.model(pixels).flatten(1)
        out = self.model(pixel_values=pixels)
        if self.pool == "image_embeds":
            return out.image_embeds
        if self.pool == "pooler":
            return out.pooler_output.flatten(1)
        h = out.last_hidden_state
        if self.pool == "cls":
            return h[:, 0]
        return h.flatten(2).mean(2) if h.dim() == 4 else h[:, self.prefix:].mean(1)

    def reference(self) -> dict[str, Any]:
        """What identifies these features (for caches and classifier folders): name, the model's config
        hash and weights' fingerprint or commit, pooling, the preprocessing dict."""
        return {"name": self.name, **self._identity, "pool": self.pool,
                "preprocessing": self.preprocessing.to_dict()}


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def pretrained(name: str, input_shape: tuple[int, ...], freeze: bool = False, lr_scale: float | None = None,
               pool: str = "auto", revision: str | None = None) -> PretrainedBackbone:
    """The pretrained backbone ``name`` (``hf:ORG/NAME``, ``hf:/folder``, ``timm:NAME``) for images of
    ``input_shape`` [C, H, W] (C 1 or 3); ``freeze``: no gradients, eval mode; else fine-tuned at
    ``lr_scale`` (default 0.1) times the learning rate; ``pool``: "auto", "cls", "mean" or "pooler" (see
    :class:`PretrainedBackbone`); ``revision``: a hub branch, tag or commit. ConfigError (one line) for
    every problem a user can fix."""
    if len(input_shape) != 3 or input_shape[0] not in (1, 3):
        raise ConfigError(f"backbone {name} takes images [1 or 3, H, W]; this task's examples are "
                          f"{tuple(input_shape)}")
    if not isinstance(freeze, bool):
        raise ConfigError(f"backbone {name}: freeze must be true or false, got {freeze!r}")
    if freeze and lr_scale is not None:
        raise ConfigError(f"backbone {name}: lr_scale {lr_scale} is for a backbone that trains, not frozen")
    if lr_scale is not None and (isinstance(lr_scale, bool) or not isinstance(lr_scale, (int, float))
                                 or not 0 < lr_scale < math.inf):
        raise ConfigError(f"backbone {name}: lr_scale must be a positive number, got {lr_scale!r}")
    if pool not in POOLS:
        raise ConfigError(f"backbone {name}: pool must be one of {', '.join(POOLS)}, got {pool!r}")
    prefix, _, spec = name.partition(":")
    if not spec:
        raise ConfigError(f"backbone {name}: name the model after {prefix}:, e.g. hf:facebook/dinov2-small")
    load = _load_hf if prefix == "hf" else _load_timm
    model, preprocessing, kind, tokens, identity = load(name, spec, pool, revision)
    scale = None if freeze else float(0.1 if lr_scale is None else lr_scale)
    return PretrainedBackbone(name, model, preprocessing, kind, tokens, freeze, scale, identity)


# -- Hugging Face transformers ----------------------------------------------------------------------------


def _import_transformers(name: str) -> Any:
    try:
        import transformers
    except ImportError:
        raise ConfigError(f'backbone {name} needs transformers: pip install "metashot[hub]"') from None
    return transformers


def _not_cached(name: str, e: BaseException) -> ConfigError:
    return ConfigError(
        f"backbone {name}: not in the local Hugging Face cache and not downloadable here ({_first_line(e)}); "
        "download it once online (then HF_HUB_OFFLINE=1 uses the cache), or pass a local folder saved by "
        "save_pretrained as hf:/path/to/folder")


def _check_folder(name: str, folder: Path) -> None:
    if not folder.is_dir():
        raise ConfigError(f"backbone {name}: no folder {folder}")
    files = [p.name for p in folder.iterdir()]
    if not any(f.endswith(".safetensors") for f in files):
        pickled = [f for f in files if f.endswith(_PICKLED)]
        raise ConfigError(f"backbone {name}: no .safetensors weights in {folder}"
                          + (f"; pickled weights ({pickled[0]}) are refused, as they may run code when "
                             "loaded: save the model with save_pretrained(safe_serialization=True)" if pickled
                             else ""))


def _load_hf(name: str, spec: str, pool: str, revision: str | None) -> tuple:
    transformers = _import_transformers(name)
    local = spec.startswith(_FOLDER_PREFIXES)
    source = str(Path(spec).expanduser()) if local else spec
    if local:
        if revision is not None:
            raise ConfigError(f"backbone {name}: a revision is for hub models, not a local folder")
        _check_folder(name, Path(source))
    try:
        config = transformers.AutoConfig.from_pretrained(source, revision=revision, trust_remote_code=False)
    except OSError as e:
        raise (ConfigError(f"backbone {name}: {_first_line(e)}") if local else _not_cached(name, e)) from None
    except ValueError as e:  # an unknown model type, or one that needs its own code (never run)
        raise ConfigError(f"backbone {name}: {_first_line(e)}") from None
    model, pooler_loaded = _hf_model(transformers, name, source, config, revision)
    preprocessing = _hf_preprocessing(name, _hf_processor_dict(name, source, revision))
    kind, prefix = _hf_pool(name, model, preprocessing, pool, pooler_loaded)
    return model, preprocessing, kind, prefix, _hf_identity(transformers, source, revision)


def _hf_model(transformers: Any, name: str, source: str, config: Any, revision: str | None) -> tuple:
    """The model and whether its pooler's weights were in the checkpoint (else transformers made them up).
    CLIP and SigLIP checkpoints give their vision tower (CLIP's with its projection)."""
    towers = {"clip": "CLIPVisionModelWithProjection", "siglip": "SiglipVisionModel"}
    if config.model_type in towers:
        kind = getattr(transformers, towers[config.model_type])
        vision = config.vision_config
        if hasattr(config, "projection_dim"):  # the projection's width is the whole model's setting
            vision.projection_dim = config.projection_dim
        config = vision
    else:
        kind = transformers.AutoModel
    verbosity, bars = transformers.logging.get_verbosity(), transformers.logging.is_progress_bar_enabled()
    transformers.logging.set_verbosity_error()  # its load report: missing keys are judged below
    transformers.logging.disable_progress_bar()  # its bar would come before metashot's own output
    try:
        model, info = kind.from_pretrained(source, config=config, revision=revision, use_safetensors=True,
                                           trust_remote_code=False, output_loading_info=True)
    except OSError as e:
        if "safetensors" in str(e):
            raise ConfigError(f"backbone {name}: no .safetensors weights ({_first_line(e)}); pickled weights "
                              "are refused, as they may run code when loaded") from None
        raise _not_cached(name, e) from None
    except (RuntimeError, ValueError) as e:
        raise ConfigError(f"backbone {name}: its weights do not fit its config ({_first_line(e)})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
        if bars:
            transformers.logging.enable_progress_bar()
    missing = sorted(info["missing_keys"])
    others = [k for k in missing if not k.startswith("pooler.")]
    if others:
        raise ConfigError(f"backbone {name}: {len(others)} weights missing from the checkpoint "
                          f"({', '.join(others[:3])}{', ...' if len(others) > 3 else ''})")
    if "pixel_values" not in inspect.signature(model.forward).parameters:
        raise ConfigError(f"backbone {name}: {type(model).__name__} is not an image model (no pixel_values)")
    return model.float(), not missing


def _hf_processor_dict(name: str, source: str, revision: str | None) -> dict[str, Any]:
    """The processor config's dict, read as data (a processor is not built: some need torchvision)."""
    from transformers.image_processing_utils import ImageProcessingMixin

    try:
        d, _ = ImageProcessingMixin.get_image_processor_dict(source, revision=revision)
    except OSError:
        d = {}
    if not d:
        raise ConfigError(f"backbone {name}: no image processor config (preprocessor_config.json) beside the "
                          "model, so its input size, mean and std are unknown; save the processor there too "
                          "(AutoImageProcessor.from_pretrained(...).save_pretrained(folder))")
    return d


def _size(value: Any) -> dict[str, int]:
    return {"height": value, "width": value} if isinstance(value, int) else dict(value)


def _hf_preprocessing(name: str, d: dict[str, Any]) -> Preprocessing:
    """A processor config's resize, centre crop, rescale and normalisation as a :class:`Preprocessing`."""
    try:
        return Preprocessing(*_hf_geometry(name, d), *_hf_normalisation(name, d))
    except ConfigError:
        raise
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"backbone {name}: its processor config does not read "
                          f"({type(e).__name__}: {e})") from None


def _hf_geometry(name: str, d: dict[str, Any]) -> tuple[tuple[int, int], int | None]:
    """(size, resize) of a processor config."""
    if not d.get("do_resize", True):
        raise ConfigError(f"backbone {name}: its processor does not resize (do_resize false); a batch needs "
                          "one input size")
    crop = _size(d["crop_size"]) if d.get("do_center_crop", "crop_size" in d) and d.get("crop_size") else None
    size = d.get("size")
    if isinstance(size, int):  # an old config: a shortest edge when it crops, else a square
        size = {"shortest_edge": size} if crop or d.get("crop_pct") else _size(size)
    if not isinstance(size, dict):
        raise ConfigError(f"backbone {name}: its processor config has no size")
    edge = size.get("shortest_edge")
    if edge and d.get("crop_pct") and not crop:  # ConvNeXt's rule: edge / crop_pct, then crop to edge
        return (edge, edge), (int(edge / d["crop_pct"]) if edge < 384 else None)
    if crop:
        out = (crop["height"], crop["width"])
        if not edge and (size["height"], size["width"]) != out:
            raise ConfigError(f"backbone {name}: a resize to {size} then a crop to {crop} is not supported")
        return out, edge or None
    # a shortest edge with no crop: its square centre, so that a batch has one size
    return ((edge, edge), edge) if edge else ((size["height"], size["width"]), None)


def _hf_normalisation(name: str, d: dict[str, Any]) -> tuple[tuple[float, ...], tuple[float, ...], str]:
    """(mean, std, interpolation) of a processor config. A rescale other than 1/255 folds into mean and
    std: (x * 255 r - m) / s = (x - m / 255 r) / (s / 255 r)."""
    scale = 255 * (d.get("rescale_factor", 1 / 255) if d.get("do_rescale", True) else 1.0)
    mean, std = (d.get("image_mean"), d.get("image_std")) if d.get("do_normalize", True) else (0.0, 1.0)
    if mean is None or std is None:
        raise ConfigError(f"backbone {name}: its processor normalises but has no image_mean or image_std")
    mean, std = ([float(v)] * 3 if isinstance(v, (int, float)) else list(map(float, v)) for v in (mean, std))
    resample = d.get("resample", 2)  # transformers' resize defaults to bilinear
    if resample not in _PIL_CODES and resample not in PIL_RESAMPLE:
        raise ConfigError(f"backbone {name}: resample {resample} is not supported (only nearest, bilinear, "
                          "bicubic)")
    return tuple(m / scale for m in mean), tuple(s / scale for s in std), _PIL_CODES.get(resample, resample)


def _hf_pool(
    name: str, model: nn.Module, prep: Preprocessing, pool: str, pooler_loaded: bool
) -> tuple[str, int]:
    """``pool`` resolved against what the model gives on a dry forward: the kind and, for token outputs,
    the tokens before the patches (CLS, registers), counted from the patch grid."""
    with torch.no_grad():
        out = model.eval()(pixel_values=torch.zeros(1, 3, *prep.size))
    h = out.get("last_hidden_state")
    patch = getattr(model.config, "patch_size", None)
    p = (patch, patch) if isinstance(patch, int) else tuple(patch) if patch else None
    tokens = h is not None and h.dim() == 3
    prefix = max(h.shape[1] - (prep.size[0] // p[0]) * (prep.size[1] // p[1]), 0) if tokens and p else 1
    has_pooler = out.get("pooler_output") is not None and pooler_loaded
    if pool == "auto":
        pool = ("image_embeds" if out.get("image_embeds") is not None else "pooler" if has_pooler
                else "cls" if tokens and prefix else "mean")
    if pool == "pooler" and not has_pooler:
        raise ConfigError(f"backbone {name}: the model has no trained pooler; use pool cls or mean")
    if pool == "cls" and not (tokens and prefix):
        raise ConfigError(f"backbone {name}: the model has no CLS token; use pool mean")
    if pool == "mean" and h is None:
        raise ConfigError(f"backbone {name}: the model gives no hidden states to average")
    return pool, prefix


def _hf_identity(transformers: Any, source: str, revision: str | None) -> dict[str, Any]:
    """The config's sha256 and the weights' fingerprint: the hub commit, or the sha256 of each of a local
    folder's weight files."""
    config = Path(transformers.utils.cached_file(source, "config.json", revision=revision))
    folder = config.parent
    if folder.parent.name == "snapshots":  # the hub cache: one folder per commit
        weights: dict[str, Any] = {"commit": folder.name}
    else:
        files = sorted(p for p in folder.iterdir() if p.name.endswith((".safetensors", ".index.json")))
        weights = {"files": {p.name: _file_sha256(p) for p in files}}
    return {"revision": revision, "config_sha256": hashlib.sha256(config.read_bytes()).hexdigest(),
            "weights": weights}


def _file_sha256(path: Path) -> str:
    """The sha256 of a weights file's whole content: a copy keeps it, any changed weight changes it (about
    a second per GB, once per load)."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


# -- timm ------------------------------------------------------------------------------------------------


def _load_timm(name: str, spec: str, pool: str, revision: str | None) -> tuple:
    try:
        import timm
        from timm.data import resolve_data_config
    except Exception as e:  # missing, or its own imports (torchvision) failing
        raise ConfigError(f"backbone {name} needs timm, which does not import here ({type(e).__name__}: "
                          f"{_first_line(e)}): pip install timm") from None
    if pool != "auto" or revision is not None:
        raise ConfigError(f"backbone {name}: a timm model pools as it was made (pool auto), with no revision")
    try:
        model = timm.create_model(spec, pretrained=True, num_classes=0)
    except OSError as e:
        raise _not_cached(name, e) from None
    except (RuntimeError, ValueError) as e:  # an unknown model name
        raise ConfigError(f"backbone {name}: {_first_line(e)}") from None
    cfg = resolve_data_config({}, model=model)
    _, h, w = cfg["input_size"]
    if cfg.get("crop_mode", "center") != "center" or h != w:
        raise ConfigError(f"backbone {name}: timm's crop mode {cfg.get('crop_mode')} on {h}x{w} is not "
                          "supported")
    # timm's eval transform: shortest edge to floor(size / crop_pct), then the centre crop
    resize = math.floor(h / cfg["crop_pct"])
    interpolation = cfg["interpolation"] if cfg["interpolation"] in PIL_RESAMPLE else "bicubic"
    prep = Preprocessing((h, w), resize, tuple(cfg["mean"]), tuple(cfg["std"]), interpolation)
    pretrained_cfg = {k: v for k, v in getattr(model, "pretrained_cfg", {}).items()
                      if isinstance(v, (str, int, float, bool, list, tuple)) or v is None}
    text = json.dumps(pretrained_cfg, sort_keys=True, default=list)
    identity = {"revision": None, "timm": timm.__version__,
                "config_sha256": hashlib.sha256(text.encode()).hexdigest(),
                "weights": {k: pretrained_cfg.get(k) for k in ("hf_hub_id", "tag", "url", "file")
                            if pretrained_cfg.get(k)}}
    return model.float(), prep, "timm", 0, identity


__all__ = ["POOLS", "Preprocessing", "PretrainedBackbone", "pretrained"]
