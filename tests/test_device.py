"""The device side on a CPU: --device auto resolved from the GPU count and the local rank (a pure function,
and torch's counts faked), the world's device and backend, the stop flags' device and their late read,
the stated numerics, Adam's step counters after a resume, the CUDA RNG in checkpoints, GPU memory in the
rows, and plot-sinusoid --device. Tests that need CUDA are marked ``cuda`` (skipped without it)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from metashot import cli, distributed
from metashot.config import Config
from metashot.devices import check_device, local_placement, numerics, pick_device
from metashot.distributed import World
from metashot.errors import ConfigError
from metashot.evaluate import Result
from metashot.runs import RunFolder, load_checkpoint
from metashot.train import Trainer


@pytest.mark.parametrize(("name", "gpus", "mps", "local_rank", "local_size", "device"), [
    ("auto", 0, False, 0, 1, "cpu"),
    ("auto", 0, True, 0, 1, "mps"),
    ("auto", 2, True, 0, 1, "cuda"),
    ("cuda:1", 2, False, 0, 1, "cuda:1"),
    ("auto", 4, False, 2, 4, "cuda:2"),  # torchrun --nproc-per-node 4 on a machine of 4 GPUs
    ("cuda:3", 4, False, 1, 2, "cuda:1"),  # a rank takes its own GPU, whatever index was given
    ("auto", 1, False, 3, 4, "cuda:0"),  # SLURM --gpus-per-task=1: each rank sees only its own
    ("cpu", 8, False, 1, 2, "cpu"),
    ("auto", 0, False, 1, 2, "cpu"),
])
def test_pick_device_by_the_counts(name: str, gpus: int, mps: bool, local_rank: int, local_size: int,
                                   device: str) -> None:
    assert pick_device(name, gpus, mps, local_rank, local_size) == device


@pytest.mark.parametrize(("name", "gpus", "mps", "local_rank", "local_size", "message"), [
    ("cuda", 0, False, 0, 1, "--device cuda: this machine has 0 CUDA device(s); use --device auto or cpu"),
    ("cuda:2", 2, False, 0, 1, "--device cuda:2: this machine has 2 CUDA device(s)"),
    ("cuda", 0, False, 1, 2, "--device cuda: this machine has 0 CUDA device(s)"),
    ("auto", 2, False, 0, 4, "--device auto: 4 processes on this machine but it shows 2 GPUs; start at "
                             "most 2 per machine (torchrun --nproc-per-node 2) or show each process one GPU"),
    ("mps", 0, False, 0, 1, "--device mps: MPS is not available here; use --device auto or cpu"),
])
def test_pick_device_refuses_what_the_machine_lacks(name: str, gpus: int, mps: bool, local_rank: int,
                                                    local_size: int, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        pick_device(name, gpus, mps, local_rank, local_size)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def _gpus(monkeypatch: pytest.MonkeyPatch, count: int) -> list[Any]:
    """torch shows ``count`` GPUs; returns the devices set_device is given."""
    chosen: list[Any] = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    return chosen


def test_check_device_reads_torchs_counts(monkeypatch: pytest.MonkeyPatch) -> None:
    assert check_device("auto") == torch.device("cpu")  # this machine: no GPU (MPS is not on Linux)
    _gpus(monkeypatch, 2)
    assert check_device("auto") == torch.device("cuda")
    assert check_device("auto", 1, 2) == torch.device("cuda", 1)
    with pytest.raises(ConfigError, match=r"^--device 'toaster' is not a device; expected cpu, cuda, "
                       r"cuda:N or mps, or auto \(the default\)$"):
        check_device("toaster")


def _torchrun_env(monkeypatch: pytest.MonkeyPatch, local_rank: int, local_size: int, **more: str) -> None:
    env = {"WORLD_SIZE": str(2 * local_size), "RANK": str(local_rank), "LOCAL_RANK": str(local_rank),
           "LOCAL_WORLD_SIZE": str(local_size), **more}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setattr(distributed.dist, "is_initialized", lambda: True)  # no group is started


def test_a_rank_that_sees_one_gpu_sets_cuda_0(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = _gpus(monkeypatch, 1)
    _torchrun_env(monkeypatch, 3, 4)
    world = World.from_env("auto")
    assert world.home == torch.device("cuda", 0) and chosen == [torch.device("cuda", 0)]
    assert world.device("auto") == world.device("cuda") == torch.device("cuda", 0)


def test_more_ranks_than_gpus_is_one_line_before_set_device(monkeypatch: pytest.MonkeyPatch) -> None:
    chosen = _gpus(monkeypatch, 2)
    _torchrun_env(monkeypatch, 1, 3)
    with pytest.raises(ConfigError, match=r"^--device auto: 3 processes on this machine but it shows 2 GPUs"):
        World.from_env("auto")
    assert chosen == []


def test_the_backend_may_be_chosen_and_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    _gpus(monkeypatch, 0)
    _torchrun_env(monkeypatch, 0, 2, METASHOT_DIST_BACKEND="mpi")
    with pytest.raises(ConfigError, match=r"^METASHOT_DIST_BACKEND=mpi: expected one of nccl, gloo$"):
        World.from_env("cpu")


def test_a_world_of_one_is_on_the_resolved_device() -> None:
    assert World.from_env("auto").home == torch.device("cpu")


class Reduced(Exception):
    """What the faked all-reduce raises, with the tensor it was given."""


def _capture_all_reduce(monkeypatch: pytest.MonkeyPatch) -> None:
    def all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        raise Reduced(tensor)

    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)


def test_the_stop_flags_of_a_rank_without_gradients_are_on_its_device(
    monkeypatch: pytest.MonkeyPatch
) -> None:
    """NCCL takes tensors on the rank's GPU only: a step with no gradient still reduces its flags there
    (the meta device stands for the GPU)."""
    _capture_all_reduce(monkeypatch)
    unused = torch.nn.Parameter(torch.zeros(3))  # no .grad
    with pytest.raises(Reduced) as e:
        World(0, 2, home="meta").sync_step([unused], [15.0, 0.0])
    assert e.value.args[0].device == torch.device("meta") and e.value.args[0].shape == (2,)
    used = torch.nn.Parameter(torch.zeros(3))
    used.grad = torch.ones(3)
    with pytest.raises(Reduced) as e:
        World(0, 2, home="meta").sync_step([used], [15.0, 0.0])
    assert e.value.args[0].device == torch.device("cpu")  # with the gradients, as one buffer
    assert e.value.args[0].tolist() == [1.0, 1.0, 1.0, 15.0, 0.0]


def test_on_the_cpu_the_flags_are_this_steps_and_gradients_averaged(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(distributed.dist, "all_reduce", lambda t, *a, **k: t.mul_(2))  # two equal ranks
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([1.0, 3.0])
    assert World(0, 2).sync_step([p], [1.0, 0.0]) == [2.0, 0.0]
    assert p.grad.tolist() == [1.0, 3.0]


def test_late_flags_come_back_one_step_later() -> None:
    """CUDA's path (a copy to the host read at the next step), run on the CPU."""
    world = World(0, 2)
    assert world.late_flags(torch.tensor([1.0, 0.0])) == [0.0, 0.0]
    assert world.late_flags(torch.tensor([0.0, 2.0])) == [1.0, 0.0]
    assert world.late_flags(torch.tensor([0.0, 0.0])) == [0.0, 2.0]
    world.start_steps()  # the next stage of a staged run starts clean
    assert world.late_flags(torch.tensor([0.0, 0.0])) == [0.0, 0.0]


