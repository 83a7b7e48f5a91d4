"""Checkpoint files: written whole, read without running code, and loaded into a network only when they fit.

Checkpoints hold tensors and plain data only and load with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import io
import pickle
import re
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from metashot.errors import CheckpointError
from metashot.io import atomic_write


def serialized(state: dict[str, Any]) -> Callable[[IO[bytes]], None]:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return lambda f: f.write(buffer.getbuffer())


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    atomic_write(path, serialized(state))


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint without executing code from it (tensors and plain data only)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint")
    if path.stat().st_size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes), not a checkpoint")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # torch raises several types for a damaged or foreign file
        text = str(e).strip() or type(e).__name__
        reason = text.splitlines()[0]
        if isinstance(e, pickle.UnpicklingError) and text.startswith("Weights only load failed"):
            # around its unpickler's reason torch advises loading with weights_only=False: never here
            if found := re.search(r"GLOBAL ([\w.]+)", text):  # a function or class to import and call
                raise CheckpointError(f"{path}: this file would run code when read (it names "
                                      f"{found.group(1)}); metashot loads only tensors and plain data, so "
                                      "it is not a metashot checkpoint") from e
            found = re.search(r"WeightsUnpickler error:\s*(\S.*)", text)
            reason = found.group(1).strip() if found else "not a pickle of tensors and plain data"
        raise CheckpointError(f"{path}: truncated, corrupt or not a metashot checkpoint ({reason})") from e
    if not isinstance(state, dict) or "method" not in state:
        raise CheckpointError(f"{path}: not a metashot checkpoint (no 'method' weights in it)")
    return state


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (f" and {len(keys) - n} more" if len(keys) > n else "")


def mismatch(module: nn.Module | dict[str, torch.Tensor], weights: Any) -> str | None:
    """What keeps ``weights`` from loading into ``module`` (or into weights of these names and shapes):
    its first mismatching keys, else None."""
    if not isinstance(weights, dict):
        return f"the weights are {type(weights).__name__}, not a dict of tensors"
    own = module if isinstance(module, dict) else module.state_dict()
    shape = {k: tuple(getattr(v, "shape", ())) for k, v in weights.items()}
    sizes = [f"{k} {list(shape[k])} (the network's: {list(v.shape)})"
             for k, v in own.items() if k in shape and shape[k] != tuple(v.shape)]
    problems = [f"{what}: {_first(keys)}" for what, keys in (
        ("not tensors", [k for k, v in weights.items() if k in own and not isinstance(v, torch.Tensor)]),
        ("size mismatch", sizes),
        ("missing keys", [k for k in own if k not in weights]),
        ("unexpected keys", [k for k in weights if k not in own]),
    ) if keys]
    return "; ".join(problems) or None


def load_weights(module: nn.Module, weights: Any, path: Path, cfg_path: Path | None = None) -> None:
    """``module.load_state_dict(weights)``, else a :class:`CheckpointError` naming the checkpoint
    ``path`` (and the config ``cfg_path`` the network was built from) and the first keys that do not fit."""
    if isinstance(weights, dict) and hasattr(module, "upgrade_weights"):
        weights = module.upgrade_weights(weights)
    problem = mismatch(module, weights)
    if problem is not None:
        built = f"the network of {cfg_path}" if cfg_path is not None else "the network"
        raise CheckpointError(f"{path}: its weights do not fit {built} ({problem})")
    module.load_state_dict(weights)
