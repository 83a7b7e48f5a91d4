"""Matching Networks and the kernel rule: attention, invariances, gradients, agreement with ProtoNet."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import Episode
from metashot.config import Config
from metashot.data.omniglot import Omniglot, OmniglotSource
from metashot.evaluate import evaluate
from metashot.methods import (
    METHODS,
    KernelMethod,
    MatchingKernel,
    MatchingNetwork,
    ProtoNet,
    PrototypeKernel,
    RBFKernel,
    TaskInfo,
    class_log_probs,
)
from metashot.nn.backbones import Conv4
from metashot.train import Trainer

# The short Omniglot run. With the paper's scale 1 the attention is soft (the cosine of non-negative
# Conv4 features lies in [0, 1]) and 5-way 1-shot accuracy was ~78% after 900 episodes; a scale of 20
# (metric scaling, Oreshkin et al. 2018) gave 90-92% after 500 (3 seeds; ~35 s of CPU on one thread).
SCALE, STEPS = 20.0, 500


def random_episode(
    batch: int = 2, ways: int = 3, shots: int = 2, queries: int = 2, seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> Episode:
    """Random 1x28x28 images in the class-major layout of the sampler."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return Episode(
        support=torch.rand(batch, ways * shots, 1, 28, 28, generator=g, dtype=dtype),
        support_labels=labels.repeat_interleave(shots).expand(batch, -1).clone(),
        query=torch.rand(batch, ways * queries, 1, 28, 28, generator=g, dtype=dtype),
        query_labels=labels.repeat_interleave(queries).expand(batch, -1).clone(),
    )


def test_attention_weights_sum_to_one_and_match_a_hand_computed_example() -> None:
    # query (1, 0); support (1, 0) of class 0, (0, 1) and (1, 1) of class 1: cosines 1, 0, 1/sqrt(2)
    query = torch.tensor([[[1.0, 0.0]]])
    support = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    labels = torch.tensor([[0, 1, 1]])
    log_w = MatchingKernel(dim=2)(query, support, labels, 2)
    e = [math.exp(c) for c in (1.0, 0.0, 1 / math.sqrt(2))]
    expected = torch.tensor([[[x / sum(e) for x in e]]])
    torch.testing.assert_close(log_w.exp(), expected)
    p = class_log_probs(log_w, labels, 2).exp()
    torch.testing.assert_close(p, torch.tensor([[[e[0] / sum(e), (e[1] + e[2]) / sum(e)]]]))
    # and on random embeddings, with and without FCE, the weights of every query sum to one
    for fce in (False, True):
        y = torch.tensor([0, 0, 1, 1]).expand(3, -1)
        w = MatchingKernel(fce, dim=8)(torch.randn(3, 5, 8), torch.randn(3, 4, 8), y, 2).exp()
        assert w.shape == (3, 5, 4)
        torch.testing.assert_close(w.sum(-1), torch.ones(3, 5))


def test_scale_sharpens_without_changing_the_ranking() -> None:
    q, s = torch.randn(2, 6, 8), torch.randn(2, 5, 8)
    soft = MatchingKernel(dim=8)(q, s, torch.zeros(2, 5, dtype=torch.long), 1)
    sharp = MatchingKernel(dim=8, scale=10.0)(q, s, torch.zeros(2, 5, dtype=torch.long), 1)
    assert torch.equal(soft.argsort(-1), sharp.argsort(-1))
    assert (sharp.exp().amax(-1) > soft.exp().amax(-1)).all()


@pytest.mark.parametrize("train_mode", [True, False])
def test_predictions_without_fce_do_not_depend_on_support_order(train_mode: bool) -> None:
    torch.manual_seed(0)
    net = MatchingNetwork(fce=False).train(train_mode)
    ep = random_episode(ways=4, shots=3, queries=3)
    perm = torch.randperm(ep.support.shape[1])
    shuffled = Episode(ep.support[:, perm], ep.support_labels[:, perm], ep.query, ep.query_labels)
    with torch.no_grad():
        torch.testing.assert_close(net.log_probs(shuffled), net.log_probs(ep), rtol=1e-5, atol=1e-5)


