"""The heads of the metric family, by hand: prototype (and ProtoNet's loss as it was), CL2N, cosine
classifier; the heads' registry; swapping a head."""

import pytest
import torch
import torch.nn.functional as F

from metashot.batches import Episode, Examples, TaskInfo
from metashot.errors import ConfigError
from metashot.methods import HEADS, Baseline, MetaBaseline, ProtoNet, build_head
from metashot.methods.heads import CL2N, CosineClassifier, episode_metrics, with_head
from metashot.methods.protonet import PrototypeHead, prototype_logits, prototypes
from metashot.nn.backbones import make_backbone


def features(b=3, ways=4, shots=2, queries=3, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    support = torch.randn(b, ways * shots, d, generator=g)
    query = torch.randn(b, ways * queries, d, generator=g)
    labels = torch.arange(ways).repeat_interleave(shots).expand(b, -1)
    return query, support, labels, ways


def episode(b=2, ways=3, shots=2, queries=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(ways)
    return Episode(torch.rand(b, ways * shots, 1, 28, 28, generator=g),
                   labels.repeat_interleave(shots).expand(b, -1).contiguous(),
                   torch.rand(b, ways * queries, 1, 28, 28, generator=g),
                   labels.repeat_interleave(queries).expand(b, -1).contiguous(), ways)


def test_protonet_loss_equals_the_loss_before_heads_bit_for_bit():
    torch.manual_seed(0)
    net = ProtoNet(make_backbone("conv4", (1, 28, 28), hidden=8), temperature=3.0)
    ep = episode()
    loss, metrics = net.loss(ep)
    # the loss as ProtoNet computed it before it trained through its head
    support, query = net.embed(ep)
    protos = prototypes(support, ep.support_labels, ep.ways)
    log_p = (prototype_logits(query, protos, "euclidean") / 3.0).log_softmax(-1)
    nll = F.nll_loss(log_p.flatten(0, 1), ep.query_labels.flatten(), reduction="none")
    nll = nll.view_as(ep.query_labels).mean(dim=1)
    assert torch.equal(loss, nll.mean())
    assert torch.equal(metrics["loss"], nll.detach())
    assert torch.equal(metrics["acc"], (log_p.argmax(-1) == ep.query_labels).float().mean(1))


def test_prototype_head_learned_scale_multiplies_the_cosine_and_gets_a_gradient():
    query, support, labels, ways = features()
    head = PrototypeHead("cosine", temperature=0.1, learn_scale=True)
    assert head.scale.item() == pytest.approx(10.0)
    log_p = head(query, support, labels, ways)
    centroids = torch.stack([support[:, labels[0] == n].mean(1) for n in range(ways)], 1)
    cos = F.cosine_similarity(query.unsqueeze(2), centroids.unsqueeze(1), dim=-1)
    torch.testing.assert_close(log_p, (10 * cos).log_softmax(-1), rtol=1e-5, atol=1e-5)
    log_p[..., 0].sum().backward()
    assert head.scale.grad is not None and head.scale.grad.abs() > 0


def test_cl2n_is_nearest_centroid_of_centred_normalised_features_by_hand():
    query, support, labels, ways = features(b=1, ways=3, shots=2, queries=2, d=5)
    mean = torch.randn(5)
    log_p = CL2N(mean)(query, support, labels, ways)
    for q in range(query.shape[1]):
        x = query[0, q] - mean
        x = x / x.norm()
        d = []
        for n in range(ways):
            s = [(v - mean) / (v - mean).norm() for v, y in zip(support[0], labels[0]) if y == n]
            c = sum(s) / len(s)
            d.append(((x - c) ** 2).sum())
        expected = (-torch.stack(d)).log_softmax(0)
        torch.testing.assert_close(log_p[0, q], expected, rtol=1e-5, atol=1e-6)


def test_cl2n_without_a_mean_centres_by_the_support_mean():
    query, support, labels, ways = features()
    mean = support.mean(1, keepdim=True)
    by_support = CL2N()(query, support, labels, ways)
    shifted = CL2N(torch.zeros(8))(query - mean, support - mean, labels, ways)
    torch.testing.assert_close(by_support, shifted)


def test_cosine_classifier_logits_by_hand():
    torch.manual_seed(0)
    layer = CosineClassifier(4, 3, scale=5.0)
    x = torch.randn(2, 4)
    w = layer.weight.detach()
    expected = torch.tensor([[5.0 * float(x[i] @ w[c]) / float(x[i].norm() * w[c].norm()) for c in range(3)]
                             for i in range(2)])
    torch.testing.assert_close(layer(x).detach(), expected, rtol=1e-5, atol=1e-5)


def test_episode_metrics():
    log_p = torch.tensor([[[0.0, -1.0], [-2.0, -0.5]]]).log_softmax(-1)
    labels = torch.tensor([[0, 0]])
    loss, metrics = episode_metrics(log_p, labels)
    assert metrics["acc"].tolist() == [0.5]
    torch.testing.assert_close(loss, -(log_p[0, 0, 0] + log_p[0, 1, 0]) / 2)


def test_build_head_errors():
    assert isinstance(build_head("cl2n"), CL2N)
    with pytest.raises(ConfigError, match="unknown head 'svm'; known: .*prototype"):
        build_head("svm")
    with pytest.raises(ConfigError, match="head args .* do not fit prototype"):
        build_head("prototype", width=3)
    assert set(HEADS) >= {"prototype", "cl2n"}


def test_with_head_swaps_the_head_and_refuses_other_methods():
    from metashot.methods import MAML

    net = ProtoNet(make_backbone("conv4", (1, 28, 28), hidden=8))
    assert isinstance(with_head(net, CL2N()).head, CL2N)
    maml = MAML.build(TaskInfo((1, 28, 28), 5, 5))
    with pytest.raises(ValueError, match="not an encoder and a head"):
        with_head(maml, CL2N())


def test_baseline_loss_is_cross_entropy_over_the_training_classes():
    torch.manual_seed(0)
    info = TaskInfo((1, 28, 28), 5, 5, train_classes=7)
    net = Baseline.build(info, backbone_args={"hidden": 8}, head="cl2n")
    batch = Examples(torch.rand(6, 1, 28, 28), torch.tensor([0, 1, 2, 3, 4, 6]), torch.arange(6))
    loss, metrics = net.loss(batch)
    logits = net.classifier(net.encoder(batch.x))
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch.y))
    assert metrics["acc"].shape == (6,)
    # training folded the features into the running base mean, 0.01 of the way from 0
    z = net.encoder(batch.x).detach()
    torch.testing.assert_close(net.base_mean, 0.01 * z.mean(0), rtol=1e-4, atol=1e-6)


