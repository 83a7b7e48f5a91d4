"""MAML: the inner step, the meta-gradient (finite differences, first order, vmap against the loop),
batch-norm modes, and short training runs on sinusoids and real Omniglot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metashot import presets
from metashot.batches import Episode, TaskInfo
from metashot.config import Config
from metashot.methods.maml import MAML, VMAP_MAX_EXAMPLES, MAMLRegression
from metashot.nn.backbones import Conv4
from metashot.train import Trainer


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> object:
    """MAML's many small operations run best on one thread (and the budget is one core)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _images(b: int, ways: int, shots: int, queries: int, size: int = 28, seed: int = 0,
            dtype: torch.dtype = torch.float32) -> Episode:
    g = torch.Generator().manual_seed(seed)
    return Episode(
        torch.rand(b, ways * shots, 1, size, size, generator=g, dtype=dtype),
        torch.arange(ways).repeat_interleave(shots).expand(b, -1).contiguous(),
        torch.rand(b, ways * queries, 1, size, size, generator=g, dtype=dtype),
        torch.arange(ways).repeat_interleave(queries).expand(b, -1).contiguous(),
    )


def _small_conv(ways: int = 3, hidden: int = 6, smooth: bool = True) -> nn.Module:
    """A small strided Conv4 with batch norm in float64; ``smooth`` swaps ReLU for tanh, since at a
    ReLU kink the inner gradient, and so the meta-loss, jumps and finite differences mean nothing."""
    conv = Conv4(1, hidden, hidden, strided=True, track_running_stats=False)
    if smooth:
        for block in list(conv)[:-1]:
            block[2] = nn.Tanh()
    net = nn.Sequential(*list(conv)[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, ways))
    return net.double()


def _perturb(params: list[nn.Parameter], step: torch.Tensor) -> None:
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(params) + step, params)


def _meta_grad(method: MAML, batch: Episode) -> torch.Tensor:
    method.zero_grad(set_to_none=True)
    loss, _ = method.loss(batch)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in method.parameters()])


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# -- the inner step --------------------------------------------------------------------------------
def test_inner_step_matches_hand_computed_gradient_step() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    method = MAMLRegression(model, inner_lr=0.05)
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 1, dtype=torch.float64)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    for _ in range(2):  # MSE = mean (xw + b - y)^2: dW = 2/M r^T x, db = 2/M sum r
        r = x @ w.T + b - y
        w, b = w - 0.05 * 2 / 7 * r.T @ x, b - 0.05 * 2 / 7 * r.sum(0)
    fast = method.adapt(method.params(), x, y, steps=2, create_graph=False)
    torch.testing.assert_close(fast["weight"], w)
    torch.testing.assert_close(fast["bias"], b)
    # the module itself is untouched: adaptation is functional
    assert not torch.equal(model.weight, w)


def test_inner_step_cross_entropy_by_hand_and_norm_layers_kept() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3, track_running_stats=False)).double()
    method = MAML(model, inner_lr=0.3)
    assert method.adapted == ["0.weight", "0.bias"] and method.kept == ["1.weight", "1.bias"]
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1, 2])
    fast = method.adapt(method.params(), x, y, steps=1, create_graph=False)
    w = model[0].weight.detach().requires_grad_()
    b = model[0].bias.detach().requires_grad_()
    loss = F.cross_entropy(model[1](x @ w.T + b), y)
    gw, gb = torch.autograd.grad(loss, [w, b])
    torch.testing.assert_close(fast["0.weight"], w - 0.3 * gw)
    torch.testing.assert_close(fast["0.bias"], b - 0.3 * gb)
    assert fast["1.weight"] is method.params()["1.weight"]
    assert MAML(model, adapt_norm=True).adapted == [n for n, _ in model.named_parameters()]


# -- the meta-gradient -----------------------------------------------------------------------------
@pytest.mark.parametrize("tasks", ["loop", "vmap"])
def test_second_order_meta_gradient_matches_finite_differences(tasks: str) -> None:
    torch.manual_seed(0)
    method = MAML(_small_conv(), inner_lr=0.5, inner_steps=2, tasks=tasks)
    batch = _images(2, 3, 2, 2, size=16, dtype=torch.float64)
    grad = _meta_grad(method, batch)
    params = list(method.parameters())
    g = torch.Generator().manual_seed(1)
    first = MAML(method.model, inner_lr=0.5, inner_steps=2, first_order=True, tasks=tasks)
    fo = _meta_grad(first, batch)
    for _ in range(3):
        v = torch.randn(grad.numel(), generator=g, dtype=torch.float64)
        eps = 1e-7  # the meta-loss is strongly curved: a small step keeps central differences in tolerance
        values = []
        for sign in (1, -1):
            _perturb(params, sign * eps * v)
            values.append(method.loss(batch)[0].item())
            _perturb(params, -sign * eps * v)
        fd = (values[0] - values[1]) / (2 * eps)
        assert (grad @ v).item() == pytest.approx(fd, rel=1e-6, abs=1e-8)
        # the test tells the orders apart: first order misses the Hessian terms
        assert abs((fo @ v).item() - fd) > 1e-3 * abs(fd)


