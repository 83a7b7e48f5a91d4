"""Test-time cost per episode of each head that scores a task's queries from its support set, batched over
the meta-batch against a loop over its episodes in the same run, and of RFS's scikit-learn way.

Heads, all under ``torch.no_grad()`` as the evaluator calls them, on random features D = 640 (ResNet-12's)
of 5-way 1-shot and 5-shot episodes with 15 queries per class, meta-batch 16 (``--meta-batch``):
``prototype`` (``PrototypeHead``), ``cl2n`` (``CL2N``), ``ridge`` (``RidgeHead``, when
``metashot/methods/ridge.py`` exists), ``logistic`` (``LogisticHead``, RFS), ``linear`` and ``cosine``
(``LinearHead``, Baseline / Baseline++: 100 SGD steps), and ``finetune`` (``fine_tune``, P>M>F: Conv4 on
3x84x84 images, ``--finetune-episodes`` episodes of ``--finetune-steps`` Adam steps each, timed
``--finetune-repeats`` times after a warm-up; the P>M>F default of 50 steps costs 5x the steps' part).

Prints one JSON line per measurement:

- ``{"bench": "peak", "dtype": ...}``: this machine's matrix-product rate (GFLOP/s, best of several) of a
  float32 and a float64 n x n product, measured in the run at the run's thread count: the context for the
  other lines (the logistic head computes in float64);
- ``{"bench": "head", "head": ..., "episode": "5w1s15q", ...}``: ``batched_ms`` per episode of one call on
  the whole meta-batch, ``loop_ms`` per episode of a loop that calls the head on each episode alone, and
  ``ratio`` = loop / batched (medians of ``--repeats`` after a warm-up). fine_tune loops over the episodes
  itself, so its ratio is ~1; its line adds the cost of a step and that of copying the encoder and scoring
  the queries. The logistic line adds its Newton steps, its FLOPs per episode (counted by hand, see
  :func:`logistic_flops`) and their rate's share of the float64 peak;
- ``{"bench": "sklearn", ...}``: RFS's way, one ``LogisticRegression(C=1, lbfgs, max_iter=1000)`` fitted
  per episode on the L2-normalised features then ``predict_proba`` (data moved to NumPy and back
  included), ms per episode, its ratio to the batched logistic head, and the largest difference of their
  probabilities (scikit-learn stops at its default tolerance).

    OMP_NUM_THREADS=1 python benchmarks/head_cost.py                 # 1 thread, the CPU
    OMP_NUM_THREADS=1 python benchmarks/head_cost.py --repeats 1 --finetune-steps 2   # a quick check
    python benchmarks/head_cost.py --device cuda --threads 16
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from metashot.batches import Episode
from metashot.methods.finetune import LinearHead, fine_tune
from metashot.methods.heads import CL2N
from metashot.methods.logistic import LogisticHead, fit_logistic
from metashot.methods.protonet import PrototypeHead
from metashot.nn.backbones import make_backbone

WAYS, QUERIES, DIM = 5, 15, 640


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_s(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 1) -> float:
    """Median wall seconds of ``fn()`` over ``repeats`` calls after ``warmup``."""
    times = []
    for i in range(warmup + repeats):
        sync(device)
        t = time.perf_counter()
        fn()
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_peak(dtype: torch.dtype, device: torch.device, n: int) -> float:
    """GFLOP/s of an n x n by n x n product of ``dtype``, the best of 5."""
    a, b = torch.rand(n, n, dtype=dtype, device=device), torch.rand(n, n, dtype=dtype, device=device)
    best = min(median_s(lambda: a @ b, device, repeats=1) for _ in range(5))
    return 2 * n ** 3 / best / 1e9


def features(episodes: int, shots: int, device: torch.device, seed: int = 0):
    """Non-negative (post-ReLU, pooled) random features around a centre per class: support
    [B, N*K, D], class-major labels [B, N*K], queries [B, N*15, D]."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(episodes, WAYS, DIM, generator=g)

    def around(per_class: int) -> torch.Tensor:
        x = centres.repeat_interleave(per_class, dim=1)
        return F.relu(x + torch.randn(x.shape, generator=g)).to(device)

    labels = torch.arange(WAYS).repeat_interleave(shots).repeat(episodes, 1).to(device)
    return around(shots), labels, around(QUERIES)


