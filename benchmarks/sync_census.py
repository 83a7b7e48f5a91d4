"""Host-sync census of one training step of every method: the reads back from the device that stall it.

A training step (the method's loss, backward and the optimizer's step, as the trainer runs them) should
never wait for the device: every ``.item()``, ``bool(tensor)``, ``.tolist()`` or ``.cpu()`` of a device
tensor, every tensor made from host data (``torch.tensor``: a copy to the device) and every boolean-mask
index (its size is read back) blocks the host until the device has caught up. Two counts:

- on CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` reports every synchronizing CUDA call; each is
  placed at the innermost frame outside torch (a sync inside backward is placed at ``backward()``);
- on any device, :func:`host_reads` patches those tensor methods (a CPU proxy: it sees the calls a CUDA
  run would sync on, whatever the device, but not reads inside torch's C++ code).

The first step is a warm-up (the optimizer's state, cuDNN's plans); the second is counted. Cases are
every method of :data:`metashot.methods.METHODS` at toy sizes, and MAML's variants (:data:`CASES`).

    OMP_NUM_THREADS=1 python benchmarks/sync_census.py                 # CPU proxy, one JSON line a case
    python benchmarks/sync_census.py --device cuda                     # CUDA's own census
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

import metashot
from metashot.batches import Episode, Examples, SequenceBatch, TaskInfo
from metashot.config import Config
from metashot.data.sequences import SequenceTask, instance_counts, string_labels
from metashot.evaluate import autocast
from metashot.methods import METHODS, build_method
from metashot.methods.base import Method

TORCH_DIR = str(Path(torch.__file__).parent)
METASHOT_DIR = str(Path(metashot.__file__).parent)
SKIPPED = (TORCH_DIR, warnings.__file__)  # the frames a read is never placed in
TENSOR_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "numpy", "nonzero", "cpu")
HOST_MADE = ("tensor", "as_tensor")  # torch.<name>: a tensor from host data
TRAIN_CLASSES = 20  # the toy training part's classes, for the methods trained on examples

# toy configs: every method on 5-way 1-shot 2-query episodes of 16 x 16 images (meta-batch 2), sequences
# of 5 classes x 3 instances, minibatches of 8 examples; MAML's paths and variants, and bf16 autocast
# (which the census's steps apply, the parity's not)
TOY = Config(method="protonet", task="omniglot", ways=5, shots=1, queries=2, meta_batch=2, batch_size=8,
             task_args={"instances": 3, "image_size": 16})
CASES: dict[str, Config] = {name: replace(TOY, method=name) for name in METHODS} | {
    "mann": replace(TOY, method="mann", method_args={"hidden": 32, "slots": 16, "width": 8}),
    "lstm": replace(TOY, method="lstm", method_args={"hidden": 32}),
    "maml-loop": replace(TOY, method="maml", method_args={"tasks": "loop"}),  # "maml" picks vmap here
    "maml++": replace(TOY, method="maml", method_args={
        "inner_steps": 2, "learned_lr": "lslr", "per_step_bn": True, "msl_steps": 100,
        "first_order_steps": 0, "batch_norm": "inductive"}),
    "maml-recompute": replace(TOY, method="maml", method_args={"inner_steps": 2, "recompute": True}),
    "maml-sinusoid": replace(TOY, method="maml", task="sinusoid", ways=1, shots=5, queries=5),
    "protonet-bf16": replace(TOY, precision="bf16"),
    "maml-first-order-bf16": replace(TOY, method="maml", method_args={"first_order": True}, precision="bf16"),
}


@dataclass(frozen=True)
class Read:
    """One blocking read: what (``item``, ``cuda-sync``, ...), where (``file:line`` outside torch), and
    whether that place is metashot's own code."""

    kind: str
    where: str
    ours: bool


# -- the cases ------------------------------------------------------------------------------------
def input_shape(cfg: Config) -> tuple[int, ...]:
    """One example's shape on ``cfg.task``: a scalar for the sinusoid, else images of ``task_args``'
    ``image_size``, Omniglot's 28 px grey, the natural-image tasks' 84 px RGB by default."""
    if cfg.task == "sinusoid":
        return (1,)
    grey = cfg.task.startswith("omniglot")
    size = int(cfg.task_args.get("image_size", 28 if grey else 84))
    return (1 if grey else 3, size, size)


def task_info(cfg: Config, kind: str) -> TaskInfo:
    """What the method learns of ``cfg``'s tasks, as its source would say, without the data."""
    shape = input_shape(cfg)
    if kind == "sequences":
        return SequenceTask.pop(dict(cfg.task_args), cfg.ways).info(shape)
    return TaskInfo(shape, cfg.ways, cfg.train_ways, regression=cfg.task == "sinusoid",
                    train_classes=TRAIN_CLASSES)


