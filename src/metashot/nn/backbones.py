"""Backbones: the networks that map examples to features, in one registry.

:data:`BACKBONES` maps a name to a factory ``factory(input_shape, **args) -> nn.Module``; every method
builds its network through :func:`make_backbone`, which also takes a user's ``package.module:factory`` and
a pretrained model by name (:data:`PRETRAINED` prefixes: ``hf:ORG/NAME``, ``hf:/folder``, ``timm:NAME``,
built by :func:`metashot.nn.pretrained.pretrained` with backbone_args ``freeze``, ``lr_scale``, ``pool``,
``revision``). A backbone maps [M, *input_shape] to features [M, D].
"""

from __future__ import annotations

import functools
import importlib
import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

Factory = Callable[..., nn.Module]


def batch_norm(channels: int, track_running_stats: bool = True, eps: float = 1e-5,
               scale: bool = True) -> nn.BatchNorm2d:
    """``nn.BatchNorm2d``; ``scale=False`` keeps its scale at 1 (not learned: no gradient), the shift
    learned, as ``tf.contrib.layers.batch_norm``'s default ``scale=False``."""
    norm = nn.BatchNorm2d(channels, eps=eps, track_running_stats=track_running_stats)
    norm.weight.requires_grad_(scale)
    return norm


def conv_block(
    in_channels: int, out_channels: int, strided: bool = False, track_running_stats: bool = True,
    norm_eps: float = 1e-5, norm_scale: bool = True, conv_bias: bool = True,
) -> nn.Sequential:
    """3x3 conv (with a bias unless ``conv_bias=False``), BatchNorm (``norm_eps``, learned scale unless
    ``norm_scale=False``), ReLU, then a 2x2 max-pool (or, ``strided``, a stride-2 conv instead)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2 if strided else 1, padding=1, bias=conv_bias),
        batch_norm(out_channels, track_running_stats, norm_eps, norm_scale),
        nn.ReLU(),
        *([] if strided else [nn.MaxPool2d(2)]),
    )


class Conv4(nn.Sequential):
    """Four conv blocks then flatten: [B, C, 28, 28] -> [B, 64] with the defaults.

    ``strided=True`` is the MAML variant (stride-2 convolutions, no max-pooling);
    ``track_running_stats=False`` makes batch norm always use the current batch's statistics;
    ``norm_eps`` and ``norm_scale`` are batch norm's epsilon and whether its scale is learned;
    ``conv_bias=False`` leaves out the convolutions' biases, which the batch norm after them cancels.
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        out_channels: int = 64,
        depth: int = 4,
        strided: bool = False,
        track_running_stats: bool = True,
        norm_eps: float = 1e-5,
        norm_scale: bool = True,
        conv_bias: bool = True,
    ) -> None:
        widths = [in_channels] + [hidden] * (depth - 1) + [out_channels]
        super().__init__(
            *(conv_block(a, b, strided, track_running_stats, norm_eps, norm_scale, conv_bias)
              for a, b in zip(widths, widths[1:])),
            nn.Flatten(),
        )


class MLP(nn.Sequential):
    """Fully connected ReLU network, e.g. MLP([1, 40, 40, 1]) for sinusoid regression."""

    def __init__(self, sizes: list[int]) -> None:
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        super().__init__(*layers[:-1])


class DropBlock(nn.Module):
    """DropBlock (Ghiasi, Lin & Le, NeurIPS 2018, Algorithm 1): in training, zero ``block_size`` x
    ``block_size`` squares of each feature map, about a ``drop_rate`` share of the units, and rescale by
    count(mask) / count_ones(mask) so the mean is kept; the identity in eval mode. ``block_size=1`` is
    dropout. Input and output [B, C, H, W]."""

    def __init__(self, drop_rate: float = 0.0, block_size: int = 5) -> None:
        super().__init__()
        self.drop_rate, self.block_size = drop_rate, block_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.drop_rate == 0:
            return x
        h, w = x.shape[-2:]
        k = min(self.block_size, h, w)
        # gamma: the seed rate whose blocks drop about drop_rate of the units (the paper's eq. 1)
        gamma = self.drop_rate / k**2 * h * w / ((h - k + 1) * (w - k + 1))
        seeds = torch.bernoulli(x.new_full((*x.shape[:-2], h - k + 1, w - k + 1), gamma))
        # a seed at (i, j) drops the block whose top-left corner it is
        dropped = F.max_pool2d(F.pad(seeds, (k - 1,) * 4), k, stride=1)
        keep = 1 - dropped
        return x * keep * (keep.numel() / keep.sum().clamp(min=1))


