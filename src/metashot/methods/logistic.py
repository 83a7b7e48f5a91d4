"""L2-regularised multinomial logistic regression fitted on each task's support set (RFS: Tian et al.,
"Rethinking Few-Shot Image Classification", ECCV 2020, Sec. 3.2).

RFS L2-normalises the features and fits scikit-learn's ``LogisticRegression`` with its defaults: the
minimum over W [D, N] and b [N] of 0.5 ||W||^2 + C sum_i CE(W^T x_i + b, y_i), intercept not penalised.
Here it is solved for every episode of a meta-batch at once, in torch:

- by the representer theorem the optimum W lies in the span of the support features, so with X^T = Q R
  (thin QR, Q [D, r] orthonormal, r = min(S, D)) W = Q V, ||W|| = ||V|| and the problem is the same one in
  r dimensions on the features z_i = Q^T x_i (R's columns): (r + 1) N unknowns whatever D is;
- that problem is solved by batched Newton steps with a backtracking (Armijo) line search. The objective
  does not change when one constant is added to every intercept (softmax's shift), so 0.5 (sum_n b_n)^2 is
  added: it is 0 at the optimum that has sum_n b_n = 0, the same probabilities, and makes the Hessian
  positive definite.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from metashot.methods.heads import Head

ARMIJO = 1e-4  # sufficient decrease of the line search
STEP_HALVINGS = 30  # backtracking tries steps 1, 1/2, ..., 2^-29 in one batched evaluation
JITTER = 1e-10  # added to the Hessian's diagonal: a saturated softmax leaves the intercepts' block singular


def _logits(z: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """z [..., M, r], theta [..., N, r + 1] (the weights V^T then the intercepts) -> [..., M, N]."""
    return z @ theta[..., :-1].mT + theta[..., -1].unsqueeze(-2)


def _objective(z: torch.Tensor, onehot: torch.Tensor, theta: torch.Tensor, C: float) -> torch.Tensor:
    """C sum_i CE_i + 0.5 ||V||^2 + 0.5 (sum_n b_n)^2 over the last two dims of theta [..., N, r + 1]."""
    nll = -(onehot * _logits(z, theta).log_softmax(-1)).sum((-1, -2))
    return C * nll + 0.5 * theta[..., :-1].pow(2).sum((-1, -2)) + 0.5 * theta[..., -1].sum(-1).pow(2)


def _newton_direction(
    z: torch.Tensor, onehot: torch.Tensor, theta: torch.Tensor, C: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The gradient g and Newton step -H^-1 g of the objective, both [B, N, r + 1]."""
    b, n, k = theta.shape
    p = _logits(z, theta).softmax(-1)  # [B, S, N]
    z1 = torch.cat([z, torch.ones_like(z[..., :1])], dim=-1)  # [B, S, r + 1]
    grad = C * (p - onehot).mT @ z1
    grad[..., :-1] += theta[..., :-1]
    grad[..., -1] += theta[..., -1].sum(-1, keepdim=True)
    # d2 CE_i = (diag(p_i) - p_i p_i^T) (x) z1_i z1_i^T, summed over the support points
    cov = torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)  # [B, S, N, N]
    hess = C * torch.einsum("bsnm,bsjk->bnjmk", cov, z1.unsqueeze(-1) * z1.unsqueeze(-2))
    is_bias = torch.arange(k, device=z.device) == k - 1
    penalty = torch.diag_embed((~is_bias).to(z.dtype).repeat(n))  # ||V||^2 / 2
    bias = is_bias.to(z.dtype).repeat(n)
    penalty = penalty + bias.unsqueeze(0) * bias.unsqueeze(1) + JITTER * torch.eye(n * k, device=z.device)
    hess = hess.reshape(b, n * k, n * k) + penalty  # (sum b)^2 / 2: ones on the intercepts' block
    chol, _ = torch.linalg.cholesky_ex(hess)
    step = -torch.cholesky_solve(grad.reshape(b, n * k, 1), chol).view(b, n, k)
    return grad, step


