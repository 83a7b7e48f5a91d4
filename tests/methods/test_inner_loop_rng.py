"""The recomputed (gradient-checkpointed) inner step replays the forward's random draws and autocast
state in its backward, as ``torch.utils.checkpoint`` does with ``preserve_rng_state=True``: with dropout
or DropBlock active, ``recompute=True`` gives the meta-gradient of the plain loop, and leaves the global
random stream where the plain loop leaves it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from metashot.batches import Episode
from metashot.methods.inner_loop import recomputed
from metashot.methods.maml import MAML
from metashot.nn.backbones import DropBlock


def _dropout_net(ways: int = 3) -> nn.Module:
    """Two tanh convolutions with DropBlock and dropout between them, float64."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.Tanh(), DropBlock(0.3, block_size=2),
        nn.Conv2d(4, 4, 3, stride=2), nn.Tanh(), nn.Flatten(), nn.Dropout(0.3), nn.Linear(4 * 2 * 2, ways),
    ).double()


def _episodes(b: int = 2, ways: int = 3, size: int = 8) -> Episode:
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(ways).repeat_interleave(2).expand(b, -1).contiguous()
    return Episode(torch.rand(b, 2 * ways, 1, size, size, generator=g, dtype=torch.float64), labels,
                   torch.rand(b, 2 * ways, 1, size, size, generator=g, dtype=torch.float64), labels.clone())


def _meta_grad(method: MAML, batch: Episode) -> tuple[torch.Tensor, torch.Tensor]:
    """The meta-gradient from seed 0, and the global random state after it."""
    torch.manual_seed(0)
    method.zero_grad(set_to_none=True)
    method.loss(batch)[0].backward()
    return torch.cat([p.grad.flatten() for p in method.meta_parameters()]), torch.get_rng_state()


@pytest.mark.parametrize("per_task_backward", [True, False])
def test_recomputed_meta_gradient_with_dropout_is_the_plain_loops(per_task_backward: bool) -> None:
    torch.manual_seed(1)
    model, batch = _dropout_net().train(), _episodes()
    kwargs = dict(inner_steps=3, tasks="loop", per_task_backward=per_task_backward)
    plain, plain_rng = _meta_grad(MAML(model, 0.3, **kwargs), batch)
    again, _ = _meta_grad(MAML(model, 0.3, **kwargs), batch)
    torch.testing.assert_close(again, plain, rtol=0, atol=0)  # the reference is deterministic
    recomputed_grad, rng = _meta_grad(MAML(model, 0.3, recompute=True, **kwargs), batch)
    torch.testing.assert_close(recomputed_grad, plain, rtol=1e-12, atol=1e-14)
    assert torch.equal(rng, plain_rng)  # the backward's replay did not advance the stream
    # the masks matter: another seed's masks give another meta-gradient
    torch.manual_seed(5)
    method = MAML(model, 0.3, **kwargs)
    method.loss(batch)[0].backward()
    other = torch.cat([p.grad.flatten() for p in method.meta_parameters()])
    assert (other - plain).norm() > 1e-3 * plain.norm()


def _dropped(ts: list[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
    """A step that differentiates inside, with a dropout mask drawn in it."""
    x, w = ts
    with torch.enable_grad():
        inner = (F.dropout(x * w, 0.5).tanh() ** 2).sum()
        (g,) = torch.autograd.grad(inner, w, create_graph=create_graph)
    return [w - 0.1 * g]


def test_recomputed_replays_dropout_as_torch_checkpoint_does() -> None:
    x = torch.randn(16, dtype=torch.float64)
    w = torch.randn(16, dtype=torch.float64, requires_grad=True)
    grads = []
    for run in (lambda: _dropped([x, w], True)[0],
                lambda: checkpoint(lambda a, b: _dropped([a, b], True)[0], x, w, use_reentrant=False),
                lambda: recomputed(_dropped, [x, w])[0]):
        torch.manual_seed(3)
        out = run()
        (g,) = torch.autograd.grad((out**2).sum(), w)
        grads.append(g)
    torch.testing.assert_close(grads[1], grads[0], rtol=0, atol=0)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-12, atol=1e-14)


def test_recomputed_replays_the_forwards_autocast_state() -> None:
    def matmul(ts: list[torch.Tensor], create_graph: bool) -> list[torch.Tensor]:
        return [ts[0] @ ts[1]]

    g = torch.Generator().manual_seed(0)
    a = torch.randn(8, 8, generator=g, requires_grad=True)
    b = torch.randn(8, 8, generator=g, requires_grad=True)
    grads = []
    for fn in (lambda: matmul([a, b], True)[0], lambda: recomputed(matmul, [a, b])[0]):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn()
        assert out.dtype == torch.bfloat16
        grads.append(torch.autograd.grad(out.float().square().sum(), [a, b]))
    for got, want in zip(grads[1], grads[0]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