class ResBlock(nn.Module):
    """ResNet-12's block: three 3x3 conv + BN (leaky ReLU 0.1 after the first two and after the residual
    sum), a 1x1 conv + BN shortcut, a 2x2 max-pool, then DropBlock. [B, C, H, W] -> [B, C', H/2, W/2]."""

    def __init__(self, in_channels: int, out_channels: int, drop: DropBlock) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a in (in_channels, out_channels, out_channels):
            layers += [nn.Conv2d(a, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels),
                       nn.LeakyReLU(0.1)]
        self.body = nn.Sequential(*layers[:-1])
        self.shortcut = nn.Sequential(nn.Conv2d(in_channels, out_channels, 1, bias=False),
                                      nn.BatchNorm2d(out_channels))
        self.out = nn.Sequential(nn.LeakyReLU(0.1), nn.MaxPool2d(2), drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(x) + self.shortcut(x))


class ResNet12(nn.Sequential):
    """The ResNet-12 of MetaOptNet (Lee et al., CVPR 2019) and FEAT (Ye et al., CVPR 2020): four
    :class:`ResBlock` of widths 64-160-320-640, global average pooling, flatten: [B, C, 84, 84] ->
    [B, 640] (12.4 M parameters on 3 channels). As in MetaOptNet's code, blocks 3 and 4 end in DropBlock
    of ``dropblock_size`` and blocks 1 and 2 in dropout (DropBlock of size 1), both at ``drop_rate`` (0:
    off); its linear ramp of the rate over training is left out. Convolutions are Kaiming-initialised
    (fan out), as there. ``widths`` other than the default give narrower or wider variants.
    """

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 160, 320, 640),
        drop_rate: float = 0.0,
        dropblock_size: int = 5,
    ) -> None:
        sizes = [in_channels, *widths]
        blocks = [
            ResBlock(a, b, DropBlock(drop_rate, dropblock_size if i >= 2 else 1))
            for i, (a, b) in enumerate(zip(sizes, sizes[1:]))
        ]
        super().__init__(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="leaky_relu")


def conv4(
    input_shape: tuple[int, ...], hidden: int = 64, depth: int = 4, track_running_stats: bool = True,
    norm_eps: float = 1e-5, norm_scale: bool = True, conv_bias: bool = True,
) -> nn.Module:
    """The max-pooled Conv4 of Matching and Prototypical Networks, ``hidden`` wide: [M, hidden] on 28x28
    (flattened: [M, hidden * 25] on 84x84; MAML's miniImageNet body with ``hidden=32``); the batch norm
    and bias options as :func:`conv4_strided`'s."""
    return Conv4(input_shape[0], hidden, hidden, depth, track_running_stats=track_running_stats,
                 norm_eps=norm_eps, norm_scale=norm_scale, conv_bias=conv_bias)


