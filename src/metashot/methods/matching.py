"""Matching Networks (Vinyals, Blundell, Lillicrap, Kavukcuoglu & Wierstra, NIPS 2016).

The prediction is the metric rule (eq. 1) y^ = sum_i a(x^, x_i) y_i with the attention kernel (eq. 2)
a(x^, x_i) = exp(c(f(x^), g(x_i))) / sum_j exp(c(f(x^), g(x_j))), c the cosine similarity. Training
minimises -log P(y | x^, S) of that attention-summed probability (eq. 3), which is what
:class:`~metashot.methods.kernel.KernelMethod` does.

Without full context embeddings (FCE), f = g = the embedding network (the paper's Conv4). With FCE
(appendix A):

- g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i), a bidirectional LSTM over the embedded support set with a
  skip connection (A.2);
- f(x^, S) = attLSTM(f'(x^), g(S), K) reads the support set for K processing steps (A.1):
  h^_k, c_k = LSTM(f'(x^), [h_{k-1}, r_{k-1}], c_{k-1}); h_k = h^_k + f'(x^);
  r_k = sum_i a(h_k, g(x_i)) g(x_i) with a(h, g(x_i)) = softmax_i(h^T g(x_i)); f(x^, S) = h_K.

The LSTM whose hidden state is the concatenation [h, r] is an ``nn.LSTMCell`` whose input is
[f'(x^), r]: its gates W [f'(x^); h; r] + b are the same linear map, regrouped.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import TaskInfo
from metashot.methods.base import Method
from metashot.methods.kernel import KernelMethod
from metashot.nn.backbones import feature_size, make_backbone


class MatchingKernel(nn.Module):
    """Log-weights log a(x^, x_i) = log_softmax_i(scale * cos(f(x^, S), g(x_i, S))).

    fce: full context embeddings (the two LSTMs above); dim: embedding size D; processing_steps: K,
    the attention LSTM's steps over the support set (the paper does not give K; 5 here);
    scale: multiplies the cosine before the softmax. The paper's kernel is scale = 1, whose weights
    are soft (cosine is in [-1, 1]); a larger scale sharpens them (a temperature of 1 / scale).
    """

    def __init__(
        self, fce: bool = False, dim: int = 64, processing_steps: int = 5, scale: float = 1.0
    ) -> None:
        super().__init__()
        self.fce, self.dim, self.processing_steps, self.scale = fce, dim, processing_steps, scale
        if fce:
            self.support_lstm = nn.LSTM(dim, dim, batch_first=True, bidirectional=True)
            self.query_cell = nn.LSTMCell(2 * dim, dim)

    def encode_support(self, support: torch.Tensor) -> torch.Tensor:
        """g(x_i, S) = h_fwd_i + h_bwd_i + g'(x_i): support [B, S, D] -> [B, S, D]."""
        h, _ = self.support_lstm(support)  # [B, S, 2D]
        return support + h[..., : self.dim] + h[..., self.dim :]

    def encode_query(self, query: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
        """f(x^, S) = h_K: query [B, Q, D] (f'), encoded support [B, S, D] (g) -> [B, Q, D]."""
        b, q, d = query.shape
        x = query.reshape(b * q, d)
        h = torch.zeros_like(x)
        c = torch.zeros_like(x)
        r = torch.zeros_like(x)
        for _ in range(self.processing_steps):
            h, c = self.query_cell(torch.cat([x, r], dim=-1), (h, c))
            h = h + x
            a = (h.view(b, q, d) @ support.transpose(1, 2)).softmax(dim=-1)  # [B, Q, S]
            r = (a @ support).reshape(b * q, d)
        return h.view(b, q, d)

    def forward(
        self, query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """query [B, Q, D], support [B, S, D], labels [B, S] (unused) -> log-weights [B, Q, S]."""
        if self.fce:
            support = self.encode_support(support)
            query = self.encode_query(query, support)
        cos = F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)
        return (self.scale * cos).log_softmax(dim=-1)


class MatchingNetwork(KernelMethod):
    """Matching Networks: the metric rule with the attention kernel on an embedding network.

    encoder maps [M, C, H, W] to [M, dim] (by default the paper's Conv4 for 1-channel images, D = 64);
    see :class:`MatchingKernel` for fce, processing_steps and scale.
    """

    default_backbone: ClassVar[str | None] = "conv4"

    def __init__(
        self,
        encoder: nn.Module | None = None,
        fce: bool = False,
        processing_steps: int = 5,
        dim: int = 64,
        scale: float = 1.0,
    ) -> None:
        super().__init__(
            encoder if encoder is not None else make_backbone(self.default_backbone, (1, 28, 28)),
            MatchingKernel(fce, dim, processing_steps, scale),
        )

    @classmethod
    def build(
        cls,
        info: TaskInfo,
        backbone: str | None = None,
        backbone_args: dict[str, Any] | None = None,
        fce: bool = False,
        processing_steps: int = 5,
        hidden: int | None = None,
        scale: float = 1.0,
    ) -> Method:
        """``hidden``: the backbone's width (its ``hidden`` argument); the kernel's D is measured."""
        encoder = cls.build_backbone(info, backbone, backbone_args, hidden=hidden)
        return cls(encoder, fce, processing_steps, feature_size(encoder, info.input_shape), scale)