def random_batch(cfg: Config, kind: str, g: torch.Generator) -> Any:
    """A random training batch of ``cfg``'s shapes (the episodes' labels class-major, as the sampler's)."""
    shape = input_shape(cfg)
    if kind == "examples":
        n = cfg.batch_size
        return Examples(torch.rand(n, *shape, generator=g), torch.randint(TRAIN_CLASSES, (n,), generator=g),
                        torch.arange(n))
    b = cfg.meta_batch
    if kind == "sequences":
        task = SequenceTask.pop(dict(cfg.task_args), cfg.ways)
        t = task.classes * task.instances
        label = torch.stack([torch.arange(task.classes).repeat_interleave(task.instances)[
            torch.randperm(t, generator=g)] for _ in range(b)])
        codes = torch.randperm(3125, generator=g)[:task.classes]
        y = string_labels(codes)[label] if task.labels == "string" else label
        return SequenceBatch(torch.rand(b, t, *shape, generator=g), y, instance_counts(label, task.classes))
    ways, shots, queries = cfg.train_ways, cfg.train_shots, cfg.train_queries
    if cfg.task == "sinusoid":
        x = torch.rand(b, shots + queries, 1, generator=g) * 10 - 5
        y = torch.rand(b, 1, 1, generator=g) * 5 * torch.sin(x + torch.rand(b, 1, 1, generator=g) * 3)
        return Episode(x[:, :shots], y[:, :shots], x[:, shots:], y[:, shots:])
    labels = torch.arange(ways)
    return Episode(torch.rand(b, ways * shots, *shape, generator=g),
                   labels.repeat_interleave(shots).expand(b, -1).contiguous(),
                   torch.rand(b, ways * queries, *shape, generator=g),
                   labels.repeat_interleave(queries).expand(b, -1).contiguous(), ways)


def make_case(cfg: Config, device: torch.device | str, dtype: torch.dtype = torch.float32,
              seed: int = 0) -> tuple[Method, Any, torch.optim.Optimizer]:
    """``cfg``'s method (seeded), a random batch of its training shapes, both on ``device`` in ``dtype``,
    and its optimizer."""
    kind = METHODS[cfg.method].train_batches
    torch.manual_seed(seed)
    method = build_method(cfg, task_info(cfg, kind)).to(device, dtype)
    batch = random_batch(cfg, kind, torch.Generator().manual_seed(seed)).to(device)
    batch = type(batch)(*(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
                          for t in _fields(batch)))
    return method, batch, cfg.make_optimizer(method.param_groups(cfg.lr))


def _fields(batch: Any) -> list[Any]:
    if isinstance(batch, Episode):
        return [getattr(batch, name) for name in Episode.TENSORS] + [batch.num_ways]
    return list(vars(batch).values())


def train_step(method: Method, batch: Any, optimizer: torch.optim.Optimizer, step: int,
               precision: str = "fp32") -> torch.Tensor:
    """One training step as the trainer's: the method's schedules, loss (under ``precision``'s autocast,
    :func:`metashot.evaluate.autocast`), backward, optimizer step. The loss, detached."""
    method.on_step(step)
    with autocast(method, next(method.parameters()).device, precision):
        loss, _ = method.loss(batch)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.detach()


# -- counting -------------------------------------------------------------------------------------
def _place(frame: Any) -> Read | None:
    """The innermost frame from ``frame`` outward that is not torch's (nor the warnings module's), as a
    :class:`Read` of no kind yet."""
    while frame is not None and frame.f_code.co_filename.startswith(SKIPPED):
        frame = frame.f_back
    if frame is None:
        return None
    file = frame.f_code.co_filename
    return Read("", f"{Path(file).name}:{frame.f_lineno}", file.startswith(METASHOT_DIR))


def _bool_index(key: Any) -> bool:
    keys = key if isinstance(key, tuple) else (key,)
    return any(isinstance(k, torch.Tensor) and k.dtype == torch.bool for k in keys)


@contextlib.contextmanager
def host_reads() -> Iterator[list[Read]]:
    """Inside: every host read of a tensor (:data:`TENSOR_READS`), tensor made from host data
    (:data:`HOST_MADE`) and boolean-mask index is recorded in the yielded list, with its place."""
    reads: list[Read] = []

    def record(kind: str) -> None:
        place = _place(sys._getframe(2))
        if place is not None:
            reads.append(replace(place, kind=kind))

    def wrap(owner: Any, name: str, kind: str, when: Callable[..., bool] = lambda *a, **k: True) -> Any:
        original = getattr(owner, name)

        def counted(*args: Any, **kwargs: Any) -> Any:
            if when(*args, **kwargs):
                record(kind)
            return original(*args, **kwargs)

        return original, counted

    patches = [(torch.Tensor, n, *wrap(torch.Tensor, n, n)) for n in TENSOR_READS]
    patches += [(torch, n, *wrap(torch, n, f"torch.{n}")) for n in HOST_MADE + ("nonzero",)]
    patches.append((torch.Tensor, "__getitem__",
                    *wrap(torch.Tensor, "__getitem__", "bool-index", lambda t, key: _bool_index(key))))
    saved = [(owner, name, owner.__dict__.get(name)) for owner, name, _, _ in patches]
    try:
        for owner, name, _, counted in patches:
            setattr(owner, name, counted)
        yield reads
    finally:
        for owner, name, before in saved:
            if before is None:
                delattr(owner, name)
            else:
                setattr(owner, name, before)


