"""kill -9 at random moments, then --resume: does the run end exactly as an uninterrupted one?

Trains a short MAML sinusoid run once without interruption, then ``--kills`` times starts the same run
in a fresh folder, kills it with SIGKILL after a random delay (before the first checkpoint, during
training, during a checkpoint write), resumes it (resuming again if the resume is killed too) until it
finishes (every 4th kill waits for the temporary file of one of the run's files to appear, so it
lands during that write), and compares the final ``last.pt`` (step, weights, optimizer state, RNG
state, metrics rows) and ``metrics.csv`` with the uninterrupted run's, bit for bit but for the
wall-clock minutes column. One JSON line per kill, then a summary line.

    python benchmarks/kill_resume.py --kills 20
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from metashot.runs import load_checkpoint

ARGS = ["train", "maml", "--task", "sinusoid", "--no-progress", "--max-episodes", "60", "--val-every", "10",
        "--test-episodes", "20", "--set", "val_episodes=20", "--set", "meta_batch=10"]
WRITES = ("best.pt", "last.pt", "metrics.csv", "config.json", "result.json")


def metashot(run: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "metashot", *ARGS, "--run-dir", str(run), *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)


def same(a: Path, b: Path) -> list[str]:
    """What differs between the two runs' final states (empty when identical)."""
    sa, sb = load_checkpoint(a / "last.pt"), load_checkpoint(b / "last.pt")
    diffs = [k for k in ("step", "best", "since") if sa[k] != sb[k]]
    diffs += [f"method.{k}" for k in sa["method"] if not torch.equal(sa["method"][k], sb["method"][k])]
    diffs += ["rng"] * (not torch.equal(sa["rng"], sb["rng"]))
    for i, (pa, pb) in enumerate(zip(sa["optimizer"]["state"].values(), sb["optimizer"]["state"].values())):
        diffs += [f"optimizer.{i}.{k}" for k in pa if not torch.equal(pa[k], pb[k])]

    def rows(rs: list[dict]) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "minutes"} for r in rs]

    diffs += ["rows"] * (rows(sa["rows"]) != rows(sb["rows"]))
    csv = [[r.split(",")[:2] + r.split(",")[3:] for r in (p / "metrics.csv").read_text().splitlines()]
           for p in (a, b)]
    diffs += ["metrics.csv"] * (csv[0] != csv[1])
    return diffs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    rng = random.Random(args.seed)
    root = Path(tempfile.mkdtemp(prefix="metashot-kill-"))
    start = time.perf_counter()
    ref = metashot(root / "whole")
    assert ref.wait() == 0, ref.stderr.read().decode()
    whole = time.perf_counter() - start
    identical = 0
    for k in range(args.kills):
        run = root / f"run{k}"
        delay = rng.uniform(0.3, whole)
        proc = metashot(run)
        if k % 4 == 3:  # every 4th kill lands in a write: as soon as that file's temporary appears
            target = WRITES[k // 4 % len(WRITES)]
            deadline = time.perf_counter() + whole
            while not list(run.glob(f".{target}.*.tmp")) and time.perf_counter() < deadline:
                time.sleep(0.0005)
            delay = time.perf_counter() - (deadline - whole)
        else:
            time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        before_first = not (run / "last.pt").exists()
        temporaries = sorted(t.name.split(".")[1] for t in run.glob(".*.tmp"))
        resumes = 0
        while True:
            resumes += 1
            again = metashot(run, *(["--resume"] if (run / "config.json").exists() else []))
            if resumes < 3 and rng.random() < 0.3:  # kill some resumes as well
                time.sleep(rng.uniform(0.3, whole))
                again.send_signal(signal.SIGKILL)
            code = again.wait()
            if code == 0:
                break
            if code != -signal.SIGKILL:
                raise SystemExit(f"kill {k}: resume exited {code}: {again.stderr.read().decode()}")
        diffs = same(root / "whole", run)
        identical += not diffs
        print(json.dumps({"kill": k, "after_s": round(delay, 2), "before_first_checkpoint": before_first,
                          "temporaries_left": temporaries, "runs_to_finish": resumes,
                          "identical": not diffs, "differences": diffs}), flush=True)
    print(json.dumps({"kills": args.kills, "identical": identical, "uninterrupted_s": round(whole, 2),
                      "folder": str(root)}))


if __name__ == "__main__":
    main()
