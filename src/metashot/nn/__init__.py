"""Network building blocks."""

from metashot.nn.backbones import (
    BACKBONES,
    MLP,
    PRETRAINED,
    Conv4,
    DropBlock,
    ResNet12,
    feature_size,
    is_pretrained,
    make_backbone,
)
from metashot.nn.preprocessing import Preprocessing
from metashot.nn.pretrained import PretrainedBackbone, pretrained

__all__ = [
    "BACKBONES", "PRETRAINED", "Conv4", "DropBlock", "MLP", "Preprocessing", "PretrainedBackbone", "ResNet12",
    "feature_size", "is_pretrained", "make_backbone", "pretrained",
]
