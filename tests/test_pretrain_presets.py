"""The pretraining methods' and R2D2's presets: every stage validates, builds and takes an optimizer step."""

import json

import pytest
import torch

from metashot.batches import Episode, Examples, TaskInfo
from metashot.config import Config
from metashot.methods import build_method, method_class
from metashot.pretrain_presets import PRETRAIN_PRESETS, TRAIN_IMAGES, epochs
from metashot.stages import Stages


def stages(name: str) -> list[Config]:
    preset = PRETRAIN_PRESETS[name]
    return list(preset.configs) if isinstance(preset, Stages) else [preset]


def batch(cfg: Config, kind: str, shape: tuple[int, ...]) -> Examples | Episode:
    """A small random batch of ``kind`` for ``cfg``: 4 examples, or one training episode with 1 query."""
    g = torch.Generator().manual_seed(0)
    if kind == "examples":
        return Examples(torch.rand(4, *shape, generator=g), torch.tensor([0, 1, 2, 3]), torch.arange(4))
    ways, shots = cfg.train_ways, cfg.train_shots
    labels = torch.arange(ways)
    return Episode(torch.rand(1, ways * shots, *shape, generator=g),
                   labels.repeat_interleave(shots).unsqueeze(0), torch.rand(1, ways, *shape, generator=g),
                   labels.unsqueeze(0), ways)


def test_every_stage_validates_and_loads_as_saved() -> None:
    for name in PRETRAIN_PRESETS:
        for cfg in stages(name):
            cfg = cfg.validate()
            assert Config.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg, name


def kinds() -> list[str]:
    """One preset of each method, network and kind of data (Omniglot or natural images), 5-shot."""
    seen: dict[tuple, str] = {}
    for name in sorted(PRETRAIN_PRESETS):
        cfg = stages(name)[-1]
        seen.setdefault((cfg.method, cfg.backbone, cfg.task == "omniglot", cfg.shots), name)
    return sorted(seen.values())


@pytest.mark.parametrize("name", kinds())
def test_each_kind_of_preset_builds_and_steps(name: str) -> None:
    for k, cfg in enumerate(stages(name), 1):
        cls = method_class(cfg)
        # natural images at 32 pixels: the networks pool to the same features, at a test's cost
        shape = (1, 28, 28) if cfg.task == "omniglot" else (3, 32, 32)
        torch.manual_seed(0)
        method = build_method(cfg, TaskInfo(shape, cfg.ways, cfg.train_ways, train_classes=64))
        optimizer = cfg.make_optimizer(method.parameters())
        before = {n: p.detach().clone() for n, p in method.named_parameters()}
        loss, metrics = method.loss(batch(cfg, cls.train_batches, shape))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss) and metrics["acc"].numel() > 0
        moved = [n for n, p in method.named_parameters() if not torch.equal(p, before[n])]
        assert any(n.startswith("encoder.") for n in moved), f"stage {k}: the encoder did not move"
        if k > 1:
            assert (cfg.init_from, cfg.init_prefix) == ("stage:1", "encoder.")


def test_the_rfs_schedule_is_60_and_80_of_100_epochs() -> None:
    cfg = PRETRAIN_PRESETS["rfs-miniimagenet-5w1s"]
    assert (cfg.optimizer, cfg.lr, cfg.weight_decay, cfg.batch_size) == ("sgd", 0.05, 5e-4, 64)
    assert cfg.optimizer_args == {"momentum": 0.9}
    assert cfg.steps == 100 * 38_400 // 64 and cfg.lr_milestones == [60 * 600, 80 * 600]
    assert epochs("tieredimagenet", 1, 64) == round(TRAIN_IMAGES["tieredimagenet"] / 64)
