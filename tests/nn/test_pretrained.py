"""Pretrained backbones by name (``hf:`` folders saved by save_pretrained; tiny models with random weights,
built once per session): the features equal transformers' own on its processor's pixels, the processor's
size, crop, mean and std are the ones applied, freezing, the fine-tuning rate, and every error a user can
meet (no transformers, no timm, offline without a cache, pickled weights, no processor config)."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from metashot import cli
from metashot.batches import Episode, TaskInfo
from metashot.errors import ConfigError
from metashot.methods import ProtoNet
from metashot.nn import Preprocessing, PretrainedBackbone, feature_size, make_backbone, pretrained
from metashot.nn.backbones import is_factory_path, is_pretrained
from metashot.nn.pretrained import _hf_preprocessing

transformers = pytest.importorskip("transformers")

TINY = {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 64}
VISION = {**TINY, "image_size": 32, "patch_size": 8}
TEXT = {**TINY, "vocab_size": 64, "max_position_embeddings": 16, "bos_token_id": 0, "eos_token_id": 1,
        "pad_token_id": 1}
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
TOL = 1e-5  # float32 arithmetic in a different order; the uint8 pixels are identical


def _processor(kind: str):  # noqa: ANN202
    """transformers' PIL image processor class (5.x ``BitImageProcessorPil``; 4.x's slow one is PIL's)."""
    module = {"Bit": "bit", "ViT": "vit", "CLIP": "clip", "Siglip": "siglip", "ConvNext": "convnext"}[kind]
    try:
        pil = __import__(f"transformers.models.{module}.image_processing_pil_{module}", fromlist=["_"])
        return getattr(pil, f"{kind}ImageProcessorPil")
    except ImportError:
        return getattr(transformers, f"{kind}ImageProcessor")


