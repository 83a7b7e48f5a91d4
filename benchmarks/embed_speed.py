"""Images/s of ``metashot.data.features.embed`` and episodes/s of a head on the embedding cache against the
same head on the images through the same frozen encoder.

Data: Omniglot from ``$METASHOT_DATA`` (or ``--data-dir``), the official split without rotations, its
``val`` part of ``--characters`` characters (20 images each, 28 x 28 greyscale), presented as its test
episodes are. Backbones, frozen, random weights (nothing is downloaded): ``conv4`` (Conv4-64, as
ProtoNet's); ``dino-tiny``, a DINOv2 of 1 layer, width 32, patch 8 at 32 px saved by ``save_pretrained``
and read back through ``hf:/folder`` as a user's model is (``--dino-images`` images of the part);
with ``--dinov2-small``, also one of facebook/dinov2-small's shape (12 layers, width 384, patch 14,
224 px) on ``--small-images`` images. Heads: ``prototype`` and ``logistic``, 5-way 1- and 5-shot episodes
of 15 queries per class, ``--episodes`` episodes on the cache (50 a batch) against
``--image-episodes`` on the images (one a batch, as ``metashot evaluate RUN --head`` tests a protonet run).

One JSON line per measurement:

- ``{"bench": "peak", ...}``: this machine's float32 n x n matrix-product rate (GFLOP/s, best of 5) at the
  run's thread count, the context of the others;
- ``{"bench": "embed", "backbone": ..., ...}``: ``images_per_s`` of embed (best of ``--repeats``), the
  backbone's FLOPs per image (``FlopCounterMode`` on one batch) and their rate's share of the peak;
- ``{"bench": "head", "head": ..., "episode": "5w1s15q", ...}``: ``cache_episodes_per_s`` (episodes
  drawn and scored on the cached features), ``image_episodes_per_s`` (the encoder run on each episode's
  images, then the head), and ``ratio`` = cache / images; the cache's embedding time is not in it.

    OMP_NUM_THREADS=1 python benchmarks/embed_speed.py
    OMP_NUM_THREADS=1 python benchmarks/embed_speed.py --characters 50 --episodes 200 --image-episodes 20
    python benchmarks/embed_speed.py --device cuda --threads 16 --dinov2-small
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from metashot.config import Config
from metashot.data.features import embed, evaluate_features
from metashot.data.sources import FewShotSource
from metashot.data.tasks import build_source
from metashot.evaluate import evaluate
from metashot.methods import build_head
from metashot.methods.heads import HeadMethod
from metashot.nn.backbones import conv4, make_backbone

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHAPES = {"dino-tiny": {"hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
                        "intermediate_size": 64, "image_size": 32, "patch_size": 8},
          "dinov2-small": {"hidden_size": 384, "num_hidden_layers": 12, "num_attention_heads": 6,
                           "intermediate_size": 1536, "image_size": 224, "patch_size": 14}}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_peak(device: torch.device, n: int) -> float:
    """GFLOP/s of an n x n float32 product, the best of 5."""
    a, b = torch.rand(n, n, device=device), torch.rand(n, n, device=device)
    a @ b
    best = float("inf")
    for _ in range(5):
        sync(device)
        t = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n ** 3 / best / 1e9


def omniglot(data_dir: str | None, characters: int, device: str) -> FewShotSource:
    """Omniglot's val part of ``characters`` unrotated characters, served as test episodes."""
    args = {"split": "official", "rotations": False, "val_characters": characters}
    return build_source(Config(task="omniglot", data_dir=data_dir, task_args=args, ways=5, shots=1,
                               queries=15, device=device).validate())


def dino(shape: str, folder: Path) -> nn.Module:
    """A DINOv2 of ``SHAPES[shape]`` with random weights, saved with a 224-px-style processor (resize the
    shortest edge, centre-crop) and built back by name as ``hf:FOLDER``, frozen."""
    import transformers

    torch.manual_seed(0)
    cfg = SHAPES[shape]
    size = cfg["image_size"]
    transformers.Dinov2Model(transformers.Dinov2Config(**cfg)).save_pretrained(folder)
    processor = {"image_processor_type": "BitImageProcessor", "do_resize": True,
                 "size": {"shortest_edge": round(size * 256 / 224)}, "do_center_crop": True,
                 "crop_size": {"height": size, "width": size}, "do_rescale": True, "rescale_factor": 1 / 255,
                 "do_normalize": True, "image_mean": list(IMAGENET_MEAN), "image_std": list(IMAGENET_STD),
                 "resample": 3, "do_convert_rgb": True}
    (folder / "preprocessor_config.json").write_text(json.dumps(processor))
    return make_backbone(f"hf:{folder}", (1, 28, 28), freeze=True)


