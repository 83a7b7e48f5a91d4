"""MAML.build: the paper's networks, MAML on every backbone (ResNet-12's meta-gradient, ANIL's head), the
presets of the variants, and the deprecated method args."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

from metashot import presets
from metashot.batches import TaskInfo
from metashot.config import Config
from metashot.errors import ConfigError
from metashot.methods import METHODS, build_method
from metashot.methods.maml import MAML, MAMLRegression
from metashot.nn.backbones import MLP, Conv4
from tests.methods.test_maml import _images, _meta_grad, _one_thread, _rel  # noqa: F401 (a fixture)

NEW_PRESETS = [
    *(f"mamlpp-omniglot-{w}w{k}s" for w in (5, 20) for k in (1, 5)),
    "anil-omniglot-5w1s", "anil-omniglot-20w1s", "metasgd-omniglot-5w1s", "metasgd-omniglot-20w1s",
]



def test_build_makes_the_papers_networks() -> None:
    m = METHODS["maml"].build(TaskInfo((1, 28, 28), 20, 20), inner_lr=0.1, inner_steps=5)
    assert type(m) is MAML and m.inner_lr == 0.1 and m.inner_steps == 5 and m.test_inner_steps == 5
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert len(convs) == 4 and all(c.stride == (2, 2) for c in convs)
    assert not any(isinstance(c, nn.MaxPool2d) for c in m.modules())
    assert not any(b.track_running_stats for b in m.modules() if isinstance(b, nn.BatchNorm2d))
    assert m.model(torch.rand(3, 1, 28, 28)).shape == (3, 20)
    assert m.model[-1].in_features == 64
    r = METHODS["maml"].build(TaskInfo((1,), 1, 1, regression=True), test_inner_steps=10)
    assert type(r) is MAMLRegression and r.metric == "mse" and not r.maximize and r.inner_lr == 0.01
    assert [m.out_features for m in r.modules() if isinstance(m, nn.Linear)] == [40, 40, 1]
    with pytest.raises(ValueError, match="train ways"):
        MAML.build(TaskInfo((1, 28, 28), 5, 20))


# -- backbones ---------------------------------------------------------------------------------------
SMALL_RESNET = {"widths": [4, 6, 8, 10]}  # ResNet-12's blocks, narrow: fast enough for finite differences


@pytest.mark.parametrize("kind", ["transductive", "inductive", "regression"])
def test_default_networks_keep_the_parameter_names_and_initialisation_of_saved_runs(kind: str) -> None:
    # the networks as MAML.build made them before backbones were a registry: checkpoints of those runs
    # must load, and a seed must give the same initial weights
    torch.manual_seed(0)
    if kind == "regression":
        info, kwargs = TaskInfo((1,), 1, 1, regression=True), {}
        old: nn.Module = MLP([1, 40, 40, 1])
    else:
        info, kwargs = TaskInfo((1, 28, 28), 5, 5), {"batch_norm": kind}
        conv = Conv4(1, 64, 64, strided=True, track_running_stats=kind == "inductive")
        old = nn.Sequential(*list(conv)[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 5))
    torch.manual_seed(0)
    new = MAML.build(info, **kwargs).model
    saved, built = old.state_dict(), new.state_dict()
    assert list(built) == list(saved)
    assert all(torch.equal(built[k], saved[k]) for k in saved)
    first, head = ("0", "4") if kind == "regression" else ("0.0", "6")
    assert list(built)[:2] == [f"{first}.weight", f"{first}.bias"]
    assert list(built)[-2:] == [f"{head}.weight", f"{head}.bias"]
    assert ("3.1.running_var" in built) == (kind == "inductive")


def test_resnet12_second_order_meta_gradient_matches_finite_differences() -> None:
    torch.manual_seed(0)
    info = TaskInfo((1, 16, 16), 2, 2)  # four 2x2 max-pools: 16 -> 1
    method = MAML.build(info, backbone="resnet12", backbone_args=SMALL_RESNET, inner_lr=0.5,
                        tasks="loop").double()
    first = MAML(method.model, inner_lr=0.5, first_order=True, tasks="loop")
    batch = _images(1, 2, 1, 1, size=16, dtype=torch.float64)  # 2-way 1-shot, 1 query per class
    fo = dict(zip([n for n, _ in method.named_parameters()], _meta_grad(first, batch).split(
        [p.numel() for p in method.parameters()])))
    _meta_grad(method, batch)
    named = dict(method.named_parameters())
    # a first conv, a shortcut, a batch-norm scale (meta-learned, not adapted), a last-block conv, the head
    for name in ["model.0.body.0.weight", "model.1.shortcut.0.weight", "model.2.body.4.weight",
                 "model.3.body.3.weight", "model.6.weight"]:
        p = named[name]
        at = (0,) * p.dim()
        eps = 1e-6
        values = []
        for sign in (1, -1):
            with torch.no_grad():
                p[at] += sign * eps
            values.append(method.loss(batch)[0].item())
            with torch.no_grad():
                p[at] -= sign * eps
        fd = (values[0] - values[1]) / (2 * eps)
        assert p.grad[at].item() == pytest.approx(fd, rel=1e-6), name
        assert abs(fo[name].view(p.shape)[at].item() - fd) > 1e-2 * abs(fd), name  # second order counts


def test_resnet12_vmap_and_loop_give_the_same_meta_gradient_with_batch_statistics() -> None:
    torch.manual_seed(0)
    method = MAML.build(TaskInfo((1, 16, 16), 2, 2), backbone="resnet12", backbone_args=SMALL_RESNET,
                        tasks="loop").double()
    batch = _images(2, 2, 1, 1, size=16, dtype=torch.float64)
    loop = _meta_grad(method, batch)
    method.tasks = "vmap"
    assert _rel(_meta_grad(method, batch), loop) < 1e-9


def test_resnet12_batch_norm_buffers_and_per_step_sets_go_through_functional_call() -> None:
    torch.manual_seed(0)
    info = TaskInfo((1, 16, 16), 2, 2)
    batch = _images(2, 2, 1, 1, size=16)
    transductive = MAML.build(info, backbone="resnet12", backbone_args=SMALL_RESNET)
    assert not any("running" in k for k in transductive.state_dict())
    # inductive: every block's batch-norm layers, shortcut ones included, keep running statistics
    inductive = MAML.build(info, backbone="resnet12", backbone_args=SMALL_RESNET, batch_norm="inductive")
    norms = [m for m in inductive.model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 16
    before = [m.running_mean.clone() for m in norms]
    inductive.loss(batch)[0].backward()
    assert all(not torch.equal(b, m.running_mean) for b, m in zip(before, norms))
    # MAML++'s per-step batch norm: a scale and shift per step for all 16 layers, all meta-learned
    mamlpp = MAML.build(info, backbone="resnet12", backbone_args=SMALL_RESNET, inner_steps=2,
                        per_step_bn=True, learned_lr="lslr")
    assert len(mamlpp.step_norm.replaced()) == 32
    mamlpp.loss(batch)[0].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in mamlpp.step_norm.parameters())


class _Body(nn.Module):
    """A user's body that is not a plain nn.Sequential: MAML keeps it whole, the head after it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.conv(x)).relu().mean((2, 3))


