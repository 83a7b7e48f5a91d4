"""Evaluation as the papers report it: mean over N test episodes with a 95% interval, 1.96 std / sqrt(N)."""

from __future__ import annotations

import contextlib
import json
import math
import statistics
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch

from metashot.methods.base import Method
from metashot.process import uninterrupted


def mean_ci(values: torch.Tensor) -> tuple[float, float]:
    """Mean and 95% half-width 1.96 * std / sqrt(N) (population std, as numpy's default)."""
    v = values.double()
    n = v.numel()
    return v.mean().item(), 1.96 * v.std(correction=0).item() / math.sqrt(n)


def autocast(method: Method, device: torch.device | str, precision: str) -> contextlib.AbstractContextManager:
    """What ``method``'s forward and loss run in under ``precision`` (:data:`metashot.config.PRECISIONS`):
    bfloat16 autocast on ``device``'s type for bf16 where the method allows it
    (:meth:`~metashot.methods.base.Method.autocast_safe`) and for bf16-all, else nothing (float32). The
    parameters, the optimizer and the gradients stay float32 either way."""
    if precision == "bf16-all" or (precision == "bf16" and method.autocast_safe()):
        # no weight cache: a head that trains at test time (linear, finetune) steps its weights inside
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def peak_memory_mb(device: torch.device | str) -> float | None:
    """``torch.cuda.max_memory_allocated`` on ``device`` in MiB (the peak since the last reset), or None
    off CUDA."""
    device = torch.device(device)
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _fmt(name: str, mean: float, ci: float) -> str:
    if name.startswith("acc"):
        return f"{100 * mean:.2f}% +- {100 * ci:.2f}%"
    return f"{mean:.4f} +- {ci:.4f}"


@dataclass
class Result:
    """Per-metric (mean, 95% half-width) over ``episodes`` test episodes; ``metric`` is the headline;
    ``max_memory_mb`` the peak GPU memory allocated (:func:`peak_memory_mb`; None off CUDA)."""

    metric: str
    episodes: int
    stats: dict[str, tuple[float, float]]
    max_memory_mb: float | None = None

    @property
    def mean(self) -> float:
        return self.stats[self.metric][0]

    @property
    def ci(self) -> float:
        return self.stats[self.metric][1]

    def summary(self) -> str:
        return (
            f"test {self.metric}: {_fmt(self.metric, self.mean, self.ci)} "
            f"(95% CI, {self.episodes} episodes)"
        )

    def table(self) -> str:
        return "\n".join(f"{k:>16}  {_fmt(k, m, c)}" for k, (m, c) in self.stats.items())

    def to_dict(self) -> dict[str, Any]:
        """Its fields (``max_memory_mb`` only where measured) and the headline's ``mean`` and ``ci95``."""
        data = {k: v for k, v in asdict(self).items() if v is not None or k != "max_memory_mb"}
        return {**data, "mean": self.mean, "ci95": self.ci}

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Result:
        """The result :meth:`to_dict` wrote (``result.json``)."""
        stats = {k: (float(m), float(c)) for k, (m, c) in data["stats"].items()}
        return cls(data["metric"], int(data["episodes"]), stats, data.get("max_memory_mb"))


@dataclass
class SeedSummary:
    """Runs of one recipe that differ only in their seed: each run's result and, per metric, the mean over
    the runs with the sample standard deviation across them (the spread MAML++ and later papers report)."""

    names: list[str]
    seeds: list[int]
    results: list[Result]

    @property
    def metric(self) -> str:
        return self.results[0].metric

    def stats(self) -> dict[str, tuple[float, float]]:
        """Metric -> (mean over runs, sample std over runs; 0 for one run), for metrics every run has."""
        names = [k for k in self.results[0].stats if all(k in r.stats for r in self.results)]
        out = {}
        for k in names:
            values = [r.stats[k][0] for r in self.results]
            out[k] = (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
        return out

    def summary(self) -> str:
        mean, std = self.stats()[self.metric]
        return (
            f"test {self.metric} over {len(self.results)} seeds: {_fmt(self.metric, mean, std)} "
            f"(mean +- sample std over seeds)"
        )

    def table(self) -> str:
        rows = [
            f"seed {s:>4}  {_fmt(self.metric, r.mean, r.ci)} (95% CI, {r.episodes} episodes)  {n}"
            for n, s, r in zip(self.names, self.seeds, self.results)
        ]
        rows += [f"{k:>16}  {_fmt(k, m, s)}" for k, (m, s) in self.stats().items()]
        return "\n".join(rows)

    def to_dict(self) -> dict[str, Any]:
        stats = self.stats()
        return {
            "metric": self.metric, "runs": self.names, "seeds": self.seeds,
            "results": [r.to_dict() for r in self.results],
            "stats": stats, "mean": stats[self.metric][0], "std": stats[self.metric][1],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict())


def evaluate(
    method: Method,
    batches: Iterable[Any],
    device: torch.device | str = "cpu",
    progress: bool = False,
    gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
    precision: str = "fp32",
) -> Result:
    """Run ``method.evaluate`` over every batch and aggregate each per-episode metric.

    ``gather`` turns this process's per-episode values into every process's, in episode order, when the
    episodes are sharded over processes (:meth:`metashot.distributed.World.gather_episodes`). The
    forward runs as training's under ``precision`` (:func:`autocast`); on CUDA the result holds the peak
    memory since the last reset of its statistics.
    """
    from tqdm.auto import tqdm

    was_training = method.training
    method.eval()
    values: dict[str, list[torch.Tensor]] = {}
    try:  # the bar is cleared however the loop ends, so a message after it starts its own line
        with tqdm(batches, desc="evaluate", disable=not progress, leave=False) as bar:
            for batch in bar:
                with uninterrupted(), autocast(method, device, precision):
                    out = method.evaluate(batch.to(device))
                for k, v in out.items():
                    values.setdefault(k, []).append(v.detach().float().reshape(-1).cpu())
    finally:
        method.train(was_training)
    if not values:
        raise ValueError("evaluation got no episodes")
    every = {k: torch.cat(v) if gather is None else gather(torch.cat(v)) for k, v in values.items()}
    stats = {k: mean_ci(v) for k, v in every.items()}
    return Result(type(method).metric, len(every[type(method).metric]), stats, peak_memory_mb(device))