def conv4_strided(
    input_shape: tuple[int, ...], hidden: int = 64, depth: int = 4, track_running_stats: bool = True,
    norm_eps: float = 1e-5, norm_scale: bool = True, conv_bias: bool = True,
) -> nn.Module:
    """MAML's body (Finn et al. 2017): Conv4 with stride-2 convolutions instead of max-pooling, then
    global average pooling: [M, hidden]. The MAML presets take the authors' batch norm
    (``tf.contrib.layers.batch_norm`` defaults: ``norm_eps=1e-3``, ``norm_scale=False``) and
    ``conv_bias=False``."""
    conv = Conv4(input_shape[0], hidden, hidden, depth, strided=True, track_running_stats=track_running_stats,
                 norm_eps=norm_eps, norm_scale=norm_scale, conv_bias=conv_bias)
    return nn.Sequential(*list(conv)[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten())


def resnet12(
    input_shape: tuple[int, ...],
    widths: Sequence[int] = (64, 160, 320, 640),
    drop_rate: float = 0.0,
    dropblock_size: int = 5,
) -> nn.Module:
    """:class:`ResNet12` on ``input_shape[0]`` channels: [M, widths[-1]]."""
    return ResNet12(input_shape[0], widths, drop_rate, dropblock_size)


def mlp(input_shape: tuple[int, ...], hidden: int = 40, depth: int = 2) -> nn.Module:
    """``depth`` ReLU layers ``hidden`` wide on the flattened input (MAML's sinusoid body 1-40-40):
    [M, hidden]."""
    flatten = [nn.Flatten()] if len(input_shape) > 1 else []  # vectors need none (sinusoid keys as before)
    return nn.Sequential(*flatten, *MLP([math.prod(input_shape)] + [hidden] * depth), nn.ReLU())


BACKBONES: dict[str, Factory] = {
    "conv4": conv4,
    "conv4-strided": conv4_strided,
    "resnet12": resnet12,
    "mlp": mlp,
}


PRETRAINED = ("hf:", "timm:")  # the prefixes of pretrained backbones by name (metashot.nn.pretrained)


def is_pretrained(name: str | None) -> bool:
    """Whether ``name`` names a pretrained backbone (``hf:ORG/NAME``, ``hf:/folder``, ``timm:NAME``), whose
    own preprocessing replaces the dataset's normalisation."""
    return name is not None and name.startswith(PRETRAINED)


def is_factory_path(name: str | None) -> bool:
    """Whether ``name`` names a user's ``package.module:factory``, code to import, not a registry name."""
    return name is not None and name not in BACKBONES and ":" in name and not is_pretrained(name)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def _resolve(name: str) -> Factory:
    """The factory of a registry name, a pretrained model's name or ``package.module:factory``."""
    if name in BACKBONES:
        return BACKBONES[name]
    if is_pretrained(name):  # imported here: transformers and timm only when a pretrained one is built
        from metashot.nn.pretrained import pretrained

        return functools.partial(pretrained, name)
    if ":" not in name:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(sorted(BACKBONES))}, "
                         "or a factory of one's own as package.module:factory")
    module, _, attr = name.partition(":")
    try:
        factory = getattr(importlib.import_module(module), attr)
    except ModuleNotFoundError as e:
        raise ValueError(f"backbone {name!r}: cannot import {module!r} ({e}; is it on PYTHONPATH?)") from None
    except AttributeError:
        raise ValueError(f"backbone {name!r}: module {module!r} has no attribute {attr!r}") from None
    except Exception as e:  # the module's own code failed as it was imported
        raise ValueError(f"backbone {name!r}: importing {module!r} raised {_first_line(e)}") from e
    if not callable(factory):
        raise ValueError(f"backbone {name!r} is not callable ({type(factory).__name__}): expected a "
                         "factory(input_shape, **backbone_args) that returns an nn.Module")
    return factory


def make_backbone(name: str, input_shape: tuple[int, ...], **args: object) -> nn.Module:
    """The backbone ``name`` (a key of :data:`BACKBONES`, a pretrained model's ``hf:``/``timm:`` name or
    ``package.module:factory``) for examples of ``input_shape`` (e.g. (1, 28, 28)), built as
    ``factory(input_shape, **args)``; ValueError (a pretrained one's ConfigError) when the name, the
    arguments or the factory's result do not fit, or when a user's factory raises."""
    factory = _resolve(name)
    try:
        inspect.signature(factory).bind(input_shape, **args)
    except TypeError as e:
        raise ValueError(f"backbone_args {args} do not fit backbone {name!r}: {e}") from None
    try:
        module = factory(input_shape, **args)
    except Exception as e:
        if name in BACKBONES or is_pretrained(name):  # metashot's own code: its errors as they are
            raise
        raise ValueError(f"backbone factory {name!r} raised {_first_line(e)}") from e
    if not isinstance(module, nn.Module):
        raise ValueError(f"backbone {name!r} returned {type(module).__name__}, expected an nn.Module")
    return module


def feature_size(backbone: nn.Module, input_shape: tuple[int, ...]) -> int:
    """D of the features [M, D] the backbone gives for examples of ``input_shape``, measured by a dry
    forward of two zero examples in eval mode (batch-norm statistics and training mode untouched)."""
    mode = backbone.training
    with torch.no_grad():
        out = backbone.eval()(torch.zeros(2, *input_shape))
    backbone.train(mode)
    if out.dim() != 2:
        raise ValueError(f"the backbone gives features of shape {tuple(out.shape[1:])} per example, "
                         "expected one flat vector [D] (end it with nn.Flatten())")
    return out.shape[1]


__all__ = [
    "BACKBONES", "MLP", "PRETRAINED", "Conv4", "DropBlock", "ResNet12", "feature_size", "is_pretrained",
    "make_backbone",
]