def heads() -> dict[str, nn.Module]:
    """The feature heads to time, by name; ridge when another helper's file is there."""
    out: dict[str, nn.Module] = {"prototype": PrototypeHead(), "cl2n": CL2N()}
    try:
        from metashot.methods.ridge import RidgeHead
    except ImportError:
        print(json.dumps({"bench": "note", "head": "ridge", "skipped": "metashot.methods.ridge not found"}))
    else:
        out["ridge"] = RidgeHead()
    out.update(logistic=LogisticHead(), linear=LinearHead("linear"), cosine=LinearHead("cosine"))
    return out


def logistic_flops(shots: int, steps: int) -> int:
    """FLOPs of one episode's logistic fit and scoring, S = N K support points, rank r = S (S < D),
    P = N (r + 1) unknowns: the QR (~4 D S^2), per Newton step the gradient's and the Hessian's products
    (2 S N (r + 1) + 2 S N^2 (r + 1)^2), its Cholesky factor (P^3 / 3) and solve (2 P^2) and the support's
    logits three times (3 x 2 S r N: for the gradient, and the line search's objective at the point and
    after the full step; backtracking, rare, is not counted), then W = Q V (2 D r N) and the queries'
    logits (2 Q D N); elementwise work is not counted."""
    s = WAYS * shots
    r, q, p = s, WAYS * QUERIES, WAYS * (s + 1)
    per_step = (2 * s * WAYS * (r + 1) + 2 * s * WAYS ** 2 * (r + 1) ** 2 + p ** 3 // 3 + 2 * p ** 2
                + 3 * 2 * s * r * WAYS)
    return 4 * DIM * s ** 2 + steps * per_step + 2 * DIM * r * WAYS + 2 * q * DIM * WAYS


def newton_steps(support: torch.Tensor, labels: torch.Tensor) -> int:
    """The Newton steps the batched fit takes on these features (the meta-batch's slowest episode)."""
    x = F.normalize(support.double(), dim=-1)
    _, r = torch.linalg.qr(x.mT)
    return fit_logistic(r.mT, labels, WAYS)[1]


def time_head(name: str, head: nn.Module, shots: int, a: argparse.Namespace, peak64: float) -> None:
    """One "head" line: batched and looped ms per episode on the meta-batch's features."""
    device, b = torch.device(a.device), a.meta_batch
    support, labels, query = features(b, shots, device)
    head = head.to(device)
    with torch.no_grad():
        batched = median_s(lambda: head(query, support, labels, WAYS), device, a.repeats) / b
        loop = median_s(lambda: [head(query[i:i + 1], support[i:i + 1], labels[i:i + 1], WAYS)
                                 for i in range(b)], device, a.repeats) / b
    row = {"bench": "head", "head": name, "episode": f"{WAYS}w{shots}s{QUERIES}q", "meta_batch": b,
           "device": a.device, "threads": torch.get_num_threads(), "batched_ms": round(batched * 1e3, 3),
           "loop_ms": round(loop * 1e3, 3), "ratio": round(loop / batched, 2)}
    if name == "logistic":
        steps = newton_steps(support, labels)
        gflops = logistic_flops(shots, steps) / batched / 1e9
        row.update(newton_steps=steps, mflop_per_episode=round(logistic_flops(shots, steps) / 1e6, 2),
                   gflops=round(gflops, 2), share_of_f64_peak=round(gflops / peak64, 4))
    print(json.dumps(row), flush=True)