def body(input_shape: tuple[int, ...]) -> nn.Module:
    return _Body()


@pytest.mark.parametrize(("backbone", "args", "head"), [
    ("conv4", {"hidden": 8}, "5"),  # four blocks, flatten, head
    ("conv4-strided", {"hidden": 8}, "6"),
    ("resnet12", SMALL_RESNET, "6"),  # four blocks, pooling, flatten, head
    ("mlp", {"hidden": 8}, "5"),  # flatten, linear, relu, linear, relu, head
    ("tests.methods.test_maml_build:body", {}, "1"),
])
def test_anil_finds_the_head_on_every_backbone(backbone: str, args: dict, head: str) -> None:
    torch.manual_seed(0)
    method = MAML.build(TaskInfo((1, 16, 16), 3, 3), backbone=backbone, backbone_args=args,
                        inner_params="head", inner_lr=0.4)
    assert method.adapted == [f"{head}.weight", f"{head}.bias"]
    assert method.model[-1].out_features == 3
    assert not any(m.track_running_stats for m in method.modules() if isinstance(m, nn.BatchNorm2d))
    batch = _images(2, 3, 1, 2, size=16)
    method.loss(batch)[0].backward()
    assert all(p.grad is not None for p in method.parameters())


# -- presets -----------------------------------------------------------------------------------------------
def test_new_presets_describe_the_papers_recipes() -> None:
    for w in (5, 20):
        for k in (1, 5):
            cfg = presets.get(f"mamlpp-omniglot-{w}w{k}s")
            a = cfg.method_args
            assert cfg.schedule == "cosine" and cfg.lr == 1e-3 and cfg.meta_batch == 8
            assert a["inner_steps"] == a["test_inner_steps"] == 5 and a["inner_lr"] == 0.1
            assert a["learned_lr"] == "lslr" and a["per_step_bn"] and a["msl_steps"] == 10 * 500
            assert a["first_order_steps"] == 50 * 500 and (cfg.ways, cfg.shots) == (w, k)
    assert presets.get("anil-omniglot-5w1s").method_args["inner_params"] == "head"
    assert presets.get("metasgd-omniglot-5w1s").method_args["learned_lr"] == "metasgd"


