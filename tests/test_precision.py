"""--precision bf16 on the CPU: ProtoNet and Matching Networks train under bfloat16 autocast to fp32's
losses within a stated tolerance (the same batch and initial weights) with float32 parameters, gradients
and optimizer state; second-order MAML stays float32 unless bf16-all asks; the trainer and the evaluator
apply it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from metashot.batches import Episode, TaskInfo
from metashot.config import Config
from metashot.evaluate import autocast
from metashot.methods import build_method
from metashot.train import Trainer

# bfloat16 keeps 8 bits of mantissa (relative rounding 2^-9). At the same weights a small Conv4's loss under
# autocast is within 5% of float32's (ProtoNet's squared distances, in the hundreds, round by about 1 in
# its logits: 3% of a loss of 0.5; Matching's cosines are within 0.3%); along three Adam steps, whose
# normalised steps amplify the gradients' rounding, the two runs' losses part by up to 10%
SAME_WEIGHTS_RTOL = 5e-2
RUN_RTOL = 0.1


def _episode(ways: int = 5, shots: int = 2, queries: int = 3, noise: float = 4.0) -> Episode:
    g = torch.Generator().manual_seed(0)
    pattern = torch.rand(ways, 1, 1, 28, 28, generator=g)
    support = (pattern + noise * torch.rand(ways, shots, 1, 28, 28, generator=g)).flatten(0, 1)
    query = (pattern + noise * torch.rand(ways, queries, 1, 28, 28, generator=g)).flatten(0, 1)
    labels = torch.arange(ways)
    return Episode(support[None], labels.repeat_interleave(shots)[None], query[None],
                   labels.repeat_interleave(queries)[None], ways)


def _losses(method: str, precision: str, steps: int = 3) -> tuple[list[float], list[float]]:
    """The training losses of ``steps`` Adam steps on one batch from seed 0's weights, and float32's loss
    at the same weights before each step; checks that the parameters, gradients and Adam's moments stay
    float32."""
    torch.manual_seed(0)
    cfg = Config(method=method, backbone_args={"hidden": 16}, precision=precision)
    model = build_method(cfg, TaskInfo((1, 28, 28), 5, 5))
    optimizer = cfg.make_optimizer(model.param_groups(cfg.lr))
    batch, losses, reference = _episode(), [], []
    for _ in range(steps):
        with torch.no_grad():
            reference.append(model.loss(batch)[0].item())
        with autocast(model, "cpu", precision):
            loss, _ = model.loss(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        assert all(p.dtype == p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)
    moments = [v for s in optimizer.state.values() for k, v in s.items() if k != "step"]
    assert moments and all(v.dtype == torch.float32 for v in moments)
    return losses, reference


@pytest.mark.parametrize("method", ["protonet", "matching"])
def test_metric_methods_train_under_bf16_to_fp32s_losses(method: str) -> None:
    half, at_same_weights = _losses(method, "bf16")
    assert half == pytest.approx(at_same_weights, rel=SAME_WEIGHTS_RTOL) and half != at_same_weights
    full, _ = _losses(method, "fp32")
    assert half == pytest.approx(full, rel=RUN_RTOL)
    assert half[-1] < half[0] and full[-1] < full[0]  # both train


def test_autocast_runs_where_the_method_allows_it() -> None:
    info, small = TaskInfo((1, 28, 28), 5, 5), {"backbone_args": {"hidden": 8}}
    maml = build_method(Config(method="maml", **small), info)
    first, vmapped, auto = (
        build_method(Config(method="maml", method_args={"first_order": True, "tasks": tasks}, **small), info)
        for tasks in ("loop", "vmap", "auto"))
    proto = build_method(Config(**small), info)
    assert not vmapped.autocast_safe()  # torch's vmap of batch norm's backward fails under autocast
    labels = torch.arange(5).repeat(2, 1)
    episode = Episode(torch.rand(2, 5, 1, 28, 28), labels, torch.rand(2, 5, 1, 28, 28), labels, num_ways=5)
    with autocast(auto, "cpu", "bf16"):
        assert auto.autocast_safe() and not auto._use_vmap(episode)  # tasks auto: looped under autocast
        loss, _ = auto.loss(episode)
    loss.backward()
    assert auto._use_vmap(episode) and torch.isfinite(loss)
    assert proto.autocast_safe() and first.autocast_safe() and not maml.autocast_safe()
    for method, precision, on in [(proto, "bf16", True), (proto, "fp32", False), (proto, "tf32", False),
                                  (maml, "bf16", False), (maml, "bf16-all", True), (first, "bf16", True)]:
        with autocast(method, "cpu", precision):
            assert torch.is_autocast_enabled("cpu") == on, (type(method).__name__, precision)


SINE = dict(method="maml", task="sinusoid", meta_batch=4, steps=3, val_every=3, val_episodes=4,
            test_episodes=4, backbone_args={"hidden": 16})


def _run(tmp_path: Path, name: str, **changes: object) -> Trainer:
    trainer = Trainer(Config(**{**SINE, **changes}), tmp_path / name, progress=False)
    trainer.fit()
    trainer.test()
    return trainer


def _weights(trainer: Trainer) -> list[torch.Tensor]:
    return [p.detach().clone() for p in trainer.method.parameters()]


def test_second_order_maml_stays_fp32_under_bf16_unless_bf16_all(tmp_path: Path) -> None:
    """Second order: --precision bf16 trains exactly as fp32 (no autocast); bf16-all autocasts it (other
    losses, close); first order in the task loop autocasts under bf16."""
    full, half, forced = (_run(tmp_path, p, precision=p) for p in ("fp32", "bf16", "bf16-all"))
    assert half.progress.rows == [{**r, "minutes": h["minutes"]} for r, h in zip(full.progress.rows,
                                                                                  half.progress.rows)]
    assert all(torch.equal(a, b) for a, b in zip(_weights(full), _weights(half)))
    assert all(p.dtype == torch.float32 for p in forced.method.parameters())
    loss, forced_loss = full.progress.rows[-1]["train_loss"], forced.progress.rows[-1]["train_loss"]
    assert forced_loss != loss and forced_loss == pytest.approx(loss, rel=0.1)
    fo = {"method_args": {"first_order": True, "tasks": "loop"}}
    fo_full, fo_half = (_run(tmp_path, f"fo-{p}", precision=p, **fo) for p in ("fp32", "bf16"))
    assert fo_half.progress.rows[-1]["train_loss"] != fo_full.progress.rows[-1]["train_loss"]
    assert fo_half.progress.rows[-1]["train_loss"] == pytest.approx(fo_full.progress.rows[-1]["train_loss"],
                                                                    rel=0.1)


def test_the_trainer_and_evaluator_run_protonet_under_bf16(patterns: Path, tmp_path: Path) -> None:
    common = dict(method="protonet", task="folder", data_dir=str(patterns), ways=3, train_ways=3, shots=2,
                  queries=2, train_queries=2, steps=3, val_every=3, val_episodes=4, test_episodes=4,
                  backbone_args={"hidden": 16}, task_args={"image_size": 28})
    full, half = (_run(tmp_path, p, **{**common, "precision": p}) for p in ("fp32", "bf16"))
    a, b = full.progress.rows[-1], half.progress.rows[-1]
    assert b["train_loss"] != a["train_loss"] and b["train_loss"] == pytest.approx(a["train_loss"],
                                                                                   rel=RUN_RTOL)
    assert b["val_metric"] == pytest.approx(a["val_metric"], abs=0.25)  # 4 episodes of 6 queries


def test_a_head_that_trains_at_test_time_learns_under_bf16() -> None:
    from metashot.methods import build_head

    g = torch.Generator().manual_seed(0)
    centres = 3 * torch.randn(5, 16, generator=g)
    labels = torch.arange(5).repeat(2)[None]
    support = centres[labels] + 0.1 * torch.randn(1, 10, 16, generator=g)
    query = centres[torch.arange(5)][None] + 0.1 * torch.randn(1, 5, 16, generator=g)
    proto = build_head("prototype")  # any module: bf16-all asks no method
    for name in ("linear", "cosine"):
        head = build_head(name)
        with autocast(proto, "cpu", "bf16-all"):  # a cached bf16 copy of its weights would never move
            acc = (head(query, support, labels, 5).argmax(-1) == torch.arange(5)).float().mean()
        assert acc == 1.0, name
