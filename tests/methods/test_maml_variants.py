"""MAML's variants, each against its defining change: MAML++ (multi-step loss, derivative-order annealing,
per-step batch norm, learned per-layer per-step rates), ANIL, Meta-SGD and the recomputed (gradient-
checkpointed) inner loop, and their state in checkpoints; their presets are in test_maml_build.py."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import Episode, TaskInfo
from metashot.methods.inner_loop import msl_weights
from metashot.methods.maml import MAML, MAMLRegression
from metashot.nn.backbones import Conv4
from tests.methods.test_maml import _images, _one_thread  # noqa: F401 (a fixture)


def _net(ways: int = 3, hidden: int = 6, inductive: bool = False) -> nn.Module:
    """A small strided Conv4 with batch norm and tanh (smooth, for finite differences), float64."""
    conv = Conv4(1, hidden, hidden, strided=True, track_running_stats=inductive)
    for block in list(conv)[:-1]:
        block[2] = nn.Tanh()
    head = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(hidden, ways)]
    return nn.Sequential(*list(conv)[:-1], *head).double()


def _batch(b: int = 2, size: int = 12) -> Episode:
    return _images(b, 3, 2, 2, size=size, dtype=torch.float64)


def _grad(method: MAML, batch: Episode) -> torch.Tensor:
    method.zero_grad(set_to_none=True)
    method.loss(batch)[0].backward()
    return torch.cat([p.grad.flatten() for p in method.meta_parameters()])


def _shift(params: list[nn.Parameter], step: torch.Tensor) -> None:
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(torch.nn.utils.parameters_to_vector(params) + step, params)


def _fd(method: MAML, batch: Episode, v: torch.Tensor, eps: float = 1e-7) -> float:
    """Central difference of the meta-loss along v (over ``meta_parameters``)."""
    params = method.meta_parameters()
    values = []
    for sign in (1, -1):
        _shift(params, sign * eps * v)
        values.append(method.loss(batch)[0].item())
        _shift(params, -sign * eps * v)
    return (values[0] - values[1]) / (2 * eps)


def _check_fd(method: MAML, batch: Episode, mask: torch.Tensor | None = None, seed: int = 1) -> None:
    """The meta-gradient against finite differences along random directions (within ``mask``)."""
    grad = _grad(method, batch)
    g = torch.Generator().manual_seed(seed)
    for _ in range(2):
        v = torch.randn(grad.numel(), generator=g, dtype=torch.float64)
        if mask is not None:
            v = v * mask
        assert (grad @ v).item() == pytest.approx(_fd(method, batch, v), rel=1e-6, abs=1e-9)


def _mask(method: MAML, chosen: list[nn.Parameter]) -> torch.Tensor:
    ids = {id(p) for p in chosen}
    return torch.cat([torch.full((p.numel(),), float(id(p) in ids), dtype=torch.float64)
                      for p in method.meta_parameters()])


# -- MAML++: the multi-step loss -----------------------------------------------------------------------
def test_msl_weights_follow_the_authors_schedule_per_optimizer_step() -> None:
    # S = 5 steps annealed over T = 5,000 optimizer steps (10 epochs of 500): non-final weights
    # 1/5 - t / 25,000 down to 0.03 / 5 = 0.006, the last 1/5 + 4 t / 25,000 up to 1 - 4 * 0.006 = 0.976
    assert msl_weights(0, 5, 5_000) == pytest.approx([0.2] * 5)
    assert msl_weights(1_000, 5, 5_000) == pytest.approx([0.16] * 4 + [0.36])
    assert msl_weights(2_500, 5, 5_000) == pytest.approx([0.1] * 4 + [0.6])
    assert msl_weights(4_900, 5, 5_000) == pytest.approx([0.006] * 4 + [0.976])
    for t in (0, 1_234, 4_849, 4_851, 4_999):
        assert sum(msl_weights(t, 5, 5_000)) == pytest.approx(1.0)
    assert msl_weights(5_000, 5, 5_000) is None  # from then on the last step's loss alone
    assert msl_weights(0, 5, 0) is None  # off
    assert msl_weights(10, 1, 100) == [1.0]


@pytest.mark.parametrize("tasks", ["loop", "vmap"])
def test_msl_loss_is_the_weighted_sum_of_the_per_step_query_losses(tasks: str) -> None:
    torch.manual_seed(0)
    method = MAML(_net(), inner_lr=0.5, inner_steps=3, msl_steps=100, tasks=tasks)
    batch = _batch()
    preds = method.step_predictions(batch, 3)  # [B, 4, Q, ways]: before adaptation, after steps 1..3
    per_step = torch.stack([
        torch.stack([F.cross_entropy(preds[i, s], batch.query_labels[i]) for s in range(1, 4)])
        for i in range(2)
    ])  # [B, 3]
    for t in (0, 40, 99):
        method.on_step(t)
        w = torch.tensor(msl_weights(t, 3, 100), dtype=torch.float64)
        torch.testing.assert_close(method.loss(batch)[0], (per_step @ w).mean())
    method.on_step(100)
    torch.testing.assert_close(method.loss(batch)[0], per_step[:, -1].mean())


# -- MAML++: derivative-order annealing ------------------------------------------------------------------
@pytest.mark.parametrize("tasks", ["loop", "vmap"])
def test_first_order_before_the_switch_second_order_after(tasks: str) -> None:
    torch.manual_seed(0)
    model, batch = _net(), _batch()
    annealed = MAML(model, 0.5, 2, first_order_steps=10, tasks=tasks)
    first = _grad(MAML(model, 0.5, 2, first_order=True, tasks=tasks), batch)
    second = _grad(MAML(model, 0.5, 2, tasks=tasks), batch)
    assert (first - second).norm() > 1e-3 * second.norm()
    for step, expected in ((0, first), (9, first), (10, second), (500, second)):
        annealed.on_step(step)
        torch.testing.assert_close(_grad(annealed, batch), expected, rtol=1e-10, atol=1e-12)


# -- MAML++: per-step batch norm -------------------------------------------------------------------------
@pytest.mark.parametrize("tasks", ["loop", "vmap"])
def test_per_step_bn_set_k_changes_only_the_outputs_after_step_k(tasks: str) -> None:
    torch.manual_seed(0)
    method = MAML(_net(), inner_lr=0.5, inner_steps=3, per_step_bn=True, tasks=tasks)
    assert method.step_norm is not None and method.step_norm.weight_0.shape == (3, 6)
    batch = _batch()
    before = method.step_predictions(batch)  # [B, 4, Q, ways]: at theta_0 .. theta_3
    with torch.no_grad():
        method.model[1][1].weight.add_(1.0)  # the model's own scale is replaced: no effect
    torch.testing.assert_close(method.step_predictions(batch), before, rtol=0, atol=0)
    for k in (1, 2):
        with torch.no_grad():
            method.step_norm.weight_1[k].mul_(1.5)  # the second norm layer's scale at inner step k
        after = method.step_predictions(batch)
        # step k's set normalises the support at theta_k and the query at theta_{k+1}
        torch.testing.assert_close(after[:, : k + 1], before[:, : k + 1], rtol=0, atol=0)
        assert ((after[:, k + 1:] - before[:, k + 1:]).abs().amax(dim=(2, 3)) > 1e-6).all()
        before = after
    with torch.no_grad():
        method.step_norm.bias_0[0].add_(0.3)  # set 0 also normalises the query before adaptation
    assert ((method.step_predictions(batch) - before).abs().amax(dim=(2, 3)) > 1e-6).all()


def test_per_step_running_statistics_are_updated_per_step_in_inductive_mode() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    method = MAML(model, 0.3, inner_steps=2, test_inner_steps=3, batch_norm="inductive", per_step_bn=True)
    g = torch.Generator().manual_seed(0)
    xs, xq = (torch.randn(1, 6, 4, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(2))
    y = torch.tensor([[0, 1, 2, 0, 1, 2]])
    batch = Episode(xs, y, xq, y)
    method.loss(batch)[0].backward()
    norm = method.step_norm
    assert norm is not None
    # the norm layer sees the inputs themselves: set 0 normalised the support at step 0; set 1 the
    # support at step 1, then the query after it; set 2 (test step 3 only) nothing yet
    m = 0.1
    torch.testing.assert_close(norm.running_mean_0[0], m * xs[0].mean(0))
    torch.testing.assert_close(norm.running_mean_0[1], (1 - m) * m * xs[0].mean(0) + m * xq[0].mean(0))
    torch.testing.assert_close(norm.running_mean_0[2], torch.zeros(4, dtype=torch.float64))
    torch.testing.assert_close(norm.running_var_0[0], (1 - m) + m * xs[0].var(0))
    assert norm.num_batches_tracked_0.tolist() == [1, 2, 0]
    assert not model[0].running_mean.any() and model[0].num_batches_tracked.item() == 0
    # in eval mode the query before adaptation is normalised with set 0's statistics and scale
    with torch.no_grad():
        norm.weight_0.copy_(torch.rand(3, 4, generator=g, dtype=torch.float64))
    method.eval()
    stats = norm.running_mean_0.clone()
    pred = method.step_predictions(batch)[0, 0]
    bn = (xq[0] - norm.running_mean_0[0]) / torch.sqrt(norm.running_var_0[0] + 1e-5) * norm.weight_0[0]
    torch.testing.assert_close(pred, model[1](bn + norm.bias_0[0]))
    torch.testing.assert_close(norm.running_mean_0, stats, rtol=0, atol=0)  # eval updates nothing


def test_per_step_bn_refuses_what_it_cannot_do() -> None:
    with pytest.raises(ValueError, match="needs batch-norm layers"):
        MAML(nn.Linear(3, 2), per_step_bn=True)
    with pytest.raises(ValueError, match="per-step"):
        MAML(_net(), per_step_bn=True, adapt_norm=True)


# -- MAML++: learned per-layer per-step rates; Meta-SGD --------------------------------------------------
def test_lslr_steps_each_tensor_with_its_rate_at_each_step() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    method = MAMLRegression(model, inner_lr=0.05, inner_steps=2, learned_lr="lslr")
    assert method.inner_lrs is not None and [r.tolist() for r in method.inner_lrs] == [[0.05, 0.05]] * 2
    with torch.no_grad():
        method.inner_lrs[0].copy_(torch.tensor([0.1, 0.2]))  # weight, steps 1 and 2
        method.inner_lrs[1].copy_(torch.tensor([0.3, 0.05]))  # bias
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 1, dtype=torch.float64)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    for aw, ab in ((0.1, 0.3), (0.2, 0.05)):  # MSE: dW = 2/M r^T x, db = 2/M sum r
        r = x @ w.T + b - y
        w, b = w - aw * 2 / 7 * r.T @ x, b - ab * 2 / 7 * r.sum(0)
    fast = method.adapt(method.params(), x, y, steps=2, create_graph=False)
    torch.testing.assert_close(fast["weight"], w)
    torch.testing.assert_close(fast["bias"], b)


def test_metasgd_steps_each_element_with_its_own_rate() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    method = MAMLRegression(model, inner_lr=0.05, inner_steps=2, learned_lr="metasgd")
    assert method.inner_lrs is not None
    assert [r.shape for r in method.inner_lrs] == [model.weight.shape, model.bias.shape]
    assert all((r == 0.05).all() for r in method.inner_lrs)
    with torch.no_grad():
        for r in method.inner_lrs:
            r.uniform_(0.01, 0.3)
    aw, ab = (r.detach() for r in method.inner_lrs)
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 1, dtype=torch.float64)
    w, b = model.weight.detach().clone(), model.bias.detach().clone()
    for _ in range(2):  # the same elementwise rates at every step
        r = x @ w.T + b - y
        w, b = w - aw * (2 / 7 * r.T @ x), b - ab * (2 / 7 * r.sum(0))
    fast = method.adapt(method.params(), x, y, steps=2, create_graph=False)
    torch.testing.assert_close(fast["weight"], w)
    torch.testing.assert_close(fast["bias"], b)


@pytest.mark.parametrize("learned_lr", ["lslr", "metasgd"])
@pytest.mark.parametrize("tasks", ["loop", "vmap"])
def test_learned_rates_meta_gradient_matches_finite_differences(learned_lr: str, tasks: str) -> None:
    torch.manual_seed(0)
    method = MAML(_net(), inner_lr=0.4, inner_steps=2, learned_lr=learned_lr, tasks=tasks)
    assert method.inner_lrs is not None
    with torch.no_grad():  # distinct rates, so that a mix-up of steps or tensors shows
        for r in method.inner_lrs:
            r.uniform_(0.2, 0.6)
    batch = _batch()
    _check_fd(method, batch, _mask(method, list(method.inner_lrs)))
    assert all(r.grad is not None and r.grad.abs().sum() > 0 for r in method.inner_lrs)


# -- MAML++ all together ---------------------------------------------------------------------------------
@pytest.mark.parametrize("tasks", ["loop", "vmap"])
def test_mamlpp_meta_gradient_matches_finite_differences(tasks: str) -> None:
    torch.manual_seed(0)
    method = MAML(_net(), inner_lr=0.4, inner_steps=3, learned_lr="lslr", per_step_bn=True, msl_steps=50,
                  tasks=tasks)
    with torch.no_grad():
        for p in method.step_norm.parameters():
            p.add_(0.2 * torch.randn_like(p))
    method.on_step(20)
    batch = _batch()
    _check_fd(method, batch)
    _check_fd(method, batch, _mask(method, list(method.step_norm.parameters())), seed=2)


def test_mamlpp_loop_and_vmap_give_the_same_meta_gradient() -> None:
    torch.manual_seed(0)
    method = MAML(_net(), inner_lr=0.4, inner_steps=3, learned_lr="lslr", per_step_bn=True, msl_steps=50,
                  tasks="loop")
    method.on_step(20)
    batch = _batch(3)
    loop = _grad(method, batch)
    method.tasks = "vmap"
    vmap = _grad(method, batch)
    assert ((loop - vmap).norm() / loop.norm()).item() < 1e-9


# -- ANIL ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("tasks", ["loop", "vmap"])
def test_anil_adapts_only_the_head_and_its_meta_gradient_matches_finite_differences(tasks: str) -> None:
    torch.manual_seed(0)
    method = MAML(_net(), inner_lr=0.5, inner_steps=2, inner_params="head", tasks=tasks)
    assert method.adapted == ["6.weight", "6.bias"]
    assert MAML(_net(), inner_params=["6"]).adapted == method.adapted
    batch = _batch()
    params = method.params()
    fast = method.adapt(params, batch.support[0], batch.support_labels[0], 2, create_graph=False)
    for n in method.kept:
        assert fast[n] is params[n]  # the body gets no inner-loop update
    for n in method.adapted:
        assert (fast[n] - params[n]).abs().max() > 1e-4
    _check_fd(method, batch)
    body = [p for n, p in method.model.named_parameters() if n in method.kept]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in body)  # outer gradients only


def test_inner_params_selection_errors() -> None:
    with pytest.raises(ValueError, match="no"):
        MAML(nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), inner_params="head")
    with pytest.raises(ValueError, match="selects none"):
        MAML(_net(), inner_params=["classifier"])
    with pytest.raises(ValueError, match="list of prefixes"):
        MAML(_net(), inner_params="6")


# -- gradient-checkpointed inner loop ---------------------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 3, 10])
def test_checkpointed_inner_loop_gives_the_same_second_order_meta_gradient(steps: int) -> None:
    torch.manual_seed(0)
    model, batch = _net(), _batch(size=8)
    plain = _grad(MAML(model, 0.3, steps), batch)
    checkpointed = MAML(model, 0.3, steps, recompute=True)
    torch.testing.assert_close(_grad(checkpointed, batch), plain, rtol=1e-6, atol=1e-10)
    first = _grad(MAML(model, 0.3, steps, first_order=True), batch)
    assert (first - plain).norm() > 1e-3 * plain.norm()  # the check tells second order from first


def test_checkpointing_with_every_mamlpp_option_and_running_statistics() -> None:
    torch.manual_seed(0)
    model, batch = _net(inductive=True), _batch(size=8)
    kwargs = dict(inner_steps=3, learned_lr="lslr", per_step_bn=True, msl_steps=50, batch_norm="inductive")
    plain, checkpointed = MAML(model, 0.3, **kwargs), MAML(model, 0.3, recompute=True, **kwargs)
    plain.on_step(10)
    checkpointed.on_step(10)
    torch.testing.assert_close(_grad(checkpointed, batch), _grad(plain, batch), rtol=1e-6, atol=1e-10)
    # the backward's recomputation does not count batch statistics again
    for (n, a), b in zip(plain.step_norm.named_buffers(), checkpointed.step_norm.buffers()):
        torch.testing.assert_close(b, a, msg=n)
    with pytest.raises(ValueError, match="tasks='loop'"):
        MAML(_net(), recompute=True, tasks="vmap")
    assert MAML(_net(), recompute=True).tasks == "loop"


class _Held:
    """A tensor saved for backward, counted while the graph holds it."""

    live = 0

    def __init__(self, t: torch.Tensor) -> None:
        self.t, self.n = t, t.untyped_storage().nbytes()
        _Held.live += self.n

    def __del__(self) -> None:
        _Held.live -= self.n


def _saved_bytes(method: MAML, batch: Episode) -> int:
    """Bytes the meta-loss's graph holds for its backward pass."""
    _Held.live = 0
    with torch.autograd.graph.saved_tensors_hooks(_Held, lambda h: h.t):
        loss = method.loss(batch)[0]
    held = _Held.live
    loss.backward()
    return held


