"""Real images through ``--task miniimagenet``: Omniglot written in two miniImageNet layouts trains to the
same accuracy, well above chance (``benchmarks/omniglot_as_mini.py`` at a small size)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "omniglot_as_mini.py"


@pytest.mark.slow
def test_omniglot_as_miniimagenet_trains_alike_in_two_layouts(omniglot_dir: Path, tmp_path: Path) -> None:
    argv = [sys.executable, str(SCRIPT), "--data-dir", str(omniglot_dir), "--image-size", "28",
            "--steps", "30", "--val-episodes", "10", "--test-episodes", "50", "--out", str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    cache, folders, same = (json.loads(line) for line in done.stdout.splitlines())
    assert (cache["layout"], folders["layout"], same) == ("cache", "folders", {"equal": True})
    assert cache["acc"] - cache["ci95"] > 50  # 5-way: chance is 20%
