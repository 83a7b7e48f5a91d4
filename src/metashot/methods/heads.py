"""The metric family as an encoder plus a head: the head scores a task's queries from its support set.

A head maps support features [B, S, D] with labels [B, S] in 0..N-1 and query features [B, Q, D] to
log-probabilities [B, Q, N] over the task's N classes. The kernel rule (:mod:`metashot.methods.kernel`)
is one kind of head; others fit a classifier to each task's support set at test time (a centroid,
ridge or logistic regression, a new linear layer). :class:`HeadMethod` trains an encoder through its
head on episodes; ``metashot evaluate RUN --head NAME`` swaps in another (:data:`metashot.methods.HEADS`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import Episode
from metashot.methods.base import Method


class Head(nn.Module):
    """Scores queries from a labelled support set, on features. Subclasses define :meth:`forward`."""

    def forward(
        self, query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """log P(y = n | x, S): query [B, Q, D], support [B, S, D], labels [B, S] -> [B, Q, ways]."""
        raise NotImplementedError


class EncoderHead(Head):
    """A head that needs the encoder and the images, not only their features (support-set fine-tuning).
    Subclasses define :meth:`score`; :class:`HeadMethod` calls it in place of embedding."""

    def score(self, encoder: nn.Module, episode: Episode) -> torch.Tensor:
        """log P(y = n | x, S) [B, Q, N] of the episode's queries, ``encoder`` left as it was."""
        raise NotImplementedError


def episode_metrics(
    log_p: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The mean negative log-likelihood and per-task metrics [B] of log-probabilities [B, Q, N] of
    queries labelled [B, Q]."""
    nll = F.nll_loss(log_p.flatten(0, 1), labels.flatten(), reduction="none")
    nll = nll.view_as(labels).mean(dim=1)  # [B]
    acc = (log_p.argmax(-1) == labels).float().mean(dim=1)
    return nll.mean(), {"loss": nll.detach(), "acc": acc}


class HeadMethod(Method):
    """Embed support and query in one pass of ``encoder``, then score the queries with ``head``.

    encoder: [M, *input_shape] -> [M, D]; head: see :class:`Head`. The loss is the negative log of the
    head's probability of the true label. Images and convolution weights are kept channels-last, the
    layout the CPU and GPU convolution kernels run fastest in.
    """

    def __init__(self, encoder: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder.to(memory_format=torch.channels_last)
        self.head = head

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's features [M, D] of examples [M, *input_shape]."""
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.encoder(x).flatten(1)

    def embed(self, episode: Episode) -> tuple[torch.Tensor, torch.Tensor]:
        """Support [B, S, D] and query [B, Q, D] embeddings, one encoder call per episode, so that batch
        norm's statistics are each episode's own whatever the batch (and however it is split over
        processes)."""
        s = episode.support.shape[1]
        z = torch.stack([self.features(x) for x in torch.cat([episode.support, episode.query], dim=1)])
        return z[:, :s], z[:, s:]

    def log_probs(self, episode: Episode) -> torch.Tensor:
        """log P(y = n | x, S) for every query: [B, Q, N]."""
        if isinstance(self.head, EncoderHead):
            return self.head.score(self.encoder, episode)
        support, query = self.embed(episode)
        return self.head(query, support, episode.support_labels, episode.ways)

    def loss(self, episode: Episode) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return episode_metrics(self.log_probs(episode), episode.query_labels)


def with_head(method: Method, head: nn.Module) -> HeadMethod:
    """``method`` testing with ``head`` in place of its own (``metashot evaluate --head``); a
    ValueError for a method that is not an encoder and a head."""
    if not isinstance(method, HeadMethod):
        raise ValueError(f"{type(method).__name__} is not an encoder and a head; --head needs one "
                         "(protonet, matching, r2d2, baseline, rfs, simpleshot, meta-baseline)")
    method.head = head.to(next(method.encoder.parameters()).device)
    return method


class CL2N(Head):
    """SimpleShot's nearest centroid on centred, L2-normalised features (Wang et al. 2019, "CL2N").

    Features are centred by ``mean`` [D] (the base classes' mean feature; a pretraining method's
    running mean) or, when it is None, by the task's support mean, then L2-normalised; a query's
    log-probabilities are the log-softmax of minus its squared Euclidean distances to the class means.
    """

    def __init__(self, mean: torch.Tensor | list[float] | None = None) -> None:
        super().__init__()
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32)

    def forward(
        self, query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, ways: int
    ) -> torch.Tensor:
        from metashot.methods.protonet import prototype_logits, prototypes

        mean = support.mean(1, keepdim=True) if self.mean is None else self.mean.to(support)
        support, query = F.normalize(support - mean, dim=-1), F.normalize(query - mean, dim=-1)
        return prototype_logits(query, prototypes(support, support_labels, ways)).log_softmax(-1)


class CosineClassifier(nn.Module):
    """A linear layer on L2-normalised features and weights times a learned scale (Baseline++, Chen et
    al. ICLR 2019, Sec. 3.2): logits [M, C] = s * cos(f(x), w_c) of features [M, D]."""

    def __init__(self, features: int, classes: int, scale: float = 10.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(classes, features))
        nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(x, dim=-1) @ F.normalize(self.weight, dim=-1).T


def classifier(kind: str, features: int, classes: int, **kwargs: Any) -> nn.Module:
    """A classifier over ``classes`` of ``features``-wide features: "linear" or "cosine"."""
    if kind == "linear":
        return nn.Linear(features, classes)
    if kind == "cosine":
        return CosineClassifier(features, classes, **kwargs)
    raise ValueError(f"classifier must be 'linear' or 'cosine', got {kind!r}")
