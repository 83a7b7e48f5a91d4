"""Many processes, one run: torch.distributed under ``torchrun``. The only module that talks to other ranks.

``World.from_env()`` joins the process group torchrun describes in the environment (gloo on CPU, nccl on
CUDA with each rank on its local GPU) or, without torchrun, is a world of one where every exchange is a
no-op. Per optimizer step there is one all-reduce: every gradient, flattened into one buffer, summed and
divided by the world size (each rank's loss is the mean over its equal share of the meta-batch, so this
is the gradient of the mean over the global meta-batch), with the step's stop flags (time limit, signal)
riding along so that every rank stops at the same step. Batch norm runs per episode on each rank (no
SyncBN: MAML's transductive statistics are per task); the running statistics a metric method keeps for
evaluation are then folded, after each step, in the single process's episode order from every rank's
batch statistics, so they too match one process. Evaluation episodes are sharded and their per-episode
metrics gathered back into the single process's order.
"""

from __future__ import annotations

import atexit
import datetime
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from metashot.devices import check_device, local_placement
from metashot.errors import ConfigError, MetashotError

T = TypeVar("T")
BACKENDS = ("nccl", "gloo")


class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` of ``local_size`` on
    its machine, its ``home`` device (the training device, where the exchanges' tensors live)."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, local_size: int = 1,
                 home: torch.device | str = "cpu") -> None:
        self.rank, self.size, self.local_rank, self.local_size = rank, size, local_rank, local_size
        self.home = torch.device(home)
        self._flags: tuple[torch.Tensor, Any] | None = None  # a step's summed flags on their way, an event

    @classmethod
    def from_env(cls, device: str, timeout_minutes: float = 10.0) -> World:
        """The world torchrun set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``), joined,
        on ``device`` resolved for this rank (:func:`metashot.devices.check_device`); one process without
        it. The backend is nccl on CUDA, else gloo; ``METASHOT_DIST_BACKEND`` (gloo, nccl) chooses
        another, e.g. gloo for ranks sharing one GPU. A rank that waits longer than ``timeout_minutes`` on
        a dead peer gives up. The group is destroyed when the process exits, however it ends."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls(home=check_device(device))
        rank, (local_rank, local_size) = int(os.environ["RANK"]), local_placement()
        home = check_device(device, local_rank, local_size)
        if home.type == "cuda":
            torch.cuda.set_device(home)  # checked against the GPUs this rank sees
        backend = os.environ.get("METASHOT_DIST_BACKEND") or ("nccl" if home.type == "cuda" else "gloo")
        if backend not in BACKENDS:
            raise ConfigError(f"METASHOT_DIST_BACKEND={backend}: expected one of {', '.join(BACKENDS)}")
        world = cls(rank, size, local_rank, local_size, home)
        if not dist.is_initialized():
            timeout = datetime.timedelta(minutes=timeout_minutes)
            # torchrun's agent hosts the store, whose keys outlive a restart: each attempt gets keys of its
            # own, so the ranks never read the dead group's addresses
            agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                                  is_master=rank == 0 and not agent, timeout=timeout)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group(backend, rank=rank, world_size=size, timeout=timeout,
                                    store=dist.PrefixStore(f"metashot/{attempt}", store))
            atexit.register(world.close)  # the one place: after an error or a signal too
        return world

    @property
    def writer(self) -> bool:
        """Whether this process writes the run folder and talks to the user (rank 0)."""
        return self.rank == 0

    @property
    def shard(self) -> dict[str, int]:
        """This process's share of a loader's episodes: ``source.loader(..., **world.shard)``."""
        return {"rank": self.rank, "world_size": self.size}

    def check_shares(
        self, meta_batch: int, val_episodes: int, test_episodes: int, kind: str = "episodes"
    ) -> None:
        """Every process needs an equal share of each meta-batch (of each batch of examples, for a method
        trained on ``kind`` "examples") and an evaluation episode at least."""
        if kind == "examples" and meta_batch % self.size:
            raise ConfigError(f"--batch-size {meta_batch} does not split evenly over {self.size} processes: "
                              f"pass a multiple of {self.size} (the global number of examples per step)")
        if meta_batch % self.size:
            raise ConfigError(
                f"--meta-batch {meta_batch} does not split evenly over {self.size} processes: pass a "
                f"multiple of {self.size} (it is the global number of episodes per optimizer step; "
                f"ProtoNet's and Matching Networks' presets train one episode per step, so pass "
                f"--meta-batch {self.size} to train one per process)"
            )
        for name, episodes in (("val_episodes", val_episodes), ("test_episodes", test_episodes)):
            if episodes < self.size:
                raise ConfigError(f"{name} {episodes} is fewer than the {self.size} processes: every process "
                                  "needs an episode")

    def device(self, name: str) -> torch.device:
        """``name`` on this rank (:func:`metashot.devices.check_device`): auto resolved, a CUDA device
        this rank's own GPU."""
        return check_device(name, self.local_rank, self.local_size)

    def close(self) -> None:
        """Destroy the process group (once; :meth:`from_env` also calls it at exit)."""
        self.start_steps()
        if self.size > 1 and dist.is_initialized():
            dist.destroy_process_group()

    # -- agreement -----------------------------------------------------------------------------
    def raise_any(self, error: MetashotError | None) -> None:
        """Raise on every rank if any rank has an ``error`` (the lowest rank's), so none is left waiting."""
        if self.size == 1:
            if error is not None:
                raise error
            return
        errors: list[Any] = [None] * self.size
        dist.all_gather_object(errors, None if error is None else (type(error), str(error)))
        for rank, found in enumerate(errors):
            if found is not None:
                kind, message = found
                raise kind(message if rank == self.rank else f"rank {rank}: {message}")

    def first(self, fn: Callable[[], T]) -> T:
        """``fn()`` on each machine's local rank 0, then on the others (a download or a cache is built
        once per machine); a user error on any rank is raised on all."""
        result: Any = None
        for turn in (True, False):
            error = None
            if (self.local_rank == 0) == turn:
                try:
                    result = fn()
                except MetashotError as e:
                    error = e
            self.raise_any(error)
        return result

    # -- the step ------------------------------------------------------------------------------
    def sync_step(self, params: Iterable[nn.Parameter], flags: list[float]) -> list[float]:
        """Average the gradients over the ranks and sum ``flags`` (the stop flags) with them, in one
        all-reduce on this rank's device.

        Returns the summed flags: on the CPU this step's; on CUDA the previous step's (zeros at the first),
        since reading this step's would hold the host until the step's end on the GPU: they come back
        behind the next step's work instead, and every rank acts on them one step late alike.
        """
        if self.size == 1:
            return flags
        # a parameter without a gradient (unused by this method's options) has none on every rank alike
        params = [p for p in params if p.grad is not None]
        grads = [p.grad for p in params]
        device = grads[0].device if grads else self.home
        cuda = device.type == "cuda"
        own = torch.tensor(flags, pin_memory=cuda).to(device, non_blocking=cuda)
        flat = torch.cat([g.reshape(-1) for g in grads] + [own])
        dist.all_reduce(flat)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).div_(self.size)
            offset += g.numel()
        summed = flat[offset:]
        return self.late_flags(summed) if cuda else summed.tolist()

    def start_steps(self) -> None:
        """A new loop of steps (a run, a stage of a staged run): no late flags carry over into it."""
        self._flags = None

    def late_flags(self, summed: torch.Tensor) -> list[float]:
        """The previous step's summed flags (zeros at the first step), and ``summed`` [n] sent on its way
        to the host, to be read at the next step (by then the GPU is done with it)."""
        previous = [0.0] * len(summed)
        if self._flags is not None:
            host, done = self._flags
            if done is not None:
                done.synchronize()  # the copy ran behind this step's work, queued since
            previous = host.tolist()
        cuda = summed.is_cuda
        host = torch.empty(len(summed), dtype=summed.dtype, pin_memory=cuda)
        host.copy_(summed, non_blocking=cuda)
        done = torch.cuda.Event() if cuda else None
        if done is not None:
            done.record()
        self._flags = (host, done)
        return previous

    def mean(self, values: torch.Tensor) -> torch.Tensor:
        """The mean of ``values`` over the ranks."""
        if self.size == 1:
            return values
        values = values.clone()
        dist.all_reduce(values)
        return values / self.size

    def all_gather(self, values: torch.Tensor) -> list[torch.Tensor]:
        """``values`` (the same shape on every rank) of every rank, in rank order."""
        if self.size == 1:
            return [values]
        out = [torch.empty_like(values) for _ in range(self.size)]
        dist.all_gather(out, values.contiguous())
        return out

    def gather_episodes(self, values: torch.Tensor) -> torch.Tensor:
        """Per-episode values [n_r] of this rank's episodes r, r + W, r + 2W, ... -> all of them [N]
        in episode order, on every rank."""
        if self.size == 1:
            return values
        parts: list[Any] = [None] * self.size
        dist.all_gather_object(parts, values.cpu())
        out = torch.empty(sum(len(p) for p in parts), *values.shape[1:], dtype=values.dtype)
        for rank, part in enumerate(parts):
            out[rank::self.size] = part
        return out


class RunningStats:
    """Batch-norm running statistics folded over the ranks in the single process's episode order.

    Records each training-mode batch-norm call's batch mean and unbiased variance; after the step,
    :meth:`fold` gathers every rank's records (one all-gather) and computes torch's running-average
    update over all of them in global episode order (rank r's k-th episode of the step is the step's
    episode k * W + r), from the statistics before the step, in closed form: after T calls with momentum
    m, x_T = (1 - m)^T x_0 + sum_t m (1 - m)^(T - 1 - t) s_t (t from 0); with momentum None (the cumulative
    average over n_0 calls before), x_T = (n_0 x_0 + sum_t s_t) / (n_0 + T). A fold is a few kernels per
    layer (the weights are computed once per layout, the updates are foreach ops), however many calls the
    step made. A world of one records nothing.
    """

    def __init__(self, model: nn.Module, world: World) -> None:
        self.world = world
        self.norms = [m for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.calls: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in self.norms}
        self.before: list[torch.Tensor] = []  # each layer's mean and variance, then every tracked count
        self._plan: tuple[Any, list[torch.Tensor]] | None = None  # (layout, each layer's weights [W, c])
        if world.size > 1:
            for m in self.norms:
                m.register_forward_pre_hook(self._record)

    def _buffers(self) -> list[torch.Tensor]:
        return [b for m in self.norms for b in (m.running_mean, m.running_var)]

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if not module.training:
            return
        if not self.before:  # the step's first call: no layer has updated its statistics yet
            self.before = [*torch._foreach_mul(self._buffers(), 1.0),  # copies, in one kernel
                           torch.stack([m.num_batches_tracked for m in self.norms])]
        x = inputs[0].detach().float()  # bfloat16 under autocast: statistics in float32, as batch norm's
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())])  # over all but the channels
        self.calls[module].append(torch.stack([mean, var]))

    def _weights(self, episodes: int, counts: list[int], device: torch.device) -> list[torch.Tensor]:
        """Each recording layer's weights [W, c] of its c calls on each rank: call j of a rank's episode
        e (of ``episodes``) on rank r is the layer's call t = (e W + r) k + j of the step, k its calls per
        episode, of T = W c: weight m (1 - m)^(T - 1 - t) with momentum m, else 1."""
        layout = (episodes, tuple(counts), device)
        if self._plan is None or self._plan[0] != layout:
            w, weights = self.world.size, []
            for m, c in zip(self.norms, counts):
                if c:  # made on the device: no copy from the host
                    k = c // episodes
                    t = torch.arange(episodes * k, device=device).view(1, episodes, k)
                    t = ((t // k) * w + torch.arange(w, device=device).view(w, 1, 1)) * k + t % k
                    t, rate = t.reshape(w, c).float(), m.momentum
                    weight = torch.ones_like(t) if rate is None else rate * (1 - rate) ** (w * c - 1 - t)
                    weights.append(weight)
            self._plan = (layout, weights)
        return self._plan[1]

    def fold(self, episodes: int) -> None:
        """Replace the running statistics by the fold over every rank's share of the step, this rank's
        ``episodes`` units (``Method.norm_units``: episodes, or groups of examples) of it."""
        if self.world.size == 1 or not self.before:
            return
        w, counts = self.world.size, [len(self.calls[m]) for m in self.norms]
        local = torch.cat([torch.stack(self.calls[m]).flatten() for m in self.norms if self.calls[m]])
        every = torch.stack(self.world.all_gather(local))  # [W, this rank's records]: every rank's
        weights = iter(self._weights(episodes, counts, local.device))
        new, offset = list(self.before[:-1]), 0
        for i, (m, c) in enumerate(zip(self.norms, counts)):
            if c:
                size = 2 * m.running_mean.numel()
                block = every[:, offset:offset + c * size].view(w, c, size)
                sums = torch.einsum("wcf,wc->f", block, next(weights)).view(2, -1)  # the weighted records
                new[2 * i:2 * i + 2] = self._update(i, w * c, sums)
                offset += c * size
        with torch.no_grad():
            torch._foreach_copy_(self._buffers(), new)
            tracked = torch._foreach_add(list(self.before[-1].unbind()), [w * c for c in counts])
            torch._foreach_copy_([m.num_batches_tracked for m in self.norms], tracked)
        for calls in self.calls.values():
            calls.clear()
        self.before = []

    def _update(self, i: int, total: int, sums: torch.Tensor) -> list[torch.Tensor]:
        """Layer ``i``'s mean and variance after ``total`` calls whose weighted statistics sum to ``sums``
        [2, C] (the class docstring's closed forms)."""
        before, momentum = self.before[2 * i:2 * i + 2], self.norms[i].momentum
        if momentum is None:
            n0 = self.before[-1][i].float()
            return list(((n0 * torch.stack(before) + sums) / (n0 + total)).unbind())
        return torch._foreach_add(torch._foreach_mul(before, (1 - momentum) ** total), list(sums.unbind()))