@contextlib.contextmanager
def cuda_syncs() -> Iterator[list[Read]]:
    """Inside: every synchronizing CUDA call (``torch.cuda.set_sync_debug_mode("warn")``) is recorded
    in the yielded list, with its place."""
    reads: list[Read] = []

    def show(message: Any, category: type, filename: str, lineno: int, *rest: Any) -> None:
        if "synchroniz" in str(message):
            place = _place(sys._getframe(1)) or Read("", f"{Path(filename).name}:{lineno}", False)
            reads.append(replace(place, kind="cuda-sync"))

    torch.cuda.synchronize()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.showwarning = show
        torch.cuda.set_sync_debug_mode("warn")
        try:
            yield reads
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()


def census(name: str, device: torch.device | str = "cpu", cfg: Config | None = None) -> dict[str, Any]:
    """The reads of two training steps of case ``name`` (:data:`CASES`, or ``cfg``) on ``device``: CUDA's
    own census on a CUDA device, :func:`host_reads` elsewhere. The second step is the one that counts
    ("reads", "in_metashot": those in metashot's code); the first, a warm-up, may also set up the
    optimizer's state and the device's libraries ("warmup_reads")."""
    device, cfg = torch.device(device), cfg or CASES[name]
    method, batch, optimizer = make_case(cfg, device)
    counter = cuda_syncs if device.type == "cuda" else host_reads
    with counter() as first:
        train_step(method, batch, optimizer, 0, cfg.precision)
    with counter() as reads:
        train_step(method, batch, optimizer, 1, cfg.precision)
    return {"case": name, "device": str(device), "counter": counter.__name__, "warmup_reads": len(first),
            "reads": len(reads), "in_metashot": sum(r.ours for r in reads),
            "where": sorted({f"{r.kind} {r.where}" for r in reads})[:12]}


# -- timing ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def tf32(on: bool) -> Iterator[None]:
    """TF32 matmuls and cuDNN convolutions on or off inside (torch's own default has cuDNN's on)."""
    b = torch.backends
    saved = b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32
    b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = on
    try:
        yield
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = saved


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def toy(cfg: Config) -> Config:
    """``cfg`` at toy sizes: 2 episodes of at most 5 ways and 1 query, 16 px images, 2 instances."""
    return replace(cfg, meta_batch=min(cfg.meta_batch, 2), ways=min(cfg.ways, 5),
                   train_ways=min(cfg.train_ways, 5), train_queries=1,
                   task_args=cfg.task_args | {"image_size": 16, "instances": 2})


def time_steps(cfg: Config, device: torch.device, steps: int = 10, warmup: int = 3, allow_tf32: bool = False,
               precision: str = "fp32") -> dict[str, Any]:
    """``steps`` training steps of ``cfg`` on a random batch of its shapes, after ``warmup``: ms a step,
    steps/s, episodes (or examples) a second, and the peak memory (the device's, else the process's
    resident set)."""
    import resource

    method, batch, optimizer = make_case(cfg, device)
    with tf32(allow_tf32):
        t0 = time.perf_counter()
        for i in range(warmup):
            train_step(method, batch, optimizer, i, precision)
        synchronize(device)
        warm_s = time.perf_counter() - t0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        for i in range(steps):
            train_step(method, batch, optimizer, warmup + i, precision)
        synchronize(device)
        dt = (time.perf_counter() - t0) / steps
    cuda = device.type == "cuda"
    memory = torch.cuda.max_memory_allocated(device) if cuda else resource.getrusage(
        resource.RUSAGE_SELF).ru_maxrss * 1024
    items = batch.support.shape[0] if isinstance(batch, Episode) else len(batch)
    return {"ms_per_step": round(dt * 1e3, 2), "steps_per_s": round(1 / dt, 2),
            "items_per_s": round(items / dt, 1), "warmup_s": round(warm_s, 1),
            "max_memory_mb": round(memory / 2**20, 1), "memory_of": "cuda" if cuda else "rss"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    args = parser.parse_args()
    for name in args.cases:
        print(json.dumps(census(name, args.device)), flush=True)


if __name__ == "__main__":
    main()
