"""R2-D2's ridge head: the solution against least squares and scikit-learn, the Woodbury form against the
primal, gradients against finite differences, and a short Omniglot run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from torch.func import functional_call

from metashot.batches import TaskInfo
from metashot.config import Config
from metashot.data.tasks import build_source
from metashot.methods.ridge import R2D2, RidgeHead, ridge_weights
from metashot.nn import Conv4, ResNet12
from metashot.nn.backbones import make_backbone


def _task(b: int, s: int, d: int, n: int, q: int = 3, dtype: torch.dtype = torch.float64, seed: int = 0):
    """Support [b, s, d], labels [b, s] covering the n classes, query [b, q, d]."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.stack([torch.randperm(s, generator=g) % n for _ in range(b)])
    support = torch.randn(b, s, d, generator=g, dtype=dtype)
    return support, labels, torch.randn(b, q, d, generator=g, dtype=dtype)


def _lstsq_ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin ||X W - Y||^2 + lam ||W||^2 as least squares on [X; sqrt(lam) I] and [Y; 0]."""
    b, _, d = x.shape
    eye = (lam ** 0.5 * torch.eye(d, dtype=x.dtype)).expand(b, d, d)
    zeros = y.new_zeros(b, d, y.shape[-1])
    return torch.linalg.lstsq(torch.cat([x, eye], 1), torch.cat([y, zeros], 1)).solution


@pytest.mark.parametrize("s, d", [(4, 9), (12, 5)])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("form", ["auto", "primal", "woodbury"])
def test_ridge_solves_the_augmented_least_squares(s: int, d: int, bias: bool, form: str) -> None:
    x, labels, _ = _task(3, s, d, 3)
    y = torch.randn(3, s, 3, dtype=torch.float64)
    w = ridge_weights(x, y, 0.7, bias=bias, form=form)
    xa = torch.cat([x, torch.ones(3, s, 1, dtype=x.dtype)], -1) if bias else x
    assert w.shape == (3, d + bias, 3)
    assert torch.allclose(w, _lstsq_ridge(xa, y, 0.7), atol=1e-10, rtol=0)


@pytest.mark.parametrize("s, d", [(5, 64), (40, 16)])
def test_woodbury_equals_primal(s: int, d: int) -> None:
    x, labels, _ = _task(4, s, d, 5)
    y = torch.nn.functional.one_hot(labels, 5).double()
    primal = ridge_weights(x, y, 0.3, form="primal")
    assert torch.allclose(ridge_weights(x, y, 0.3, form="woodbury"), primal, atol=1e-12, rtol=0)
    chosen = "woodbury" if s < d else "primal"
    assert torch.equal(ridge_weights(x, y, 0.3), ridge_weights(x, y, 0.3, form=chosen))


def test_unknown_form_is_a_value_error() -> None:
    x, _, _ = _task(1, 3, 2, 3)
    with pytest.raises(ValueError, match="form must be one of auto, primal, woodbury, got 'dual'"):
        ridge_weights(x, x, 1.0, form="dual")


@pytest.mark.parametrize("shots, d", [(1, 8), (3, 4)])  # S = 5 < D' = 9 (Woodbury); S = 15 > D' = 5 (primal)
def test_head_is_sklearn_ridge_with_a_bias_scaled_and_log_softmaxed(shots: int, d: int) -> None:
    support, labels, query = _task(2, 5 * shots, d, 5)
    head = RidgeHead(lam=0.4, scale=3.0).double()
    log_p = head(query, support, labels, 5)
    s, lam = support.shape[1], head.lam.item()  # 0.4 to float32's precision of its log
    assert lam == pytest.approx(0.4, rel=1e-7)
    for t in range(2):
        ones = np.ones((s, 1))
        # the official code's 1 / sqrt(S) scaling of X and Y is ridge with lam * S
        fit = Ridge(alpha=lam * s, fit_intercept=False, solver="cholesky").fit(
            np.hstack([support[t].numpy(), ones]), np.eye(5)[labels[t].numpy()])
        logits = 3.0 * fit.predict(np.hstack([query[t].numpy(), np.ones((3, 1))]))
        expected = torch.from_numpy(logits).log_softmax(-1)
        assert torch.allclose(log_p[t], expected, atol=1e-10, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_head_gives_log_probabilities(dtype: torch.dtype) -> None:
    support, labels, query = _task(3, 10, 6, 5, q=7, dtype=dtype)
    log_p = RidgeHead().to(dtype)(query, support, labels, 5)
    assert log_p.shape == (3, 7, 5) and log_p.dtype == dtype
    assert torch.allclose(log_p.logsumexp(-1), torch.zeros(3, 7, dtype=dtype), atol=1e-5)


@pytest.mark.parametrize("shots, d", [(1, 8), (3, 4)])
def test_gradients_match_finite_differences(shots: int, d: int) -> None:
    support, labels, query = _task(2, 5 * shots, d, 5)
    head = RidgeHead(lam=0.5, scale=2.0).double()
    weights = torch.randn(2, 3, 5, dtype=torch.float64)

    def scalar(query: torch.Tensor, support: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
        log_p = functional_call(head, {"log_lam": lam.log()}, (query, support, labels, 5), strict=False)
        return (weights * log_p).sum()

    lam = torch.tensor(0.5, dtype=torch.float64)
    inputs = tuple(t.clone().requires_grad_() for t in (query, support, lam))
    assert torch.autograd.gradcheck(scalar, inputs)


def test_float32_gradients_agree_with_float64() -> None:
    support, labels, query = _task(2, 5, 16, 5, q=6)
    grads = []
    for dtype in (torch.float32, torch.float64):
        head = RidgeHead(lam=0.5).to(dtype)
        s = support.to(dtype).requires_grad_()
        head(query.to(dtype), s, labels, 5)[..., 0].sum().backward()
        grads.append(torch.cat([s.grad.flatten().double(), head.log_lam.grad.view(1).double()]))
    assert torch.allclose(grads[0], grads[1], rtol=1e-3, atol=1e-5)


def test_lambda_is_positive_and_learned_unless_fixed() -> None:
    head = RidgeHead(lam=2.0)
    assert head.lam.item() == pytest.approx(2.0)
    assert {name for name, _ in head.named_parameters()} == {"log_lam", "scale"}
    fixed = RidgeHead(lam=2.0, learn_lambda=False)
    assert {name for name, _ in fixed.named_parameters()} == {"scale"}
    assert fixed.state_dict()["log_lam"].item() == pytest.approx(np.log(2.0))
    with pytest.raises(ValueError, match="ridge lam must be positive, got 0.0"):
        RidgeHead(lam=0.0)


def test_build_passes_its_arguments_on() -> None:
    torch.manual_seed(0)
    net = R2D2.build(TaskInfo((1, 28, 28), 5, 5), hidden=16, lam=3.0, scale=0.5, learn_lambda=False)
    assert type(net.encoder) is Conv4 and R2D2.default_backbone == "conv4"
    assert net.encoder(torch.zeros(2, 1, 28, 28)).shape == (2, 16)
    assert net.head.lam.item() == pytest.approx(3.0) and net.head.scale.item() == 0.5
    assert not isinstance(net.head.log_lam, torch.nn.Parameter)
    net = R2D2.build(TaskInfo((3, 16, 16), 5, 5), backbone="resnet12",
                     backbone_args={"widths": [4, 6, 8, 10], "drop_rate": 0.1, "dropblock_size": 2})
    assert type(net.encoder) is ResNet12


def test_short_omniglot_run_beats_chance(omniglot_dir: Path) -> None:
    # 60 Adam steps of 5-way 1-shot (lr 1e-3) gave 0.60-0.65 on 100 test episodes for seeds 0-2
    torch.manual_seed(0)
    cfg = Config(task="omniglot", data_dir=str(omniglot_dir), ways=5, shots=1, queries=5)
    source = build_source(cfg)
    net = R2D2(make_backbone("conv4", (1, 28, 28), hidden=16))
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    for episode in source.loader("train", 60, seed=0):
        loss, _ = net.loss(episode)
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    acc = torch.cat([net.evaluate(episode)["acc"] for episode in source.loader("test", 100, seed=1)])
    assert acc.mean().item() > 0.2 + 0.25