def test_checkpointed_inner_loop_memory_does_not_grow_with_activations() -> None:
    torch.manual_seed(0)
    conv = Conv4(1, 16, 16, strided=True, track_running_stats=False)
    model = nn.Sequential(*list(conv)[:-1], nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5))
    batch = _images(1, 5, 1, 1)

    def growth(checkpoint: bool) -> tuple[int, int]:
        one, ten = (_saved_bytes(MAML(model, 0.1, s, tasks="loop", recompute=checkpoint,
                                      per_task_backward=False), batch) for s in (1, 10))
        return one, ten - one

    plain_one, plain_growth = growth(False)
    ckpt_one, ckpt_growth = growth(True)
    # per inner step the recomputed loop keeps the step's input parameters instead of its second-order
    # graph, which is over ten times larger here
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert ckpt_growth <= 9 * 1.5 * params < 0.1 * plain_growth
    assert ckpt_one < plain_one


# -- state -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("learned_lr", ["lslr", "metasgd"])
def test_learned_rates_and_per_step_norm_round_trip_through_the_state_dict(learned_lr: str) -> None:
    torch.manual_seed(0)
    info = TaskInfo((1, 28, 28), 5, 5)
    kwargs = dict(inner_steps=2, test_inner_steps=3, learned_lr=learned_lr, per_step_bn=True,
                  batch_norm="inductive")
    method = MAML.build(info, **kwargs)
    with torch.no_grad():
        for p in [*method.inner_lrs, *method.step_norm.parameters()]:
            p.add_(0.1 * torch.randn_like(p))
    method.loss(_images(2, 5, 1, 1))[0].backward()  # running statistics per step
    buffer = io.BytesIO()
    torch.save(method.state_dict(), buffer)
    state = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert {"inner_lrs.0", "step_norm.weight_0", "step_norm.bias_3", "step_norm.running_mean_0",
            "step_norm.running_var_3", "step_norm.num_batches_tracked_0"} <= set(state)
    assert state["step_norm.weight_0"].shape == (3, 64)
    fresh = MAML.build(info, **kwargs)
    fresh.load_state_dict(state)
    for (n, a), b in zip(method.state_dict().items(), fresh.state_dict().values()):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=n)
    method.eval()
    fresh.eval()
    batch = _images(2, 5, 1, 2, seed=1)
    torch.testing.assert_close(fresh.step_predictions(batch), method.step_predictions(batch))
