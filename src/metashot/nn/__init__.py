"""Network building blocks."""

from metashot.nn.backbones import MLP, Conv4

__all__ = ["Conv4", "MLP"]
