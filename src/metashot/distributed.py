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

import datetime
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from metashot.errors import ConfigError, MetashotError

T = TypeVar("T")


class World:
    """This process's place in the run: ``rank`` of ``size`` processes, ``local_rank`` on its machine."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0) -> None:
        self.rank, self.size, self.local_rank = rank, size, local_rank

    @classmethod
    def from_env(cls, device: str, timeout_minutes: float = 10.0) -> World:
        """The world torchrun set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``), joined; one process
        without it. A rank that waits longer than ``timeout_minutes`` on a dead peer gives up."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        cuda = torch.device(device).type == "cuda"
        if cuda:
            torch.cuda.set_device(local_rank)
        if not dist.is_initialized():
            timeout = datetime.timedelta(minutes=timeout_minutes)
            # torchrun's agent hosts the store, whose keys outlive a restart: each attempt gets keys of its
            # own, so the ranks never read the dead group's addresses
            agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), size,
                                  is_master=rank == 0 and not agent, timeout=timeout)
            attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
            dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=size, timeout=timeout,
                                    store=dist.PrefixStore(f"metashot/{attempt}", store))
        return cls(rank, size, local_rank)

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
        """``name`` on this rank: a CUDA device becomes this rank's local GPU."""
        device = torch.device(name)
        if self.size > 1 and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def close(self) -> None:
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
        """Average the gradients over the ranks and sum ``flags``, in one all-reduce."""
        if self.size == 1:
            return flags
        # a parameter without a gradient (unused by this method's options) has none on every rank alike
        params = [p for p in params if p.grad is not None]
        grads = [p.grad for p in params]
        device = grads[0].device if grads else "cpu"
        flat = torch.cat([g.reshape(-1) for g in grads] + [torch.tensor(flags, device=device)])
        dist.all_reduce(flat)
        n = len(flags)
        offset = 0
        for p, g in zip(params, grads):
            p.grad = flat[offset:offset + g.numel()].view_as(g).div_(self.size)
            offset += g.numel()
        return flat[-n:].tolist()

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
    :meth:`fold` gathers every rank's records and replays torch's running-average update over all of
    them in global episode order (rank r's k-th episode of the step is the step's episode k * W + r),
    from the statistics before the step. A world of one records nothing.
    """

    def __init__(self, model: nn.Module, world: World) -> None:
        self.world = world
        self.norms = [m for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        self.calls: dict[nn.Module, list[torch.Tensor]] = {m: [] for m in self.norms}
        self.before: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        if world.size > 1:
            for m in self.norms:
                m.register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
        if not module.training:
            return
        if module not in self.before:
            self.before[module] = (module.running_mean.clone(), module.running_var.clone(),
                                   module.num_batches_tracked.clone())
        x = inputs[0].detach()
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())])  # over all but the channels
        self.calls[module].append(torch.stack([mean, var]).float())

    def fold(self, episodes: int) -> None:
        """Replace the running statistics by the fold over every rank's share of the step, this rank's
        ``episodes`` units (``Method.norm_units``: episodes, or groups of examples) of it."""
        if self.world.size == 1 or not self.before:
            return
        norms = [m for m in self.norms if self.calls[m]]
        local = [torch.stack(self.calls[m]) for m in norms]  # [calls, 2, C]: episode k's calls k-th
        ranks = self.world.all_gather(torch.cat([t.flatten() for t in local]))
        for i, m in enumerate(norms):
            offset = sum(t.numel() for t in local[:i])
            # [W, episodes, calls per episode, 2, C] -> the single process's order of episodes
            every = torch.stack([r[offset:offset + local[i].numel()].view_as(local[i]) for r in ranks])
            every = every.unflatten(1, (episodes, -1)).transpose(0, 1).flatten(0, 2)
            mean, var, tracked = self.before[m]
            for stats in every.to(mean.device):
                tracked = tracked + 1
                momentum = 1.0 / float(tracked) if m.momentum is None else m.momentum
                mean = (1 - momentum) * mean + momentum * stats[0]
                var = (1 - momentum) * var + momentum * stats[1]
            with torch.no_grad():
                m.running_mean.copy_(mean)
                m.running_var.copy_(var)
                m.num_batches_tracked.copy_(tracked)
            self.calls[m].clear()
        self.before.clear()