def test_numerics_are_stated_and_restored() -> None:
    b = torch.backends
    before = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark,
              torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    with numerics("fp32", deterministic=True):
        assert (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark) == (False, False, False)
        assert torch.are_deterministic_algorithms_enabled() and b.cudnn.deterministic
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    with numerics("tf32"):
        assert b.cuda.matmul.allow_tf32 and b.cudnn.allow_tf32
        assert not torch.are_deterministic_algorithms_enabled()
    assert (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark,
            torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG")) == before


def test_an_old_cpu_config_still_says_cpu_and_new_ones_auto(tmp_path: Path) -> None:
    old = Config(method="maml", task="sinusoid", device="cpu").to_dict()
    for added in ("precision", "deterministic"):
        del old[added]
    (tmp_path / "config.json").write_text(json.dumps(old))
    loaded = Config.load(tmp_path / "config.json")
    assert (loaded.device, loaded.precision, loaded.deterministic) == ("cpu", "fp32", False)
    assert Config().device == "auto"
    with pytest.raises(ConfigError,
                       match=r"^--precision must be one of fp32, tf32, bf16, bf16-all, got 'fp16'$"):
        Config(precision="fp16").validate()


SINE = dict(method="maml", task="sinusoid", meta_batch=2, val_every=2, val_episodes=2, test_episodes=2,
            backbone_args={"hidden": 8})


def _adam_steps(trainer: Trainer) -> list[torch.Tensor]:
    return [s["step"] for s in trainer.optimizer.state.values()]


def test_after_a_resume_adams_step_counters_are_on_the_cpu_as_a_fresh_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """last.pt is read onto the CPU (read onto a GPU, torch's Adam leaves its step counters there and
    syncs with the host for each parameter every step); the counters equal the whole run's."""
    whole = Trainer(Config(**SINE, steps=4), tmp_path / "whole", progress=False)
    whole.fit()
    Trainer(Config(**SINE, steps=2), tmp_path / "split", progress=False).fit()
    asked: list[Any] = []
    load_last = RunFolder.load_last
    monkeypatch.setattr(RunFolder, "load_last",
                        lambda self, where="cpu": asked.append(where) or load_last(self, where))
    resumed = Trainer(Config(**SINE, steps=4), tmp_path / "split", resume=True, progress=False)
    resumed.fit()
    assert asked == ["cpu"]
    steps, expected = _adam_steps(resumed), _adam_steps(whole)
    assert len(steps) == len(expected) > 0
    for got, want in zip(steps, expected):
        assert got.device == want.device == torch.device("cpu") and got.dtype == want.dtype
        assert torch.equal(got, want) and float(got) == 4
    assert "cuda_rng" not in load_checkpoint(tmp_path / "split" / "last.pt")  # saved on CUDA only


def test_off_cuda_rows_and_result_hold_no_memory(tmp_path: Path) -> None:
    trainer = Trainer(Config(**SINE, steps=2), tmp_path, progress=False)
    trainer.fit()
    result = trainer.test()
    assert result.max_memory_mb is None
    assert "max_memory_mb" not in json.loads((tmp_path / "result.json").read_text())
    assert all("max_memory_mb" not in row for row in trainer.progress.rows)
    measured = Result("acc", 2, {"acc": (0.5, 0.1)}, 123.5)
    assert measured.to_dict()["max_memory_mb"] == 123.5 and Result.from_dict(measured.to_dict()) == measured


def test_plot_sinusoid_on_a_device(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    Trainer(Config(**SINE, steps=2), tmp_path / "run", progress=False).fit()
    out = tmp_path / "sine.png"
    assert cli.main(["plot-sinusoid", str(tmp_path / "run"), "--out", str(out), "--device", "cpu",
                     "--steps", "1", "2"]) == 0
    assert out.read_bytes().startswith(b"\x89PNG")
    capsys.readouterr()
    assert cli.main(["plot-sinusoid", str(tmp_path / "run"), "--out", str(out), "--device", "cuda:7"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("metashot: error: --device cuda:7: this machine has") and err.count("\n") == 1


@pytest.mark.cuda
def test_on_cuda_a_resume_keeps_adams_counters_on_the_cpu_and_replays_the_gpus_random_state(
    tmp_path: Path
) -> None:
    cfg = Config(**SINE, device="cuda", deterministic=True)
    whole = Trainer(cfg.replace(steps=4), tmp_path / "whole", progress=False)
    whole.fit()
    Trainer(cfg.replace(steps=2), tmp_path / "split", progress=False).fit()
    state = load_checkpoint(tmp_path / "split" / "last.pt")
    assert state["cuda_rng"].device == torch.device("cpu")
    resumed = Trainer(cfg.replace(steps=4), tmp_path / "split", resume=True, progress=False)
    resumed.fit()
    assert all(s.device == torch.device("cpu") for s in _adam_steps(resumed))
    ours, theirs = (load_checkpoint(tmp_path / r / "last.pt")["method"] for r in ("split", "whole"))
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # deterministic kernels, the RNG replayed
    rows = resumed.progress.rows
    assert rows and all(row["max_memory_mb"] > 0 for row in rows)
    assert resumed.test().max_memory_mb >= max(row["max_memory_mb"] for row in rows)


@pytest.mark.parametrize(("env", "placement"), [
    ({}, (0, 1)), ({"LOCAL_RANK": "2", "LOCAL_WORLD_SIZE": "4"}, (2, 4)),
    ({"LOCAL_RANK": "3"}, (3, 4)),  # a launcher without LOCAL_WORLD_SIZE: rank 3 still takes cuda:3
])
def test_local_placement(env: dict[str, str], placement: tuple[int, int],
                         monkeypatch: pytest.MonkeyPatch) -> None:
    for key in ("LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert local_placement() == placement
    assert pick_device("auto", 4, False, *placement) == ("cuda:3" if env == {"LOCAL_RANK": "3"} else
                                                         "cuda" if placement == (0, 1) else "cuda:2")