def test_fce_is_differentiable_end_to_end() -> None:
    torch.manual_seed(0)
    net = MatchingNetwork(fce=True, processing_steps=3)
    loss, metrics = net.loss(random_episode())
    assert metrics["loss"].shape == metrics["acc"].shape == (2,)
    loss.backward()
    lstm = dict(net.kernel.named_parameters())
    assert {n.split(".")[0] for n in lstm} == {"support_lstm", "query_cell"}
    assert len(lstm) == 12  # 2 directions x 4 tensors + the cell's 4
    for name, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fce_is_batched_over_episodes() -> None:
    """An episode's weights are the same alone or in a batch: no mixing across episodes."""
    torch.manual_seed(0)
    kernel = MatchingKernel(fce=True, dim=8, processing_steps=4)
    q, s, y = torch.randn(3, 5, 8), torch.randn(3, 4, 8), torch.tensor([0, 0, 1, 1]).expand(3, -1)
    batched = kernel(q, s, y, 2)
    alone = torch.cat([kernel(q[i : i + 1], s[i : i + 1], y[i : i + 1], 2) for i in range(3)])
    torch.testing.assert_close(batched, alone)


@pytest.mark.parametrize("distance", ["euclidean", "cosine"])
@pytest.mark.parametrize("shots", [1, 3])
def test_kernel_rule_reproduces_protonet(distance: str, shots: int) -> None:
    torch.manual_seed(0)
    encoder = Conv4().double().eval()
    ep = random_episode(ways=4, shots=shots, queries=3, dtype=torch.float64)
    with torch.no_grad():
        rule = KernelMethod(encoder, PrototypeKernel(distance)).log_probs(ep)
        direct = ProtoNet(encoder, distance).log_probs(ep)
    torch.testing.assert_close(rule, direct)
    assert torch.equal(rule.argmax(-1), direct.argmax(-1))


@pytest.mark.parametrize("fce", [False, True])
def test_kernel_rule_reproduces_matching_networks(fce: bool) -> None:
    """The rule's log-space sum equals the paper's prediction sum_i a(x^, x_i) y_i."""
    torch.manual_seed(0)
    net = MatchingNetwork(fce=fce, processing_steps=3).double().eval()
    ep = random_episode(ways=4, shots=2, queries=3, dtype=torch.float64)
    with torch.no_grad():
        rule = KernelMethod(net.encoder, net.kernel).log_probs(ep)
        support, query = net.embed(ep)
        if fce:
            support = net.kernel.encode_support(support)
            query = net.kernel.encode_query(query, support)
        a = (F.normalize(query, dim=-1) @ F.normalize(support, dim=-1).transpose(1, 2)).softmax(-1)
        y_hat = a @ F.one_hot(ep.support_labels, 4).double()  # [B, Q, N]
    torch.testing.assert_close(rule.exp(), y_hat)
    assert torch.equal(rule.argmax(-1), y_hat.argmax(-1))
    torch.testing.assert_close(net.log_probs(ep), rule)


def test_one_shot_protonet_and_matching_coincide() -> None:
    """1-shot, cosine: prototypes are the support points, so both give the same class ranking."""
    torch.manual_seed(0)
    encoder = Conv4().eval()
    proto, match = ProtoNet(encoder, "cosine"), MatchingNetwork(encoder, fce=False)
    ep = random_episode(batch=3, ways=5, shots=1, queries=4)
    with torch.no_grad():
        lp, lm = proto.log_probs(ep), match.log_probs(ep)
        torch.testing.assert_close(lp, lm)
        assert torch.equal(lp.argsort(-1), lm.argsort(-1))
        # with several shots they are different rules (mean of embeddings vs sum of kernels)
        ep5 = random_episode(batch=3, ways=5, shots=5, queries=4)
        assert not torch.allclose(proto.log_probs(ep5), match.log_probs(ep5), atol=1e-4)