def _step_lengths(
    z: torch.Tensor, onehot: torch.Tensor, theta: torch.Tensor, step: torch.Tensor, slope: torch.Tensor,
    C: float,
) -> torch.Tensor:
    """Each episode's longest step length t in 1, 1/2, ..., 2^-(T-1) with the Armijo decrease
    f(theta + t step) <= f(theta) + ARMIJO t slope, or 0 when none has it: [B]. The full Newton step is
    tried first, alone: it is the one taken but for the first steps on hard problems."""
    start = _objective(z, onehot, theta, C)
    full = torch.ones_like(slope)
    if bool((_objective(z, onehot, theta + step, C) <= start + ARMIJO * slope).all()):
        return full
    halvings = 0.5 ** torch.arange(STEP_HALVINGS, dtype=z.dtype, device=z.device)
    trial = theta.unsqueeze(1) + halvings.view(1, -1, 1, 1) * step.unsqueeze(1)  # [B, T, N, r + 1]
    value = _objective(z.unsqueeze(1), onehot.unsqueeze(1), trial, C)  # [B, T]
    ok = value <= start.unsqueeze(1) + ARMIJO * halvings * slope.unsqueeze(1)
    return torch.where(ok.any(1), halvings[ok.to(torch.uint8).argmax(1)], 0.0)  # argmax: the first True


def fit_logistic(
    z: torch.Tensor, labels: torch.Tensor, ways: int, C: float = 1.0, max_iter: int = 100,
    tol: float = 1e-10,
) -> tuple[torch.Tensor, int]:
    """The minimiser theta [B, ways, r + 1] (weights, then intercept) of the regularised logistic loss of
    features z [B, S, r] labelled [B, S], and the number of Newton steps taken.

    Stops after the step from a point where every episode's Newton decrement g^T H^-1 g is below
    ``tol`` (its suboptimality is about half that, and the step makes it quadratically smaller), or after
    ``max_iter`` steps.
    """
    onehot = F.one_hot(labels, ways).to(z.dtype)
    theta = z.new_zeros(z.shape[0], ways, z.shape[-1] + 1)
    for steps in range(1, max_iter + 1):
        grad, step = _newton_direction(z, onehot, theta, C)
        slope = (grad * step).sum((-1, -2))  # -(Newton decrement), [B]
        theta = theta + _step_lengths(z, onehot, theta, step, slope, C).view(-1, 1, 1) * step
        if bool((-slope < tol).all()):
            return theta, steps
    return theta, max_iter


class LogisticHead(Head):
    """RFS's test-time classifier: multinomial logistic regression with an L2 penalty fitted on each
    episode's support features (see the module's docstring), its log-probabilities of the queries.

    ``C``: the inverse penalty (scikit-learn's; the objective is 0.5 ||W||^2 + C sum_i CE_i);
    ``normalize``: L2-normalise support and query features first (RFS does); ``max_iter`` / ``tol``: of
    the Newton solver (:func:`fit_logistic`). Computes in float64 and returns the features' dtype.
    A test-time head: it is fitted on detached features, so no gradient reaches the encoder.
    """

    def __init__(
        self, C: float = 1.0, normalize: bool = True, max_iter: int = 100, tol: float = 1e-10
    ) -> None:
        super().__init__()
        if C <= 0 or max_iter < 1 or tol <= 0:
            raise ValueError(f"logistic head: C ({C}), max_iter ({max_iter}) and tol ({tol}) must be > 0")
        self.C, self.normalize, self.max_iter, self.tol = C, normalize, max_iter, tol

    def forward(
        self, query: torch.Tensor, support: torch.Tensor, support_labels: torch.Tensor, ways: int
    ) -> torch.Tensor:
        """query [B, Q, D], support [B, S, D], labels [B, S] in 0..ways-1 -> log-probs [B, Q, ways]."""
        x, q = support.detach().double(), query.detach().double()
        if self.normalize:
            x, q = F.normalize(x, dim=-1), F.normalize(q, dim=-1)
        basis, r = torch.linalg.qr(x.mT)  # [B, D, r], [B, r, S]
        theta, _ = fit_logistic(r.mT, support_labels, ways, self.C, self.max_iter, self.tol)
        weight = basis @ theta[..., :-1].mT  # W = Q V [B, D, ways]: cheaper than projecting the queries
        return (q @ weight + theta[..., -1].unsqueeze(1)).log_softmax(-1).to(query.dtype)