def test_first_order_is_second_order_without_the_hessian_terms() -> None:
    torch.manual_seed(0)
    alpha = 0.4
    model = _small_conv()
    batch = _images(1, 3, 2, 3, size=12, dtype=torch.float64)
    xs, ys, xq, yq = batch.support[0], batch.support_labels[0], batch.query[0], batch.query_labels[0]
    second = _meta_grad(MAML(model, alpha, 1), batch)
    first = _meta_grad(MAML(model, alpha, 1, first_order=True), batch)

    method = MAML(model, alpha, 1)
    names = list(method.params())
    adapted = [names.index(n) for n in method.adapted]
    # first order: the query gradient at the adapted parameters, w.r.t. the adapted parameters
    adapted_params = method.adapt(method.params(), xs, ys, 1, create_graph=False)
    fast = {n: p.detach().requires_grad_() for n, p in adapted_params.items()}
    g_query = torch.autograd.grad(F.cross_entropy(method.forward(fast, xq), yq), list(fast.values()))
    torch.testing.assert_close(first, torch.cat([g.flatten() for g in g_query]))
    # second order = first order - alpha * H[:, adapted] g_query[adapted], H the support loss's Hessian
    theta = {n: p.detach().requires_grad_() for n, p in method.params().items()}
    g_support = torch.autograd.grad(F.cross_entropy(method.forward(theta, xs), ys),
                                    [theta[n] for n in method.adapted], create_graph=True)
    dot = sum((gs * g_query[i]).sum() for gs, i in zip(g_support, adapted))
    hvp = torch.autograd.grad(dot, list(theta.values()))
    torch.testing.assert_close(second, first - alpha * torch.cat([h.flatten() for h in hvp]))


@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("adapt_norm", [False, True])
def test_vmap_and_loop_give_the_same_meta_gradient_on_conv4_with_batch_norm(
    first_order: bool, adapt_norm: bool
) -> None:
    # the paper's Omniglot network; vmap's second derivatives through the fused F.batch_norm are wrong
    # when the norm layers are adapted: the vmap path must not use it then
    torch.manual_seed(0)
    method = MAML.build(TaskInfo((1, 28, 28), 5, 5), inner_steps=2, test_inner_steps=3,
                        first_order=first_order, adapt_norm=adapt_norm).double()
    batch = _images(3, 5, 1, 2, dtype=torch.float64)
    method.tasks = "loop"
    loop = _meta_grad(method, batch)
    loop_eval = method.evaluate(batch)
    method.tasks = "vmap"
    vmap = _meta_grad(method, batch)
    assert _rel(vmap, loop) < 1e-9
    for k, v in method.evaluate(batch).items():
        torch.testing.assert_close(v, loop_eval[k])


