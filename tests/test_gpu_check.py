"""benchmarks/gpu_check.py: a failing or hanging stage is one line and the check goes on; the dry run on
the CPU passes every stage (or says why it skips one)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import benchmarks.gpu_check as gpu_check

SCRIPT = Path(gpu_check.__file__)


def test_a_failing_stage_is_one_line_with_its_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def boom(args: argparse.Namespace) -> dict:
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")

    monkeypatch.setitem(gpu_check.STAGES, "env", boom)
    gpu_check.run_stage(argparse.Namespace(stage="env"))
    line = json.loads(capsys.readouterr().out)
    assert line == {"stage": "env", "ok": False,
                    "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}


def test_a_stage_past_its_limit_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = argparse.Namespace(device=torch.device("cpu"), work=str(tmp_path), dry_run=True, data_dir=None)
    assert gpu_check._child(args, "env", 1.0) == {
        "stage": "env", "ok": False, "error": "not run: the check's time budget is spent"}

    def hangs(argv: list[str], timeout: float, **kwargs: object) -> None:
        assert argv[1:5] == [str(SCRIPT), "--stage", "env", "--device"]
        raise subprocess.TimeoutExpired(argv, timeout)

    monkeypatch.setattr(gpu_check.subprocess, "run", hangs)
    timed_out = {"stage": "env", "ok": False, "error": "timed out after 30 s"}
    assert gpu_check._child(args, "env", 30.0) == timed_out


def test_timed_stages_run_alone_and_the_rest_side_by_side() -> None:
    assert gpu_check._groups(list(gpu_check.STAGES)) == [
        ["env"], ["vmap_loop", "parity", "sync_census", "cli", "determinism", "distributed"],
        ["speed_maml"], ["speed_protonet"], ["speed_mann"], ["speed_resnet12"], ["speed_mann_compiled"]]


# The whole dry run takes about 3.5 minutes on 2 cores, more than CI can spare: CI runs two stages, and
# METASHOT_GPU_CHECK_FULL=1 runs every one (before taking the check to a GPU machine).
FULL = os.environ.get("METASHOT_GPU_CHECK_FULL") == "1"


@pytest.mark.slow
@pytest.mark.parametrize("stages", [
    ["env", "parity"],
    pytest.param(None, marks=pytest.mark.skipif(not FULL, reason="the whole dry run: set "
                                                "METASHOT_GPU_CHECK_FULL=1")),
])
def test_the_dry_run_passes_on_the_cpu(stages: list[str] | None, omniglot_source: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    chosen = ["--stages", *stages] if stages else []
    done = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--dry-run", "--data-dir",
                           str(omniglot_source), *chosen], capture_output=True, text=True, env=env,
                          timeout=1200)
    lines = [json.loads(line) for line in done.stdout.splitlines()]
    order = [name for group in gpu_check._groups(stages or list(gpu_check.STAGES)) for name in group]
    assert [line["stage"] for line in lines] == [*order, "summary"], done.stderr[-2000:]
    for line in lines:
        assert line["ok"] is True or (line["ok"] is None and line["skipped"]), line
    assert done.returncode == 0