@pytest.fixture(scope="session")
def hub(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders saved by save_pretrained: a DINOv2 (BiT processor: shortest edge 36, crop 32), a ViT
    without a pooler (as DINO's checkpoints), a CLIP and a SigLIP (both towers), a DINOv2 with registers
    and a ConvNeXt, each with its processor."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    t = transformers
    registers = t.Dinov2WithRegistersConfig(**VISION, num_register_tokens=4)
    models = {
        "dino": (t.Dinov2Model(t.Dinov2Config(**VISION)),
                 _processor("Bit")(size={"shortest_edge": 36}, crop_size={"height": 32, "width": 32})),
        "vit": (t.ViTModel(t.ViTConfig(**VISION), add_pooling_layer=False),
                _processor("ViT")(size={"height": 32, "width": 32})),
        "clip": (t.CLIPModel(t.CLIPConfig(text_config=TEXT, vision_config=VISION, projection_dim=16)),
                 _processor("CLIP")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
        "siglip": (t.SiglipModel(t.SiglipConfig(text_config=TEXT, vision_config=VISION)),
                   _processor("Siglip")(size={"height": 32, "width": 32})),
        "registers": (t.Dinov2WithRegistersModel(registers),
                      _processor("Bit")(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})),
        "convnext": (t.ConvNextModel(t.ConvNextConfig(hidden_sizes=[8, 16], depths=[1, 1], num_stages=2)),
                     _processor("ConvNext")(size={"shortest_edge": 32})),  # crop_pct 0.875: edge 36, crop 32
    }
    for name, (model, processor) in models.items():
        model.save_pretrained(root / name)
        processor.save_pretrained(root / name)
    return {name: root / name for name in models}


def _image(seed: int = 0, size: tuple[int, int] = (48, 40)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _pixels(folder: Path, kind: str, image: Image.Image) -> torch.Tensor:
    return _processor(kind).from_pretrained(folder)(image, return_tensors="pt")["pixel_values"]


def _ours(bb: PretrainedBackbone, image: Image.Image) -> torch.Tensor:
    return bb.preprocessing.read(image)[None].float() / 255


def test_dinov2_is_its_processor_and_model(hub: dict[str, Path]) -> None:
    bb = pretrained(f"hf:{hub['dino']}", (3, 32, 32), freeze=True)
    assert bb.preprocessing == Preprocessing((32, 32), 36, CLIP_MEAN, CLIP_STD, "bicubic")
    image = _image()
    pixels = _pixels(hub["dino"], "Bit", image)
    x = _ours(bb, image)
    torch.testing.assert_close(bb.preprocessing(x), pixels, atol=TOL, rtol=0)
    model = transformers.Dinov2Model.from_pretrained(hub["dino"]).eval()
    want = model(pixel_values=pixels).pooler_output  # DINOv2's layer-normed CLS token
    got = bb(x)
    assert bb.pool == "pooler" and got.shape == (1, 32)
    torch.testing.assert_close(got, want, atol=TOL, rtol=0)


def test_vit_without_pooler_takes_cls_or_mean(hub: dict[str, Path]) -> None:
    image = _image(1)
    pixels = _pixels(hub["vit"], "ViT", image)
    model = transformers.ViTModel.from_pretrained(hub["vit"], add_pooling_layer=False).eval()
    tokens = model(pixel_values=pixels).last_hidden_state  # [1, 1 + 16 patches, 32]
    for pool, want in [("auto", tokens[:, 0]), ("cls", tokens[:, 0]), ("mean", tokens[:, 1:].mean(1))]:
        bb = pretrained(f"hf:{hub['vit']}", (3, 32, 32), freeze=True, pool=pool)
        assert bb.preprocessing.resize is None and bb.prefix == 1
        torch.testing.assert_close(bb(_ours(bb, image)), want, atol=TOL, rtol=0)
    with pytest.raises(ConfigError, match="the model has no trained pooler; use pool cls or mean"):
        pretrained(f"hf:{hub['vit']}", (3, 32, 32), pool="pooler")


def test_clip_and_siglip_give_their_image_embedding(hub: dict[str, Path]) -> None:
    image = _image(2)
    clip = transformers.CLIPModel.from_pretrained(hub["clip"]).eval()
    pixels = _pixels(hub["clip"], "CLIP", image)
    want = clip.visual_projection(clip.vision_model(pixel_values=pixels).pooler_output)
    bb = pretrained(f"hf:{hub['clip']}", (3, 32, 32), freeze=True)
    assert bb.pool == "image_embeds" and bb.preprocessing.resize == 32
    torch.testing.assert_close(bb(_ours(bb, image)), want, atol=TOL, rtol=0)
    assert want.shape == (1, 16)
    siglip = transformers.SiglipModel.from_pretrained(hub["siglip"]).eval()
    pixels = _pixels(hub["siglip"], "Siglip", image)
    want = siglip.get_image_features(pixel_values=pixels)
    want = want if isinstance(want, torch.Tensor) else want.pooler_output
    bb = pretrained(f"hf:{hub['siglip']}", (3, 32, 32), freeze=True)
    assert bb.pool == "pooler" and bb.prefix == 0  # SigLIP's tokens are all patches
    torch.testing.assert_close(bb(_ours(bb, image)), want, atol=TOL, rtol=0)
    with pytest.raises(ConfigError, match="no CLS token"):
        pretrained(f"hf:{hub['siglip']}", (3, 32, 32), pool="cls")


def test_registers_and_feature_maps(hub: dict[str, Path]) -> None:
    image = _image(3)
    model = transformers.Dinov2WithRegistersModel.from_pretrained(hub["registers"]).eval()
    tokens = model(pixel_values=_pixels(hub["registers"], "Bit", image)).last_hidden_state  # CLS, 4, 16
    bb = pretrained(f"hf:{hub['registers']}", (3, 32, 32), freeze=True, pool="mean")
    assert bb.prefix == 5
    torch.testing.assert_close(bb(_ours(bb, image)), tokens[:, 5:].mean(1), atol=TOL, rtol=0)
    model = transformers.ConvNextModel.from_pretrained(hub["convnext"]).eval()
    out = model(pixel_values=_pixels(hub["convnext"], "ConvNext", image))
    for pool, want in [("auto", out.pooler_output), ("mean", out.last_hidden_state.mean((2, 3)))]:
        bb = pretrained(f"hf:{hub['convnext']}", (3, 32, 32), freeze=True, pool=pool)
        assert (bb.preprocessing.size, bb.preprocessing.resize) == ((32, 32), 36)
        torch.testing.assert_close(bb(_ours(bb, image)), want, atol=TOL, rtol=0)


def test_tensor_preprocessing_by_hand() -> None:
    prep = Preprocessing((32, 32), 36, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0), "bicubic")
    x = torch.rand(2, 3, 36, 45)  # shortest edge already 36: only the centre crop, rows 2.., columns 6..
    want = (x[:, :, 2:34, 6:38] - torch.tensor([0.5, 0.25, 0.0]).view(3, 1, 1)) / torch.tensor(
        [0.5, 0.25, 2.0]).view(3, 1, 1)
    torch.testing.assert_close(prep(x), want)
    grey = torch.full((2, 1, 28, 20), 0.75)  # resized up, cropped; a constant stays constant
    want = torch.tensor([0.5, 2.0, 0.375]).view(1, 3, 1, 1).expand(2, 3, 32, 32)
    torch.testing.assert_close(prep(grey), want)
    channels_last = torch.rand(2, 3, 28, 28).contiguous(memory_format=torch.channels_last)
    assert prep(channels_last).shape == (2, 3, 32, 32)
    assert Preprocessing.from_dict(json.loads(json.dumps(prep.to_dict()))) == prep
    with pytest.raises(ValueError, match="not a preprocessing dict"):
        Preprocessing.from_dict({"size": [32, 32]})


def test_read_images(tmp_path: Path) -> None:
    prep = Preprocessing((32, 32), 36, CLIP_MEAN, CLIP_STD, "bilinear")
    Image.new("RGBA", (50, 40), (10, 20, 30, 0)).save(tmp_path / "clear.png")
    assert torch.equal(prep.read(tmp_path / "clear.png"), torch.full((3, 32, 32), 255, dtype=torch.uint8))
    assert prep.read(Image.new("L", (40, 60), 7)).shape == (3, 32, 32)
    (tmp_path / "bad.jpg").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="bad.jpg: not a readable image"):
        prep.read(tmp_path / "bad.jpg")


@pytest.mark.parametrize(("config", "size", "resize", "mean", "std"), [
    ({"size": 224, "do_center_crop": True, "crop_size": 224, "image_mean": [0.5] * 3, "image_std": [0.5] * 3},
     (224, 224), 224, (0.5,) * 3, (0.5,) * 3),  # an old CLIP-style config: the int size is an edge
    ({"size": 224, "image_mean": 0.5, "image_std": 0.5}, (224, 224), None, (0.5,) * 3, (0.5,) * 3),
    ({"size": {"shortest_edge": 224}, "crop_pct": 0.875, "image_mean": [0.0] * 3, "image_std": [1.0] * 3},
     (224, 224), 256, (0.0,) * 3, (1.0,) * 3),  # ConvNeXt: the edge / crop_pct, then the crop
    ({"size": {"height": 8, "width": 8}, "rescale_factor": 1 / 127.5, "image_mean": [1.0] * 3,
      "image_std": [1.0] * 3}, (8, 8), None, (0.5,) * 3, (0.5,) * 3),  # x * 2 - 1
    ({"size": {"height": 8, "width": 8}, "do_normalize": False}, (8, 8), None, (0.0,) * 3, (1.0,) * 3),
])
def test_processor_configs(config: dict, size: tuple, resize: int | None, mean: tuple, std: tuple) -> None:
    prep = _hf_preprocessing("hf:x", {"resample": 2, **config})
    assert (prep.size, prep.resize, prep.interpolation) == (size, resize, "bilinear")
    np.testing.assert_allclose(prep.mean, mean, atol=1e-9)
    np.testing.assert_allclose(prep.std, std, atol=1e-9)


def test_frozen_and_fine_tuned(hub: dict[str, Path]) -> None:
    name, x = f"hf:{hub['dino']}", torch.rand(3, 1, 28, 28)
    frozen = make_backbone(name, (1, 28, 28), freeze=True)
    assert frozen.lr_scale is None and not any(p.requires_grad for p in frozen.parameters())
    frozen.train()
    assert frozen.training and not frozen.model.training and not frozen(x).requires_grad
    assert feature_size(frozen, (1, 28, 28)) == 32
    torch.testing.assert_close(frozen(x), frozen(x.expand(-1, 3, -1, -1)))  # grey is repeated to RGB
    tuned = make_backbone(name, (1, 28, 28))
    assert tuned.lr_scale == 0.1 and tuned.model.training
    tuned(x).sum().backward()
    weight = tuned.model.embeddings.patch_embeddings.projection.weight
    assert weight.grad is not None and weight.grad.abs().sum() > 0


def test_protonet_on_a_pretrained_backbone(hub: dict[str, Path]) -> None:
    info = TaskInfo((1, 28, 28), ways=3, train_ways=3)
    method = ProtoNet.build(info, backbone=f"hf:{hub['dino']}", backbone_args={"lr_scale": 0.5})
    groups = method.param_groups(1e-3)
    encoder = {id(p) for p in method.encoder.parameters()}
    assert [g.get("lr") for g in groups] == [5e-4] and {id(p) for p in groups[0]["params"]} == encoder
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(3).repeat_interleave(2)[None]
    support, query = torch.rand(2, 1, 6, 1, 28, 28, generator=g)
    episode = Episode(support, labels, query, labels, num_ways=3)
    loss, metrics = method.loss(episode)  # the encoder is channels-last (HeadMethod), so are its inputs
    loss.backward()
    assert torch.isfinite(loss) and metrics["acc"].shape == (1,)
    frozen = ProtoNet.build(info, backbone=f"hf:{hub['dino']}", backbone_args={"freeze": True})
    assert all("lr" not in g for g in frozen.param_groups(1e-3))


def test_training_nothing_but_a_frozen_backbone_is_refused(
    hub: dict[str, Path], patterns: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    shape = ["--ways", "3", "--train-ways", "5", "--queries", "3"]
    argv = ["train", "protonet", "--task", "folder", "--data-dir", str(patterns), *shape,
            "--backbone", f"hf:{hub['dino']}", "--set", 'backbone_args={"freeze": true}',
            "--run-dir", str(tmp_path / "run"), "--no-progress"]
    assert cli.main(argv) == 2
    assert capsys.readouterr().err.startswith("metashot: error: protonet has nothing to train: every "
                                              "parameter is frozen")
    assert not (tmp_path / "run" / "config.json").exists()


def test_reference_identifies_the_features(hub: dict[str, Path], tmp_path: Path) -> None:
    folder = tmp_path / "dino"
    shutil.copytree(hub["dino"], folder)
    ref = pretrained(f"hf:{folder}", (3, 32, 32), freeze=True).reference()
    assert json.loads(json.dumps(ref)) == ref
    assert ref["config_sha256"] == hashlib.sha256((folder / "config.json").read_bytes()).hexdigest()
    weights = folder / "model.safetensors"
    assert ref["pool"] == "pooler" and ref["preprocessing"]["resize"] == 36
    copy = tmp_path / "copy"
    shutil.copytree(folder, copy)  # a copy (new modification times) identifies the same features
    assert pretrained(f"hf:{copy}", (3, 32, 32), freeze=True).reference()["weights"] == ref["weights"]
    data = bytearray(weights.read_bytes())
    data[-4:] = bytes(4 - i for i in range(4))  # the last weight's bytes changed, its header not
    weights.write_bytes(bytes(data))
    assert pretrained(f"hf:{folder}", (3, 32, 32), freeze=True).reference()["weights"] != ref["weights"]


def test_names_are_not_code() -> None:
    assert is_pretrained("hf:x/y") and is_pretrained("timm:resnet50") and not is_pretrained("conv4")
    assert not is_factory_path("hf:x/y") and not is_factory_path("timm:resnet50")


def test_missing_libraries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)
    needs = r'^backbone hf:x/y needs transformers: pip install "metashot\[hub\]"$'
    with pytest.raises(ConfigError, match=needs):
        make_backbone("hf:x/y", (3, 32, 32))
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ConfigError, match=r"^backbone timm:resnet50 needs timm, .*: pip install timm$"):
        make_backbone("timm:resnet50", (3, 32, 32))


