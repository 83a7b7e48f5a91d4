"""Batch norm for MAML: batch statistics on any network, and a batch norm that ``torch.vmap`` differentiates
exactly to second order.

MAML's two modes: ``batch_norm="transductive"`` (the paper's semantics) has
every forward pass normalise with its own batch's statistics (support and query passes separately), at
meta-training and meta-test alike, so the model's batch-norm layers must have ``track_running_stats=False``
(:func:`batch_statistics` makes them so). ``batch_norm="inductive"``: the layers keep running statistics
over every meta-training pass (support and query), and in ``eval()`` mode every example is normalised with
those, independently of the other examples of its task.

Through the fused ``F.batch_norm`` kernel, vmap gives a wrong second-order meta-gradient when the layers'
scale and shift are batched, i.e. adapted per task (functorch#534). Within :class:`PlainBatchNorm`,
``F.batch_norm`` runs as :func:`plain_batch_norm`, from plain tensor operations, which vmap batches
exactly. MAML's vmap path uses it only when the inner loop adapts a batch-norm layer's scale or shift: a
scale and shift shared by all tasks go through the fused kernel, exact there and faster.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

BatchNorm = nn.modules.batchnorm._BatchNorm


def batch_norm_layers(model: nn.Module) -> list[BatchNorm]:
    """The model's batch-norm layers (of any dimension), in module order."""
    return [m for m in model.modules() if isinstance(m, BatchNorm)]


def plain_batch_norm(
    input: torch.Tensor,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    training: bool = False,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
) -> torch.Tensor:
    """``F.batch_norm`` from plain tensor operations (input [N, C, *]), without running-stat updates."""
    shape = (1, -1) + (1,) * (input.dim() - 2)
    if training or running_mean is None or running_var is None:
        dims = [0, *range(2, input.dim())]
        mean = input.mean(dims, keepdim=True)
        centred = input - mean
        var = centred.square().mean(dims, keepdim=True)
        out = centred * torch.rsqrt(var + eps)
    else:
        out = (input - running_mean.view(shape)) * torch.rsqrt(running_var.view(shape) + eps)
    if weight is not None:
        out = out * weight.view(shape)
    if bias is not None:
        out = out + bias.view(shape)
    return out


class PlainBatchNorm(TorchFunctionMode):
    """Within this mode ``F.batch_norm`` runs as :func:`plain_batch_norm`, which vmap differentiates
    exactly (module docstring). Running statistics are not updated inside the mode."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:
            return plain_batch_norm(*args, **kwargs)
        return func(*args, **kwargs)


def batch_statistics(model: nn.Module) -> nn.Module:
    """``model`` with every batch-norm layer as if built with ``track_running_stats=False`` (normalising
    with each batch's statistics, no running statistics kept): transductive batch norm on any network."""
    for m in batch_norm_layers(model):
        m.track_running_stats = False
        m.running_mean = m.running_var = m.num_batches_tracked = None
    return model


__all__ = ["PlainBatchNorm", "batch_norm_layers", "batch_statistics", "plain_batch_norm"]
