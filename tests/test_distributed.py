"""Distributed meta-training under torchrun with gloo, every process on 127.0.0.1: N processes train to
the same weights and the same test result as one, across two "nodes" too, and survive a killed rank."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from metashot.config import Config
from metashot.distributed import World
from metashot.errors import ConfigError
from metashot.runs import load_checkpoint
from metashot.train import Trainer

pytestmark = pytest.mark.slow
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "GLOO_SOCKET_IFNAME": "lo"}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(nproc: int, args: list[str], *launch: str, wait: bool = True) -> subprocess.Popen | str:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}",
           "--local-addr=127.0.0.1", *(launch or ("--master-addr=127.0.0.1", f"--master-port={_port()}")),
           "-m", "metashot", *args]
    proc = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if not wait:
        return proc
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def _one(args: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "metashot", *args], env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _feeds_batch_norm(weights: dict[str, torch.Tensor], key: str) -> bool:
    """A convolution's bias followed by batch norm (``x.0.bias`` before ``x.1``): its true gradient is
    zero, so Adam turns rounding noise into its steps and its value depends on the summation order; it
    has no effect on any output."""
    prefix, _, name = key.rpartition(".0.")
    return name == "bias" and weights.get(f"{prefix}.1.weight", torch.zeros(0, 0)).dim() == 1


def _assert_same(a: Path, b: Path, rtol: float = 1e-5) -> None:
    """The same weights (all parameters as one vector, within ``rtol`` in norm; the biases that feed
    batch norm aside) and the same test result."""
    wa, wb = load_checkpoint(a / "last.pt")["method"], load_checkpoint(b / "last.pt")["method"]
    assert wa.keys() == wb.keys()
    keys = [k for k in wa
            if wa[k].is_floating_point() and "running_" not in k and not _feeds_batch_norm(wa, k)]
    va, vb = (torch.cat([w[k].flatten() for k in keys]) for w in (wa, wb))
    assert (va - vb).norm() <= rtol * va.norm()
    ra, rb = (json.loads((p / "result.json").read_text()) for p in (a, b))
    assert ra["episodes"] == rb["episodes"]
    for name, (mean, ci) in ra["stats"].items():
        assert rb["stats"][name] == pytest.approx([mean, ci], rel=0 if rtol <= 1e-5 else 1e-2, abs=1e-6), name


@pytest.fixture(scope="module")
def folder(patterns: Path) -> Path:
    return patterns


METHOD_ARGS = {
    "protonet": ["protonet", "--meta-batch", "4"],
    "matching": ["matching", "--meta-batch", "4", "--set", 'method_args={"fce": true}'],
    # each path on 1 and 2 processes, second order on the preset's network (the authors' batch norm, no
    # conv bias before it): the weights agree to 1e-5 in norm
    "maml": ["maml", "--meta-batch", "4", "--backbone-args", '{"hidden": 16}',
             "--set", 'method_args={"tasks": "loop"}'],
    "maml-vmap": ["maml", "--meta-batch", "4", "--backbone-args", '{"hidden": 16}',
                  "--set", 'method_args={"tasks": "vmap"}'],
    "r2d2": ["r2d2", "--meta-batch", "4"],
    # batch norm over groups of 2 examples: each process normalises whole groups
    "baseline": ["baseline", "--batch-size", "8", "--meta-batch", "2", "--set",
                 'method_args={"classifier": "cosine", "norm_batch": 2, "head": "prototype"}'],
}


@pytest.mark.parametrize("method", sorted(METHOD_ARGS))
def test_two_processes_train_as_one(method: str, folder: Path, tmp_path: Path) -> None:
    """Matching's FCE LSTMs run batched over each process's episodes, and the matrix kernels round
    differently at another batch size; Adam's normalised steps amplify that rounding in the weights with
    the smallest gradients, so its weights agree to 1e-4 and its test losses to 1e-2. R2D2's solve and
    the baseline's scaled cosines (logits x10) carry the weights' 1e-5 into test losses that agree to 1e-2."""
    args = ["train", *METHOD_ARGS[method], "--task", "folder", "--data-dir", str(folder), "--no-progress",
            "--ways", "3", "--train-ways", "3", "--shots", "2", "--queries", "2", "--set", "train_queries=2",
            "--max-episodes", "6", "--val-every", "3", "--test-episodes", "8", "--set", "val_episodes=6",
            "--set", 'task_args={"image_size": 28}']
    _one([*args, "--run-dir", str(tmp_path / "one")])
    _torchrun(2, [*args, "--run-dir", str(tmp_path / "two")])
    _assert_same(tmp_path / "one", tmp_path / "two",
                 rtol=1e-4 if method in ("matching", "r2d2", "baseline") else 1e-5)


def test_mann_two_processes_train_as_one(omniglot_dir: Path, tmp_path: Path) -> None:
    args = ["train", "mann", "--data-dir", str(omniglot_dir), "--no-progress", "--ways", "3",
            "--meta-batch", "4", "--max-episodes", "4", "--val-every", "2", "--test-episodes", "8",
            "--set", "val_episodes=4", "--set", 'task_args={"instances": 3}',
            "--set", 'method_args={"hidden": 16, "slots": 8, "width": 4, "heads": 2}']
    _one([*args, "--run-dir", str(tmp_path / "one")])
    _torchrun(2, [*args, "--run-dir", str(tmp_path / "two")])
    _assert_same(tmp_path / "one", tmp_path / "two")


SINE = ["train", "maml", "--task", "sinusoid", "--no-progress", "--meta-batch", "8", "--val-every", "20",
        "--test-episodes", "16", "--set", "val_episodes=16"]


def test_two_nodes_on_loopback(tmp_path: Path) -> None:
    args = [*SINE, "--max-episodes", "40"]
    _one([*args, "--run-dir", str(tmp_path / "one")])
    endpoint = f"127.0.0.1:{_port()}"
    nodes = [_torchrun(1, [*args, "--run-dir", str(tmp_path / "two")], "--nnodes=2", f"--node-rank={n}",
                       "--rdzv-backend=c10d", f"--rdzv-endpoint={endpoint}", "--rdzv-id=metashot-test",
                       wait=False) for n in (0, 1)]
    for node in nodes:
        out, _ = node.communicate(timeout=300)
        assert node.returncode == 0, out
    _assert_same(tmp_path / "one", tmp_path / "two")


def _workers(agent: subprocess.Popen) -> dict[int, int]:
    """RANK -> pid of the agent's worker processes."""
    found = {}
    for child in Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split():
        env = Path(f"/proc/{child}/environ").read_bytes().split(b"\0")
        ranks = [e.split(b"=", 1)[1] for e in env if e.startswith(b"RANK=")]
        if ranks:
            found[int(ranks[0])] = int(child)
    return found


