"""Prototypical Networks: the math against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from metashot.batches import Episode, TaskInfo
from metashot.methods.protonet import ProtoNet, prototype_logits, prototypes
from metashot.nn import Conv4, ResNet12


def _episode() -> Episode:
    # 2-D "images" embedded by Flatten: class 0 at (0,0) and (2,0), class 1 at (0,2) and (0,4)
    support = torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 2.0], [0.0, 4.0]]).view(1, 4, 1, 1, 2)
    query = torch.tensor([[1.0, 1.0], [0.0, 3.0]]).view(1, 2, 1, 1, 2)
    return Episode(support, torch.tensor([[0, 0, 1, 1]]), query, torch.tensor([[0, 1]]))


def test_prototypes_are_class_means() -> None:
    ep = _episode()
    protos = prototypes(ep.support.flatten(2), ep.support_labels, 2)
    assert protos.tolist() == [[[1.0, 0.0], [0.0, 3.0]]]


def test_logits_are_negative_squared_distances() -> None:
    net = ProtoNet(nn.Flatten())
    log_p = net.log_probs(_episode())
    # query (1,1): d to (1,0) = 1, to (0,3) = 1 + 4 = 5; query (0,3): 1 + 9 = 10 and 0
    expected = torch.tensor([[-1.0, -5.0], [-10.0, 0.0]]).log_softmax(-1)
    assert torch.allclose(log_p[0], expected, atol=1e-6)
    loss, metrics = net.loss(_episode())
    by_hand = -(math.log(1 / (1 + math.exp(-4))) + math.log(1 / (1 + math.exp(-10)))) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-5)
    assert metrics["acc"].tolist() == [1.0]


def test_cosine_distance() -> None:
    q = torch.tensor([[[1.0, 0.0]]])
    c = torch.tensor([[[2.0, 0.0], [0.0, 3.0], [1.0, 1.0]]])
    logits = prototype_logits(q, c, "cosine")
    assert torch.allclose(logits, torch.tensor([[[1.0, 0.0, 1 / math.sqrt(2)]]]))
    with pytest.raises(ValueError, match="distance must be 'euclidean' or 'cosine', got 'l1'"):
        prototype_logits(q, c, "l1")


def test_gradients_reach_the_encoder() -> None:
    torch.manual_seed(0)
    net = ProtoNet()
    ep = Episode(torch.rand(2, 5, 1, 28, 28), torch.arange(5).repeat(2, 1),
                 torch.rand(2, 10, 1, 28, 28), torch.arange(5).repeat_interleave(2).repeat(2, 1))
    loss, metrics = net.loss(ep)
    loss.backward()
    assert metrics["acc"].shape == (2,) and metrics["loss"].shape == (2,)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.encoder.parameters())


def test_built_on_the_papers_conv4_or_on_a_registry_backbone() -> None:
    torch.manual_seed(0)
    net = ProtoNet.build(TaskInfo((1, 28, 28), 5, 5))
    assert type(net.encoder) is Conv4 and ProtoNet.default_backbone == "conv4"
    assert sum(p.numel() for p in net.encoder.parameters()) == (9 * 64 + 64 + 2 * 64) + 3 * (
        9 * 64 * 64 + 64 + 2 * 64)
    net = ProtoNet.build(TaskInfo((3, 16, 16), 5, 5), backbone="resnet12",
                         backbone_args={"widths": [4, 6, 8, 10], "drop_rate": 0.1, "dropblock_size": 2})
    assert type(net.encoder) is ResNet12
    ep = Episode(torch.rand(1, 5, 3, 16, 16), torch.arange(5).view(1, 5),
                 torch.rand(1, 10, 3, 16, 16), torch.arange(5).repeat_interleave(2).view(1, 10))
    net.loss(ep)[0].backward()
    assert all(p.grad is not None for p in net.encoder.parameters())
