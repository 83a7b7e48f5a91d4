"""Network building blocks."""

from metashot.nn.backbones import (
    BACKBONES,
    MLP,
    Conv4,
    DropBlock,
    ResNet12,
    feature_size,
    make_backbone,
)

__all__ = ["BACKBONES", "Conv4", "DropBlock", "MLP", "ResNet12", "feature_size", "make_backbone"]