def test_baseline_tests_with_cl2n_centred_by_the_base_mean():
    torch.manual_seed(0)
    net = Baseline.build(TaskInfo((1, 28, 28), 3, 3, train_classes=4), backbone_args={"hidden": 8},
                         head="cl2n").eval()
    net.base_stats.running_mean.normal_()
    ep = episode()
    metrics = net.evaluate(ep)
    support, query = net.embed(ep)
    log_p = CL2N(net.base_mean)(query, support, ep.support_labels, ep.ways)
    torch.testing.assert_close(metrics["loss"], episode_metrics(log_p, ep.query_labels)[1]["loss"])


def test_baseline_needs_training_classes():
    with pytest.raises(ValueError, match="training classes"):
        Baseline.build(TaskInfo((1, 28, 28), 5, 5))


def test_meta_baseline_is_cosine_protonet_with_learned_scale():
    net = MetaBaseline.build(TaskInfo((1, 28, 28), 5, 5), backbone_args={"hidden": 8})
    assert net.head.distance == "cosine" and net.head.scale.item() == pytest.approx(10.0)
    assert "head.scale" in net.state_dict()


def test_a_fine_tuning_head_scores_through_the_encoder_and_leaves_it_unchanged():
    from metashot.methods.finetune import FineTune

    torch.manual_seed(0)
    net = ProtoNet(make_backbone("conv4", (1, 28, 28), hidden=8)).eval()
    ep = episode()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    untuned = with_head(net, FineTune(steps=0)).evaluate(ep)
    cosine = with_head(net, PrototypeHead("cosine", temperature=0.1)).evaluate(ep)
    torch.testing.assert_close(untuned["loss"], cosine["loss"])
    tuned = with_head(net, FineTune(steps=3, lr=1e-2)).evaluate(ep)
    assert not torch.allclose(tuned["loss"], untuned["loss"])
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())
    with pytest.raises(ConfigError, match="finetune"):
        build_head("finetune", steps=-1)


def test_bad_head_and_norm_batch_arguments_are_config_errors():
    with pytest.raises(ConfigError, match="distance must be one of"):
        build_head("prototype", distance="cos")
    info = TaskInfo((1, 28, 28), 5, 5, train_classes=7)
    with pytest.raises(ValueError, match="norm_batch must be at least 2"):
        Baseline.build(info, backbone_args={"hidden": 8}, head="cl2n", norm_batch=1)
    net = Baseline.build(info, backbone_args={"hidden": 8}, head="cl2n", norm_batch=4)
    net.check_batch(8)
    with pytest.raises(ConfigError, match="batch of 6 examples does not split into groups of norm_batch 4"):
        net.check_batch(6)
    assert CL2N([0.5, 1.0]).mean.tolist() == [0.5, 1.0]


def test_norm_batch_normalises_interleaved_groups():
    torch.manual_seed(0)
    info = TaskInfo((1, 28, 28), 5, 5, train_classes=7)
    net = Baseline.build(info, backbone_args={"hidden": 8}, head="cl2n", norm_batch=2)
    batch = Examples(torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3]), torch.arange(4))
    loss, _ = net.loss(batch)
    torch.manual_seed(0)
    ref = Baseline.build(info, backbone_args={"hidden": 8}, head="cl2n")
    logits = torch.cat([ref.classifier(ref.encoder(batch.x[k::2])) for k in (0, 1)])
    torch.testing.assert_close(loss, F.cross_entropy(logits, batch.y[[0, 2, 1, 3]]))