def _kill_rank_after_first_checkpoint(agent: subprocess.Popen, run: Path, rank: int) -> None:
    deadline = time.time() + 120
    while not (run / "last.pt").exists():
        assert agent.poll() is None and time.time() < deadline
        time.sleep(0.05)
    os.kill(_workers(agent)[rank], signal.SIGKILL)


def test_a_killed_rank_restarts_the_group_from_the_last_checkpoint(tmp_path: Path) -> None:
    args = [*SINE, "--max-episodes", "400", "--backbone-args", '{"hidden": 64}']
    _torchrun(2, [*args, "--run-dir", str(tmp_path / "whole")])
    agent = _torchrun(2, [*args, "--run-dir", str(tmp_path / "killed")], "--max-restarts=1",
                      "--master-addr=127.0.0.1", f"--master-port={_port()}", wait=False)
    _kill_rank_after_first_checkpoint(agent, tmp_path / "killed", rank=1)
    out, _ = agent.communicate(timeout=300)
    assert agent.returncode == 0, out
    whole, killed = (load_checkpoint(tmp_path / r / "last.pt") for r in ("whole", "killed"))
    assert killed["step"] == whole["step"] == 400
    assert all(torch.equal(whole["method"][k], killed["method"][k]) for k in whole["method"])


def test_a_killed_rank_without_restarts_fails_in_bounded_time_naming_it(tmp_path: Path) -> None:
    args = [*SINE, "--max-episodes", "400", "--backbone-args", '{"hidden": 64}']
    agent = _torchrun(2, [*args, "--run-dir", str(tmp_path / "run")], wait=False)
    _kill_rank_after_first_checkpoint(agent, tmp_path / "run", rank=1)
    start = time.time()
    out, _ = agent.communicate(timeout=120)
    assert agent.returncode != 0 and time.time() - start < 60
    assert "rank" in out and "Signal 9 (SIGKILL)" in out, out
    state = load_checkpoint(tmp_path / "run" / "last.pt")  # the run folder is whole and resumes
    assert state["step"] >= 20 and not list((tmp_path / "run").glob(".*.tmp"))
    _one([*SINE, "--max-episodes", "400", "--backbone-args", '{"hidden": 64}', "--resume",
          "--run-dir", str(tmp_path / "run")])


