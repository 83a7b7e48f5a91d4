"""Where a process computes and with what numerics: ``--device auto`` resolved for this process (its
local rank's GPU under torchrun) and torch's precision and determinism settings, stated in one place."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import torch

from metashot.errors import ConfigError


def pick_device(name: str, cuda_count: int, mps: bool, local_rank: int = 0, local_size: int = 1) -> str:
    """The device ``name`` (auto, cpu, cuda, cuda:N, mps) means for local rank ``local_rank`` of
    ``local_size`` processes on a machine that shows each ``cuda_count`` GPUs and has MPS or not (``mps``).

    auto is a GPU when there is one, else MPS, else the CPU. One process uses the CUDA index given. Of
    several processes on a machine each takes its own GPU: cuda:0 where it sees exactly one (a scheduler's
    ``--gpus-per-task=1``, or ranks sharing one over gloo), else cuda:LOCAL_RANK; more processes than the
    GPUs shown, or a CUDA device where none is, is a :class:`ConfigError`.
    """
    device = torch.device(("cuda" if cuda_count else "mps" if mps else "cpu") if name == "auto" else name)
    if device.type == "mps" and not mps:
        raise ConfigError(f"--device {name}: MPS is not available here; use --device auto or cpu")
    if device.type != "cuda":
        return str(device)
    if not cuda_count or (local_size == 1 and (device.index or 0) >= cuda_count):
        raise ConfigError(f"--device {name}: this machine has {cuda_count} CUDA device(s); use --device auto "
                          "or cpu")
    if local_size == 1:
        return str(device)
    if cuda_count == 1:
        return "cuda:0"
    if local_size > cuda_count:
        raise ConfigError(f"--device {name}: {local_size} processes on this machine but it shows "
                          f"{cuda_count} GPUs; start at most {cuda_count} per machine (torchrun "
                          f"--nproc-per-node {cuda_count}) or show each process one GPU (SLURM "
                          "--gpus-per-task=1)")
    return f"cuda:{local_rank}"


def local_placement() -> tuple[int, int]:
    """This process's local rank and the processes on its machine: ``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``
    as torchrun sets them. A launcher that sets only ``LOCAL_RANK`` (some srun or mpirun wrappers) gives
    at least ``LOCAL_RANK + 1`` processes, so that rank still takes its own GPU, not the first."""
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    return local_rank, int(os.environ.get("LOCAL_WORLD_SIZE") or 0) or local_rank + 1


def check_device(name: str, local_rank: int = 0, local_size: int = 1) -> torch.device:
    """``name`` as a device this machine has, for local rank ``local_rank`` of ``local_size`` processes
    (:func:`pick_device`: auto resolved, a rank's own GPU), else :class:`ConfigError`."""
    if name != "auto":
        try:
            device = torch.device(name)
        except (RuntimeError, ValueError):
            raise ConfigError(f"--device {name!r} is not a device; expected cpu, cuda, cuda:N or mps, or "
                              "auto (the default)") from None
        if device.type not in ("cpu", "cuda", "mps"):
            raise ConfigError(f"--device {name}: unsupported device type; expected auto, cpu, cuda, cuda:N "
                              "or mps")
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    return torch.device(pick_device(name, cuda_count, torch.backends.mps.is_available(), local_rank,
                                    local_size))


@contextlib.contextmanager
def numerics(precision: str = "fp32", deterministic: bool = False) -> Iterator[None]:
    """torch's numerics for a run, stated here rather than left to torch's defaults, restored on leaving.

    TF32 matmuls and cuDNN convolutions only with ``precision`` "tf32" (fp32, and bf16's float32 parts, are
    true float32: torch's own default lets cuDNN convolutions use TF32); ``cudnn.benchmark`` off (the
    kernels it picks may differ between a run and its resume). ``deterministic``: deterministic kernels
    (``torch.use_deterministic_algorithms``, an op without one is an error), cuBLAS's fixed workspace
    (``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless set; read when cuBLAS starts) and ``cudnn.deterministic``.
    """
    b = torch.backends
    saved = (b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic,
             torch.are_deterministic_algorithms_enabled(), os.environ.get("CUBLAS_WORKSPACE_CONFIG"))
    b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = precision == "tf32"
    b.cudnn.benchmark = False
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        b.cudnn.deterministic = True
        torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32, b.cudnn.benchmark, b.cudnn.deterministic = saved[:4]
        torch.use_deterministic_algorithms(saved[4])
        if saved[5] is None:
            os.environ.pop("CUBLAS_WORKSPACE_CONFIG", None)
