"""MAML's arguments (:class:`~metashot.methods.maml.MAML`): their checks, and the deprecated
``method_args`` keys that saved configs may still hold."""

from __future__ import annotations

import warnings
from typing import Any

from metashot.methods.batchnorm import BatchNorm


def check_options(
    inner_steps: int, test_inner_steps: int | None, batch_norm: str, tasks: str, learned_lr: str,
    msl_steps: int, first_order_steps: int, recompute: bool,
) -> None:
    """A ValueError for an option out of its range, or for options MAML cannot combine."""
    if inner_steps < 0 or (test_inner_steps is not None and test_inner_steps < 0):
        raise ValueError("inner step counts must be >= 0")
    if batch_norm not in ("transductive", "inductive"):
        raise ValueError(f"batch_norm must be 'transductive' or 'inductive', got {batch_norm!r}")
    if tasks not in ("auto", "loop", "vmap"):
        raise ValueError(f"tasks must be 'auto', 'loop' or 'vmap', got {tasks!r}")
    if learned_lr not in ("none", "lslr", "metasgd"):
        raise ValueError(f"learned_lr must be 'none', 'lslr' or 'metasgd', got {learned_lr!r}")
    if msl_steps < 0 or first_order_steps < 0:
        raise ValueError("msl_steps and first_order_steps count optimizer steps: they must be >= 0")
    if msl_steps and inner_steps < 1:
        raise ValueError("msl_steps weighs the query loss after each inner step: needs inner_steps >= 1")
    if recompute and tasks == "vmap":
        raise ValueError(
            "recompute=True recomputes each inner step in a custom autograd function, which "
            "torch.vmap cannot batch: use tasks='loop'"
        )


def check_batch_norm(bns: list[BatchNorm], batch_norm: str, tasks: str, per_step_bn: bool) -> None:
    """A ValueError when a model's batch-norm layers ``bns`` do not fit MAML's batch-norm options (the
    mode ``batch_norm``, ``tasks`` and ``per_step_bn``)."""
    if batch_norm == "transductive" and any(m.track_running_stats for m in bns):
        raise ValueError(
            "batch_norm='transductive' normalises with each batch's statistics: build the model's "
            "batch-norm layers with track_running_stats=False, or pass batch_norm='inductive'"
        )
    if batch_norm == "inductive":
        if not all(m.track_running_stats for m in bns):
            raise ValueError("batch_norm='inductive' needs batch-norm layers with track_running_stats=True")
        if tasks == "vmap" and bns:
            raise ValueError("batch_norm='inductive' updates running statistics: use tasks='loop'")
    if per_step_bn and not bns:
        raise ValueError("per_step_bn=True needs batch-norm layers, and the model has none")


def renamed_args(kwargs: dict[str, Any], hidden: int | None, checkpoint: bool | None) -> None:
    """Warn of the deprecated method args ``hidden`` and ``checkpoint``; the latter goes to ``kwargs``
    as ``recompute``."""
    if hidden is not None:
        warnings.warn("MAML's method arg 'hidden' is deprecated: set the backbone's width with "
                      "backbone_args={'hidden': ...}", DeprecationWarning, stacklevel=3)
    if checkpoint is not None:
        if "recompute" in kwargs:
            raise ValueError("'checkpoint' is the old name of 'recompute': give 'recompute' only")
        warnings.warn("MAML's method arg 'checkpoint' is now 'recompute'", DeprecationWarning, stacklevel=3)
        kwargs["recompute"] = checkpoint


__all__ = ["check_batch_norm", "check_options", "renamed_args"]
