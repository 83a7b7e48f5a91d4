"""R2-D2: ridge regression as a differentiable base learner (Bertinetto, Henriques, Torr & Vedaldi,
"Meta-learning with differentiable closed-form solvers", ICLR 2019).

Each task's support features X [S, D], with a constant 1 appended for the regression's bias, are
regressed onto one-hot targets Y [S, N] in closed form (Sec. 3.2),

    W = (X^T X + lambda I)^-1 X^T Y,

or, by the Woodbury identity, W = X^T (X X^T + lambda I)^-1 Y, an S x S system instead of a
D x D one, the cheaper when S < D (few shots, wide features). The queries' logits are the "adjust"
layer's alpha * X_q W + beta, and lambda and alpha are meta-learned with the encoder (beta, one scalar
added to every class's logit, cancels in the softmax: it is left out).

As in the official code (bertinetto/r2d2), the bias row of W is regularised with the rest, and X and Y
are divided by sqrt(S), which is to say the data term is averaged over the support set:
W = (X^T X + S lambda I)^-1 X^T Y, so that one lambda suits any number of ways and shots.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import TaskInfo
from metashot.methods.base import Method
from metashot.methods.heads import Head, HeadMethod

FORMS = ("auto", "primal", "woodbury")


def ridge_weights(
    support: torch.Tensor, targets: torch.Tensor, lam: float | torch.Tensor, bias: bool = False,
    form: str = "auto",
) -> torch.Tensor:
    """Ridge regression of each task's ``targets`` [B, S, N] on its ``support`` [B, S, D]: the weights
    [B, D', N] minimising ||X W - Y||^2 + lam ||W||^2, with D' = D + 1 when ``bias`` appends a column of
    ones to X (its weight, the last row of W, regularised too).

    ``lam`` > 0 is a float or a 0-d tensor. ``form`` "primal" solves the D' x D' system,
    "woodbury" the S x S one (the Woodbury identity); "auto" takes Woodbury when S < D'.
    """
    if form not in FORMS:
        raise ValueError(f"form must be one of {', '.join(FORMS)}, got {form!r}")
    if bias:
        support = torch.cat([support, support.new_ones(*support.shape[:-1], 1)], dim=-1)
    s, d = support.shape[-2:]
    xt = support.transpose(-2, -1)  # [B, D', S]
    if form == "woodbury" or (form == "auto" and s < d):
        eye = torch.eye(s, dtype=support.dtype, device=support.device)
        return xt @ torch.linalg.solve(support @ xt + lam * eye, targets)
    eye = torch.eye(d, dtype=support.dtype, device=support.device)
    return torch.linalg.solve(xt @ support + lam * eye, xt @ targets)


class RidgeHead(Head):
    """R2-D2's base learner as a head: ridge regression of one-hot labels on the support features (with a
    bias), then log_softmax(alpha * (X_q W + b)) for the queries (Sec. 3.2).

    ``lam`` (lambda, kept positive as exp of a learned log, or a fixed buffer without ``learn_lambda``)
    multiplies S, the support size, as the official code's scaling of X and Y by 1 / sqrt(S) does.
    alpha starts at 10, the official code's init for Omniglot and CIFAR-FS (1e-4 for
    miniImageNet). lambda starts at 1, not its 50: lambda weighs against the features' squared norm,
    ~8,300 for its 96-192-384-512 network on 28 px Omniglot at init and ~100 for Conv4's 64 features,
    so 1 keeps about its ratio on Conv4 (and trained fastest in short Omniglot runs). The paper's scalar
    beta is left out: it shifts every class's logit alike, so its gradient is 0 but for rounding, which
    Adam's normalised steps would turn into a drift that differs between 1 and N processes.
    """

    def __init__(
        self, lam: float = 1.0, scale: float = 10.0, learn_lambda: bool = True
    ) -> None:
        super().__init__()
        if lam <= 0:
            raise ValueError(f"ridge lam must be positive, got {lam}")
        log_lam = torch.tensor(float(lam)).log()
        if learn_lambda:
            self.log_lam = nn.Parameter(log_lam)
        else:
            self.register_buffer("log_lam", log_lam)
        self.scale = nn.Parameter(torch.tensor(float(scale)))

    @property
    def lam(self) -> torch.Tensor:
        """lambda, a 0-d tensor."""
        return self.log_lam.exp()

    def forward(
        self, query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, ways: int
    ) -> torch.Tensor:
        targets = F.one_hot(support_labels, ways).to(support.dtype)  # [B, S, N]
        w = ridge_weights(support, targets, self.lam * support.shape[1], bias=True)  # [B, D + 1, N]
        logits = query @ w[:, :-1] + w[:, -1:]
        return (self.scale * logits).log_softmax(-1)


class R2D2(HeadMethod):
    """R2-D2: an encoder and the ridge-regression head (:class:`RidgeHead`), trained end to end on
    episodes through the closed-form solution.

    The paper's network is a 4-block conv of widths 96-192-384-512 (3x3 conv, batch norm, 2x2 max-pool,
    leaky ReLU 0.1; the features are the last two blocks' outputs, concatenated). ``default_backbone`` is
    Conv4 (64 wide); ``backbone_args {"hidden": ...}`` widens it, and resnet12 is the usual stronger
    stand-in. ``lam``, ``scale`` and ``learn_lambda`` are the head's (see :class:`RidgeHead`).
    """

    default_backbone: ClassVar[str | None] = "conv4"

    def __init__(
        self, encoder: nn.Module, lam: float = 1.0, scale: float = 10.0, learn_lambda: bool = True
    ) -> None:
        super().__init__(encoder, RidgeHead(lam, scale, learn_lambda=learn_lambda))

    @classmethod
    def build(
        cls, info: TaskInfo, backbone: str | None = None, backbone_args: dict[str, Any] | None = None,
        hidden: int | None = None, lam: float = 1.0, scale: float = 10.0, learn_lambda: bool = True,
    ) -> Method:
        """``hidden``: the backbone's width (its ``hidden`` argument; Conv4's 64 by default)."""
        encoder = cls.build_backbone(info, backbone, backbone_args, hidden=hidden)
        return cls(encoder, lam, scale, learn_lambda)
