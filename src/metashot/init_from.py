"""A run that starts from another run's weights (``init_from`` and ``init_prefix`` of the config).

The checkpoint is a run folder's ``best.pt`` (else its ``last.pt``; a staged run's: its last stage's) or
a file, read with the safe loader (:func:`metashot.runs.load_checkpoint`: tensors and plain data only).
Only its weights whose keys start with the prefix are loaded, each into the same key of the new method,
and those must match the new method's weights under the prefix one for one, in name and shape: a
problem is one :class:`~metashot.errors.CheckpointError` (or :class:`~metashot.errors.ConfigError` for a
prefix the new method has no weights under) raised before anything is trained or written.
"""

from __future__ import annotations

import os
from pathlib import Path

from torch import nn

from metashot.checkpoints import load_checkpoint, mismatch
from metashot.config import Config, stage_marker
from metashot.errors import CheckpointError, ConfigError
from metashot.runs import RunFolder


def init_checkpoint(init_from: str) -> Path:
    """The checkpoint ``init_from`` names: a run folder's best.pt, else its last.pt, or a file."""
    from metashot.stages import stage_folder

    path = Path(init_from).expanduser()
    if path.is_dir():
        folder = RunFolder(stage_folder(path))
        for checkpoint in (folder.best, folder.last):
            if checkpoint.is_file():
                return checkpoint
        raise CheckpointError(f"--init-from {init_from}: {folder.path} holds no best.pt or last.pt; is it a "
                              "run folder that saved a checkpoint?")
    if not path.is_file():
        raise CheckpointError(f"--init-from {init_from}: no such run folder or checkpoint file")
    return path


def _prefixes(keys: list[str]) -> str:
    return ", ".join(sorted({k.split(".")[0] + "." for k in keys})) or "none"


def init_weights(method: nn.Module, cfg: Config) -> Config:
    """Load ``cfg.init_from``'s weights under ``cfg.init_prefix`` into ``method`` (see the module);
    returns ``cfg`` with ``init_from`` absolute, as a run folder saves it. Nothing to do without one."""
    if cfg.init_from is None:
        return cfg
    if stage_marker(cfg.init_from) is not None:
        raise ConfigError(f"--init-from {cfg.init_from} names a stage of a staged preset, which only "
                          "`metashot train --preset` of that recipe resolves; give a run folder")
    path = init_checkpoint(cfg.init_from)
    weights = load_checkpoint(path)["method"]
    prefix = cfg.init_prefix
    own = {k: v for k, v in method.state_dict().items() if k.startswith(prefix)}
    if not own:
        raise ConfigError(f"--init-prefix {prefix!r}: {cfg.method} has no weights under it (its weights' "
                          f"prefixes: {_prefixes(list(method.state_dict()))})")
    if not isinstance(weights, dict):
        raise CheckpointError(f"{path}: its weights are {type(weights).__name__}, not a dict of tensors")
    if hasattr(method, "upgrade_weights"):
        weights = method.upgrade_weights(weights)
    theirs = {k: v for k, v in weights.items() if k.startswith(prefix)}
    if not theirs:
        raise CheckpointError(f"{path}: no weights under {prefix!r} to start {cfg.method} from (its weights' "
                              f"prefixes: {_prefixes(list(weights))}); choose another --init-prefix")
    if (problem := mismatch(own, theirs)) is not None:
        raise CheckpointError(f"{path}: its weights under {prefix!r} do not fit {cfg.method}'s ({problem})")
    method.load_state_dict(theirs, strict=False)  # the keys outside the prefix keep their initialisation
    return cfg.replace(init_from=os.path.abspath(Path(cfg.init_from).expanduser()))