def test_a_meta_batch_that_does_not_split_is_refused_before_training(tmp_path: Path) -> None:
    cfg = Config(method="protonet", task="sinusoid", meta_batch=3)
    with pytest.raises(ConfigError, match=r"--meta-batch 3 does not split evenly over 2 processes: pass a "
                       r"multiple of 2 .*ProtoNet's and Matching Networks' presets train one episode per "
                       r"step, so pass --meta-batch 2"):
        Trainer(cfg, tmp_path / "run", world=World(0, 2))
    assert not (tmp_path / "run").exists()


def test_sigterm_to_torchrun_checkpoints_every_rank_at_the_same_step(tmp_path: Path) -> None:
    args = [*SINE, "--max-episodes", "400", "--backbone-args", '{"hidden": 64}', "--run-dir", str(tmp_path)]
    agent = _torchrun(2, args, wait=False)
    deadline = time.time() + 120
    while not (tmp_path / "last.pt").exists():
        assert agent.poll() is None and time.time() < deadline
        time.sleep(0.05)
    agent.send_signal(signal.SIGTERM)
    out, _ = agent.communicate(timeout=60)
    assert agent.returncode != 0
    step = load_checkpoint(tmp_path / "last.pt")["step"]
    assert f"metashot: stopped by SIGTERM at step {step}; last.pt is saved, --resume continues" in out, out
    assert 20 <= step < 400
    _torchrun(2, [*args, "--resume"])
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 400


SIGNAL_AT = """
import os, signal, sys
from metashot import cli
from metashot.train import Trainer

fit = Trainer.fit


def fit_signalled(self):
    hook = self.method.on_step

    def on_step(step):
        if step == int(os.environ["SIGNAL_AT"]) and self.world.rank == 0:
            os.kill(os.getpid(), signal.SIGTERM)
        hook(step)

    self.method.on_step = on_step
    return fit(self)


Trainer.fit = fit_signalled
sys.exit(cli.main(sys.argv[1:]))
"""


def _rows_but_minutes(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "minutes"} for r in load_checkpoint(run / "last.pt")["rows"]]


def test_resume_after_sigterm_continues_every_ranks_running_sums(tmp_path: Path) -> None:
    """Rank 0 gets SIGTERM as step 13 begins; both ranks stop after it, between two validations, with
    their own training loss sums; the resumed run's rows are the uninterrupted run's, bit for bit."""
    args = [*SINE, "--max-episodes", "30", "--val-every", "10", "--backbone-args", '{"hidden": 16}']
    _torchrun(2, [*args, "--run-dir", str(tmp_path / "whole")])
    script = tmp_path / "signal_at.py"
    script.write_text(SIGNAL_AT)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2", "--local-addr=127.0.0.1",
           "--master-addr=127.0.0.1", f"--master-port={_port()}", str(script), *args,
           "--run-dir", str(tmp_path / "split")]
    stopped = subprocess.run(cmd, env={**ENV, "SIGNAL_AT": "13"}, capture_output=True, text=True, timeout=300)
    assert "metashot: stopped by SIGTERM at step 14" in stopped.stdout + stopped.stderr, stopped.stderr
    state = load_checkpoint(tmp_path / "split" / "last.pt")
    assert state["step"] == 14 and state["since"] == 4
    _torchrun(2, [*args, "--resume", "--run-dir", str(tmp_path / "split")])
    assert [r["step"] for r in _rows_but_minutes(tmp_path / "whole")] == [10, 20, 30]
    assert _rows_but_minutes(tmp_path / "split") == _rows_but_minutes(tmp_path / "whole")
    whole, split = ([line.split(",")[:2] + line.split(",")[3:] for line in (run / "metrics.csv").read_text()
                     .splitlines()] for run in (tmp_path / "whole", tmp_path / "split"))
    assert split == whole