def time_embed(name: str, backbone: nn.Module, source: FewShotSource, a: argparse.Namespace,
               peak: float) -> None:
    data = source.dataset("val")
    x = source.examples("val", torch.arange(min(a.batch_size, len(data)))).to(a.device)
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        backbone.to(a.device).eval()(x)
    flops = counter.get_total_flops() / len(x)
    best = min(embed(backbone, source, "val", a.device, a.batch_size).seconds for _ in range(a.repeats))
    rate = len(data) / best
    print(json.dumps({"bench": "embed", "backbone": name, "images": len(data), "batch_size": a.batch_size,
                      "device": a.device, "threads": torch.get_num_threads(), "images_per_s": round(rate, 1),
                      "gflop_per_image": round(flops / 1e9, 4),
                      "share_of_peak": round(flops * rate / 1e9 / peak, 3)}), flush=True)


def time_heads(encoder: nn.Module, source: FewShotSource, a: argparse.Namespace) -> None:
    cache = embed(encoder, source, "val", a.device, a.batch_size)
    for shots in (1, 5):
        shaped = build_source(source.cfg.replace(shots=shots))
        for head in ("prototype", "logistic"):
            t = time.perf_counter()
            evaluate_features(cache, head, episodes=a.episodes, ways=5, shots=shots, queries=15, seed=1,
                              device=a.device)
            on_cache = a.episodes / (time.perf_counter() - t)
            method = HeadMethod(encoder, build_head(head)).to(a.device)
            t = time.perf_counter()
            evaluate(method, shaped.loader("val", a.image_episodes, seed=1), a.device)
            on_images = a.image_episodes / (time.perf_counter() - t)
            print(json.dumps({"bench": "head", "head": head, "episode": f"5w{shots}s15q", "encoder": "conv4",
                              "device": a.device, "threads": torch.get_num_threads(),
                              "cache_episodes": a.episodes, "cache_episodes_per_s": round(on_cache, 1),
                              "image_episodes": a.image_episodes, "image_episodes_per_s": round(on_images, 2),
                              "ratio": round(on_cache / on_images, 1)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--data-dir", help="the folder of Omniglot's zips; default: $METASHOT_DATA")
    p.add_argument("--characters", type=int, default=200, help="characters of the part (20 images each)")
    p.add_argument("--dino-images", type=int, default=2000, help="images the tiny DINOv2 embeds")
    p.add_argument("--dinov2-small", action="store_true", help="also time dinov2-small's shape")
    p.add_argument("--small-images", type=int, default=100, help="images the dinov2-small shape embeds")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--episodes", type=int, default=1000, help="episodes on the cache")
    p.add_argument("--image-episodes", type=int, default=100, help="episodes on the images")
    p.add_argument("--matmul", type=int, default=2048, help="n of the peak's n x n product")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    peak = matmul_peak(torch.device(a.device), a.matmul)
    print(json.dumps({"bench": "peak", "dtype": "float32", "n": a.matmul, "device": a.device,
                      "threads": a.threads, "gflops": round(peak, 1)}), flush=True)
    source = omniglot(a.data_dir, a.characters, a.device)
    torch.manual_seed(0)
    encoder = conv4((1, 28, 28))
    time_embed("conv4", encoder, source, a, peak)
    time_heads(encoder, source, a)
    try:
        import transformers  # noqa: F401
    except ImportError:
        print(json.dumps({"bench": "note", "skipped": "dino: transformers is not installed"}))
        return
    shapes = {"dino-tiny": a.dino_images, **({"dinov2-small": a.small_images} if a.dinov2_small else {})}
    with tempfile.TemporaryDirectory() as tmp:
        for shape, images in shapes.items():
            backbone = dino(shape, Path(tmp) / shape)
            time_embed(shape, backbone, omniglot(a.data_dir, max(1, images // 20), a.device), a, peak)


if __name__ == "__main__":
    main()
