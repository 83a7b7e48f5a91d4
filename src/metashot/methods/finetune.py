"""Test-time training on each task's support set: a new classifier on frozen features (Baseline and
Baseline++, Chen et al., "A Closer Look at Few-shot Classification", ICLR 2019, Sec. 3.1-3.2), or the whole
backbone fine-tuned (P>M>F's deploy stage, Hu et al., "Pushing the Limits of Simple Pipelines for Few-Shot
Learning", CVPR 2022, Sec. 3.3).
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import Episode
from metashot.data.augment import draw, resized_crop
from metashot.methods.heads import EncoderHead, Head
from metashot.methods.protonet import prototype_logits, prototypes

KINDS = ("linear", "cosine")


class LinearHead(Head):
    """A new classifier trained on each episode's support features, then scoring its queries.

    ``kind="linear"``: a linear layer x W + b (Baseline); ``"cosine"``: ``scale`` * cos(x, w_n) with the
    scale learned too (Baseline++, :class:`~metashot.methods.heads.CosineClassifier`'s semantics; CloserLook's
    code fixes the scale at 2 and learns each class weight's norm instead). Trained for ``steps`` steps of
    SGD with CloserLook's ``lr`` 0.01, ``momentum`` 0.9, ``dampening`` 0.9 and ``weight_decay`` 1e-3 on the
    mean cross-entropy of the support set, full-batch (CloserLook: 100 epochs of minibatches of 4).
    The episodes of a meta-batch are trained together, weights [B, D, N]: their losses are independent, so
    the summed loss's gradient is each episode's own. Every episode starts from the same weights, drawn
    from ``seed`` as ``nn.Linear`` draws them (uniform in +-1/sqrt(D)), so an episode's result does not
    depend on the batch it is in. A test-time head: features are detached, no gradient reaches the encoder.
    """

    def __init__(
        self, kind: str = "linear", steps: int = 100, lr: float = 0.01, momentum: float = 0.9,
        dampening: float = 0.9, weight_decay: float = 1e-3, scale: float = 10.0, seed: int = 0,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"linear head kind must be one of {', '.join(KINDS)}, got {kind!r}")
        if steps < 0 or lr <= 0:
            raise ValueError(f"linear head: steps ({steps}) must be >= 0 and lr ({lr}) > 0")
        self.kind, self.steps, self.seed, self.scale = kind, steps, seed, scale
        self.sgd = {"lr": lr, "momentum": momentum, "dampening": dampening, "weight_decay": weight_decay}

    def _init(self, batch: int, features: int, ways: int, like: torch.Tensor) -> list[torch.Tensor]:
        """The weight [B, D, N] and the bias [B, N] (linear) or the scale [B, 1] (cosine), leaves."""
        g = torch.Generator().manual_seed(self.seed)
        bound = features ** -0.5  # kaiming_uniform_(a=sqrt(5)) of nn.Linear and CosineClassifier
        weight = torch.empty(features, ways, dtype=like.dtype).uniform_(-bound, bound, generator=g)
        if self.kind == "linear":
            extra = torch.empty(ways, dtype=like.dtype).uniform_(-bound, bound, generator=g)
        else:
            extra = torch.tensor([self.scale], dtype=like.dtype)
        return [p.to(like.device).expand(batch, *p.shape).clone().requires_grad_() for p in (weight, extra)]

    def _logits(self, x: torch.Tensor, weight: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
        """x [B, M, D] -> [B, M, N]."""
        if self.kind == "linear":
            return x @ weight + extra.unsqueeze(1)
        return extra.unsqueeze(-1) * F.normalize(x, dim=-1) @ F.normalize(weight, dim=1)

    def forward(
        self, query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """query [B, Q, D], support [B, S, D], labels [B, S] in 0..ways-1 -> log-probs [B, Q, ways]."""
        x, q = support.detach(), query.detach()
        params = self._init(x.shape[0], x.shape[-1], ways, x)
        opt = torch.optim.SGD(params, **self.sgd)
        with torch.enable_grad():
            for _ in range(self.steps):
                logits = self._logits(x, *params).flatten(0, 1)
                # the sum over episodes of each one's mean over its S support points
                loss = F.cross_entropy(logits, support_labels.flatten(), reduction="sum") / x.shape[1]
                opt.zero_grad()
                loss.backward()
                opt.step()
        with torch.no_grad():
            return self._logits(q, *params).log_softmax(-1)


class CosineHead(LinearHead):
    """:class:`LinearHead` with ``kind="cosine"`` (Baseline++), a class of its own for the heads' registry."""

    def __init__(self, **options: Any) -> None:
        super().__init__(kind="cosine", **options)


def _augmented(support: torch.Tensor, params: dict[str, torch.Tensor], step: int) -> torch.Tensor:
    """Step ``step``'s view of support images [S, C, H, W]: a random resized crop, then a random flip."""
    rows = slice(step * support.shape[0], (step + 1) * support.shape[0])
    views = resized_crop(support, params["crop"][rows])
    flip = params["flip"][rows].to(support.device).view(-1, 1, 1, 1)
    return torch.where(flip, views.flip(-1), views)


def _cosine_logits(
    net: nn.Module, support: torch.Tensor, labels: torch.Tensor, x: torch.Tensor, ways: int, scale: float
) -> torch.Tensor:
    """P>M>F's classifier of x [M, ...]: scale * cos(f(x), c_n), c_n the class means of f(support) [S, ...]
    under the current network: [M, ways]."""
    protos = prototypes(net(support).flatten(1).unsqueeze(0), labels.unsqueeze(0), ways)
    return scale * prototype_logits(net(x).flatten(1).unsqueeze(0), protos, "cosine")[0]


def _tune_one(
    encoder: nn.Module, support: torch.Tensor, labels: torch.Tensor, query: torch.Tensor, ways: int,
    steps: int, lr: float, scale: float, params: dict[str, torch.Tensor] | None,
) -> torch.Tensor:
    """One episode: a copy of ``encoder`` trained on its support set, the queries' log-probs [Q, ways]."""
    net = copy.deepcopy(encoder).requires_grad_(True)
    opt = torch.optim.Adam(net.parameters(), lr=lr)  # P>M>F's: betas (0.9, 0.999), no weight decay
    with torch.enable_grad():
        for step in range(steps):
            views = support if params is None else _augmented(support, params, step)
            loss = F.cross_entropy(_cosine_logits(net, support, labels, views, ways, scale), labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return _cosine_logits(net, support, labels, query, ways, scale).log_softmax(-1)


def fine_tune(
    encoder: nn.Module, episode: Episode, steps: int = 50, lr: float = 1e-3, scale: float = 10.0,
    augment: bool = True, seed: int = 0,
) -> torch.Tensor:
    """P>M>F's deploy mode (Hu et al. 2022, Sec. 3.3): log-probabilities [B, Q, N] of each episode's
    queries after fine-tuning a copy of ``encoder`` ([M, *input_shape] -> [M, D]) on its support set.

    The head is P>M>F's ProtoNet: ``scale`` (its learned scale starts at 10) times the cosine similarity
    to the class means of the support features, recomputed from the un-augmented support images by the
    current network at every step, with nothing else learned. Each of ``steps`` Adam steps (``lr``; P>M>F:
    50 steps, its lr searched per domain) scores augmented views of the support images against them:
    with ``augment`` a random resized crop (torchvision's RandomResizedCrop parameters) and a random
    horizontal flip, drawn from ``seed`` and the step only (P>M>F's DiffAugment jitters colour and
    translates instead). The episodes run one after the other, each with its own copy; ``encoder`` is
    left as it was, in its mode (with batch norm in training mode the copy uses the batch's statistics).
    Deterministic for a seed when the encoder has no dropout in its mode.
    """
    if steps < 0 or lr <= 0:
        raise ValueError(f"fine_tune: steps ({steps}) must be >= 0 and lr ({lr}) > 0")
    params = None
    if augment and steps > 0:
        if episode.support.dim() != 5:
            raise ValueError("fine_tune's augmentation crops and flips images [B, S, C, H, W], got support "
                             f"of shape {list(episode.support.shape)}; pass augment=False")
        s, _, h, w = episode.support.shape[1:]
        params = draw("resized-crop", torch.arange(steps), s, h, w, seed)
    return torch.stack([
        _tune_one(encoder, support, labels, query, episode.ways, steps, lr, scale, params)
        for support, labels, query in zip(episode.support, episode.support_labels, episode.query)
    ])


class FineTune(EncoderHead):
    """:func:`fine_tune` as a head (``metashot evaluate RUN --head finetune --head-args '{"steps": 50}'``,
    or a pretraining method's ``head``): ``steps``, ``lr``, ``scale``, ``augment``, ``seed`` as there."""

    def __init__(
        self, steps: int = 50, lr: float = 1e-3, scale: float = 10.0, augment: bool = True, seed: int = 0
    ) -> None:
        super().__init__()
        if steps < 0 or lr <= 0:
            raise ValueError(f"finetune: steps ({steps}) must be >= 0 and lr ({lr}) > 0")
        self.args = {"steps": steps, "lr": lr, "scale": scale, "augment": augment, "seed": seed}

    def score(self, encoder: nn.Module, episode: Episode) -> torch.Tensor:
        return fine_tune(encoder, episode, **self.args)
