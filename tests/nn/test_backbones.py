"""The backbone registry: output shapes, ResNet-12's size, DropBlock, a user's factory by import path
(trained end to end), and the errors for what does not fit."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import TaskInfo
from metashot.config import Config
from metashot.errors import ConfigError
from metashot.methods import build_method
from metashot.nn import BACKBONES, DropBlock, ResNet12, feature_size, make_backbone
from metashot.runs import evaluate_run
from metashot.train import Trainer

SHAPES = [  # name, args, input shape, D: the documented feature sizes
    ("conv4", {}, (1, 28, 28), 64),
    ("conv4", {"hidden": 32}, (3, 84, 84), 32 * 5 * 5),  # 84 -> 42 -> 21 -> 10 -> 5, flattened
    ("conv4-strided", {}, (1, 28, 28), 64),
    ("conv4-strided", {"hidden": 16}, (3, 84, 84), 16),  # global average pooling
    ("resnet12", {}, (3, 84, 84), 640),
    ("resnet12", {}, (1, 28, 28), 640),
    ("mlp", {}, (1,), 40),
    ("mlp", {"hidden": 8, "depth": 3}, (1, 20, 20), 8),
]


def test_every_registry_name_is_checked() -> None:
    assert {name for name, *_ in SHAPES} == set(BACKBONES)


@pytest.mark.parametrize(("name", "args", "shape", "dim"), SHAPES)
def test_registry_backbones_give_the_documented_feature_shapes(
    name: str, args: dict, shape: tuple[int, ...], dim: int
) -> None:
    torch.manual_seed(0)
    net = make_backbone(name, shape, **args)
    assert net(torch.rand(3, *shape)).shape == (3, dim)
    assert feature_size(net, shape) == dim and net.training


def test_resnet12_has_the_published_size() -> None:
    # per block (a -> b channels): three 3x3 convs, a 1x1 shortcut, four batch norms (scale and shift)
    widths = [64, 160, 320, 640]

    def count(channels: int) -> int:
        return sum(9 * b * (a + 2 * b) + a * b + 4 * 2 * b for a, b in zip([channels, *widths], widths))

    rgb = sum(p.numel() for p in ResNet12(3).parameters())
    gray = sum(p.numel() for p in make_backbone("resnet12", (1, 28, 28)).parameters())
    assert rgb == count(3) == 12_424_320 and gray == count(1) == 12_423_040
    assert rgb == pytest.approx(12.42e6, rel=0.01)  # MetaOptNet / FEAT: 12.4 M


def test_resnet12_blocks_are_the_papers() -> None:
    block = ResNet12(3, (8, 16, 16, 16))[0].eval()
    convs = [m for m in block.body if isinstance(m, nn.Conv2d)]
    assert [c.kernel_size for c in convs] == [(3, 3)] * 3 and block.shortcut[0].kernel_size == (1, 1)
    slopes = [m.negative_slope for m in block.modules() if isinstance(m, nn.LeakyReLU)]
    assert slopes == [0.1] * 3
    # the residual sum: a block whose body outputs zero passes its shortcut through
    with torch.no_grad():
        block.body[-1].weight.zero_()
        block.body[-1].bias.zero_()
    x = torch.randn(2, 3, 8, 8)
    expected = F.max_pool2d(F.leaky_relu(block.shortcut(x), 0.1), 2)
    torch.testing.assert_close(block(x), expected)
    assert block(x).shape == (2, 8, 4, 4)


# -- DropBlock -------------------------------------------------------------------------------------
def _expected_drop(rate: float, k: int, h: int, w: int) -> float:
    """The exact expected share of dropped units: a unit is dropped unless none of the n seeds whose
    block covers it fires, 1 - (1 - gamma)^n, averaged over the map."""
    gamma = rate / k**2 * h * w / ((h - k + 1) * (w - k + 1))

    def covering(i: int, n: int) -> int:  # block corners c in [0, n - k] with c <= i <= c + k - 1
        return min(i, n - k) - max(i - k + 1, 0) + 1

    drops = [1 - (1 - gamma) ** (covering(i, h) * covering(j, w)) for i in range(h) for j in range(w)]
    return sum(drops) / (h * w)


def test_dropblock_is_the_identity_in_eval_and_at_rate_zero() -> None:
    x = torch.randn(2, 3, 9, 9)
    assert torch.equal(DropBlock(0.3, 3).eval()(x), x)
    assert torch.equal(DropBlock(0.0, 3).train()(x), x)
    net = ResNet12(1, (4, 4, 4, 4), drop_rate=0.5, dropblock_size=2).eval()
    y = torch.rand(2, 1, 16, 16)
    assert torch.equal(net(y), net(y))


@pytest.mark.parametrize(("rate", "k"), [(0.1, 5), (0.2, 3), (0.3, 1)])
def test_dropblock_drops_the_expected_share_in_square_blocks_and_keeps_the_mean(rate: float, k: int) -> None:
    torch.manual_seed(0)
    x = torch.ones(256, 16, 12, 12)
    out = DropBlock(rate, k).train()(x)
    dropped = out == 0
    share = dropped.float().mean().item()
    expected = _expected_drop(rate, k, 12, 12)
    assert share == pytest.approx(expected, abs=0.005)
    assert expected == pytest.approx(rate, rel=0.15)  # gamma is set so that about ``rate`` drops
    # every dropped unit lies in a k x k square of dropped units (blocks, not scattered units)
    full = F.avg_pool2d(dropped.float(), k, stride=1) == 1
    covered = F.max_pool2d(F.pad(full.float(), (k - 1,) * 4), k, stride=1) == 1
    assert torch.equal(covered, dropped)
    # the kept units are scaled by count / count_ones, so the mean stays 1
    kept = out[~dropped]
    torch.testing.assert_close(kept, torch.full_like(kept, x.numel() / kept.numel()))
    assert out.mean().item() == pytest.approx(1.0, rel=1e-5)


# -- a user's backbone; errors ----------------------------------------------------------------------
USER_MODULE = '''
import math
from torch import nn


def tiny(input_shape, width=8):
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), width), nn.ReLU())


def not_a_module(input_shape):
    return 42
'''


@pytest.fixture()
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A module of the user's, importable as ``user_backbones`` while the test runs."""
    (tmp_path / "user_backbones.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "user_backbones"
    sys.modules.pop("user_backbones", None)


@pytest.fixture()
def folder(tmp_path: Path) -> Path:
    """10 classes of 6 greyscale images, each class its own random pattern."""
    from PIL import Image

    root = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    for c in range(10):
        (root / f"class{c}").mkdir(parents=True)
        pattern = torch.rand(8, 8, generator=g)
        for i in range(6):
            pixels = (pattern + 0.1 * torch.rand(8, 8, generator=g)).clamp(0, 1).mul(255).byte()
            Image.fromarray(pixels.numpy(), "L").save(root / f"class{c}" / f"{i}.png")
    return root


def test_a_users_backbone_by_import_path_trains_protonet(
    user_module: str, folder: Path, tmp_path: Path
) -> None:
    cfg = Config(method="protonet", task="folder", data_dir=str(folder), ways=2, shots=1, queries=2,
                 steps=6, val_every=3, val_episodes=2, test_episodes=4, lr=1e-2,
                 backbone=f"{user_module}:tiny", backbone_args={"width": 16})
    run = tmp_path / "run"
    trainer = Trainer(cfg, run, progress=False)
    encoder = trainer.method.encoder
    assert [type(m) for m in encoder] == [nn.Flatten, nn.Linear, nn.ReLU] and encoder[1].out_features == 16
    assert encoder[1].in_features == 28 * 28  # the folder task's images, resized
    before = encoder[1].weight.detach().clone()
    trainer.fit()
    assert trainer.step == 6 and not torch.equal(before, encoder[1].weight)
    saved = json.loads((run / "config.json").read_text())
    assert saved["backbone"] == "user_backbones:tiny" and saved["backbone_args"] == {"width": 16}
    # the run folder builds the same network again from its config, and its weights load, once the
    # caller allows the factory its config.json names (a config read from disk never chooses code)
    assert evaluate_run(run, episodes=4, backbone="user_backbones:tiny").episodes == 4


@pytest.mark.parametrize(("name", "args", "message"), [
    ("resnet13", {}, "unknown backbone 'resnet13'; known: conv4, conv4-strided, mlp, resnet12, or a "
                     "factory of one's own as package.module:factory"),
    ("no_such_module_xyz:net", {}, "backbone 'no_such_module_xyz:net': cannot import 'no_such_module_xyz'"),
    ("user_backbones:nope", {},
     "backbone 'user_backbones:nope': module 'user_backbones' has no attribute 'nope'"),
    ("math:pi", {}, "backbone 'math:pi' is not callable (float): expected a factory(input_shape, "
                    "**backbone_args) that returns an nn.Module"),
    ("user_backbones:not_a_module", {},
     "backbone 'user_backbones:not_a_module' returned int, expected an nn.Module"),
    ("resnet12", {"hidden": 32}, "backbone_args {'hidden': 32} do not fit backbone 'resnet12': got an "
                                 "unexpected keyword argument 'hidden'"),
])
def test_what_does_not_fit_is_a_config_error(name: str, args: dict, message: str, user_module: str) -> None:
    with pytest.raises(ValueError) as e:
        make_backbone(name, (1, 28, 28), **args)
    assert str(e.value).startswith(message)
    cfg = Config(method="protonet", backbone=name, backbone_args=args)
    with pytest.raises(ConfigError) as e:
        build_method(cfg, TaskInfo((1, 28, 28), 5, 5))
    assert str(e.value).startswith(f"protonet: {message}")


def test_features_must_be_flat_vectors() -> None:
    with pytest.raises(ValueError, match=r"features of shape \(2, 6, 6\) per example, expected one flat"):
        feature_size(nn.Conv2d(1, 2, 3), (1, 8, 8))


def test_method_args_hidden_is_the_backbones_width() -> None:
    info = TaskInfo((1, 28, 28), 5, 5)
    net = build_method(Config(method="protonet", method_args={"hidden": 32}), info)
    assert {m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)} == {32}
    net = build_method(Config(method="protonet", backbone_args={"hidden": 16}), info)
    assert {m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)} == {16}
    with pytest.raises(ConfigError, match="backbone_args {'hidden': 32} do not fit backbone 'resnet12'"):
        build_method(Config(method="protonet", backbone="resnet12", method_args={"hidden": 32}), info)


def test_the_maml_presets_normalise_as_the_reference_and_leave_out_the_conv_biases() -> None:
    from metashot import presets
    from metashot.batches import Episode

    method = build_method(presets.get("maml-omniglot-5w1s"), TaskInfo((1, 28, 28), 5, 5))
    norms = [m for m in method.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 4 and all(m.eps == 1e-3 and not m.weight.requires_grad for m in norms)
    assert all(m.bias is None for m in method.modules() if isinstance(m, nn.Conv2d))
    x = torch.randn(6, 64, 3, 3) * 0.01 + 1
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False, keepdim=True)
    torch.testing.assert_close(norms[1](x), (x - mean) / torch.sqrt(var + 1e-3))  # scale 1, shift 0
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(5).expand(2, 5)
    images = torch.rand(2, 10, 1, 28, 28, generator=g)
    batch = Episode(images[:, :5], labels, images[:, 5:], labels)
    optimizer = torch.optim.Adam(method.parameters(), 1e-2)
    method.loss(batch)[0].backward()
    optimizer.step()
    assert all(torch.equal(m.weight, torch.ones(64)) and m.weight.grad is None for m in norms)
    assert all(m.bias.abs().sum() > 0 for m in norms)  # the shift is learned
