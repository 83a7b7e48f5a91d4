"""What only a CUDA device can check (marked ``cuda``: skipped with the reason where torch sees none):
MAML's vmap and loop meta-gradients agree there, every method's loss and gradients match the CPU's, a
training step of every method makes no synchronizing CUDA call, and the recomputed inner loop replays
the CUDA generator's dropout masks. The same checks run in benchmarks/gpu_check.py's stages."""

from __future__ import annotations

import pytest
import torch

from benchmarks.gpu_check import _step_under_error_mode, loss_and_grads, vmap_loop_gap
from benchmarks.sync_census import CASES, census
from metashot.methods.maml import MAML
from tests.methods.test_inner_loop_rng import _dropout_net, _episodes, _meta_grad

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float64, 1e-9), (torch.float32, 1e-3)])
@pytest.mark.parametrize("first_order", [False, True])
@pytest.mark.parametrize("adapt_norm", [False, True])
def test_vmap_and_loop_meta_gradients_agree_on_cuda(
    dtype: torch.dtype, bound: float, first_order: bool, adapt_norm: bool
) -> None:
    # cuDNN's batch norm under vmap against the loop, and both against the CPU's float64 loop (TF32 off)
    gaps = vmap_loop_gap("cuda", dtype, first_order, adapt_norm, allow_tf32=False)
    assert gaps["vmap_vs_loop"] < bound and gaps["loop_vs_cpu64"] < bound, gaps


@pytest.mark.parametrize("name", list(CASES))
def test_cpu_and_cuda_give_the_same_loss_and_gradients(name: str) -> None:
    (cpu_loss, cpu_grad), (cuda_loss, cuda_grad) = (loss_and_grads(name, d, torch.float64)
                                                    for d in ("cpu", "cuda"))
    assert cuda_loss == pytest.approx(cpu_loss, rel=1e-8)
    torch.testing.assert_close(cuda_grad, cpu_grad, rtol=1e-7, atol=1e-10)


@pytest.mark.parametrize("name", list(CASES))
def test_a_training_step_makes_no_synchronizing_cuda_call(name: str) -> None:
    row = census(name, "cuda")
    assert row["reads"] == 0, row["where"]
    assert _step_under_error_mode(name, torch.device("cuda")) == "ok"


def test_recomputed_inner_loop_replays_the_cuda_generators_masks() -> None:
    torch.manual_seed(1)
    model, batch = _dropout_net().train().cuda(), _episodes().to("cuda")
    kwargs = dict(inner_steps=3, tasks="loop")
    plain, _ = _meta_grad(MAML(model, 0.3, **kwargs), batch)  # from seed 0, the CUDA generator's too
    after_plain = torch.cuda.get_rng_state()
    recomputed, _ = _meta_grad(MAML(model, 0.3, recompute=True, **kwargs), batch)
    torch.testing.assert_close(recomputed, plain, rtol=1e-12, atol=1e-14)
    assert torch.equal(torch.cuda.get_rng_state(), after_plain)