def time_sklearn(shots: int, a: argparse.Namespace) -> None:
    """RFS's per-episode scikit-learn fit, against the batched logistic head on the same features."""
    from sklearn.linear_model import LogisticRegression

    device, b = torch.device(a.device), a.meta_batch
    support, labels, query = features(b, shots, device)

    def rfs() -> np.ndarray:
        out = []
        for x, y, q in zip(F.normalize(support, dim=-1), labels, F.normalize(query, dim=-1)):
            model = LogisticRegression(C=1.0, solver="lbfgs", max_iter=1000)
            out.append(model.fit(x.cpu().numpy(), y.cpu().numpy()).predict_proba(q.cpu().numpy()))
        return np.stack(out)

    with torch.no_grad():
        ours = median_s(lambda: LogisticHead()(query, support, labels, WAYS), device, a.repeats) / b
        theirs = median_s(rfs, device, a.repeats) / b
        diff = np.abs(rfs() - LogisticHead()(query, support, labels, WAYS).exp().cpu().numpy()).max()
    print(json.dumps({"bench": "sklearn", "episode": f"{WAYS}w{shots}s{QUERIES}q", "meta_batch": b,
                      "ms": round(theirs * 1e3, 3), "logistic_batched_ms": round(ours * 1e3, 3),
                      "ratio": round(theirs / ours, 1), "max_prob_diff": float(f"{diff:.2e}")}), flush=True)


def time_finetune(shots: int, a: argparse.Namespace) -> None:
    """P>M>F's fine-tuning of a Conv4 (channels-last, as ``HeadMethod`` keeps it) on random 3x84x84 images,
    ms per episode: the whole batch in one call (fine_tune loops over its episodes itself) against one
    call per episode, and the cost of one step beside that of copying the encoder and scoring (steps=0)."""
    device, b, steps = torch.device(a.device), a.finetune_episodes, a.finetune_steps
    repeats = a.finetune_repeats
    encoder = make_backbone("conv4", (3, 84, 84)).to(device, memory_format=torch.channels_last).eval()
    g = torch.Generator().manual_seed(0)
    ys = torch.arange(WAYS).repeat_interleave(shots).repeat(b, 1)
    yq = torch.arange(WAYS).repeat_interleave(QUERIES).repeat(b, 1)
    episode = Episode(torch.rand(b, ys.shape[1], 3, 84, 84, generator=g), ys,
                      torch.rand(b, yq.shape[1], 3, 84, 84, generator=g), yq, WAYS).to(device)
    alone = [Episode(*(getattr(episode, f)[i:i + 1] for f in Episode.TENSORS), WAYS) for i in range(b)]
    fine_tune(encoder, alone[0], steps=1)  # warm-up
    scoring = median_s(lambda: fine_tune(encoder, episode, steps=0), device, repeats, warmup=0) / b
    batched = median_s(lambda: fine_tune(encoder, episode, steps=steps), device, repeats, warmup=0) / b
    loop = median_s(lambda: [fine_tune(encoder, e, steps=steps) for e in alone], device, repeats, 0) / b
    print(json.dumps({"bench": "head", "head": "finetune", "episode": f"{WAYS}w{shots}s{QUERIES}q",
                      "backbone": "conv4", "image": [3, 84, 84], "episodes": b, "steps": steps,
                      "device": a.device, "threads": torch.get_num_threads(),
                      "batched_ms": round(batched * 1e3, 1), "loop_ms": round(loop * 1e3, 1),
                      "ratio": round(loop / batched, 2), "copy_and_score_ms": round(scoring * 1e3, 1),
                      "ms_per_step": round((batched - scoring) * 1e3 / steps, 1)}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--meta-batch", type=int, default=16)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--finetune-episodes", type=int, default=2)
    p.add_argument("--finetune-steps", type=int, default=10)
    p.add_argument("--finetune-repeats", type=int, default=1)
    p.add_argument("--matmul", type=int, default=2048, help="n of the peak's n x n product")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    peaks = {}
    for dtype in (torch.float32, torch.float64):
        peaks[dtype] = matmul_peak(dtype, device, a.matmul)
        print(json.dumps({"bench": "peak", "dtype": str(dtype).removeprefix("torch."), "n": a.matmul,
                          "device": a.device, "threads": a.threads, "gflops": round(peaks[dtype], 1)}))
    for shots in a.shots:
        for name, head in heads().items():
            time_head(name, head, shots, a, peaks[torch.float64])
        time_sklearn(shots, a)
        time_finetune(shots, a)


if __name__ == "__main__":
    main()
