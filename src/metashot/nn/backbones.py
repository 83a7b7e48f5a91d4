"""Backbones: the Conv4 embedding of the few-shot papers and a small MLP."""

from __future__ import annotations

from torch import nn


def conv_block(
    in_channels: int, out_channels: int, strided: bool = False, track_running_stats: bool = True
) -> nn.Sequential:
    """3x3 conv, BatchNorm, ReLU, then a 2x2 max-pool (or, ``strided``, a stride-2 conv instead)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=2 if strided else 1, padding=1),
        nn.BatchNorm2d(out_channels, track_running_stats=track_running_stats),
        nn.ReLU(),
        *([] if strided else [nn.MaxPool2d(2)]),
    )


class Conv4(nn.Sequential):
    """Four conv blocks then flatten: [B, C, 28, 28] -> [B, 64] with the defaults.

    ``strided=True`` is the MAML variant (stride-2 convolutions, no max-pooling);
    ``track_running_stats=False`` makes batch norm always use the current batch's statistics.
    """

    def __init__(
        self,
        in_channels: int = 1,
        hidden: int = 64,
        out_channels: int = 64,
        depth: int = 4,
        strided: bool = False,
        track_running_stats: bool = True,
    ) -> None:
        widths = [in_channels] + [hidden] * (depth - 1) + [out_channels]
        super().__init__(
            *(conv_block(a, b, strided, track_running_stats) for a, b in zip(widths, widths[1:])),
            nn.Flatten(),
        )


class MLP(nn.Sequential):
    """Fully connected ReLU network, e.g. MLP([1, 40, 40, 1]) for sinusoid regression."""

    def __init__(self, sizes: list[int]) -> None:
        layers: list[nn.Module] = []
        for a, b in zip(sizes, sizes[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        super().__init__(*layers[:-1])