@pytest.mark.parametrize(("kwargs", "plain"), [
    ({}, False), ({"adapt_norm": True}, True), ({"inner_params": "head"}, False),
    ({"inner_params": ["0.1"]}, True),  # the first batch-norm layer's scale and shift
])
def test_vmap_uses_plain_batch_norm_only_for_norm_layers_adapted_per_task(
    kwargs: dict, plain: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    import metashot.methods.batchnorm as batchnorm

    calls = []
    ops = batchnorm.plain_batch_norm
    monkeypatch.setattr(batchnorm, "plain_batch_norm", lambda *a, **k: calls.append(1) or ops(*a, **k))
    method = MAML.build(TaskInfo((1, 28, 28), 5, 5), tasks="vmap", **kwargs)
    method.loss(_images(2, 5, 1, 1))
    assert bool(calls) == plain


def test_per_task_backward_gives_the_same_loss_and_gradient() -> None:
    torch.manual_seed(0)
    method = MAML(_small_conv(), inner_lr=0.4, inner_steps=1)
    batch = _images(3, 3, 1, 2, size=12, dtype=torch.float64)
    eager = _meta_grad(method, batch)
    loss_eager = method.loss(batch)[0]
    method.per_task_backward = False
    graph = _meta_grad(method, batch)
    torch.testing.assert_close(eager, graph)
    torch.testing.assert_close(loss_eager, method.loss(batch)[0])


# -- batch norm, metrics -----------------------------------------------------------------------------
def test_batch_norm_modes_are_explicit() -> None:
    with pytest.raises(ValueError, match="track_running_stats=False"):
        MAML(nn.Sequential(Conv4(), nn.Linear(64, 5)))
    inductive = MAML(nn.Sequential(Conv4(), nn.Linear(64, 5)), batch_norm="inductive", tasks="auto")
    assert inductive.tasks == "loop"  # running statistics are updated in place: no vmap
    batch = _images(2, 5, 1, 2)
    before = inductive.model[0][0][1].running_mean.clone()
    inductive.loss(batch)[0].backward()
    assert not torch.equal(before, inductive.model[0][0][1].running_mean)
    inductive.eval()
    # in eval mode each query is normalised with the running statistics, independently of the others
    one = inductive.evaluate(Episode(batch.support[:1], batch.support_labels[:1], batch.query[:1, :1],
                                     batch.query_labels[:1, :1]))
    assert set(one) == {"acc", "loss", "acc_step0", "acc_step1"}
    built = MAML.build(TaskInfo((1, 28, 28), 5, 5), batch_norm="inductive")
    assert all(m.track_running_stats for m in built.modules() if isinstance(m, nn.BatchNorm2d))


def test_evaluate_reports_every_inner_step() -> None:
    torch.manual_seed(0)
    method = MAML.build(TaskInfo((1, 28, 28), 5, 5), inner_steps=1, test_inner_steps=3)
    batch = _images(2, 5, 1, 1)
    out = method.evaluate(batch)
    assert list(out)[0] == "acc" and {f"acc_step{s}" for s in range(4)} <= set(out)
    assert all(v.shape == (2,) for v in out.values())
    torch.testing.assert_close(out["acc"], out["acc_step3"])
    assert all(p.grad is None for p in method.parameters())  # evaluation leaves no gradients
    loss, metrics = method.loss(batch)
    assert loss.dim() == 0 and metrics["acc"].shape == (2,)


# -- short training runs -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sinusoid_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Trainer]:
    run = tmp_path_factory.mktemp("sinusoid")
    cfg = presets.get("maml-sinusoid").replace(
        steps=1_000, val_every=500, val_episodes=100, test_episodes=200
    )
    trainer = Trainer(cfg, run, progress=False)
    trainer.fit()
    return run, trainer


@pytest.mark.slow
def test_short_sinusoid_run_adapts(sinusoid_run: tuple[Path, Trainer]) -> None:
    run, trainer = sinusoid_run
    result = trainer.test()
    pre, one, ten = (result.stats[f"mse_step{s}"][0] for s in (0, 1, 10))
    # 1,000 of the paper's 70,000 meta-iterations: adaptation already removes most of the error
    assert result.metric == "mse" and result.mean == ten
    assert one < 0.6 * pre and ten < 0.5 * pre, result.table()


@pytest.mark.slow
def test_sinusoid_plot(sinusoid_run: tuple[Path, Trainer], tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from metashot.plot import plot_sinusoid

    plot_sinusoid(sinusoid_run[0], tmp_path / "sine.png", episode=3)
    assert (tmp_path / "sine.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_short_omniglot_run_beats_chance_by_far(omniglot_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = presets.get("maml-omniglot-5w1s").replace(
        data_dir=str(omniglot_dir), meta_batch=8, steps=200, val_every=200, val_episodes=40, test_episodes=200
    )
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.fit()
    result = trainer.test()
    # chance is 20%, the paper's 98.7% takes 60,000 meta-batches of 32: 200 of 8 must be far above chance
    assert result.mean >= 0.65, result.table()
    assert result.stats["acc_step0"][0] < 0.35 and result.stats["acc_step3"][0] == result.mean


def test_config_roundtrip_for_maml(tmp_path: Path) -> None:
    cfg = presets.get("maml-sinusoid")
    cfg.save(tmp_path / "config.json")
    assert Config.load(tmp_path / "config.json") == cfg


# -- tasks="auto": a rule, not a timing ---------------------------------------------------------------
def test_auto_picks_vmap_for_small_conv_tasks_and_models_without_convolutions_only() -> None:
    conv = MAML(_small_conv(), inner_lr=0.4, inner_steps=1)
    small = _images(2, 3, 1, 2, size=12)  # 3 + 6 examples per task
    assert conv._use_vmap(small)
    large = _images(2, 3, 4, 4, size=12)  # 12 + 12 > VMAP_MAX_EXAMPLES
    assert 12 + 12 > VMAP_MAX_EXAMPLES and not conv._use_vmap(large)
    mlp = MAML(nn.Sequential(nn.Flatten(), nn.Linear(144, 3)), inner_lr=0.4)
    assert mlp._use_vmap(large)
    assert not MAML(_small_conv(), tasks="loop")._use_vmap(small)
    assert MAML(_small_conv(), tasks="vmap")._use_vmap(large)