def test_a_user_kernel_trains() -> None:
    """KernelMethod(encoder, RBFKernel()) learns to ignore noisy dimensions of a toy problem."""
    g = torch.Generator().manual_seed(0)
    means = torch.randn(20, 4, generator=g)  # 20 classes, 4 informative dims; 12 dims of loud noise

    def episode(ways: int = 5, shots: int = 2, queries: int = 5) -> Episode:
        classes = torch.randperm(20, generator=g)[:ways]
        def draw(n: int) -> torch.Tensor:
            signal = means[classes].repeat_interleave(n, 0) + 0.3 * torch.randn(ways * n, 4, generator=g)
            return torch.cat([signal, 3 * torch.randn(ways * n, 12, generator=g)], -1)[None]
        labels = torch.arange(ways)[None]
        return Episode(draw(shots), labels.repeat_interleave(shots, 1), draw(queries),
                       labels.repeat_interleave(queries, 1))

    torch.manual_seed(0)
    method = KernelMethod(nn.Linear(16, 16), RBFKernel(sigma=2.0))
    opt = torch.optim.Adam(method.parameters(), lr=1e-2)
    losses = []
    for _ in range(150):
        loss, _ = method.loss(episode())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
    assert last < 0.5 * first, (first, last)
    acc = torch.stack([method.evaluate(episode())["acc"] for _ in range(50)]).mean()
    assert acc > 0.9


def test_registered_and_built_from_task_info() -> None:
    assert METHODS["matching"] is MatchingNetwork
    net = MatchingNetwork.build(TaskInfo((1, 28, 28), 5, 5), fce=True, processing_steps=2, hidden=32)
    assert isinstance(net, MatchingNetwork) and net.kernel.dim == 32 and net.kernel.processing_steps == 2
    # the probe that sizes D leaves batch-norm statistics untouched
    bn = net.encoder[0][1]
    assert torch.equal(bn.running_mean, torch.zeros(32)) and int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize(("backbone", "args", "dim"), [
    ("resnet12", {"widths": [4, 6, 8, 10]}, 10),
    ("conv4-strided", {"hidden": 12}, 12),
    ("mlp", {"hidden": 7, "depth": 1}, 7),
])
def test_the_kernels_width_is_measured_on_any_backbone(backbone: str, args: dict, dim: int) -> None:
    torch.manual_seed(0)
    info = TaskInfo((3, 16, 16), 3, 3)
    net = MatchingNetwork.build(info, backbone=backbone, backbone_args=args, fce=True, processing_steps=2)
    assert net.kernel.dim == dim and net.kernel.query_cell.hidden_size == dim and net.encoder.training
    ep = Episode(torch.rand(2, 3, 3, 16, 16), torch.arange(3).repeat(2, 1),
                 torch.rand(2, 6, 3, 16, 16), torch.arange(3).repeat_interleave(2).repeat(2, 1))
    loss, metrics = net.loss(ep)
    loss.backward()
    assert metrics["acc"].shape == (2,)
    assert all(p.grad is not None for p in net.encoder.parameters())


@pytest.mark.slow
def test_short_omniglot_run_reaches_85_percent(
    omniglot_dir: Path, omniglot: Omniglot, tmp_path: Path
) -> None:
    """5-way 1-shot: 500 training episodes lift test accuracy to >= 85% (chance 20%; untrained ~58%)."""
    cfg = Config(
        method="matching", method_args={"scale": SCALE}, data_dir=str(omniglot_dir), ways=5, shots=1,
        queries=5, steps=STEPS, lr=1e-3, lr_step=10_000, val_every=STEPS, val_episodes=20,
        test_episodes=200,
    )
    source = OmniglotSource(cfg)
    source.omniglot = omniglot  # the session's decoded copy, not a second load
    trainer = Trainer(cfg, tmp_path / "run", progress=False, source=source)
    before = evaluate(trainer.method, source.loader("test", 200, seed=cfg.seed)).mean
    trainer.fit()
    after = trainer.test().mean
    assert after >= 0.85, (before, after)
    assert after > before + 0.15, (before, after)