@pytest.mark.parametrize("name", NEW_PRESETS)
def test_new_presets_build_and_take_a_step(name: str) -> None:
    torch.manual_seed(0)
    cfg = presets.get(name)
    method = METHODS[cfg.method].build(TaskInfo((1, 28, 28), 5, 5), **cfg.method_args)
    method.on_step(0)
    loss, metrics = method.loss(_images(2, 5, 1, 1))
    loss.backward()
    assert torch.isfinite(loss) and metrics["acc"].shape == (2,)
    assert all(p.grad is not None for p in method.meta_parameters())


# -- deprecated method args ------------------------------------------------------------------------------
def test_checkpoint_method_arg_of_saved_configs_loads_as_recompute(tmp_path: Path) -> None:
    cfg = presets.get("maml-omniglot-5w1s").replace(method_args={"inner_steps": 2, "checkpoint": True})
    cfg.save(tmp_path / "config.json")  # a run saved before the rename
    info = TaskInfo((1, 28, 28), 5, 5)
    with pytest.warns(DeprecationWarning, match="'checkpoint' is now 'recompute'"):
        method = build_method(Config.load(tmp_path / "config.json"), info)
    assert isinstance(method, MAML) and method.recompute and method.tasks == "loop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert build_method(cfg.replace(method_args={"recompute": True}), info).recompute
    both = cfg.replace(method_args={"checkpoint": True, "recompute": False})
    with pytest.raises(ConfigError, match="maml: 'checkpoint' is the old name of 'recompute'"):
        build_method(both, info)


def test_hidden_method_arg_still_sets_the_backbone_width() -> None:
    info = TaskInfo((1,), 1, 1, regression=True)
    with pytest.warns(DeprecationWarning, match=r"backbone_args=\{'hidden': ...\}"):
        old = MAML.build(info, hidden=8)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        new = MAML.build(info, backbone_args={"hidden": 8})
    for method in (old, new):
        assert [m.out_features for m in method.modules() if isinstance(m, nn.Linear)] == [8, 8, 1]
    with pytest.warns(DeprecationWarning):  # backbone_args win, as before
        both = MAML.build(info, hidden=8, backbone_args={"hidden": 5})
    assert [m.out_features for m in both.modules() if isinstance(m, nn.Linear)] == [5, 5, 1]