def _offline(monkeypatch: pytest.MonkeyPatch, cache: Path) -> None:
    """HF_HUB_OFFLINE=1 and an empty Hugging Face cache ``cache``, in this process (huggingface_hub reads
    the environment once, at its import)."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))


def test_offline_from_the_hub_cache(
    hub: dict[str, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--metashot-test--tiny-dino"
    shutil.copytree(hub["dino"], repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    _offline(monkeypatch, tmp_path)
    ref = pretrained("hf:metashot-test/tiny-dino", (3, 32, 32), freeze=True).reference()
    assert ref["weights"] == {"commit": commit} and ref["revision"] is None
    pinned = pretrained("hf:metashot-test/tiny-dino", (3, 32, 32), revision=commit)
    assert pinned.reference()["revision"] == commit and pinned.lr_scale == 0.1


def test_offline_without_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _offline(monkeypatch, tmp_path)
    with pytest.raises(ConfigError) as e:
        pretrained("hf:nobody-metashot/no-such-model", (3, 32, 32))
    message = str(e.value)
    assert "\n" not in message and message.startswith("backbone hf:nobody-metashot/no-such-model: not in the "
                                                      "local Hugging Face cache")
    assert "HF_HUB_OFFLINE=1" in message and "hf:/path/to/folder" in message and "online" in message


def test_folder_errors(hub: dict[str, Path], tmp_path: Path) -> None:
    pickled, bare = tmp_path / "pickled", tmp_path / "bare"
    pickled.mkdir()
    shutil.copy(hub["dino"] / "config.json", pickled)
    torch.save({"w": torch.zeros(1)}, pickled / "pytorch_model.bin")
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(hub["dino"] / f, bare)
    for name, message in [
        (f"hf:{pickled}", r"no \.safetensors weights in .*; pickled weights \(pytorch_model\.bin\) are "
                          "refused"),
        (f"hf:{bare}", r"no image processor config \(preprocessor_config\.json\)"),
        (f"hf:{tmp_path / 'none'}", "no folder"),
        ("hf:", "name the model after hf:"),
    ]:
        with pytest.raises(ConfigError, match=message):
            pretrained(name, (3, 32, 32))


@pytest.mark.parametrize(("shape", "args", "message"), [
    ((1,), {}, r"takes images \[1 or 3, H, W\]"),
    ((3, 32, 32), {"pool": "max"}, "pool must be one of auto, cls, mean, pooler"),
    ((3, 32, 32), {"freeze": True, "lr_scale": 0.1}, "lr_scale 0.1 is for a backbone that trains"),
    ((3, 32, 32), {"lr_scale": -1}, "lr_scale must be a positive number"),
    ((3, 32, 32), {"freeze": "yes"}, "freeze must be true or false"),
])
def test_argument_errors(shape: tuple, args: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make_backbone("hf:x/y", shape, **args)


def test_unknown_backbone_args() -> None:
    with pytest.raises(ValueError, match="backbone_args {'hidden': 64} do not fit backbone 'hf:x/y'"):
        make_backbone("hf:x/y", (3, 32, 32), hidden=64)
