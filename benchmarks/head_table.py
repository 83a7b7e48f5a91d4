"""Every trained encoder with every head: the "same backbone, different head" table.

For each run folder given, its best weights are loaded and the test episodes of each ``--shape`` (the
run's own seed: the same episodes for every run) are embedded once; then every head of
:data:`metashot.methods.HEADS` (default arguments) and the run's own trained head score the same
features. One JSON line per (run, shape, head): mean accuracy and 95% interval over the episodes, and
the head's test-time cost per episode (ms, meta-batches of ``--batch`` episodes, one thread unless
OMP_NUM_THREADS says otherwise). Heads that need the encoder itself (support-set fine-tuning of the
backbone) are not in this table: ``metashot evaluate RUN`` runs them.

    OMP_NUM_THREADS=1 python benchmarks/head_table.py RUN [RUN ...] --shape 5w1s --shape 20w1s \
        --episodes 1000
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import torch

from metashot.evaluate import mean_ci
from metashot.methods import HEADS, build_head
from metashot.methods.baseline import Baseline
from metashot.methods.heads import CL2N, EncoderHead, HeadMethod, episode_metrics
from metashot.runs import RunFolder


def embedded(run: Path, ways: int, shots: int, episodes: int, batch: int) -> tuple[HeadMethod, list]:
    """The run's method and its test episodes' features: [(query, support, labels, query labels)]."""
    folder = RunFolder(run, writer=False)
    cfg = folder.load_config().replace(ways=ways, shots=shots, test_episodes=episodes, meta_batch=batch)
    source, method = folder.method(cfg.validate(), "best.pt")
    if not isinstance(method, HeadMethod):
        raise SystemExit(f"{run}: {cfg.method} is not an encoder and a head")
    method.eval()
    out = []
    with torch.no_grad():
        for episode in source.loader("test", episodes, seed=cfg.seed, kind="episodes"):
            episode = episode.to("cpu")
            support, query = method.embed(episode)
            out.append((query, support, episode.support_labels, episode.query_labels))
    return method, out


def score(head: torch.nn.Module, features: list, ways: int) -> tuple[float, float, float]:
    """Accuracy mean and 95% interval of ``head`` over the features, and its ms per episode."""
    accs, seconds, n = [], 0.0, 0
    for query, support, labels, query_labels in features:
        t0 = time.perf_counter()
        with torch.no_grad():
            log_p = head(query, support, labels, ways)
        seconds += time.perf_counter() - t0
        accs.append(episode_metrics(log_p, query_labels)[1]["acc"])
        n += query.shape[0]
    mean, ci = mean_ci(torch.cat(accs))
    return mean, ci, 1000 * seconds / n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", type=Path)
    p.add_argument("--shape", action="append", default=None, help="e.g. 5w1s (repeatable)")
    p.add_argument("--episodes", type=int, default=1000)
    p.add_argument("--batch", type=int, default=50, help="episodes per head call")
    a = p.parse_args()
    torch.set_num_threads(1)
    for run in a.runs:
        for shape in a.shape or ["5w1s"]:
            ways, shots = map(int, re.fullmatch(r"(\d+)w(\d+)s", shape).groups())
            t0 = time.perf_counter()
            method, features = embedded(run, ways, shots, a.episodes, a.batch)
            embed_s = time.perf_counter() - t0
            heads = {"own": method.head} | {name: build_head(name) for name in sorted(HEADS)
                                            if not issubclass(HEADS[name], EncoderHead)}
            for name, head in heads.items():
                if isinstance(head, CL2N) and isinstance(method, Baseline):
                    head.mean = method.base_mean
                mean, ci, ms = score(head, features, ways)
                print(json.dumps({"run": str(run), "method": RunFolder(run).load_config().method,
                                  "shape": shape, "head": name, "own_head": type(method.head).__name__,
                                  "acc": round(100 * mean, 2), "ci95": round(100 * ci, 2),
                                  "episodes": a.episodes, "ms_per_episode": round(ms, 3),
                                  "embed_s": round(embed_s, 1)}), flush=True)


if __name__ == "__main__":
    main()
